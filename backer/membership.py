"""Journal event kinds of a share, and who is a member.

Membership is itself journal events: the share's first event (GENESIS, naming the
share id) makes its author the founding member; MEMBER_ADD events signed by a member
admit further devices. Ingest asks :func:`is_member` before storing anything.
"""

from __future__ import annotations

from enum import IntEnum

from journal import Event

SHARE_ID_BYTES = 16


INVITE_ID_BYTES = 16
NO_INVITE = bytes(INVITE_ID_BYTES)


class EventKind(IntEnum):
    GENESIS = 1
    MEMBER_ADD = 2
    STATE = 3
    INVITE = 4


def genesis_payload(share_id: bytes, device_name: str) -> bytes:
    return share_id + device_name.encode("utf-8")


def member_payload(device_key: bytes, device_name: str, invite_id: bytes = NO_INVITE) -> bytes:
    return device_key + invite_id + device_name.encode("utf-8")


def invite_payload(invite_id: bytes, psk: bytes, expires_ms: int) -> bytes:
    """An invite is journal data so that any member who has seen it can admit the joiner."""
    return invite_id + psk + expires_ms.to_bytes(8, "big")


def parse_invite(payload: bytes) -> tuple[bytes, bytes, int]:
    return payload[:16], payload[16:48], int.from_bytes(payload[48:56], "big")


def admitted(event: Event, members: dict[bytes, str]) -> tuple[bytes, str, bytes] | None:
    """(device key, name, invite id) a membership event admits, if valid given ``members``."""
    if event.kind == EventKind.GENESIS and event.seq == 0 and not members:
        name = event.payload[SHARE_ID_BYTES:].decode("utf-8", "replace")
        return event.author, name, NO_INVITE
    if event.kind == EventKind.MEMBER_ADD and event.author in members:
        payload = event.payload
        name = payload[32 + INVITE_ID_BYTES :].decode("utf-8", "replace")
        return payload[:32], name, payload[32 : 32 + INVITE_ID_BYTES]
    return None

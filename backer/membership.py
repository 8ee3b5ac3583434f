"""Journal event kinds of a share, and who is a member.

Membership is itself journal events: the share's first event (GENESIS, naming the
share id) makes its author the founding member; MEMBER_ADD events signed by a member
admit further devices. Ingest asks :func:`is_member` before storing anything.
"""

from __future__ import annotations

from enum import IntEnum

from journal import Event

SHARE_ID_BYTES = 16


class EventKind(IntEnum):
    GENESIS = 1
    MEMBER_ADD = 2
    STATE = 3


def genesis_payload(share_id: bytes, device_name: str) -> bytes:
    return share_id + device_name.encode("utf-8")


def member_payload(device_key: bytes, device_name: str) -> bytes:
    return device_key + device_name.encode("utf-8")


def admitted(event: Event, members: dict[bytes, str]) -> tuple[bytes, str] | None:
    """The (device key, name) a membership event admits, if it is valid given ``members``."""
    if event.kind == EventKind.GENESIS and event.seq == 0 and not members:
        return event.author, event.payload[SHARE_ID_BYTES:].decode("utf-8", "replace")
    if event.kind == EventKind.MEMBER_ADD and event.author in members:
        return event.payload[:32], event.payload[32:].decode("utf-8", "replace")
    return None

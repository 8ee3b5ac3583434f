"""Journal event kinds of a share, and who is a member.

Membership is itself journal events: the share's first event (GENESIS, naming the
share id) makes its author the founding member; MEMBER_ADD events signed by a member
admit further devices; a RENAME event signed by a device gives it a new name (only a
device renames itself); MEMBER_REMOVE events remove one, from a point of its log on
(its events from there on are refused), and the remover's KEY event hands a new share
key to every remaining member, sealed to each one's device key. A CLIENT event binds the
Yjs client id it derives (from its author's key) to its author before that author's
STATE events use it. :class:`Members` is the
member table kept in memory: ingest and every handshake ask it, never the database.
"""

from __future__ import annotations

import socket
import unicodedata
from dataclasses import dataclass, field
from enum import IntEnum

import nacl.exceptions
import nacl.public
import nacl.signing

from backer.config.identity import curve_private, curve_public
from backer.errors import BackerError
from journal import Event

SHARE_ID_BYTES = 16
KEY_BYTES = 32
SEALED_BYTES = 32 + KEY_BYTES + 16  # a sealed box: ephemeral public key, key, tag
KEY_ENTRY_BYTES = 32 + SEALED_BYTES  # a member's device key and the key sealed to it
INVITE_ID_BYTES = 16
NO_INVITE = bytes(INVITE_ID_BYTES)
MAX_DEVICE_NAME = 1024  # bytes of a device name in a membership event
MAX_MEMBERS = 1000
"""Devices a share may ever admit (removed ones count): one person's devices are a
handful; the bound keeps a hostile member from growing every device's member table and
every KEY event (1,000 members: 112 KB) without limit."""


class EventKind(IntEnum):
    GENESIS = 1
    MEMBER_ADD = 2
    STATE = 3
    INVITE = 4
    MEMBER_REMOVE = 5
    KEY = 6
    CLIENT = 7  # declares a Yjs client id: its nonce, hashed with the author's key
    RENAME = 8  # a device's new name, signed by that device itself
    UNHELD = 9  # content ids whose bytes the author no longer holds (pruned, or never had)


def genesis_payload(share_id: bytes, device_name: str) -> bytes:
    return share_id + device_name.encode("utf-8")


def member_payload(device_key: bytes, device_name: str, invite_id: bytes = NO_INVITE) -> bytes:
    return device_key + invite_id + device_name.encode("utf-8")


def admission_invite(event: Event) -> bytes | None:
    """The invite a MEMBER_ADD event says its device joined with (None: none)."""
    if event.kind != EventKind.MEMBER_ADD:
        return None
    invite_id = event.payload[32 : 32 + INVITE_ID_BYTES]
    return invite_id if len(invite_id) == INVITE_ID_BYTES and invite_id != NO_INVITE else None


def rename_payload(device_key: bytes, device_name: str) -> bytes:
    return device_key + device_name.encode("utf-8")


def checked_name(name: str) -> str:
    """``name`` as a device name (surrounding spaces stripped), or :class:`BackerError`:
    not empty, at most ``MAX_DEVICE_NAME`` bytes, no control characters (peers' names
    are escaped when printed anyway; ours need not be)."""
    name = name.strip()
    if not name:
        raise BackerError("a device name cannot be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_DEVICE_NAME:
        raise BackerError(f"a device name is at most {MAX_DEVICE_NAME} bytes (UTF-8)")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in name):
        raise BackerError(f"a device name cannot contain control characters: {name!r}")
    return name


def host_name() -> str:
    """This machine's name: every device's default name (at init and join)."""
    try:
        return checked_name(socket.gethostname())
    except BackerError:
        return "device"


def invite_payload(invite_id: bytes, psk: bytes, expires_ms: int) -> bytes:
    """An invite is journal data so that any member who has seen it can admit the joiner."""
    return invite_id + psk + expires_ms.to_bytes(8, "big")


def parse_invite(payload: bytes) -> tuple[bytes, bytes, int]:
    return payload[:16], payload[16:48], int.from_bytes(payload[48:56], "big")


def remove_payload(device_key: bytes, kept: int) -> bytes:
    """Remove ``device_key``; its first ``kept`` events (what the remover had) stay valid."""
    return device_key + kept.to_bytes(8, "big")


def key_payload(epoch: int, share_key: bytes, members: list[bytes]) -> bytes:
    """A new share key, sealed (X25519 of each device key) to each of ``members``."""
    sealed = b"".join(
        member
        + nacl.public.SealedBox(nacl.public.PublicKey(curve_public(member))).encrypt(share_key)
        for member in members
    )
    return epoch.to_bytes(4, "big") + sealed


def open_key(payload: bytes, key: nacl.signing.SigningKey) -> tuple[int, bytes] | None:
    """(epoch, share key) of a KEY event if it was sealed to the device ``key``."""
    entry, device = KEY_ENTRY_BYTES, bytes(key.verify_key)
    for start in range(4, len(payload) - entry + 1, entry):
        if payload[start : start + 32] == device:
            box = nacl.public.SealedBox(nacl.public.PrivateKey(curve_private(key)))
            try:
                share_key = box.decrypt(payload[start + 32 : start + entry])
            except nacl.exceptions.CryptoError:
                return None
            return int.from_bytes(payload[:4], "big"), share_key
    return None


REMOVED = "this device was removed from the share"
NOT_A_MEMBER = "not a member of this share"


@dataclass
class Members:
    """The member table in memory: every device ever admitted (key -> name) and the
    removed ones (key -> how many of its events stay valid). Ingest and handshakes ask
    it, so no event and no connection reads the database for it."""

    names: dict[bytes, str] = field(default_factory=dict)
    removed: dict[bytes, int] = field(default_factory=dict)

    def __contains__(self, device: object) -> bool:
        return device in self.names and device not in self.removed

    def __bool__(self) -> bool:
        return bool(self.names)

    @property
    def founder(self) -> bytes:
        """The device whose GENESIS began the share (the first admitted; empty before
        any): what names the share beside its id (see repair.finish)."""
        return next(iter(self.names), b"")

    @property
    def active(self) -> dict[bytes, str]:
        """Current members, in admission order."""
        return {k: n for k, n in self.names.items() if k not in self.removed}

    def refusal(self, device: bytes) -> str | None:
        """Why ``device`` may not sync with us, or None if it may."""
        if device in self:
            return None
        return REMOVED if device in self.removed else NOT_A_MEMBER

    def valid_author(self, author: bytes, seq: int) -> bool:
        """Whether an event of ``author`` at ``seq`` counts: a member's, or one a removed
        device made before the point it was removed at."""
        return author in self.names and seq < self.removed.get(author, 2**63)

    @property
    def full(self) -> bool:
        return len(self.names) >= MAX_MEMBERS

    def admitted(self, event: Event) -> tuple[bytes, str, bytes] | None:
        """(device key, name, invite id) a membership event admits, if it is valid: a
        genesis of an empty share, or a member's MEMBER_ADD of a device never admitted
        before, while the share has room."""
        if event.kind == EventKind.GENESIS and event.seq == 0 and not self:
            name = event.payload[SHARE_ID_BYTES:].decode("utf-8", "replace")
            return event.author, name, NO_INVITE
        if event.kind != EventKind.MEMBER_ADD or not self.valid_author(event.author, event.seq):
            return None
        payload = event.payload
        device = payload[:32]
        if len(device) != 32 or device in self.names or self.full:
            return None
        name = payload[32 + INVITE_ID_BYTES :].decode("utf-8", "replace")
        return device, name, payload[32 : 32 + INVITE_ID_BYTES]

    def removal(self, event: Event) -> tuple[bytes, int] | None:
        """(device key, events kept) a MEMBER_REMOVE event removes, if it is valid. Two
        removals of one device keep the smaller count, whatever their order."""
        if event.kind != EventKind.MEMBER_REMOVE or not self.valid_author(event.author, event.seq):
            return None
        device, kept = event.payload[:32], int.from_bytes(event.payload[32:40], "big")
        if len(event.payload) != 40 or device == event.author or device not in self.names:
            return None
        return device, min(kept, self.removed.get(device, kept))

    def renaming(self, event: Event) -> tuple[bytes, str] | None:
        """(device key, new name) a RENAME event gives, if it is valid: signed by that
        device itself while it counts as a member."""
        if event.kind != EventKind.RENAME or not self.valid_author(event.author, event.seq):
            return None
        device = event.payload[:32]
        if device != event.author or len(event.payload) <= 32:
            return None
        return device, event.payload[32:].decode("utf-8", "replace")

"""Invite tokens: everything a new device needs to find the share and prove the invite.

A token is base64url text of ``"BKI1" | share id 16 | invite id 16 | one-time key 32 |
inviter device key 32 | addresses`` (comma-separated ``host:port``). The one-time key
is the pre-shared key of the joiner's first handshake; the invite itself is a journal
event, so any member that has seen it can admit the joiner, once, before it expires.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from backer.errors import BackerError
from backer.model.membership import EventKind, parse_invite
from journal import Event

MAGIC = b"BKI1"
MAX_EXPIRES_S = 2**31 - 1  # an invite's longest life in seconds (its expiry is a 64-bit ms count)


@dataclass(frozen=True)
class InviteToken:
    share_id: bytes
    invite_id: bytes
    psk: bytes
    inviter: bytes
    addresses: tuple[str, ...]

    def encode(self) -> str:
        raw = MAGIC + self.share_id + self.invite_id + self.psk + self.inviter
        raw += ",".join(self.addresses).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> InviteToken:
        try:
            raw = base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))
        except (binascii.Error, ValueError) as exc:
            raise BackerError("not an invite token (bad encoding)") from exc
        if not raw.startswith(MAGIC) or len(raw) < 100:
            raise BackerError("not an invite token")
        body = raw[len(MAGIC) :]
        try:
            addresses = tuple(a for a in body[96:].decode().split(",") if a)
        except UnicodeDecodeError as exc:
            raise BackerError("not an invite token (bad addresses)") from exc
        return cls(body[:16], body[16:32], body[32:64], body[64:96], addresses)

    def check_responder(self, peer: bytes, header: bytes, proof: bytes) -> str | None:
        """A joiner accepts the inviter, or a device that shows the inviter's signed
        event for this invite (a member that has seen it); anyone else who merely knows
        the one-time key (any holder of the token) could serve a fake share."""
        if peer == self.inviter or self._signed_by_inviter(proof):
            return None
        return "the peer is not the inviter and shows no invite signed by it: refused"

    def _signed_by_inviter(self, raw: bytes) -> bool:
        try:
            event = Event.decode(raw)
            event.verify()
        except ValueError:
            return False
        invite_id, psk, _ = parse_invite(event.payload)
        return (
            event.author == self.inviter
            and event.kind == EventKind.INVITE
            and (invite_id, psk) == (self.invite_id, self.psk)
        )

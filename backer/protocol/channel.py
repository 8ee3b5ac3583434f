"""An authenticated, encrypted byte stream over any duplex transport, sans-IO.

The initiator opens with a clear 17-byte header — a mode byte (``S`` to sync, ``J`` to
join with an invite) and the share id or invite id — that tells the responder which
pre-shared key to use; the header is also the Noise prologue, so tampering with it
fails the handshake. Then ``Noise_XXpsk0_25519_AESGCM_SHA256``:

- psk0: the share key (or the invite's one-time secret) is mixed in before the first
  message, so a peer without it fails at once and learns nothing, not even our key;
- XX: both sides prove their static key; it is derived from the device's Ed25519
  key, which each side also sends (encrypted) so that the other can check membership
  against its journal before any application data flows;
- ephemeral keys give forward secrecy.

On the wire every Noise message is ``u16 length | message``; application data is cut
into records of at most 65,519 plaintext bytes (the Noise maximum minus the tag). A
responder that refuses a connection says why before closing, in the clear, with a
record no Noise message can be: length 0 and one reason code (:data:`REFUSALS`). A code
is all it says, so a stranger learns nothing about the share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import nacl.signing

from backer.buffers import Buffers
from backer.config.identity import curve_private, curve_public
from backer.model.membership import REMOVED
from backer.protocol.noise import (
    DH_LEN,
    MAX_MESSAGE,
    TAG_LEN,
    CipherState,
    HandshakeState,
    NoiseError,
)

PROTOCOL_NAME = "Noise_XXpsk0_25519_AESGCM_SHA256"
PROLOGUE = b"backer/1 "
HEADER_LEN = 17
MODE_SYNC = b"S"
MODE_JOIN = b"J"
MAX_PLAINTEXT = MAX_MESSAGE - TAG_LEN
RESPONSE_LEN = DH_LEN + (DH_LEN + TAG_LEN) + (32 + TAG_LEN)  # e, s, device key: the
# responder's one handshake message (to a joiner, longer by the invite's proof)

UNKNOWN, NOT_MEMBER, FAILED, BUSY, TOO_SLOW, WAS_REMOVED = 1, 2, 3, 4, 5, 6
PEER_REFUSED = "the peer refused: "  # how a refusal reads (a dialler backs off on it)
REFUSALS = {
    UNKNOWN: "unknown share or invite (the token is wrong, used or expired, "
    "or that device does not hold this share)",
    NOT_MEMBER: "this device is not a member of the share",
    FAILED: "the handshake failed (wrong share key or invite secret, or damaged data)",
    BUSY: "too many connections are being set up there; try again",
    TOO_SLOW: "the handshake took too long",
    WAS_REMOVED: REMOVED,
}


class ChannelError(Exception):
    """The secure channel failed: wrong key, not a member, tampering, garbage.
    ``refusal``: the code a responder sends before closing (None: send nothing)."""

    def __init__(self, message: str, refusal: int | None = FAILED) -> None:
        super().__init__(message)
        self.refusal = refusal


def refusal(code: int) -> bytes:
    """The clear record that tells a connecting peer why it is being closed."""
    return b"\0\0" + bytes([code])


def _x25519_public(device_key: bytes) -> bytes:
    try:
        return curve_public(device_key)
    except ValueError as exc:
        raise ChannelError("peer sent an invalid device key") from exc


PskLookup = Callable[[bytes], list[bytes]]
"""Responder: header -> the pre-shared keys to try, newest first (none: refuse)."""
PeerCheck = Callable[[bytes, bytes, bytes], str | None]
"""(peer device key, header, proof) -> None to accept, or the reason for refusing. The
proof is what the responder's ``proof`` gave for the header (e.g. a signed invite)."""
Proof = Callable[[bytes], bytes]


class SecureChannel:
    """One end of a channel. Feed it received bytes; send what :meth:`data_to_send` gives."""

    def __init__(
        self,
        key: nacl.signing.SigningKey,
        check_peer: PeerCheck,
        *,
        header: bytes | None = None,
        psk: bytes | None = None,
        lookup_psk: PskLookup | None = None,
        proof: Proof | None = None,
    ) -> None:
        """An initiator passes ``header`` and ``psk``; a responder passes ``lookup_psk``
        and, optionally, ``proof``: bytes it sends with its identity for that header."""
        self.key = key
        self.check_peer = check_peer
        self.initiator = header is not None
        self.lookup_psk = lookup_psk
        self.proof = proof
        self._candidates: list[bytes] = []
        self.header = header or b""
        self.peer: bytes | None = None
        self._handshake: HandshakeState | None = None
        self._send: CipherState | None = None
        self._receive: CipherState | None = None
        self._buffer = bytearray()
        self._outgoing: list[bytes | bytearray | memoryview] = []
        self._records = bytearray()  # what send encrypts into, once the transport gave it back
        self._records_free = True
        self._plaintext = Buffers()  # what received records are decrypted into
        if self.initiator:
            if len(self.header) != HEADER_LEN or psk is None:
                raise ValueError("an initiator needs a 17-byte header and a psk")
            self._handshake = self._new_handshake(psk)
            self._outgoing.append(self.header)
            self._record(self._handshake.write_message())

    @property
    def established(self) -> bool:
        return self._send is not None

    def _new_handshake(self, psk: bytes) -> HandshakeState:
        return HandshakeState(
            PROTOCOL_NAME,
            self.initiator,
            PROLOGUE + self.header,
            static_private=curve_private(self.key),
            psks=[psk],
        )

    def _record(self, message: bytes) -> None:
        self._outgoing.append(len(message).to_bytes(2, "big") + message)

    def data_to_send(self) -> bytes | bytearray | memoryview:
        """What to write to the peer now (the buffer is handed over, not copied; after
        :meth:`reuse` it may be overwritten by the next :meth:`send`)."""
        pending, self._outgoing = self._outgoing, []
        return pending[0] if len(pending) == 1 else b"".join(pending)

    def reuse(self) -> None:
        """The transport holds nothing :meth:`data_to_send` gave (the kernel took it
        all): the next :meth:`send` may encrypt into the same buffer, not a new one."""
        if not self._outgoing:
            self._records_free = True

    def send(self, *plaintext: bytes | bytearray | memoryview) -> None:
        """Encrypt application data, given in pieces, into records (queued for
        :meth:`data_to_send`), each piece straight into one output buffer: no ciphertext
        objects, no joins, and no copy of the pieces into one plaintext first (a record
        never spans two pieces; where records are cut does not matter to the peer)."""
        if self._send is None:
            raise ChannelError("channel is not established")
        views = [memoryview(piece) for piece in plaintext]
        records = sum(-(-len(view) // MAX_PLAINTEXT) for view in views)
        size = sum(map(len, views)) + records * (2 + TAG_LEN)
        if not self._records_free or len(self._records) < size:
            self._records = bytearray(size)
        self._records_free = False
        out = memoryview(self._records)[:size]
        with memoryview(out) as target:
            at = 0
            for view in views:
                for start in range(0, len(view), MAX_PLAINTEXT):
                    piece = view[start : start + MAX_PLAINTEXT]
                    size = len(piece) + TAG_LEN
                    target[at : at + 2] = size.to_bytes(2, "big")
                    self._send.encrypt_into(piece, target[at + 2 : at + 2 + size])
                    at += 2 + size
        if out:
            self._outgoing.append(out)

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """Consume bytes from the peer; return the application plaintext they carried:
        a view the caller may keep (its buffer is decrypted into again only once no
        view of it is left, see :class:`~backer.buffers.Buffers`)."""
        try:
            if self._receive is None:
                self._buffer += data
                self._handshake_records()
                if self._receive is None:
                    return b""
                data, self._buffer = bytes(self._buffer), bytearray()
            return self._open_records(data)
        except NoiseError as exc:
            raise ChannelError(f"handshake or record failed: {exc}") from exc

    def _handshake_records(self) -> None:
        """Consume the handshake's records from the buffer, up to the channel's
        establishment (what follows is left for :meth:`_open_records`)."""
        if not self.initiator and not self.header:
            if len(self._buffer) < HEADER_LEN:
                return
            self.header = bytes(self._buffer[:HEADER_LEN])
            del self._buffer[:HEADER_LEN]
            self._candidates = self.lookup_psk(self.header) if self.lookup_psk else []
            if not self._candidates:
                raise ChannelError("unknown share or invite", UNKNOWN)
        offset = 0
        try:
            while self._receive is None and len(self._buffer) - offset >= 2:
                size = int.from_bytes(self._buffer[offset : offset + 2], "big")
                if size == 0 and self.initiator:
                    if len(self._buffer) - offset < 3:
                        break
                    reason = REFUSALS.get(self._buffer[offset + 2], "no reason given")
                    raise ChannelError(f"{PEER_REFUSED}{reason}", None)
                exact = self.header[:1] == MODE_SYNC
                if (
                    self.initiator
                    and self._handshake is not None
                    and (size != RESPONSE_LEN if exact else size < RESPONSE_LEN)
                ):
                    raise ChannelError(
                        "the peer does not speak backer's protocol (is it a backer serve?)",
                        None,
                    )
                if len(self._buffer) - offset < 2 + size:
                    break
                message = bytes(self._buffer[offset + 2 : offset + 2 + size])
                offset += 2 + size
                if self._handshake is None:
                    self._first_message(message)
                else:
                    self._handshake_step(message)
        finally:
            del self._buffer[:offset]  # once per call: not once per record

    def _open_records(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Decrypt every complete transport record: those within ``data`` are read in
        place and decrypted straight into the one plaintext view returned; only a
        record cut by the end of a read is copied (into ``_buffer``, until complete).
        A record of length 0 is a responder's refusal (see :meth:`_refused`)."""
        view = memoryview(data)
        records: list[memoryview] = []
        pos = 0
        while self._buffer and pos < len(view):  # a record begun in an earlier read
            have = len(self._buffer)
            size = int.from_bytes(self._buffer[:2], "big") if have >= 2 else -1
            need = 2 if size < 0 else 2 + (size or 1)  # a refusal: its code byte
            step = min(need - have, len(view) - pos)
            self._buffer += view[pos : pos + step]
            pos += step
            if size >= 0 and len(self._buffer) == need:
                if size == 0:
                    self._refused(self._buffer[2])
                records.append(memoryview(bytes(self._buffer))[2:])
                self._buffer.clear()
        while len(view) - pos >= 2:
            size = int.from_bytes(view[pos : pos + 2], "big")
            end = pos + 2 + (size or 1)
            if end > len(view):
                break
            if size == 0:
                self._refused(view[pos + 2])
            records.append(view[pos + 2 : end])
            pos = end
        self._buffer += view[pos:]
        assert self._receive is not None
        out = self._plaintext.take(sum(max(len(record) - TAG_LEN, 0) for record in records))
        at = 0
        for record in records:
            size = max(len(record) - TAG_LEN, 0)
            self._receive.decrypt_into(record, out[at : at + size])
            at += size
        return out

    def _refused(self, code: int) -> NoReturn:
        """A record of length 0 and a code: the responder refused us after we sent our
        last handshake message (it checks membership on reading it), e.g. because this
        device was removed. No encrypted record is that short, so from a responder's
        peer it is only damage."""
        if not self.initiator:
            raise ChannelError("a record of no bytes")
        raise ChannelError(f"{PEER_REFUSED}{REFUSALS.get(code, 'no reason given')}", None)

    def _first_message(self, message: bytes) -> None:
        """Responder: the initiator's first message opens with one of the candidate keys
        (a share's current key or an older one, see docs/decisions.md)."""
        for psk in self._candidates:
            self._handshake = self._new_handshake(psk)
            try:
                self._handshake_step(message)
                return
            except NoiseError:
                self._handshake = None
        raise ChannelError("handshake failed: wrong share key or invite key")

    def _handshake_step(self, message: bytes) -> None:
        handshake = self._handshake
        assert handshake is not None
        payload = handshake.read_message(message)
        if payload:
            self._accept(payload, handshake.rs)
        if not handshake.complete:
            proof = self.proof(self.header) if self.proof and not self.initiator else b""
            self._record(handshake.write_message(bytes(self.key.verify_key) + proof))
        if handshake.complete:
            if self.peer is None:
                raise ChannelError("peer never identified itself")
            self._send, self._receive = handshake.split()
            self._handshake = None

    def _accept(self, payload: bytes, remote_static: bytes | None) -> None:
        device_key, proof = payload[:32], payload[32:]
        if len(device_key) != 32 or remote_static != _x25519_public(device_key):
            raise ChannelError("peer's device key does not match its handshake key")
        reason = self.check_peer(device_key, self.header, proof)
        if reason is not None:
            raise ChannelError(reason, WAS_REMOVED if reason == REMOVED else NOT_MEMBER)
        self.peer = device_key

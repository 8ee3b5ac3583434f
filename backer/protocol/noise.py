"""The Noise Protocol Framework (revision 34), sans-IO, for the interactive patterns.

backer's sessions use ``Noise_XXpsk0_25519_AESGCM_SHA256`` (see docs/decisions.md):
mutual authentication by static keys, forward secrecy from ephemeral keys, and the
share key as pre-shared key mixed in before the first byte, so a peer without the
share key cannot complete even the first message and learns nothing about us.

The engine is generic over the pattern table below and the cipher/hash names, so the
published cacophony test vectors check it on every pattern and suite they cover.
X25519 comes from libsodium (pynacl); AES-GCM and ChaCha20-Poly1305 from
``cryptography`` (AES-GCM runs at ~7 GB/s here, libsodium's ChaCha ~1 GB/s).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import nacl.bindings
import nacl.public
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

DH_LEN = 32
TAG_LEN = 16
MAX_MESSAGE = 65535
MAX_NONCE = 2**64 - 1

# pattern -> (pre-messages, messages); each message is (sent by initiator, tokens)
_PATTERNS: dict[
    str, tuple[tuple[tuple[bool, tuple[str, ...]], ...], tuple[tuple[bool, tuple[str, ...]], ...]]
] = {
    "N": (((False, ("s",)),), ((True, ("e", "es")),)),
    "K": (((True, ("s",)), (False, ("s",))), ((True, ("e", "es", "ss")),)),
    "X": (((False, ("s",)),), ((True, ("e", "es", "s", "ss")),)),
    "NN": ((), ((True, ("e",)), (False, ("e", "ee")))),
    "NK": (((False, ("s",)),), ((True, ("e", "es")), (False, ("e", "ee")))),
    "NX": ((), ((True, ("e",)), (False, ("e", "ee", "s", "es")))),
    "XN": ((), ((True, ("e",)), (False, ("e", "ee")), (True, ("s", "se")))),
    "XK": (((False, ("s",)),), ((True, ("e", "es")), (False, ("e", "ee")), (True, ("s", "se")))),
    "XX": ((), ((True, ("e",)), (False, ("e", "ee", "s", "es")), (True, ("s", "se")))),
    "KN": (((True, ("s",)),), ((True, ("e",)), (False, ("e", "ee", "se")))),
    "KK": (
        ((True, ("s",)), (False, ("s",))),
        ((True, ("e", "es", "ss")), (False, ("e", "ee", "se"))),
    ),
    "KX": (((True, ("s",)),), ((True, ("e",)), (False, ("e", "ee", "se", "s", "es")))),
    "IN": ((), ((True, ("e", "s")), (False, ("e", "ee", "se")))),
    "IK": (((False, ("s",)),), ((True, ("e", "es", "s", "ss")), (False, ("e", "ee", "se")))),
    "IX": ((), ((True, ("e", "s")), (False, ("e", "ee", "se", "s", "es")))),
}

_HASHES: dict[str, tuple[Callable[..., hashlib._Hash], int]] = {
    "SHA256": (hashlib.sha256, 32),
    "SHA512": (hashlib.sha512, 64),
    "BLAKE2b": (hashlib.blake2b, 64),
    "BLAKE2s": (hashlib.blake2s, 32),
}


class NoiseError(Exception):
    """The handshake or a transport message failed: wrong key, tampering, misuse."""


def _nonce_aesgcm(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")


def _nonce_chachapoly(n: int) -> bytes:
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


_CIPHERS = {"AESGCM": (AESGCM, _nonce_aesgcm), "ChaChaPoly": (ChaCha20Poly1305, _nonce_chachapoly)}


class CipherState:
    """A key and a nonce counter: one direction of an encrypted channel."""

    def __init__(self, cipher_name: str, key: bytes | None = None) -> None:
        self._factory, self._nonce = _CIPHERS[cipher_name]
        self._cipher = self._factory(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._cipher is not None

    def _next_nonce(self) -> bytes:
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce space exhausted: the session must be re-established")
        return self._nonce(self.n)

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._cipher is None:
            return plaintext
        ciphertext = self._cipher.encrypt(self._next_nonce(), plaintext, ad)
        self.n += 1
        return ciphertext

    def encrypt_into(self, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Encrypt a transport message (no associated data) straight into ``out``, which
        is exactly ``len(plaintext) + TAG_LEN`` bytes: no ciphertext object to copy."""
        assert self._cipher is not None
        self._cipher.encrypt_into(self._next_nonce(), plaintext, b"", out)
        self.n += 1

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._cipher is None:
            return ciphertext
        try:
            plaintext = self._cipher.decrypt(self._next_nonce(), ciphertext, ad)
        except InvalidTag as exc:
            raise NoiseError("message failed authentication (wrong key or tampered)") from exc
        self.n += 1
        return plaintext

    def decrypt_into(self, ciphertext: memoryview, out: memoryview) -> None:
        """Decrypt a transport message (no associated data) into ``out``, which is
        exactly ``len(ciphertext) - TAG_LEN`` bytes; nothing there is to be trusted
        unless this returns."""
        assert self._cipher is not None
        if len(ciphertext) < TAG_LEN:
            raise NoiseError("message is shorter than its authentication tag")
        try:
            self._cipher.decrypt_into(self._next_nonce(), ciphertext, b"", out)
        except InvalidTag as exc:
            raise NoiseError("message failed authentication (wrong key or tampered)") from exc
        self.n += 1


def x25519_public(private: bytes) -> bytes:
    return nacl.bindings.crypto_scalarmult_base(private)


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except Exception as exc:  # libsodium refuses low-order points
        raise NoiseError("invalid Diffie-Hellman public key") from exc


class HandshakeState:
    """One side of a Noise handshake; feed it messages, then :meth:`split`."""

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        prologue: bytes = b"",
        static_private: bytes | None = None,
        remote_static: bytes | None = None,
        psks: list[bytes] | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        parts = protocol_name.split("_")
        if len(parts) != 5 or parts[0] != "Noise" or parts[2] != "25519":
            raise ValueError(f"unsupported protocol {protocol_name!r}")
        pattern, modifiers = _split_pattern(parts[1])
        if pattern not in _PATTERNS or parts[3] not in _CIPHERS or parts[4] not in _HASHES:
            raise ValueError(f"unsupported protocol {protocol_name!r}")
        self.cipher_name = parts[3]
        self._hash, self.hash_len = _HASHES[parts[4]]
        pre_messages, messages = _PATTERNS[pattern]
        self.messages = _apply_psk_modifiers(messages, modifiers)
        self.uses_psk = bool(modifiers)
        self.psks = list(psks or [])
        if len(self.psks) != len(modifiers) or any(len(p) != 32 for p in self.psks):
            raise ValueError("one 32-byte pre-shared key is needed per psk modifier")
        self.initiator = initiator
        self.s = static_private
        self.rs = remote_static
        self.e = ephemeral_private
        self.re: bytes | None = None
        name = protocol_name.encode()
        self.h = (
            name.ljust(self.hash_len, b"\0") if len(name) <= self.hash_len else self._digest(name)
        )
        self.ck = self.h
        self.cipher = CipherState(self.cipher_name)
        self._mix_hash(prologue)
        for from_initiator, tokens in pre_messages:
            for token in tokens:
                assert token == "s"
                key = self._own_public() if from_initiator == initiator else self.rs
                if key is None:
                    raise ValueError("this pattern needs the remote static key in advance")
                self._mix_hash(key)
        self.index = 0

    # -- symmetric state ------------------------------------------------------------------

    def _digest(self, data: bytes) -> bytes:
        return self._hash(data).digest()

    def _hkdf(self, ikm: bytes, outputs: int) -> list[bytes]:
        temp = hmac.new(self.ck, ikm, self._hash).digest()
        result, previous = [], b""
        for i in range(1, outputs + 1):
            previous = hmac.new(temp, previous + bytes([i]), self._hash).digest()
            result.append(previous)
        return result

    def _mix_hash(self, data: bytes) -> None:
        self.h = self._digest(self.h + data)

    def _mix_key(self, ikm: bytes) -> None:
        self.ck, key = self._hkdf(ikm, 2)
        self.cipher = CipherState(self.cipher_name, key[:32])

    def _mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, key = self._hkdf(ikm, 3)
        self._mix_hash(temp_h)
        self.cipher = CipherState(self.cipher_name, key[:32])

    def _encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt(self.h, plaintext)
        self._mix_hash(ciphertext)
        return ciphertext

    def _decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt(self.h, ciphertext)
        self._mix_hash(ciphertext)
        return plaintext

    # -- handshake ------------------------------------------------------------------------

    def _own_public(self) -> bytes:
        if self.s is None:
            raise ValueError("this pattern needs our static key")
        return x25519_public(self.s)

    @property
    def complete(self) -> bool:
        return self.index >= len(self.messages)

    @property
    def our_turn(self) -> bool:
        return not self.complete and self.messages[self.index][0] == self.initiator

    def _dh_token(self, token: str) -> bytes:
        mine, theirs = token[0], token[1]
        if not self.initiator:
            mine, theirs = theirs, mine
        private = self.e if mine == "e" else self.s
        public = self.re if theirs == "e" else self.rs
        if private is None or public is None:
            raise NoiseError(f"missing key for {token}")
        return _dh(private, public)

    def write_message(self, payload: bytes = b"") -> bytes:
        if not self.our_turn:
            raise NoiseError("not our turn to send a handshake message")
        out = bytearray()
        for token in self.messages[self.index][1]:
            if token == "e":
                if self.e is None:
                    self.e = bytes(nacl.public.PrivateKey.generate())
                public = x25519_public(self.e)
                out += public
                self._mix_hash(public)
                if self.uses_psk:
                    self._mix_key(public)
            elif token == "s":
                out += self._encrypt_and_hash(self._own_public())
            elif token == "psk":
                self._mix_key_and_hash(self.psks.pop(0))
            else:
                self._mix_key(self._dh_token(token))
        out += self._encrypt_and_hash(payload)
        self.index += 1
        if len(out) > MAX_MESSAGE:
            raise NoiseError("handshake message too long")
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        if self.complete or self.our_turn:
            raise NoiseError("not expecting a handshake message now")
        if len(message) > MAX_MESSAGE:
            raise NoiseError("handshake message too long")
        view = memoryview(message)
        for token in self.messages[self.index][1]:
            if token == "e":
                if len(view) < DH_LEN:
                    raise NoiseError("handshake message truncated")
                self.re = bytes(view[:DH_LEN])
                view = view[DH_LEN:]
                self._mix_hash(self.re)
                if self.uses_psk:
                    self._mix_key(self.re)
            elif token == "s":
                size = DH_LEN + (TAG_LEN if self.cipher.has_key else 0)
                if len(view) < size:
                    raise NoiseError("handshake message truncated")
                self.rs = self._decrypt_and_hash(bytes(view[:size]))
                view = view[size:]
            elif token == "psk":
                self._mix_key_and_hash(self.psks.pop(0))
            else:
                self._mix_key(self._dh_token(token))
        payload = self._decrypt_and_hash(bytes(view))
        self.index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) cipher states for this side, once the handshake is complete."""
        if not self.complete:
            raise NoiseError("handshake is not complete")
        first, second = self._hkdf(b"", 2)
        c1 = CipherState(self.cipher_name, first[:32])
        c2 = CipherState(self.cipher_name, second[:32])
        return (c1, c2) if self.initiator else (c2, c1)


def _split_pattern(name: str) -> tuple[str, list[int]]:
    if "psk" not in name:
        return name, []
    base, *rest = name.split("psk")
    return base, [int(r.rstrip("+")) for r in "+".join(rest).split("+") if r]


def _apply_psk_modifiers(
    messages: tuple[tuple[bool, tuple[str, ...]], ...], modifiers: list[int]
) -> list[tuple[bool, tuple[str, ...]]]:
    result = [list(tokens) for _, tokens in messages]
    for position in modifiers:
        if position == 0:
            result[0].insert(0, "psk")
        else:
            result[position - 1].append("psk")
    return [(who, tuple(tokens)) for (who, _), tokens in zip(messages, result, strict=True)]

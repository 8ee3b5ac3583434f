"""Device identity: one Ed25519 key per device and its human-friendly id.

The key lives in the user's config directory (``BACKER_HOME`` overrides it, so that
tests can run many devices on one machine), readable by the owner only. The device
id follows Syncthing's scheme: base32 of the 32-byte public key, one Luhn mod-32
check character after every 13 characters, shown in dash-separated groups of 7, so
that a typo is caught before it is trusted.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import nacl.bindings
import nacl.signing
import platformdirs

from backer.db.recovery import make_directories
from backer.errors import BackerError

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
KEY_FILE = "device.key"


def home() -> Path:
    """Where this device keeps its key: ``$BACKER_HOME`` or the platform config dir."""
    override = os.environ.get("BACKER_HOME")
    return Path(override) if override else Path(platformdirs.user_config_dir("backer"))


def load_or_create_key(directory: Path | None = None) -> nacl.signing.SigningKey:
    """Return this device's signing key, creating it (mode 0600) on first use."""
    directory = directory or home()
    path = directory / KEY_FILE
    try:
        seed = path.read_bytes()
    except FileNotFoundError:
        return _create_key(directory, path)
    except OSError as exc:
        raise BackerError(f"cannot read device key {path}: {exc.strerror}") from exc
    if len(seed) != 32:
        raise BackerError(f"device key {path} is damaged (expected 32 bytes, found {len(seed)})")
    return nacl.signing.SigningKey(seed)


def _create_key(directory: Path, path: Path) -> nacl.signing.SigningKey:
    """A new key, saved, unless another process saved one first: then that one. Two
    commands started at once on a new home each made a key and renamed it into place;
    one went on with a key that was not the saved one (a share made with it had a
    founding member no later command could be). The key is written to a temp file of
    this process, made durable, then hard-linked into place, which never replaces."""
    make_directories(directory, mode=0o700)
    key = nacl.signing.SigningKey.generate()
    temp = directory / f"{KEY_FILE}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(bytes(key))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return load_or_create_key(directory)
    finally:
        temp.unlink(missing_ok=True)
    folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:  # the link itself durable: a new key after a power cut is a new device
        os.fsync(folder)
    finally:
        os.close(folder)
    return key


def _luhn32(text: str) -> str:
    factor, total = 1, 0
    for char in text:
        addend = factor * _ALPHABET.index(char)
        factor = 1 if factor == 2 else 2
        total += addend // 32 + addend % 32
    return _ALPHABET[(32 - total % 32) % 32]


def device_id(public_key: bytes) -> str:
    """Human-friendly id of a device key, e.g. ``MFZWI3D-BONSGYC-...`` (8 groups)."""
    plain = base64.b32encode(public_key).decode().rstrip("=")
    with_checks = "".join(
        plain[i : i + 13] + _luhn32(plain[i : i + 13]) for i in range(0, len(plain), 13)
    )
    return "-".join(with_checks[i : i + 7] for i in range(0, len(with_checks), 7))


def parse_device_id(text: str) -> bytes:
    """Public key from a device id; raise :class:`BackerError` on a typo."""
    compact = text.strip().upper().replace("-", "").replace(" ", "")
    if len(compact) != 56 or any(c not in _ALPHABET for c in compact):
        raise BackerError(f"not a device id: {text!r}")
    groups = [compact[i : i + 14] for i in range(0, 56, 14)]
    if any(_luhn32(group[:13]) != group[13] for group in groups):
        raise BackerError(f"device id {text!r} has a wrong check character (typo?)")
    return base64.b32decode("".join(group[:13] for group in groups) + "====")


def short_id(public_key: bytes) -> str:
    """The first group of the device id: enough to tell a person's devices apart."""
    return device_id(public_key)[:7]


def curve_private(key: nacl.signing.SigningKey) -> bytes:
    """The X25519 private key of a device (for Noise and for keys sealed to it)."""
    return nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(bytes(key) + bytes(key.verify_key))


def curve_public(device_key: bytes) -> bytes:
    """The X25519 public key of a device key; ValueError if it is not a valid key."""
    try:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(device_key)
    except Exception as exc:  # libsodium rejects points off the curve
        raise ValueError("not a valid device key") from exc

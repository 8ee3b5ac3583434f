"""File versions as compact, explicitly encoded values of the replicated state.

A version is one write of one path by one device: what the path held (a file's
content hash, a symlink's target, a directory, or a deletion), the versions it
supersedes, and who made it when. The encoding is a fixed struct followed by the
superseded ids and the kind's data — never JSON and never numbers left to the CRDT,
which hands integers back as floats.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from backer.model import entropy

VERSION_ID_BYTES = 9
_HEAD = struct.Struct(
    ">BHQqQ8sB"
)  # kind, permissions, size, mtime_ns, time_ms, device, n superseded
_SIZE = struct.Struct(">Q")  # the size field, after kind (1 byte) and permissions (2)
PERMISSION_BITS = 0o777
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31 23:59:59.999 UTC, the last instant datetime has
MAX_SIZE = 2**50  # 1 PiB: larger than any file, small enough for every size computation
MAX_LINK_TARGET = 4096  # PATH_MAX
CONTENT_ID_BYTES = 32


class BadVersion(ValueError):
    """A version record that is malformed or out of range: never stored, never applied."""


class Kind(IntEnum):
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    DELETED = 4


T = TypeVar("T", int, bytes)
_KINDS = {kind.value: kind for kind in Kind}  # a dict lookup: Kind(n) costs ~1 µs per call


_SHARED: dict[object, object] = {}  # a few devices, modes and scan times, over and over
_SHARED_MAX = 4096  # bounded: a peer's records could make each value unique


def _shared(value: T) -> T:
    """One object for equal field values of the versions decoded: a plan holds one
    version per file, and 100,000 copies of the same device id cost 4 MiB."""
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)  # type: ignore[return-value]


def new_version_id() -> str:
    """An id unique without coordination, so concurrent writes never share a key: the
    second it is made (4 bytes), then this process's next serial (5 bytes, from a random
    start). Two devices' ids meet only if their serials do within the same second (for a
    million ids each, odds ~2e-6 that the runs overlap at all). Ids made together share
    their first digits, so each index of version ids takes a scan's or a sync's new ids
    on a few pages, where random ids dirtied one page per id once the index outgrew a
    commit (docs/decisions.md)."""
    stamp = (entropy.now_s() % (1 << 32)).to_bytes(4, "big")
    raw = stamp + entropy.serial().to_bytes(entropy.SERIAL_BITS // 8, "big")
    return base64.urlsafe_b64encode(raw).decode()


def _id_bytes(version_id: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(version_id.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise BadVersion(f"bad version id {version_id!r}") from exc
    if len(raw) != VERSION_ID_BYTES or base64.urlsafe_b64encode(raw).decode() != version_id:
        raise BadVersion(f"bad version id {version_id!r}")
    return raw


_VERSION_ID = re.compile(r"[A-Za-z0-9_-]{12}")  # 9 bytes are 72 bits, exactly 12 digits


def check_version_id(version_id: str) -> str:
    """``version_id`` if it is the one spelling of 9 bytes that :func:`new_version_id` makes
    (every 12 URL-safe base64 digits are one: checked without decoding, once per entry
    received, 100,000 times in a first sync of a large share)."""
    if not isinstance(version_id, str) or _VERSION_ID.fullmatch(version_id) is None:
        raise BadVersion(f"bad version id {version_id!r}")
    return version_id


def timestamp(time_ms: int, form: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A UTC time as text; total: times outside what datetime holds are clamped, so a
    peer's absurd time can never make naming or printing fail."""
    clamped = min(max(time_ms, 0), MAX_TIME_MS)
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=clamped)).strftime(
        form
    )


@dataclass(slots=True)
class Version:
    """The value stored under ``path \\0 version-id`` in the shared map. Slotted: a plan
    or a window of a first sync holds one per file (~120 B less each than with a dict)."""

    kind: Kind
    size: int = 0
    mtime_ns: int = 0
    permissions: int = 0  # mode & 0o777; synced like Syncthing does, not just the exec bit
    content: bytes = b""  # file: manifest hash; symlink: UTF-8 target
    device: bytes = bytes(8)  # first 8 bytes of the writer's public key
    time_ms: int = 0
    supersedes: tuple[str, ...] = ()

    def encode(self) -> bytes:
        head = _HEAD.pack(
            self.kind,
            self.permissions & PERMISSION_BITS,
            self.size,
            self.mtime_ns,
            self.time_ms,
            self.device,
            len(self.supersedes),
        )
        return head + b"".join(_id_bytes(v) for v in self.supersedes) + self.content

    @classmethod
    def decode(cls, data: bytes) -> Version:
        """Parse a record; raise :class:`BadVersion` for bytes no encoder makes (see
        :meth:`check` for the ranges a received record must also respect)."""
        if type(data) is not bytes:  # yrs may hand back a bytearray
            data = bytes(data)
        if len(data) < _HEAD.size:
            raise BadVersion("version record is truncated")
        kind, permissions, size, mtime_ns, time_ms, device, count = _HEAD.unpack_from(data)
        start = _HEAD.size
        end = start + count * VERSION_ID_BYTES
        if len(data) < end:
            raise BadVersion("version record is truncated")
        version_kind = _KINDS.get(kind)
        if version_kind is None:
            raise BadVersion(f"unknown version kind {kind}")
        return cls(
            version_kind,
            size,
            mtime_ns,
            _shared(permissions),
            data[end:],
            _shared(device),
            _shared(time_ms),
            _superseded(data, count),
        )

    def check(self) -> Version:
        """Raise :class:`BadVersion` unless every field is in the range an honest device
        records: a received version is checked before it is stored."""
        if self.permissions & ~PERMISSION_BITS:
            raise BadVersion(f"permissions {self.permissions:o} beyond 0o777")
        if not 0 <= self.time_ms <= MAX_TIME_MS:
            raise BadVersion(f"time {self.time_ms} ms is out of range")
        if not 0 <= self.size <= MAX_SIZE:
            raise BadVersion(f"size {self.size} is out of range")
        if self.kind == Kind.FILE and len(self.content) != CONTENT_ID_BYTES:
            raise BadVersion("a file version must name a 32-byte content id")
        if self.kind == Kind.SYMLINK and not 0 < len(self.content) <= MAX_LINK_TARGET:
            raise BadVersion("a symlink target must be 1 to 4096 bytes")
        if self.kind == Kind.SYMLINK and b"\0" in self.content:
            raise BadVersion("a symlink target contains NUL")
        if self.kind in (Kind.DIRECTORY, Kind.DELETED) and (self.content or self.size):
            raise BadVersion(f"a {self.kind.name.lower()} version carries content")
        if len(set(self.supersedes)) != len(self.supersedes):
            raise BadVersion("a version supersedes the same version twice")
        return self

    def same_content(self, other: Version | None) -> bool:
        """True when writing ``self`` over ``other`` would change nothing on disk."""
        return (
            other is not None
            and self.kind == other.kind
            and self.content == other.content
            and self.permissions == other.permissions
        )

    @property
    def executable(self) -> bool:
        return bool(self.permissions & 0o100)

    @property
    def link_target(self) -> str:
        return self.content.decode("utf-8", "surrogateescape")


def _superseded(record: bytes, count: int) -> tuple[str, ...]:
    start = _HEAD.size
    return tuple(
        base64.urlsafe_b64encode(record[i : i + VERSION_ID_BYTES]).decode()
        for i in range(start, start + count * VERSION_ID_BYTES, VERSION_ID_BYTES)
    )


def record_supersedes(record: bytes) -> tuple[str, ...]:
    """The version ids an encoded version supersedes, without decoding the rest (the
    catalog stores records as received: decoding each again cost a first sync ~1 s)."""
    return _superseded(record, record[_HEAD.size - 1])


def record_size(record: bytes) -> int:
    """The size field of an encoded version, without decoding the rest."""
    return _SIZE.unpack_from(record, 3)[0]


SEPARATOR = "\0"


def make_key(path: str, version_id: str) -> str:
    return f"{path}{SEPARATOR}{version_id}"


def split_key(key: str) -> tuple[str, str]:
    path, sep, version_id = key.rpartition(SEPARATOR)
    if not sep:
        raise BadVersion(f"state key without a version id: {key!r}")
    return path, version_id

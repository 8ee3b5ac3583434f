"""File versions as compact, explicitly encoded values of the replicated state.

A version is one write of one path by one device: what the path held (a file's
content hash, a symlink's target, a directory, or a deletion), the versions it
supersedes, and who made it when. The encoding is a fixed struct followed by the
superseded ids and the kind's data — never JSON and never numbers left to the CRDT,
which hands integers back as floats.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from enum import IntEnum

from . import entropy

VERSION_ID_BYTES = 9
_HEAD = struct.Struct(
    ">BHQqQ8sB"
)  # kind, permissions, size, mtime_ns, time_ms, device, n superseded
PERMISSION_BITS = 0o777


class Kind(IntEnum):
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    DELETED = 4


def new_version_id() -> str:
    """A random id: unique without coordination, so concurrent writes never share a key."""
    return base64.urlsafe_b64encode(entropy.token(VERSION_ID_BYTES)).decode()


def _id_bytes(version_id: str) -> bytes:
    raw = base64.urlsafe_b64decode(version_id)
    if len(raw) != VERSION_ID_BYTES:
        raise ValueError(f"bad version id {version_id!r}")
    return raw


@dataclass
class Version:
    """The value stored under ``path \\0 version-id`` in the shared map."""

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
        data = bytes(data)
        kind, permissions, size, mtime_ns, time_ms, device, count = _HEAD.unpack_from(data)
        start = _HEAD.size
        end = start + count * VERSION_ID_BYTES
        if len(data) < end:
            raise ValueError("version record is truncated")
        supersedes = tuple(
            base64.urlsafe_b64encode(data[i : i + VERSION_ID_BYTES]).decode()
            for i in range(start, end, VERSION_ID_BYTES)
        )
        return cls(Kind(kind), size, mtime_ns, permissions, data[end:], device, time_ms, supersedes)

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


SEPARATOR = "\0"


def make_key(path: str, version_id: str) -> str:
    return f"{path}{SEPARATOR}{version_id}"


def split_key(key: str) -> tuple[str, str]:
    path, sep, version_id = key.rpartition(SEPARATOR)
    if not sep:
        raise ValueError(f"state key without a version id: {key!r}")
    return path, version_id

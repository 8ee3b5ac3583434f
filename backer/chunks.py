"""Where chunk bytes come from: files already in the share, or chunks received.

Local first: the catalog's chunk index says where a chunk's bytes were last seen (any
file of the share); they are re-hashed when read, so a stale index row costs a miss,
never a wrong byte. Chunks fetched from peers are verified by hash and appended to one pack
file in ``.backer/incoming/`` (one open file rather than one file per chunk: ~3x faster
here) until the files that need them are written; the pack is removed after each
materialization, and a pack left by a crash is removed at the next start.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from blake3 import blake3

from .catalog import Catalog
from .paths import METADATA_DIR

INCOMING_DIR = "incoming"


class ChunkStore:
    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self.incoming = root / METADATA_DIR / INCOMING_DIR
        self._pack: BinaryIO | None = None
        self._index: dict[bytes, tuple[int, int]] = {}
        self._pack_path = self.incoming / f"pack-{secrets.token_hex(4)}"  # one per session

    def _read_local(self, chunk_hash: bytes) -> bytes | None:
        for path, offset, length in self.catalog.chunk_locations(chunk_hash):
            try:
                fd = os.open(self.root / path, os.O_RDONLY | os.O_NOFOLLOW)  # never via a link
            except OSError:
                continue
            try:
                data = os.pread(fd, length, offset)
            except OSError:
                continue
            finally:
                os.close(fd)
            if blake3(data).digest() == chunk_hash:
                return data
        return None

    def read(self, chunk_hash: bytes) -> bytes | None:
        """The verified bytes of a chunk, from those received or from any local file."""
        where = self._index.get(chunk_hash)
        if where is None or self._pack is None:
            return self._read_local(chunk_hash)
        data = os.pread(self._pack.fileno(), where[1], where[0])
        return data if blake3(data).digest() == chunk_hash else None

    def missing(self, hashes: Iterable[bytes]) -> list[bytes]:
        """Hashes (deduplicated, in first-seen order) that no local source can supply."""
        seen: set[bytes] = set()
        result = []
        for chunk_hash in hashes:
            if chunk_hash in seen:
                continue
            seen.add(chunk_hash)
            if chunk_hash not in self._index and self._read_local(chunk_hash) is None:
                result.append(chunk_hash)
        return result

    def put(self, chunk_hash: bytes, data: bytes) -> bool:
        """Keep a received chunk if its bytes match its hash; False if they do not."""
        if blake3(data).digest() != chunk_hash:
            return False
        if self._pack is None:
            self.incoming.mkdir(parents=True, exist_ok=True)
            self._pack = open(self._pack_path, "w+b")  # noqa: SIM115 - kept open
        offset = self._pack.seek(0, os.SEEK_END)
        self._pack.write(data)
        self._pack.flush()
        self._index[chunk_hash] = (offset, len(data))
        return True

    def clear_incoming(self) -> None:
        if self._pack is not None:
            self._pack.close()
            self._pack = None
        self._index.clear()
        self._pack_path.unlink(missing_ok=True)

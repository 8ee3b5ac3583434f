"""Where chunk bytes come from: files already in the share, or chunks received.

Local first: the catalog's chunk index says where a chunk's bytes were last seen (any
file of the share); they are re-hashed when read, so a stale index row costs a miss,
never a wrong byte. Chunks fetched from peers are verified by hash and kept in
``.backer/incoming/`` until the files that need them are written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from blake3 import blake3

from .catalog import Catalog
from .paths import METADATA_DIR

INCOMING_DIR = "incoming"


class ChunkStore:
    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self.incoming = root / METADATA_DIR / INCOMING_DIR

    def _incoming_path(self, chunk_hash: bytes) -> Path:
        return self.incoming / chunk_hash.hex()

    def _read_local(self, chunk_hash: bytes) -> bytes | None:
        location = self.catalog.chunk_location(chunk_hash)
        if location is None:
            return None
        path, offset, length = location
        try:
            with open(self.root / path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(length)
        except OSError:
            return None
        return data if blake3(data).digest() == chunk_hash else None

    def read(self, chunk_hash: bytes) -> bytes | None:
        """The verified bytes of a chunk, from incoming or from any local file."""
        try:
            data = self._incoming_path(chunk_hash).read_bytes()
        except FileNotFoundError:
            return self._read_local(chunk_hash)
        return data if blake3(data).digest() == chunk_hash else None

    def missing(self, hashes: Iterable[bytes]) -> list[bytes]:
        """Hashes (deduplicated, in first-seen order) that no local source can supply."""
        seen: set[bytes] = set()
        result = []
        for chunk_hash in hashes:
            if chunk_hash in seen:
                continue
            seen.add(chunk_hash)
            if (
                not self._incoming_path(chunk_hash).exists()
                and self._read_local(chunk_hash) is None
            ):
                result.append(chunk_hash)
        return result

    def put(self, chunk_hash: bytes, data: bytes) -> bool:
        """Keep a received chunk if its bytes match its hash; False if they do not."""
        if blake3(data).digest() != chunk_hash:
            return False
        self.incoming.mkdir(parents=True, exist_ok=True)
        temp = self.incoming / f"{chunk_hash.hex()}.part"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, self._incoming_path(chunk_hash))
        return True

    def clear_incoming(self) -> None:
        shutil.rmtree(self.incoming, ignore_errors=True)

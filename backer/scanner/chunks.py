"""Where chunk bytes come from: the files already in the share.

The catalog's chunk index says where a chunk's bytes were last seen (any file of the
share, old versions in ``.backer/versions/`` included); they are re-hashed when read, so
a stale index row costs a miss, never a wrong byte. Chunks from peers do not pass
through here: they are written straight into the temp files being assembled (see
:class:`~backer.model.materializer.Assembly`).
"""

from __future__ import annotations

import os
from pathlib import Path

from blake3 import blake3

from backer.db.catalog import Catalog


class ChunkStore:
    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog

    def read(self, chunk_hash: bytes) -> bytes | None:
        """The verified bytes of a chunk from any local file that still holds it."""
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

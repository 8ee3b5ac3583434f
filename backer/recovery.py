"""A device's own log length, kept outside the share, so that a share restored from an
older copy (a backup of ``.backer/``, a disk image) notices that it is behind itself.

Such a share must not append: its next event would reuse sequence numbers that this
device already signed and sent, a fork of its own log. So it waits until a peer gives
back the events it lost (any peer that synced with it has them); only if no device ever
received them may the person say so (``backer scan --forget-lost-history``): the files
those events described are still on disk and are simply scanned again.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKS_DIR = "heads"


def _mark(home: Path, share_id: bytes) -> Path:
    return home / MARKS_DIR / share_id.hex()


def own_length(home: Path, share_id: bytes) -> int:
    """The longest this device's log of the share has been (0 if never recorded)."""
    try:
        return int(_mark(home, share_id).read_text())
    except (FileNotFoundError, ValueError):
        return 0


def record_own_length(home: Path, share_id: bytes, length: int) -> None:
    """Durably note the log's length after an append (temp file, fsync, rename)."""
    path = _mark(home, share_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, str(length).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)

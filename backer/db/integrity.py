"""Whether opening a share database needs SQLite's integrity check.

``PRAGMA quick_check`` reads every page (~0.9 s on a 100,000-file share). A database
that its last writer closed cleanly and that nothing touched since needs no check, as
Syncthing does not check its own on every start. Closing cleanly leaves a marker
beside the database with the file's fingerprint; the next process that may change the
share removes it, durably, before its first write, so a crash from then on (a killed
process, a power loss) leaves no marker and the next open checks the whole database.
A database changed while no process ran (copied over, truncated, edited) no longer has
the fingerprint the marker holds, and is checked too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from backer.db.recovery import sync_directory, write_durably

MARKER = "closed-cleanly"
# SQLite's files of a write in progress: one beside the database means it was not
# closed (the last connection to close checkpoints and removes them)
UNFINISHED = ("-wal", "-journal")


def _fingerprint(database: Path) -> str | None:
    """The database file's identity and last change; None while it is not closed."""
    if any(os.path.lexists(f"{database}{suffix}") for suffix in UNFINISHED):
        return None
    info = os.stat(database)
    fields = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    return " ".join(map(str, fields))


def closed_cleanly(database: Path, consume: bool) -> bool:
    """Whether the database was closed cleanly and is unchanged since. ``consume``
    (a process that may write): the marker is removed, durably, before it returns."""
    marker = database.with_name(MARKER)
    try:
        said = marker.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    try:
        clean = said == _fingerprint(database)
    except OSError:
        clean = False
    if consume:
        try:
            marker.unlink()
            sync_directory(marker.parent)
        except OSError:  # (a marker left behind stops matching at the first write)
            return False
    return clean


def mark_closed(database: Path) -> None:
    """Note that the database was closed cleanly (call once its last connection is
    closed, while the share's lock is still held)."""
    with contextlib.suppress(OSError):  # (no marker: the next open checks, nothing lost)
        fingerprint = _fingerprint(database)
        if fingerprint is not None:
            write_durably(database.with_name(MARKER), fingerprint.encode())

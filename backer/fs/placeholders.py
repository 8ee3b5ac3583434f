"""Notes of the empty placeholders backer makes on a filesystem with neither no-replace
renames nor hard links (see :func:`backer.fs.dirs.rename_new_at`).

A placeholder lives for the microseconds of one rename, but a process killed in them
leaves it: an empty file at a path where a received file was to go, which the next scan
would record as the person's new file (a conflict with the received version on every
device). So a note naming the path is written and flushed in ``.backer/placeholders/``
before the placeholder is made, and removed once it is gone; at the next scan
:func:`remove_left` removes an empty regular file that a note names and that the scan
cache does not record and that was made when the note was (a placeholder, or the received
file if it was empty and the kill came before its record: the next window writes it
again), then the note. A file the person wrote into has bytes and stays; so does an
empty file made there later (R64: the person's own, saved while backer was down).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from backer.fs.paths import METADATA_DIR, BadPath, check

NOTES = "placeholders"  # the folder of notes under .backer/
MADE_WITHIN_NS = 120 * 10**9  # a placeholder's mtime after its note's: two fsyncs apart,
MADE_BEFORE_NS = 2 * 10**9  # on a slow stick; before it by FAT's 2-second time steps
Recorded = Callable[[str, os.stat_result], bool]  # whether the scan cache records a file
OpenParent = Callable[[str], int]  # a descriptor of a path's folder, reached without links


@contextlib.contextmanager
def noted(root: Path, relative: str) -> Iterator[None]:
    """A flushed note that ``relative`` may hold backer's placeholder, for the block."""
    folder = root / METADATA_DIR / NOTES
    folder.mkdir(exist_ok=True)
    note = folder / secrets.token_hex(8)
    fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, os.fsencode(relative))
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_folder(folder)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # (a note left names an empty file at most)
            note.unlink()


def remove_left(root: Path, recorded: Recorded, open_parent: OpenParent) -> list[str]:
    """Remove what a killed process left of its placeholders (see the module's
    docstring); the paths removed. ``recorded(path, lstat)``: whether the scan cache
    records that file as it is; ``open_parent(path)``: a descriptor of the folder
    holding ``path``, reached without following links."""
    folder = root / METADATA_DIR / NOTES
    try:
        notes = sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for note in notes:
        try:
            relative = check(os.fsdecode(note.read_bytes()))
            noted_ns = note.stat().st_mtime_ns
        except (OSError, BadPath):
            relative = None
        if relative is not None and _remove_if_placeholder(
            relative, noted_ns, recorded, open_parent
        ):
            removed.append(relative)
        with contextlib.suppress(FileNotFoundError):
            note.unlink()
    return removed


def _remove_if_placeholder(
    relative: str, noted_ns: int, recorded: Recorded, open_parent: OpenParent
) -> bool:
    """Whether the placeholder at ``relative`` was there and is removed now. A file that
    cannot be looked at or removed (its folder made read-only since, the file immutable)
    is left, to be recorded as the person's: an error here ended every scan (R67)."""
    try:
        fd = open_parent(relative)
    except OSError:
        return False
    try:
        name = relative.rpartition("/")[2]
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        made = noted_ns - MADE_BEFORE_NS <= info.st_mtime_ns <= noted_ns + MADE_WITHIN_NS
        if not stat.S_ISREG(info.st_mode) or info.st_size or not made:
            return False
        if recorded(relative, info):
            return False
        os.unlink(name, dir_fd=fd)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

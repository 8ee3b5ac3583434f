"""A device's own log length, kept outside the share, so that a share restored from an
older copy (a backup of ``.backer/``, a disk image) notices that it is behind itself.

Such a share must not append: its next event would reuse sequence numbers that this
device already signed and sent, a fork of its own log. So it waits until a peer gives
back the events it lost (any peer that synced with it has them); only if no device ever
received them may the person say so (``backer scan --forget-lost-history``): the files
those events described are still on disk and are simply scanned again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

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
    write_durably(_mark(home, share_id), str(length).encode())


def sync_directory(path: Path) -> None:
    """fsync a directory: what was made, renamed or removed in it survives a power cut
    (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(path: Path, mode: int = 0o777) -> None:
    """``mkdir -p`` that survives a power cut: each directory it makes is followed by an
    fsync of its parent, so nothing later recorded about it (a share's registration)
    can outlive the directory itself."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=mode, exist_ok=True)
        sync_directory(directory.parent)


def write_durably(path: Path, data: bytes) -> None:
    make_directories(path.parent, mode=0o700)
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


# -- a share whose .backer/ was lost ----------------------------------------------------

SHARE_SUFFIX = ".share"


class KnownShare(NamedTuple):
    """What the device home remembers of a share: enough to rejoin it in place, and
    its founder's key (empty if not known yet), which no other device can sign as."""

    share_id: bytes
    share_key: bytes
    root: Path
    founder: bytes = b""


def _read_share(path: Path) -> KnownShare:
    key_hex, root, founder_hex = [*path.read_text().split("\n"), ""][:3]  # (no founder
    # line: written before it was kept)
    return KnownShare(
        bytes.fromhex(path.stem), bytes.fromhex(key_hex), Path(root), bytes.fromhex(founder_hex)
    )


def remember_share(
    home: Path, share_id: bytes, share_key: bytes, root: Path, founder: bytes = b""
) -> None:
    """Note the share's folder, key and founder beside its log length (only when they
    changed). The founder first noted stays: a share's id is only a name its GENESIS
    event carries, and the founder is what a repair checks the history it is given by
    (another device holding the share key could found a share of that id).

    The share key is as secret as the device key next to it (same directory, mode 0600);
    with both, ``backer repair`` can rebuild a lost ``.backer/`` from any peer."""
    path = _mark(home, share_id).with_suffix(SHARE_SUFFIX)
    with contextlib.suppress(OSError, ValueError):
        founder = _read_share(path).founder or founder
    text = f"{share_key.hex()}\n{root}\n{founder.hex()}\n"
    try:
        if path.read_text() == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    write_durably(path, text.encode())


def share_at(home: Path, start: Path) -> KnownShare | None:
    """The share this device remembers at ``start`` or one of its parents, if any."""
    wanted = {start, *start.parents}
    for path in sorted((home / MARKS_DIR).glob("*" + SHARE_SUFFIX)):
        try:
            known = _read_share(path)
        except (OSError, ValueError):
            continue
        if known.root in wanted:
            return known
    return None


def knows_any_share(home: Path) -> bool:
    """Whether this device has been a member of any share (its home holds a log mark)."""
    return any((home / MARKS_DIR).glob("*")) if (home / MARKS_DIR).is_dir() else False

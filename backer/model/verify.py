"""Re-check the files on disk against the versions they were recorded as.

A scan trusts an unchanged (size, mtime_ns, inode, mode) and never re-reads the file,
so bytes that changed underneath an unchanged stat — bit rot, a disk or an earlier bug
that wrote the wrong bytes — go unnoticed. ``backer verify`` re-hashes every file (and
re-reads every link) whose stat still matches the scan cache and reports each one whose
content is no longer its recorded version's. Such a file is never served as that
version anyway: every chunk read from a local file is re-hashed before it is sent
(see :mod:`backer.scanner.chunks`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backer.model.records import Kind
from backer.model.share import Share
from backer.scanner.walk import Seen, read_stable, stat_key_of

if TYPE_CHECKING:
    from backer.progress import ProgressCallback


@dataclass
class Verification:
    checked: int = 0
    checked_bytes: int = 0
    mismatched: list[str] = field(default_factory=list)  # content differs, stat does not
    changed: list[str] = field(default_factory=list)  # changed since the last scan: not judged
    unreadable: list[str] = field(default_factory=list)


def _under(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def verify(
    share: Share, prefix: str = "", progress: ProgressCallback | None = None
) -> Verification:
    """Re-hash every file and link at or below ``prefix`` whose stat is as last scanned,
    and compare it with its recorded version."""
    result = Verification()
    entries = [e for e in share.catalog.local_entries().values() if _under(e.path, prefix)]
    total = sum(e.size for e in entries)
    files = sum(1 for e in entries if not stat.S_ISDIR(e.mode))
    for entry in sorted(entries):
        version = share.catalog.version(entry.version_id)
        if version is None or version.kind not in (Kind.FILE, Kind.SYMLINK):
            continue
        disk_path = os.path.join(share.root, entry.path)
        try:
            info = os.lstat(disk_path)
        except FileNotFoundError:
            result.changed.append(entry.path)
            continue
        except OSError:
            result.unreadable.append(entry.path)
            continue
        if stat_key_of(info) != entry.stat_key:
            result.changed.append(entry.path)
            continue
        seen = Seen(entry.path, disk_path, version.kind, *entry.stat_key)
        current, _, content, problem = read_stable(seen)
        if problem is not None or current.stat_key != entry.stat_key:  # (changing now)
            (result.unreadable if problem else result.changed).append(entry.path)
            continue
        result.checked += 1
        result.checked_bytes += entry.size if version.kind == Kind.FILE else 0
        if progress is not None:
            progress(result.checked, files, result.checked_bytes, total)
        if content != version.content:
            result.mismatched.append(entry.path)
    return result

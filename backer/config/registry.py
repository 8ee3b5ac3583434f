"""The shares of this device: what ``backer run`` serves and what ``--share NAME`` means.

One JSON file in the device home (``shares.json``), rewritten whole (temp file, fsync,
rename) under a lock, so two commands registering at once lose neither entry. Each
share has a name (its folder's basename, made unique with ``-2``, ``-3`` ...), its id
and its folder. ``init``, ``join`` and ``repair`` register; ``backer forget`` removes
an entry and touches neither the files nor ``.backer/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backer.config.identity import home as device_home
from backer.db.recovery import make_directories, sync_directory, write_durably
from backer.errors import BackerError

REGISTRY_FILE = "shares.json"
LOCK_FILE = "shares.lock"


@dataclass(frozen=True)
class RegisteredShare:
    share_id: bytes
    name: str
    root: Path


def _path(home: Path | None) -> Path:
    return (home or device_home()) / REGISTRY_FILE


def _read(path: Path) -> list[RegisteredShare]:
    try:
        entries = json.loads(path.read_bytes())["shares"]
        return [
            RegisteredShare(bytes.fromhex(e["id"]), str(e["name"]), Path(e["root"]))
            for e in entries
        ]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackerError(f"the list of this device's shares {path} is damaged: {exc}") from exc


@contextlib.contextmanager
def _changing(home: Path | None) -> Iterator[list[RegisteredShare]]:
    """The entries, to change in place, written back when the block ends; one writer
    at a time (a lock file beside the registry)."""
    path = _path(home)
    make_directories(path.parent, mode=0o700)
    with open(path.with_name(LOCK_FILE), "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read(path)
        yield entries
        body = [{"id": e.share_id.hex(), "name": e.name, "root": str(e.root)} for e in entries]
        write_durably(path, json.dumps({"shares": body}, indent=2).encode() + b"\n")
        sync_directory(path.parent)  # the rename too: a registration that stays


def registered(home: Path | None = None) -> list[RegisteredShare]:
    """Every share registered on this device, in the order they were registered."""
    return _read(_path(home))


def _unique_name(wanted: str, taken: set[str]) -> str:
    name, number = wanted or "share", 2
    while name in taken:
        name = f"{wanted or 'share'}-{number}"
        number += 1
    return name


def register(share_id: bytes, root: Path, home: Path | None = None) -> RegisteredShare:
    """Register the share ``share_id`` at ``root`` (kept if it already is). An entry for
    the same folder with another id (a share made again there) is replaced; the same
    id at another folder (the share was moved) moves, keeping its name."""
    root = Path(root).resolve()
    with _changing(home) as entries:
        same = [e for e in entries if e.share_id == share_id or e.root == root]
        kept = next((e for e in same if e.share_id == share_id), None)
        if kept is not None and kept.root == root and len(same) == 1:
            return kept
        for entry in same:
            entries.remove(entry)
        name = kept.name if kept else _unique_name(root.name, {e.name for e in entries})
        added = RegisteredShare(share_id, name, root)
        entries.append(added)
    return added


def _match(entries: list[RegisteredShare], name_or_dir: str) -> RegisteredShare | None:
    """A name first; else the share whose folder is the directory, or contains it when
    it exists (a mistyped name run inside a share must not pick that share)."""
    if not name_or_dir.strip():
        return None
    for entry in entries:
        if entry.name == name_or_dir:
            return entry
    where = Path(os.path.abspath(name_or_dir))
    with contextlib.suppress(OSError):
        where = where.resolve()
    inside = os.path.lexists(where)
    for entry in entries:
        if entry.root == where or (inside and entry.root in where.parents):
            return entry
    return None


def _unknown(name_or_dir: str) -> BackerError:
    return BackerError(f"no share named or at {name_or_dir!r} on this device (see 'backer shares')")


def find(name_or_dir: str, home: Path | None = None) -> RegisteredShare:
    """The registered share called ``name_or_dir``, or at that directory (or above it)."""
    found = _match(registered(home), name_or_dir)
    if found is None:
        raise _unknown(name_or_dir)
    return found


def forget(name_or_dir: str, home: Path | None = None) -> RegisteredShare:
    """Unregister a share (its files and ``.backer/`` stay as they are)."""
    with _changing(home) as entries:
        found = _match(entries, name_or_dir)
        if found is None:
            raise _unknown(name_or_dir)
        entries.remove(found)
    return found

"""Share-relative paths: the one spelling every device agrees on.

A path in the state is relative, '/'-separated, NFC-normalised Unicode, with no empty,
'.' or '..' component, no NUL, and never inside the metadata directory. Everything
that names a path — the scanner now, received events later — goes through
:func:`check`, so nothing can point outside the share.
"""

from __future__ import annotations

import unicodedata

METADATA_DIR = ".backer"


class BadPath(ValueError):
    """A path that must never be stored or written."""


def normalize(path: str) -> str:
    return unicodedata.normalize("NFC", path)


def check(path: str) -> str:
    """Return ``path`` if it is a valid share-relative path, else raise :class:`BadPath`."""
    if not path:
        raise BadPath("empty path")
    if "\0" in path:
        raise BadPath(f"path contains NUL: {path!r}")
    if path.startswith("/") or path.startswith("\\") or (len(path) > 1 and path[1] == ":"):
        raise BadPath(f"absolute path: {path!r}")
    if normalize(path) != path:
        raise BadPath(f"path is not NFC-normalised: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadPath(f"path has an empty, '.' or '..' component: {path!r}")
    if parts[0] == METADATA_DIR:
        raise BadPath(f"path is inside {METADATA_DIR}/: {path!r}")
    if any("\\" in part for part in parts):
        raise BadPath(f"path contains a backslash: {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadPath(f"path is not valid Unicode: {path!r}") from exc
    return path


def is_valid(path: str) -> bool:
    try:
        check(path)
    except BadPath:
        return False
    return True


def check_name(name: str) -> str:
    """Validate and NFC-normalise one directory entry's name (the scanner's fast path)."""
    if not name.isascii():
        name = normalize(name)
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadPath(f"name is not valid Unicode: {name!r}") from exc
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BadPath(f"name is not portable: {name!r}")
    return name

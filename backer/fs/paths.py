"""Share-relative paths: the one spelling every device agrees on.

A path in the state is relative, '/'-separated Unicode spelled exactly as on the disk
of the device that recorded it (NFC or NFD alike: a receiver writes the same bytes),
with no empty, '.' or '..' component, no NUL or backslash, and no component that is the
metadata directory's name once case and Unicode normalisation are folded away (on a
case- or normalisation-insensitive filesystem ``.Backer`` is ``.backer``), no component
over :data:`MAX_NAME_BYTES` and no path over :data:`MAX_PATH_BYTES` in UTF-8 (no device
could hold it: a peer's event naming one would only fail, and be retried, everywhere;
the byte bound also bounds the depth, at most 2,048 levels). Everything
that names a path — the scanner, received events — goes through :func:`check`, so
nothing can point outside the share or into its metadata.
"""

from __future__ import annotations

import os
import unicodedata

METADATA_DIR = ".backer"
MAX_NAME_BYTES = 255  # NAME_MAX of Linux, macOS and Windows filesystems alike
MAX_PATH_BYTES = 4096  # Linux PATH_MAX: no longer path is reachable by its name


class BadPath(ValueError):
    """A path that must never be stored or written."""


def fitted_name(name: str, suffix: str) -> str:
    """``name + suffix``, the name cut (on a character boundary) to fit
    :data:`MAX_NAME_BYTES`."""
    room = MAX_NAME_BYTES - len(os.fsencode(suffix))
    return os.fsencode(name)[:room].decode("utf-8", "ignore") + suffix


def stem_and_extension(name: str, mark: str) -> tuple[str, str]:
    """``name`` split at its last dot (not a leading one), for a name made of the stem,
    then ``mark``, then the extension: an extension that with ``mark`` takes more than
    half of :data:`MAX_NAME_BYTES` is part of the stem, so that cutting the stem alone
    always makes such a name fit."""
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    if len(os.fsencode(mark + ext)) > MAX_NAME_BYTES // 2:
        return name, ""
    return stem, ext


def fold(name: str) -> str:
    """The form under which two names are one on a case- and normalisation-insensitive
    filesystem (macOS, Windows): Unicode's canonical caseless match, NFD(casefold(NFD))."""
    if name.isascii():
        return name.lower()
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def is_reserved(name: str) -> bool:
    """Whether one path component names (or, folded, could name) a metadata directory."""
    return fold(name) == METADATA_DIR


FOLDERS_REMEMBERED = 4096  # folders known valid (a path has at most 2,048 of them)
_valid_folders: set[str] = set()  # (a cache of a pure function: cleared when full)


def check(path: str) -> str:
    """Return ``path`` if it is a valid share-relative path, else raise :class:`BadPath`.
    The folders of a valid path are remembered, so a path whose folder was checked
    costs a look at its own name only: a deep tree's paths share their ancestors, and
    checking each component of each path made a tree of 1,000 levels cost a million
    component checks, several times per sync."""
    if not _valid(path):
        _explain(path)
    return path


def _valid(path: str) -> bool:
    """Whether ``path`` is valid, each component looked at once: those below its
    nearest folder known valid (and those folders are then known valid too)."""
    names, folders = [], []
    folder, separator = path, "/"
    while separator and folder not in _valid_folders:
        folder, separator, name = folder.rpartition("/")
        names.append(name)
        if separator:
            folders.append(folder)
    top = "" if separator else names[-1]  # (the first component: no drive letter)
    if (len(top) > 1 and top[1] == ":") or not all(map(_valid_name, names)):
        return False
    try:
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            return False
    except UnicodeEncodeError:
        return False
    if len(_valid_folders) + len(folders) > FOLDERS_REMEMBERED:
        _valid_folders.clear()
    _valid_folders.update(folders)
    return True


def _valid_name(name: str) -> bool:
    if name in ("", ".", "..") or "\0" in name or "\\" in name or is_reserved(name):
        return False
    try:
        return len(name.encode("utf-8")) <= MAX_NAME_BYTES
    except UnicodeEncodeError:
        return False


def _explain(path: str) -> None:
    """The check of ``path`` component by component: :class:`BadPath` saying what is
    wrong with it, if anything is."""
    if not path:
        raise BadPath("empty path")
    if "\0" in path:
        raise BadPath(f"path contains NUL: {path!r}")
    if path.startswith("/") or path.startswith("\\") or (len(path) > 1 and path[1] == ":"):
        raise BadPath(f"absolute path: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadPath(f"path has an empty, '.' or '..' component: {path!r}")
    if any(is_reserved(part) for part in parts):
        raise BadPath(f"path names a {METADATA_DIR}/ directory: {path!r}")
    if any("\\" in part for part in parts):
        raise BadPath(f"path contains a backslash: {path!r}")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadPath(f"path is not valid Unicode: {path!r}") from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise BadPath(f"path longer than {MAX_PATH_BYTES} bytes: {path[:60]!r}...")
    if len(encoded) > MAX_NAME_BYTES and any(
        len(part.encode("utf-8")) > MAX_NAME_BYTES for part in parts
    ):
        raise BadPath(f"path has a name longer than {MAX_NAME_BYTES} bytes: {path[:60]!r}...")


def is_valid(path: str) -> bool:
    try:
        check(path)
    except BadPath:
        return False
    return True


def check_name(name: str) -> str:
    """Validate one directory entry's name, kept as spelled (the scanner's fast path)."""
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadPath(f"name is not valid Unicode: {name!r}") from exc
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BadPath(f"name is not portable: {name!r}")
    return name

"""Names a filesystem that ignores case holds under another spelling.

On exFAT, FAT, and the default APFS and NTFS, ``Dir`` opens the folder ``DIR``: a
received ``Dir/x`` written there would be recorded at ``Dir/x`` while the disk lists
``DIR/x``, and the next scan would take ``Dir`` and ``Dir/x`` for deleted (and ``DIR/x``
for new) on every device. Such a path is found here before anything is written to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from backer.fs.paths import METADATA_DIR


def ignores_case(root: Path) -> bool:
    """Whether the filesystem of ``root`` (a share: its metadata directory is there)
    finds a name under another case."""
    return os.path.lexists(os.path.join(root, METADATA_DIR.upper()))


class Spellings:
    """The names each directory of a share holds, listed once a window, and once again
    when a name it did not hold is there now (made since by the person); the window's
    own folders are added as it makes them (:meth:`made`). Only where the filesystem
    ignores case. Listing again at each such name made a window of n case twins in a
    folder of n names cost n listings of it: 4,000 took 31 s on exFAT (R60)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folds = ignores_case(root)
        self._names: dict[str, set[str] | None] = {}
        self._relisted: set[str] = set()

    def forget(self) -> None:
        """Drop the listings (at the start of a window: the person changes the disk)."""
        self._names.clear()
        self._relisted.clear()

    def made(self, path: str) -> None:
        """The window made the folder ``path``, spelled so: its folder's listing holds it."""
        parent, _, name = path.rpartition("/")
        names = self._names.get(parent)
        if names is not None:
            names.add(name)

    def other(self, path: str) -> str | None:
        """The first part of ``path`` (a component and its parents) that is on the disk
        under another spelling, if any; None where the filesystem keeps case apart."""
        if not self.folds:
            return None
        parts = path.split("/")
        for depth, name in enumerate(parts):
            parent = "/".join(parts[:depth])
            names = self._listing(parent)
            if names is not None and name in names:
                continue
            if names is None or not os.path.lexists(os.path.join(self.root, parent, name)):
                return None  # the rest is made with its own spelling
            if parent not in self._relisted:  # (made since it was listed?)
                self._relisted.add(parent)
                names = self._listing(parent, again=True)
            if names is not None and name not in names:
                return "/".join(parts[: depth + 1])
        return None

    def _listing(self, parent: str, again: bool = False) -> set[str] | None:
        if again or parent not in self._names:
            try:
                self._names[parent] = set(os.listdir(os.path.join(self.root, parent)))
            except OSError:
                self._names[parent] = None
        return self._names[parent]

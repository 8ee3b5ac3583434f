"""Which paths backer leaves alone: ``.backerignore`` (gitignore syntax) plus temp files.

The metadata directory ``.backer/`` is never walked at all. The ignore file itself is
synced, so every device applies the same rules and converges to the same tree. A
matching directory is not descended into, as in git.

A rule only ever stops syncing (as in Syncthing): an ignored path is neither recorded
nor written nor deleted on this device; a path that becomes ignored is forgotten
locally (no deletion is recorded for it), and one that stops being ignored is scanned
again like a new file.
"""

from __future__ import annotations

from pathlib import Path

import pathspec

IGNORE_FILE = ".backerignore"
TEMP_SUFFIX = ".backer-tmp"


class IgnoreRules:
    """The share's own rules; backer's temp files are always ignored (checked first,
    cheaply, since most shares have no ``.backerignore`` at all)."""

    def __init__(self, lines: list[str]) -> None:
        rules = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        self.spec = pathspec.GitIgnoreSpec.from_lines(rules) if rules else None
        self._directories: dict[str, bool] = {}  # excluded() asks about parents repeatedly

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        try:
            text = (root / IGNORE_FILE).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            text = ""
        return cls(text.splitlines())

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether the rules match ``path`` itself (the walk never enters an ignored
        directory, so it need not ask about parents)."""
        if path.endswith(TEMP_SUFFIX):
            return True
        if self.spec is None:
            return False
        return self.spec.match_file(path + "/" if is_dir else path)

    def excluded(self, path: str, is_dir: bool = False) -> bool:
        """Whether ``path`` is out of the walk: ignored itself or below an ignored
        directory. For paths that come from the state rather than from the disk."""
        if self.spec is None:
            return path.endswith(TEMP_SUFFIX)
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            found = self._directories.get(parent)
            if found is None:
                found = self._directories[parent] = self.ignored(parent, True)
            if found:
                return True
        return self.ignored(path, is_dir)

def is_temp_name(name: str) -> bool:
    """Whether a file name is one of backer's own temp files."""
    return name.endswith(TEMP_SUFFIX)

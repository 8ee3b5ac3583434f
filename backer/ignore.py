"""Which paths backer leaves alone: ``.backerignore`` (gitignore syntax) plus temp files.

The metadata directory ``.backer/`` at the root is never walked at all. The ignore
file itself is synced, so every device applies the same rules and
converges to the same tree. A matching directory is not descended into, as in git.
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

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        try:
            text = (root / IGNORE_FILE).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        return cls(text.splitlines())

    def ignored(self, path: str, is_dir: bool) -> bool:
        if path.endswith(TEMP_SUFFIX):
            return True
        if self.spec is None:
            return False
        return self.spec.match_file(path + "/" if is_dir else path)

"""Which paths backer leaves alone: ``.backerignore`` (gitignore syntax) plus defaults.

The ignore file itself is synced, so every device applies the same rules and
converges to the same tree. A matching directory is not descended into, as in git.
"""

from __future__ import annotations

from pathlib import Path

import pathspec

IGNORE_FILE = ".backerignore"
TEMP_SUFFIX = ".backer-tmp"
DEFAULT_RULES = (
    "/.backer/",
    f"*{TEMP_SUFFIX}",
)


class IgnoreRules:
    def __init__(self, lines: list[str]) -> None:
        self.spec = pathspec.GitIgnoreSpec.from_lines([*DEFAULT_RULES, *lines])

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        try:
            text = (root / IGNORE_FILE).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        return cls(text.splitlines())

    def ignored(self, path: str, is_dir: bool) -> bool:
        return self.spec.match_file(path + "/" if is_dir else path)

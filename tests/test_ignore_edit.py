"""The web UI's edit of ``.backerignore`` (``replace_rules``): it checked that the file
still held the text the person had loaded, then wrote and fsynced a temp file and
renamed it over the file without looking again, so an edit saved meanwhile (in an
editor, or by a peer's change applied) was overwritten and lost."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from backer.model.records import new_version_id
from backer.scanner.ignore import IGNORE_FILE, replace_rules

LOADED = "*.log\n"
THEIRS = "*.log\nbuild/\n"


def _saved_during_fsync(monkeypatch: pytest.MonkeyPatch, save: Callable[[], None]) -> None:
    """The person's save lands while the temp file is being made durable."""
    fsync = os.fsync
    saved: list[bool] = []

    def fsync_then_save(fd: int) -> None:
        fsync(fd)
        if not saved:
            saved.append(True)
            save()

    monkeypatch.setattr(os, "fsync", fsync_then_save)


def _left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_rules_replace_the_file_that_still_holds_what_was_loaded(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).write_text(LOADED)
    assert replace_rules(tmp_path, "new/\n", LOADED, new_version_id())
    assert (tmp_path / IGNORE_FILE).read_text() == "new/\n"
    assert _left(tmp_path) == [IGNORE_FILE]


def test_an_editors_save_meanwhile_is_kept_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ignore = tmp_path / IGNORE_FILE
    ignore.write_text(LOADED)

    def editor_save() -> None:  # a new file renamed over the old, as editors save
        (tmp_path / "saving").write_text(THEIRS)
        os.replace(tmp_path / "saving", ignore)

    _saved_during_fsync(monkeypatch, editor_save)
    assert not replace_rules(tmp_path, "new/\n", LOADED, new_version_id())
    assert ignore.read_text() == THEIRS
    assert _left(tmp_path) == [IGNORE_FILE]


def test_an_edit_in_place_meanwhile_is_kept_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ignore = tmp_path / IGNORE_FILE
    ignore.write_text(LOADED)
    _saved_during_fsync(monkeypatch, lambda: ignore.write_text(THEIRS))
    assert not replace_rules(tmp_path, "new/\n", LOADED, new_version_id())
    assert ignore.read_text() == THEIRS
    assert _left(tmp_path) == [IGNORE_FILE]


def test_a_file_made_meanwhile_where_there_was_none_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ignore = tmp_path / IGNORE_FILE
    _saved_during_fsync(monkeypatch, lambda: ignore.write_text(THEIRS))
    assert not replace_rules(tmp_path, "new/\n", "", new_version_id())
    assert ignore.read_text() == THEIRS
    assert _left(tmp_path) == [IGNORE_FILE]
    ignore.unlink()
    assert replace_rules(tmp_path, "new/\n", "", new_version_id())
    assert ignore.read_text() == "new/\n"

"""Names an exFAT stick holds under another spelling (backer.fs.spelling), on a real
exFAT mount (FUSE, from an image file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backer.fs.spelling import Spellings
from tests.helpers import exfat_disk

TWINS = 300


def test_R60_a_window_of_case_twins_lists_their_folder_once_more_not_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each received path whose name the folder holds under another spelling listed
    that folder again (a name made since the window listed it?): a member's window of
    n case twins of the n files of one folder cost n listings of n names, 4,000 of them
    31 s on exFAT, at every sync (they stay live, unwritten). The folder is now listed
    again once a window, and the folders the window makes are added as it makes them."""
    with exfat_disk(tmp_path / "stick", 16) as stick:
        (stick / ".backer").mkdir()
        (stick / "d").mkdir()
        for i in range(TWINS):
            (stick / "d" / f"file{i}").write_bytes(b"")
        spellings = Spellings(stick)
        listed: list[str] = []
        listdir = os.listdir

        def counted(path: str) -> list[str]:
            listed.append(path)
            return listdir(path)

        monkeypatch.setattr(os, "listdir", counted)
        twins = [spellings.other(f"d/FILE{i}") for i in range(TWINS)]
        listings = len(listed)
        assert twins == [f"d/FILE{i}" for i in range(TWINS)]
        assert listings <= 3, f"{listings} listings"
        (stick / "d" / "made").mkdir()  # (as the window makes a folder)
        spellings.made("d/made")
        assert spellings.other("d/made/x") is None
        (stick / "d" / "Other").mkdir()  # (as the person makes one meanwhile)
        assert spellings.other("d/OTHER/x") == "d/OTHER"

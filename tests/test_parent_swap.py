"""A folder of the share swapped for a link to somewhere outside while a window is
applied (a person moving a folder away and linking it back, any program with write
access to the share) never receives a write through that link: every change is made
relative to the parent's descriptor, opened with no link followed (backer.fs.dirs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backer.fs.dirs import Directories, Identity, InShare
from backer.model import materializer
from backer.model.share import Share
from backer.protocol.session import Session
from tests.helpers import make_devices, pump, sync, tree

NAMES = [f"h{i}.txt" for i in range(12)]


def _swap(folder: Path, outside: Path) -> Path:
    """``folder`` renamed beside itself and a link to ``outside`` put in its place."""
    real = folder.with_name(folder.name + ".real")
    folder.rename(real)
    os.symlink(outside, folder)
    return real


def _unswap(folder: Path, real: Path) -> None:
    folder.unlink()
    real.rename(folder)


def _pair_with_folder(tmp_path: Path) -> tuple[Share, Share, Path]:
    a, b = make_devices(tmp_path, 2)
    (a.root / "d3").mkdir()
    (a.root / "d3" / "base.txt").write_text("base")
    sync(a, b)
    for name in NAMES:
        (a.root / "d3" / name).write_text(name)
    outside = tmp_path / "outside"
    outside.mkdir()
    return a, b, outside


def _swapping_once(
    monkeypatch: pytest.MonkeyPatch, cls: type, method: str, swap: Callable[[], None], after: bool
) -> list[bool]:
    """Patch ``cls.method`` to swap the folder once: right before its first call that
    has files staged, or right after its first call returned."""
    original = getattr(cls, method)
    done: list[bool] = []

    def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not done and not after and getattr(self, "staged", None):
            done.append(True)
            swap()
        result = original(self, *args, **kwargs)
        if not done and after:
            done.append(True)
            swap()
        return result

    monkeypatch.setattr(cls, method, patched)
    return done


@pytest.mark.parametrize("when", ["while staging", "before the renames"])
def test_R26_a_parent_swapped_for_a_link_mid_window_gets_nothing_written_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The folder is swapped after the first file of the window was staged (the others'
    temps used to be created through the link, then renamed there: files written
    outside, and deleted everywhere once the next scan missed them), or after every
    temp was staged, before they are moved into place. The temps are made in the folder
    itself; before the renames it is found moved, so they are removed, and the files
    are written once the folder is back."""
    a, b, outside = _pair_with_folder(tmp_path)
    real: list[Path] = []

    def swap() -> None:
        real.append(_swap(b.root / "d3", outside))

    if when == "while staging":
        done = _swapping_once(monkeypatch, materializer.Materializer, "_stage", swap, after=True)
    else:
        done = _swapping_once(monkeypatch, materializer.Assembly, "finish", swap, after=False)
    sync(a, b)
    monkeypatch.undo()
    assert done and real
    assert sorted(os.listdir(outside)) == []  # no file, no temp
    # the folder is no longer where the plan saw it: nothing moved in, no temp left
    assert sorted(os.listdir(real[0])) == ["base.txt"]
    _unswap(b.root / "d3", real[0])
    sync(a, b)
    assert tree(a.root) == tree(b.root)
    assert sorted(os.listdir(a.root / "d3")) == sorted(["base.txt", *NAMES])  # none deleted


def test_R26_a_parent_that_is_a_link_when_the_window_starts_is_refused(tmp_path: Path) -> None:
    """Nothing is written through a link found in place of a parent (it is a local
    change the scanner records first); the files are written once the folder is back."""
    a, b, outside = _pair_with_folder(tmp_path)
    real = _swap(b.root / "d3", outside)
    b.scan = lambda *args, **kwargs: None  # type: ignore[method-assign]  # (it would record the link)
    _, right = sync(a, b)
    assert sorted(os.listdir(outside)) == []
    written = {path for report in right.replicator.reports for path in report.written}
    assert not written & {f"d3/{name}" for name in NAMES}
    del b.scan
    _unswap(b.root / "d3", real)
    sync(a, b)
    assert tree(a.root) == tree(b.root)


def test_a_temp_given_up_is_removed_where_its_path_reaches_after_its_folder_was_made_again(
    tmp_path: Path,
) -> None:
    """The window holds its folders open; a folder removed and made again meanwhile
    (here: moved aside and a new one made) is another directory. A temp given up at
    the end must go from the folder its path reaches now too, or it stays behind (a
    stopped node left one: CI campaign seeds 17, 18, 21)."""
    (tmp_path / "d3").mkdir()
    folders = Directories(tmp_path)
    try:
        folders.open("d3")  # (the window's descriptor)
        (tmp_path / "d3").rename(tmp_path / "d3.old")
        (tmp_path / "d3").mkdir()
        temp = InShare.of(folders, "d3/.backer-0123.tmp")
        (tmp_path / "d3" / ".backer-0123.tmp").write_bytes(b"half")
        (tmp_path / "d3.old" / ".backer-0123.tmp").write_bytes(b"half")
        temp.remove()
    finally:
        folders.close()
    assert os.listdir(tmp_path / "d3") == []
    assert os.listdir(tmp_path / "d3.old") == []


def test_R34_a_deep_tree_costs_one_open_per_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every folder was opened from the share's root, and checked from it again before
    its files were renamed in: O(depth) opens per folder, O(depth²) per window, on the
    node's event loop (1,000 levels: 7 s of CPU; a peer's session timed out). Opened
    from the nearest folder held, and checked from the nearest one checked, a deep
    tree costs a few opens per folder, and a swap below a checked folder is still seen."""
    root = tmp_path / "share"
    depth = 300
    chain = ["/".join(f"d{i % 10}" for i in range(1, n + 1)) for n in range(1, depth + 1)]
    (root / chain[-1]).mkdir(parents=True)
    opens = 0
    real_open = os.open

    def counting(*args: Any, **kwargs: Any) -> int:
        nonlocal opens
        opens += 1
        return real_open(*args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    dirs = Directories(root)
    settled: dict[str, Identity] = {}
    for folder in chain:
        dirs.open(folder)
        assert not dirs.moved(folder, settled)
    assert opens <= 4 * depth
    deep = root / chain[200]
    checked = os.stat(root / chain[100])
    real = _swap(deep, tmp_path)  # below the checked chain[100]: still seen from there
    assert dirs.moved(chain[250], {chain[100]: (checked.st_dev, checked.st_ino)})
    _unswap(deep, real)
    dirs.close()


def test_R44_a_folder_renamed_while_its_files_deletions_go_on_keeps_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer deleted folder x; while this device applied it, its person renamed x to y.
    The deletions trusted a folder found in place for their whole batch (a deep tree's
    deletion goes up it from the folder below), so they went on through the descriptor
    of x, now y, and deleted the person's files there (their bytes only in the store,
    under x's history). The file deleted as the rename happened is gone (nothing can
    tell); the ones after it stay in y, local edits that the next scan records."""
    a, b = make_devices(tmp_path, 2)
    (a.root / "x").mkdir()
    for n in range(3):
        (a.root / "x" / f"f{n}").write_text(f"file {n}")
    sync(a, b)
    for n in range(3):
        (a.root / "x" / f"f{n}").unlink()
    (a.root / "x").rmdir()
    a.scan()
    b.scan()
    keep = materializer.Materializer._preserve
    kept: list[str] = []

    def person_renames_meanwhile(self: materializer.Materializer, *args: Any) -> Any:
        found = keep(self, *args)
        if not kept:  # (x/f2's bytes are kept: it is deleted next, then x/f1, x/f0)
            (b.root / "x").rename(b.root / "y")
        kept.append(args[1])
        return found

    monkeypatch.setattr(materializer.Materializer, "_preserve", person_renames_meanwhile)
    right = Session(b, "b")
    pump(Session(a, "a"), right)
    assert sorted(p.name for p in (b.root / "y").iterdir()) == ["f0", "f1"]
    assert right.replicator.reports[-1].kept_local_edits == ["x/f1", "x/f0", "x"]
    monkeypatch.undo()
    b.scan()
    assert {"y/f0", "y/f1"} <= set(b.catalog.live_for(["y/f0", "y/f1"]))

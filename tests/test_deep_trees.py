"""A deep tree (any member can make one: a path may be 2,048 levels) costs backer work
linear in the tree: each folder opened a few times, each path component checked once,
whether a window goes down the tree (writes) or up it (deletions, deepest first)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backer.fs import paths
from backer.fs.dirs import Directories, identity
from backer.model.records import Kind, Version
from backer.model.share import Share
from backer.protocol.session import Session
from tests.helpers import make_devices, pump, sync

DEPTH = 600


def _chain(root: Path, depth: int) -> str:
    """Make ``d/d/…/d`` (``depth`` levels) under ``root`` with a file ``z`` at its
    bottom, a folder at a time from its parent (pathlib's ``parents=True`` recurses)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("z", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as file:
            file.write(b"bottom")
    finally:
        os.close(fd)
    return "/".join(["d"] * depth)


def _remove_chain(top: Path) -> None:
    """Remove the chain made by :func:`_chain` from ``top`` down, deepest first."""
    folders = [str(top)]
    while os.path.isdir(os.path.join(folders[-1], "d")):
        folders.append(os.path.join(folders[-1], "d"))
    os.unlink(os.path.join(folders[-1], "z"))
    for folder in reversed(folders):
        os.rmdir(folder)


def _levels(top: Path) -> int:
    """How many folders the chain below ``top`` (itself included) has."""
    count, folder = 0, str(top)
    while os.path.isdir(folder):
        count += 1
        folder = os.path.join(folder, "d")
    return count


def _counting_folder_opens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every ``open(O_DIRECTORY)`` from now on (either device: one process)."""
    opens = [0]
    real = os.open

    def counting(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECTORY:
            opens[0] += 1
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    return opens


def _session(a: Share, b: Share) -> None:
    left, right = Session(a, "a"), Session(b, "b")
    pump(left, right)
    assert left.complete and right.complete, (left.stats, right.stats)


@pytest.mark.parametrize("change", ["removed", "renamed"])
def test_a_receiver_takes_a_deep_trees_deletion_in_a_few_opens_per_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The person removes (or renames) the folder 100 levels down a 600-level chain; the
    receiver deletes the 500 levels below it, deepest first. Each deletion opened its
    folder's parent from the share's root and checked it from there again: a folder
    opened deeper is no ancestor to start from, so O(depth²) opens (a 1,100-level chain:
    1.8 million in one sync, minutes of the node's loop). Now each folder is reached from
    the one below it (``..``, checked to be the folder found there) and checked once."""
    a, b = make_devices(tmp_path, 2)
    bottom = _chain(a.root, DEPTH)
    sync(a, b)
    assert (b.root / bottom / "z").read_bytes() == b"bottom"
    moved = a.root / "/".join(["d"] * 100)
    if change == "removed":
        _remove_chain(moved)
    else:
        moved.rename(moved.with_name("e"))
    a.scan()
    b.scan()
    opens = _counting_folder_opens(monkeypatch)
    _session(a, b)
    monkeypatch.undo()
    assert _levels(b.root / "d") == 99
    if change == "renamed":
        assert _levels(b.root / "/".join(["d"] * 99 + ["e"])) == DEPTH - 99
        assert (b.root / "/".join(["d"] * 99 + ["e"] + ["d"] * 500) / "z").read_bytes() == b"bottom"
    folders = DEPTH + _levels(b.root / "d") + (DEPTH - 99 if change == "renamed" else 0)
    assert opens[0] <= 8 * folders  # before and after, as the simulations bound it (before
    # the fix: 353,000 opens)


def test_a_folder_reached_from_below_is_the_one_found_at_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Going up from a folder held (``..``) reaches whatever holds it now: after the
    person moved it elsewhere, that is another folder. It is taken only if it is the
    folder a walk found at that path; else the walk down from above decides. Unmoved,
    the folder above costs one open."""
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    wanted = identity_of(tmp_path / "a" / "b")
    dirs = Directories(tmp_path)
    try:
        dirs.open("a/b/c")  # (a walk from the root: it found a and a/b on its way)
        opens = _counting_folder_opens(monkeypatch)
        with dirs.at("a/b") as fd:
            assert identity(fd) == wanted
        assert opens[0] == 1
    finally:
        dirs.close()
    monkeypatch.undo()
    dirs = Directories(tmp_path)
    try:
        dirs.open("a/b/c")
        (tmp_path / "a" / "b" / "c").rename(tmp_path / "x" / "c")  # its '..' is x now
        with dirs.at("a/b") as fd:
            assert identity(fd) == wanted
    finally:
        dirs.close()


def identity_of(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def test_a_deep_trees_paths_are_checked_a_component_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path was checked component by component, several times per sync: a
    1,000-level tree's paths cost half a million component checks each time. A path
    whose folder was found valid costs a check of its own name."""
    checked = [0]
    real = paths.is_reserved

    def counting(name: str) -> bool:
        checked[0] += 1
        return real(name)

    monkeypatch.setattr(paths, "is_reserved", counting)
    chain = ["/".join(["deep-check"] * n) for n in range(1, 301)]
    for path in [*reversed(chain), *chain]:  # deepest first (deletions), then down
        paths.check(path)
    assert checked[0] <= 3 * len(chain)  # (before: 90,300)


TOKENS = ["a", "é", "e\u0301", ".", "..", "/", "\\", ":", "\0", ".backer", ".BACKER", "\ud800"]


@given(
    st.lists(st.sampled_from(TOKENS) | st.sampled_from(["n" * 200, "/" + "m" * 255]), max_size=30)
)
def test_check_accepts_exactly_what_a_component_by_component_check_accepts(
    parts: list[str],
) -> None:
    """The remembered folders change no answer: a path is valid (or refused, with the
    reason) as the check of each of its components says."""
    path = "".join(parts)
    try:
        paths._explain(path)
    except paths.BadPath:
        assert not paths.is_valid(path)
    else:
        assert paths.check(path) == path


def test_a_deleted_deep_tree_under_a_new_file_is_read_once_by_conflict_resolution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One device deletes a 200-level chain while another writes a file at its bottom:
    every level is a live deletion with live entries below it, which the resolution
    of shadowed entries reads with its subtree. Each level's subtree was read again
    (O(depth²) records decoded at every plan); one read of the top one holds them all."""
    a, b = make_devices(tmp_path, 2)
    bottom = _chain(a.root, 200)
    sync(a, b)
    _remove_chain(b.root / "d")
    (a.root / bottom / "new").write_bytes(b"new")
    sync(a, b)
    decoded = [0]
    real = Version.decode.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Version], data: bytes) -> Version:
        decoded[0] += 1
        return real(cls, data)

    monkeypatch.setattr(Version, "decode", classmethod(counting))
    shadowing = b.catalog.live_above_others()
    monkeypatch.undo()
    assert sum(1 for _, _, v in shadowing if v.kind == Kind.DELETED) >= 199
    assert decoded[0] <= 4 * len(shadowing)  # (before: 20,498)

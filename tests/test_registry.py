"""The device's registered shares: the registry file, `shares`, `forget`, `--share`."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from backer.config import registry
from backer.errors import BackerError
from tests.e2e import Device, invite


def test_names_are_folder_basenames_made_unique(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = registry.register(b"\x01" * 16, tmp_path / "a" / "photos", home)
    second = registry.register(b"\x02" * 16, tmp_path / "b" / "photos", home)
    third = registry.register(b"\x03" * 16, tmp_path / "c" / "photos", home)
    assert [first.name, second.name, third.name] == ["photos", "photos-2", "photos-3"]
    assert registry.registered(home) == [first, second, third]
    stored = json.loads((home / registry.REGISTRY_FILE).read_text())
    assert [e["id"] for e in stored["shares"]] == ["01" * 16, "02" * 16, "03" * 16]


def test_registering_again_keeps_the_entry_and_a_moved_share_keeps_its_name(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    entry = registry.register(b"\x01" * 16, tmp_path / "docs", home)
    assert registry.register(b"\x01" * 16, tmp_path / "docs", home) == entry
    moved = registry.register(b"\x01" * 16, tmp_path / "elsewhere", home)
    assert (moved.name, moved.root) == ("docs", tmp_path / "elsewhere")
    remade = registry.register(b"\x09" * 16, tmp_path / "elsewhere", home)  # init after rm
    assert registry.registered(home) == [remade]


def test_find_and_forget_by_name_or_by_a_directory_inside(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "music" / "albums").mkdir(parents=True)
    music = registry.register(b"\x01" * 16, tmp_path / "music", home)
    assert registry.find("music", home) == music
    assert registry.find(str(tmp_path / "music" / "albums"), home) == music
    with pytest.raises(BackerError, match="no share named or at 'films'"):
        registry.find("films", home)
    assert registry.forget(str(tmp_path / "music"), home) == music
    assert registry.registered(home) == []
    with pytest.raises(BackerError, match="backer shares"):
        registry.forget("music", home)


def test_a_mistyped_name_inside_a_share_forgets_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'backer forget nosuch' run inside a share took 'nosuch' as a path in it and
    forgot that share; an empty name picked the current directory's share."""
    home = tmp_path / "home"
    (tmp_path / "music").mkdir()
    music = registry.register(b"\x01" * 16, tmp_path / "music", home)
    monkeypatch.chdir(tmp_path / "music")
    for wrong in ("nosuch", ""):
        with pytest.raises(BackerError, match="backer shares"):
            registry.forget(wrong, home)
    assert registry.registered(home) == [music]
    assert registry.find(".", home) == music


def test_a_damaged_registry_is_one_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / registry.REGISTRY_FILE).write_text("{not json")
    with pytest.raises(BackerError, match="is damaged"):
        registry.registered(home)


def _register_many(home: str, start: int) -> None:
    for number in range(start, start + 20):
        registry.register(bytes([number]) * 16, Path(home) / f"share{number}", Path(home))


def test_concurrent_registrations_lose_no_entry(tmp_path: Path) -> None:
    """Two processes registering at once: the lock keeps every entry."""
    home = tmp_path / "home"
    home.mkdir()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_register_many, args=(str(home), s)) for s in (1, 100)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert len(registry.registered(home)) == 40


def test_init_and_join_register_shares_lists_and_forget_unregisters(
    run_cli, tmp_path: Path
) -> None:
    founder, other = Device(tmp_path, "a"), Device(tmp_path, "b")
    founder.root.mkdir()
    (founder.root / "notes.txt").write_text("hello\n")
    out = founder.run("init", str(founder.root)).stdout
    assert "(named a)" in out
    with founder.serving() as address:
        token = invite(founder, address)
        joined = other.run("join", token, str(other.root)).stdout
    assert "(named b); 'backer run' keeps it in sync" in joined  # what to do next
    listed = json.loads(other.run("shares", "--json").stdout)
    share_id = json.loads(other.run("status", "--json", "--share", str(other.root)).stdout)[
        "share_id"
    ]
    assert listed == [{"name": "b", "root": str(other.root), "share_id": share_id}]
    assert other.run("shares").stdout.split() == ["b", str(other.root), share_id]

    # --share NAME works from anywhere; --dir stays as its other spelling
    status = json.loads(other.run("status", "--json", "--share", "b").stdout)
    assert status["files"] == 1
    assert json.loads(other.run("status", "--json", "--dir", str(other.root)).stdout) == status

    out = other.run("forget", "b").stdout
    assert "forgot share b" in out
    assert other.run("shares").stdout == ""
    assert (other.root / "notes.txt").read_text() == "hello\n"  # files and .backer/ untouched
    assert (other.root / ".backer" / "backer.db").exists()
    assert json.loads(other.run("status", "--json", "--share", str(other.root)).stdout)
    again = other.run("init", str(other.root)).stdout  # registers it again
    assert "is a share already" in again
    assert json.loads(other.run("shares", "--json").stdout)[0]["name"] == "b"


def test_unknown_share_names_and_forgetting_a_non_share_are_one_line_errors(
    run_cli, tmp_path: Path
) -> None:
    for args, fragment in (
        (("status", "--share", "nothing"), "no share named 'nothing'"),
        (("scan", "--share", "nothing"), "no share named 'nothing'"),
        (("forget", "nothing"), "no share named or at 'nothing'"),
        (("forget", str(tmp_path)), "no share named or at"),
    ):
        result = run_cli(*args, check=False)
        assert result.returncode == 1, args
        assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr, args
        assert "Traceback" not in result.stderr


def test_a_name_wins_over_a_directory_of_that_name(run_cli, tmp_path: Path) -> None:
    """``--share docs`` means the share named docs even where ./docs is another share;
    ``./docs`` means the directory."""
    (tmp_path / "one" / "docs").mkdir(parents=True)
    (tmp_path / "two" / "docs").mkdir(parents=True)
    (tmp_path / "two" / "docs" / "x").write_text("x")
    run_cli("init", str(tmp_path / "one" / "docs"))
    run_cli("init", str(tmp_path / "two" / "docs"))  # named docs-2
    by_name = json.loads(
        run_cli("status", "--json", "--share", "docs", cwd=tmp_path / "two").stdout
    )
    by_dir = json.loads(
        run_cli("status", "--json", "--share", f".{os.sep}docs", cwd=tmp_path / "two").stdout
    )
    assert (by_name["root"], by_dir["root"]) == (
        str(tmp_path / "one" / "docs"),
        str(tmp_path / "two" / "docs"),
    )

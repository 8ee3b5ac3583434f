"""End-to-end: the real ``backer`` CLI in subprocesses on real directories."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from backer.config.identity import parse_device_id


def backdate(root: Path) -> None:
    """Make every mtime older than the scanner's 'fresh' window."""
    for path in [root, *root.rglob("*")]:
        if ".backer" in path.parts:
            continue
        info = path.lstat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns - 10**10), follow_symlinks=False)


def log_changes(run_cli, root: Path, *args: str) -> list[list[tuple[str, str]]]:
    events = json.loads(run_cli("log", "--json", *args, cwd=root).stdout)
    return [
        [(c["change"], c["path"]) for c in e["changes"]] for e in events if e["kind"] == "state"
    ]


@pytest.fixture
def share_dir(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "2024").mkdir(parents=True)
    (root / "2024" / "beach.jpg").write_bytes(os.urandom(200_000))
    (root / "notes.txt").write_text("first\n")
    (root / "empty").mkdir()
    return root


def test_init_edit_rename_delete_scan_and_what_log_history_status_show(
    run_cli, share_dir: Path
) -> None:
    out = run_cli("init", str(share_dir)).stdout
    assert "initialised share" in out and "4 added" in out
    assert log_changes(run_cli, share_dir) == [
        [("added", "2024"), ("added", "2024/beach.jpg"), ("added", "empty"), ("added", "notes.txt")]
    ]

    (share_dir / "notes.txt").write_text("first\nsecond\n")
    (share_dir / "2024").rename(share_dir / "summer")
    (share_dir / "empty").rmdir()
    out = run_cli("scan", cwd=share_dir).stdout
    assert "2 added, 1 modified, 3 deleted" in out
    assert log_changes(run_cli, share_dir)[1] == [
        ("deleted", "2024"),
        ("deleted", "2024/beach.jpg"),
        ("deleted", "empty"),
        ("modified", "notes.txt"),
        ("added", "summer"),
        ("added", "summer/beach.jpg"),
    ]
    assert log_changes(run_cli, share_dir, "notes.txt") == [
        [("added", "notes.txt")],
        [("modified", "notes.txt")],
    ]

    history = json.loads(run_cli("history", "notes.txt", "--json", cwd=share_dir).stdout)
    assert [(h["size"], h["live"]) for h in history] == [(6, False), (13, True)]
    assert history[1]["supersedes"] == [history[0]["version"]]
    beach = json.loads(run_cli("history", "summer/beach.jpg", "--json", cwd=share_dir).stdout)
    old_beach = json.loads(run_cli("history", "2024/beach.jpg", "--json", cwd=share_dir).stdout)
    assert beach[0]["hash"] == old_beach[0]["hash"]  # a rename keeps the content id
    assert old_beach[-1]["kind"] == "deleted"
    text = run_cli("history", "notes.txt", cwd=share_dir).stdout.splitlines()
    assert text[1].startswith("* ") and "13 B" in text[1]

    status = json.loads(run_cli("status", "--json", cwd=share_dir / "summer").stdout)
    assert (status["files"], status["directories"], status["bytes"]) == (2, 1, 200_013)
    assert status["conflicts"] == 0 and status["forks"] == 0
    assert [d["id"] for d in status["devices"]] == [run_cli("id").stdout.strip()]

    backdate(share_dir)
    run_cli("scan", cwd=share_dir)
    out = run_cli("scan", cwd=share_dir).stdout
    assert "0 added, 0 modified, 0 deleted, 3 unchanged, 0 bytes hashed" in out


def test_id_is_stable_and_valid(run_cli) -> None:
    first = run_cli("id").stdout.strip()
    assert run_cli("id").stdout.strip() == first
    parse_device_id(first)


def assert_clean_error(result, fragment: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_clear_errors_for_bad_directories(run_cli, share_dir: Path, tmp_path: Path) -> None:
    assert_clean_error(run_cli("init", str(tmp_path / "missing"), check=False), "does not exist")
    assert_clean_error(
        run_cli("init", str(share_dir / "notes.txt"), check=False), "not a directory"
    )
    assert_clean_error(run_cli("scan", cwd=share_dir, check=False), "not inside a share")
    assert_clean_error(
        run_cli("status", "--dir", str(tmp_path / "nope"), check=False), "does not exist"
    )
    run_cli("init", str(share_dir))
    again = run_cli("init", str(share_dir))  # registers it again (after 'forget'), no more
    assert "is a share already" in again.stdout and "added" not in again.stdout
    assert_clean_error(run_cli("init", str(share_dir / "empty"), check=False), "shares cannot nest")
    assert_clean_error(run_cli("history", "nothing-here", cwd=share_dir, check=False), "no history")
    assert_clean_error(
        run_cli("history", str(tmp_path), cwd=share_dir, check=False), "not inside any share"
    )


def test_tampered_journal_is_detected_not_crashed_on(run_cli, share_dir: Path) -> None:
    run_cli("init", str(share_dir))
    db = sqlite3.connect(share_dir / ".backer" / "backer.db")
    rows = db.execute("SELECT seq, raw FROM events").fetchall()
    seq, raw = next((seq, raw) for seq, raw in rows if b"notes.txt" in raw)
    tampered = raw.replace(b"notes.txt", b"notes.exe")
    db.execute("UPDATE events SET raw = ? WHERE seq = ?", (tampered, seq))
    db.commit()
    db.close()
    for command in (["status"], ["scan"], ["log"]):
        assert_clean_error(run_cli(*command, cwd=share_dir, check=False), "does not match")


def test_garbage_database_is_a_clear_error(run_cli, share_dir: Path) -> None:
    run_cli("init", str(share_dir))
    (share_dir / ".backer" / "backer.db").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (share_dir / ".backer" / f"backer.db{suffix}").unlink(missing_ok=True)
    assert_clean_error(run_cli("status", cwd=share_dir, check=False), "backer repair")


def test_another_devices_key_cannot_open_the_share(
    run_cli, share_dir: Path, tmp_path: Path
) -> None:
    run_cli("init", str(share_dir))
    env_home = tmp_path / "other-home"
    result = subprocess.run(
        [sys.executable, "-m", "backer", "status"],
        cwd=share_dir,
        env={**os.environ, "BACKER_HOME": str(env_home)},
        capture_output=True,
        text=True,
    )
    assert_clean_error(result, "belongs to another device key")


def test_log_limit_and_since(run_cli, share_dir: Path) -> None:
    run_cli("init", str(share_dir))
    for n in range(3):
        (share_dir / "notes.txt").write_text(f"edit {n}\n")
        run_cli("scan", cwd=share_dir)
    every = json.loads(run_cli("log", "--json", cwd=share_dir).stdout)
    last_two = json.loads(run_cli("log", "--json", "--limit", "2", cwd=share_dir).stdout)
    assert len(every) > 2 and last_two == every[-2:]
    edits = json.loads(run_cli("log", "notes.txt", "--json", "--limit", "1", cwd=share_dir).stdout)
    assert [c["change"] for e in edits for c in e["changes"]] == ["modified"]
    assert json.loads(run_cli("log", "--json", "--since", "1h", cwd=share_dir).stdout) == every
    since = every[-1]["time"]
    assert json.loads(run_cli("log", "--json", "--since", since, cwd=share_dir).stdout)
    assert json.loads(run_cli("log", "--json", "--since", "0s", cwd=share_dir).stdout) == []
    text = run_cli("log", "--limit", "1", cwd=share_dir).stdout.splitlines()
    assert text[0].endswith("state") and text[1:] == ["    ~ notes.txt"]
    bad = run_cli("log", "--since", "yesterday", cwd=share_dir, check=False)
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1 and "--since" in bad.stderr


def test_help_names_the_environment_exit_codes_and_a_working_stdio_example(run_cli) -> None:
    def words(*args: str) -> str:
        return " ".join(run_cli(*args).stdout.split())

    top = words("--help")
    assert "BACKER_HOME" in top and "BACKER_DEBUG" in top and "3 done, but some files" in top
    assert "'ssh host backer stdio --dir DIR'" in words("sync", "--help")
    assert "(default: the current directory)" in words("join", "--help")


def test_init_on_the_parent_of_a_share_reports_it_and_keeps_its_metadata_out(
    run_cli, tmp_path: Path
) -> None:
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    (inner / "photo.jpg").write_bytes(b"jpeg")
    run_cli("init", str(inner))
    out = run_cli("init", str(tmp_path / "outer"))
    assert "warning: inner/.backer: skipped: the metadata of another share inside this one" in (
        out.stderr
    )
    status = json.loads(run_cli("status", "--json", cwd=tmp_path / "outer").stdout)
    assert (status["files"], status["directories"]) == (1, 1)


@pytest.mark.parametrize("where", ["/proc", "/sys/kernel"])
def test_init_where_nothing_can_be_written_says_so_in_one_plain_line(run_cli, where: str) -> None:
    result = run_cli("init", where, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"backer: error: {where}/.backer: ")
    assert "Errno" not in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("when", ["²h", "9" * 5000 + "h", "yesterday", "5 minutes ago"])
def test_a_time_that_is_not_one_is_refused_in_one_line(run_cli, tmp_path: Path, when: str) -> None:
    """The line shows how an age is written ("or an age" alone left '5 minutes ago',
    '5min' to guesswork)."""
    (tmp_path / "s").mkdir()
    run_cli("init", str(tmp_path / "s"))
    for args in (("ls", "--at", when), ("restore", "x", "--at", when)):
        result = run_cli(*args, cwd=tmp_path / "s", check=False)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("backer: error: --at: not a date"), result.stderr
        assert "('30m', '12h', '7d': a number and one of s, m, h, d, w)" in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_ls_of_what_is_no_folder_says_so_instead_of_listing_nothing(
    run_cli, share_dir: Path
) -> None:
    """'backer ls' of a deleted folder, a file or a link printed nothing and exited 0,
    which reads as an empty folder; an empty folder still lists nothing."""
    (share_dir / "link").symlink_to("notes.txt")
    run_cli("init", str(share_dir))
    shutil.rmtree(share_dir / "2024")
    run_cli("scan", cwd=share_dir)
    for name, was in (("2024", "not there"), ("notes.txt", "a file"), ("link", "a link")):
        result = run_cli("ls", name, cwd=share_dir, check=False)
        assert_clean_error(result, "not a folder at ")
        assert f"'{name}' was {was}" in result.stderr and result.stdout == "", result.stderr
    assert run_cli("ls", "empty", cwd=share_dir).stdout == ""


def test_history_of_the_share_top_says_to_name_a_path_inside_it(run_cli, share_dir: Path) -> None:
    """'backer history .' at the share's top said "no history for '' in this share"."""
    run_cli("init", str(share_dir))
    for where in (".", str(share_dir)):
        result = run_cli("history", where, cwd=share_dir, check=False)
        assert_clean_error(result, "the share's top folder has no versions of its own")


def test_restore_brings_back_an_earlier_version_as_a_new_one_and_keeps_the_current(
    run_cli, tmp_path: Path
) -> None:
    import unicodedata

    root = tmp_path / "share"
    root.mkdir()
    name = unicodedata.normalize("NFD", "résumé.txt")  # as macOS writes it
    (root / name).write_text("first draft\n")
    (root / "copy.txt").write_text("first draft\n")  # the bytes stay on this disk
    run_cli("init", str(root))
    (root / name).write_text("second draft, regretted\n")  # overwritten in place
    run_cli("scan", cwd=root)
    typed = unicodedata.normalize("NFC", name)  # as a person types it
    first, second = json.loads(run_cli("history", typed, "--json", cwd=root).stdout)
    assert len(json.loads(run_cli("log", typed, "--json", cwd=root).stdout)) == 2
    assert json.loads(run_cli("log", ".", "--json", cwd=root).stdout)[0]["kind"] == "genesis"
    out = run_cli("restore", typed, "--version", first["version"], cwd=root)
    assert f"restored {name} to version {first['version']}" in out.stdout
    assert (root / name).read_text() == "first draft\n"
    history = json.loads(run_cli("history", typed, "--json", cwd=root).stdout)
    assert len(history) == 3 and history[2]["live"] and history[2]["hash"] == first["hash"]
    assert history[2]["supersedes"] == [second["version"]]
    store = (root / ".backer" / "store").rglob("*")
    kept = [p.read_text() for p in store if p.is_file() and p.stat().st_nlink == 1]
    assert kept == ["second draft, regretted\n"]  # (the other contents are files here)
    assert "0 added, 0 modified, 0 deleted" in run_cli("scan", cwd=root).stdout
    (root / name).unlink()
    run_cli("scan", cwd=root)
    latest = run_cli("restore", name, "--at", "0s", cwd=root, check=False)
    assert latest.returncode == 1 and "did not exist at" in latest.stderr
    run_cli("restore", name, "--version", second["version"], cwd=root)  # from the store
    assert (root / name).read_text() == "second draft, regretted\n"
    (root / "copy.txt").write_text("edited too\n")
    (root / name).write_text("third\n")
    run_cli("scan", cwd=root)
    gone = run_cli("restore", typed, "--version", first["version"], cwd=root, check=False)
    assert gone.returncode == 1 and "are not on this device: give --from" in gone.stderr
    too_early = run_cli("restore", name, "--at", "2000-01-01", cwd=root, check=False)
    assert too_early.returncode == 1 and "the share did not exist yet" in too_early.stderr
    neither = run_cli("restore", name, cwd=root, check=False)
    assert neither.returncode == 1 and "--version or --at" in neither.stderr


def test_commands_taking_a_path_find_its_share_from_the_path_outside_the_share(
    run_cli, share_dir: Path, tmp_path: Path
) -> None:
    """Run outside the share, history, restore and resolve needed --dir or --share even
    for a path in a registered share; a path in no share is one line saying so."""
    (share_dir / "copy.txt").write_text("first\n")  # (the first bytes stay on this disk)
    run_cli("init", str(share_dir))
    notes = share_dir / "notes.txt"
    notes.write_text("second\n")
    run_cli("scan", cwd=share_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first, _ = json.loads(run_cli("history", str(notes), "--json", cwd=elsewhere).stdout)
    assert len(json.loads(run_cli("log", str(notes), "--json", cwd=elsewhere).stdout)) == 2
    assert "notes.txt" in run_cli("ls", str(share_dir), cwd=elsewhere).stdout
    assert "verified 1 files" in run_cli("verify", str(notes), cwd=elsewhere).stdout
    run_cli("restore", str(notes), "--version", first["version"], cwd=elsewhere)
    assert notes.read_text() == "first\n"
    unresolved = run_cli("resolve", str(notes), "--keep-both", cwd=elsewhere, check=False)
    assert unresolved.stderr.startswith("backer: error: no conflict at 'notes.txt'")

    stray = elsewhere / "stray.txt"
    stray.write_text("in no share\n")
    said = (
        f"backer: error: {stray} is not inside any share of this device (see 'backer "
        "shares'): run the command inside the share or name it with --share NAME|DIR\n"
    )
    for args in (
        ("history", str(stray)),
        ("restore", str(stray), "--version", first["version"]),
        ("resolve", str(stray), "--keep-both"),
    ):
        for cwd in (elsewhere, share_dir):
            refused = run_cli(*args, cwd=cwd, check=False)
            assert (refused.returncode, refused.stderr) == (1, said), (args, cwd)
    named = run_cli("history", str(notes), "--share", "photos", cwd=elsewhere)
    assert named.stdout.count("\n") == 3
    outside = run_cli("status", cwd=elsewhere)  # no PATH: the device's only share
    assert f"at {share_dir}\n" in outside.stdout


def test_library_warnings_and_errors_are_one_line_of_the_node_log_each() -> None:
    """What a library warns of (``warnings.warn``) or logs with a traceback reached
    stderr raw, with no time or level, in the middle of the node's log."""
    program = (
        "import logging, warnings\n"
        "from backer.cli import _logger\n"
        "_logger('info')\n"
        "warnings.warn('a library warns', RuntimeWarning)\n"
        "try:\n"
        "    raise OSError(28, 'No space left on device')\n"
        "except OSError:\n"
        "    logging.getLogger('watchdog.observers').exception('cannot rebuild the watches')\n"
        "logging.getLogger('watchdog.observers').info('not shown: below warning')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "BACKER_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60
    )
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    warned = f"{stamp} WARNING RuntimeWarning: a library warns \\(<string>:4\\)"
    assert re.fullmatch(warned, lines[0]), lines[0]
    failed = f"{stamp} ERROR cannot rebuild the watches: OSError: No space left on device"
    assert re.fullmatch(failed, lines[1]), lines[1]

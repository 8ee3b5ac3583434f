"""A first sync writes thousands of small files in batches: every file's bytes must be
on disk before its rename makes it the truth, every directory fsynced after the renames
into it, and every new directory's parent after it is made. Checked on the real CLI's
system calls (strace of every thread of the joining process)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from backer.config import registry
from backer.model.materializer import STAGE_FILES
from backer.model.replicator import WINDOW_FILES
from backer.scanner.ignore import TEMP_PREFIX
from tests.e2e import Device, free_port, invite, snapshot

FILES = 1_300  # more than one durable batch (materializer.STAGE_FILES)
LINE = re.compile(r"^(\d+)\s+(.*)$")
CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)")
UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+)")
FD_PATH = re.compile(r"^-?\d+<(.*?)>")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
AT = re.compile(r'(?:-?\d+<([^>]*)>|AT_FDCWD), "((?:[^"\\]|\\.)*)"')  # a path by its directory


def _calls(log: str) -> list[tuple[str, str, int, int]]:
    """(name, arguments, line it began on, line it ended on) of every successful call,
    in the order they ended; a call another thread interrupted is joined up again."""
    calls, begun = [], {}
    for index, line in enumerate(log.splitlines()):
        pid, text = LINE.match(line).groups()
        if found := UNFINISHED.match(text):
            begun[pid] = (found.group(1), found.group(2), index)
        elif found := RESUMED.match(text):
            name, arguments, start = begun.pop(pid)
            if int(found.group(3)) >= 0:
                calls.append((name, arguments + found.group(2), start, index))
        elif (found := CALL.match(text)) and int(found.group(3)) >= 0:
            calls.append((found.group(1), found.group(2), index, index))
    return calls


def _paths(arguments: str) -> list[str]:
    """The paths a call names: plain strings, or (the *at calls) a name relative to a
    directory descriptor, which ``strace -y`` shows with its path."""
    found = AT.findall(arguments)
    if found:
        return [os.path.join(directory, name) if directory else name for directory, name in found]
    return STRING.findall(arguments)


def _fd_path(arguments: str) -> str:
    found = FD_PATH.match(arguments)
    assert found, arguments
    return found.group(1)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_join_syncs_each_file_before_its_rename_and_each_directory_after(
    tmp_path: Path,
) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    for index in range(FILES):
        path = a.root / f"d{index % 13:02d}" / f"e{index % 2}" / f"f{index:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(index.to_bytes(4, "big") * (64 + index % 200))
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    log = tmp_path / "strace.log"
    traced = ("pwrite64", "fsync", "fdatasync", "syncfs", "rename", "renameat", "renameat2",
              "mkdir", "mkdirat")  # fmt: skip  # (every thread)
    with a.serving(port):
        joined = subprocess.run(
            ["strace", "-f", "-qq", "-y", "-s", "4096", "-o", str(log),
             "-e", f"trace={','.join(traced)}", *b.command("join", token, str(b.root))],
            env=b.env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    assert len(list(b.root.rglob("f*.txt"))) == FILES

    # a write must end before the sync that covers it begins, the sync end before the
    # rename begins, a rename or mkdir end before its directory's fsync begins
    written: dict[str, int] = {}  # temp path -> end of its last write (none: -1)
    synced: dict[str, int] = {}  # file or directory -> start of its last fsync
    synced_end: dict[str, int] = {}  # file -> end of its last fsync
    whole_fs: list[tuple[int, int]] = []  # (start, end) of each syncfs
    renamed: dict[str, int] = {}  # target -> end of its rename
    made: dict[str, int] = {}  # directory -> end of its mkdir
    unsynced = []
    for name, arguments, start, end in _calls(log.read_text()):
        if name == "pwrite64":
            written[_fd_path(arguments)] = end
        elif name in ("fsync", "fdatasync"):
            synced[_fd_path(arguments)] = start
            synced_end[_fd_path(arguments)] = end
        elif name == "syncfs":
            whole_fs.append((start, end))
        elif name in ("rename", "renameat", "renameat2"):
            old, new = _paths(arguments)[:2]
            if Path(old).name.startswith(TEMP_PREFIX):  # (a file of zeros is never written)
                last = written.get(old, -1)
                own = synced.get(old, -1) > last and synced_end[old] < start
                if not own and not any(last < s <= e < start for s, e in whole_fs):
                    unsynced.append(new)
                renamed[new] = end
        elif name in ("mkdir", "mkdirat"):
            made[_paths(arguments)[0]] = end
    assert len(renamed) == FILES
    assert not unsynced, f"{len(unsynced)} renamed before their bytes were synced"
    directories = {}  # directory -> index of the last rename into it
    for new, index in renamed.items():
        directories[str(Path(new).parent)] = max(index, directories.get(str(Path(new).parent), -1))
    late = [d for d, index in directories.items() if synced.get(d, -1) < index]
    assert not late, f"not fsynced after the renames into them: {late[:5]}"
    shared = {d: index for d, index in made.items() if Path(d).parent.is_relative_to(b.root)}
    made = {d: index for d, index in shared.items() if ".backer" not in Path(d).parts}
    orphans = [d for d, index in made.items() if synced.get(str(Path(d).parent), -1) < index]
    assert not orphans, f"made, their parent never fsynced after: {orphans[:5]}"
    assert {str(Path(d).relative_to(b.root)) for d in made} >= {"d00", "d00/e1"}


def test_a_join_killed_between_windows_loses_nothing_and_the_same_token_finishes_it(
    tmp_path: Path,
) -> None:
    """kill -9 of a first sync after its first window of files went into place, its
    peer frozen so that the second window cannot finish: every file already there is
    whole (never a torn or empty one), the next join with the same token finishes, no
    temp file stays, and ``verify`` finds every file as recorded."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    files = WINDOW_FILES * 6 // 5  # directories of 100: two windows
    for index in range(files):
        path = a.root / f"d{index // 100:02d}" / f"f{index:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(index.to_bytes(4, "big") * (256 + index % 700))
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    node = a.start(port)
    try:
        join = subprocess.Popen(b.command("join", token, str(b.root)), env=b.env)
        last_of_first = b.root / f"d{(WINDOW_FILES - 500) // 100:02d}"  # in the first
        # window's last commit batch
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and join.poll() is None:
            if last_of_first.is_dir() and any(
                not p.name.startswith(TEMP_PREFIX) for p in last_of_first.iterdir()
            ):
                break
            time.sleep(0.02)
        node.process.send_signal(signal.SIGSTOP)  # the second window waits for chunks
        time.sleep(1)
        assert join.poll() is None, "the join ended before it could be killed mid-plan"
        join.kill()
        join.wait()
        theirs = snapshot(a.root)
        mine = {
            p: e
            for p, e in snapshot(b.root).items()
            if not p.split("/")[-1].startswith(TEMP_PREFIX)
        }
        assert WINDOW_FILES - STAGE_FILES < sum(e[0] == "file" for e in mine.values()) < files
        assert all(theirs[p] == e for p, e in mine.items() if e[0] == "file")
        node.process.send_signal(signal.SIGCONT)
        again = b.run("join", token, str(b.root), check=False)
        assert again.returncode == 0, again.stderr
    finally:
        node.process.send_signal(signal.SIGCONT)
        node.stop()
    assert snapshot(b.root) == snapshot(a.root)
    temps = [
        p for p in b.root.rglob(f"{TEMP_PREFIX}*") if p.relative_to(b.root).parts[0] != ".backer"
    ]
    assert not temps
    b.run("verify", "--dir", str(b.root))


def _traced(device: Device, log: Path, *args: str, inject: str = "") -> int:
    """Run ``backer ARGS`` under strace (mkdirs, fsyncs, renames of every thread);
    ``inject``: an strace fault to inject. Return its exit status."""
    traced = "mkdir,mkdirat,fsync,fdatasync,rename,renameat,renameat2"
    extra = ["-e", f"inject={inject}"] if inject else []
    return subprocess.run(
        ["strace", "-f", "-qq", "-y", "-o", str(log), "-e", f"trace={traced}", *extra,
         *device.command(*args)],
        env=device.env, capture_output=True, text=True, timeout=120,
    ).returncode  # fmt: skip


def _registered_after_durable_folders(log: Path, made: list[Path], home: Path) -> None:
    """Each of ``made`` was made, then its parent fsynced, before the device registry's
    rename; the registry's folder is fsynced after that rename."""
    calls = _calls(log.read_text())
    registry = next(
        i for i, (name, arguments, _, _) in enumerate(calls)
        if name.startswith("rename") and _paths(arguments)[1] == str(home / "shares.json")
    )  # fmt: skip
    for directory in made:
        mkdir = next(
            i for i, (name, arguments, _, _) in enumerate(calls)
            if name.startswith("mkdir") and _paths(arguments)[0] == str(directory)
        )  # fmt: skip
        assert any(
            name == "fsync" and _fd_path(arguments) == str(directory.parent)
            for name, arguments, _, _ in calls[mkdir + 1 : registry]
        ), f"{directory} made, its parent not fsynced before the share was registered"
    assert any(
        name == "fsync" and _fd_path(arguments) == str(home)
        for name, arguments, _, _ in calls[registry + 1 :]
    ), "the registry's rename never made durable"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_join_and_init_make_their_folders_durable_before_registering_the_share(
    tmp_path: Path,
) -> None:
    """A power cut right after ``join`` or ``init`` must not leave the device registry
    naming a share whose folder or ``.backer/`` the disk never kept."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "x.txt").write_text("x")
    assert _traced(a, tmp_path / "init.log", "init", str(a.root)) == 0
    _registered_after_durable_folders(tmp_path / "init.log", [a.root / ".backer"], a.home)
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    b.root = tmp_path / "new" / "b"
    with a.serving(port):
        assert _traced(b, tmp_path / "join.log", "join", token, str(b.root)) == 0
    made = [tmp_path / "new", b.root, b.root / ".backer"]
    _registered_after_durable_folders(tmp_path / "join.log", made, b.home)
    assert snapshot(b.root) == snapshot(a.root)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_join_killed_at_any_fsync_before_it_registered_is_finished_by_the_same_token(
    tmp_path: Path,
) -> None:
    """SIGKILL at each of the first fsyncs of a join (folders made, key, .backer/, the
    database, the first file, the registry): running the same join again finishes it,
    and the share is registered and readable."""
    a = Device(tmp_path, "a")
    a.root.mkdir()
    (a.root / "x.txt").write_text("x")
    a.run("init", str(a.root))
    port = free_port()
    kills = range(1, 12)
    tokens = [invite(a, f"127.0.0.1:{port}") for _ in kills]
    with a.serving(port):
        for when, token in zip(kills, tokens, strict=True):
            b = Device(tmp_path, f"b{when}")
            b.root = tmp_path / f"new{when}" / "b"
            log = tmp_path / f"kill{when}.log"
            kill = f"fsync:signal=KILL:when={when}"
            killed = _traced(b, log, "join", token, str(b.root), inject=kill)
            assert killed != 0, f"the join ended before its fsync number {when}"
            b.run("join", token, str(b.root))
            assert snapshot(b.root) == snapshot(a.root), when
            assert b.root in [entry.root for entry in registry.registered(b.home)], when
            b.run("status", "--dir", str(b.root))

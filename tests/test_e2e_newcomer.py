"""What a newcomer meets walking through the README with the real CLI: ports chosen
by the system, share commands run from outside the share."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e import Device, Node, invite


@pytest.fixture
def founder(tmp_path: Path) -> Device:
    device = Device(tmp_path, "a")
    device.root.mkdir()
    (device.root / "notes.txt").write_text("hello\n")
    device.run("init", "-q", str(device.root))
    return device


def test_run_listens_on_any_free_port_and_says_which(founder: Device, tmp_path: Path) -> None:
    """``--listen 127.0.0.1:0`` was refused as 'not an address': port 0 (any free port)
    is what scripts and tests want. The node logs the port bound, ``status`` and the
    API show it, an invite names it (a device joins through it), and ``--api HOST:0``
    serves the web UI on a port of its own that ``backer open`` names."""
    node = Node(founder, 0, {}, listen="127.0.0.1:0", api="127.0.0.1:0")
    try:
        node.wait_for("watching")
        node.wait_for("web UI on")
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", node.log).group(1))
        assert port != 0
        status = founder.run("status", "--share", str(founder.root)).stdout
        assert f"listening 127.0.0.1:{port} (backer run)" in status, status
        token = founder.run("invite", "--no-wait", "--share", str(founder.root)).stdout.strip()
        joiner = Device(tmp_path, "b")
        joiner.run("join", "-q", token, str(joiner.root))
        assert (joiner.root / "notes.txt").read_text() == "hello\n"
        assert re.search(r"session with [A-Z2-7]{7} open \(127\.0\.0\.1:\d+, accepted\)", node.log)
        link = founder.run("open", "--no-browser").stdout.strip()
        api_port = int(re.match(r"http://127\.0\.0\.1:(\d+)/login\?token=", link).group(1))
        assert api_port not in (0, port)
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with browser.open(link, timeout=30) as response:  # (logs in, redirects to the page)
            assert response.status == 200
    finally:
        assert node.stop() == 0, node.log


def test_a_port_0_to_dial_is_still_refused(founder: Device) -> None:
    """Port 0 means 'any' only where backer listens: a peer cannot be dialled at it."""
    result = founder.run("sync", "127.0.0.1:0", "--share", str(founder.root), check=False)
    assert result.returncode == 1
    assert "not an address (expected HOST:PORT): '127.0.0.1:0'" in result.stderr


def test_outside_any_share_the_only_share_is_used(founder: Device, tmp_path: Path) -> None:
    """``backer status`` (and every share command) run outside any share refused when
    this device has exactly one share: with one, it is the share, as ``--share`` would
    name it; with several, the error lists them and asks for ``--share``."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for args in (["status"], ["log"], ["conflicts"], ["ls"], ["device", "list"], ["config"]):
        result = founder.run(*args, cwd=outside)
        assert result.returncode == 0, (args, result.stderr)
    assert f"at {founder.root}" in founder.run("status", cwd=outside).stdout
    assert "notes.txt" in founder.run("ls", cwd=outside).stdout
    other = tmp_path / "other"
    other.mkdir()
    founder.run("init", "-q", str(other))
    result = founder.run("status", cwd=outside, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"backer: error: not inside a share: {outside}; this device's shares: a, other "
        "(see 'backer shares'): run the command inside one or name it with --share NAME"
    )


def test_ctrl_c_while_backer_starts_is_one_line_not_a_traceback(founder: Device) -> None:
    """Ctrl-C in the second or so ``backer run`` takes to load its modules printed the
    traceback of the import it interrupted. Signalled at several moments of its start
    (SIGINT as a terminal sends it), it ends with at most one line each time (what the
    interpreter says when its own start is interrupted is not backer's)."""
    for delay in (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0):
        process = subprocess.Popen(
            founder.command("run", "--listen", "127.0.0.1:0", "--api", "off"),
            env=founder.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        if _the_interpreters_own_start(err):
            continue
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay, err)
        assert process.returncode in (0, 1, -signal.SIGINT), (delay, process.returncode, err)


def _the_interpreters_own_start(err: str) -> bool:
    """What Python says of a Ctrl-C in its own start, before any of backer's code runs: a
    fatal error of its initialisation (init_import_site, init_sys_streams: a few in 60
    under load), or a traceback through runpy alone, finding or loading the package."""
    if err.startswith(("Fatal Python error: ", "Could not import runpy module")):
        return True
    files = re.findall(r'File "([^"]+)"', err)
    return "Traceback" in err and all(
        name.startswith("<frozen ") or name.endswith(("backer/__init__.py", "backer/__main__.py"))
        for name in files
    )


CTRL_C_AROUND_THE_HOLD = """
import signal, sys
import backer.entry

where = sys.argv[1]
getsignal, set_handler = signal.getsignal, signal.signal


def getsignal_interrupted(signum):  # a Ctrl-C as the entry point starts, before its hold
    handler = getsignal(signum)
    if where == "before":
        raise KeyboardInterrupt
    return handler


def set_handler_interrupted(signum, handler):  # one just after the hold ends
    previous = set_handler(signum, handler)
    if where == "after" and handler is signal.default_int_handler:
        signal.signal = set_handler
        raise KeyboardInterrupt
    return previous


signal.getsignal, signal.signal = getsignal_interrupted, set_handler_interrupted
sys.argv = ["backer", *sys.argv[2:]]
backer.entry.main()
"""


@pytest.mark.parametrize("where", ["before", "after"])
def test_ctrl_c_just_before_or_after_the_entry_point_holds_it_is_one_line(
    founder: Device, where: str
) -> None:
    """A Ctrl-C as the entry point began, before it held one (it asked which handler was
    in place first), or just after it let go (restoring Python's own, before the command
    handles one), printed a traceback: under load, a few in 40 Ctrl-Cs at random moments
    of a start did. Both now end the command with one line."""
    process = subprocess.run(
        [sys.executable, "-c", CTRL_C_AROUND_THE_HOLD, where, "status"],
        env=founder.env,
        cwd=founder.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (process.returncode, process.stderr) == (1, "aborted\n")


def test_the_entry_point_loads_nothing_but_signal_before_it_holds_a_ctrl_c() -> None:
    """Whatever ``backer.entry`` loads before its hold is a window where a Ctrl-C prints
    the traceback of that import: ``typing`` was most of the window, and hit 6 of 40
    Ctrl-Cs at random moments of a start under load."""
    listed = "import sys; before = set(sys.modules); import {}; print(*set(sys.modules) - before)"
    loaded = [
        subprocess.run(
            [sys.executable, "-c", listed.format(module)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for module in ("signal", "backer.entry")
    ]
    assert set(loaded[1]) - set(loaded[0]) == {"backer", "backer.entry"}


SWALLOWED_INTERRUPT = """
import asyncio, importlib.abc, sys, weakref
import backer.entry
from backer.model.share import Share


def swallowed():
    # What a Ctrl-C landing in a callback Python calls itself does (the import system's
    # clean-up, a finalizer): a KeyboardInterrupt it reports as 'Exception ignored in'.
    class ModuleLock:
        pass

    def cleanup(_):
        raise KeyboardInterrupt

    lock = ModuleLock()
    reference = weakref.ref(lock, cleanup)
    del lock


class AtTheProgressDisplay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "backer.progress":  # (it loads rich)
            sys.meta_path.remove(self)
            swallowed()
        return None


def scanned_then_swallowed(share, *args, **options):
    try:
        return scan(share, *args, **options)
    finally:
        swallowed()


def loop_started_after_one_swallowed(main, **options):
    swallowed()
    return started(main, **options)


if sys.argv[1] == "display":
    sys.meta_path.insert(0, AtTheProgressDisplay())
elif sys.argv[1] == "loop":
    started, asyncio.run = asyncio.run, loop_started_after_one_swallowed
else:
    scan, Share.scan = Share.scan, scanned_then_swallowed
sys.argv = ["backer", *sys.argv[2:]]
backer.entry.main()
"""


def _swallowed_then(moment: str, args: list[str], env: dict[str, str]) -> None:
    """Run ``backer ARGS`` with a Ctrl-C swallowed by Python at ``moment``: it must end
    the command with 'aborted', exit 1."""
    process = subprocess.run(
        [sys.executable, "-c", SWALLOWED_INTERRUPT, moment, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.stderr.strip() == "aborted", process.stderr
    assert process.returncode == 1


def test_ctrl_c_python_swallows_while_the_node_loads_still_stops_it(founder: Device) -> None:
    """A Ctrl-C that lands in the import system's own clean-up while ``backer run``
    loads its node (after the CLI's modules, which hold it) is swallowed by Python: it
    printed 'Exception ignored in ... KeyboardInterrupt' and the node served on for good
    (the Ctrl-C test above hung so once). Swallowed just before the node's loop starts,
    it now ends the command with one line."""
    _swallowed_then("loop", ["run", "--listen", "127.0.0.1:0", "--api", "off"], founder.env)


@pytest.mark.parametrize(
    ("command", "moment"), [("sync", "display"), ("join", "display"), ("sync", "scanned")]
)
def test_a_ctrl_c_python_swallows_after_the_start_up_check_ends_the_command(
    founder: Device, tmp_path: Path, command: str, moment: str
) -> None:
    """A Ctrl-C swallowed by Python (see the test above) after the command's start-up
    check: as its progress display loads rich, or as its scan ends (``-q``: no display).
    ``sync`` and ``join`` ran to their end (here: each dial of a closed port). They now
    end with 'aborted', exit 1, as a Ctrl-C there does: once the display is loaded, and
    where the event loop takes Ctrl-C over."""
    if command == "sync":
        device, args = founder, ["sync", "-q", "127.0.0.1:9", "--dir", str(founder.root)]
    else:
        device = Device(tmp_path, "b")
        args = ["join", invite(founder, "127.0.0.1:9"), str(tmp_path / "joined")]
    _swallowed_then(moment, args, device.env)


def test_forget_then_init_while_the_node_runs_leaves_the_share_closed_cleanly(
    founder: Device,
) -> None:
    """``backer forget DIR`` then ``backer init DIR`` while the node serves the share:
    the node closes it when it is forgotten and serves it again once registered, and
    its next start finds the database closed cleanly (no 'not closed cleanly')."""
    node = founder.start()
    try:
        founder.run("forget", str(founder.root))
        node.wait_for("a: no longer registered: not served")
        again = founder.run("init", str(founder.root))
        assert "is a share already" in again.stdout, again.stdout
        node.wait_for("a: watching", count=2)
        (founder.root / "after.txt").write_text("recorded by the node\n")
        node.wait_for("a: recorded 1 changes")
    finally:
        assert node.stop() == 0, node.log
    restarted = founder.start()
    try:
        assert "not closed cleanly" not in restarted.log, restarted.log
    finally:
        assert restarted.stop() == 0, restarted.log
    assert "not closed cleanly" not in founder.run("status").stderr


def test_join_into_a_file_says_it_is_not_a_directory(founder: Device, tmp_path: Path) -> None:
    """``backer join TOKEN FILE`` said 'FILE: File exists', where ``init`` says 'not a
    directory: FILE'; a file inside DIRECTORY's path is named the same way."""
    token = invite(founder, "127.0.0.1:9")
    joiner = Device(tmp_path, "b")
    stray = tmp_path / "stray.txt"
    stray.write_text("a file\n")
    for target in (stray, stray / "below"):
        result = joiner.run("join", "-q", token, str(target), check=False)
        assert (result.returncode, result.stderr) == (
            1,
            f"backer: error: not a directory: {stray}\n",
        ), target
    assert stray.read_text() == "a file\n"

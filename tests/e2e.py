"""Helpers for end-to-end tests: devices as real CLI processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from backer.config.identity import load_or_create_key
from backer.config.registry import RegisteredShare
from backer.model.share import Share, ShareBusy
from backer.node import commands
from backer.node.node import Node as InProcessNode
from backer.versioner import config as retention_config
from benchmarks import measure

PORTS = range(20_000, 32_000)  # below Linux's ephemeral range (32768-60999)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a listener a test starts (often more than
    once). Not an ephemeral one: the kernel gives those to outgoing connections, which
    could take it between the check and a listener's (re)start. Each test worker draws
    from its own slice, so parallel workers never pick the same port."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = len(PORTS) // 8
    start = PORTS.start + (worker % 8) * size
    return measure.free_port(start, start + size)


def run_backer(
    *args: str,
    env: dict[str, str],
    check: bool = True,
    timeout: float = 300,
    cwd: Path | None = None,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The real ``backer ARGS`` in a subprocess, its output captured; a failure raised
    with its stderr when ``check``. ``command``: the whole command line instead (a
    :meth:`Device.command`, which may wrap backer: a shifted clock, a slowed disk)."""
    result = subprocess.run(
        command or [sys.executable, "-m", "backer", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"backer {' '.join(args)} failed:\n{result.stderr}")
    return result


class Device:
    """One device: its own BACKER_HOME and share directory."""

    def __init__(self, base: Path, name: str) -> None:
        self.home = base / f"{name}-home"
        self.root = base / name
        self.env = {**os.environ, "BACKER_HOME": str(self.home)}
        self.env.pop("BACKER_DEBUG", None)
        self.nodes: list[Node] = []
        self.serve_log = ""

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "backer", *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = self.command(*args)
        return run_backer(
            *args, env=self.env, check=check, timeout=timeout, cwd=cwd, command=command
        )

    def sync(self, address: str) -> str:
        return self.run("sync", address, "--dir", str(self.root)).stdout

    def start(
        self, port: int | None = None, wait: bool = True, api: str = "off", **env: str
    ) -> Node:
        """``backer run`` on a fresh port by default, ready once its shares are
        watched (unless not ``wait``); stop it with :meth:`Node.stop` (or use
        :meth:`serving`). ``api``: where it serves the web UI (none by default)."""
        node = Node(self, port or free_port(), env, api=api)
        self.nodes.append(node)
        if wait:
            try:
                node.wait_for("watching")
            except AssertionError:
                node.stop()  # (no test is left to stop it)
                raise
        return node

    @contextlib.contextmanager
    def serving(self, port: int | None = None, **env: str) -> Iterator[str]:
        """``backer run`` for the block; its address. Its log is ``serve_log`` after."""
        node = self.start(port, **env)
        try:
            yield node.address
        finally:
            node.stop()
            self.serve_log = node.log


class Node:
    """A running ``backer run`` of one device; its stderr is collected as it comes."""

    def __init__(
        self,
        device: Device,
        port: int,
        env: dict[str, str],
        listen: str | None = None,
        wrap: tuple[str, ...] = (),
        api: str = "off",
    ) -> None:
        """``listen`` instead of 127.0.0.1:``port``; ``wrap``: a command prefix (e.g.
        ``ip netns exec NAME``) that execs backer in place, so signals still reach it;
        ``api``: where to serve the web UI (``--api``)."""
        self.device = device
        self.address = listen or f"127.0.0.1:{port}"
        self.lines: list[str] = []
        command = ("run", "--listen", self.address, "--log-level", "debug", "--api", api)
        self.process = subprocess.Popen(
            [*wrap, *device.command(*command)],
            env={**device.env, **env},
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = 180) -> None:
        """Until ``text`` is in ``count`` log lines (or the process ended: fail)."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in list(self.lines)) < count:
            if self.process.poll() is not None:
                self.reader.join(5)
                raise AssertionError(f"backer run exited ({self.process.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log of backer run:\n{self.log}")
            time.sleep(0.02)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Signal it and wait (SIGKILL: at once); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(5)
        if self in self.device.nodes:
            self.device.nodes.remove(self)
        return self.process.returncode


def wait_until(done: Callable[[], object], nodes: Iterable[Node], timeout: float = 180) -> None:
    """Poll ``done`` until true; past ``timeout``, fail showing every node's log (one
    side's log rarely tells why two devices did not meet)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            shown = (
                f"--- {node.address} of {node.device.root.name}:\n{node.log}" for node in nodes
            )
            raise AssertionError(f"not done after {timeout} s:\n" + "\n".join(shown))
        time.sleep(0.1)


@contextlib.contextmanager
def slowed(node: Node, syscall: str, delay_us: int) -> Iterator[Callable[[], None]]:
    """Every ``syscall`` of ``node``'s process (each thread, also those it starts later)
    delayed ``delay_us`` microseconds on entry, by strace, for the block; it yields a
    function that ends the slowing early (the rest at full speed). The block begins once
    strace traces every thread: a fixed wait for that ran out on a loaded machine, and
    what the block slows ran unslowed."""
    pid = node.process.pid
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(pid),
         "-e", f"trace={syscall}", "-e", f"inject={syscall}:delay_enter={delay_us}"],
    )  # fmt: skip

    def traced() -> bool:
        if tracer.poll() is not None:
            raise AssertionError(f"strace exited ({tracer.returncode})")
        tracers = set()
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # (a thread that just ended)
                status = (task / "status").read_text()
                tracers.add(status.split("TracerPid:", 1)[1].split()[0])
        return tracers == {str(tracer.pid)}

    def stop() -> None:
        if tracer.poll() is None:
            tracer.terminate()
        tracer.wait()

    try:
        wait_until(traced, [node])
        yield stop
    finally:
        stop()


INVITE_EXPIRES_S = 86400  # (backer invite's default)


def invite(founder: Device, address: str) -> str:
    """A token naming ``address``: made in this process as ``backer invite --no-wait``
    makes it (a set-up step: one CLI start saved each time), by that command where a
    node holds the share (it asks the node) or the device's commands run otherwise
    (another user, another clock)."""
    args = ("invite", "--no-wait", "--address", address, "--dir", str(founder.root))
    if type(founder).command is not Device.command:
        return founder.run(*args).stdout.strip()
    try:
        share = Share.open(founder.root, load_or_create_key(founder.home), home=founder.home)
    except ShareBusy:
        return founder.run(*args).stdout.strip()
    with share:
        return commands.new_invite(share, INVITE_EXPIRES_S, (address,))[1]


def joined_pair(tmp_path: Path) -> tuple[Device, Device, tuple[int, int]]:
    """Two members of one share made with the real CLI, and a free port for each."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    a.run("init", str(a.root))
    ports = free_port(), free_port()
    join_through(a, [b], ports[0])
    return a, b, ports


def join_through(
    founder: Device, joiners: Sequence[Device], port: int, introduce: bool = False
) -> None:
    """Each of ``joiners`` joins ``founder``'s share while ``founder`` serves on ``port``;
    with ``introduce`` the first then syncs once, so it learns of the others' admission."""
    tokens = [invite(founder, f"127.0.0.1:{port}") for _ in joiners]
    with founder.serving(port) as address:
        for device, token in zip(joiners, tokens, strict=True):
            device.run("join", token, str(device.root))
        if introduce:
            joiners[0].sync(address)


def keep_nothing_replaced(device: Device) -> None:
    """Retention set to keep no replaced or deleted content (``backer config KEY 0s``
    of each duration), in this process: a set-up step, one CLI start saved per key."""
    key = load_or_create_key(device.home)
    share = Share.open(device.root, key, exclusive=False, home=device.home)
    with share, share.db.conn:
        for name in retention_config.DURATIONS:
            retention_config.set_value(share.catalog, name, "0s")


def nodes_in_loop(devices: Iterable[Device], ports: Iterable[int]) -> list[InProcessNode]:
    """In-process nodes of ``devices`` (for tests that drive several in one event loop)."""
    return [
        InProcessNode(
            [RegisteredShare(b"", d.root.name, d.root)],
            load_or_create_key(d.home),
            listen=("127.0.0.1", port),
            log=logging.getLogger(f"backer.test.{d.root.name}"),
            home=d.home,
        )
        for d, port in zip(devices, ports, strict=True)
    ]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` except .backer: kind, bytes or target, permission bits."""
    result: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] == ".backer":
            continue
        info = path.lstat()
        if path.is_symlink():
            result[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            result[relative] = ("dir",)
        else:
            result[relative] = ("file", path.read_bytes(), info.st_mode & 0o777)
    return result


def summary_number(output: str, label: str, last: bool = False) -> int:
    """A number from the sync summary line, e.g. ``chunk bytes received`` (the first
    occurrence of ``label``, or the last)."""
    tail = output.rsplit(label, 1)[1] if last else output.split(label, 1)[1]
    return int(tail.split()[0].rstrip(";,"))


@contextlib.contextmanager
def forwarder(
    upstream: str, on_accept: Callable[[], None] = lambda: None, hold: tuple[int, float] = (0, 0)
) -> Iterator[str]:
    """A TCP relay on 127.0.0.1 to ``upstream``; its address. ``on_accept()`` runs for
    each connection before it is relayed; ``hold=(n, s)``: what the client sends after
    its first ``n`` reads (n > 0) reaches ``upstream`` ``s`` seconds late."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    sockets: list[socket.socket] = [listener]

    def pump(source: socket.socket, target: socket.socket, held: int = 0) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                held -= 1
                if held == 0:
                    time.sleep(hold[1])
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            on_accept()
            host, port = upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)), timeout=10)
            server.settimeout(None)
            sockets.extend((client, server))
            for ends in ((client, server, hold[0] + 1 if hold[0] else 0), (server, client)):
                threading.Thread(target=pump, args=ends, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for sock in sockets:
            sock.close()

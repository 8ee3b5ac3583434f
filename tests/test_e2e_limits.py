"""Resource limits and liveness through the real CLI over TCP: strangers that trickle,
members that ask without reading, peers that stop answering."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from backer.config import registry
from backer.config.identity import load_or_create_key
from backer.connections.transport import (
    Hub,
    Limits,
    SecureChannel,
    SessionClosed,
    Streams,
    initiator,
    responder,
    tcp_streams,
)
from backer.model.share import Share
from backer.node.node import Node
from backer.protocol.session import Session
from backer.protocol.wire import PROTOCOL_VERSION, Hello, Message, Ping, Summary, WantChunks
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import is_temp_name
from tests.e2e import Device, free_port, invite, snapshot
from tests.helpers import make_devices, sync, timing


@contextlib.contextmanager
def serving(
    device: Device, port: int, files_limit: int | None = None, **env: str
) -> Iterator[subprocess.Popen[str]]:
    """``backer run`` with its log in a file (a flood must not block it on a pipe),
    optionally started with a soft limit of ``files_limit`` descriptors (hard: 4,096)."""

    def limit() -> None:
        if files_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files_limit, 4096))

    log = device.root.parent / f"serve-{port}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            device.command("run", "--listen", f"127.0.0.1:{port}", "--api", "off"),
            env={**device.env, **env},
            stderr=stderr,
            text=True,
            preexec_fn=limit,
        )
    process.log = log  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + 60  # (10 s were not enough on a loaded machine)
        while "watching" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(log.read_text())
            time.sleep(0.05)
        yield process
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _pair(tmp_path: Path) -> tuple[Device, Device, int]:
    """A founder with a file and a member that joined it; the founder's port."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    (a.root / "first.txt").write_text("first\n")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with serving(a, port):
        b.run("join", token, str(b.root))
    return a, b, port


class Trickler(threading.Thread):
    """``count`` connections from 127.0.0.2 that send one byte every ``every`` seconds and
    never finish a handshake; each one closed by the server is opened again."""

    def __init__(self, port: int, count: int, every: float, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.every, self.seconds = port, count, every, seconds
        self.stop = threading.Event()
        self.opened = 0

    def _open(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind(("127.0.0.2", 0))
        sock.connect_ex(("127.0.0.1", self.port))
        self.opened += 1
        return sock

    def run(self) -> None:
        sockets = [self._open() for _ in range(self.count)]
        deadline = time.monotonic() + self.seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            for index, sock in enumerate(sockets):
                try:
                    sock.send(b"S")
                except OSError as exc:
                    if exc.errno in (errno.EAGAIN, errno.ENOTCONN):
                        continue  # still connecting, or the server has not read yet
                    sock.close()
                    sockets[index] = self._open()
            self.stop.wait(self.every)
        for sock in sockets:
            sock.close()


@timing
def test_finding_4_slow_unauthenticated_connections_do_not_keep_a_member_out(
    tmp_path: Path,
) -> None:
    a, b, port = _pair(tmp_path)
    (a.root / "second.txt").write_text("written while strangers trickle\n")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))  # for the trickler
    with serving(a, port, files_limit=512, BACKER_TIME_SCALE="0.25") as server:
        trickler = Trickler(port, 1000, every=1.0, seconds=90)
        trickler.start()
        try:
            time.sleep(3)  # all 1,000 are in
            started = time.monotonic()
            result = b.run("sync", f"127.0.0.1:{port}", "--dir", str(b.root), timeout=60)
            took = time.monotonic() - started
            descriptors = psutil.Process(server.pid).num_fds()
        finally:
            trickler.stop.set()
            trickler.join()
        log = server.log.read_text()  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    assert snapshot(b.root) == snapshot(a.root)
    assert took < 30, took
    assert trickler.opened >= 1000
    assert descriptors < 400, descriptors  # at most 256 strangers at a time
    assert len(log.splitlines()) < 50 and "Traceback" not in log, log[:2000]


def _member_connection(
    share: Share, port: int, opening: list[Message] | None = None, buffer: int | None = None
) -> tuple[socket.socket, SecureChannel]:
    """A raw TCP connection of ``share``'s device, authenticated, ``opening`` sent (by
    default Hello and Summary), and nothing more; ``buffer``: its receive buffer size."""
    channel = initiator(share, share.key)
    sock = socket.socket()
    if buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(channel.data_to_send())
    while not channel.established:
        channel.receive_data(sock.recv(65536))
        sock.sendall(channel.data_to_send())
    opening = Session(share, "reader").start() if opening is None else opening
    channel.send(b"".join(m.encode() for m in opening))
    sock.sendall(channel.data_to_send())
    return sock, channel


def test_finding_5_a_member_asking_without_reading_keeps_serve_bounded(tmp_path: Path) -> None:
    a, b, port = _pair(tmp_path)
    data = os.urandom(16 * 1024 * 1024)
    (a.root / "big.bin").write_bytes(data)
    hashes = [c.hash for c in manifest_of_bytes(data).chunks]
    with serving(a, port) as server:
        process = psutil.Process(server.pid)
        b.sync(f"127.0.0.1:{port}")  # serve has scanned big.bin; b is a member
        baseline = process.memory_info().rss
        key = load_or_create_key(b.home)
        with Share.open(b.root, key, exclusive=False, home=b.home) as share:
            sock, channel = _member_connection(share, port)
            wanted = [hashes[i % len(hashes)] for i in range(16_000)]  # ~1.3 GB of replies
            for start in range(0, len(wanted), 64):
                channel.send(WantChunks(wanted[start : start + 64]).encode())
            sock.sendall(channel.data_to_send())  # ~530 KB of requests; never read a reply
            peak = baseline
            for _ in range(40):
                time.sleep(0.1)
                peak = max(peak, process.memory_info().rss)
            sock.close()
    assert peak - baseline < RSS_BOUND, (baseline, peak)


RSS_BOUND = 64 * 1024 * 1024  # docs/security.md


@timing
def test_a_suspended_peer_is_detected_within_the_deadline(tmp_path: Path) -> None:
    a, b, port = _pair(tmp_path)
    (a.root / "big.bin").write_bytes(os.urandom(96 * 1024 * 1024))
    env = {**b.env, "BACKER_TIME_SCALE": "0.1"}  # nothing received for 6 s: unresponsive
    with serving(a, port) as server:
        sync = subprocess.Popen(
            b.command("sync", f"127.0.0.1:{port}", "--dir", str(b.root)),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3000):  # until the transfer has begun
            if any(is_temp_name(p.name) for p in b.root.iterdir()) or sync.poll() is not None:
                break
            time.sleep(0.01)
        os.kill(server.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            _, stderr = sync.communicate(timeout=60)
        finally:
            sync.kill()
        took = time.monotonic() - stopped
    assert sync.returncode == 1, stderr
    assert "peer unresponsive: nothing received for 6 s" in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert took < 6 + 5, took


@contextlib.contextmanager
def serving_here(
    device: Device,
    port: int,
    limits: Limits,
    log: list[logging.LogRecord],
    send_buffer: int | None = None,
) -> Iterator[None]:
    """``device``'s node run in this process (so that a test can change how its sessions
    behave), in a thread of its own, its log records in ``log``; ``send_buffer``: each
    connection's send buffer size."""
    logger = logging.getLogger(f"backer.test.{device.root.name}")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Collect(log))

    class Here(Node):
        def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if send_buffer is not None:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            super()._on_connect(reader, writer)

    entry = registry.RegisteredShare(b"", device.root.name, device.root)
    key = load_or_create_key(device.home)
    listen = ("127.0.0.1", port)
    node = Here([entry], key, listen=listen, log=logger, limits=limits, home=device.home)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(node.run(stop),))
    thread.start()
    try:
        deadline = time.monotonic() + 60  # its first scan done, as Device.start waits
        while not any(": watching " in r.getMessage() for r in list(log)):
            assert thread.is_alive() and time.monotonic() < deadline, [*map(str, log)]
            time.sleep(0.02)
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        loop.close()


class Collect(logging.Handler):
    """Log records into a list (their times too: when the node did something)."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@timing
def test_finding_12_a_peer_that_never_answers_requests_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time is taken at ``a``, from the first request to the session's end: not the
    CLI's start-up, which alone can take seconds on a loaded machine."""
    a, b, port = _pair(tmp_path)
    (a.root / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    # a runs in this process: it pings, but takes chunk requests and never answers them
    asked: list[float] = []
    monkeypatch.setattr(Session, "_on_wantchunks", lambda self, m: asked.append(time.time()) or [])
    log: list[logging.LogRecord] = []
    with serving_here(a, port, Limits(keepalive_s=0.2), log):
        env = {**b.env, "BACKER_TIME_SCALE": "0.05"}  # no answer for 6 s: unresponsive
        result = subprocess.run(
            b.command("sync", f"127.0.0.1:{port}", "--dir", str(b.root)),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert "peer unresponsive: no answer to a request for 6 s" in result.stderr, result.stderr
    (ended,) = [r.created for r in log if "ended: peer closed the session" in r.getMessage()]
    assert asked and ended - asked[0] < 6 + 5, (ended - asked[0], [*map(str, log)])


def test_finding_12_what_a_silent_peer_was_asked_comes_from_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, port = _pair(tmp_path)
    c = Device(tmp_path, "c")
    token = invite(a, f"127.0.0.1:{port}")
    data = os.urandom(8 * 1024 * 1024)
    with serving(a, port):
        c.run("join", token, str(c.root))
        b.sync(f"127.0.0.1:{port}")  # b learns that c is a member
        (a.root / "big.bin").write_bytes(data)
        c.sync(f"127.0.0.1:{port}")
    assert (c.root / "big.bin").read_bytes() == data
    monkeypatch.setattr(Session, "_on_wantchunks", lambda self, message: [])  # c: silent
    c_port = free_port()
    with (
        serving(a, port, BACKER_TIME_SCALE="0.05"),
        serving_here(c, c_port, Limits(keepalive_s=0.2), []),
    ):
        env = {**b.env, "BACKER_TIME_SCALE": "0.05"}
        result = subprocess.run(
            b.command("sync", f"127.0.0.1:{port}", f"127.0.0.1:{c_port}", "--dir", str(b.root)),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert f"127.0.0.1:{c_port}: sync failed: peer unresponsive" in result.stderr
    assert (b.root / "big.bin").read_bytes() == data


@timing
def test_finding_14_a_member_that_pings_but_never_reads_is_dropped(tmp_path: Path) -> None:
    a, b, port = _pair(tmp_path)
    for n in range(3000):  # ~330 KB of events for a peer that says it has none
        (a.root / f"f{n}.txt").write_text(str(n))
    log: list[logging.LogRecord] = []
    with (
        serving_here(a, port, Limits(keepalive_s=0.2, idle_s=2), log, send_buffer=4096),
        Share.open(b.root, load_or_create_key(b.home), exclusive=False, home=b.home) as share,
    ):
        opening: list[Message] = [Hello(PROTOCOL_VERSION, b"reader"), Summary([], 0)]
        sock, channel = _member_connection(share, port, opening, buffer=4096)
        started = time.monotonic()
        for _ in range(200):  # it talks, so it is not silent; it never reads
            if any("does not read" in r.getMessage() for r in log):
                break
            channel.send(Ping().encode())
            with contextlib.suppress(OSError):
                sock.sendall(channel.data_to_send())
            time.sleep(0.1)
        took = time.monotonic() - started
        sock.close()
    assert any("the peer does not read" in r.getMessage() for r in log), [*map(str, log)]
    assert took < 2 + 5, took


def test_an_idle_open_session_costs_no_cpu(tmp_path: Path) -> None:
    """Both ends of a long-lived session wait, they do not poll (each step used to wake
    its own connection again)."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)

    async def scenario() -> float:
        served = Hub(a, "a")

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            streams = Streams(reader, writer, writer.close)
            await served.run(streams, responder(a, a.key), served.accept, False)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        hub = Hub(b, "b")
        streams = await tcp_streams("127.0.0.1", server.sockets[0].getsockname()[1])
        task = asyncio.create_task(hub.run(streams, initiator(b, b.key), hub.connect, False))
        await asyncio.sleep(1)  # both caught up: nothing left to say
        before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        await asyncio.sleep(2)
        spent = resource.getrusage(resource.RUSAGE_SELF).ru_utime - before
        task.cancel()
        server.close()
        return spent

    assert asyncio.run(scenario()) < 0.1


def test_a_device_busy_with_what_the_peer_sent_does_not_call_the_peer_unresponsive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new device ingesting 1,000,000 files' events spent longer than ``idle_s`` in
    its own work and closed the session: "peer unresponsive: nothing received for 60 s".
    Here b's ingest holds the one event loop both ends share for 5 × ``idle_s``: neither
    end may take its own (or the other's) busy time for the peer's silence."""
    a, b = make_devices(tmp_path, 2)
    sync(a, b)  # b learns the members
    for n in range(20):
        (a.root / f"f{n}.txt").write_text(str(n))
    a.scan()
    limits = Limits(keepalive_s=0.2, idle_s=0.5)
    ingest = Share.ingest

    def busy_ingest(self: Share, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self is b:
            time.sleep(5 * limits.idle_s)  # our own work, not the peer's silence
        return ingest(self, *args, **kwargs)

    monkeypatch.setattr(Share, "ingest", busy_ingest)

    async def scenario() -> Session:
        served = Hub(a, "a", limits)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            streams = Streams(reader, writer, writer.close)
            with contextlib.suppress(SessionClosed):
                await served.run(streams, responder(a, a.key), served.accept, False)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            hub = Hub(b, "b", limits)
            streams = await tcp_streams("127.0.0.1", server.sockets[0].getsockname()[1])
            return await hub.run(streams, initiator(b, b.key), hub.connect, True)
        finally:
            server.close()

    session = asyncio.run(scenario())
    assert session.complete
    assert {p.name for p in b.root.glob("f*.txt")} == {f"f{n}.txt" for n in range(20)}

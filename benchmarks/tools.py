"""The tools under test, each driven the same way: set up a full source ``a`` and an
empty target ``b``, then ``initial()`` and, after each mutation of ``a``, ``propagate()``.
Each step returns its wall time, bytes on the wire and the peak RSS of every process.

Only loopback is used. "In sync" is never assumed: the runner compares both trees by
path, size and SHA-256 after every step (and Syncthing's own events decide when to
stop its clock; see :class:`Syncthing`).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .measure import (
    PeakRss,
    Processes,
    cpu_seconds,
    free_port,
    run_measured,
    tree_listing,
    wait_for_port,
)

STEP_TIMEOUT_S = 1800


@dataclass
class Step:
    seconds: float
    wire_bytes: int | None  # None: the tool has no wire (two local roots)
    rss_mib: dict[str, float] = field(default_factory=dict)
    note: str = ""
    harness_cpu_pct: float = 0.0  # the benchmark's own CPU while timing (sampler, listeners)
    cpu_s: dict[str, float] = field(default_factory=dict)  # the tool's daemons, user + system
    cpu_system_s: dict[str, float] = field(default_factory=dict)  # of which in the kernel


class Tool:
    name = ""
    exclude: tuple[str, ...] = ()  # the tool's own metadata inside the synced roots

    def __init__(self, work: Path, source: Path, target: Path, processes: Processes) -> None:
        self.work, self.a, self.b, self.processes = work, source, target, processes

    def version(self) -> str:
        raise NotImplementedError

    def setup(self) -> None:
        """Untimed preparation (daemons, keys, the source's own index)."""

    def initial(self) -> Step:
        raise NotImplementedError

    def before_mutation(self, weak_hash: bool) -> None:
        """Settings for the next mutation, applied before the data changes."""

    def propagate(self) -> Step:
        raise NotImplementedError


def _number(text: str, label: str) -> int:
    found = re.search(re.escape(label) + r"[:\s]+([\d,]+)", text)
    if found is None:
        raise RuntimeError(f"no {label!r} in output: {text[-500:]}")
    return int(found.group(1).replace(",", ""))


def _wait_until_idle(pid: int) -> None:
    """Wait (bounded) until ``pid`` uses under 5 % of a core over a second: ``backer run``
    rescans its share and applies its retention policy as it starts, as Syncthing's
    setup waits for its folder's index to be idle; on 100,000 files that work otherwise
    ran during the initial sync, in its time and in the source's peak RSS."""
    deadline = time.monotonic() + STEP_TIMEOUT_S
    before = cpu_seconds(pid)[0]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_seconds(pid)[0]
        if now - before < 0.05:
            return
        before = now


def backer_env(home: Path) -> dict[str, str]:
    """The environment of a backer command: its own device home, and its bytecode
    written and used, as an installed backer's is. Where the environment forbids writing
    it (PYTHONDONTWRITEBYTECODE), every command compiled backer from source again, ~0.4 s
    of CPU per command inside the timing (the source's untimed ``init`` now writes it)."""
    env = {**os.environ, "BACKER_HOME": str(home)}
    env.pop("BACKER_DEBUG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class Backer(Tool):
    """``backer serve`` on ``a``; ``backer join`` then ``backer sync`` from ``b``."""

    name = "backer"
    exclude = (".backer",)

    def version(self) -> str:
        return subprocess.run(
            [*self._command, "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()

    @property
    def _command(self) -> list[str]:
        return [sys.executable, "-m", "backer"]

    def _env(self, side: str) -> dict[str, str]:
        return backer_env(self.work / f"backer-home-{side}")

    def setup(self) -> None:
        index = run_measured(self.processes, [*self._command, "init", str(self.a)], self._env("a"))
        self.index_seconds, self.index_rss = index.seconds, index.rss_mib
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.token = subprocess.run(
            [*self._command, "invite", "--no-wait", "--address", self.address,
             "--dir", str(self.a)],
            env=self._env("a"), capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        self.serve = self.processes.start(
            [*self._command, "run", "--listen", self.address, "--api", f"127.0.0.1:{free_port()}"],
            env=self._env("a"),
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port)
        _wait_until_idle(self.serve.pid)

    def _step(self, args: list[str]) -> Step:
        run = run_measured(
            self.processes, [*self._command, *args], self._env("b"), serve=self.serve.pid
        )
        rss = {"a (serve)": run.rss_mib["serve"], "b": run.rss_mib["command"]}
        return Step(run.seconds, self.wire_bytes(run.stdout), rss, "", run.harness_cpu_pct)

    @staticmethod
    def wire_bytes(out: str) -> int:
        """Bytes received and sent, from the summary ``join`` and ``sync`` print."""
        return _number(out, "wire bytes received") + int(out.rsplit("sent ", 1)[1].split()[0])

    def initial(self) -> Step:
        return self._step(["join", self.token, str(self.b)])

    def propagate(self) -> Step:
        return self._step(["sync", self.address, "--dir", str(self.b)])


class Rsync(Tool):
    """An rsync daemon serving ``a`` (so the delta algorithm runs); ``b`` pulls."""

    name = "rsync"
    options: tuple[str, ...] = ()  # more rsync options (``--fsync``: as durable as backer)

    def version(self) -> str:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0]

    def setup(self) -> None:
        self.port = free_port()
        config = self.work / "rsyncd.conf"
        config.write_text(
            f"port = {self.port}\naddress = 127.0.0.1\nuse chroot = false\n"
            f"uid = {os.getuid()}\ngid = {os.getgid()}\n"
            f"[data]\npath = {self.a}\nread only = true\n"
        )
        self.daemon = self.processes.start(
            ["rsync", "--daemon", "--no-detach", f"--config={config}"]
        )
        wait_for_port(self.port)

    def _step(self) -> Step:
        self.b.mkdir(exist_ok=True)
        url = f"rsync://127.0.0.1:{self.port}/data/"
        run = run_measured(
            self.processes,
            ["rsync", "-a", "--delete", "--stats", *self.options, url, f"{self.b}/"],
            daemon=self.daemon.pid,
        )
        wire = _number(run.stdout, "Total bytes sent") + _number(run.stdout, "Total bytes received")
        rss = {"a (daemon)": run.rss_mib["daemon"], "b": run.rss_mib["command"]}
        return Step(run.seconds, wire, rss, "", run.harness_cpu_pct)

    def initial(self) -> Step:
        return self._step()

    def propagate(self) -> Step:
        return self._step()


class Unison(Tool):
    """Two local roots, ``-batch -auto`` (no wire: Unison syncs local roots directly)."""

    name = "unison"

    def version(self) -> str:
        return subprocess.run(
            ["unison", "-version"], capture_output=True, text=True
        ).stdout.strip()

    def _step(self) -> Step:
        self.b.mkdir(exist_ok=True)
        home = self.work / "unison-home"
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home), "UNISON": str(home / ".unison")}
        args = ["unison", str(self.a), str(self.b), "-batch", "-auto", "-times", "-silent",
                "-confirmbigdel=false"]  # fmt: skip
        run = run_measured(self.processes, args, env)
        return Step(run.seconds, None, {"unison": run.rss_mib["command"]}, "", run.harness_cpu_pct)

    def initial(self) -> Step:
        return self._step()

    def propagate(self) -> Step:
        return self._step()


# -- Syncthing ------------------------------------------------------------------------------

FOLDER = "bench"
_OPTIONS = {
    "globalAnnounceEnabled": "false",
    "localAnnounceEnabled": "false",
    "relaysEnabled": "false",
    "natEnabled": "false",
    "startBrowser": "false",
    "urAccepted": "-1",
    "autoUpgradeIntervalH": "0",
    "crashReportingEnabled": "false",
    "setLowPriority": "false",
}


class _Rest:
    def __init__(self, port: int, key: str) -> None:
        self.base, self.key = f"http://127.0.0.1:{port}", key

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"X-API-Key": self.key}
        )
        with urllib.request.urlopen(request, timeout=STEP_TIMEOUT_S) as response:
            payload = response.read()
        return json.loads(payload) if payload.strip() else None

    def events(self, since: int, types: tuple[str, ...], timeout_s: int) -> list[dict[str, Any]]:
        """The events of ``types`` after id ``since``, waiting up to ``timeout_s`` for the
        first (a long poll: Syncthing is asked nothing while it works, unlike
        ``/rest/db/status``, which walks the folder's database at every call). Ids count
        per set of ``types``, and Syncthing keeps a set's events only from its first request
        on: ask once with ``timeout_s`` 0 before the events of interest can happen."""
        query = f"/rest/events?events={','.join(types)}&since={since}&timeout={timeout_s}"
        return self.call("GET", query) or []


class _Instance:
    """One headless Syncthing with its own home, GUI/REST and listen port on 127.0.0.1."""

    def __init__(self, home: Path, processes: Processes) -> None:
        self.home = home
        self.gui_port, self.listen_port = free_port(), free_port()
        self.rest = _Rest(self.gui_port, f"bench-{self.gui_port}")
        subprocess.run(
            ["syncthing", "generate", f"--home={home}", "--no-default-folder",
             "--skip-port-probing"],
            capture_output=True, check=True,
        )  # fmt: skip
        config = (home / "config.xml").read_text()
        gui = f"<address>127.0.0.1:{self.gui_port}</address>\n<apikey>{self.rest.key}</apikey>"
        config = re.sub(r"<address>[^<]*</address>\s*<apikey>[^<]*</apikey>", gui, config)
        settings = {**_OPTIONS, "listenAddress": f"tcp://127.0.0.1:{self.listen_port}"}
        for tag, value in settings.items():  # all set before the first start
            config, count = re.subn(f"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>", config)
            if count != 1:
                raise RuntimeError(f"Syncthing config has {count} <{tag}> elements")
        (home / "config.xml").write_text(config)
        self.processes = processes
        self.start()

    def start(self) -> None:
        """Start the daemon (again, after :meth:`stop`) and wait until REST answers."""
        self.process = self.processes.start(
            ["syncthing", "serve", f"--home={self.home}", "--no-browser", "--no-restart",
             "--no-upgrade"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "STNODEFAULTFOLDER": "1"},
        )  # fmt: skip
        wait_for_port(self.gui_port)
        self.id = self._until(lambda: self.rest.call("GET", "/rest/system/status")["myID"])

    def stop(self) -> None:
        """A clean stop (SIGTERM, by PID)."""
        self.processes.stop(self.process)

    @staticmethod
    def _until(probe: Any, seconds: float = 60) -> Any:
        deadline = time.monotonic() + seconds
        while True:
            try:
                result = probe()
                if result:
                    return result
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Syncthing did not get there in time")
            time.sleep(0.05)

    def add_device(self, other: _Instance) -> None:
        device = self.rest.call("GET", "/rest/config/defaults/device")
        device.update(
            deviceID=other.id, name=other.home.name,
            addresses=[f"tcp://127.0.0.1:{other.listen_port}"],
        )  # fmt: skip
        self.rest.call("PUT", f"/rest/config/devices/{other.id}", device)

    def add_folder(self, path: Path, peer: _Instance | None) -> None:
        """The benchmark folder, shared with ``peer`` (none: this device alone), watched
        with the shortest delay Syncthing allows (``fsWatcherDelayS`` 1)."""
        folder = self.rest.call("GET", "/rest/config/defaults/folder")
        devices = [{"deviceID": self.id}] + ([] if peer is None else [{"deviceID": peer.id}])
        folder.update(
            id=FOLDER, label=FOLDER, path=str(path), type="sendreceive", devices=devices,
            fsWatcherEnabled=True, fsWatcherDelayS=1, rescanIntervalS=3600,
        )  # fmt: skip
        self.rest.call("PUT", f"/rest/config/folders/{FOLDER}", folder)

    def status(self) -> dict[str, Any]:
        return self.rest.call("GET", f"/rest/db/status?folder={FOLDER}")

    def wire_bytes(self, peer: _Instance) -> int:
        connection = self.rest.call("GET", "/rest/system/connections")["connections"][peer.id]
        return int(connection["inBytesTotal"]) + int(connection["outBytesTotal"])


def syncthing_pair(work: Path, processes: Processes) -> tuple[_Instance, _Instance]:
    """Two instances (homes ``work/st-a``, ``work/st-b``) that know each other, connected."""
    one = _Instance(work / "st-a", processes)
    two = _Instance(work / "st-b", processes)
    one.add_device(two)
    two.add_device(one)
    _Instance._until(
        lambda: two.rest.call("GET", "/rest/system/connections")["connections"][one.id][
            "connected"
        ]
    )
    return one, two


def event_time(stamp: str) -> float:
    """Syncthing's event time (RFC 3339 with up to nanoseconds) as Unix seconds."""
    found = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    if found is None:
        raise ValueError(f"not an RFC 3339 time: {stamp!r}")
    whole, fraction, zone = found.groups()
    seconds = datetime.fromisoformat(whole + zone.replace("Z", "+00:00")).timestamp()
    return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


COMPLETION_EVENTS = ("StateChanged", "FolderSummary", "FolderCompletion")
PULLING = ("sync-waiting", "sync-preparing", "syncing")  # a folder's states while it pulls


class Completion:
    """Whether a step is done, from both instances' events alone: ``a`` idle at a
    sequence past ``sequence_before`` (it rescanned), ``b`` idle after a pull with
    nothing needed, and ``a`` rating ``b`` 100 % complete after ``a``'s last sequence.

    ``finished_at`` is Syncthing's own time of ``b``'s last pull ending (a ``PULLING``
    state → ``idle``): the files are in place then. The summaries that confirm it come later
    (Syncthing computes them at most every 2 s), and the moment the benchmark reads an
    event depends on the benchmark, so neither stops the clock."""

    def __init__(self, folder: str, b_id: str, sequence_before: int) -> None:
        self.folder, self.b_id, self.sequence_before = folder, b_id, sequence_before
        self.a_sequence, self.a_idle, self.b_complete_on_a = -1, False, False
        self.b_idle, self.b_needs_nothing = False, False
        self.finished_at: float | None = None

    def feed(self, side: str, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if data.get("folder") != self.folder:
            return
        kind = event.get("type")
        if kind == "StateChanged":
            idle = data["to"] == "idle"
            if side == "a":
                self.a_idle = idle
                return
            self.b_idle = idle
            if data["to"] in PULLING:  # needs what the summary after the pull will say
                self.b_needs_nothing = False
            if idle and data["from"] in PULLING:
                self.finished_at = event_time(event["time"])
        elif kind == "FolderSummary":
            summary = data["summary"]
            if side == "a":
                if summary["sequence"] != self.a_sequence:
                    self.b_complete_on_a = False  # rated against an older index
                self.a_sequence, self.a_idle = summary["sequence"], summary["state"] == "idle"
            else:
                self.b_idle = summary["state"] == "idle"
                self.b_needs_nothing = summary["needTotalItems"] == 0 and summary["needBytes"] == 0
        elif kind == "FolderCompletion" and side == "a" and data.get("device") == self.b_id:
            self.b_complete_on_a = data["completion"] >= 100 and data.get("needItems", 0) == 0

    @property
    def done(self) -> bool:
        return (
            self.a_sequence > self.sequence_before and self.a_idle and self.b_complete_on_a
            and self.b_idle and self.b_needs_nothing and self.finished_at is not None
        )  # fmt: skip


class _Listener(threading.Thread):
    """Long-polls one instance's completion events into a queue, ``(side, event)``."""

    WAIT_S = 1  # how long one poll waits when nothing happens (also the stop delay)

    def __init__(self, side: str, rest: _Rest, into: queue.Queue[tuple[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.side, self.rest, self.into = side, rest, into
        events = rest.events(0, COMPLETION_EVENTS, 0)  # also starts Syncthing's buffer
        self.since = max((e["id"] for e in events), default=0)
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                events = self.rest.events(self.since, COMPLETION_EVENTS, self.WAIT_S)
            except OSError:  # a poll failed: ask again
                time.sleep(0.1)
                continue
            for event in events:
                self.since = max(self.since, event["id"])
                self.into.put((self.side, event))

    def stop(self) -> None:
        self.running = False
        self.join()


class Syncthing(Tool):
    """Two headless instances; the folder is shared once ``a`` has indexed it, so its
    initial time, like backer's, starts from an indexed source. Mutations are announced
    with a REST rescan of ``a`` at once (no watcher delay counted against it). While a
    step is timed the harness only long-polls both instances' events (see
    :class:`Completion` for the rule and the time that stops the clock); once they say
    done, ``/rest/db/status`` of both, ``a``'s completion of ``b`` and a listing of both
    trees confirm it, off the clock (if not, it waits for further events)."""

    name = "syncthing"
    exclude = (".stfolder", ".stversions")
    QUIET_S = 10.0  # no event for this long: confirm anyway (a summary may never come)

    def version(self) -> str:
        out = subprocess.run(["syncthing", "--version"], capture_output=True, text=True).stdout
        return " ".join(out.split()[:2])

    def setup(self) -> None:
        self.weak_hash = True
        self.one, self.two = syncthing_pair(self.work, self.processes)
        files = len(tree_listing(self.a))
        self.one.add_folder(self.a, self.two)
        _Instance._until(
            lambda: (s := self.one.status())["state"] == "idle" and s["localFiles"] == files,
            STEP_TIMEOUT_S,
        )

    def _in_sync(self, sequence_before: int) -> bool:
        """Syncthing's own view over REST, asked once a step looks done; then the trees."""
        one, two = self.one.status(), self.two.status()
        if one["state"] != "idle" or one["sequence"] <= sequence_before:
            return False
        if two["state"] != "idle" or two["needTotalItems"] != 0:
            return False
        completion = self.one.rest.call(
            "GET", f"/rest/db/completion?folder={FOLDER}&device={self.two.id}"
        )
        if completion["completion"] < 100:
            return False
        return tree_listing(self.a, self.exclude) == tree_listing(self.b, self.exclude)

    def _measure(self, start: Any, sequence_before: int) -> Step:
        """Time ``start()`` until the event that completed the step (:class:`Completion`)."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        listeners = [_Listener("a", self.one.rest, events), _Listener("b", self.two.rest, events)]
        pids = {"a": self.one.process.pid, "b": self.two.process.pid}
        sampler = PeakRss(pids)
        wire_before = self.two.wire_bytes(self.one)
        cpu_before = {side: cpu_seconds(pid) for side, pid in pids.items()}
        completion = Completion(FOLDER, self.two.id, sequence_before)
        for listener in listeners:
            listener.start()
        sampler.start()
        started_at, cpu = time.time(), time.process_time()
        start()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            try:
                completion.feed(*events.get(timeout=self.QUIET_S))
                quiet = False
            except queue.Empty:
                quiet = True
            if (completion.done or quiet) and completion.finished_at is not None:
                checked_at, harness_cpu = time.time(), time.process_time() - cpu
                used = {side: cpu_seconds(pid) for side, pid in pids.items()}
                with contextlib.suppress(OSError):
                    if self._in_sync(sequence_before):
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Syncthing not in sync after {STEP_TIMEOUT_S} s")
        for listener in listeners:
            listener.stop()
        while not events.empty():  # a pull that ended before the confirmation began
            side, event = events.get()
            if event_time(event["time"]) <= checked_at:
                completion.feed(side, event)
        rss = sampler.stop()
        wire = self.two.wire_bytes(self.one) - wire_before
        harness = 100 * harness_cpu / (checked_at - started_at)
        seconds = completion.finished_at - started_at
        total = {side: used[side][0] - cpu_before[side][0] for side in pids}
        system = {side: used[side][1] - cpu_before[side][1] for side in pids}
        return Step(seconds, wire, rss, "", harness, total, system)

    def initial(self) -> Step:
        self.b.mkdir(exist_ok=True)
        return self._measure(lambda: self.two.add_folder(self.b, self.one), -1)

    def before_mutation(self, weak_hash: bool) -> None:
        if weak_hash == self.weak_hash:
            return
        for instance in (self.one, self.two):  # 25 % is the default; over 100 is never
            threshold = 25 if weak_hash else 101
            instance.rest.call(
                "PATCH", f"/rest/config/folders/{FOLDER}", {"weakHashThresholdPct": threshold}
            )
        self.weak_hash = weak_hash
        for instance in (self.one, self.two):  # the folder restarts: let it settle
            _Instance._until(lambda i=instance: i.status()["state"] == "idle")

    def propagate(self) -> Step:
        sequence = self.one.status()["sequence"]

        def rescan() -> None:
            self.one.rest.call("POST", f"/rest/db/scan?folder={FOLDER}")

        step = self._measure(rescan, sequence)
        step.note = "" if self.weak_hash else "weak hash off"
        return step


TOOLS: dict[str, type[Tool]] = {
    "backer": Backer,
    "syncthing": Syncthing,
    "rsync": Rsync,
    "unison": Unison,
}
PACKAGES = {"syncthing": "syncthing", "rsync": "rsync", "unison": "unison"}


def available(name: str) -> bool:
    return name == "backer" or shutil.which(name) is not None

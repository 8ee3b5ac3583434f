"""Network namespaces for tests that need a real LAN: two namespaces joined by a veth pair
(10.231.N.1/24 and 10.231.N.2/24), or one with loopback alone. Root and ``ip`` are needed;
without them the test is skipped. Everything made here is deleted when the test ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and the ip command",
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def in_ns(namespace: str, *command: str) -> list[str]:
    """``command`` run inside ``namespace``."""
    return ["ip", "netns", "exec", namespace, *command]


@contextlib.contextmanager
def namespaces(count: int, tag: str) -> Iterator[list[str]]:
    """``count`` (1 or 2) namespaces, loopback up; two are joined by a veth pair with
    10.231.<n>.1/24 and .2/24 (``n`` from ``tag``). Namespace names are global to the
    machine, so they carry this process's id: parallel test workers, another run of the
    suite at the same time and a namespace left behind by a killed run never collide.
    Interface names and addresses live inside the namespaces and need no such care."""
    subnet = 1 + sum(tag.encode()) % 250
    names = [f"bk-{tag}-{os.getpid()}-{index}" for index in range(count)]
    made: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        if count == 2:
            veth = (f"bkv{subnet}a", f"bkv{subnet}b")
            _ip(
                "link",
                "add",
                veth[0],
                "netns",
                names[0],
                "type",
                "veth",
                "peer",
                "name",
                veth[1],
                "netns",
                names[1],
            )
            for index, (name, device) in enumerate(zip(names, veth, strict=True), 1):
                _ip("-n", name, "addr", "add", f"10.231.{subnet}.{index}/24", "dev", device)
                _ip("-n", name, "link", "set", device, "up")
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def subnet_of(names: list[str]) -> str:
    """The ``10.231.<n>`` prefix of namespaces made by :func:`namespaces`."""
    tag = names[0].removeprefix("bk-").rsplit("-", 2)[0]
    return f"10.231.{1 + sum(tag.encode()) % 250}"

"""One LAN discovery participant as a process (run inside a network namespace by
tests/test_discovery.py): announce one share until stdin closes (at most ``--seconds``),
print each device found as a JSON line, then a summary. With ``--sniff``, be a
non-member instead: keep every datagram heard on the port until stdin closes and
``--least`` were heard (or ``--seconds`` passed), and print them (hex) at the end.

The test ends them when it has what it waits for, not after a fixed time: on a loaded
machine a process may start, or be scheduled, seconds late."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import sys
import time

from backer.discover.lan import LanDiscovery, LanShare


async def member(args: argparse.Namespace) -> None:
    share = LanShare(
        bytes.fromhex(args.share_id),
        (bytes.fromhex(args.key),),
        bytes.fromhex(args.device),
        args.tcp_port,
    )

    def found(share_id: bytes, device: bytes, addresses: list[tuple[str, int]]) -> None:
        line = {"share": share_id.hex(), "device": device.hex(), "addresses": addresses}
        print(json.dumps(line), flush=True)

    closed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            closed.set()

    loop.add_reader(sys.stdin.fileno(), readable)
    async with LanDiscovery(args.port, lambda: [share], found, interval=args.interval) as lan:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), args.seconds)
    print(json.dumps({"sent": lan.sent, "heard": lan.heard}), flush=True)


def sniff(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", args.port))
    heard: list[str] = []
    closed = False
    end = time.monotonic() + args.seconds
    while time.monotonic() < end and len(heard) < 1000:
        if closed and len(heard) >= args.least:
            break
        ready, _, _ = select.select([sock] if closed else [sock, sys.stdin], [], [], 0.2)
        if sock in ready:
            heard.append(sock.recv(2048).hex())
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 4096):
            closed = True
    print(json.dumps({"datagrams": heard}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--sniff", action="store_true")
    parser.add_argument("--share-id", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--device", default="")
    parser.add_argument("--tcp-port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.3)
    parser.add_argument("--least", type=int, default=0)
    options = parser.parse_args()
    if options.sniff:
        sniff(options)
    else:
        asyncio.run(member(options))

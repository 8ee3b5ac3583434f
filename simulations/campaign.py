"""Seeded random walks over the state machine's rules, and shrinking of failures."""

from __future__ import annotations

import random
import re
from typing import Any

from .machine import CONTENTS, DIRS, FILES, ClusterMachine


class Failure(Exception):
    def __init__(self, reason: str, steps: list[tuple[str, dict[str, Any]]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.steps = steps


def _random_step(rnd: random.Random, nodes: int) -> tuple[str, dict[str, Any]]:
    node = rnd.randrange(nodes)
    paths = FILES + DIRS
    choice = rnd.choices(
        [
            "write",
            "append",
            "truncate",
            "delete",
            "rename",
            "mkdir",
            "symlink",
            "toggle_exec",
            "sync",
            "crash",
            "connect",
            "deliver",
            "disconnect",
            "scan",
            "backup",
            "restore",
        ],
        weights=[25, 6, 3, 8, 6, 4, 2, 2, 22, 3, 4, 14, 2, 3, 2, 1],
    )[0]
    if choice == "write":
        data = rnd.choice(CONTENTS) if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(300))
        return choice, {"node": node, "path": rnd.choice(FILES), "data": data}
    if choice == "append":
        return choice, {
            "node": node,
            "path": rnd.choice(FILES),
            "data": rnd.randbytes(rnd.randrange(1, 100)),
        }
    if choice in ("truncate", "toggle_exec"):
        return choice, {"node": node, "path": rnd.choice(FILES)}
    if choice == "delete":
        return choice, {"node": node, "path": rnd.choice(paths)}
    if choice == "rename":
        return choice, {"node": node, "source": rnd.choice(paths), "destination": rnd.choice(paths)}
    if choice == "mkdir":
        return choice, {"node": node, "path": rnd.choice(DIRS)}
    if choice == "symlink":
        return choice, {
            "node": node,
            "path": rnd.choice(FILES),
            "link": rnd.choice(["f", "../g", "a/c"]),
        }
    if choice == "sync":
        cut = rnd.randrange(1, 30) if rnd.random() < 0.2 else None
        return choice, {"a": node, "b": rnd.randrange(nodes), "cut": cut}
    if choice in ("connect", "disconnect"):
        return choice, {"a": node, "b": rnd.randrange(nodes)}
    if choice == "deliver":
        return choice, {"a": node, "b": rnd.randrange(nodes), "count": rnd.randrange(1, 40)}
    return choice, {"node": node}


def replay(
    nodes: int, steps: list[tuple[str, dict[str, Any]]], seed: int = 0
) -> ClusterMachine:
    """Run ``steps`` then the quiescence checks; raise Failure if anything breaks."""
    machine = ClusterMachine(nodes, seed)
    done: list[tuple[str, dict[str, Any]]] = []
    try:
        for name, arguments in steps:
            done.append((name, arguments))
            getattr(machine, name)(**arguments)
            machine.no_stray_temp_files()
    except Exception as exc:
        machine.abandon()
        raise Failure(f"{type(exc).__name__}: {exc}", done) from exc
    try:
        machine.teardown()
    except Exception as exc:
        raise Failure(f"{type(exc).__name__}: {exc}", done) from exc
    return machine


def run_seed(seed: int, nodes: int, count: int) -> dict[str, int]:
    rnd = random.Random(seed)
    steps = [_random_step(rnd, nodes) for _ in range(count)]
    machine = replay(nodes, steps, seed)
    return {
        "fingerprint": machine.fingerprint,
        "steps": count,
        "syncs": machine.stats["syncs"],
        "cuts": machine.stats["cuts"],
        "crashes": machine.stats["crashes"],
        "restores": machine.stats["restores"],
        "conflicts": machine.stats["conflicts"],
        "bytes": machine.stats["bytes"],
    }


def _kind(reason: str) -> str:
    """A failure without its particulars (nodes, ids, paths, numbers)."""
    return re.sub(r"node\d+|'[^']*'|\S*\d\S*", "", reason)


def shrink(
    seed: int, nodes: int, steps: list[tuple[str, dict[str, Any]]], budget: int = 150
) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """Drop steps one at a time while it still fails the same way (bounded by ``budget``
    replays); return the shorter list and the failure it produces."""
    current, reason = list(steps), ""
    try:
        replay(nodes, current, seed)
    except Failure as failure:
        reason = failure.reason
    kind = _kind(reason)
    index = 0
    while index < len(current) and budget > 0:
        candidate = current[:index] + current[index + 1 :]
        budget -= 1
        try:
            replay(nodes, candidate, seed)
        except Failure as failure:
            if _kind(failure.reason) == kind:
                current, reason = candidate, failure.reason
                continue
        index += 1
    return current, reason

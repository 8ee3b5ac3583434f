"""Seeded random walks over the state machine's rules, and shrinking of failures."""

from __future__ import annotations

import random
import re
from typing import Any

from backer.versioner.retention import MINUTE

from .clocks import CORRECTED, OFFSETS
from .hostile import CRAFTS
from .machine import (
    CAPS,
    CLASSIC,
    DEEP_MOST,
    DEEP_OPS,
    DIRS,
    DISK_BUDGETS,
    FAULT_RATES,
    KILLED_IN,
    PATTERNS,
    RESOLUTIONS,
    UNSEEN,
    WAITS,
    ClusterMachine,
    world_contents,
    world_files,
)

RULES = [
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
]
WEIGHTS = [25, 6, 3, 8, 6, 4, 2, 2, 22, 3, 4, 14, 2, 3, 2, 1]
WORLD_RULES = {  # family: (rule, weight)
    "ignore": [("ignore", 4)],
    "faults": [("faults", 3), ("faults_stop", 3)],
    "disk": [("disk_full", 2), ("disk_freed", 2)],
    "fills": [("disk_fills", 2)],
    "retention": [("prune", 5), ("cap", 2)],
    "revisions": [("restore_version", 5), ("restore_at", 3), ("resolve", 6)],
    "hostile": [("craft", 6)],
    "deep": [("deep", 1)],
    "resident": [("race", 4), ("stop", 1), ("start", 2), ("connect", 4), ("deliver", 10)],
    "clocks": [("set_clock", 2), ("reboot", 2), ("prune_all", 2)],
    "kills": [("kill", 5)],
    "unseen": [("unseen", 4)],
}
EDITS = frozenset({"write", "append", "truncate", "delete", "rename", "mkdir", "symlink",
                   "toggle_exec", "ignore", "race", "deep"})  # fmt: skip
WATCHER_FIRES = 0.6  # resident: how often the watcher scans right after an edit


class Failure(Exception):
    def __init__(self, reason: str, steps: list[tuple[str, dict[str, Any]]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.steps = steps


def _random_steps(
    rnd: random.Random, nodes: int, world: frozenset[str] = CLASSIC
) -> list[tuple[str, dict[str, Any]]]:
    """One step; with resident nodes, an edit is often followed by its node's watcher
    firing (a scan while its links go on delivering)."""
    name, arguments = step = _random_step(rnd, nodes, world)
    if "resident" not in world:
        return [step]
    if name == "scan":
        arguments["during"] = rnd.randrange(0, 30)
    if name in EDITS and rnd.random() < WATCHER_FIRES:
        return [step, ("scan", {"node": arguments["node"], "during": rnd.randrange(0, 30)})]
    return [step]


def _random_step(
    rnd: random.Random, nodes: int, world: frozenset[str] = CLASSIC
) -> tuple[str, dict[str, Any]]:
    node = rnd.randrange(nodes)
    files, contents = world_files(world), world_contents(world)
    paths = files + DIRS
    rules, weights = list(RULES), list(WEIGHTS)
    for family, extra in WORLD_RULES.items():
        if family in world:
            rules += [rule for rule, _ in extra]
            weights += [weight for _, weight in extra]
    choice = rnd.choices(rules, weights=weights)[0]
    if choice == "write":
        data = rnd.choice(contents) if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(300))
        return choice, {"node": node, "path": rnd.choice(files), "data": data}
    if choice == "append":
        return choice, {
            "node": node,
            "path": rnd.choice(files),
            "data": rnd.randbytes(rnd.randrange(1, 100)),
        }
    if choice in ("truncate", "toggle_exec"):
        return choice, {"node": node, "path": rnd.choice(files)}
    if choice == "delete":
        return choice, {"node": node, "path": rnd.choice(paths)}
    if choice == "rename":
        return choice, {"node": node, "source": rnd.choice(paths), "destination": rnd.choice(paths)}
    if choice == "mkdir":
        return choice, {"node": node, "path": rnd.choice(DIRS)}
    if choice == "symlink":
        return choice, {
            "node": node,
            "path": rnd.choice(files),
            "link": rnd.choice(["f", "../g", "a/c"]),
        }
    if choice == "ignore":
        return choice, {"node": node, "pattern": rnd.choice(PATTERNS), "add": rnd.random() < 0.6}
    if choice == "faults":
        return choice, {"node": node, "seed": rnd.getrandbits(32), "rate": rnd.choice(FAULT_RATES)}
    if choice == "disk_full":
        return choice, {"node": node, "budget": rnd.choice(DISK_BUDGETS)}
    if choice == "disk_fills":
        budget, limit = rnd.choice(DISK_BUDGETS), rnd.randrange(1, 60)
        return choice, {"node": node, "budget": budget, "limit": limit}
    if choice == "sync":
        cut = rnd.randrange(1, 30) if rnd.random() < 0.2 else None
        return choice, {"a": node, "b": rnd.randrange(nodes), "cut": cut}
    if choice in ("connect", "disconnect"):
        return choice, {"a": node, "b": rnd.randrange(nodes)}
    if choice == "deliver":
        return choice, {"a": node, "b": rnd.randrange(nodes), "count": rnd.randrange(1, 40)}
    if choice == "prune":
        return choice, {"node": node, "wait": rnd.choice(WAITS) + rnd.randrange(MINUTE)}
    if choice in ("restore_version", "restore_at"):
        where = rnd.choice(paths) if choice == "restore_version" else rnd.choice(["", *DIRS])
        return choice, {"node": node, "path": where, "pick": rnd.randrange(100)}
    if choice == "resolve":
        return choice, {"node": node, "pick": rnd.randrange(100), "how": rnd.choice(RESOLUTIONS)}
    if choice in ("set_clock", "reboot"):
        corrected = choice == "reboot" and rnd.random() < 0.5  # NTP sets it right at boot
        return choice, {"node": node, "offset": CORRECTED if corrected else rnd.choice(OFFSETS)}
    if choice == "cap":
        return choice, {"node": node, "percent": rnd.choice(CAPS)}
    if choice == "deep":
        data = rnd.choice(contents) if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(300))
        op, level = rnd.choice(DEEP_OPS), rnd.randrange(DEEP_MOST + 1)
        return choice, {"node": node, "op": op, "level": level, "data": data}
    if choice == "kill":
        nth = rnd.randrange(1, 7) if rnd.random() < 0.7 else rnd.randrange(7, 41)
        return choice, {
            "node": node,
            "op": rnd.choice(KILLED_IN),
            "nth": nth,
            "other": rnd.randrange(nodes),
            "pick": rnd.randrange(100),
        }
    if choice == "unseen":
        data = rnd.choice(contents) if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(300))
        return choice, {
            "node": node,
            "path": rnd.choice(files),
            "kind": rnd.choice(UNSEEN),
            "data": data,
        }
    if choice == "craft":
        return choice, {"kind": rnd.choice(CRAFTS), "pick": rnd.randrange(100)}
    if choice == "race":
        data = rnd.choice(contents) if rnd.random() < 0.5 else rnd.randbytes(rnd.randrange(300))
        path = rnd.choice(files)
        return choice, {"node": node, "path": path, "data": data, "limit": rnd.randrange(1, 60)}
    return choice, {"node": node}


def replay(
    nodes: int,
    steps: list[tuple[str, dict[str, Any]]],
    seed: int = 0,
    world: frozenset[str] = CLASSIC,
) -> ClusterMachine:
    """Run ``steps`` then the quiescence checks; raise Failure if anything breaks."""
    machine = ClusterMachine(nodes, seed, world)
    done: list[tuple[str, dict[str, Any]]] = []
    try:
        for name, arguments in steps:
            done.append((name, arguments))
            getattr(machine, name)(**arguments)
            machine.no_stray_temp_files()
            machine.no_saved_file_replaced()
    except Exception as exc:
        machine.abandon()
        raise Failure(f"{type(exc).__name__}: {exc}", done) from exc
    try:
        machine.teardown()
        machine.no_saved_file_replaced()  # (also while the network healed)
    except Exception as exc:
        raise Failure(f"{type(exc).__name__}: {exc}", done) from exc
    return machine


def run_seed(seed: int, nodes: int, count: int, world: frozenset[str] = CLASSIC) -> dict[str, int]:
    rnd = random.Random(seed)
    steps: list[tuple[str, dict[str, Any]]] = []
    while len(steps) < count:
        steps += _random_steps(rnd, nodes, world)
    machine = replay(nodes, steps[:count], seed, world)
    hostile = machine.cluster.hostile
    return {
        "fingerprint": machine.fingerprint,
        "steps": count,
        "syncs": machine.stats["syncs"],
        "cuts": machine.stats["cuts"],
        "crashes": machine.stats["crashes"],
        "kills": machine.stats["kills"],
        "restores": machine.stats["restores"],
        "stops": machine.stats["stops"],
        "races": machine.stats["races"],
        "conflicts": machine.stats["conflicts"],
        "bytes": machine.stats["bytes"],
        "faults": sum(machine.cluster.disks.injected.values()),
        "aborts": machine.cluster.aborts,
        "prunes": machine.stats["prunes"],
        "pruned_versions": machine.stats["pruned_versions"],
        "pruned_bytes": machine.stats["pruned_bytes"],
        "revised": machine.stats["revised"],
        "refused": machine.stats["refused"],
        "crafted": hostile.crafts if hostile else 0,
        "hostile_refusals": sum(hostile.refusals.values()) if hostile else 0,
        "hostile_crashes": hostile.crashes if hostile else 0,
        "reasons": dict(hostile.refusals) if hostile else {},
    }


def _kind(reason: str) -> str:
    """A failure without its particulars (nodes, ids, paths, numbers)."""
    return re.sub(r"node\d+|'[^']*'|\S*\d\S*", "", reason)


def shrink(
    seed: int,
    nodes: int,
    steps: list[tuple[str, dict[str, Any]]],
    budget: int = 150,
    world: frozenset[str] = CLASSIC,
) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """Drop runs of steps (halves, quarters, … single steps) while it still fails the
    same way (bounded by ``budget`` replays); return the shorter list and the failure
    it produces."""
    current, reason = list(steps), ""
    try:
        replay(nodes, current, seed, world)
    except Failure as failure:
        reason = failure.reason
    kind = _kind(reason)
    size = max(1, len(current) // 2)
    while budget > 0:
        index = 0
        while index < len(current) and budget > 0:
            candidate = current[:index] + current[index + size :]
            budget -= 1
            try:
                replay(nodes, candidate, seed, world)
            except Failure as failure:
                if _kind(failure.reason) == kind:
                    current, reason = candidate, failure.reason
                    continue
            index += size
        if size == 1:
            break
        size //= 2
    return current, reason

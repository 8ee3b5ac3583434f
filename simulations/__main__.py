"""Campaign runner: ``python -m simulations run --nodes 5 --seeds 1000 --steps 200``.

Each seed drives the same rules as the hypothesis state machine through a seeded random
walk, so a seed always replays the same trace. On a failure it prints the seed and a
shrunk list of steps that still reproduces it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from .campaign import Failure, run_seed, shrink
from .machine import ALL, DEFAULT_WORLD, FAMILIES


def world_of(text: str) -> frozenset[str]:
    """``all``, ``classic`` (none), or families separated by commas."""
    if text == "all":
        return ALL
    names = frozenset(n for n in text.split(",") if n and n != "classic")
    unknown = names - ALL
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown families {sorted(unknown)}; known: {sorted(ALL)}"
        )
    return names


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a randomized campaign")
    run.add_argument("--nodes", type=int, default=3)
    run.add_argument("--seeds", type=int, default=100)
    run.add_argument("--steps", type=int, default=100)
    run.add_argument("--first-seed", type=int, default=0)
    run.add_argument(
        "--max-seconds", type=float, default=None, help="stop starting new seeds after this"
    )
    run.add_argument("--no-shrink", action="store_true", help="report failing seeds, unshrunk")
    run.add_argument("--max-failures", type=int, default=None, help="stop after this many")
    run.add_argument(
        "--world",
        type=world_of,
        default=DEFAULT_WORLD,
        help="real-world families: 'all', 'classic' (none) or a comma list of "
        + ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
        + f"; default {','.join(sorted(DEFAULT_WORLD)) or 'classic'}",
    )
    args = parser.parse_args()
    started = time.monotonic()
    totals = {
        "scenarios": 0,
        "steps": 0,
        "syncs": 0,
        "cuts": 0,
        "crashes": 0,
        "kills": 0,
        "restores": 0,
        "stops": 0,
        "races": 0,
        "conflicts": 0,
        "bytes": 0,
        "faults": 0,
        "aborts": 0,
        "prunes": 0,
        "pruned_versions": 0,
        "pruned_bytes": 0,
        "revised": 0,
        "refused": 0,
        "crafted": 0,
        "hostile_refusals": 0,
        "hostile_crashes": 0,
    }
    reasons: Counter[str] = Counter()
    failures = 0
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if args.max_seconds and time.monotonic() - started > args.max_seconds:
            break
        if args.max_failures is not None and failures >= args.max_failures:
            break
        try:
            stats = run_seed(seed, args.nodes, args.steps, args.world)
        except Failure as failure:
            failures += 1
            print(f"FAIL seed={seed}: {failure.reason}", flush=True)
            if args.no_shrink:
                continue
            steps, reason = shrink(seed, args.nodes, failure.steps, world=args.world)
            print(f"  shrunk failure: {reason}", flush=True)
            print(f"  reproduce with {len(steps)} steps:", flush=True)
            for name, arguments in steps:
                shown = {
                    k: (v[:24] + b"..." if isinstance(v, bytes) and len(v) > 24 else v)
                    for k, v in arguments.items()
                }
                print(f"    {name} {shown}", flush=True)
            continue
        totals["scenarios"] += 1
        for key in totals.keys() - {"scenarios"}:
            totals[key] += stats[key]
        reasons.update(stats["reasons"])
    elapsed = time.monotonic() - started
    print(
        f"{totals['scenarios'] + failures} scenarios ({args.nodes} nodes), "
        f"{totals['steps']} steps, "
        f"{totals['syncs']} syncs ({totals['cuts']} cut mid-way), {totals['crashes']} crashes, "
        f"{totals['kills']} killed inside an operation, "
        f"{totals['restores']} restores from old backups, {totals['stops']} stops, "
        f"{totals['races']} edits while applying, "
        f"{totals['conflicts']} conflicts resolved, {totals['bytes']} bytes on the wire, "
        f"{totals['faults']} disk faults injected ({totals['aborts']} ended a process), "
        f"{totals['prunes']} prunes ({totals['pruned_versions']} versions' bytes, "
        f"{totals['pruned_bytes']} bytes freed), "
        f"{totals['revised']} restores and resolutions ({totals['refused']} refused), "
        f"{failures} failures, {elapsed:.0f} s"
    )
    if "hostile" in args.world:
        print(
            f"hostile member: {totals['crafted']} crafted changes, "
            f"{totals['hostile_refusals']} sessions refused by honest nodes, "
            f"{totals['hostile_crashes']} crashes of its own client"
        )
        for reason, count in reasons.most_common():
            print(f"  refused {count}x: {reason}")
    print(f"world: {','.join(sorted(args.world)) or 'classic'}")
    print(f"simulations: {totals['scenarios']} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""backer against Syncthing, rsync and Unison on the same data, in one run.

    python -m benchmarks [--profiles small,large,mixed,many] [--tools backer,syncthing,rsync,unison]
                         [--seed 1] [--workdir DIR] [--json FILE] [--no-install]

Installs missing anchors from Debian's packages (``apt-get``, when run as root), then per
profile: builds the seeded dataset once; for every tool copies it to a fresh source,
times the initial sync into an empty target and then each mutation's propagation,
recording bytes on the wire and peak RSS of every process; after every step compares
both trees by path, size and SHA-256 (off the clock). Prints a Markdown report with
backer/anchor ratios, the benchmark's own CPU while timing (so that a reader sees it
took nothing from the tools), and the machine's physical limits measured in the same
run. Every process is stopped by its PID and the work directory removed at the end,
also on Ctrl-C or SIGTERM.

A million files (the ``huge`` profile) and the scaling from 10,000 files up have their
own steps: ``python -m benchmarks.huge``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from . import limits
from .datasets import PROFILES, insert_in_large_files
from .measure import MIB, Processes, file_system, tree_digest, work_directory
from .tools import PACKAGES, TOOLS, Step, Tool, available


def install_anchors(names: list[str]) -> None:
    missing = [PACKAGES[n] for n in names if n in PACKAGES and not available(n)]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"not installed (and cannot apt-get here): {', '.join(missing)}", file=sys.stderr)
        return
    print(f"installing {', '.join(missing)} from Debian packages", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, check=True)


def copy_tree(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def run_tool(
    tool_type: type[Tool], profile_name: str, dataset: Path, work: Path, seed: int
) -> tuple[str, list[tuple[str, Step]]]:
    """All steps of one tool on one profile: (version, [(step label, Step)])."""
    profile = PROFILES[profile_name]
    place = work / tool_type.name
    place.mkdir()
    source, target = place / "a", place / "b"
    copy_tree(dataset, source)
    steps: list[tuple[str, Step]] = []
    with Processes().running() as processes:
        tool = tool_type(place, source, target, processes)
        version = tool.version()
        tool.setup()
        plan = [("initial sync", None, True)]
        inserts = 0
        for mutation in profile.mutations:
            weak_hash = True
            if mutation is insert_in_large_files:
                inserts += 1
                weak_hash = inserts == 1
            plan.append((mutation.__doc__ or mutation.__name__, mutation, weak_hash))
        for index, (label, mutation, weak_hash) in enumerate(plan):
            if mutation is not None:
                tool.before_mutation(weak_hash)
                label = mutation(source, seed + index, tool.exclude)
                step = tool.propagate()
            else:
                step = tool.initial()
            if tree_digest(source, tool.exclude) != tree_digest(target, tool.exclude):
                raise RuntimeError(f"{tool.name}: trees differ after '{label}'")
            steps.append((label, step))
            cpu = "".join(
                f", {side} {seconds:.1f} s CPU ({step.cpu_system_s[side]:.1f} system)"
                for side, seconds in step.cpu_s.items()
            )
            print(f"  {tool.name:9} {label:52} {step.seconds:8.2f} s{cpu}", file=sys.stderr)
    shutil.rmtree(place)
    return version, steps


def _cell(step: Step) -> str:
    wire = "—" if step.wire_bytes is None else f"{step.wire_bytes / 1e6:.2f} MB"
    rss = " / ".join(f"{v:.0f}" for k, v in step.rss_mib.items() if not k.endswith("(anonymous)"))
    note = f" ({step.note})" if step.note else ""
    return f"{step.seconds:.2f} s, {wire}, {rss} MiB{note}"


def report(profile: str, files: int, size: int, results: dict[str, list[tuple[str, Step]]]) -> str:
    names = list(results)
    lines = [
        f"### {profile}: {files:,} files, {size / MIB:,.0f} MiB",
        "",
        "Each cell: time, bytes on the wire, peak RSS per process (source / target).",
        "",
        "| step | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"backer/{n} time" for n in names if n != "backer")
        + " |",
        "|---" * (1 + len(names) + len([n for n in names if n != "backer"])) + "|",
    ]
    for row in range(len(results[names[0]])):
        label = results[names[0]][row][0]
        cells = [_cell(results[n][row][1]) for n in names]
        ratios = []
        if "backer" in results:
            mine = results["backer"][row][1].seconds
            ratios = [f"{mine / results[n][row][1].seconds:.2f}" for n in names if n != "backer"]
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    harness = ", ".join(f"{n} {max(s.harness_cpu_pct for _, s in results[n]):.1f} %" for n in names)
    lines += ["", f"The benchmark's own CPU while timing (sampler, pollers), at most: {harness}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profiles", default="small,large,mixed,many")
    parser.add_argument("--tools", default="backer,syncthing,rsync,unison")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="Also write raw results here.")
    parser.add_argument("--no-install", action="store_true")
    args = parser.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    names = [t for t in args.tools.split(",") if t]
    if "huge" in profiles:
        parser.error("the huge profile has its own steps: python -m benchmarks.huge")
    unknown = [p for p in profiles if p not in PROFILES] + [t for t in names if t not in TOOLS]
    if unknown:
        parser.error(f"unknown profile or tool: {', '.join(unknown)}")
    if not args.no_install:
        install_anchors(names)
    names = [n for n in names if available(n)]
    raw: dict[str, object] = {}
    with work_directory("backer-bench-", args.workdir) as work:
        print(f"# backer benchmarks — {os.cpu_count()} cores, Python {platform.python_version()}")
        print()
        where = file_system(work)
        print(f"Work directory on {where}: every tool reads and writes there.")
        print()
        raw["file_system"] = where
        for profile in profiles:
            dataset = work / f"data-{profile}"
            print(f"building {profile}", file=sys.stderr)
            PROFILES[profile].build(dataset, args.seed)
            digest = tree_digest(dataset)
            size = sum(s for s, _ in digest.values())
            results, versions = {}, {}
            for name in names:
                versions[name], results[name] = run_tool(
                    TOOLS[name], profile, dataset, work, args.seed
                )
            print(report(profile, len(digest), size, results))
            print()
            rate, dropped = limits.cold_read(dataset)
            how = "page cache dropped" if dropped else limits.NOT_DROPPED
            print(f"cold read of this dataset: {rate / 1e6:,.0f} MB/s ({how})")
            print()
            raw[profile] = {
                "files": len(digest),
                "bytes": size,
                "versions": versions,
                "steps": {n: [(label, asdict(s)) for label, s in r] for n, r in results.items()},
            }
            shutil.rmtree(dataset)
        print("### physical limits (same run)")
        print()
        print(f"- BLAKE3, one thread: {limits.blake3_rate() / 1e6:,.0f} MB/s")
        print(f"- FastCDC boundaries: {limits.chunking_rate() / 1e6:,.0f} MB/s")
        print(f"- loopback TCP, one connection: {limits.loopback_rate() / 1e6:,.0f} MB/s")
        if args.json:
            args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()

"""A million small files, and how each step grows from 10,000 files to 1,000,000.

    python -m benchmarks.huge [--counts 1000000] [--seed 1] [--cache DIR] [--idle 20]
                              [--workdir DIR] [--json FILE]
    python -m benchmarks.huge --counts 10000,100000,1000000     # the scaling table

Per file count, on the ``many`` dataset (files of 1–4 KiB in 1,000 directories; built
once per count and seed and kept under ``--cache``, whose path is printed — building a
million files takes minutes; a marker with the parameters makes a stale cache be
rebuilt), with wall time, CPU seconds (user + system: the machine is shared, and a
loaded machine stretches wall time, not CPU time) and peak RSS of every process:

- rsync: a daemon on 127.0.0.1 serving the tree, a new copy pulled with ``rsync -a``;
- ``backer init`` of the tree, then ``backer scan`` of it unchanged;
- ``backer run`` on it: seconds to "watching", then CPU and RSS idle (settled);
- a new device's initial sync: ``backer join`` into an empty folder, served by that node.

Each copy is compared with the tree by path, size and SHA-256 (not timed). Syncthing
and Unison are not run here: see ``SKIPPED``. With several counts, a table gives each
measure per count, its growth per 10 × more files (10 is linear) and, on paper, its
value at 10 × the last count (see ``on_paper``). Every process is stopped by its PID and the
work directory removed at the end (the cache stays), also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from .datasets import Profile, many
from .measure import Processes, cpu_seconds, run_measured, tree_digest, work_directory
from .node import BackerNodes, settled
from .tools import Rsync

STEP_TIMEOUT_S = 3 * 3600
CACHE = Path.home() / ".cache" / "backer-bench"
GENERATOR = "many/1"  # bump when the dataset's make-up changes: caches are rebuilt
SKIPPED = {
    "syncthing": "its initial sync of 100,000 files took 105–263 s here, after its own "
    "index of the source; at 1,000,000 files that is an hour or more per run",
    "unison": "it compares two local roots (no new device, no node to idle), so it has "
    "no counterpart of these steps but the copy, which rsync measures",
}


# -- the cached dataset -------------------------------------------------------------------


def marker_for(count: int, seed: int) -> dict[str, Any]:
    """What a cached tree must have been built from to be reused."""
    return {"generator": GENERATOR, "count": count, "seed": seed}


@contextlib.contextmanager
def cached_tree(cache: Path, count: int, seed: int, build: Any = None) -> Iterator[Path]:
    """The tree of ``count`` files for ``seed`` under ``cache``, built if missing or
    built from other parameters (or left half-built: the marker is written last), held
    for this run alone: another run on it would remove this one's metadata from it (it
    fails at once instead). Tool metadata a stopped run left in it is removed.
    ``build(root)`` makes the tree (default: the ``many`` dataset)."""
    place = cache / f"many-{count}-seed{seed}"
    tree, marker = place / "tree", place / "marker.json"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{place.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another benchmark run is using {tree}") from None
        expected = marker_for(count, seed)
        try:
            fresh = json.loads(marker.read_text()) == expected
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            shutil.rmtree(place, ignore_errors=True)
            place.mkdir(parents=True)
            started = time.perf_counter()
            say(f"building {count:,} files under {tree} (once; reused by later runs)")
            if build is None:
                Profile("many", partial(many, count=count), ()).build(tree, seed)
            else:
                build(tree)
            marker.write_text(json.dumps(expected))
            say(f"built in {time.perf_counter() - started:.0f} s")
        for name in (*BackerNodes.exclude, ".stfolder", ".stversions"):
            shutil.rmtree(tree / name, ignore_errors=True)
        yield tree


# -- the steps ----------------------------------------------------------------------------


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's children that have ended so far,
    theirs included: the difference over a step is the CPU of the commands it ran."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def node_cpu_s(pid: int) -> float:
    """CPU seconds of a running node (and its children)."""
    return cpu_seconds(pid)[0]


def quiet(pid: int, timeout: float, interval: float = 2.0, busy: float = 0.1) -> float:
    """Seconds until the node at ``pid`` spends under ``busy`` of a core over one
    ``interval``: after "watching", a large share's node still applies its retention
    policy, which held a joining peer's handshake past its 20 s limit at 1,000,000
    files. The join is measured from there."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        before = node_cpu_s(pid)
        time.sleep(interval)
        if node_cpu_s(pid) - before < busy * interval:
            break
    return time.perf_counter() - started


def same_trees(expected: dict[str, tuple[int, str]], copy: Path, exclude: tuple[str, ...]) -> None:
    """Raise unless ``copy`` holds exactly the files of ``expected`` (a tree_digest)."""
    found = tree_digest(copy, exclude)
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        extra = sorted(set(found) - set(expected))[:3]
        changed = sorted(p for p in set(found) & set(expected) if found[p] != expected[p])[:3]
        raise RuntimeError(f"{copy} differs: missing {missing}, extra {extra}, changed {changed}")


def measure_rsync(tree: Path, place: Path) -> dict:
    copy = place / "rsync-copy"
    cpu = children_cpu_s()
    with Processes().running() as processes:
        tool = Rsync(place, tree, copy, processes)
        tool.setup()
        step = tool.initial()
    cpu = children_cpu_s() - cpu  # the client and the daemon (ended with the block)
    say(f"rsync {step.seconds:.1f} s, {cpu:.1f} CPU s; comparing (not timed)")
    same_trees(tree_digest(tree), copy, ())
    shutil.rmtree(copy)
    return {"seconds": step.seconds, "cpu_s": cpu, "rss_mib": step.rss_mib}


def measure_backer(
    tree: Path, place: Path, idle_s: float, result: dict[str, Any], save: Callable[[], None]
) -> None:
    """init, rescan unchanged, the node's start and idle cost, a new device's join, each
    into ``result`` and saved as soon as measured (a million files take a while)."""
    copy = place / "backer-copy"
    with Processes().running() as processes:
        nodes = BackerNodes(place, processes)
        command = [sys.executable, "-m", "backer"]
        say(f"backer init (load {os.getloadavg()[0]:.1f})")
        cpu = children_cpu_s()
        seconds, rss, _, _ = run_measured(
            processes, [*command, "init", "-q", str(tree)], nodes.env("a")
        )
        cpu = children_cpu_s() - cpu
        result["init"] = {"seconds": seconds, "cpu_s": cpu, "rss_mib": rss["command"]}
        save()
        say(f"backer init {seconds:.1f} s, {cpu:.1f} CPU s; rescan (load {os.getloadavg()[0]:.1f})")
        scan = [*command, "scan", "-q", "--dir", str(tree)]
        cpu = children_cpu_s()
        seconds, rss, _, _ = run_measured(processes, scan, nodes.env("a"))
        cpu = children_cpu_s() - cpu
        result["rescan"] = {"seconds": seconds, "cpu_s": cpu, "rss_mib": rss["command"]}
        save()
        address = f"127.0.0.1:{nodes.ports['a']}"
        invite = [*command, "invite", "--no-wait", "--address", address, "--dir", str(tree)]
        _, _, token, _ = run_measured(processes, invite, nodes.env("a"))
        say(f"backer rescan {seconds:.1f} s, {cpu:.1f} CPU s; backer run (load "
            f"{os.getloadavg()[0]:.1f})")  # fmt: skip
        startup = nodes.start("a", timeout=STEP_TIMEOUT_S)
        cpu = node_cpu_s(nodes.pid())
        say(f"backer run watching after {startup:.1f} s, {cpu:.1f} CPU s; idle {idle_s:.0f} s")
        result["node"] = {"startup_s": startup, "startup_cpu_s": cpu}
        result["node"].update(settled(nodes.pid(), idle_s))
        save()
        result["node"]["quiet_after_s"] = quiet(nodes.pid(), STEP_TIMEOUT_S)
        save()
        rss_idle = result["node"]["rss_median_mib"]
        say(f"idle RSS {rss_idle:.0f} MiB, quiet after {result['node']['quiet_after_s']:.0f} "
            f"more s; backer join (load {os.getloadavg()[0]:.1f})")  # fmt: skip
        join = [*command, "join", "-q", token.strip(), str(copy)]
        cpu, serve_cpu = children_cpu_s(), node_cpu_s(nodes.pid())
        seconds, rss, _, _ = run_measured(processes, join, nodes.env("b"), serve=nodes.pid())
        cpu, serve_cpu = children_cpu_s() - cpu, node_cpu_s(nodes.pid()) - serve_cpu
        result["join"] = {
            "seconds": seconds,
            "cpu_s": cpu,
            "serve_cpu_s": serve_cpu,
            "rss_mib": rss["command"],
            "serve_rss_mib": rss["serve"],
        }
        save()
        say(
            f"backer join {seconds:.1f} s, {cpu:.1f} + {serve_cpu:.1f} CPU s; comparing (not timed)"
        )
    same_trees(tree_digest(tree, BackerNodes.exclude), copy, BackerNodes.exclude)
    shutil.rmtree(copy)


def measure(
    count: int,
    seed: int,
    cache: Path,
    work: Path,
    idle_s: float,
    results: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Every step on ``count`` files into a new entry of ``results``, with the load
    average before and after; ``save()`` after each step. backer first, then rsync (its
    daemon serves the tree once backer's metadata is gone from it)."""
    with cached_tree(cache, count, seed) as tree:
        place = work / f"n{count}"
        place.mkdir()
        result: dict[str, Any] = {"count": count, "load_before": os.getloadavg(), "backer": {}}
        results.append(result)
        say(f"{count:,} files: load {result['load_before'][0]:.2f}")
        measure_backer(tree, place, idle_s, result["backer"], save)
        for name in BackerNodes.exclude:
            shutil.rmtree(tree / name, ignore_errors=True)
        if shutil.which("rsync"):
            say(f"rsync (load {os.getloadavg()[0]:.1f})")
            result["rsync"] = measure_rsync(tree, place)
        shutil.rmtree(place)
        result["load_after"] = os.getloadavg()
        save()


# -- the report ---------------------------------------------------------------------------

# (label, unit, path into a count's result)
MEASURES: list[tuple[str, str, tuple[str, ...]]] = [
    ("`backer init`: time", "s", ("backer", "init", "seconds")),
    ("`backer init`: CPU", "CPU s", ("backer", "init", "cpu_s")),
    ("`backer init`: peak RSS", "MiB", ("backer", "init", "rss_mib")),
    ("rescan unchanged (`backer scan`): time", "s", ("backer", "rescan", "seconds")),
    ("rescan unchanged: CPU", "CPU s", ("backer", "rescan", "cpu_s")),
    ("rescan unchanged: peak RSS", "MiB", ("backer", "rescan", "rss_mib")),
    ("`backer run`: start-up to watching", "s", ("backer", "node", "startup_s")),
    ("`backer run`: CPU to watching", "CPU s", ("backer", "node", "startup_cpu_s")),
    ("`backer run` idle, settled: RSS (median)", "MiB", ("backer", "node", "rss_median_mib")),
    ("`backer run` idle: CPU", "%", ("backer", "node", "cpu_pct")),
    ("new device (`backer join`): time", "s", ("backer", "join", "seconds")),
    ("new device: CPU, joining side", "CPU s", ("backer", "join", "cpu_s")),
    ("new device: CPU, serving node", "CPU s", ("backer", "join", "serve_cpu_s")),
    ("new device: peak RSS, joining side", "MiB", ("backer", "join", "rss_mib")),
    ("new device: peak RSS, serving node", "MiB", ("backer", "join", "serve_rss_mib")),
    ("rsync, new copy: time", "s", ("rsync", "seconds")),
    ("rsync, new copy: CPU (client and daemon)", "CPU s", ("rsync", "cpu_s")),
]


def lookup(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def growth_per_10x(small_count: int, small: float, large_count: int, large: float) -> float:
    """How much a measure grows for 10 × more files, from two counts (any ratio): 10
    means linear, 1 constant."""
    return (large / small) ** (math.log(10) / math.log(large_count / small_count))


def on_paper(small_count: int, small: float, large_count: int, large: float) -> float:
    """A measure at 10 × ``large_count``, from its last two values: the larger of the
    straight line through them (a fixed cost plus a cost per file: a power law would
    understate it, as the fixed part hides the per-file part at small counts) and the
    power law of their growth (a straight line would understate a growth above 10)."""
    per_file = (large - small) / (large_count - small_count)
    line = large + per_file * 9 * large_count
    power = large * growth_per_10x(small_count, small, large_count, large)
    return max(line, power)


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:,.2f} {unit}" if value < 10 else f"{value:,.0f} {unit}"


def scaling_table(results: list[dict[str, Any]]) -> str:
    """Markdown: a row per measure, a column per count, the growth per 10 × between each
    two counts, and the value at 10 × the last count on paper (:func:`on_paper`)."""
    results = sorted(results, key=lambda r: r["count"])
    counts = [r["count"] for r in results]
    pairs = list(itertools.pairwise(results))
    head = [f"{c:,} files" for c in counts]
    head += [f"growth {a['count']:,} → {b['count']:,}" for a, b in pairs]
    head += [f"{10 * counts[-1]:,} on paper"] if pairs else []
    lines = ["| measure | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, unit, path in MEASURES:
        values = [lookup(r, path) for r in results]
        if all(v is None for v in values):
            continue
        cells = [_value(v, unit) for v in values]
        growths: list[float | None] = []
        for (a, b), (va, vb) in zip(pairs, itertools.pairwise(values), strict=True):
            ok = va is not None and vb is not None and va > 0 and vb > 0
            growths.append(growth_per_10x(a["count"], va, b["count"], vb) if ok else None)
        cells += ["—" if g is None else f"{g:.1f} ×" for g in growths]
        if pairs:
            (a, b), (va, vb) = pairs[-1], values[-2:]
            ok = va is not None and vb is not None and va > 0 and vb > 0
            paper = on_paper(a["count"], va, b["count"], vb) if ok else None  # type: ignore[arg-type]
            cells.append(_value(paper, unit))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_file(results: list[dict[str, Any]]) -> list[str]:
    """Peak and idle RSS per file, for the ≤ 1 KB per file target."""
    lines = []
    for result in sorted(results, key=lambda r: r["count"]):
        parts = []
        for label, path in [
            ("init", ("backer", "init", "rss_mib")),
            ("rescan", ("backer", "rescan", "rss_mib")),
            ("idle node", ("backer", "node", "rss_median_mib")),
            ("join", ("backer", "join", "rss_mib")),
            ("serving node", ("backer", "join", "serve_rss_mib")),
        ]:
            mib = lookup(result, path)
            if mib is not None:
                parts.append(f"{label} {mib * 1024 * 1024 / result['count']:,.0f} B")
        lines.append(f"- {result['count']:,} files, RSS per file: " + ", ".join(parts))
    return lines


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="1000000", help="File counts, comma-separated.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"default {CACHE}")
    parser.add_argument("--idle", type=float, default=20, help="Seconds of idle sampling.")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="Also write raw results here.")
    parser.add_argument(
        "--report", type=Path, nargs="*", metavar="JSON",
        help="Results of earlier runs (--json) to report with this one's; --counts '' "
        "measures nothing more.",
    )  # fmt: skip
    args = parser.parse_args()
    try:
        counts = [int(c) for c in args.counts.split(",") if c]
    except ValueError:
        parser.error(f"--counts: not a list of numbers: {args.counts}")
    if min(counts, default=1000) < 1000:
        parser.error("--counts: at least 1,000 files each")
    print(f"dataset cache: {args.cache}", flush=True)
    for name, reason in SKIPPED.items():
        print(f"skipped {name}: {reason}", flush=True)
    results: list[dict[str, Any]] = []
    for earlier in args.report or []:
        results += json.loads(earlier.read_text())

    def save() -> None:  # after each step: a late failure keeps what was measured
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    with work_directory("backer-huge-", args.workdir) as work:
        for count in counts:
            try:
                measure(count, args.seed, args.cache, work, args.idle, results, save)
            except RuntimeError as error:
                sys.exit(f"error: {error}")
    print(f"\n# backer on many files — {os.cpu_count()} cores")
    for result in results:
        after = f"{result['load_after'][0]:.2f}" if "load_after" in result else "—"
        before = result["load_before"][0]
        print(f"- {result['count']:,} files: load {before:.2f} before, {after} after")
    print()
    print(scaling_table(results))
    print()
    print("\n".join(per_file(results)))


if __name__ == "__main__":
    main()

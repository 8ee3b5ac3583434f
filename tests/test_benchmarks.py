"""The benchmark harness's own pure parts, on small real inputs: tree comparison, the
report tables, the dataset cache's marker, the RSS sampler's process tree, the cold
cache's honesty and the rule that stops Syncthing's clock. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from benchmarks.__main__ import report
from benchmarks.huge import cached_tree, growth_per_10x, on_paper, same_trees, scaling_table
from benchmarks.measure import PeakRss, cpu_seconds, file_system, tree_digest
from benchmarks.tools import FOLDER, Completion, Step, _wait_until_idle, event_time

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def test_tree_digest_sees_a_changed_byte_of_the_same_size(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", {"d/x.txt": b"hello", "y.bin": b"\0" * 10})
    b = _tree(tmp_path / "b", {"d/x.txt": b"hello", "y.bin": b"\0" * 10})
    assert tree_digest(a) == tree_digest(b)
    (b / "d" / "x.txt").write_bytes(b"hellp")
    assert tree_digest(a) != tree_digest(b)
    assert tree_digest(a)["d/x.txt"][0] == tree_digest(b)["d/x.txt"][0] == 5


def test_tree_digest_skips_a_tools_metadata_at_the_top_only(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", {"x": b"1"})
    b = _tree(tmp_path / "b", {"x": b"1", ".backer/db": b"meta"})
    assert tree_digest(a) != tree_digest(b)
    assert tree_digest(a, (".backer",)) == tree_digest(b, (".backer",))
    _tree(b, {"sub/.backer/db": b"a user's folder of that name"})
    assert "sub/.backer/db" in tree_digest(b, (".backer",))


def test_tree_digest_ignores_symlinks(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", {"x": b"1"})
    (a / "link").symlink_to(a / "x")
    assert set(tree_digest(a)) == {"x"}


def test_same_trees_names_what_is_missing_extra_and_changed(tmp_path: Path) -> None:
    a = _tree(tmp_path / "a", {"keep": b"k", "gone": b"g", "edit": b"1"})
    b = _tree(tmp_path / "b", {"keep": b"k", "new": b"n", "edit": b"2"})
    same_trees(
        tree_digest(a), _tree(tmp_path / "c", {"keep": b"k", "gone": b"g", "edit": b"1"}), ()
    )
    with pytest.raises(
        RuntimeError, match=r"missing \['gone'\], extra \['new'\], changed \['edit'\]"
    ):
        same_trees(tree_digest(a), b, ())


def test_report_gives_ratios_per_anchor_the_harness_cpu_and_rss_per_side_only() -> None:
    results = {
        "backer": [
            ("initial sync", Step(2.0, 1_000_000, {"a": 100, "b": 50, "a (anonymous)": 9}, "", 1.5))
        ],
        "rsync": [("initial sync", Step(4.0, 2_000_000, {"a": 6, "b": 7}, "", 0.4))],
    }
    table = report("small", 10_000, 83 * 1024 * 1024, results).splitlines()
    assert table[0] == "### small: 10,000 files, 83 MiB"
    assert table[4] == "| step | backer | rsync | backer/rsync time |"
    assert table[6] == (
        "| initial sync | 2.00 s, 1.00 MB, 100 / 50 MiB | 4.00 s, 2.00 MB, 6 / 7 MiB | 0.50 |"
    )
    assert table[-1].endswith("at most: backer 1.5 %, rsync 0.4 %")


def test_growth_per_10x_is_10_when_linear_whatever_the_step() -> None:
    assert growth_per_10x(10_000, 2.0, 100_000, 20.0) == pytest.approx(10)
    assert growth_per_10x(1_000, 1.0, 4_000, 4.0) == pytest.approx(10)
    assert growth_per_10x(1_000, 3.0, 100_000, 3.0) == pytest.approx(1)
    assert growth_per_10x(10_000, 1.0, 100_000, 100.0) == pytest.approx(100)


def test_on_paper_keeps_a_fixed_cost_from_hiding_the_cost_per_file() -> None:
    # 80 MiB of libraries plus ~0.8 KB per file: the growth (1.9 ×) would say 281 MiB
    assert on_paper(10_000, 80.0, 100_000, 150.0) == pytest.approx(150 + 70 * 10)
    # growing faster than linear: the power law, not the straight line
    assert on_paper(10_000, 1.0, 100_000, 100.0) == pytest.approx(10_000)
    assert on_paper(10_000, 2.0, 100_000, 20.0) == pytest.approx(200)


def _result(count: int, init_s: float, rss: float | None) -> dict:
    backer: dict = {"init": {"seconds": init_s}}
    if rss is not None:
        backer["node"] = {"rss_median_mib": rss}
    return {"count": count, "backer": backer}


def test_scaling_table_has_a_growth_per_pair_and_the_next_decade_on_paper() -> None:
    table = scaling_table(
        [
            _result(100_000, 20.0, 200.0),
            _result(10_000, 2.0, 100.0),
            _result(1_000_000, 400.0, None),
        ]
    ).splitlines()
    assert table[0] == (
        "| measure | 10,000 files | 100,000 files | 1,000,000 files | growth 10,000 → 100,000 "
        "| growth 100,000 → 1,000,000 | 10,000,000 on paper |"
    )
    assert table[2] == "| `backer init`: time | 2.00 s | 20 s | 400 s | 10.0 × | 20.0 × | 8,000 s |"
    # a measure missing at one count: no growth and no extrapolation from it
    assert (
        table[3]
        == "| `backer run` idle, settled: RSS (median) | 100 MiB | 200 MiB | — | 2.0 × | — | — |"
    )
    assert len(table) == 4  # measures measured nowhere are left out


def test_cached_tree_is_built_once_and_reused(tmp_path: Path) -> None:
    builds = []

    def build(root: Path) -> None:
        builds.append(root)
        _tree(root, {"f": b"data"})

    with cached_tree(tmp_path, 1000, 7, build) as tree:
        assert tree_digest(tree) == {"f": (4, tree_digest(tree)["f"][1])}
    _tree(tree, {".backer/db": b"left by a stopped run"})
    with cached_tree(tmp_path, 1000, 7, build) as again:
        assert again == tree
    assert len(builds) == 1
    assert not (tree / ".backer").exists()
    marker = json.loads((tree.parent / "marker.json").read_text())
    assert marker == {"generator": "many/1", "count": 1000, "seed": 7}


def test_cached_tree_is_rebuilt_when_stale_or_half_built(tmp_path: Path) -> None:
    builds = []

    def build(root: Path) -> None:
        builds.append(root)
        _tree(root, {"f": str(len(builds)).encode()})

    def content(seed: int = 7) -> bytes:
        with cached_tree(tmp_path, 1000, seed, build) as tree:
            return (tree / "f").read_bytes()

    assert content() == b"1"
    marker = tmp_path / "many-1000-seed7" / "marker.json"
    marker.write_text(json.dumps({"generator": "many/0", "count": 1000, "seed": 7}))
    assert content() == b"2"
    marker.unlink()  # a build interrupted before its marker
    assert content() == b"3"
    assert content(seed=8) == b"4"  # another seed: another tree
    assert content() == b"3"


def test_cached_tree_in_use_by_another_run_is_refused_not_cleaned(tmp_path: Path) -> None:
    """Two runs on one cached tree: the second removed the first's .backer while its
    init was writing it (seen at 1,000,000 files)."""
    with cached_tree(tmp_path, 1000, 7, lambda root: _tree(root, {"f": b"x"})) as tree:
        _tree(tree, {".backer/db": b"the running init's"})
        with (
            pytest.raises(RuntimeError, match="another benchmark run is using"),
            cached_tree(tmp_path, 1000, 7),
        ):
            pass
        assert (tree / ".backer" / "db").exists()
    with cached_tree(tmp_path, 1000, 7) as tree:  # released: usable again
        assert not (tree / ".backer").exists()


MOUNTS = """/dev/vda / ext4 rw,relatime,discard 0 0
tmpfs /tmp/bench\\040ram tmpfs rw,relatime,size=2097152k 0 0
tmpfs /tmp/bench tmpfs rw,nosuid 0 0
"""


def test_file_system_is_the_longest_mount_point_holding_the_path() -> None:
    """The report names the work directory's file system: a tmpfs mounted below the disk's
    root wins for paths inside it only (not for a sibling sharing its prefix), and an
    escaped space in a mount point is read as a space."""
    assert file_system(Path("/tmp/bench/x/a"), MOUNTS) == "tmpfs tmpfs (rw,nosuid)"
    assert file_system(Path("/tmp/bench"), MOUNTS) == "tmpfs tmpfs (rw,nosuid)"
    assert file_system(Path("/tmp/benchmark"), MOUNTS) == "ext4 /dev/vda (rw,relatime,discard)"
    assert file_system(Path("/tmp/bench ram/a"), MOUNTS).startswith("tmpfs tmpfs (rw,relatime")
    assert file_system(Path("/tmp")) != "unknown file system"  # this machine's real mounts


def test_peak_rss_counts_a_child_of_the_watched_process() -> None:
    """The sampler finds the process tree only now and then: a worker started by the
    watched process (as ``syncthing serve`` starts one) must still be counted."""
    hold = (
        "b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)"
    )
    parent = subprocess.Popen(
        ["sh", "-c", f'{sys.executable} -c "{hold}"; true'], stdout=subprocess.DEVNULL
    )
    sampler = PeakRss({"tree": parent.pid})
    sampler.start()
    parent.wait()
    peaks = sampler.stop()
    assert peaks["tree"] >= 64
    assert peaks["tree (anonymous)"] >= 60
    assert sampler.harness_cpu_pct >= 0


def test_daemon_cpu_counts_a_child_and_gives_the_kernels_share_apart() -> None:
    """Syncthing's worker is a child of its monitor: both count, and the system part
    (most of Syncthing's CPU on small files here) is reported within the total."""
    busy = (
        "import os, time\nend = time.process_time() + 0.3\n"
        "while time.process_time() < end: os.stat('/')\ntime.sleep(30)"
    )
    parent = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{busy}"; true'])
    try:
        deadline = time.monotonic() + 20
        while (cpu := cpu_seconds(parent.pid))[0] < 0.3 and time.monotonic() < deadline:
            time.sleep(0.1)
        total, system = cpu
        assert total >= 0.3
        assert 0 < system < total
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_cold_read_says_when_the_page_cache_could_not_be_dropped(tmp_path: Path) -> None:
    code = "from benchmarks.limits import drop_page_cache; print(drop_page_cache([]))"
    as_root = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert as_root.stdout.strip() == "True"
    as_nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert as_nobody.stdout.strip() == "False"


def _recorded_events() -> list[dict]:
    """Both instances' completion events during Syncthing's ``small`` initial sync
    (10,000 files), as long-polled by the benchmark; the middle of the pull is cut."""
    return json.loads((ROOT / "tests" / "syncthing_events" / "initial-small.json").read_text())


def _b_id(events: list[dict]) -> str:
    return next(e["data"]["device"] for e in events if e["type"] == "FolderCompletion"
                and e["side"] == "a")  # fmt: skip


def test_syncthing_event_time_keeps_nanoseconds_and_the_offset() -> None:
    base = datetime(2026, 12, 2, 2, 57, 13, tzinfo=UTC).timestamp()
    assert event_time("2026-12-02T02:57:13.921190811Z") == pytest.approx(base + 0.921190811)
    assert event_time("2026-12-02T03:57:13.5+01:00") == pytest.approx(base + 0.5)
    assert event_time("2026-12-02T02:57:13Z") == base
    with pytest.raises(ValueError, match="not an RFC 3339 time"):
        event_time("yesterday")


def test_syncthing_clock_stops_at_bs_last_pull_once_a_rates_b_complete() -> None:
    """Recorded events: b rates a 100 % all along and says needs 0 while still empty;
    only a's rating of b, after b's last pull, completes the step, and the clock stops
    at that pull's end, not at the later summary that confirmed it."""
    events = _recorded_events()
    completion = Completion(FOLDER, _b_id(events), -1)
    for index, event in enumerate(events):
        assert not completion.done, f"done too early, before event {index}"
        completion.feed(event["side"], event)
    assert completion.done
    last_pull = [e for e in events if e["side"] == "b" and e["type"] == "StateChanged"
                 and e["data"]["to"] == "idle" and e["data"]["from"] != "scanning"][-1]  # fmt: skip
    assert completion.finished_at == event_time(last_pull["time"])
    assert last_pull["time"] == "2026-12-02T02:57:13.921190811Z"


def test_syncthing_step_is_not_done_without_as_rating_of_b_at_its_new_sequence() -> None:
    events = _recorded_events()
    without = [e for e in events if not (e["side"] == "a" and e["type"] == "FolderCompletion")]
    completion = Completion(FOLDER, _b_id(events), -1)
    for event in without:
        completion.feed(event["side"], event)
    assert not completion.done
    # a has not rescanned: its sequence did not move past the one before the step
    sequence = next(e["data"]["summary"]["sequence"] for e in events if e["side"] == "a")
    unmoved = Completion(FOLDER, _b_id(events), sequence)
    for event in events:
        unmoved.feed(event["side"], event)
    assert not unmoved.done
    # a rescans after rating b complete: that rating no longer counts
    moved = Completion(FOLDER, _b_id(events), -1)
    for event in events:
        moved.feed(event["side"], event)
    summary = next(e for e in reversed(events) if e["side"] == "a" and e["type"] == "FolderSummary")
    rescanned = json.loads(json.dumps(summary))
    rescanned["data"]["summary"]["sequence"] += 1
    moved.feed("a", rescanned)
    assert not moved.done


def test_backer_setup_waits_for_the_nodes_start_up_work_to_end() -> None:
    """``backer run`` rescans its share and prunes as it starts: on 100,000 files that
    work ran during the timed initial sync (and in the source's peak RSS), while
    Syncthing's setup waits for its index. The wait returns once the process is idle."""
    work = "import time\nend = time.time() + 2\nwhile time.time() < end: pass\ntime.sleep(30)"
    busy = subprocess.Popen([sys.executable, "-c", work])
    try:
        started = time.monotonic()
        _wait_until_idle(busy.pid)
        waited = time.monotonic() - started
    finally:
        busy.kill()
        busy.wait()
    assert 1.5 < waited < 10

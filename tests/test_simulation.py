"""A bounded simulation profile on every change (the campaign runner goes further)."""

from __future__ import annotations

import base64
import dataclasses
import os
import types
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, settings

from backer.fs import dirs, paths
from backer.fs.dirs import InShare
from backer.model import materializer, state
from backer.model.materializer import Materializer
from backer.model.records import Kind, Version, timestamp
from backer.model.share import Share
from backer.node import commands
from backer.protocol.session import Session
from backer.scanner.chunks import ChunkStore
from backer.scanner.ignore import CONFLICT_MARK, temp_name
from backer.versioner import prune as prune_engine
from backer.versioner import retention
from backer.versioner.retention import DAY, MINUTE
from backer.versioner.store import Store
from simulations.campaign import Failure, replay, run_seed
from simulations.invariants import (
    check_kept_readable,
    check_recorded_once,
    check_retention_window,
)
from simulations.machine import DEFAULT_WORLD, ClusterMachine
from simulations.world import InvariantBroken, reachable_temps, synced_trees

BEFORE_EXFAT = DEFAULT_WORLD - {"nolinks", "plainrename", "unseen"}  # where its seeds were found
BEFORE_KILLS = BEFORE_EXFAT - {"kills"}  # a seed drawn without kills keeps its steps
TestCluster = ClusterMachine.TestCase
TestCluster.settings = settings(
    max_examples=15,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize(
    ("seed", "nodes"),
    [(4, 3), (7, 3), (19, 3), (35, 3), (90, 3), (181, 3), (479, 3), (494, 3), (512, 5),
     (518, 5), (524, 5),
     (527, 5), (529, 5), (535, 5), (545, 5), (580, 5), (786, 5), (839, 5), (992, 5)],
)  # fmt: skip
def test_campaign_seeds_that_once_failed(seed: int, nodes: int) -> None:
    """Seeds that found bugs (chunk index with one location per chunk, conflict copies
    of versions their own device replaced, shadowed files, unconverged journals; a
    restored device's lost versions beside its new ones (90, 529), a restored device
    applying peers' changes before its own history was back (545), joiners' events ahead
    of the genesis (527), temp links never swept (181, 580), a recovery check made one
    round too early (512), temp files moved with a renamed directory (839, 992), a
    directory made where a recorded file had just been deleted (479, 494)); with the
    strict trace check, 518 also caught a deletion planned before a scan that removed
    the newer version the scan recorded."""
    stats = run_seed(seed, nodes, 200, frozenset({"strict"}))  # the classic steps
    assert stats["steps"] == 200


def test_a_seed_replays_byte_for_byte() -> None:
    """Version ids, client ids, clocks and file times all come from the seed: two runs of
    one seed end with identical journals (merkle roots) and identical traffic."""
    first, second, other = run_seed(21, 3, 120), run_seed(21, 3, 120), run_seed(22, 3, 120)
    assert first["fingerprint"] == second["fingerprint"]
    assert first["bytes"] == second["bytes"]
    assert other["fingerprint"] != first["fingerprint"]


def _passes(steps: list[tuple[str, dict]], world: frozenset[str]) -> ClusterMachine:
    """Replay a short trace; a broken invariant fails the test with the harness's reason."""
    try:
        return replay(3, steps, 0, world)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_the_harness_catches_a_deleted_file_put_back_and_deleted_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Node 0's person deletes f and later puts it back with its old bytes (from a
    backup): a new file of theirs. Taken for the version the deletion replaced (as the
    adoption of a killed window's leftover once did), the next sync deleted it again;
    the strict check excused it, its bytes being a replaced version's. Now the harness
    says so."""
    steps = [
        ("write", {"node": 0, "path": "f", "data": b"one"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("delete", {"node": 0, "path": "f"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("write", {"node": 0, "path": "f", "data": b"one"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    strict = frozenset({"strict"})
    _passes(steps, strict)
    replaced = Share._replaced
    monkeypatch.setattr(  # (the adoption taking what a deletion replaced, as before 40dd15b)
        Share,
        "_moved_on_from",
        lambda self, path, live: {
            vid: version
            for at, vid, version in self.catalog.versions_under(path)
            if at == path
            and vid not in live
            and any(replaced(self, vid, newer) for newer in live.values())
        },
    )
    with pytest.raises(Failure, match="which its person wrote after the versions live there"):
        replay(3, steps, 0, strict)


def test_a_link_beside_a_large_file_syncs() -> None:
    """A staged link in a batch above the syncfs threshold took the per-file fsync path,
    which opened it with O_NOFOLLOW (ELOOP): the whole session failed."""
    steps = [
        ("write", {"node": 0, "path": "f", "data": b"y" * 20_000}),
        ("symlink", {"node": 0, "path": "g", "link": "f"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    _passes(steps, frozenset({"durability"}))


def test_an_ignore_rule_deletes_nothing_anywhere() -> None:
    """A pattern added on one device became a recorded deletion on every other one."""
    steps = [
        ("write", {"node": 0, "path": "a/x.log", "data": b"log"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("ignore", {"node": 0, "pattern": "*.log", "add": True}),
        ("scan", {"node": 0}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    _passes(steps, frozenset({"ignore"}))


def test_an_nfd_name_reaches_peers() -> None:
    """An NFD name was recorded under its NFC form: peers never got its chunks."""
    steps = [
        ("write", {"node": 0, "path": "a/re\u0301sume\u0301", "data": b"cv"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    _passes(steps, frozenset({"unicode"}))


def test_a_node_without_hard_links_takes_its_peers_edits_and_keeps_what_they_replace() -> None:
    """On exFAT (no hard links: node 1 here) a peer's edit of an existing file was never
    applied: keeping the file it replaced failed with EPERM, and so did the window
    (shrunk from seed 7006 of the default world with ``nolinks``)."""
    steps = [("race", {"node": 1, "path": "b/g", "data": b"x" * 70_000, "limit": 30})]
    world = {"faults", "disk", "fills", "durability", "ignore", "unicode", "case", "long"}
    world |= {"tmpnames", "strict", "resident", "retention", "revisions", "clocks", "saves"}
    try:  # (the default world of the day it was found: no family alone fails it)
        machine = replay(3, steps, 7006, frozenset(world | {"nolinks"}))
    except Failure as failure:
        pytest.fail(failure.reason)
    assert machine.cluster.disks.injected["link without hard links"] > 0


def test_a_kept_copy_is_not_replaced_by_a_file_rewritten_in_place_since() -> None:
    """Seed 185101 (default world with ``nolinks``, 60 steps), shrunk: node 1 (no hard
    links) holds ``x.log`` and ``a/x.log`` with one content, kept by a copy; its person
    rewrites ``x.log`` in place, and a resolution replaces ``a/x.log`` while the watcher
    scans. The harness's filesystem refused a link onto the copy's name with EPERM
    where the kernel answers EEXIST, so the store copied the rewritten ``x.log`` over
    the kept copy ("node1 changed 'a/x.log' without keeping its old bytes"); answered
    as on a real exFAT mount, the copy stays."""
    steps = [
        ("write", {"node": 0, "path": "a/x.log", "data": b"same"}),
        ("scan", {"node": 0, "during": 6}),
        ("kill", {"node": 2, "op": "deliver", "nth": 13, "other": 0, "pick": 79}),
        ("write", {"node": 2, "path": "x.log", "data": b"same"}),
        ("scan", {"node": 2, "during": 16}),
        ("deliver", {"a": 2, "b": 1, "count": 33}),
        ("resolve", {"node": 2, "pick": 11, "how": "keep"}),
        ("write", {"node": 1, "path": "x.log", "data": b'\xdeIq\x9b]M\x1c\x8c"\x8e'}),
        ("scan", {"node": 1, "during": 19}),
    ]
    try:
        replay(3, steps, 185101, BEFORE_EXFAT | {"nolinks"})
    except Failure as failure:
        pytest.fail(failure.reason)


def test_a_full_disk_then_freed_converges() -> None:
    """A receiver whose disk fills up in the middle of a file (a short write, then
    ENOSPC) records nothing it did not verify and leaves no temp behind; once space is
    freed, the next syncs finish the job. (An unchecked short pwrite recorded a file
    zero-filled after 5,000 bytes as the right version.)"""
    steps = [
        ("write", {"node": 0, "path": "f", "data": b"x" * 70_000}),
        ("write", {"node": 0, "path": "a/f", "data": b"small"}),
        ("disk_full", {"node": 1, "budget": 5_000}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("scan", {"node": 1}),
        ("disk_freed", {"node": 1}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    _passes(steps, frozenset({"disk"}))


def test_a_kept_temp_hides_no_missing_file_from_the_convergence_check() -> None:
    """A device kept the temp of a file whose chunks no peer it had met yet held (seed
    2805): backer's temps count as ignored, so the check pinned the temp's directory and
    left out everything in it on every node; the trees looked equal with the file still
    missing there, convergence stopped a round before it arrived, and the temp stayed."""
    steps = [
        ("symlink", {"node": 2, "path": "a/f", "link": "a/c"}),
        ("sync", {"a": 2, "b": 0, "cut": None}),
        ("write", {"node": 0, "path": "a/notes.backer-tmp", "data": b"same"}),
        ("faults", {"node": 1, "seed": 2769740922, "rate": 0.3}),
        ("write", {"node": 2, "path": "notes.backer-tmp", "data": b"F" * 114}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("write", {"node": 2, "path": "b/g", "data": b""}),
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("sync", {"a": 2, "b": 1, "cut": None}),
        ("connect", {"a": 1, "b": 0}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("write", {"node": 0, "path": "a/c/h", "data": b"y" * 20_000}),
        ("delete", {"node": 1, "path": "a"}),
        ("sync", {"a": 1, "b": 2, "cut": 15}),
        ("write", {"node": 0, "path": "notes.backer-tmp", "data": b"P" * 290}),
        ("sync", {"a": 2, "b": 1, "cut": None}),
        ("write", {"node": 1, "path": "café", "data": b"same"}),
        ("write", {"node": 2, "path": "g", "data": b"other"}),
        ("write", {"node": 2, "path": "café", "data": b"same"}),
        ("sync", {"a": 2, "b": 0, "cut": None}),
        ("write", {"node": 1, "path": "notes.backer-tmp", "data": b"W" * 293}),
        ("delete", {"node": 1, "path": "b/g"}),
        ("rename", {"node": 1, "source": "b", "destination": "g"}),
        ("append", {"node": 0, "path": "notes.backer-tmp", "data": b"AAAAAAA"}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("write", {"node": 1, "path": "b/g", "data": b"y" * 20_000}),
        ("write", {"node": 1, "path": "F", "data": b"E" * 183}),
        ("delete", {"node": 2, "path": "a"}),
        ("write", {"node": 2, "path": "a/F", "data": b"G" * 290}),
        ("disk_full", {"node": 0, "budget": 0}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("sync", {"a": 2, "b": 1, "cut": None}),
        ("write", {"node": 0, "path": "a/c/h", "data": b"same"}),
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("sync", {"a": 2, "b": 0, "cut": None}),
    ]
    _passes(steps, BEFORE_EXFAT - {"resident", "clocks"})  # the world it was found in


def _scan_with_failing_reads(seed: int) -> tuple[dict[str, int], list[str], bytes]:
    machine = ClusterMachine(3, seed, frozenset({"faults"}))
    try:
        for index in range(8):
            (machine.root(0) / f"file{index}").write_bytes(bytes([index]) * 100)
        machine.faults(0, seed, 0.5)
        summary = machine.cluster.nodes[0].open().scan()
        machine.write(0, "f", b"the harness's own writes never fail")
        return (
            dict(machine.cluster.disks.injected),
            summary.errors,
            (machine.root(0) / "f").read_bytes(),
        )
    finally:
        machine.abandon()


def test_disk_faults_come_from_the_seed_and_only_hit_backer() -> None:
    """The fault layer fails backer's own disk calls (here the scanner's reads) as the
    seed says, the same way on every run; the harness's edits are never failed."""
    first, second, other = (_scan_with_failing_reads(s) for s in (3, 3, 4))
    assert first == second
    assert first[0] and first[1], "faults at rate 0.5 must hit some of 8 reads"
    assert first[0] != other[0] or first[1] != other[1]
    assert first[2] == b"the harness's own writes never fail"


RESIDENT = frozenset({"resident", "strict"})


def test_a_resident_node_pushes_every_scan_to_every_open_link() -> None:
    """Resident nodes keep their links and push what a watcher's scan records to all of
    them at once (node 1 and node 2 only hear of node 0's files through their links)."""
    steps = [
        ("connect", {"a": 0, "b": 1}),
        ("connect", {"a": 0, "b": 2}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("write", {"node": 0, "path": "a/f", "data": b"x" * 70_000}),
        ("scan", {"node": 0, "during": 5}),
        ("deliver", {"a": 1, "b": 0, "count": 40}),
    ]
    machine = _passes(steps, RESIDENT)
    assert machine.stats["syncs"] == 2


def test_the_harness_catches_events_not_pushed_to_open_links() -> None:
    """With pushing broken (an open session sends nothing new after its start: not
    what a scan records, not what another link brings in), linked nodes that have gone
    quiet still differ, and the harness says so."""
    steps = [
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("sync", {"a": 2, "b": 1, "cut": None}),
        ("write", {"node": 0, "path": "f", "data": b"two"}),
        ("scan", {"node": 0, "during": 0}),
        ("deliver", {"a": 0, "b": 1, "count": 40}),
    ]
    _passes(steps, RESIDENT)
    real = Session.push
    Session.push = lambda self: None  # type: ignore[method-assign]
    try:
        with pytest.raises(Failure, match="not pushed"):
            replay(3, steps, 0, RESIDENT)
    finally:
        Session.push = real  # type: ignore[method-assign]


def test_the_harness_catches_applied_writes_recorded_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node whose apply leaves its scan cache on the version it replaced, and whose
    scan does not take a file identical to the live version that replaced the cached
    one for that version (R41's recovery, which would hide the first fault), records
    the bytes it applied as its own edit at its next scan: the journal grows from
    nothing its person did, and the harness says so."""
    steps = [
        ("write", {"node": 0, "path": "f", "data": b"one"}),
        ("scan", {"node": 0, "during": 0}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("write", {"node": 0, "path": "f", "data": b"two"}),
        ("scan", {"node": 0, "during": 0}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("scan", {"node": 1, "during": 0}),
    ]
    _passes(steps, RESIDENT)
    monkeypatch.setattr(Materializer, "_record", lambda self, op, info: None)
    monkeypatch.setattr(Share, "_adopt_identical", lambda self, changed, *rest: changed)
    with pytest.raises(Failure, match="recorded its own applied writes as edits"):
        replay(3, steps, 0, RESIDENT)


def test_an_edit_while_a_plan_is_applied_is_kept() -> None:
    """The person writes the very file a resident node is about to rename into place,
    after the plan and before its chunks have all come: the edit stays (the apply's
    re-check sees it), is recorded, and both versions survive as a conflict."""
    steps = [
        ("connect", {"a": 0, "b": 1}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("race", {"node": 1, "path": "b/g", "data": b"mine", "limit": 40}),
        ("scan", {"node": 1, "during": 20}),
    ]
    machine = _passes(steps, RESIDENT)
    assert machine.stats["races"] == 1
    assert machine.stats["conflicts"] >= 1


def test_a_stopped_node_catches_up_when_it_starts_again() -> None:
    """A node stopped while the others keep pushing, edited by its person meanwhile,
    starts from its disk, scans everything and redials: no push is missing."""
    steps = [
        ("connect", {"a": 0, "b": 1}),
        ("connect", {"a": 1, "b": 2}),
        ("stop", {"node": 2}),
        ("write", {"node": 0, "path": "a/f", "data": b"away"}),
        ("scan", {"node": 0, "during": 10}),
        ("write", {"node": 2, "path": "g", "data": b"offline"}),
        ("deliver", {"a": 0, "b": 1, "count": 40}),
        ("start", {"node": 2}),
        ("deliver", {"a": 2, "b": 1, "count": 10}),
    ]
    machine = _passes(steps, RESIDENT)
    assert machine.stats["stops"] == 1


def test_a_directory_made_for_a_file_that_was_not_written_is_removed() -> None:
    """Node 0 deleted a/c as node 1 had; node 2's new a/c/h then reached it, whose
    manifest no peer it met still had: the materializer made the missing parent a/c to
    stage it, failed, and left a/c behind. Its next scan recorded a/c as a new
    directory, which beat the deletions: a directory deleted everywhere came back
    (campaign seed 5069). Since a deletion keeps its bytes, node 1 can write the copy:
    a/c is made for it, and when the copy is deleted too, a/c (never recorded there,
    live nowhere) must go with it (Materializer.unmake_emptied)."""
    steps = [
        ("race", {"node": 0, "path": "a/c/h", "data": b"mine", "limit": 6}),
        ("scan", {"node": 0, "during": 11}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("delete", {"node": 1, "path": "a/c"}),
        ("write", {"node": 2, "path": "a/c/h", "data": b"x" * 70_000}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("scan", {"node": 2, "during": 0}),
        ("delete", {"node": 2, "path": "a"}),
    ]
    _passes(steps, RESIDENT)


def test_a_file_written_while_a_received_rule_ignored_it_is_the_persons_edit() -> None:
    """A rule came from a peer, the person wrote a file it ignored (the watcher's scan
    left it alone), the rule went again: the next whole scan records the file, which the
    check took for the node's own applied write because the rules were back as they were
    at its last whole scan (seed 6336)."""
    steps = [
        ("stop", {"node": 1}),
        ("ignore", {"node": 2, "pattern": "*.backer-tmp", "add": True}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("race", {"node": 2, "path": "a/f", "data": b"y" * 20_000, "limit": 17}),
        ("scan", {"node": 2, "during": 10}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("write", {"node": 0, "path": "a/notes.backer-tmp", "data": b"mine"}),
        ("ignore", {"node": 2, "pattern": "*.backer-tmp", "add": False}),
    ]
    _passes(steps, frozenset({"resident", "ignore", "tmpnames"}))


def test_an_ignored_file_hides_no_missing_file_beside_it_from_the_convergence_check(
    tmp_path: Path,
) -> None:
    """A node holding an ignored file pinned every directory above it, and the check left
    out everything in those directories on every node: a file still missing beside the
    ignored one looked converged, convergence stopped a round before it arrived, and the
    lost-write check failed (seed 6135)."""
    roots = [tmp_path / "one", tmp_path / "two"]
    for root in roots:
        (root / "a").mkdir(parents=True)
    (roots[0] / ".backerignore").write_text("m*\n")
    (roots[0] / "a" / "mine").write_text("ignored")
    (roots[0] / "a" / "f").write_text("arrived here only")
    (roots[1] / "a" / "mine").write_text("not ignored here")
    ours, theirs = synced_trees(roots)
    assert "a/f" in ours and "a/f" not in theirs
    assert "a" not in ours and "a/mine" not in theirs  # above an ignored entry; the entry


def test_a_path_a_nodes_rules_ignore_is_not_expected_there_even_if_absent(
    tmp_path: Path,
) -> None:
    """A person garbled one node's ``.backerignore`` into rules that match everything,
    the file itself included: that node rightly writes nothing peers hold, and the
    convergence check took the files it lacks for a failure to converge (seed 11772)."""
    roots = [tmp_path / "one", tmp_path / "two"]
    for root in roots:
        root.mkdir()
    (roots[0] / "a").mkdir()
    (roots[0] / "a" / "x.log").write_text("written where nothing is ignored")
    (roots[1] / ".backerignore").write_bytes(b"\xaa\xd4\n*\n")
    ours, theirs = synced_trees(roots)
    assert ours == theirs == {}


def test_only_temps_a_scan_can_reach_count_as_leftovers(tmp_path: Path) -> None:
    """A temp that a failing disk left in a directory that then became ignored is out of
    every scan's reach until the rule goes (seed 6315); a temp beside an ignored file is
    in reach, and still counts."""
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
    (tmp_path / ".backerignore").write_text("b/\n*.log\n")
    (tmp_path / "a" / "x.log").write_text("ignored")
    hidden = tmp_path / "b" / temp_name("b/g", "v1")
    beside = tmp_path / "a" / temp_name("a/f", "v1")
    top = tmp_path / temp_name("f", "v1")
    for temp in (hidden, beside, top):
        temp.write_text("partial")
    assert sorted(reachable_temps(tmp_path)) == sorted([beside, top])


RETENTION = frozenset({"retention"})
REPLACED_TWICE = [  # node 1 keeps the two replaced contents of f
    ("write", {"node": 0, "path": "f", "data": b"one" * 100}),
    ("sync", {"a": 0, "b": 1, "cut": None}),
    ("write", {"node": 0, "path": "f", "data": b"two" * 100}),
    ("sync", {"a": 0, "b": 1, "cut": None}),
    ("write", {"node": 0, "path": "f", "data": b"three" * 100}),
    ("sync", {"a": 0, "b": 1, "cut": None}),
    ("cap", {"node": 1, "percent": "0%"}),
]


def test_a_capped_prune_past_the_window_frees_the_replaced_contents() -> None:
    """Time passes beyond keep-all; a node capped at 0% (set as ``backer config``
    does) prunes both replaced contents of f, as ``backer prune`` does."""
    machine = _passes([*REPLACED_TWICE, ("prune", {"node": 1, "wait": 61 * MINUTE})], RETENTION)
    assert machine.stats["pruned_versions"] >= 2
    assert machine.stats["pruned_bytes"] > 0


def test_the_harness_catches_a_prune_inside_the_retention_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the size cap allowed to drop versions replaced within keep-all, a capped
    prune a minute after the edits drops them, and the window check says so."""
    steps = [*REPLACED_TWICE, ("prune", {"node": 1, "wait": MINUTE})]
    _passes(steps, RETENTION)
    monkeypatch.setattr(prune_engine, "retained", lambda found, *rest: set())
    with pytest.raises(Failure, match="inside the 3600000 ms retention window"):
        replay(3, steps, 0, RETENTION)


def test_the_harness_catches_a_prune_that_drops_a_live_versions_only_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Node 0's person deletes a file it alone recorded, before a scan: its store
    entry holds the only bytes of a live version. A prune that no longer spares live
    contents drops them, and the check that live versions stay recoverable says so."""
    steps = [
        ("write", {"node": 0, "path": "g", "data": b"only here" * 50}),
        ("scan", {"node": 0, "during": 0}),
        ("delete", {"node": 0, "path": "g"}),
        ("prune", {"node": 0, "wait": DAY}),
    ]
    _passes(steps, RETENTION)
    real = prune_engine.candidates

    def sparing_no_live_contents(*args: Any) -> tuple[list, set[bytes], set[bytes], int]:
        found, _, retired, newest_ms = real(*args)
        return found, set(), retired, newest_ms

    monkeypatch.setattr(prune_engine, "candidates", sparing_no_live_contents)
    with pytest.raises(Failure, match="unrecoverable"):
        replay(3, steps, 0, RETENTION)


CLOCKS = frozenset({"retention", "clocks"})


def _skewed(offset: int) -> list[tuple[str, dict[str, Any]]]:
    """Node 2's clock is ``offset`` ms off from its first event on (the founder's step
    back would be held at its genesis: see docs/decisions.md), node 1's is right; node 1
    records a file of its own, then node 2 replaces f twice and node 1 learns of it,
    capped at 0% (as REPLACED_TWICE)."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("set_clock", {"node": 2, "offset": offset}),
        ("set_clock", {"node": 1, "offset": 0}),
        ("sync", {"a": 0, "b": 2, "cut": None}),  # (the joiners get the genesis)
        ("write", {"node": 1, "path": "g", "data": b"node 1's own"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    for data in (b"one" * 100, b"two" * 100, b"three" * 100):
        steps += [
            ("write", {"node": 2, "path": "f", "data": data}),
            ("sync", {"a": 2, "b": 1, "cut": None}),
        ]
    return [*steps, ("cap", {"node": 1, "percent": "0%"})]


def _author_time_only(catalog: Any) -> dict[str, int]:
    """Retention before R36: a version stopped being current at its replacer's time."""
    replaced: dict[str, int] = {}
    rows = catalog.conn.execute(
        "SELECT s.old, v.record FROM supersedes s JOIN versions v ON v.vid = s.new"
    )
    for old, record in rows:
        time_ms = Version.decode(record).time_ms
        replaced[old] = min(replaced.get(old, time_ms), time_ms)
    return replaced


def test_the_harness_catches_a_prune_by_a_clock_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Node 2's clock is three days behind; it replaces f twice, node 1 learns of it and
    prunes a minute later, capped at 0%. Aged by node 2's times (R36), the replaced
    contents went at once; the harness judges by when node 1 learned of them."""
    steps = [*_skewed(-3 * DAY), ("prune", {"node": 1, "wait": MINUTE})]
    _passes(steps, CLOCKS)
    monkeypatch.setattr(prune_engine, "replaced_at", _author_time_only)
    with pytest.raises(Failure, match=r"\(as it knew\).*inside the 3600000 ms retention window"):
        replay(3, steps, 0, CLOCKS)


def test_the_harness_catches_prune_all_keeping_what_a_clock_ahead_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Node 2's clock is three days ahead; what it replaced is younger than node 1's now,
    and ``prune --all`` kept it (R37: its age was negative, below a keep-all of 0)."""
    steps = [*_skewed(3 * DAY), ("prune_all", {"node": 1})]
    _passes(steps, CLOCKS)
    monkeypatch.setattr(  # (and R49's bound, which no longer dates a replacement ahead)
        prune_engine, "replaced_at", _author_time_only
    )
    monkeypatch.setattr(
        retention, "recent", lambda c, now_ms, policy: now_ms - c.since_ms < policy.keep_all_ms
    )
    with pytest.raises(Failure, match="prune --all kept 2 contents"):
        replay(3, steps, 0, CLOCKS)


def test_the_harness_catches_a_clock_stepped_back_dating_edits_before_the_last() -> None:
    """A clock three days ahead, set right across a reboot: the next edits must not be
    dated before the events the device recorded already (see docs/decisions.md)."""
    steps = [
        ("set_clock", {"node": 0, "offset": 3 * DAY}),
        ("write", {"node": 0, "path": "f", "data": b"one"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("reboot", {"node": 0, "offset": 0}),
        ("write", {"node": 0, "path": "f", "data": b"two"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    _passes(steps, CLOCKS)


# Seed 976053 of the default world (60 steps), shrunk: node 0 makes a conflict copy of
# its a/x.log beside node 1's, its person then writes a/x.log (the copy is no longer
# live there: its original is replaced), an hour later node 0 prunes, and only then
# learns of node 2's resolution, which deletes the copy
COPY_RETIRED_BEFORE_ITS_DELETION: list[tuple[str, dict[str, Any]]] = [
    ("write", {"node": 1, "path": "k" * 200, "data": b"y" * 20000}),
    ("reboot", {"node": 0, "offset": 0}),
    ("race", {"node": 1, "path": "a/x.log", "data": b"", "limit": 9}),
    ("scan", {"node": 1, "during": 22}),
    ("disk_fills", {"node": 0, "budget": 0, "limit": 50}),
    ("write", {"node": 0, "path": "a/x.log", "data": b"y" * 20000}),
    ("scan", {"node": 0, "during": 8}),
    ("resolve", {"node": 2, "pick": 47, "how": "keep-newest"}),
    ("prune", {"node": 0, "wait": 3669215}),
]


def test_a_prune_is_not_undone_by_a_replacement_learned_after_it() -> None:
    """Node 0 pruned the conflict copy an hour after it stopped being live there (its
    original replaced), which the window allows; the deletion of the copy that reached
    it afterwards dated the copy's end to then, and the harness took the prune for one
    inside the window."""
    try:
        replay(3, COPY_RETIRED_BEFORE_ITS_DELETION, 976053, DEFAULT_WORLD)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_the_harness_catches_a_copy_pruned_within_the_window_after_it_retired() -> None:
    """The window runs from when a version stopped being live, not from when it was
    learned: the copy, held an hour before its original is replaced, dropped a minute
    after that, is a prune inside the window."""
    steps = COPY_RETIRED_BEFORE_ITS_DELETION[:5]
    steps += [("prune", {"node": 0, "wait": 61 * MINUTE}), *COPY_RETIRED_BEFORE_ITS_DELETION[5:7]]
    machine = ClusterMachine(3, 976053, DEFAULT_WORLD)
    try:
        for name, arguments in steps:
            getattr(machine, name)(**arguments)
        cluster = machine.cluster
        share = cluster.nodes[0].open()
        live = {vid for (vid,) in share.catalog.conn.execute("SELECT vid FROM live")}
        [copy] = [
            vid
            for vid, path in share.catalog.conn.execute("SELECT vid, path FROM versions")
            if CONFLICT_MARK in path and vid not in live
        ]
        assert cluster.learned is not None
        now_ms = cluster.learned.clock.reading("node0") + MINUTE
        check_retention_window(cluster, [0], cluster.learned)
        with share.db.conn:
            Store(share.root, share.catalog).note_pruned([copy], now_ms)
        with pytest.raises(InvariantBroken, match=f"pruned {copy}.*as it knew"):
            check_retention_window(cluster, [0], cluster.learned)
    finally:
        machine.abandon()


REVISIONS = frozenset({"revisions", "strict"})


def test_a_deleted_file_restored_on_another_node_is_a_new_version_everywhere() -> None:
    """Node 2 restores the first version of a file node 0 edited and then deleted: it
    is recorded as a new version (history only grows), and every node converges on it."""
    steps = [
        ("write", {"node": 0, "path": "a/f", "data": b"first" * 30}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("write", {"node": 0, "path": "a/f", "data": b"second" * 30}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("delete", {"node": 0, "path": "a/f"}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("restore_version", {"node": 2, "path": "a/f", "pick": 0}),
    ]
    assert _passes(steps, REVISIONS).stats["revised"] == 1


def test_a_folder_restored_to_a_moment_before_a_bulk_delete_comes_back() -> None:
    """Node 1 brings folder a back to the moment its last file was written, after node 0
    deleted the folder: every file comes back as a new version, on every node."""
    steps = [
        ("write", {"node": 0, "path": "a/f", "data": b"one"}),
        ("write", {"node": 0, "path": "a/c/h", "data": b"two"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("delete", {"node": 0, "path": "a"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("restore_at", {"node": 1, "path": "a", "pick": 0}),
    ]
    assert _passes(steps, REVISIONS).stats["revised"] == 1


@pytest.mark.parametrize("how", ["keep", "keep-both", "keep-newest"])
def test_a_resolved_conflict_leaves_no_copy_on_any_node(how: str) -> None:
    """Two nodes write f concurrently; node 1 resolves the conflict (each way): once
    quiet, no node has the conflict copy (keep-both: it is an ordinary file)."""
    steps = [
        ("write", {"node": 0, "path": "f", "data": b"zero"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("write", {"node": 1, "path": "f", "data": b"one"}),
        ("write", {"node": 0, "path": "f", "data": b"other"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("resolve", {"node": 1, "pick": 1, "how": how}),
    ]
    machine = _passes(steps, REVISIONS)
    assert machine.stats["revised"] == 1
    assert machine.resolved


def test_a_resolved_copy_that_another_device_records_again_stays_superseded() -> None:
    """A race gives node 0 a conflict at a/c and node 2 the same conflict copy (its id
    is the same everywhere); node 0 resolves it, deleting the copy. The copy added on
    node 2 concurrently with that deletion came back live on every node, beside the
    deletion that supersedes it (seed 11882)."""
    steps = [
        ("race", {"node": 0, "path": "a/c", "data": b"same", "limit": 24}),
        ("scan", {"node": 0, "during": 28}),
        ("resolve", {"node": 0, "pick": 48, "how": "keep-newest"}),
    ]
    try:
        machine = replay(3, steps, 11882, RESIDENT | {"revisions"})
    except Failure as failure:
        pytest.fail(failure.reason)
    assert machine.resolved


def test_a_resolution_leaves_a_persons_file_at_a_copys_path_alone() -> None:
    """The person wrote a file at the path of a conflict copy the node had planned but
    not yet written; the scan recorded it beside the copy. Resolving the conflict
    deleted the copy's path on disk — the person's file, which the deletion did not
    replace (seed 28)."""
    steps = [
        ("race", {"node": 1, "path": "a/c/h", "data": b"early", "limit": 7}),
        ("symlink", {"node": 1, "path": "a/f", "link": "f"}),
        ("write", {"node": 2, "path": "b/g", "data": b"other"}),
        ("write", {"node": 1, "path": "b/g", "data": b"mine, written last"}),
        ("scan", {"node": 1, "during": 18}),
        ("deliver", {"a": 0, "b": 1, "count": 19}),
        ("resolve", {"node": 1, "pick": 17, "how": "keep-newest"}),
        ("connect", {"a": 1, "b": 2}),
        ("race", {"node": 1, "path": "a/f", "data": b"same", "limit": 57}),
        ("resolve", {"node": 1, "pick": 98, "how": "keep-newest"}),
    ]
    try:
        machine = replay(3, steps, 28, RESIDENT | {"revisions"})
    except Failure as failure:
        pytest.fail(failure.reason)
    assert machine.stats["races"] == 2


def test_a_resolution_its_device_lost_to_an_old_backup_resolved_nothing() -> None:
    """(harness) Node 1 resolves a conflict, then comes back from a backup taken before
    it, and nobody had the resolution: it is forgotten and the copy stays, as it should
    (seed 119 took that for a copy left behind)."""
    steps = [
        ("write", {"node": 1, "path": "f", "data": b"other"}),
        ("backup", {"node": 1}),
        ("sync", {"a": 0, "b": 1, "cut": 28}),
        ("write", {"node": 0, "path": "f", "data": b'\x02/"\xe6\xd3\xfa{P\xbe\xa3'}),
        ("toggle_exec", {"node": 1, "path": "f"}),
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("resolve", {"node": 1, "pick": 13, "how": "keep-newest"}),
        ("restore", {"node": 1}),
    ]
    try:
        machine = replay(3, steps, 119, frozenset({"revisions", "strict", "faults", "ignore"}))
    except Failure as failure:
        pytest.fail(failure.reason)
    assert machine.stats["revised"] == 1 and machine.stats["restores"] == 1


def test_a_restore_that_writes_nothing_says_so_instead_of_restored() -> None:
    """A file version restored where a folder now stands (another device wrote inside
    it) was not written, yet the restore answered "restored" and recorded no new
    version (seed 13842 of the full default world)."""
    try:
        run_seed(13842, 3, 60, BEFORE_EXFAT - {"fills", "clocks", "kills"})  # its world
    except Failure as failure:
        pytest.fail(failure.reason)


HOSTILE = frozenset({"hostile"})


@pytest.mark.parametrize(("seed", "nodes", "steps"), [(2, 3, 40), (114, 3, 40)])
def test_hostile_seeds_that_once_failed(seed: int, nodes: int, steps: int) -> None:
    """Seeds of the hostile world that found bugs: a directory recorded again for the
    mtime a waiting window's missing parent moved, though that parent was adopted as
    the live version it equals (2); the harness's person writing through a hostile
    link to ``../..`` beside the sandboxes (114)."""
    assert run_seed(seed, nodes, steps, HOSTILE)["steps"] == steps


def test_a_person_moves_nothing_through_a_hostile_link_out_of_their_box() -> None:
    """Seed 171024 (hostile,disk,fills,ignore,unicode; 150 steps), shrunk: the hostile
    member (node 1) records ``b`` as a link to ``../..``, which its own disk holds as
    it is; its person then moves ``g`` to ``b/g``, into the folder holding the
    sandboxes. That is the person's own write through a link (mv follows it as the
    kernel does), not backer's, yet the harness let it happen and blamed a node ("a
    node wrote beside the sandboxes: ['g']"): a person's edit stayed in their box only
    for the paths it writes, not for those it moves, deletes or makes folders at."""
    steps = [
        ("craft", {"kind": "kind_change", "pick": 38}),
        ("write", {"node": 1, "path": "g", "data": b"other"}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("rename", {"node": 1, "source": "g", "destination": "b/g"}),
    ]
    world = frozenset({"hostile", "disk", "fills", "ignore", "unicode"})
    try:
        replay(3, steps, 171024, world)
    except Failure as failure:
        pytest.fail(failure.reason)


MET = [("sync", {"a": 0, "b": 1, "cut": None}), ("sync", {"a": 0, "b": 2, "cut": None})]
MET += [("sync", {"a": 1, "b": 2, "cut": None})]  # every node has the share's history


def test_a_hostile_member_writes_nothing_outside_any_share_and_is_refused_with_reasons() -> None:
    """Links out of the share (to its sandbox, its parent, a sentinel) with files
    recorded through them, a .backerignore that is a link, bad paths and a lying size:
    every node's sandbox holds only its share and home, the honest nodes converge, and
    each refusal of the hostile member is counted with its reason."""
    crafts = [("craft", {"kind": k, "pick": p}) for k, p in [("escape_link", 1),
              ("escape_link", 2), ("nested_link", 3), ("ignore_link", 0),
              ("lying_size", 3), ("bad_path", 0), ("bad_path", 9)]]  # fmt: skip
    again = [("sync", {"a": a, "b": b, "cut": None}) for a, b in [(0, 1), (0, 2), (1, 2)]]
    machine = _passes(MET + crafts[:5] + again + crafts[5:] + again, HOSTILE)
    hostile = machine.cluster.hostile
    assert hostile is not None and hostile.crafts == len(crafts)
    assert any("bad entry" in reason for reason in hostile.refusals), hostile.refusals


@pytest.mark.parametrize("kind", ["stingy", "hoard"])
def test_a_hostile_member_that_gives_nothing_holds_nothing_up(kind: str) -> None:
    """The hostile member answers every chunk request saying it lacks each chunk (R71),
    or never ends a run of its events (R70); each node writes a file, and the syncs go
    through the hostile one first: the honest nodes get each other's files from each
    other all the same, and converge among themselves."""
    paths = ["f", "g", "a/f"]
    steps = [*MET, ("craft", {"kind": kind, "pick": 0})]
    for n in (0, 1, 2):
        steps.append(("write", {"node": n, "path": paths[n], "data": bytes([n]) * 70_000}))
    steps += [("scan", {"node": n}) for n in (0, 1, 2)]
    pairs = [(0, 2), (1, 2), (0, 1), (1, 2), (0, 2), (0, 1)]
    steps += [("sync", {"a": a, "b": b, "cut": None}) for a, b in pairs]
    machine = _passes(steps, HOSTILE)
    assert machine.cluster.hostile is not None and getattr(machine.cluster.hostile, kind)


def test_the_harness_catches_a_peer_path_with_dot_dot_accepted() -> None:
    """With the path check broken to let '..' through (a fix of the past undone), the
    hostile member's '../outside/pwn' is stored by an honest node, and the harness
    says so."""
    steps = [*MET, ("craft", {"kind": "bad_path", "pick": 0}), *MET]
    _passes(steps, HOSTILE)
    real = paths.check

    def lax(path: str) -> str:
        return path if ".." in path.split("/") else real(path)

    state.check = lax  # type: ignore[assignment]
    try:
        with pytest.raises(Failure, match=r"outside its share|accepted the path"):
            replay(3, steps, 0, HOSTILE)
    finally:
        state.check = real  # type: ignore[assignment]


def test_the_harness_catches_a_symlinked_parent_followed_when_writing() -> None:
    """With the materializer following a link in a file's parent path (the fix of the
    past undone), the file a hostile member records below its link ``f`` -> ``..`` is
    written into the sandbox beside the share, and the harness says so (seed 54's
    shrunk trace)."""
    steps = [
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("craft", {"kind": "escape_link", "pick": 48}),
        ("sync", {"a": 2, "b": 1, "cut": None}),
        ("craft", {"kind": "through_link", "pick": 19}),
        ("sync", {"a": 2, "b": 1, "cut": None}),
    ]
    try:
        replay(3, steps, 54, HOSTILE)
    except Failure as failure:
        pytest.fail(failure.reason)
    real = Materializer._target

    def following(self: Materializer, path: str) -> InShare:
        (self.root / path).parent.mkdir(parents=True, exist_ok=True)  # through any link
        return InShare.of(self.dirs, path)

    Materializer._target = following  # type: ignore[method-assign]
    flags = dirs.DIRECTORY_FLAGS
    dirs.DIRECTORY_FLAGS = flags & ~os.O_NOFOLLOW
    try:
        with pytest.raises(Failure, match="wrote outside its share"):
            replay(3, steps, 54, HOSTILE)
    finally:
        Materializer._target = real  # type: ignore[method-assign]
        dirs.DIRECTORY_FLAGS = flags


def test_the_harness_catches_a_file_created_by_its_path_while_its_folder_is_swapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the materializer creating temp files by their path again (parents checked,
    then the file opened by name: the race of R26), the boxed nodes' person, who swaps a
    folder for a link to the sandbox's outside/ around backer's file creations, gets
    temp files written there, and the harness says so."""
    try:
        run_seed(3, 3, 40, HOSTILE)
    except Failure as failure:
        pytest.fail(failure.reason)

    def by_name(self: InShare, flags: int, mode: int = 0o777) -> int:
        return os.open(self.path, flags | os.O_NOFOLLOW, mode)

    # (a function of backer.fs.dirs: the fault layer acts on backer's own calls only)
    by_name = types.FunctionType(by_name.__code__, vars(dirs), "open", by_name.__defaults__)
    monkeypatch.setattr(InShare, "open", by_name)
    with pytest.raises(Failure, match="wrote outside its share"):
        run_seed(3, 3, 40, HOSTILE)


def test_a_disk_that_fills_mid_window_lists_what_it_left_out_then_converges() -> None:
    """The disk fills after a window started (its free space check passed) while the
    writer thread writes the received chunks: the window stops, and each file it did not
    write is among the node's problems (a disk full in the writer thread left an empty
    report: the file was dropped without a word, R32). Once the disk is freed, the next
    sync writes everything."""
    steps = [
        ("write", {"node": 0, "path": "f", "data": b"x" * 70_000}),
        ("write", {"node": 0, "path": "a/f", "data": b"y" * 70_000}),
        ("scan", {"node": 0}),
        ("connect", {"a": 0, "b": 1}),
        ("disk_fills", {"node": 1, "budget": 5_000, "limit": 40}),
        ("deliver", {"a": 0, "b": 1, "count": 40}),
        ("disk_freed", {"node": 1}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
    ]
    machine = _passes(steps, frozenset({"disk"}))
    assert machine.cluster.disks.injected["write ENOSPC"]


def test_a_tree_deeper_than_the_recursion_limit_is_watched_synced_and_checked() -> None:
    """A chain of 1,107 nested folders with files at two depths: the watcher walks it
    (its walks recursed: RecursionError killed its thread, R35), the receiver makes it
    opening each folder from the one above (each open and check walked from the share's
    root: O(depth²) opens, minutes of a blocked loop, R34), and every check of the
    harness walks it without recursing."""
    steps = [
        ("deep", {"node": 0, "op": "grow", "level": 0, "data": b"bottom"}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("deep", {"node": 1, "op": "grow", "level": 0, "data": b"deeper"}),
        ("deep", {"node": 1, "op": "write", "level": 700, "data": b"middle"}),
        ("sync", {"a": 1, "b": 0, "cut": None}),
    ]
    assert _passes(steps, frozenset({"deep"})).stats["edits"] == 3


def test_the_harness_catches_a_saved_file_replaced_by_a_rename(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the window moving files to a path it found empty by ``os.replace`` again
    (R43's race: a look, then a rename that replaces whatever came meanwhile), the
    person who saves a file there between the two loses it, and the harness says so."""
    try:
        run_seed(515100, 3, 60, BEFORE_KILLS)
    except Failure as failure:
        pytest.fail(failure.reason)

    def replacing(self: InShare, target: InShare) -> None:
        with self.dirs.at(self.parent) as source, self.dirs.at(target.parent) as into:
            os.replace(self.name, target.name, src_dir_fd=source, dst_dir_fd=into)

    # (a function of backer.fs.dirs: the fault layer acts on backer's own calls only)
    replacing = types.FunctionType(replacing.__code__, vars(dirs), "rename_new")
    monkeypatch.setattr(InShare, "rename_new", replacing)
    with pytest.raises(Failure, match="a file the person had just saved was replaced"):
        run_seed(515100, 3, 60, BEFORE_KILLS)


Z = b"Z" * 24
KILLED_TRACES = {  # seed: a shrunk trace of default world + kills that failed
    3: [  # a prune by a share restored from an older copy: its announcement escaped
        ("kill", {"node": 2, "op": "sync", "nth": 6, "other": 0, "pick": 95}),
        ("write", {"node": 2, "path": "g", "data": Z}),
        ("scan", {"node": 2, "during": 18}),
        ("disk_fills", {"node": 2, "budget": 0, "limit": 58}),
        ("append", {"node": 1, "path": "g", "data": Z}),
        ("scan", {"node": 1, "during": 11}),
        ("backup", {"node": 1}),
        ("write", {"node": 1, "path": "b/g", "data": b""}),
        ("scan", {"node": 1, "during": 16}),
        ("restore", {"node": 1}),
        ("kill", {"node": 1, "op": "prune", "nth": 3, "other": 0, "pick": 76}),
    ],
    20: [  # the person saved where a restore --at was about to rename a file: two
        ("sync", {"a": 0, "b": 1, "cut": None}),  # changes of node 2, neither replacing
        ("write", {"node": 1, "path": "a/F", "data": b"one" * 20}),  # anything (the
        ("scan", {"node": 1, "during": 0}),  # check's)
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("write", {"node": 0, "path": "f", "data": b"two" * 20}),
        ("write", {"node": 2, "path": "a/F", "data": b"three" * 20}),
        ("scan", {"node": 2, "during": 27}),
        ("kill", {"node": 1, "op": "restore", "nth": 2, "other": 0, "pick": 44}),
        ("write", {"node": 0, "path": "a/c/h", "data": b"four" * 20}),
        ("deliver", {"a": 2, "b": 0, "count": 20}),
        ("deliver", {"a": 0, "b": 1, "count": 31}),
        ("disconnect", {"a": 2, "b": 1}),
        ("write", {"node": 0, "path": "F", "data": b"five" * 20}),
        ("scan", {"node": 0, "during": 2}),
        ("truncate", {"node": 2, "path": "a/F"}),
        ("scan", {"node": 2, "during": 25}),
        ("restore_at", {"node": 2, "path": "a", "pick": 40}),
        ("kill", {"node": 2, "op": "restore", "nth": 1, "other": 0, "pick": 57}),
    ],
    2225: [  # the person saved at a copy's path before the window's rename: their file
        ("sync", {"a": 0, "b": 1, "cut": None}),  # beside the copy, which names the
        ("write", {"node": 1, "path": "a/f", "data": b"other"}),  # device of the
        ("sync", {"a": 1, "b": 2, "cut": None}),  # version it carries (the check's)
        ("race", {"node": 1, "path": "x.log", "data": Z, "limit": 42}),
        ("scan", {"node": 1, "during": 28}),
        ("write", {"node": 1, "path": "n" * 255, "data": b"C(ps"}),
        ("scan", {"node": 1, "during": 20}),
        ("scan", {"node": 0, "during": 7}),
        ("kill", {"node": 0, "op": "deliver", "nth": 3, "other": 2, "pick": 37}),
    ],
    2295: [  # the device's deletion of a copy (a resolution) beside the file the person
        ("reboot", {"node": 2, "offset": 0}),  # saved at its path: two changes
        ("write", {"node": 1, "path": "a/F", "data": b"other"}),  # (the check's)
        ("write", {"node": 2, "path": "a/" + "m" * 240, "data": Z}),
        ("scan", {"node": 2, "during": 27}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("race", {"node": 1, "path": "a/c", "data": Z, "limit": 1}),
        ("scan", {"node": 1, "during": 0}),
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("disconnect", {"a": 2, "b": 0}),
        ("scan", {"node": 2, "during": 15}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("crash", {"node": 0}),
        ("resolve", {"node": 0, "pick": 18, "how": "keep"}),
        ("kill", {"node": 0, "op": "scan", "nth": 3, "other": 2, "pick": 11}),
    ],
    2277: [  # a scan killed between its events and the notes of what they replace (R48)
        ("race", {"node": 0, "path": "notes.backer-tmp", "data": Z, "limit": 49}),
        ("delete", {"node": 2, "path": "notes.backer-tmp"}),
        ("kill", {"node": 2, "op": "restore", "nth": 3, "other": 1, "pick": 89}),
    ],
    2280: [  # a restore killed after removing a file whose version its copy carries
        ("reboot", {"node": 0, "offset": -86400000}),
        ("ignore", {"node": 0, "pattern": "*.log", "add": False}),
        ("scan", {"node": 0, "during": 9}),
        ("race", {"node": 1, "path": "notes.backer-tmp", "data": Z, "limit": 19}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("kill", {"node": 1, "op": "sync", "nth": 5, "other": 1, "pick": 94}),
        ("sync", {"a": 2, "b": 0, "cut": None}),
        ("scan", {"node": 1, "during": 18}),
        ("scan", {"node": 0, "during": 2}),
        ("kill", {"node": 0, "op": "restore", "nth": 6, "other": 0, "pick": 44}),
    ],
    6033: [  # a conflict copy nothing supersedes, learned late: aged by its author's time
        ("symlink", {"node": 1, "path": "a/" + "m" * 240, "link": "a/c"}),
        ("write", {"node": 1, "path": "notes.backer-tmp", "data": b"other"}),
        ("kill", {"node": 0, "op": "scan", "nth": 3, "other": 2, "pick": 98}),
        ("kill", {"node": 1, "op": "sync", "nth": 14, "other": 2, "pick": 92}),
        ("deliver", {"a": 1, "b": 0, "count": 24}),
        ("reboot", {"node": 2, "offset": 0}),
        ("race", {"node": 2, "path": "a/F", "data": b"other", "limit": 14}),
        ("scan", {"node": 2, "during": 19}),
        ("cap", {"node": 1, "percent": "0%"}),
        ("deliver", {"a": 1, "b": 0, "count": 23}),
        ("delete", {"node": 1, "path": "a/F"}),
        ("scan", {"node": 1, "during": 0}),
        ("restore_version", {"node": 2, "path": "a/" + "m" * 240, "pick": 58}),
        ("prune", {"node": 0, "wait": 3024029564}),
        ("write", {"node": 0, "path": "a/re\u0301sume\u0301", "data": b"y" * 20_000}),
        ("deliver", {"a": 1, "b": 0, "count": 27}),
    ],
}


@pytest.mark.parametrize("seed", sorted(KILLED_TRACES))
def test_killed_operations_that_once_failed(seed: int) -> None:
    """Traces of the ``kills`` family (docs/simulations.md, "Kill points"), each with
    the seed it was drawn from (a person's save before a rename comes from it)."""
    try:
        replay(3, KILLED_TRACES[seed], seed, BEFORE_EXFAT)
    except Failure as failure:
        pytest.fail(failure.reason)


NESTED_RESTORE = [  # seed 977032 of disk,faults,kills,nolinks,durability (60 steps)
    ("sync", {"a": 0, "b": 2, "cut": None}),
    ("write", {"node": 2, "path": "a/f", "data": b"same"}),
    ("symlink", {"node": 0, "path": "f", "link": "f"}),
    ("connect", {"a": 2, "b": 1}),
    ("connect", {"a": 0, "b": 1}),
    ("write", {"node": 2, "path": "b/g", "data": b"same"}),
    ("write", {"node": 0, "path": "a/c/h", "data": b"other"}),
    ("write", {"node": 0, "path": "g", "data": b"x" * 70_000}),
    ("kill", {"node": 2, "op": "restore", "nth": 6, "other": 2, "pick": 0}),
    ("write", {"node": 2, "path": "a/f", "data": b"y" * 84}),
    ("sync", {"a": 0, "b": 2, "cut": 17}),
    ("kill", {"node": 2, "op": "restore", "nth": 25, "other": 2, "pick": 55}),
]


def test_a_folder_whose_subfolder_a_killed_restore_emptied_keeps_its_version() -> None:
    """A restore --at to a moment before ``a/c/h`` was made removed it and put back an
    older ``a/f``, and was killed before its commit: the next scan took the removal for
    the recorded deletion and ``a/f`` for the restored version, and kept ``a/c``'s
    version for its moved time, but recorded ``a`` anew, since one of its entries
    (``a/c``) had changed: an edit nobody made, sent to every device."""
    world = frozenset({"disk", "faults", "kills", "nolinks", "durability"})
    try:
        replay(3, NESTED_RESTORE, 977032, world)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_the_harness_takes_a_crafted_contents_conflict_copy_as_blocked() -> None:
    """A hostile member's version of a content nobody holds, moved by a conflict to a
    copy's name: one honest node kept the file it had there (it cannot write the
    crafted bytes), the other had none, and the harness took it for divergence, since
    the copy's id is not one the member recorded (seed 818319, 60 steps)."""
    try:
        run_seed(818319, 3, 60, frozenset({"hostile", "clocks", "resident", "retention"}))
    except Failure as failure:
        pytest.fail(failure.reason)


def test_conflict_copies_of_long_names_settle() -> None:
    """Seed 130395 (default world, 60 steps): a 240-byte name's conflict copies, their
    names cut to NAME_MAX, came back two copies later to a name already taken; the
    linked nodes resolved the two paths into each other without end (78,000 versions
    in 8 minutes, 21 live) and the campaign never finished."""
    try:
        run_seed(130395, 3, 60, BEFORE_KILLS)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_a_deletion_made_while_a_restored_node_waits_for_its_events_is_recorded() -> None:
    """Seed 140717 (default world, 60 steps), shrunk: node 2 comes back from a backup
    taken before it wrote ``a/m×240``; its person deletes the file and its watcher scans
    while a rebooted peer gives the node its events back. The scan's walk had compared
    the disk with the older copy's catalog, which knew nothing of the file, and the
    deletion was recorded only at the next whole scan ("recorded its own applied writes
    as edits")."""
    long_name = "a/" + "m" * 240
    steps = [
        ("backup", {"node": 2}),
        ("sync", {"a": 2, "b": 1, "cut": None}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("write", {"node": 2, "path": long_name, "data": b"same"}),
        ("scan", {"node": 2, "during": 27}),
        ("scan", {"node": 2, "during": 23}),
        ("restore", {"node": 2}),
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("reboot", {"node": 0, "offset": 0}),
        ("delete", {"node": 2, "path": long_name}),
        ("scan", {"node": 2, "during": 13}),
    ]
    try:
        replay(3, steps, 140717, BEFORE_EXFAT)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_a_copy_a_node_recorded_itself_goes_when_a_copy_of_it_supersedes_it() -> None:
    """Seed 140479 (default world, 60 steps), shrunk: a conflict at ``a/résumé`` gives a
    copy that node 2 records as well, concurrently with node 1's second conflict, which
    moves the copy to a copy's copy. The move supersedes the copy at the copy's name;
    node 2 learned of it after its own record and kept the copy live, and the cluster
    never converged (node 2 alone kept the copy on disk)."""
    steps = [
        ("reboot", {"node": 0, "offset": 0}),
        ("race", {"node": 0, "path": "a/re\u0301sume\u0301", "data": b"", "limit": 38}),
        ("scan", {"node": 0, "during": 15}),
        ("write", {"node": 1, "path": "a/x.log", "data": b"x" * 70_000}),
        ("scan", {"node": 1, "during": 21}),
        ("scan", {"node": 1, "during": 8}),
        ("prune", {"node": 1, "wait": 86422186}),
        ("restore_at", {"node": 0, "path": "", "pick": 93}),
    ]
    try:
        replay(3, steps, 140479, BEFORE_EXFAT)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_a_deleted_files_kept_bytes_are_noted_once_a_restored_node_records_again() -> None:
    """Seed 172039 (the default world before nolinks and plainrename; 150 steps), shrunk: node 0's
    ``.backer/`` comes back from a backup taken before two events of its own that
    reached no peer; its person deletes ``F`` and the node is killed in a sync. Its
    scans wait for those events (as ``backer scan`` says), so the deletion is not
    recorded and the chunk index still finds F's bytes at ``F``, not at the store's
    entry: the harness called them kept where no read finds them, though a restore
    reads the entry. Once the person gives the events up (``--forget-lost-history``)
    the next scan records the deletion and notes the bytes at the entry."""
    steps = [
        ("connect", {"a": 1, "b": 0}),
        ("scan", {"node": 0, "during": 16}),
        ("write", {"node": 1, "path": "F", "data": b"F" * 73}),
        ("scan", {"node": 1, "during": 4}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("sync", {"a": 0, "b": 1, "cut": None}),
        ("backup", {"node": 0}),
        ("race", {"node": 1, "path": "a/notes.backer-tmp", "data": b"n" * 300, "limit": 42}),
        ("scan", {"node": 1, "during": 29}),
        ("scan", {"node": 1, "during": 21}),
        ("restore", {"node": 0}),
        ("delete", {"node": 0, "path": "F"}),
        ("kill", {"node": 0, "op": "sync", "nth": 1, "other": 2, "pick": 71}),
    ]
    machine = ClusterMachine(3, 172039, BEFORE_EXFAT)
    try:
        for name, arguments in steps:
            getattr(machine, name)(**arguments)
        share = machine.cluster.nodes[0].open()
        assert share.forget_lost_history() == 2
        machine.scan(0)
        assert [v.kind for v in share.catalog.live_versions("F").values()] == [Kind.DELETED]
        check_kept_readable(machine.cluster, 0)
        machine.teardown()
    except InvariantBroken as broken:
        machine.abandon()
        pytest.fail(str(broken))


def test_a_restored_node_notes_the_bytes_it_kept_after_the_backup_once_back_in_step() -> None:
    """Seed 991056 (``faults,kills,nolinks,nomodes,resident,unseen``, 60 steps), shrunk:
    after node 0's backup, its person rewrote ``a/f``; the scan kept the first bytes in
    the store and noted them at the store's entry. Back from the backup and given its
    events again, the node's older chunk index still found them at ``a/f``, which holds
    the second bytes, and no scan corrected it: kept where no read finds them."""
    steps = [
        ("write", {"node": 0, "path": "a/f", "data": b"f" * 227}),
        ("scan", {"node": 0, "during": 27}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("backup", {"node": 0}),
        ("write", {"node": 0, "path": "a/f", "data": b"g" * 111}),
        ("scan", {"node": 0, "during": 15}),
        ("scan", {"node": 2, "during": 21}),
        ("restore", {"node": 0}),
        ("sync", {"a": 2, "b": 0, "cut": None}),
        ("kill", {"node": 0, "op": "restore", "nth": 3, "other": 1, "pick": 10}),
    ]
    try:
        replay(3, steps, 991056, frozenset({"kills", "resident"}))
    except Failure as failure:
        pytest.fail(failure.reason)


UNREAD_AFTER_A_KILL = [  # seed 982196 (default world, 60 steps), shrunk; its bytes simplified
    ("faults", {"node": 1, "seed": 485518768, "rate": 0.3}),
    ("sync", {"a": 1, "b": 0, "cut": None}),
    ("write", {"node": 1, "path": "a/x.log", "data": b"x" * 247}),
    ("scan", {"node": 1, "during": 19}),
    ("deliver", {"a": 0, "b": 1, "count": 5}),
    ("write", {"node": 1, "path": "a/f", "data": b"f" * 227}),
    ("kill", {"node": 1, "op": "restore", "nth": 6, "other": 2, "pick": 78}),
]


def _unindexed_after_a_kill(machine: ClusterMachine) -> tuple[Share, bytes]:
    """Run UNREAD_AFTER_A_KILL: node 1's ``restore --at`` scans first, records ``a/f``
    (events, unsettled cache entry, the store's link) and is killed at the commit of
    its chunk index; the restart's scan, on the failing disk, cannot read ``a/f``. Its
    share and a/f's content, whose chunks the index finds nowhere."""
    for name, arguments in UNREAD_AFTER_A_KILL:
        getattr(machine, name)(**arguments)
    share = machine.cluster.nodes[1].open()
    entry = share.catalog.local_entries(["a/f"])["a/f"]
    content = share.catalog.version(entry.version_id).content
    manifest = share.catalog.manifest(content)
    assert not entry.settled and content in Store(share.root, share.catalog).contents()
    assert [p.reason for _, p, _ in share.catalog.problems("scan") if p.path == "a/f"] == [
        "cannot read: Input/output error"
    ]
    assert not any(share.catalog.chunk_locations(ref.hash) for ref in manifest.chunks)
    return share, content


def test_a_file_a_killed_scan_recorded_and_its_restart_could_not_read_waits_for_its_index() -> None:
    """Seed 982196 (default world, 60 steps), shrunk: the harness called a/f's content
    kept where no read finds it. backer did right: the content is a/f's live one, the
    scan cache says a/f is still to be hashed and indexed (as after any kill between a
    scan's events and its index), the person is told the disk could not read it, and
    the next scan that can read it indexes it. The check leaves such a content alone;
    once the disk reads again, a scan makes it readable (see the next test for what is
    still caught)."""
    machine = ClusterMachine(3, 982196, DEFAULT_WORLD)
    try:
        share, content = _unindexed_after_a_kill(machine)  # (the kill's checks passed)
        machine.faults_stop(1)
        machine.scan(1)
        [chunk] = share.catalog.manifest(content).chunks
        with machine.cluster.disks.paused():
            assert ChunkStore(share.root, share.catalog).read(chunk.hash) == b"f" * 227
            check_kept_readable(machine.cluster, 1)
        machine.teardown()
    except InvariantBroken as broken:
        machine.abandon()
        pytest.fail(str(broken))


def test_a_kept_content_no_scan_will_index_is_still_caught() -> None:
    """The exception above needs both: the file's cache entry unsettled (else no scan
    hashes it again) and a problem of the last scan at it or a folder above it (else
    that scan read it and should have indexed it). Without either, a/f's unindexed
    content is "kept where no read finds it"."""
    machine = ClusterMachine(3, 982196, DEFAULT_WORLD)
    try:
        share, _ = _unindexed_after_a_kill(machine)
        entry = share.catalog.local_entries(["a/f"])["a/f"]
        with machine.cluster.disks.paused():
            with share.db.conn:
                share.catalog.set_local([entry._replace(settled=True)])
            with pytest.raises(InvariantBroken, match="where no read finds it"):
                check_kept_readable(machine.cluster, 1)
            with share.db.conn:
                share.catalog.set_local([entry])
                share.db.conn.execute("DELETE FROM problems WHERE path = 'a/f'")
            with pytest.raises(InvariantBroken, match="where no read finds it"):
                check_kept_readable(machine.cluster, 1)
    finally:
        machine.abandon()


def test_a_copys_version_a_killed_window_wrote_from_an_older_plan_is_not_an_edit() -> None:
    """Seed 172084 (the default world before nolinks and plainrename; 60 steps), shrunk:
    node 1's ``F`` loses a conflict to node 0's and goes to its copy; node 1's person
    saves a file of their own at the copy's name just before node 1 writes the copy
    there, so the copy loses in turn and moves to a copy's copy. Node 0 planned while
    the first copy was live at that name, learned of the second conflict meanwhile,
    went on with its plan and was killed after moving the copy's bytes into place,
    before their cache entry: its next scan recorded them as its own new file there
    ("recorded its own applied writes as edits"), a third conflict at the name."""
    steps = [
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("sync", {"a": 0, "b": 2, "cut": 19}),
        ("write", {"node": 0, "path": "b/g", "data": b"other"}),
        ("scan", {"node": 0, "during": 25}),
        ("sync", {"a": 1, "b": 0, "cut": 6}),
        ("write", {"node": 1, "path": "a/x.log", "data": b""}),
        ("scan", {"node": 1, "during": 8}),
        ("write", {"node": 0, "path": "notes.backer-tmp", "data": b"x" * 70_000}),
        ("race", {"node": 2, "path": "x.log", "data": b"same", "limit": 3}),
        ("scan", {"node": 2, "during": 16}),
        ("write", {"node": 2, "path": "a/f", "data": b"g" * 17}),
        ("scan", {"node": 2, "during": 16}),
        ("write", {"node": 0, "path": "n" * 255, "data": b"y" * 20_000}),
        ("restore_at", {"node": 2, "path": "b", "pick": 49}),
        ("scan", {"node": 0, "during": 29}),
        ("sync", {"a": 1, "b": 0, "cut": None}),
        ("write", {"node": 1, "path": "caf\u00e9", "data": b""}),
        ("scan", {"node": 1, "during": 3}),
        ("disk_fills", {"node": 0, "budget": 60000, "limit": 45}),
        ("race", {"node": 2, "path": "b/g", "data": b"same", "limit": 33}),
        ("scan", {"node": 2, "during": 20}),
        ("write", {"node": 1, "path": "F", "data": b"f" * 200}),
        ("scan", {"node": 1, "during": 12}),
        ("mkdir", {"node": 0, "path": "a/c"}),
        ("scan", {"node": 0, "during": 24}),
        ("scan", {"node": 0, "during": 16}),
        ("disk_freed", {"node": 0}),
        ("race", {"node": 1, "path": "notes.backer-tmp", "data": b"r" * 150, "limit": 10}),
        ("deliver", {"a": 2, "b": 0, "count": 6}),
        ("restore_version", {"node": 1, "path": "n" * 255, "pick": 12}),
        ("scan", {"node": 0, "during": 20}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("kill", {"node": 0, "op": "deliver", "nth": 5, "other": 1, "pick": 49}),
    ]
    try:
        replay(3, steps, 172084, BEFORE_EXFAT)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_a_file_a_rule_removed_during_a_scan_stops_ignoring_is_the_persons_edit() -> None:
    """Seed 185151 (default world, 60 steps), shrunk: node 2's person wrote ``a/x.log``
    and a rule from node 1 then ignored it; node 1's restore removed the rule, which
    reached node 2 while its watcher's whole scan hashed. The walk had read the rules
    as it started, so the file was left to the next scan, and the harness, which took
    the rules at that scan's end for those it had seen, called that record the node's
    own applied write ("node2 recorded its own applied writes as edits: ['a/x.log']";
    what backer does: tests/test_scan_off_loop.py)."""
    steps = [
        ("reboot", {"node": 1, "offset": -120000}),
        ("write", {"node": 2, "path": "a/x.log", "data": b"the person's log"}),
        ("prune", {"node": 2, "wait": 604806487}),
        ("scan", {"node": 1, "during": 27}),
        ("race", {"node": 2, "path": "a/c/h", "data": b"raced", "limit": 34}),
        ("ignore", {"node": 1, "pattern": "*.log", "add": True}),
        ("scan", {"node": 1, "during": 5}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("restore_at", {"node": 1, "path": "", "pick": 24}),
        ("scan", {"node": 2, "during": 12}),
    ]
    try:
        replay(3, steps, 185151, BEFORE_EXFAT)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_a_folder_recorded_with_an_entry_changed_unheard_is_part_of_that_edit() -> None:
    """Seed 200304 (default world with ``unseen``, 60 steps), shrunk: node 2's person
    rewrites ``b/g`` through a mapping (no event); a peer's read finds its bytes gone
    and the node scans it, while a window of its own had moved the folder's mtime. The
    scan records ``b/g`` and, its entry changed, ``b`` with its new mtime, as every scan
    does (backer.scanner.walk.classify); the harness left out of its check the path
    changed unheard but not its folder ("node2 recorded its own applied writes as
    edits: ['b', 'b/g']"). A heard edit turns the check off for that scan."""
    steps = [
        ("race", {"node": 2, "path": "b/g", "data": b"other", "limit": 24}),
        ("disconnect", {"a": 2, "b": 0}),
        ("scan", {"node": 2, "during": 19}),
        ("unseen", {"node": 2, "path": "b/g", "kind": "mmap", "data": b"mapped"}),
        ("scan", {"node": 2, "during": 0}),
        ("sync", {"a": 0, "b": 2, "cut": None}),
    ]
    try:
        replay(3, steps, 200304, BEFORE_EXFAT | {"unseen"})
    except Failure as failure:
        pytest.fail(failure.reason)


def test_the_harness_fails_a_livelock_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed 130395 with conflict copies named as before 38998c0 (a long name cut back to
    NAME_MAX with no tag, so a copy's copy could come back to an earlier copy's name):
    the linked nodes resolved two paths into each other without end, and the harness,
    bounding its loops by messages only, ran 8 minutes (78,000 versions) before it was
    stopped by hand. Nodes that record more than LIVELOCK_EVENTS events of their own
    while their links settle now fail the seed at once, naming where they record."""

    def cut_back(path: str, version: Version) -> str:
        parent, _, name = path.rpartition("/")
        stamp = timestamp(version.time_ms, "%Y%m%d-%H%M%S")
        mark = f"{CONFLICT_MARK}{stamp}-{base64.b32encode(version.device).decode()[:7]}"
        stem, ext = paths.stem_and_extension(name, mark)
        copy = paths.fitted_name(stem, mark + ext)
        if copy == name:
            tag = blake3(os.fsencode(path) + version.content).hexdigest()[:8]
            copy = paths.fitted_name(stem, f"{mark}-{tag}{ext}")
        return f"{parent}/{copy}" if parent else copy

    monkeypatch.setattr(materializer, "conflict_path", cut_back)
    with pytest.raises(Failure, match=r"livelock: .* last versions are at .*sync-conflict"):
        run_seed(130395, 3, 60, BEFORE_KILLS)


def test_the_harness_catches_a_sync_silent_about_a_file_it_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hostile member lists a file whose content nobody holds: an honest node's sync
    that left it out said so ('not here'). With that report taken out (as before it
    existed: the file was simply absent after a sync that said "errors 0"), the
    harness says so."""
    again = [("sync", {"a": a, "b": b, "cut": None}) for a, b in [(0, 1), (0, 2), (1, 2)]]
    steps = [*MET, ("craft", {"kind": "unknown_content", "pick": 0}), *again]
    _passes(steps, HOSTILE)
    nothing = {"files": 0, "bytes": 0, "paths": []}
    monkeypatch.setattr(commands, "not_here", lambda *args, **kwargs: nothing)
    with pytest.raises(Failure, match="sync reported nothing about 'g'"):
        replay(3, steps, 0, HOSTILE)


def test_the_harness_catches_a_file_changed_unheard_whose_bytes_a_peer_asks_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Node 0 records f, then its person writes f through mmap (no event its watcher
    hears); node 1, linked later, asks for f's bytes. Node 0's read finds them gone and
    scans f (as ``backer run`` does), so node 1 gets the new version. Without that scan
    node 1 waits, quiet and linked, for bytes no one serves, and the harness says so."""
    steps = [
        ("write", {"node": 0, "path": "f", "data": bytes(range(256)) * 2}),
        ("scan", {"node": 0, "during": 0}),
        ("unseen", {"node": 0, "path": "f", "kind": "mmap", "data": b"changed"}),
        ("connect", {"a": 0, "b": 1}),
        ("deliver", {"a": 0, "b": 1, "count": 60}),
    ]
    world = RESIDENT | {"unseen"}
    _passes(steps, world)
    monkeypatch.setattr(ChunkStore, "stale", lambda self, path: None)
    with pytest.raises(Failure, match="waits for the bytes of 'f'"):
        replay(3, steps, 0, world)


def test_a_node_plans_only_once_its_scans_chunk_index_is_written() -> None:
    """Seed 730026 (the default world, 60 steps), shrunk, once the harness scans as
    ``backer run`` does, calling ``recorded`` (the node pushes and plans) before the
    scan's chunk index is written. Node 1's person renamed ``a/x.log`` to ``b`` where
    node 0 had just made a folder ``b``; node 1 recorded its file and planned at once:
    the folder wins, so the file goes to a conflict copy, whose chunks no lookup found
    (not indexed yet): asked of node 0, which never had them, then given up and never
    asked again, so node 0 never got the file ("lost the write"). A plan now waits
    until the index is written."""
    steps = [
        ("write", {"node": 1, "path": "a/x.log", "data": b"x" * 60}),
        ("mkdir", {"node": 0, "path": "b"}),
        ("scan", {"node": 0, "during": 25}),
        ("connect", {"a": 0, "b": 1}),
        ("rename", {"node": 1, "source": "a/x.log", "destination": "b"}),
        ("scan", {"node": 1, "during": 23}),
    ]
    _passes(steps, DEFAULT_WORLD)


def test_a_store_copy_a_kill_left_is_gone_once_the_node_runs_again() -> None:
    """A seed of ``disk,faults,kills,nolinks,resident`` (917080, 60 steps), shrunk, its
    files' bytes made a pattern of their lengths: node 2, whose disk has no hard links,
    is killed inside a store entry's copy while it takes in a delivery, and
    restarts. The spare copy stayed in the store's fan folder for
    good ("node2's content store holds spares a kill left"); the share's next opening
    now empties ``.backer/store/spares/``."""

    def pattern(path: str, size: int) -> bytes:
        return bytes((14 + len(path) + 13 * i) % 256 for i in range(size))

    steps: list[tuple[str, dict[str, Any]]] = [
        ("sync", {"a": 0, "b": 2, "cut": None}),
        ("sync", {"a": 1, "b": 2, "cut": None}),
        ("rename", {"node": 2, "source": "b", "destination": "a/c/h"}),
        ("scan", {"node": 2, "during": 5}),
        ("write", {"node": 1, "path": "g", "data": b""}),
        ("race", {"node": 0, "path": "a/f", "data": pattern("a/f", 175), "limit": 53}),
        ("write", {"node": 0, "path": "b/g", "data": pattern("b/g", 160)}),
        ("deliver", {"a": 0, "b": 2, "count": 5}),
        ("connect", {"a": 1, "b": 0}),
        ("scan", {"node": 0, "during": 21}),
        ("write", {"node": 1, "path": "f", "data": pattern("f", 214)}),
        ("scan", {"node": 1, "during": 27}),
        ("race", {"node": 0, "path": "a/c/h", "data": pattern("a/c/h", 152), "limit": 59}),
        ("scan", {"node": 0, "during": 24}),
        ("deliver", {"a": 2, "b": 1, "count": 12}),
        ("crash", {"node": 2}),
        ("write", {"node": 1, "path": "f", "data": pattern("f", 129)}),
        ("scan", {"node": 1, "during": 14}),
        ("kill", {"node": 2, "op": "deliver", "nth": 24, "other": 0, "pick": 12}),
    ]
    try:
        replay(3, steps, 917080, frozenset({"disk", "faults", "kills", "nolinks", "resident"}))
    except Failure as failure:
        pytest.fail(failure.reason)


def test_a_file_rewritten_under_its_stat_on_a_disk_without_hard_links_is_not_replaced_unkept() -> (
    None
):
    """A seed of ``kills,nolinks,resident,unseen`` (972039, 60 steps), shrunk: node 0,
    whose disk has no hard links, has f rewritten in place by its person, its size and
    time kept (``unseen`` kind ``kept``); node 2's edit of f reached it, and the window
    replaced f unread, since the store held a copy of f's recorded bytes: "node0
    changed 'f' without keeping its old bytes". The window now hashes the file it is
    about to replace there, and has it recorded as the person's edit (R72)."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("connect", {"a": 0, "b": 2}),
        ("write", {"node": 2, "path": "f", "data": b"x" * 30}),
        ("scan", {"node": 0, "during": 18}),
        ("scan", {"node": 2, "during": 10}),
        ("scan", {"node": 2, "during": 21}),
        ("unseen", {"node": 0, "path": "f", "kind": "kept", "data": b"same"}),
        ("write", {"node": 2, "path": "f", "data": b""}),
    ]
    try:
        replay(3, steps, 972039, frozenset({"kills", "nolinks", "resident", "unseen"}))
    except Failure as failure:
        pytest.fail(failure.reason)


UNSEEN_WORLD = frozenset({"kills", "nolinks", "resident", "unseen"})
RESTORE_OVER_AN_UNHEARD_EDIT: list[tuple[str, dict[str, Any]]] = [
    ("sync", {"a": 0, "b": 1, "cut": 7}),
    ("race", {"node": 0, "path": "a/f", "data": b"other", "limit": 4}),
    ("write", {"node": 1, "path": "f", "data": b"other"}),
    ("scan", {"node": 0, "during": 1}),
    ("sync", {"a": 2, "b": 1, "cut": None}),
    ("scan", {"node": 1, "during": 15}),
    ("kill", {"node": 1, "op": "restore", "nth": 5, "other": 0, "pick": 94}),
    ("write", {"node": 0, "path": "a/c/h", "data": b"x" * 24}),
    ("scan", {"node": 0, "during": 12}),
    ("unseen", {"node": 0, "path": "a/c/h", "kind": "mmap", "data": b"same"}),
    ("kill", {"node": 0, "op": "restore", "nth": 9, "other": 1, "pick": 73}),
]


def test_a_restore_over_an_edit_no_event_told_of_is_two_changes() -> None:
    """A seed of ``kills,nolinks,resident,unseen`` (972013, 60 steps), shrunk: node 0's
    person rewrote a/c/h through a mapping (no event), then restored the share to a
    moment before a/c/h was made; the restore recorded a/c/h's deletion, was killed,
    and the scan at the restart recorded the edit, replacing the version the deletion
    replaces too. backer kept the edit (every device ends with it, no conflict copy):
    two changes, each made without knowing of the other, which "recorded a change
    twice" took for one change recorded twice."""
    try:
        replay(3, RESTORE_OVER_AN_UNHEARD_EDIT, 972013, UNSEEN_WORLD)
    except Failure as failure:
        pytest.fail(failure.reason)


def test_an_edit_no_event_told_of_recorded_twice_is_still_caught() -> None:
    """The exception above is for a second change beside the edit: node 0 recording
    the same unheard edit twice, each replacing the version it knew (a process that
    forgot it had recorded it, R40), is still "recorded a change twice"."""
    machine = ClusterMachine(3, 972013, UNSEEN_WORLD)
    try:
        for name, arguments in RESTORE_OVER_AN_UNHEARD_EDIT[:-1]:
            getattr(machine, name)(**arguments)
        node = machine.cluster.nodes[0]
        share = node.open()
        [(known_id, known)] = [
            (vid, v) for path, vid, v in share.catalog.all_live() if path == "a/c/h"
        ]
        [edited] = node.written_unheard
        edit = dataclasses.replace(known, content=edited, supersedes=(known_id,))
        deletion = Version(Kind.DELETED, device=known.device, supersedes=(known_id,))
        share.commit([("a/c/h", deletion)])
        share.commit([("a/c/h", edit)])
        check_recorded_once(machine.cluster, 0)  # the restore's deletion, the edit
        share.commit([("a/c/h", edit)])
        with pytest.raises(InvariantBroken, match="recorded a change twice"):
            check_recorded_once(machine.cluster, 0)
    finally:
        machine.abandon()

"""What must hold once a cluster has gone quiet: convergence, integrity, no lost write."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import nacl.signing
from blake3 import blake3

from backer.fs.paths import is_valid
from backer.model.materializer import copy_version_id, is_copy_of, unavailable
from backer.model.records import Kind, Version
from backer.model.share import Share
from backer.node import commands
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import IgnoreRules
from backer.scanner.walk import stat_key_of, under_any
from backer.versioner.config import policy as retention_policy
from backer.versioner.store import Store, held_bytes
from journal import Checkpoint, Event, Range

from .clocks import LATE_MS, Learned, learned_replacement
from .cluster import Cluster, Node
from .world import (
    InvariantBroken,
    entries,
    ignored,
    is_pinned,
    reachable_temps,
    scratch_dir,
    synced_tree,
    synced_trees,
)

FRESH_FILE = 200_000
OVERHEAD = 24 * 1024  # summaries, events, manifests: what a sync costs besides file bytes


def _fingerprint(cluster: Cluster) -> list[tuple]:
    fingerprints = []
    trees = synced_trees([node.root for node in cluster.nodes], unagreed_paths(cluster))
    for node, tree in zip(cluster.nodes, trees, strict=True):
        summary = {a: c.length for a, c in node.open().journal.summary().items()}
        fingerprints.append((sorted(summary.items()), sorted(tree.items())))
    return fingerprints


def unagreed_paths(cluster: Cluster) -> set[str]:
    """Paths where the disks need not agree: those a hostile member blocked, and those
    a person rewrote unseen (see :func:`rewritten_unseen`)."""
    paths = blocked_paths(cluster)
    for node in cluster.nodes:
        paths |= rewritten_unseen(node)
    return paths


def rewritten_unseen(node: Node) -> set[str]:
    """The files ``node``'s person rewrote in place keeping size and time that are still
    so and still hold the version the node last recorded there, which is live: as bit
    rot, no scan sees such bytes (``backer verify`` does), so they need not reach any
    device. One a peer's version was to replace is no longer exempt: the window that
    finds its bytes changed has it recorded as the person's edit (R72)."""
    if not node.rewritten_under_stat:
        return set()
    catalog = node.open().catalog
    local = catalog.local_entries(list(node.rewritten_under_stat))
    unseen = set()
    for path, key in list(node.rewritten_under_stat.items()):
        try:
            now = stat_key_of(os.lstat(node.root / path))
        except OSError:
            now = None
        if now != key:  # replaced or edited since: seen as any file is
            del node.rewritten_under_stat[path]
        elif path in local and local[path].version_id in catalog.live_versions(path):
            unseen.add(path)
    return unseen


COPIES_OF_COPIES = 3  # a crafted version's conflict copies, and theirs, are its too


def blocked_paths(cluster: Cluster) -> set[str]:
    """Paths a hostile member blocked: their live versions include one it recorded that
    no honest node can write — no honest node holds its bytes (they were only ever on
    the hostile node), or a node refused to apply it with a reason (its chunks do not
    add up to its size). Each honest node keeps what it had there, and its honest
    versions; the disks need not agree at such a path."""
    if cluster.hostile is None:
        return set()
    hostile, blocked = cluster.hostile, set[str]()
    honest = [n for i, n in enumerate(cluster.nodes) if not cluster.is_hostile(i)]
    refused = {
        path
        for node in honest
        for (path,) in node.open().catalog.conn.execute(
            "SELECT path FROM problems WHERE source = 'apply'"
        )
    }
    crafted = set(hostile.crafted)
    for _ in range(COPIES_OF_COPIES):  # (a crafted version moved to a conflict copy's name)
        crafted |= {copy_version_id(vid) for vid in crafted}
    for path, vid, version in honest[0].open().catalog.all_live():
        if vid not in crafted and version.device != hostile.device[:8]:
            continue
        if path in refused or (
            version.kind == Kind.FILE
            and all(held_bytes(n.root, n.open().catalog, version.content) is None for n in honest)
        ):
            blocked.add(path)
    return blocked


def converge(cluster: Cluster, rounds: int | None = None) -> int:
    """Heal every link; sync node 0 with each other node until all journals and trees
    agree (resolutions made during one round reach the others in the next)."""
    for a, b in list(cluster.links):
        cluster.disconnect(a, b)
    rounds = rounds or 2 * len(cluster.nodes) + 4
    before = None
    for round_number in range(1, rounds + 1):
        for other in range(1, len(cluster.nodes)):
            if not cluster.sync(0, other):
                raise InvariantBroken(f"session 0<->{other} did not complete on a healed network")
        if round_number == 2:  # by now every node has had what any node had
            forget_history_nobody_has(cluster)
        prints = _fingerprint(cluster)
        if all(p == prints[0] for p in prints) and prints == before:
            return round_number  # and a round of syncs (each scans first) changed nothing
        before = prints
    raise InvariantBroken(
        f"no convergence after {rounds} rounds of syncs on a healed network: {_differences(prints)}"
    )


def check_pushed(cluster: Cluster, limit: int = 20_000) -> None:
    """Resident nodes push what they record or receive to every open link: with faults
    stopped, every stopped node started (it dials every peer) and each node's watcher
    fired once more, delivering on the open links until they are quiet (no new link,
    no sync) leaves every two linked nodes with the same journal."""
    for index, node in enumerate(cluster.nodes):
        if node.down:
            cluster.start(index)
    for index in range(len(cluster.nodes)):
        cluster.scan(index)
    with cluster.acting():
        settling = cluster.settling()
        for delivered in range(limit):
            busy = sorted(key for key, link in cluster.links.items() if not link.quiet)
            if not busy:
                if cluster.scan_stale():  # (what it recorded goes out next)
                    continue
                break
            cluster._deliver(cluster.random.choice(busy), 1)
            settling(delivered + 1)
        else:
            raise InvariantBroken(f"open links still busy after {limit} messages")
    for a, b in sorted(cluster.links):
        if cluster.is_hostile(a) or cluster.is_hostile(b):
            continue  # what honest nodes refused of it stays with it
        ours, theirs = (cluster.nodes[i].open().journal.summary() for i in (a, b))
        if {k: c.length for k, c in ours.items()} != {k: c.length for k, c in theirs.items()}:
            raise InvariantBroken(
                f"node{a} and node{b} are linked and quiet but their journals differ "
                "(an event was not pushed)"
            )
    check_served(cluster)


UNAVAILABLE = unavailable(0).partition(" (")[0]


def check_served(cluster: Cluster) -> None:
    """Linked and quiet, no node waits for the bytes of a file a linked peer holds on
    its disk changed since it recorded it (its scan cache's stat no longer the file's:
    written with no event its watcher heard): a read for a peer that finds the recorded
    bytes gone has the file scanned, and its new version is what the node then fetches."""
    for a, b in sorted(cluster.links):
        if cluster.is_hostile(a) or cluster.is_hostile(b):
            continue
        for waiting, holder in ((a, b), (b, a)):
            node, peer = cluster.nodes[waiting], cluster.nodes[holder]
            local = peer.open().catalog.local_entries()
            for (source, path), problem in sorted(node.open().problems.items()):
                if source != "apply" or not problem.reason.startswith(UNAVAILABLE):
                    continue
                try:
                    info = os.lstat(peer.root / path)
                except OSError:
                    continue
                recorded = local.get(path)
                if recorded is not None and recorded.stat_key != stat_key_of(info):
                    raise InvariantBroken(
                        f"{node.name} waits for the bytes of {path!r}, which {peer.name} "
                        "holds on its disk changed since recorded, and does not scan"
                    )


def _differences(prints: list[tuple[list, list]]) -> str:
    """Where the first node that differs from node 0 differs (journals or paths)."""
    for index, (summary, tree) in enumerate(prints[1:], start=1):
        if summary != prints[0][0]:
            return f"node{index}'s journal differs from node0's"
        theirs, ours = dict(tree), dict(prints[0][1])
        differing = sorted(p for p in theirs.keys() | ours.keys() if theirs.get(p) != ours.get(p))
        if differing:
            return f"node{index} differs from node0 at {differing[:3]}"
    return "?"


def forget_history_nobody_has(cluster: Cluster) -> None:
    """A node restored from an old backup waits for its own newer events; after two full
    rounds of syncs (node 0 collects everything, then hands it out), whatever it still
    misses reached nobody, and (as the person would, with ``backer scan
    --forget-lost-history``) it gives them up."""
    for node in cluster.nodes:
        share = node.open()
        if share.own_events_missing:
            have = share.journal.summary().get(share.device)
            for other in cluster.nodes:
                theirs = other.open().journal.summary().get(share.device)
                if theirs and (have is None or theirs.length > have.length):
                    raise InvariantBroken(f"{node.name} did not get back its own events")
            share.forget_lost_history()


def check_quiescent(cluster: Cluster) -> None:
    shares = [node.open() for node in cluster.nodes]
    trees = synced_trees([node.root for node in cluster.nodes], unagreed_paths(cluster))
    for node, tree in zip(cluster.nodes[1:], trees[1:], strict=True):
        if tree != trees[0]:
            only_here = sorted(set(tree) ^ set(trees[0]))
            differing = sorted(p for p in set(tree) & set(trees[0]) if tree[p] != trees[0][p])
            raise InvariantBroken(
                f"{node.name} differs from node0: paths {only_here[:5]}, contents {differing[:5]}"
            )
    lives = [sorted((p, v) for p, v, _ in share.catalog.all_live()) for share in shares]
    if any(live != lives[0] for live in lives):
        raise InvariantBroken("live versions differ between nodes")
    summaries = [{a: c.length for a, c in share.journal.summary().items()} for share in shares]
    if any(summary != summaries[0] for summary in summaries):
        raise InvariantBroken(f"journals differ: {summaries}")
    for node, share in zip(cluster.nodes, shares, strict=True):
        share.journal.verify()
        if share.catalog.conflicted_paths():
            raise InvariantBroken(
                f"{node.name} still has conflicts {share.catalog.conflicted_paths()}"
            )
        if share.journal.forks():
            raise InvariantBroken(f"{node.name} saw a fork")
        # (none waits for bytes no connected device has: such a file keeps no temp)
        leftovers = reachable_temps(node.root)
        if leftovers:
            raise InvariantBroken(f"{node.name} has temp files {leftovers}")
    check_no_lost_write(cluster)


def check_resolved(cluster: Cluster, resolved: dict[tuple[str, str], set[str]]) -> None:
    """A resolved conflict leaves no conflict copy on any node once quiescent: none of
    the ``resolved`` copies (path, version id) is live anywhere, and a copy's path that
    holds nothing live is gone from every disk (unless its rules ignore it there). A
    resolution whose versions no node has (its device came back from an older backup
    and nobody else had them) resolved nothing."""
    for node in cluster.nodes:
        catalog = node.open().catalog
        rules = IgnoreRules.load(node.root)
        for (path, vid), recorded in sorted(resolved.items()):
            if not catalog.located(recorded):
                continue
            live = catalog.live_versions(path)
            if vid in live:
                raise InvariantBroken(f"{node.name} still has the resolved conflict copy {path!r}")
            empty = all(v.kind == Kind.DELETED for v in live.values())
            if empty and os.path.lexists(node.root / path) and not ignored(rules, path):
                raise InvariantBroken(f"{node.name} left the resolved conflict copy {path!r}")


def check_no_lost_write(cluster: Cluster) -> None:
    """Every file version ever recorded is on every disk, or is accounted for.

    A version at a path the device's rules ignore (or where a directory holds ignored
    files) need not be on its disk. Else a
    version is accounted for when a later version saw it (supersedes it), when its
    conflict copy is accounted for (or, for a copy, the write it copies), or when
    another version of the same path with the same content is (identical concurrent
    writes are merged into one).
    """
    decoded: dict[str, tuple[str, Version]] = {}
    for node in cluster.nodes:
        for vid, path, record in node.open().catalog.conn.execute(
            "SELECT vid, path, record FROM versions"
        ):
            decoded[vid] = (path, Version.decode(record))
    superseded = {  # by a later write, not by the conflict copy that carries it
        old
        for vid, (_, version) in decoded.items()
        for old in version.supersedes
        if copy_version_id(old) != vid
    }
    origin = {copy_version_id(vid): vid for vid in decoded}  # conflict copy -> its loser
    same_content: dict[tuple[str, bytes], list[str]] = {}
    for vid, (path, version) in decoded.items():
        same_content.setdefault((path, version.content), []).append(vid)

    def untrusted(vid: str, version: Version) -> bool:
        """Whether the hostile member recorded it (crafted, or its person's edit, whose
        bytes it may never serve), or a conflict copy of one: no honest node's file."""
        hostile = cluster.hostile
        if hostile is None:
            return False
        if vid in origin and origin[vid] in decoded:  # a conflict copy: as its loser
            return untrusted(origin[vid], decoded[origin[vid]][1])
        return vid in hostile.crafted or version.device == hostile.device[:8]

    def accounted(vid: str, seen: frozenset[str] = frozenset()) -> bool:
        if vid in superseded:
            return True
        if vid in seen:
            return False
        seen = seen | {vid}
        copy = copy_version_id(vid)
        if copy in decoded and accounted(copy, seen):
            return True
        if vid in origin and accounted(origin[vid], seen):
            return True  # a copy of a write that a later write saw
        path, version = decoded[vid]
        twins = same_content[(path, version.content)]
        return any(accounted(twin, seen) for twin in twins if twin != vid)

    for node in cluster.nodes:
        on_disk = {  # ignored files too: ignoring a path keeps its bytes
            manifest_of_bytes(data).id
            for kind, data in entries(node.root).values()
            if kind == "file"
        }
        rules, pinned = IgnoreRules.load(node.root), rewritten_unseen(node)
        synced_tree(node.root, pinned)
        for vid, (path, version) in decoded.items():
            if version.kind != Kind.FILE or version.content in on_disk or untrusted(vid, version):
                continue
            if ignored(rules, path) or is_pinned(path, pinned):
                continue  # this device leaves that path alone, or cannot have a file there
            if not accounted(vid):
                raise InvariantBroken(
                    f"{node.name} lost the write {vid} of {path!r} ({version.size} bytes)"
                )


_KINDS = {Kind.FILE: "file", Kind.DIRECTORY: "dir", Kind.SYMLINK: "link"}


def check_said_what_is_missing(cluster: Cluster, index: int) -> None:
    """After a sync that completed, every entry the node's share lists is on its disk
    (as a file of the listed size, a folder or a link), or the sync said why not: a
    problem, a local edit kept, or ``not here`` in its report. A file whose content no
    device reached had was once simply absent after a sync that said "errors 0"."""
    node = cluster.nodes[index]
    if node.share is None or node.replicator is None or cluster.is_hostile(index):
        return
    if node.edited and node.touched is None:
        return  # its person changed what no scan has seen yet (``backer sync`` scans first)
    unscanned = node.touched or set()  # (a link opened before them: no scan since)
    share, replicator = node.share, node.replicator
    report = commands.sync_report([], replicator)
    said = {p.path for _, p, _ in share.catalog.problems()} | replicator.edits_kept
    missing = commands.not_here(share.catalog, share.root, said, shown=report["not_here"]["files"])
    said |= set(missing["paths"])
    pinned = set[str]()
    tree = synced_tree(node.root, pinned)
    rules, conflicted = IgnoreRules.load(node.root), set(share.catalog.conflicted_paths())
    for path, _, version in share.catalog.all_live():
        if version.kind == Kind.DELETED or path in said or path in conflicted:
            continue
        if ignored(rules, path, version.kind == Kind.DIRECTORY) or is_pinned(path, pinned):
            continue
        if is_pinned(path, unscanned):
            continue
        found = tree.get(path)
        if (
            found is not None
            and found[0] == _KINDS[version.kind]
            and (version.kind != Kind.FILE or len(found[1]) == version.size)
        ):
            continue
        raise InvariantBroken(
            f"{node.name}'s sync reported nothing about {path!r}, listed as a "
            f"{_KINDS[version.kind]} of {version.size} bytes, and its disk has {found and found[0]}"
        )


def check_honest_paths(cluster: Cluster) -> None:
    """No honest node holds a version at a path that is not a valid share path (one a
    hostile member named: out of the share, impossible here, into the metadata)."""
    for node in cluster.nodes:
        share = node.open()
        stored = share.catalog.conn.execute("SELECT DISTINCT path FROM versions")
        for path in [p for (p,) in stored] + [p for p, _, _ in share.state.live()]:
            if not is_valid(path):
                raise InvariantBroken(f"{node.name} accepted the path {path!r}")


def check_order_independence(cluster: Cluster, rng: random.Random) -> None:
    """Duplicates and reordering change nothing: each node's journal, fed to a fresh
    replica in that node's arrival order (each a different causal order: authors
    interleave differently), with random runs delivered twice, gives node 0's journal
    and live versions."""
    expected = sorted(cluster.nodes[0].open().catalog.all_live())
    lengths = {a: c.length for a, c in cluster.nodes[0].open().journal.summary().items()}
    for node in cluster.nodes:
        source = node.open()
        base = Path(tempfile.mkdtemp(prefix="backer-replay-", dir=scratch_dir()))
        try:
            key = nacl.signing.SigningKey(rng.randbytes(32))
            replica = Share.create(base, key, joining=(source.share_id, source.share_key))
            ranges = [Range(a, 0, c.length) for a, c in source.journal.summary().items()]
            runs: list[list[bytes]] = []
            for event in source.journal.in_ranges(ranges):  # arrival order: causal
                if runs and Event.decode(runs[-1][0]).author == event.author:
                    runs[-1].append(event.raw)
                else:
                    runs.append([event.raw])
            delivered: list[tuple[list[bytes], Checkpoint | None]] = []
            for run in runs:
                last = Event.decode(run[-1])
                checkpoint = source.journal.checkpoint_at(last.author, last.seq + 1)
                replica.ingest(run, checkpoint)  # as a session sends it: signed at its end
                delivered.append((run, checkpoint))
                if rng.random() < 0.3:  # an earlier run arrives again
                    replica.ingest(*rng.choice(delivered))
            got = {a: c.length for a, c in replica.journal.summary().items()}
            if got != lengths or sorted(replica.catalog.all_live()) != expected:
                raise InvariantBroken(
                    f"{node.name}'s journal replayed with duplicates gave another state"
                )
            replica.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def check_bytes_scale_with_difference(cluster: Cluster, rng: random.Random) -> None:
    """On a converged cluster: a sync with nothing new costs only summaries; a new file
    costs its bytes plus a bounded overhead; renaming it costs no file bytes."""
    root = cluster.nodes[0].root
    fresh = rng.randbytes(FRESH_FILE)
    limit = OVERHEAD + 1024 * len(cluster.nodes[0].open().journal.summary())
    steps = [
        ("nothing new", lambda: None, 0),
        ("a new file", lambda: (root / "fresh.bin").write_bytes(fresh), FRESH_FILE),
        ("a rename", lambda: os.rename(root / "fresh.bin", root / "moved.bin"), 0),
    ]
    for label, change, payload in steps:
        change()
        cluster.nodes[0].edit(None)
        before = cluster.traffic.bytes
        if not cluster.sync(0, 1):
            raise InvariantBroken(f"the sync after {label} did not complete")
        cost = cluster.traffic.bytes - before
        if not payload <= cost <= payload + limit:
            raise InvariantBroken(f"{label} moved {cost} bytes (expected {payload} + <= {limit})")


def fingerprint(cluster: Cluster) -> bytes:
    """One hash of every node's journal (authors, lengths, merkle roots) and of the bytes
    moved: two runs of one seed must give the same."""
    parts = [str(cluster.traffic.bytes).encode()]
    for node in cluster.nodes:
        for author, checkpoint in sorted(node.open().journal.summary().items()):
            parts += [author, checkpoint.length.to_bytes(8, "big"), checkpoint.root]
    return blake3(b"".join(parts)).digest()


def stopped_being_current(versions: dict[str, Version]) -> dict[str, int]:
    """When each version stopped being current, from the records alone (not from the
    pruner's own tables): the time of the earliest version that supersedes it; a version
    nothing supersedes, its own time."""
    stopped = {vid: version.time_ms for vid, version in versions.items()}
    replaced = set()
    for version in versions.values():
        for old in version.supersedes:
            if old in versions and (old not in replaced or version.time_ms < stopped[old]):
                stopped[old] = version.time_ms
                replaced.add(old)
    return stopped


def check_retention_window(
    cluster: Cluster, nodes: list[int] | None = None, learned: Learned | None = None
) -> None:
    """Nothing inside the retention window is ever pruned: every version whose bytes a
    node pruned (of ``nodes``, default all) had stopped being current at least
    ``keep-all`` before the prune, and none is live there now. A node not running is
    left alone (its process is gone; it is checked once it runs again). With clocks of
    their own (``learned``), also by what the node could know: ``keep-all`` after it
    learned of the replacement or saw the version stop being live, whichever came
    first, by its own clock (less a minute: an online peer's change arrives within it),
    whatever the author's clock said, and by the records no later than that (an
    author's clock ahead dates a replacement after it arrived); a ``prune --all``
    excepted."""
    for index in range(len(cluster.nodes)) if nodes is None else nodes:
        node = cluster.nodes[index]
        if node.share is None:
            continue
        catalog = node.share.catalog
        keep_all = retention_policy(catalog).keep_all_ms
        versions = {
            vid: Version.decode(record)
            for vid, record in catalog.conn.execute("SELECT vid, record FROM versions")
        }
        stopped = stopped_being_current(versions)
        known: dict[str, int] = {}
        if learned is not None:
            known = learned_replacement(
                learned.at.get(node.name, {}),
                versions,
                LATE_MS,
                learned.retired.get(node.name, {}),
            )
        dropped = learned.dropped_by_all.get(node.name, set()) if learned else set()
        live = {vid for (vid,) in catalog.conn.execute("SELECT vid FROM live")}
        for vid, pruned_ms in Store(node.root, catalog).pruned(versions).items():
            if vid in live:
                raise InvariantBroken(f"{node.name} pruned the bytes of {vid}, live there")
            if (vid, pruned_ms) in dropped:
                continue
            by_records = stopped[vid]
            if vid in known:  # (never after the node learned of it: an author ahead, R49)
                by_records = min(by_records, known[vid] + LATE_MS)
            for since, whose in ((by_records, "by the records"), (known.get(vid), "as it knew")):
                if since is not None and pruned_ms - since < keep_all:
                    raise InvariantBroken(
                        f"{node.name} pruned {vid}, current until {since} ms ({whose}), at "
                        f"{pruned_ms} ms: inside the {keep_all} ms retention window"
                    )


def recoverable(cluster: Cluster, index: int) -> dict[bytes, set[int]]:
    """The contents of node ``index``'s live file versions, each with the running nodes
    that hold its bytes (verified, from a file or the store, whole or chunk by chunk)."""
    share = cluster.nodes[index].share
    if share is None:
        return {}
    contents = {
        version.content for _, _, version in share.catalog.all_live() if version.kind == Kind.FILE
    }
    return {
        content: {
            other
            for other, node in enumerate(cluster.nodes)
            if node.share is not None
            and held_bytes(node.root, node.share.catalog, content) is not None
        }
        for content in contents
    }


def check_still_recoverable(cluster: Cluster, index: int, before: dict[bytes, set[int]]) -> None:
    """A prune on node ``index`` leaves every live version it knows recoverable from
    some node if it was before (``before``: :func:`recoverable` before the prune)."""
    after = recoverable(cluster, index)
    for content, holders in before.items():
        if holders and content in after and not after[content]:
            raise InvariantBroken(
                f"{cluster.nodes[index].name}'s prune made the live content {content.hex()[:16]} "
                f"unrecoverable (held by {sorted(holders)} before)"
            )


def check_recorded_once(cluster: Cluster, index: int) -> None:
    """Node ``index`` never records one change twice: no two live versions of its own at
    one path replace the same version (or both nothing). A change recorded again by a
    process that did not know it had recorded it (killed between its events and its
    catalog or scan cache: R40) is a conflict of the device with itself. Two live
    versions that replace different ones are two changes: a file the person made anew
    where this device had deleted another (its scan knew of nothing there to replace).
    (A node brought back from an old backup forgets what it recorded since: not checked
    there; nor a directory the materializer made for what a peer wrote inside it after
    this device deleted it: its scan records the directory anew, beside its own
    deletion, by design. Nor a conflict copy: it names the device of the version it
    carries, and every device records it. Nor a file the person saved where backer was
    about to rename one (``saves``), beside the version backer meant to put there: two
    changes, each made without knowing of the other, as a restore's version at a path
    where the person saved first is, its rename having left their file in place; the
    same saved file recorded twice is still one change twice. Nor the person's edit of a
    file that no event told of (``unseen``: ``node.written_unheard``) beside what this
    device recorded there without knowing of it: a ``restore --at`` records the
    deletion of the version it knew, finds the file edited, keeps it, and the
    next scan records the edit as replacing that version too; the same edit recorded
    twice is still one change twice.)"""
    node = cluster.nodes[index]
    if node.share is None or cluster.rolled_back:
        return
    own, saved = bytes(node.key.verify_key)[:8], cluster.disks.saved | node.written_unheard
    mine: dict[str, list[tuple[set[str], bytes]]] = {}
    twice: set[str] = set()
    for path, vid, version in node.share.catalog.all_live():
        copy = is_copy_of(vid, version) is not None
        if version.device != own or version.kind == Kind.DIRECTORY or copy:
            continue
        replaced, content = set(version.supersedes), version.content
        others = mine.setdefault(path, [])
        if any(
            (replaced & other or not (replaced or other))
            and not (content != theirs and saved & {content, theirs})
            for other, theirs in others
        ):
            twice.add(path)
        others.append((replaced, content))
    if twice:
        raise InvariantBroken(
            f"{node.name} recorded a change twice, concurrent with itself: {sorted(twice)[:5]}"
        )


def check_kept_readable(cluster: Cluster, index: int) -> None:
    """Every content node ``index``'s store holds is readable through the chunk index, as
    a peer's request and a restore read it: kept bytes that no read finds are lost to
    them (a process killed before it noted them: R39). Not while the node's scans wait
    for its own events lost with an older copy of ``.backer/``: a file its person
    deleted meanwhile is not recorded as deleted yet, so the index still finds its
    bytes at its path, and they are noted at the store's entry once the scan records
    the deletion (a restore reads the entry meanwhile). Nor a content whose index
    waits for a scan that can read its file (:func:`unread_since_recorded`)."""
    node = cluster.nodes[index]
    if node.share is None or node.share.own_events_missing:
        return
    catalog = node.share.catalog
    store, chunks = Store(node.root, catalog), ChunkStore(node.root, catalog)
    waiting = unread_since_recorded(node.share)
    for content in store.contents():
        manifest = catalog.manifest(content)
        if manifest is None or store.get(content) is None or content in waiting:
            continue  # (nothing there to read; or not indexed yet)
        if any(chunks.read(ref.hash) is None for ref in manifest.chunks):
            raise InvariantBroken(
                f"{node.name} keeps the content {content.hex()[:16]} in its store where no "
                "read finds it"
            )


def unread_since_recorded(share: Share) -> set[bytes]:
    """The contents of files whose chunk index is still to be written by a scan that
    can read them. The scan that records a file writes its index after its events, its
    cache entry unsettled until then, so a process killed in between has its next scan
    hash the file again and index it; where that scan could not read the file or list a
    folder above it (a failing disk: the path's problem says so), the index waits for
    one that can (the next scan there; the watcher's hourly full scan at the latest)."""
    unread = {
        "" if problem.path == "." else problem.path
        for _, problem, _ in share.catalog.problems("scan")
        if not problem.warning
    }
    contents = set()
    for entry in share.catalog.local_entries().values():
        if entry.settled or not under_any(entry.path, unread):
            continue
        version = share.catalog.version(entry.version_id)
        if version is not None and version.kind == Kind.FILE:
            contents.add(version.content)
    return contents

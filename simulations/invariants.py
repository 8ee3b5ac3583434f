"""What must hold once a cluster has gone quiet: convergence, integrity, no lost write."""

from __future__ import annotations

from backer.content import manifest_of_bytes
from backer.materializer import copy_version_id
from backer.records import Kind, Version

from .cluster import Cluster, disk_tree


class InvariantBroken(AssertionError):
    """A property of the whole cluster does not hold."""


def _fingerprint(cluster: Cluster) -> list[tuple]:
    fingerprints = []
    for node in cluster.nodes:
        summary = {a: c.length for a, c in node.open().journal.summary().items()}
        fingerprints.append((sorted(summary.items()), sorted(disk_tree(node.root).items())))
    return fingerprints


def converge(cluster: Cluster, rounds: int | None = None) -> int:
    """Heal every link; sync node 0 with each other node until all journals and trees
    agree (resolutions made during one round reach the others in the next)."""
    rounds = rounds or 2 * len(cluster.nodes) + 4
    for round_number in range(1, rounds + 1):
        for other in range(1, len(cluster.nodes)):
            if not cluster.sync(0, other):
                raise InvariantBroken(f"session 0<->{other} did not complete on a healed network")
        prints = _fingerprint(cluster)
        if all(p == prints[0] for p in prints):
            return round_number
    raise InvariantBroken(f"no convergence after {rounds} rounds of syncs on a healed network")


def check_quiescent(cluster: Cluster) -> None:
    shares = [node.open() for node in cluster.nodes]
    trees = [disk_tree(node.root) for node in cluster.nodes]
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
        leftovers = [p for p in node.root.rglob("*.backer-tmp")]
        if leftovers:
            raise InvariantBroken(f"{node.name} has temp files {leftovers}")
    check_no_lost_write(cluster)


def check_no_lost_write(cluster: Cluster) -> None:
    """Every file version ever recorded is on every disk, or is accounted for.

    A version is accounted for when a later version saw it (supersedes it), when its
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
        on_disk = {
            manifest_of_bytes(entry[1]).id
            for entry in disk_tree(node.root).values()
            if entry[0] == "file"
        }
        for vid, (path, version) in decoded.items():
            if version.kind != Kind.FILE or version.content in on_disk:
                continue
            if not accounted(vid):
                raise InvariantBroken(
                    f"{node.name} lost the write {vid} of {path!r} ({version.size} bytes)"
                )

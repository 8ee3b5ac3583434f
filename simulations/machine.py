"""The hypothesis state machine: random edits, syncs, cuts and crashes on a cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from backer import entropy

from .cluster import Cluster
from .invariants import (
    check_bytes_scale_with_difference,
    check_order_independence,
    check_quiescent,
    converge,
    fingerprint,
)

NODES = int(os.environ.get("BACKER_SIM_NODES", "3"))
DIRS = ["a", "b", "a/c"]
FILES = ["f", "g", "a/f", "a/c/h", "b/g", "a/c"]
CONTENTS = [b"", b"same", b"other", b"x" * 70_000]

node_index = st.integers(min_value=0, max_value=NODES - 1)
file_path = st.sampled_from(FILES)
dir_path = st.sampled_from(DIRS)
content = st.one_of(st.sampled_from(CONTENTS), st.binary(max_size=300))


class ClusterMachine(RuleBasedStateMachine):
    """Every rule acts on real files or real sessions; teardown checks the invariants."""

    def __init__(self, nodes: int = NODES, seed: int = 0) -> None:
        super().__init__()
        self.seeded = contextlib.ExitStack()
        self.seeded.enter_context(entropy.seeded(seed))  # the run is a function of the seed
        self.base = Path(tempfile.mkdtemp(prefix="backer-sim-"))
        self.cluster = Cluster(self.base, seed=seed, size=nodes)
        self.stats = dict.fromkeys(
            ("syncs", "cuts", "crashes", "restores", "edits", "conflicts", "bytes"), 0
        )
        self.fingerprint = b""

    def _fs(self, action, *touched: Path) -> None:
        """Run a file-system edit; the files it touched get a modification time from the
        seeded clock (so a seed replays byte for byte)."""
        try:
            action()
            self.stats["edits"] += 1
        except OSError:
            return  # the namespace collides (a file where a directory is): nothing happens
        stamp = entropy.now_ns()
        for path in touched:
            if os.path.lexists(path):
                os.utime(path, ns=(stamp, stamp), follow_symlinks=False)
            if os.path.islink(path) and os.path.exists(path):  # the edit went to its target
                os.utime(os.path.realpath(path), ns=(stamp, stamp))

    def root(self, node: int) -> Path:
        return self.cluster.nodes[node].root

    @rule(node=node_index, path=file_path, data=content)
    def write(self, node: int, path: str, data: bytes) -> None:
        def act() -> None:
            target = self.root(node) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

        self._fs(act, self.root(node) / path)

    @rule(node=node_index, path=file_path, data=st.binary(min_size=1, max_size=100))
    def append(self, node: int, path: str, data: bytes) -> None:
        self._fs(
            lambda: (
                (self.root(node) / path).open("ab").write(data)
                if (self.root(node) / path).is_file()
                else None
            ),
            self.root(node) / path,
        )

    @rule(node=node_index, path=file_path)
    def truncate(self, node: int, path: str) -> None:
        self._fs(lambda: os.truncate(self.root(node) / path, 1), self.root(node) / path)

    @rule(node=node_index, path=st.one_of(file_path, dir_path))
    def delete(self, node: int, path: str) -> None:
        def act() -> None:
            target = self.root(node) / path
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()

        self._fs(act)

    @rule(
        node=node_index,
        source=st.one_of(file_path, dir_path),
        destination=st.one_of(file_path, dir_path),
    )
    def rename(self, node: int, source: str, destination: str) -> None:
        def act() -> None:
            target = self.root(node) / destination
            if target.exists() or (self.root(node) / source) in target.parents:
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.root(node) / source).rename(target)

        self._fs(act)

    @rule(node=node_index, path=dir_path)
    def mkdir(self, node: int, path: str) -> None:
        self._fs(lambda: (self.root(node) / path).mkdir(parents=True))

    @rule(node=node_index, path=file_path, link=st.sampled_from(["f", "../g", "a/c"]))
    def symlink(self, node: int, path: str, link: str) -> None:
        def act() -> None:
            (self.root(node) / path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, self.root(node) / path)

        self._fs(act, self.root(node) / path)

    @rule(node=node_index, path=file_path)
    def toggle_exec(self, node: int, path: str) -> None:
        def act() -> None:
            target = self.root(node) / path
            if target.is_file() and not target.is_symlink():
                target.chmod(target.stat().st_mode ^ 0o111)

        self._fs(act, self.root(node) / path)

    @rule(
        a=node_index, b=node_index, cut=st.one_of(st.none(), st.integers(min_value=1, max_value=30))
    )
    def sync(self, a: int, b: int, cut: int | None) -> None:
        if a == b:
            return
        before = self.cluster.traffic.bytes
        self.cluster.sync(a, b, cut)
        self.stats["bytes"] += self.cluster.traffic.bytes - before
        self.stats["syncs"] += 1
        self.stats["cuts"] += cut is not None

    @rule(a=node_index, b=node_index)
    def connect(self, a: int, b: int) -> None:
        """A long-lived link, delivered a few messages at a time by ``deliver``."""
        self.cluster.connect(a, b)

    @rule(a=node_index, b=node_index, count=st.integers(min_value=1, max_value=40))
    def deliver(self, a: int, b: int, count: int) -> None:
        before = self.cluster.traffic.bytes
        self.cluster.deliver(a, b, count)
        self.stats["bytes"] += self.cluster.traffic.bytes - before

    @rule(a=node_index, b=node_index)
    def disconnect(self, a: int, b: int) -> None:
        self.cluster.disconnect(a, b)

    @rule(node=node_index)
    def scan(self, node: int) -> None:
        """A file watcher firing: the node records its edits and tells its open links."""
        before = self.cluster.traffic.bytes
        self.cluster.scan(node)
        self.stats["bytes"] += self.cluster.traffic.bytes - before

    @rule(node=node_index)
    def backup(self, node: int) -> None:
        self.cluster.backup(node)

    @rule(node=node_index)
    def restore(self, node: int) -> None:
        """The device comes back from an old backup of its ``.backer/``."""
        if self.cluster.restore(node):
            self.stats["restores"] += 1

    @rule(node=node_index)
    def crash(self, node: int) -> None:
        self.cluster.crash(node)
        self.stats["crashes"] += 1

    @invariant()
    def no_stray_temp_files(self) -> None:
        for node in self.cluster.nodes:  # every scan sweeps what no assembly is using
            assert not node.stray_after_scan, node.stray_after_scan

    def abandon(self) -> None:
        """Stop without the final checks (a step already failed)."""
        self.cluster.close()
        self.seeded.close()

    def teardown(self) -> None:
        try:
            converge(self.cluster)
            self.stats["conflicts"] = self.cluster.conflicts
            check_quiescent(self.cluster)
            self.fingerprint = fingerprint(self.cluster)
            check_order_independence(self.cluster, self.cluster.random)
            check_bytes_scale_with_difference(self.cluster, self.cluster.random)
        finally:
            self.cluster.close()
            self.seeded.close()

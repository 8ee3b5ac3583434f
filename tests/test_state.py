"""The CRDT file state: concurrent versions survive, merges are order-free."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backer.model.records import Kind, Version, new_version_id
from backer.model.state import FileState

PATHS = ["a.txt", "dir/b.txt", "dir", "c"]


def live_by_path(state: FileState) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for path, version_id, _ in state.live():
        result.setdefault(path, set()).add(version_id)
    return result


def write(state: FileState, path: str, size: int) -> bytes:
    supersedes = tuple(sorted(live_by_path(state).get(path, set())))
    version = Version(Kind.FILE, size=size, content=bytes(32), supersedes=supersedes)
    update, _ = state.write([(path, new_version_id(), version)])
    return update


def test_concurrent_writes_to_one_path_both_survive() -> None:
    base = FileState()
    first = write(base, "a.txt", 1)
    alice, bob = FileState(), FileState()
    alice.apply(first)
    bob.apply(first)
    from_alice = write(alice, "a.txt", 2)
    from_bob = write(bob, "a.txt", 3)
    alice.apply(from_bob)
    bob.apply(from_alice)
    assert live_by_path(alice) == live_by_path(bob)
    assert len(live_by_path(alice)["a.txt"]) == 2
    sizes = sorted(v.size for _, _, v in alice.live())
    assert sizes == [2, 3]


def test_every_process_gets_a_fresh_client_id_so_a_restored_device_loses_nothing() -> None:
    device = FileState()
    write(device, "a.txt", 1)
    backup = device.snapshot()
    later = write(device, "a.txt", 2)
    restored = FileState(backup)
    assert restored.doc.client_id != device.doc.client_id
    after_restore = write(restored, "a.txt", 3)
    device.apply(after_restore)
    restored.apply(later)
    assert live_by_path(device) == live_by_path(restored)
    assert sorted(v.size for _, _, v in device.live()) == [2, 3]


def test_delta_reports_added_and_superseded_keys() -> None:
    state = FileState()
    write(state, "a.txt", 1)
    (old,) = live_by_path(state)["a.txt"]
    _, delta = state.write(
        [("a.txt", "AAAAAAAAAAAA", Version(Kind.FILE, size=2, supersedes=(old,)))]
    )
    assert list(delta.added) == ["a.txt\0AAAAAAAAAAAA"]
    assert delta.removed == [f"a.txt\0{old}"]


class Replicas(RuleBasedStateMachine):
    """Three devices write and sync at random; any delivery order of all updates
    gives the same live versions per path."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes = [FileState() for _ in range(3)]
        self.seen: list[list[bytes]] = [[], [], []]
        self.updates: list[bytes] = []

    @rule(node=st.integers(0, 2), path=st.sampled_from(PATHS), size=st.integers(0, 100))
    def local_write(self, node: int, path: str, size: int) -> None:
        update = write(self.nodes[node], path, size)
        self.updates.append(update)
        self.seen[node].append(update)

    @rule(source=st.integers(0, 2), destination=st.integers(0, 2))
    def sync(self, source: int, destination: int) -> None:
        for update in self.seen[source]:
            if update not in self.seen[destination]:
                self.nodes[destination].apply(update)
                self.seen[destination].append(update)

    @precondition(lambda self: len(self.updates) > 0)
    @rule(data=st.data())
    def two_fresh_docs_agree_whatever_the_order(self, data: st.DataObject) -> None:
        first = data.draw(st.permutations(self.updates))
        second = data.draw(st.permutations(self.updates))
        one, two = FileState(), FileState()
        for update in first:
            one.apply(update)
        for update in [*second, *data.draw(st.lists(st.sampled_from(self.updates), max_size=3))]:
            two.apply(update)
        assert live_by_path(one) == live_by_path(two)

    @invariant()
    def fully_synced_nodes_agree(self) -> None:
        complete = [
            n
            for n, seen in zip(self.nodes, self.seen, strict=True)
            if len(seen) == len(self.updates)
        ]
        for node in complete[1:]:
            assert live_by_path(node) == live_by_path(complete[0])


TestReplicas = Replicas.TestCase
TestReplicas.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)

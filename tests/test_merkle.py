from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from journal.merkle import (
    Peaks,
    children,
    depth,
    leaf_span,
    node_index,
    offset,
    peak_indices,
    root_hash,
    subtree_hash,
)


def test_flat_tree_layout_matches_hypercore() -> None:
    assert [depth(i) for i in range(8)] == [0, 1, 0, 2, 0, 1, 0, 3]
    assert children(3) == (1, 5)
    assert children(7) == (3, 11)
    assert leaf_span(3) == (0, 4)
    assert node_index(1, 1) == 5
    assert offset(5) == 1
    assert peak_indices(1) == [0]
    assert peak_indices(3) == [1, 4]
    assert peak_indices(7) == [3, 9, 12]


@given(st.integers(min_value=1, max_value=300))
def test_peaks_root_equals_root_from_scratch(length: int) -> None:
    leaves = [os.urandom(32) for _ in range(length)]
    peaks = Peaks()
    for leaf in leaves:
        peaks.push(leaf)
    expected = []
    for index in peak_indices(length):
        start, end = leaf_span(index)
        expected.append(subtree_hash(leaves[start:end]))
    assert peaks.root() == root_hash(length, expected)
    assert Peaks.decode(peaks.encode()) == peaks


def test_root_commits_to_length_and_order() -> None:
    a, b = os.urandom(32), os.urandom(32)
    one, two = Peaks(), Peaks()
    one.extend([a, b])
    two.extend([b, a])
    assert one.root() != two.root()
    shorter = Peaks()
    shorter.extend([a])
    assert shorter.root() != one.root()


@given(
    before=st.integers(min_value=0, max_value=200),
    added=st.integers(min_value=0, max_value=200),
    keep=st.integers(min_value=1, max_value=6),
)
def test_extend_by_levels_equals_pushing_leaf_by_leaf(before: int, added: int, keep: int) -> None:
    leaves = [os.urandom(32) for _ in range(before + added)]
    one, two = Peaks(), Peaks()
    one.extend(leaves[:before])
    two.extend(leaves[:before])
    pushed = []
    for leaf in leaves[before:]:
        pushed += [node for node in one.push(leaf) if depth(node[0]) >= keep]
    kept = two.extend(leaves[before:], keep)
    assert one == two
    assert sorted(kept) == sorted(pushed)

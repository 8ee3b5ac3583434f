"""Merkle tree over one author's log, laid out as a flat tree (Hypercore's idea).

Leaves sit at even indices (leaf ``n`` at ``2n``), parents at odd indices; a node's
depth is the number of trailing one bits of its index. A log of length ``L`` is
covered by the full subtrees of the binary decomposition of ``L`` (its *peaks*), and
its root hash commits to ``L`` and to those peaks. Everything here is pure: storage
decides which nodes it keeps, and :class:`Peaks` extends a log one leaf at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from blake3 import blake3

_PARENT = b"\x01"
_ROOT = b"\x02"


def depth(index: int) -> int:
    """Height of a node above the leaves (leaves have depth 0)."""
    return (~index & (index + 1)).bit_length() - 1


def offset(index: int) -> int:
    """Position of a node among the nodes of its depth."""
    return index >> (depth(index) + 1)


def node_index(node_depth: int, node_offset: int) -> int:
    """Flat-tree index of the node at ``node_depth`` and ``node_offset``."""
    return (node_offset << (node_depth + 1)) | ((1 << node_depth) - 1)


def children(index: int) -> tuple[int, int]:
    """The two children of a parent node."""
    d = depth(index)
    if d == 0:
        raise ValueError("a leaf has no children")
    first = offset(index) * 2
    return node_index(d - 1, first), node_index(d - 1, first + 1)


def leaf_span(index: int) -> tuple[int, int]:
    """The leaves ``[start, end)`` under a node."""
    d = depth(index)
    start = offset(index) << d
    return start, start + (1 << d)


def peak_indices(length: int) -> list[int]:
    """Flat-tree indices of the full subtrees covering the first ``length`` leaves."""
    peaks = []
    start = 0
    for bit in range(length.bit_length() - 1, -1, -1):
        if length & (1 << bit):
            peaks.append(node_index(bit, start >> bit))
            start += 1 << bit
    return peaks


def parent_hash(left: bytes, right: bytes) -> bytes:
    return blake3(_PARENT + left + right).digest()


def root_hash(length: int, peak_hashes: Iterable[bytes]) -> bytes:
    """The root of a log: commits to its length and to every peak."""
    return blake3(_ROOT + length.to_bytes(8, "big") + b"".join(peak_hashes)).digest()


def subtree_hash(leaves: list[bytes]) -> bytes:
    """Hash of a full subtree given its leaves (a power-of-two count)."""
    level = leaves
    while len(level) > 1:
        level = [parent_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


@dataclass
class Peaks:
    """The right edge of a growing tree: enough to extend it and to compute its root.

    ``nodes`` are ``(index, hash)`` pairs, leftmost first. :meth:`push` yields every
    parent it completes so that storage can keep the ones it wants.
    """

    length: int = 0
    nodes: list[tuple[int, bytes]] = field(default_factory=list)

    def push(self, leaf: bytes) -> list[tuple[int, bytes]]:
        """Append one leaf; return the parents it completes, lowest first."""
        merges = (~self.length & (self.length + 1)).bit_length() - 1  # trailing one bits
        index, digest = 2 * self.length, leaf
        self.length += 1
        completed = []
        for _ in range(merges):
            left_index, left = self.nodes.pop()
            index = (left_index + index) // 2
            digest = blake3(_PARENT + left + digest).digest()
            completed.append((index, digest))
        self.nodes.append((index, digest))
        return completed

    def extend(self, leaves: list[bytes], keep_depth: int = 64) -> list[tuple[int, bytes]]:
        """Append many leaves, a whole tree level at a time (several times faster than
        :meth:`push` per leaf); return completed parents of depth ``>= keep_depth``."""
        kept: list[tuple[int, bytes]] = []
        first = self.length
        level = [(2 * (first + i), leaf) for i, leaf in enumerate(leaves)]
        self.length += len(leaves)
        leftovers = []
        node_offset, node_depth = first, 0
        while level:
            if node_offset & 1:  # the first node is a right child: its sibling is our peak
                sibling = self.nodes.pop()
                assert depth(sibling[0]) == node_depth, "peaks out of step with length"
                level.insert(0, sibling)
                node_offset -= 1
            if len(level) & 1:
                leftovers.append(level.pop())
            level = [
                (
                    (level[i][0] + level[i + 1][0]) // 2,
                    blake3(_PARENT + level[i][1] + level[i + 1][1]).digest(),
                )
                for i in range(0, len(level), 2)
            ]
            node_offset >>= 1
            node_depth += 1
            if node_depth >= keep_depth:
                kept.extend(level)
        self.nodes.extend(reversed(leftovers))
        return kept

    def root(self) -> bytes:
        return root_hash(self.length, (digest for _, digest in self.nodes))

    def copy(self) -> Peaks:
        return Peaks(self.length, list(self.nodes))

    def encode(self) -> bytes:
        return self.length.to_bytes(8, "big") + b"".join(h for _, h in self.nodes)

    @classmethod
    def decode(cls, data: bytes) -> Peaks:
        length = int.from_bytes(data[:8], "big")
        indices = peak_indices(length)
        hashes = [data[8 + 32 * i : 40 + 32 * i] for i in range(len(indices))]
        if len(data) != 8 + 32 * len(indices):
            raise ValueError("peaks record has the wrong size")
        return cls(length, list(zip(indices, hashes, strict=True)))

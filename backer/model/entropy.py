"""Where backer takes the randomness and the time that end up in what it records.

Version ids, Yjs client id nonces, share ids and timestamps go into the journal; taking them
from this one place lets a simulation replay a whole multi-node run byte for byte from
one seed (:func:`seeded`), while a real device uses the OS's randomness and clock.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import time
from collections.abc import Iterator


class Source:
    """The real thing: ``secrets`` and the wall clock."""

    def token(self, size: int) -> bytes:
        return secrets.token_bytes(size)

    def now_ns(self) -> int:
        return time.time_ns()


class SeededSource(Source):
    """A seeded generator and a logical clock that moves 1 ms at every reading."""

    def __init__(self, seed: int, start_ns: int = 1_767_225_600 * 10**9) -> None:
        self._random = random.Random(seed)
        self._now = start_ns

    def token(self, size: int) -> bytes:
        return self._random.randbytes(size)

    def now_ns(self) -> int:
        self._now += 1_000_000
        return self._now


_source: Source = Source()


def token(size: int) -> bytes:
    return _source.token(size)


def now_ns() -> int:
    return _source.now_ns()


def now_ms() -> int:
    return _source.now_ns() // 1_000_000


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block, everything recorded is a function of ``seed`` and the inputs."""
    global _source
    previous, _source = _source, SeededSource(seed)
    try:
        yield
    finally:
        _source = previous

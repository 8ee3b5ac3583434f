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
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


SERIAL_BITS = 40


class Source:
    """The real thing: ``secrets`` and the wall clock."""

    _serial: int | None = None

    def token(self, size: int) -> bytes:
        return secrets.token_bytes(size)

    def now_ns(self) -> int:
        return time.time_ns()

    def now_s(self) -> int:
        """The wall clock's second (a seeded clock is not moved by reading it here)."""
        return time.time_ns() // 1_000_000_000

    def serial(self) -> int:
        """The next of a run of numbers that starts at random (once per source, so once
        per process) and then counts up by one, modulo ``2**SERIAL_BITS``."""
        if self._serial is None:
            self._serial = int.from_bytes(self.token(SERIAL_BITS // 8), "big")
        self._serial = (self._serial + 1) % (1 << SERIAL_BITS)
        return self._serial

    def since_boot(self) -> tuple[str, int] | None:
        """This boot's id and the nanoseconds elapsed since it, suspend included: a clock
        no wall-clock step moves (None where the system offers none)."""
        clock = getattr(time, "CLOCK_BOOTTIME", None)
        try:
            boot = BOOT_ID.read_text().strip()
        except OSError:
            return None
        return None if clock is None else (boot, time.clock_gettime_ns(clock))


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

    def now_s(self) -> int:
        return self._now // 1_000_000_000

    def since_boot(self) -> tuple[str, int] | None:
        return ("seeded", self._now)  # (its clock never jumps: it is the boot clock)


_source: Source = Source()


def token(size: int) -> bytes:
    return _source.token(size)


def now_ns() -> int:
    return _source.now_ns()


def now_ms() -> int:
    return _source.now_ns() // 1_000_000


def now_s() -> int:
    return _source.now_s()


def serial() -> int:
    return _source.serial()


def since_boot() -> tuple[str, int] | None:
    return _source.since_boot()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block, everything recorded is a function of ``seed`` and the inputs."""
    global _source
    previous, _source = _source, SeededSource(seed)
    try:
        yield
    finally:
        _source = previous

"""Handing the memory freed objects leave behind back to the system."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # (find_library runs ldconfig)


def trim_heap() -> None:
    """Return the free pages of the heap: glibc keeps what a burst of small objects
    freed (a whole scan, a first sync's windows), and the process's RSS stays at its
    high-water mark. Nothing where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

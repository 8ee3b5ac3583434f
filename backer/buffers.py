"""Buffers for bulk bytes, reused once nothing views them any more.

A received transfer's bytes are held as views of large buffers (a decrypted read whose
chunks wait for the writer thread), so a buffer cannot simply be overwritten by the
next read. A fresh 4 MiB ``bytearray`` per
read costs its zeroing and its page faults: ~0.3 CPU s per GiB received, on the
receiver's event loop. :class:`Buffers` hands a buffer out again only once no view of
it is left, which CPython tells without any bookkeeping: a ``bytearray`` that some
view still exports cannot be resized.

Reads are carved one after another out of the current buffer: a transfer of small
files arrives in reads of a few hundred KiB, each of which took a whole 4 MiB buffer
that its chunks then held until the writer thread had written them (+35 MiB of a
20,000-file join's RSS in its first window).
"""

from __future__ import annotations

POOLED_FROM = 64 * 1024  # smaller requests get a fresh buffer (no bulk transfer under way)
BUFFER_BYTES = (4 << 20) + (64 << 10)  # each pooled buffer at least: a whole read's
# plaintext (a 4 MiB read and the record the read before it left cut)


def _unviewed(buffer: bytearray) -> bool:
    """Whether no view of ``buffer`` exists: shrinking it by one byte is refused while
    one does (``BufferError``), and growing it back stays within its allocation."""
    try:
        del buffer[len(buffer) - 1 :]
    except BufferError:
        return False
    buffer.append(0)
    return True


class Buffers:
    """A few large buffers, each handed out again once its views are all gone, each
    filled by successive requests before the next one is taken.

    ``keep`` bounds what is held between transfers; a small request (the traffic of an
    idle connection) lets go of the buffers nothing views, so an idle peer costs no
    bulk memory."""

    def __init__(self, keep: int = 16, size: int = BUFFER_BYTES) -> None:
        self.keep = keep
        self.size = size
        self._pool: list[bytearray] = []
        self._current = bytearray()  # the buffer requests are carved from
        self._used = 0  # its bytes handed out: never handed out again while it is current

    def take(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes that nothing else views (their content is
        whatever was there: the caller overwrites all of it)."""
        if size < POOLED_FROM:
            self._pool = [buffer for buffer in self._pool if not _unviewed(buffer)]
            self._current, self._used = bytearray(), 0
            return memoryview(bytearray(size))
        if self._used + size > len(self._current):
            self._current, self._used = self._free(size), 0
        self._used += size
        return memoryview(self._current)[self._used - size : self._used]

    def _free(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes that nothing views."""
        for buffer in self._pool:
            if len(buffer) >= size and _unviewed(buffer):
                return buffer
        buffer = bytearray(max(size, self.size))
        if len(self._pool) < self.keep:
            self._pool.append(buffer)
        return buffer

"""Reused buffers: a region is handed out again only once no view of its buffer is left."""

from backer.buffers import BUFFER_BYTES, POOLED_FROM, Buffers


def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone() -> None:
    buffers = Buffers()
    first = buffers.take(BUFFER_BYTES)
    first[:] = b"a" * BUFFER_BYTES
    kept = first[10:20]  # a view of a view still holds the buffer
    del first
    second = buffers.take(POOLED_FROM)
    second[:] = b"b" * POOLED_FROM
    assert bytes(kept) == b"a" * 10 and kept.obj is not second.obj
    owner = kept.obj
    del kept, second
    assert buffers.take(BUFFER_BYTES).obj is owner


def test_successive_reads_fill_one_buffer_without_overlapping() -> None:
    """Reads of a few hundred KiB whose views are all kept (chunks waiting for the
    writer) share buffers: each took a 4 MiB buffer of its own before."""
    buffers = Buffers()
    read = 300 * 1024
    held = []
    for index in range(40):
        view = buffers.take(read)
        view[:] = bytes([index]) * read
        held.append(view)
    assert all(bytes(view) == bytes([index]) * read for index, view in enumerate(held))
    owners = {id(view.obj) for view in held}
    assert len(owners) == -(-40 // (BUFFER_BYTES // read))  # 13 reads per 4 MiB buffer


def test_the_pool_is_bounded_and_small_requests_let_go_of_free_buffers() -> None:
    buffers = Buffers(keep=2)
    held = [buffers.take(BUFFER_BYTES) for _ in range(3)]
    owners = [view.obj for view in held]  # (the buffers themselves: no view, no export)
    held.clear()
    again = buffers.take(BUFFER_BYTES)
    assert any(again.obj is owner for owner in owners[:2])  # the third was not kept
    del again
    small = buffers.take(100)
    assert len(small) == 100 and all(small.obj is not owner for owner in owners)
    fresh = buffers.take(POOLED_FROM)  # the free ones were let go
    assert all(fresh.obj is not owner for owner in owners)


def test_a_whole_reads_plaintext_is_served_from_a_pool_full_of_buffers_for_smaller_reads() -> None:
    """A read of 4 MiB carries on from a record the read before it left cut, so its
    plaintext can be up to a record larger: pooled buffers of exactly 4 MiB never held
    it, and once the pool was full such a read took a fresh zeroed buffer every time
    (69 per GiB received)."""
    buffers = Buffers(keep=2)
    held = [buffers.take(4 << 20) for _ in range(2)]
    owners = [view.obj for view in held]
    held.clear()
    whole_read = buffers.take((4 << 20) + 65_519)
    assert any(whole_read.obj is owner for owner in owners)

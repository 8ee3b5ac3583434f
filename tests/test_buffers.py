"""Reused buffers: handed out again only once no view of them is left."""

from backer.buffers import BUFFER_BYTES, POOLED_FROM, Buffers


def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone() -> None:
    buffers = Buffers()
    first = buffers.take(POOLED_FROM)
    first[:] = b"a" * POOLED_FROM
    kept = first[10:20]  # a view of a view still holds the buffer
    del first
    second = buffers.take(POOLED_FROM)
    second[:] = b"b" * POOLED_FROM
    assert bytes(kept) == b"a" * 10 and kept.obj is not second.obj
    owner = kept.obj
    del kept
    assert buffers.take(BUFFER_BYTES).obj is owner


def test_the_pool_is_bounded_and_small_requests_let_go_of_free_buffers() -> None:
    buffers = Buffers(keep=2)
    held = [buffers.take(POOLED_FROM) for _ in range(3)]
    owners = [view.obj for view in held]  # (the buffers themselves: no view, no export)
    held.clear()
    again = buffers.take(POOLED_FROM)
    assert any(again.obj is owner for owner in owners[:2])  # the third was not kept
    del again
    small = buffers.take(100)
    assert len(small) == 100 and all(small.obj is not owner for owner in owners)
    fresh = buffers.take(POOLED_FROM)  # the free ones were let go
    assert all(fresh.obj is not owner for owner in owners)

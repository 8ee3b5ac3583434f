"""Version ids: unique without coordination, and ids made together clustered, so that
the index of version ids takes a bulk scan's or sync's new ids on a few pages."""

from __future__ import annotations

import base64

from backer.model import entropy
from backer.model.records import check_version_id, new_version_id
from backer.model.share import Share
from journal.store import WAL_PAGES


def _stamp_and_serial(version_id: str) -> tuple[int, int]:
    raw = base64.urlsafe_b64decode(version_id)
    return int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big")


def _made_in_one_second(count: int, seed: int) -> list[str]:
    with entropy.seeded(seed):
        return [new_version_id() for _ in range(count)]


def test_ids_made_in_one_second_share_their_leading_digits_and_are_valid() -> None:
    ids = _made_in_one_second(500, seed=1)  # a seeded clock moves 1 ms per reading
    assert len(set(ids)) == len(ids)
    assert len({vid[:5] for vid in ids}) == 1  # the second: the first 30 of its 32 bits
    assert len({_stamp_and_serial(vid)[0] for vid in ids}) == 1
    assert [check_version_id(vid) for vid in ids] == ids  # what a peer's check accepts


def test_two_devices_in_the_same_second_make_different_ids() -> None:
    first, second = _made_in_one_second(2000, seed=1), _made_in_one_second(2000, seed=2)
    assert not set(first) & set(second)


def test_ids_of_a_later_second_keep_counting() -> None:
    with entropy.seeded(3):
        early = new_version_id()
        for _ in range(1500):  # 1.5 s of the seeded clock
            entropy.now_ns()
        late = new_version_id()
    (early_second, early_serial), (late_second, late_serial) = map(_stamp_and_serial, (early, late))
    assert (late_second, late_serial) == (early_second + 1, early_serial + 1)


def test_a_share_lets_its_write_ahead_log_grow_past_sqlites_default(share: Share) -> None:
    conn = share.db.conn
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_PAGES > 1000
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_PAGES * 4096

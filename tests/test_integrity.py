"""The integrity check on open runs only when the database was not closed cleanly, or
was changed since (real shares, real SQLite files)."""

from __future__ import annotations

import nacl.signing

from backer.db.integrity import MARKER
from backer.fs.paths import METADATA_DIR
from backer.model.share import DB_FILE, Share


def _reopen(share: Share, key: nacl.signing.SigningKey, exclusive: bool = True) -> Share:
    return Share.open(share.root, key, exclusive)


def test_a_share_closed_cleanly_opens_without_the_check_and_one_left_open_with_it(
    share: Share, key: nacl.signing.SigningKey
) -> None:
    """`PRAGMA quick_check` read the whole database at every open (0.9 s of a node's
    start on 100,000 files); after a clean close it is not needed."""
    assert share.checked  # (a new share: nothing said it was closed cleanly)
    (share.root / "a.txt").write_text("one")
    share.scan()
    share.close()
    again = _reopen(share, key)
    assert not again.checked
    (share.root / "b.txt").write_text("two")
    again.scan()
    assert again._lock is not None
    again._lock.close()  # as a killed process leaves it: the database never closed
    after_crash = _reopen(share, key)
    assert after_crash.checked
    after_crash.close()


def test_a_database_changed_after_a_clean_close_is_checked(
    share: Share, key: nacl.signing.SigningKey
) -> None:
    share.close()
    database = share.root / METADATA_DIR / DB_FILE
    data = database.read_bytes()
    database.write_bytes(data)  # the same bytes written again: a copy over it
    again = _reopen(share, key)
    assert again.checked
    again.close()


def test_a_reader_uses_the_marker_without_removing_it(
    share: Share, key: nacl.signing.SigningKey
) -> None:
    share.close()
    reader = _reopen(share, key, exclusive=False)
    assert not reader.checked
    reader.db.conn.close()
    assert (share.root / METADATA_DIR / MARKER).exists()
    writer = _reopen(share, key)
    assert not writer.checked and not (share.root / METADATA_DIR / MARKER).exists()
    writer.close()

"""The web API's reads of a share off the event loop (backer/api/reads.py): pages of the
journal bounded by the changes they hold, a large event split across pages by a cursor
that resumes inside it, and folder listings and path filters served from indexes."""

from __future__ import annotations

import asyncio
import sqlite3

import nacl.signing
import pytest

from backer.api import reads
from backer.api.reads import Cursor, Reader
from backer.db.catalog import PARENT
from backer.model.share import DB_FILE, Share

BIG = 130  # changes in the first event: more than two pages of 50


@pytest.fixture
def journal(share: Share) -> Share:
    """Event 1: BIG files in big/ and hist.txt; then hist.txt edited twice (one event
    each); then one file of big/ deleted."""
    (share.root / "big").mkdir()
    for n in range(BIG):
        (share.root / "big" / f"f{n:03d}.txt").write_text(f"file {n}\n")
    (share.root / "hist.txt").write_text("one\n")
    share.scan()
    for text in ("two\n", "three!\n"):
        (share.root / "hist.txt").write_text(text)
        share.scan(paths=["hist.txt"])
    (share.root / "big" / "f007.txt").unlink()
    share.scan(paths=["big/f007.txt"])
    return share


def pages(share: Share, limit: int, top: str = "", author: bytes | None = None) -> list:
    """Every page of the journal from the newest, each as read through the Reader."""

    async def main() -> list:
        reader = Reader()
        try:
            found, cursor = [], Cursor()
            for _ in range(100):  # (bounded)
                page = await reader.run(
                    share.root,
                    lambda catalog, _, c=cursor: reads.changes_page(catalog, c, limit, top, author),
                )
                found.append(page)
                if page.next is None:
                    return found
                cursor = Cursor.parse(str(page.next))
            raise AssertionError("the pages never end")
        finally:
            await reader.close()

    return asyncio.run(main())


def changes_of(found: list) -> list[tuple[int, str]]:
    return [(pos, path) for page in found for pos, _, shown, _ in page.events for path, *_ in shown]


def test_R4_a_page_of_changes_is_bounded_by_changes_and_a_big_event_resumes_inside(
    journal: Share,
) -> None:
    found = pages(journal, 50)
    every = changes_of(found)
    expected = [
        (pos, path)
        for pos in range(journal.journal.position(), 0, -1)
        for path, _, _ in journal.catalog.versions_at(pos)
    ]
    assert every == expected  # each change once, newest event first, paths in order
    assert len(every) >= BIG + 4
    for page in found:  # no page holds more than 50 changes (an empty event counts 1)
        assert sum(max(1, len(shown)) for _, _, shown, _ in page.events) <= 50
    split = [page.next for page in found if page.next is not None and page.next.skip]
    assert split, "the big event was never split"
    assert all("." in str(cursor) for cursor in split)
    big = max({pos for pos, _ in every}, key=[pos for pos, _ in every].count)
    parts = [(skip, len(shown)) for p in found for pos, _, shown, skip in p.events if pos == big]
    assert len(parts) >= 3  # over three pages, each part saying where in the event it starts
    assert [skip for skip, _ in parts] == [sum(n for _, n in parts[:i]) for i in range(len(parts))]


def test_R4_a_path_filter_pages_only_the_events_that_touched_it(journal: Share) -> None:
    found = pages(journal, 2, "hist.txt")
    every = changes_of(found)
    assert [path for _, path in every] == ["hist.txt"] * 3
    assert [pos for pos, _ in every] == sorted({pos for pos, _ in every}, reverse=True)
    below = [path for _, path in changes_of(pages(journal, 50, "big"))]
    assert {path.split("/")[0] for path in below} == {"big"}
    assert len([path for path in below if path.startswith("big/")]) == BIG + 1  # (+ deletion)


def test_R4_a_device_filter_leaves_out_the_other_devices_events(journal: Share) -> None:
    assert not changes_of(pages(journal, 50, "", b"\x01" * 32))
    assert len(changes_of(pages(journal, 50, "", journal.device))) >= BIG + 4


@pytest.mark.parametrize("text", ["", "x", "1.", ".2", "1.2.3", "-1", "١٢", "1 ", "9" * 19])
def test_R4_a_cursor_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Cursor.parse(text)
    assert str(Cursor.parse("12.50")) == "12.50" and str(Cursor.parse("12")) == "12"


def test_R4_a_folder_is_listed_from_its_index_also_in_an_older_share_database(
    journal: Share, key: nacl.signing.SigningKey
) -> None:
    root = journal.root
    journal.close()
    with sqlite3.connect(root / ".backer" / DB_FILE) as conn:  # as an older backer made it
        conn.execute("DROP INDEX live_parent")
        conn.execute("DROP INDEX versions_position")
    reopened = Share(root, key)
    try:
        plan = reopened.catalog.conn.execute(
            f"EXPLAIN QUERY PLAN SELECT path FROM live WHERE {PARENT} = ?", ("big/",)
        ).fetchall()
        assert "live_parent" in str(plan)
        listed = [path for path, _, _ in reopened.catalog.live_in("big")]
        assert listed == sorted(f"big/f{n:03d}.txt" for n in range(BIG))
        assert [p for p, _, _ in reopened.catalog.live_in("")] == ["big", "hist.txt"]
    finally:
        reopened.close()

"""The web page in a real browser (Playwright driving Debian's Chromium) against two
real nodes: log in with ``backer open``'s link, see the other device connected and in
sync, see its new file appear without a reload, restore and pause by clicking.
Screenshots at 375 and 1280 px go to BACKER_TEST_ARTIFACTS (default: test-artifacts/)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backer.api.access import SESSIONS_FILE
from tests.test_e2e_api import conflict_between, cramped, lone, pair, start, wait_for_file
from tests.test_e2e_not_here import listing_what_it_lacks, run

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get(
        "BACKER_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"
    )
)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True
    )

__all__ = ["cramped", "lone", "pair"]  # (the fixtures: two connected nodes, b serving the
# API; one node serving it)
TIME_TEXT = re.compile(r"^(\d{1,2} \w{3} )?\d{2}:\d{2}( [AP]M)?, (just now|\d+ min ago)$")


@contextlib.contextmanager
def browser_page(url: str, console: bool = False) -> Iterator[tuple[sync_api.Page, list[str]]]:
    """Chromium at 1280 px on ``url``, and the errors the page throws as it runs (and,
    with ``console``, those it logs to the console)."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            if console:
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url)
            yield page, problems
        finally:
            browser.close()


def test_the_page_shows_devices_live_activity_and_restores_and_pauses_by_clicking(
    pair,
) -> None:
    a, b, api = pair
    (a.root / "notes.txt").write_text("first draft\n")
    wait_for_file(b.root / "notes.txt", "first draft\n")
    (a.root / "notes.txt").write_text("second draft\n")
    (a.root / "latest").symlink_to("notes.txt")
    wait_for_file(b.root / "notes.txt", "second draft\n")
    deadline = time.monotonic() + 20
    while not (b.root / "latest").is_symlink() and time.monotonic() < deadline:
        time.sleep(0.05)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = b.run("open", "--no-browser").stdout.strip()
    with browser_page(url, console=True) as (page, problems):
        assert page.url == f"http://{api.host}/"  # the token left the address bar
        expect = sync_api.expect
        other = page.locator('#devices li .device-meta[data-status="in-sync"]')
        expect(other).to_have_count(1, timeout=20_000)
        expect(page.locator("#live")).to_have_text("live", timeout=10_000)
        expect(page.locator("#state")).to_have_text("in sync")
        expect(other.locator(".badge")).to_have_text("in sync")

        # the feed opens with the share's latest changes (it was empty until an event
        # came), and a link shows where it points
        earlier = page.locator("#feed li.past", has_text="modified notes.txt")
        expect(earlier.first).to_be_visible(timeout=5_000)
        expect(earlier.first).to_contain_text("From ")  # (a, whose name is the host's)
        link = page.locator('tr[data-path="latest"]')
        expect(link).to_contain_text("latest → notes.txt", timeout=5_000)
        expect(link.locator(".badge")).to_have_text("link")

        # a file made on the other device appears in the feed and the list, no reload
        (a.root / "from-a.txt").write_text("hello from a\n")
        feed_item = page.locator("#feed li", has_text="from-a.txt")
        expect(feed_item.first).to_be_visible(timeout=10_000)
        expect(page.locator('tr[data-path="from-a.txt"]')).to_be_visible(timeout=5_000)
        times = page.locator("#feed time, #files time")  # one way: local, and how long ago
        assert times.count() >= 2
        for n in range(times.count()):
            shown, iso = times.nth(n).inner_text(), times.nth(n).get_attribute("title")
            assert TIME_TEXT.match(shown), shown
            assert iso and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", iso)

        # restore the first draft by clicking: the bytes on disk, here and there
        page.locator('tr[data-path="notes.txt"] a').click()
        old = page.locator("#versions li", has=page.locator("button", has_text="Restore"))
        expect(old).to_have_count(1, timeout=5_000)
        old.locator("button").click()
        wait_for_file(b.root / "notes.txt", "first draft\n", timeout=10)
        wait_for_file(a.root / "notes.txt", "first draft\n", timeout=20)
        expect(page.locator("#versions li")).to_have_count(3, timeout=5_000)

        # pause and resume by clicking
        page.locator("#pause").click()
        expect(page.locator("#state")).to_have_text("paused", timeout=5_000)
        expect(page.locator("#pause")).to_have_text("Resume")
        page.locator("#pause").click()
        expect(page.locator("#pause")).to_have_text("Pause", timeout=5_000)
        expect(other).to_have_count(1, timeout=20_000)  # back, and in sync again

        # a conflict, resolved by clicking: a's version kept, on both disks
        conflict_between(a, b, api)
        versions = page.locator("#conflicts li[data-version]")
        expect(versions).to_have_count(2, timeout=20_000)
        page.screenshot(path=str(ARTIFACTS / "web-conflict-1280.png"), full_page=True)
        ids = [versions.nth(n).get_attribute("data-version") for n in range(2)]
        listed = api.call("GET", "/api/shares/b/conflicts")[1][0]["versions"]
        texts = {v["version"]: (b.root / (v["copy"] or "plan.txt")).read_text() for v in listed}
        for v in listed:  # when the file was modified (what "keep newest" goes by)
            shown = page.locator(f'#conflicts li[data-version="{v["version"]}"] time')
            assert shown.get_attribute("data-ms") == str(v["modified_ms"]), v
        keep = next(i for i in ids if texts[i] == "from a\n")
        page.locator(f'#conflicts li[data-version="{keep}"] button').click()
        expect(page.locator("#conflicts-panel")).to_be_hidden(timeout=10_000)
        wait_for_file(b.root / "plan.txt", "from a\n", timeout=10)
        wait_for_file(a.root / "plan.txt", "from a\n", timeout=20)
        assert not [p for p in b.root.iterdir() if "sync-conflict" in p.name]

        # an invite, with its QR code
        page.locator("#invite").click()
        expect(page.locator("#qr svg")).to_be_visible(timeout=5_000)
        assert page.locator("#token").input_value().strip()

        page.screenshot(path=str(ARTIFACTS / "web-1280.png"), full_page=True)
        page.set_viewport_size({"width": 375, "height": 800})
        time.sleep(0.3)
        page.screenshot(path=str(ARTIFACTS / "web-375.png"), full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page is {width} px wide at 375 px: it scrolls sideways"
        assert not [p for p in problems if not re.search(r"favicon", p)], problems


def test_the_page_shows_a_device_that_needs_a_file_then_in_sync(cramped) -> None:
    """a's disk has no room for b's new file: b's page says a needs it (1 file, its
    size), and that a is in sync once b deleted it; screenshots of both states."""
    a, b, _ = cramped
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = b.run("open", "--no-browser").stdout.strip()
    a_id = a.run("id").stdout.strip()
    with browser_page(url) as (page, problems):
        expect = sync_api.expect
        state = page.locator(f'#devices li[data-device="{a_id}"] .device-state')
        expect(state).to_have_attribute("data-status", "in-sync", timeout=20_000)
        outside = b.root.parent / "big.bin"
        outside.write_bytes(os.urandom(12 << 20))
        outside.rename(b.root / "big.bin")
        expect(state).to_have_attribute("data-status", "needs", timeout=30_000)
        expect(state.locator(".badge")).to_have_text("needs 1 file, 12.6 MB")
        expect(page.locator("#state")).not_to_have_text("in sync")
        page.screenshot(path=str(ARTIFACTS / "web-needs-1280.png"), full_page=True)
        page.set_viewport_size({"width": 375, "height": 800})
        time.sleep(0.3)
        page.screenshot(path=str(ARTIFACTS / "web-needs-375.png"), full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page is {width} px wide at 375 px: it scrolls sideways"
        (b.root / "big.bin").unlink()
        expect(state).to_have_attribute("data-status", "in-sync", timeout=30_000)
        expect(state.locator(".badge")).to_have_text("in sync")
        expect(page.locator("#state")).to_have_text("in sync")
        page.screenshot(path=str(ARTIFACTS / "web-in-sync-375.png"), full_page=True)
        assert not problems, problems


def screenshots(page: sync_api.Page, name: str) -> None:
    """``name``-1280.png and ``name``-375.png, and the page fits 375 px."""
    page.set_viewport_size({"width": 1280, "height": 900})
    time.sleep(0.3)
    page.screenshot(path=str(ARTIFACTS / f"{name}-1280.png"), full_page=True)
    page.set_viewport_size({"width": 375, "height": 800})
    time.sleep(0.3)
    page.screenshot(path=str(ARTIFACTS / f"{name}-375.png"), full_page=True)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page is {width} px wide at 375 px: it scrolls sideways"
    page.set_viewport_size({"width": 1280, "height": 900})


def test_R10_a_file_deleted_on_another_device_is_restored_by_clicking(pair) -> None:
    a, b, _ = pair
    (a.root / "report.txt").write_text("the only copy\n")
    wait_for_file(b.root / "report.txt", "the only copy\n")
    (a.root / "report.txt").unlink()
    deadline = time.monotonic() + 20
    while (b.root / "report.txt").exists():
        assert time.monotonic() < deadline, "the deletion never reached b"
        time.sleep(0.05)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = b.run("open", "--no-browser").stdout.strip()
    with browser_page(url) as (page, problems):
        expect = sync_api.expect
        row = page.locator('tr[data-path="report.txt"]')
        expect(page.locator("#live")).to_have_text("live", timeout=10_000)
        expect(row).to_have_count(0)  # deleted: not listed unless asked
        page.locator("#show-deleted").check()
        expect(row).to_have_class(re.compile(r"\bdeleted\b"), timeout=5_000)
        expect(row.locator(".badge")).to_have_text("deleted")
        row.locator("a").click()
        old = page.locator("#versions li", has=page.locator("button", has_text="Restore"))
        expect(old).to_have_count(1, timeout=5_000)
        expect(page.locator("#versions li .badge")).to_have_text("deleted")
        screenshots(page, "web-deleted")
        old.locator("button").click()
        wait_for_file(b.root / "report.txt", "the only copy\n", timeout=10)
        wait_for_file(a.root / "report.txt", "the only copy\n", timeout=20)
        expect(row).not_to_have_class(re.compile(r"\bdeleted\b"), timeout=5_000)
        assert not problems, problems


def test_R19_after_a_restart_the_page_goes_on_or_says_its_session_ended(lone) -> None:
    """A restart that keeps the session: the page is live again by itself. One after the
    session ended (its record gone): the page says so, and a reload shows how to log in
    again instead of raw JSON."""
    device, node, api = lone
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = device.run("open", "--no-browser").stdout.strip()
    try:
        with browser_page(url) as (page, _):
            expect = sync_api.expect
            live = page.locator("#live")
            expect(live).to_have_text("live", timeout=10_000)
            assert node.stop() == 0
            expect(live).to_have_text("reconnecting", timeout=10_000)
            node, api = start(device, api.port)
            expect(live).to_have_text("live", timeout=20_000)
            (device.root / "after.txt").write_text("after the restart\n")
            expect(page.locator('tr[data-path="after.txt"]')).to_be_visible(timeout=10_000)

            assert node.stop() == 0
            (device.home / SESSIONS_FILE).unlink()  # every session ended
            node, api = start(device, api.port)
            ended = "Session ended: run 'backer open' again"
            expect(live).to_have_text("session ended", timeout=20_000)
            expect(page.locator("#notice")).to_contain_text(ended)
            screenshots(page, "web-session-ended")
            page.reload()
            expect(page.locator("h1")).to_have_text(ended)
            assert "error" not in page.content()
            screenshots(page, "web-session-ended-reload")
    finally:
        node.stop()


def test_the_page_says_a_listed_file_no_device_could_give_is_not_here(tmp_path: Path) -> None:
    """A joined device lacks a file the share lists and no reachable device holds: its
    page says so ("1 listed file not here"), never "up to date" or "in sync"."""
    with listing_what_it_lacks(tmp_path) as (joiner, token, _):
        assert run(joiner, "join", token, str(joiner.root)).returncode == 3
    node, _ = start(joiner)
    try:
        url = joiner.run("open", "--no-browser").stdout.strip()
        this = joiner.run("id").stdout.strip()
        with browser_page(url) as (page, problems):
            state = page.locator(f'#devices li[data-device="{this}"] .device-state')
            sync_api.expect(state.locator(".badge")).to_have_text("1 listed file not here")
            sync_api.expect(page.locator("#state")).to_have_text("1 listed file not here")
            assert not problems, problems
    finally:
        node.stop()

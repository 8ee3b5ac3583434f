"""The HTTP API of a real ``backer run`` on 127.0.0.1: docs/api.md's examples, the
access rules, and the event stream (latency, resuming with Last-Event-ID)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from backer.api.access import KEY_FILE, SESSION_TTL_S, SESSIONS_FILE, WEB_FILE, Credentials
from backer.config.identity import load_or_create_key
from backer.model.share import Share
from backer.protocol.invite import InviteToken
from backer.scanner.ignore import MAX_RULES
from tests.e2e import Device, Node, free_port, invite
from tests.helpers import small_disk, timing

WAIT_S = 120  # the bound of a wait for a state: what takes a second may take a minute loaded

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
Json = Any


class Api:
    """Plain HTTP requests to one node's API (the Host header is settable)."""

    def __init__(self, node: Node, port: int) -> None:
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.key = (node.device.home / KEY_FILE).read_text().strip()

    def call(
        self,
        method: str,
        path: str,
        body: Json = None,
        *,
        key: str | None = "",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Json, http.client.HTTPResponse]:
        """(status, JSON answer, response); ``key`` None: no Authorization header."""
        sent = {"Host": self.host, **(headers or {})}
        if key is not None:
            sent["Authorization"] = f"Bearer {key or self.key}"
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            sent["Content-Type"] = "application/json"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        connection.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode()
        return response.status, answer, response

    def stream(self, since: int | None = None) -> EventStream:
        return EventStream(self, since)


class EventStream:
    """A Server-Sent Events client of ``/api/events``."""

    def __init__(self, api: Api, since: int | None) -> None:
        headers = {"Host": api.host, "Authorization": f"Bearer {api.key}"}
        if since is not None:
            headers["Last-Event-ID"] = str(since)
        self.connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        self.connection.request("GET", "/api/events", headers=headers)
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        assert self.response.headers["Content-Type"].startswith("text/event-stream")

    def __iter__(self) -> Iterator[tuple[dict[str, Any], float]]:
        """Each event (its data, with ``sse_id``) and the monotonic time it arrived."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline().decode()
            if not line:
                return
            line = line.rstrip("\n")
            if line:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                event = json.loads(fields["data"])
                event["sse_id"] = int(fields["id"])
                assert fields["event"] == event["type"]
                yield event, time.monotonic()
            fields = {}

    def until(
        self, wanted: str, timeout: float = WAIT_S, **data: Any
    ) -> tuple[dict[str, Any], float]:
        deadline = time.monotonic() + timeout
        for event, arrived in self:
            if event["type"] == wanted and all(event.get(k) == v for k, v in data.items()):
                return event, arrived
            assert time.monotonic() < deadline, f"no {wanted} {data}"
        raise AssertionError("the stream ended")

    def close(self) -> None:
        self.connection.close()


def start(device: Device, port: int | None = None) -> tuple[Node, Api]:
    """``backer run`` with its web UI on ``port`` (a free one by default)."""
    port = port or free_port()
    node = device.start(api=f"127.0.0.1:{port}")
    node.wait_for("web UI on")
    return node, Api(node, port)


def scan(api: Api, share: str) -> Json:
    status, answer, _ = api.call("POST", f"/api/shares/{share}/scan")
    assert status == 200, answer
    return answer


# -- docs/api.md ----------------------------------------------------------------------

COMPARED = {"paused", "kind", "change", "path", "name", "restored", "error", "conflict", "live"}
COMPARED |= {"rules", "invalid", "recorded"}


def examples() -> list[tuple[str, str, Json, int, Json]]:
    """(method, path, body, status, answer) of every ```http block of docs/api.md."""
    found = []
    for block in re.findall(r"```http\n(.*?)```", DOC.read_text(), re.S):
        lines = block.strip().splitlines()
        method, path = lines[0].split(" ", 1)
        body = json.loads(lines[1]) if len(lines) == 3 else None
        status, _, answer = lines[-1].removeprefix("→ ").partition(" ")
        found.append((method, path, body, int(status), json.loads(answer)))
    return found


def same_shape(documented: Json, actual: Json, where: str = "") -> None:
    """The documented keys are there (nested; a list by its first item), and the values
    of COMPARED keys are the documented ones (unless shown as "…")."""
    if isinstance(documented, dict):
        assert isinstance(actual, dict), (where, actual)
        for key, value in documented.items():
            assert key in actual, (where, key, actual)
            if (
                key in COMPARED
                and value != "…"
                and (key == "invalid" or not isinstance(value, dict | list))
            ):
                assert actual[key] == value, (where, key, actual[key])
            same_shape(value, actual[key], f"{where}.{key}")
    elif isinstance(documented, list) and documented:
        assert isinstance(actual, list) and actual, (where, actual)
        same_shape(documented[0], actual[0], f"{where}[0]")


def test_every_example_of_the_api_doc_answers_as_documented(tmp_path: Path) -> None:
    device = Device(tmp_path, "notes")
    device.root.mkdir()
    device.run("init", str(device.root))
    node, api = start(device)
    try:
        (device.root / "hello.txt").write_text("hello\n")
        (device.root / "docs").mkdir()
        (device.root / "docs" / "plan.md").write_text("hello\n")  # (kept: restorable)
        scan(api, "notes")
        time.sleep(0.05)
        (device.root / "hello.txt").write_text("hello again\n")
        while "hello.txt" not in scan(api, "notes")["modified"]:  # (the watcher's scan
            time.sleep(0.1)  # may have taken it: then it is in the history already)
            if len(api.call("GET", "/api/shares/notes/history?path=hello.txt")[1]) == 2:
                break
        history = api.call("GET", "/api/shares/notes/history?path=hello.txt")[1]
        first = history[0]["version"]
        ran = 0
        for method, path, body, status, documented in examples():
            if body is not None:
                body = json.loads(json.dumps(body).replace("{version}", first))
            got, answer, _ = api.call(method, path, body)
            assert got == status, (method, path, answer)
            same_shape(documented, answer, f"{method} {path}")
            ran += 1
        assert ran >= 14
        time.sleep(0.2)
        assert (device.root / "hello.txt").read_text() == "hello\n"  # restored on disk
        assert (device.root / ".backerignore").read_text() == "*.log\nbuild/\n[z-a]\n"
        status, answer, _ = api.call(  # someone else's edit since: refused, not lost
            "PUT", "/api/shares/notes/ignore", {"rules": "x\n", "previous": ""}
        )
        assert status == 409 and "changed meanwhile" in answer["error"]
        assert not [p for p in device.root.iterdir() if p.name.endswith(".tmp")]
    finally:
        node.stop()


# -- access ---------------------------------------------------------------------------


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[tuple[Device, Node, Api]]:
    device = Device(tmp_path, "solo")
    device.root.mkdir()
    device.run("init", str(device.root))
    node, api = start(device)
    try:
        yield device, node, api
    finally:
        node.stop()


def test_requests_without_the_key_or_with_a_wrong_one_are_refused_with_401(lone) -> None:
    _, _, api = lone
    assert api.call("GET", "/api/shares", key=None)[0] == 401
    assert api.call("GET", "/api/shares", key="0" * 64)[0] == 401
    assert api.call("POST", "/api/shares/solo/pause", key=None)[0] == 401
    assert api.call("GET", "/api/events", key=None)[0] == 401
    headers = {"Cookie": "backer_session=forged"}
    assert api.call("GET", "/api/shares", key=None, headers=headers)[0] == 401
    status, answer, response = api.call("GET", "/api/shares")
    assert status == 200 and answer[0]["name"] == "solo"
    assert "Access-Control-Allow-Origin" not in response.headers  # no CORS, ever


def test_a_foreign_host_header_is_refused_with_403_even_with_the_key(lone) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1."""
    _, _, api = lone
    for host in (f"evil.example:{api.port}", "127.0.0.1:80", f"127.0.0.2:{api.port}", ""):
        status, answer, _ = api.call("GET", "/api/shares", headers={"Host": host})
        assert status == 403, (host, answer)
    for host in (f"localhost:{api.port}", f"127.0.0.1:{api.port}"):
        assert api.call("GET", "/api/shares", headers={"Host": host})[0] == 200


def test_numbers_that_are_not_plain_digits_are_refused_not_an_internal_error(lone) -> None:
    """``"²".isdigit()`` holds and ``int`` refuses 5,000 digits: each was a 500."""
    _, _, api = lone
    nines = "9" * 5000
    for path in ("/login?token=a.%C2%B2.b", f"/login?token=a.{nines}.b"):
        assert api.call("GET", path, key=None)[0] == 401, path
    for query in ("limit=%C2%B2", f"before={nines}"):
        assert api.call("GET", f"/api/shares/solo/changes?{query}")[0] == 400, query
    for expires in (1e400, "abc", True, 0):
        status, answer, _ = api.call("POST", "/api/shares/solo/invite", {"expires": expires})
        assert status == 400 and "whole number of seconds" in answer["error"], expires


def _session(response: http.client.HTTPResponse) -> tuple[str, str]:
    """The cookie a login sets and the CSRF token in its redirect's fragment."""
    assert response.status == 303
    location = urlsplit(response.headers["Location"])
    assert location.path == "/" and location.fragment.startswith("csrf=")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return cookie.split(";")[0], location.fragment.removeprefix("csrf=")


def login(api: Api, device: Device) -> tuple[str, str]:
    """The session cookie that ``backer open``'s link sets, and the session's CSRF
    token (handed out only in the redirect's fragment, which the page keeps)."""
    url = device.run("open", "--no-browser").stdout.strip()
    parts = urlsplit(url)
    assert parts.netloc == api.host
    *_, response = api.call("GET", f"{parts.path}?{parts.query}", key=None)
    session = _session(response)
    again = api.call("GET", f"{parts.path}?{parts.query}", key=None)[0]
    assert again == 401  # the link works once
    return session


def test_R50_backer_open_gives_the_browser_no_login_token_on_its_command_line(
    lone, tmp_path: Path
) -> None:
    """A program's command line is readable by every user of the machine
    (/proc/PID/cmdline): ``backer open`` started the browser with the login URL, so
    another user who watched for it could log in first, then make an invite and join
    the share. The browser now gets a page only the owner can read, which leads on."""
    device, _, api = lone
    said = tmp_path / "browser-argv"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {said}\n')
    browser.chmod(0o755)
    env = {**device.env, "BROWSER": f"{browser} %s", "DISPLAY": ":0"}
    env.pop("WAYLAND_DISPLAY", None)
    subprocess.run(device.command("open"), env=env, check=True, capture_output=True, timeout=60)
    argv = said.read_text()
    assert "token=" not in argv, f"the browser's command line holds a login token: {argv}"
    (opened,) = argv.split()
    page = Path(urlsplit(opened).path)
    assert opened.startswith("file://") and page.parent == device.home
    assert page.stat().st_mode & 0o077 == 0  # only its owner reads it
    (link,) = re.findall(r'url=([^"]+)"', page.read_text())
    parts = urlsplit(link.replace("&amp;", "&"))
    assert parts.netloc == api.host
    *_, response = api.call("GET", f"{parts.path}?{parts.query}", key=None)
    _session(response)  # the page's link logs the browser in


def test_the_login_link_opens_one_session_and_posts_need_its_csrf_token(lone) -> None:
    device, _, api = lone
    cookie, csrf = login(api, device)
    assert cookie.startswith(f"backer_session_{api.port}=")  # two nodes: two cookies
    own = {"Cookie": cookie, "Origin": f"http://{api.host}"}
    assert (
        api.call("GET", "/api/shares/solo", key=None, headers={**own, "X-CSRF-Token": csrf})[0]
        == 200
    )
    # a cross-site form or fetch: no CSRF token, or a foreign Origin even with it
    assert api.call("POST", "/api/shares/solo/pause", key=None, headers=own)[0] == 403
    foreign = {"Cookie": cookie, "Origin": "http://evil.example", "X-CSRF-Token": csrf}
    assert api.call("POST", "/api/shares/solo/pause", key=None, headers=foreign)[0] == 403
    wrong = {**own, "X-CSRF-Token": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")}
    assert api.call("POST", "/api/shares/solo/pause", key=None, headers=wrong)[0] == 403
    shown = api.call("GET", "/api/shares/solo", key=None, headers={**own, "X-CSRF-Token": csrf})
    assert shown[1]["paused"] is False
    status, answer, _ = api.call(
        "POST", "/api/shares/solo/pause", key=None, headers={**own, "X-CSRF-Token": csrf}
    )
    assert (status, answer) == (200, {"paused": True})


def test_the_session_cookie_alone_opens_nothing(lone) -> None:
    """A cookie is scoped by host, not port: the browser also sends it to any other
    server on 127.0.0.1, which then asked GET /api/session for the CSRF token and held
    the node (an invite, a restore). Without the token, which only the page has, every
    API request is refused, reads and the event stream included."""
    device, _, api = lone
    cookie, csrf = login(api, device)
    stolen = {"Cookie": cookie}
    for path in ("/api/session", "/api/shares", "/api/shares/solo/devices", "/api/events"):
        assert api.call("GET", path, key=None, headers=stolen)[0] in (403, 404), path
    assert api.call("POST", "/api/shares/solo/invite", {}, key=None, headers=stolen)[0] == 403
    assert api.call("GET", "/", key=None, headers=stolen)[0] == 200  # the page: no data
    page = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)  # the page's own
    page.request("GET", f"/api/events?csrf={csrf}", headers={"Host": api.host, **stolen})
    assert page.getresponse().status == 200  # (EventSource sends no headers: ?csrf=)
    page.close()


def test_the_api_key_is_private_and_the_ui_address_is_withdrawn_at_stop(lone) -> None:
    device, node, _ = lone
    assert (device.home / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert (device.home / WEB_FILE).stat().st_mode & 0o777 == 0o600
    assert node.stop() == 0
    assert not (device.home / WEB_FILE).exists()
    result = device.run("open", "--no-browser", check=False)
    assert result.returncode == 1 and "start 'backer run' first" in result.stderr


@timing
def test_a_node_with_an_open_event_stream_still_stops_cleanly_at_once(lone) -> None:
    _, node, api = lone
    stream = api.stream()
    started = time.monotonic()
    assert node.stop() == 0
    assert time.monotonic() - started < 5
    assert list(stream) == []  # the stream ended with the node
    stream.close()


def test_R22_idle_connections_cannot_take_every_descriptor_of_the_node(lone) -> None:
    """Connections that never send a byte used to stay an hour each: enough of them
    and the node could open nothing, peers and database included."""
    from backer.api.server import MAX_CONNECTIONS

    _, node, api = lone
    fds = Path(f"/proc/{node.process.pid}/fd")
    before = len(list(fds.iterdir()))
    flood = []
    try:
        for _ in range(3 * MAX_CONNECTIONS):
            flood.append(socket.create_connection(("127.0.0.1", api.port), timeout=5))
        time.sleep(0.5)  # let the node accept them all
        assert len(list(fds.iterdir())) <= before + MAX_CONNECTIONS + 4
        status, answer, _ = api.call("GET", "/api/shares")  # a real client still gets in
        assert status == 200 and answer[0]["name"] == "solo"
    finally:
        for connection in flood:
            connection.close()


@contextlib.contextmanager
def serving_beyond_loopback(tmp_path: Path) -> Iterator[tuple[Api, Node]]:
    """A share's node with its web UI on every address, behind the password
    'correct horse'; stopped at the end."""
    device = Device(tmp_path, "wide")
    device.root.mkdir()
    device.run("init", str(device.root))
    port = free_port()
    node = device.start(api=f"0.0.0.0:{port}", BACKER_API_PASSWORD="correct horse")
    try:
        node.wait_for("web UI on")
        yield Api(node, port), node
    finally:
        node.stop()


def test_beyond_loopback_the_password_opens_a_session_and_a_wrong_one_does_not(
    tmp_path: Path,
) -> None:
    with serving_beyond_loopback(tmp_path) as (api, _):
        port = api.port
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for password, wanted in (("wrong", 401), ("correct+horse", 303)):
            connection.request(
                "POST", "/login", body=f"password={password}", headers={"Host": api.host, **form}
            )
            response = connection.getresponse()
            response.read()
            assert response.status == wanted, password
        cookie, csrf = _session(response)
        connection.close()
        headers = {"Cookie": cookie, "X-CSRF-Token": csrf}
        status, answer, _ = api.call("GET", "/api/shares", key=None, headers=headers)
        assert status == 200 and answer[0]["name"] == "wide"
        assert api.call("GET", "/api/shares", key=None)[0] == 401
        status, page, _ = api.call("GET", "/", key=None)  # (how a browser gets the form)
        assert status == 401 and '<form method="post" action="/login">' in page
        assert 'name="password"' in page


def post_password(api: Api, password: str) -> http.client.HTTPResponse:
    form = {"Host": api.host, "Content-Type": "application/x-www-form-urlencoded"}
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    connection.request("POST", "/login", body=f"password={password}", headers=form)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_wrong_passwords_are_limited_per_address_with_429_and_logged_once(
    tmp_path: Path,
) -> None:
    with serving_beyond_loopback(tmp_path) as (api, node):
        assert [post_password(api, f"guess{n}").status for n in range(5)] == [401] * 5
        for password in ("guess5", "correct+horse"):  # (even the right one, for now)
            refused = post_password(api, password)
            assert refused.status == 429, password
            assert 1 <= int(refused.headers["Retry-After"]) <= 60
        node.wait_for("wrong passwords from 127.0.0.1")
        time.sleep(0.3)
        assert sum("wrong passwords from" in line for line in node.lines) == 1, node.log
        assert api.call("GET", "/api/shares")[0] == 200  # the key is not locked out


def test_a_login_session_survives_a_restart_of_the_node_stored_hashed_and_private(
    lone,
) -> None:
    device, node, api = lone
    cookie, csrf = login(api, device)
    name, _, value = cookie.partition("=")
    stored = device.home / SESSIONS_FILE
    assert stored.stat().st_mode & 0o777 == 0o600
    assert value not in stored.read_text()
    assert node.stop() == 0
    node, api = start(device, api.port)  # the UI's port is fixed (7655 by default)
    try:
        own = {"Cookie": cookie, "Origin": f"http://{api.host}", "X-CSRF-Token": csrf}
        status, answer, _ = api.call("POST", "/api/shares/solo/pause", key=None, headers=own)
        assert (status, answer) == (200, {"paused": True})
        forged = {"Cookie": f"{name}={hashlib.sha256(value.encode()).hexdigest()}"}
        assert api.call("GET", "/api/shares", key=None, headers=forged)[0] == 401
    finally:
        node.stop()


def test_R52_a_used_login_link_opens_nothing_after_a_restart_of_the_node(lone) -> None:
    """The links a node had redeemed were remembered in its memory alone: restarted
    within a link's 2 minutes, it took a used one again (read off a terminal, or a
    browser's history) and opened a new session to whoever sent it."""
    device, node, api = lone
    parts = urlsplit(device.run("open", "--no-browser").stdout.strip())
    link = f"{parts.path}?{parts.query}"
    _session(api.call("GET", link, key=None)[2])
    assert node.stop() == 0
    node, api = start(device, api.port)
    try:
        assert api.call("GET", link, key=None)[0] == 401
    finally:
        node.stop()


def test_a_login_session_expires(tmp_path: Path) -> None:
    credentials = Credentials("k" * 64, home=tmp_path)
    cookie = credentials.open_session(now_ms=1_000)
    assert credentials.csrf(cookie, now_ms=1_000 + SESSION_TTL_S * 1000 - 1)
    assert credentials.csrf(cookie, now_ms=1_000 + SESSION_TTL_S * 1000) is None
    assert Credentials("k" * 64, home=tmp_path).sessions == {}  # (expired: not loaded)


FINDER = ["1111111", "1000001", "1011101", "1011101", "1011101", "1000001", "1111111"]


def test_an_invite_comes_with_its_qr_code_for_a_phone(lone) -> None:
    _, _, api = lone
    status, answer, _ = api.call("POST", "/api/shares/solo/invite", {"expires": 600})
    assert status == 200
    token, rows = answer["token"], answer["qr"]
    side = len(rows)
    assert all(len(row) == side for row in rows) and (side - 17) % 4 == 0  # a QR version
    corners = [(0, 0), (0, side - 7), (side - 7, 0)]  # the three finder patterns
    for top, left in corners:
        assert [row[left : left + 7] for row in rows[top : top + 7]] == FINDER
    assert side * side >= len(token) * 8 // 2  # room for the token (M: about half is data)
    share_id = api.call("GET", "/api/shares/solo")[1]["share_id"]
    assert InviteToken.decode(token).share_id.hex() == share_id
    assert api.call("POST", "/api/shares/solo/invite", {"expires": -1})[0] == 400


def test_serving_the_ui_beyond_loopback_needs_a_password_of_12_characters(
    tmp_path: Path,
) -> None:
    """A one-character password was accepted for a UI reachable from the network."""
    device = Device(tmp_path, "open")
    device.root.mkdir()
    device.run("init", str(device.root))
    args = ("run", "--listen", f"127.0.0.1:{free_port()}", "--api", f"0.0.0.0:{free_port()}")
    for password in (None, "x", "eleven char"):
        env = {} if password is None else {"BACKER_API_PASSWORD": password}
        result = subprocess.run(
            device.command(*args), env={**device.env, **env}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, password
        assert "BACKER_API_PASSWORD" in result.stderr and "12 characters" in result.stderr
        assert "Traceback" not in result.stderr


# -- two devices: events, pause --------------------------------------------------------


@contextlib.contextmanager
def running_pair(a: Device, b: Device, made: bool = False) -> Iterator[Api]:
    """a and b running, connected; b serves the API (``made``: a's share exists)."""
    if not made:
        a.root.mkdir()
        a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port):
        b.run("join", token, str(b.root))
    node_a = a.start(port)
    node_b, api = start(b)
    try:
        node_b.wait_for("session with")
        yield api
    finally:
        node_b.stop()
        node_a.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Device, Device, Api]]:
    """a and b running, connected; b serves the API."""
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    with running_pair(a, b) as api:
        yield a, b, api


@pytest.fixture
def cramped(tmp_path: Path) -> Iterator[tuple[Device, Device, Api]]:
    """As ``pair``, a's share (and home) on a 16 MiB disk: a file of b's that does not
    fit there leaves a needing it for as long as it stays."""
    with small_disk(tmp_path / "disk", "16m") as disk:
        a, b = Device(disk, "a"), Device(tmp_path, "b")
        with running_pair(a, b) as api:
            yield a, b, api


def device_entry(api: Api, device: Device) -> Json:
    """How b's node sees ``device`` now (``GET …/devices``)."""
    wanted = device.run("id").stdout.strip()
    return next(d for d in api.call("GET", "/api/shares/b/devices")[1] if d["id"] == wanted)


def until(check: Any, what: str, timeout: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something true; that."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def wait_for_file(path: Path, text: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text() == text):
        assert time.monotonic() < deadline, f"{path} never became {text!r}"
        time.sleep(0.02)


@timing
def test_a_change_on_another_device_is_on_the_event_stream_within_1_s_of_being_applied(
    pair,
) -> None:
    a, b, api = pair
    stream = api.stream()
    try:
        lags = []
        for n in range(5):
            written = time.monotonic()
            (a.root / f"note-{n}.txt").write_text(f"note {n}")
            event, arrived = stream.until("remote-applied", change="written")
            assert f"note-{n}.txt" in event["paths"]
            now_ms = time.time_ns() // 1_000_000
            lags.append(now_ms - event["time_ms"] - (time.monotonic() - arrived) * 1000)
            assert (b.root / f"note-{n}.txt").read_text() == f"note {n}"
            print(f"write on a → event on b: {(arrived - written) * 1000:.0f} ms")
        print(f"applied → event received: max {max(lags):.0f} ms")
        assert max(lags) < 1000
    finally:
        stream.close()


def test_a_client_that_reconnects_with_last_event_id_misses_nothing(pair) -> None:
    a, b, api = pair
    stream = api.stream()
    (a.root / "first.txt").write_text("1")
    first, _ = stream.until("remote-applied")
    stream.close()
    for n in range(3):  # while the client is away
        (a.root / f"away-{n}.txt").write_text(str(n))
    for n in range(3):
        wait_for_file(b.root / f"away-{n}.txt", str(n))
    time.sleep(0.3)
    resumed = api.stream(since=first["sse_id"])
    try:
        ids, applied = [], set()
        for event, _ in resumed:
            ids.append(event["sse_id"])
            if event["type"] == "remote-applied":
                applied |= set(event["paths"])
            if {f"away-{n}.txt" for n in range(3)} <= applied:
                break
        assert ids == list(range(first["sse_id"] + 1, first["sse_id"] + 1 + len(ids)))
    finally:
        resumed.close()


def test_pause_closes_the_session_and_resume_brings_what_changed_meanwhile(pair) -> None:
    a, b, api = pair
    stream = api.stream()
    try:
        assert api.call("POST", "/api/shares/b/pause")[0] == 200
        stream.until("paused")
        stream.until("device-disconnected")
        (a.root / "while-paused.txt").write_text("later")
        time.sleep(1.5)
        assert not (b.root / "while-paused.txt").exists()
        devices = api.call("GET", "/api/shares/b/devices")[1]
        assert not any(d["connected"] for d in devices)
        refused = b.run("sync", "--dir", str(b.root), check=False)
        assert refused.returncode == 1 and "paused" in refused.stderr
        assert api.call("POST", "/api/shares/b/resume")[0] == 200
        stream.until("resumed")
        stream.until("device-connected")
        wait_for_file(b.root / "while-paused.txt", "later")
    finally:
        stream.close()


def test_transfer_progress_is_published_while_a_file_arrives_at_most_twice_a_second(
    pair,
) -> None:
    """A file whose transfer outlasts one progress interval is reported while it
    arrives. On a fast disk 96 MiB arrives between two ticks (nothing to report), so
    the file grows until its transfer is long enough to be seen."""
    a, b, api = pair
    stream = api.stream()
    try:
        for size in (96 << 20, 384 << 20, 1024 << 20):
            name = f"big-{size >> 20}.bin"
            outside = a.root.parent / name
            outside.write_bytes(os.urandom(size))
            outside.rename(a.root / name)  # (whole: no partial version on the way)
            progress = []
            for event, _ in stream:
                if event["type"] == "transfer-progress":
                    progress.append(event)
                if event["type"] == "remote-applied" and name in event["paths"]:
                    break
            if progress:
                break
            (a.root / name).unlink()
        assert progress, "no transfer-progress event during a transfer of up to 1 GiB"
        assert all(0 <= e["bytes_done"] <= e["bytes_total"] for e in progress)
        assert all(e["rate"] >= 0 for e in progress)
        times = [e["time_ms"] for e in progress if e["share"] == "b"]
        assert all(later - earlier >= 400 for earlier, later in itertools.pairwise(times))
        assert (b.root / name).stat().st_size == size
        rates = [e["rate"] for e in progress]
        print(f"{size >> 20} MiB: {len(progress)} progress events; rates {rates}")
    finally:
        stream.close()


def conflict_between(a: Device, b: Device, api: Api) -> list[dict[str, Any]]:
    """plan.txt written differently on a and on b while b is paused, each recorded
    before b resumes: a conflict, as b's API lists it once both versions are on b's
    disk (the copy is written after the conflict is recorded)."""
    assert api.call("POST", "/api/shares/b/pause")[0] == 200
    (a.root / "plan.txt").write_text("from a\n")
    (b.root / "plan.txt").write_text("from b\n")
    a.run("scan", "--dir", str(a.root))  # (through a's node)
    scan(api, "b")
    assert api.call("POST", "/api/shares/b/resume")[0] == 200
    deadline = time.monotonic() + WAIT_S
    while True:  # listed, and both versions written on b's disk
        found = api.call("GET", "/api/shares/b/conflicts")[1]
        places = [b.root / (v["copy"] or "plan.txt") for f in found for v in f["versions"]]
        texts = {p.read_text() for p in places if p.exists()}
        if len(places) == 2 and texts == {"from a\n", "from b\n"}:
            return found
        assert time.monotonic() < deadline, f"no conflict on b's disk: {found}"
        time.sleep(0.1)


def test_a_conflict_is_listed_and_resolved_by_keeping_one_version_everywhere(pair) -> None:
    a, b, api = pair
    stream = api.stream()
    try:
        (conflict,) = conflict_between(a, b, api)
        assert conflict["path"] == "plan.txt" and len(conflict["versions"]) == 2
        holder, copy = conflict["versions"]
        assert holder["copy"] is None and copy["copy"].startswith("plan.sync-conflict-")
        listing = api.call("GET", "/api/shares/b/files")[1]["entries"]
        flagged = {e["path"] for e in listing if e["conflict"]}
        assert flagged == {"plan.txt", copy["copy"]}
        on_disk = {
            v["version"]: (b.root / (v["copy"] or "plan.txt")).read_text()
            for v in conflict["versions"]
        }
        keep = next(vid for vid, text in on_disk.items() if text == "from a\n")
        status, answer, _ = api.call(
            "POST", "/api/shares/b/resolve", {"path": "plan.txt", "keep": keep}
        )
        assert status == 200 and answer["resolved"] == "plan.txt", answer
        event, _ = stream.until("conflict-resolved", path="plan.txt")
        assert keep in event["said"]
        deadline = time.monotonic() + WAIT_S  # (a's own copy of the conflict may still be
        while (listed := api.call("GET", "/api/shares/b/conflicts")[1]) != []:  # on its way)
            assert time.monotonic() < deadline, f"still listed after resolving: {listed}"
            time.sleep(0.1)
        for device in (b, a):
            wait_for_file(device.root / "plan.txt", "from a\n")
            deadline = time.monotonic() + WAIT_S
            while (device.root / copy["copy"]).exists():
                assert time.monotonic() < deadline, f"the copy stays on {device.root.name}"
                time.sleep(0.05)
        status, answer, _ = api.call("POST", "/api/shares/b/resolve", {"path": "plan.txt"})
        assert status == 409 and "no conflict" in answer["error"]
    finally:
        stream.close()


def test_R3_wrongly_typed_json_is_refused_with_400_not_an_internal_error(lone) -> None:
    """``keep`` of a number, ``keep_both`` a string (``bool("no")`` kept both copies),
    rules with a lone surrogate: each was a 500 and a traceback in the node's log."""
    device, node, api = lone
    (device.root / "f.txt").write_text("x")
    scan(api, "solo")
    for body, name in (
        ({"path": "f.txt", "keep": 5}, "keep"),
        ({"path": "f.txt", "keep": ["x"]}, "keep"),
        ({"path": "f.txt", "keep_both": "no"}, "keep_both"),
        ({"path": "\ud800"}, "path"),
    ):
        status, answer, _ = api.call("POST", "/api/shares/solo/resolve", body)
        assert status == 400 and name in answer["error"], (body, answer)
    wrong = {"path": "f.txt", "version": 7}
    status, answer, _ = api.call("POST", "/api/shares/solo/restore", wrong)
    assert status == 400 and "version" in answer["error"], answer
    rules = {"rules": "\ud800", "previous": ""}
    status, answer, _ = api.call("PUT", "/api/shares/solo/ignore", rules)
    assert status == 400 and "rules" in answer["error"], answer
    assert "Traceback" not in node.log


def test_R27_the_ignore_endpoint_refuses_more_rules_than_are_read(lone) -> None:
    """Written, such a file would not apply at all (a scan skips it with a warning)."""
    device, node, api = lone
    rules = "".join(f"r{n}/\n" for n in range(MAX_RULES + 1))
    status, answer, _ = api.call("PUT", "/api/shares/solo/ignore", {"rules": rules, "previous": ""})
    assert status == 400 and "more than" in answer["error"], answer
    assert not (device.root / ".backerignore").exists()
    one = {"rules": "r/\n", "previous": ""}
    status, answer, _ = api.call("PUT", "/api/shares/solo/ignore", one)
    assert status == 200 and answer["invalid"] == [], answer
    assert "Traceback" not in node.log


def test_R2_the_ignore_endpoints_never_read_a_backerignore_that_is_not_a_file(
    lone, tmp_path: Path
) -> None:
    """Through a link the API showed a file outside the share (or hung on a fifo); a
    folder named .backerignore was a 500."""
    device, node, api = lone
    secret = tmp_path / "secret"
    secret.write_text("SECRET\n")
    ignore = device.root / ".backerignore"
    ignore.symlink_to(secret)
    status, answer, _ = api.call("GET", "/api/shares/solo/ignore")
    assert status == 409 and "SECRET" not in json.dumps(answer), answer
    ignore.unlink()
    ignore.mkdir()
    status, answer, _ = api.call("GET", "/api/shares/solo/ignore")
    assert status == 409 and "not a regular file" in answer["error"], answer
    status, answer, _ = api.call("PUT", "/api/shares/solo/ignore", {"rules": "", "previous": ""})
    assert status == 409 and ignore.is_dir(), answer
    assert "Traceback" not in node.log


# -- the state of each device -----------------------------------------------------------


def test_a_device_that_needs_a_file_says_how_much_and_is_in_sync_once_it_needs_none(
    cramped,
) -> None:
    """a tells b what it still needs on their session: a file that a's disk has no room
    for is needed (files, bytes) until b deletes it; then a is in sync again."""
    a, b, api = cramped
    a_id = a.run("id").stdout.strip()
    until(lambda: device_entry(api, a)["in_sync"], "a in sync at first")
    stream = api.stream()
    size = 12 << 20
    outside = b.root.parent / "big.bin"
    outside.write_bytes(os.urandom(size))
    outside.rename(b.root / "big.bin")
    # on the bus as it happens: a page need not poll for it (an earlier state of a, as
    # its session moves, may come first with nothing needed yet)
    event, _ = stream.until("device-state", device=a_id, need_files=1)
    assert event["need_bytes"] == size

    def needs() -> Json:
        entry = device_entry(api, a)
        return entry if entry["need_files"] == 1 else None

    entry = until(needs, "a needing big.bin")
    assert entry["connected"] and entry["in_sync"] is False and entry["need_bytes"] == size
    text = b.run("status", "--share", "b").stdout
    assert f"{a_id}  " in text and f"needs 1 files, {size} bytes" in text, text
    reported = json.loads(b.run("status", "--json", "--share", "b").stdout)["devices"]
    assert {d["id"]: d["need_files"] for d in reported}[a_id] == 1
    (b.root / "big.bin").unlink()
    entry = until(lambda: (e := device_entry(api, a))["in_sync"] and e, "a in sync again")
    assert (entry["need_files"], entry["need_bytes"]) == (0, 0)
    assert not (a.root / "big.bin").exists()


def test_transfer_rates_show_while_a_file_moves_and_fall_to_zero_after(pair) -> None:
    """Rates are measured over intervals of 0.5 s: on a fast disk 64 MiB arrived
    within one, so the file grows until its transfer outlasts a few."""
    a, b, api = pair
    for size in (64 << 20, 256 << 20, 1024 << 20):
        name = f"rates-{size >> 20}.bin"
        outside = a.root.parent / name
        outside.write_bytes(os.urandom(size))
        outside.rename(a.root / name)
        seen_in, seen_total = 0, 0
        deadline = time.monotonic() + 60
        while not ((b.root / name).exists() and (b.root / name).stat().st_size == size):
            assert time.monotonic() < deadline, f"{name} never arrived"
            devices = api.call("GET", "/api/shares/b/devices")[1]
            seen_in = max([seen_in] + [d["rate_in"] for d in devices if not d["this"]])
            seen_total = max([seen_total] + [d["rate_in"] for d in devices if d["this"]])
            time.sleep(0.05)
        if seen_in > 0 and seen_total > 0:
            break
        (a.root / name).unlink()
    assert seen_in > 0 and seen_total > 0, (seen_in, seen_total)
    entry = until(lambda: (e := device_entry(api, a))["rate_in"] == 0 and e, "the rate at 0")
    assert entry["rate_out"] == 0 and entry["in_sync"]
    print(f"{size >> 20} MiB: highest rate seen {seen_in} bytes/s")


def test_last_seen_is_when_the_session_ended_and_survives_a_restart_of_the_node(
    tmp_path: Path,
) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    with running_pair(a, b) as api:
        time.sleep(1.5)  # (the session opened well before it ends)
        before_ms = time.time_ns() // 1_000_000
        assert a.nodes[0].stop() == 0
        entry = until(lambda: (e := device_entry(api, a))["connected"] is False and e, "a gone")
        assert entry["last_seen_ms"] >= before_ms
        assert b.nodes[0].stop() == 0
        node, api = start(b)  # a stays away
        try:
            again = device_entry(api, a)
            assert not again["connected"] and again["last_seen_ms"] == entry["last_seen_ms"]
            assert again["need_files"] is None and again["in_sync"] is None
        finally:
            node.stop()
    offline = json.loads(b.run("status", "--json", "--share", "b").stdout)["devices"]
    a_id = a.run("id").stdout.strip()
    assert {d["id"]: d["last_seen_ms"] for d in offline}[a_id] == entry["last_seen_ms"]


def test_R1_a_restore_answers_its_own_outcome_not_the_shares_standing_problems(
    tmp_path: Path,
) -> None:
    device = Device(tmp_path, "notes")
    device.root.mkdir()
    (device.root / "back\\slash").write_text("no other system can hold this name\n")
    (device.root / "hist.txt").write_text("first\n")
    device.run("init", str(device.root), check=False)  # (exit 3: the skipped file)
    node, api = start(device)
    try:
        standing = api.call("GET", "/api/shares/notes")[1]
        assert "not portable" in json.dumps(standing), standing  # a standing failure
        (tmp_path / "new").write_text("second\n")  # (a new file: the old one is kept)
        os.replace(tmp_path / "new", device.root / "hist.txt")
        while len(api.call("GET", "/api/shares/notes/history?path=hist.txt")[1]) < 2:
            scan(api, "notes")
            time.sleep(0.1)
        history = api.call("GET", "/api/shares/notes/history?path=hist.txt")[1]
        first = next(v["version"] for v in history if v["size"] == len("first\n"))
        status, answer, _ = api.call(
            "POST", "/api/shares/notes/restore", {"path": "hist.txt", "version": first}
        )
        assert status == 200, answer
        assert (device.root / "hist.txt").read_text() == "first\n"

        second = next(v["version"] for v in history if v["size"] == len("second\n"))
        by_node = device.run(
            "restore",
            str(device.root / "hist.txt"),
            "--version",
            second,
            "--dir",
            str(device.root),
            check=False,
        )
        assert by_node.returncode == 0, by_node.stderr
        assert (device.root / "hist.txt").read_text() == "second\n"
    finally:
        node.stop()


# -- reads under load, deleted entries, an ended session -----------------------------

MANY_FILES = 8000  # in 80 folders, recorded in events of ~1,000 (as by 'backer init')
POLLED = (
    "/api/shares/b",
    "/api/shares/b/files?path=",
    "/api/shares/b/changes",
    "/api/shares/b/changes?path=hist.txt",
    "/api/shares/b/conflicts",
)
HISTORY = 30  # events that edit hist.txt: the journal has pages to read
POLLERS = 4  # clients asking for POLLED round and round, one request at a time each
PROPAGATION_S = 8.0  # a small file from a to b while they poll (without them: 1-4 s here)


@contextlib.contextmanager
def polling(api: Api, stop_after_s: float) -> Iterator[list[float]]:
    """POLLERS threads reading POLLED in a loop (each at most 2,000 requests and
    ``stop_after_s``) for the block; the seconds each request took. Any answer but 200
    fails the test after the block."""
    took: list[float] = []
    refused: list[tuple[str, int]] = []
    done = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + stop_after_s
        for path in itertools.islice(itertools.cycle(POLLED), 2000):
            if done.is_set() or time.monotonic() > deadline:
                return
            started = time.monotonic()
            status, _, _ = api.call("GET", path)
            if status != 200:
                refused.append((path, status))
            took.append(time.monotonic() - started)

    threads = [threading.Thread(target=poll, daemon=True) for _ in range(POLLERS)]
    for thread in threads:
        thread.start()
    try:
        yield took
    finally:
        done.set()
        for thread in threads:
            thread.join(60)
    assert not refused, refused


def test_R4_a_change_arrives_in_time_while_clients_poll_the_heavy_reads_of_a_big_share(
    tmp_path: Path,
) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    a.root.mkdir()
    for n in range(MANY_FILES):
        folder = a.root / f"d{n % 80:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"f{n:05d}.txt").write_text(f"file {n}\n")
    a.run("init", str(a.root))
    share = Share(a.root, load_or_create_key(a.home))
    try:  # (one journal event each, as a running node's scans would make them)
        for n in range(HISTORY):
            (a.root / "hist.txt").write_text(f"edit {n}\n")
            share.scan(paths=["hist.txt"])
    finally:
        share.close()
    with running_pair(a, b, made=True) as api:
        until(lambda: (b.root / "d79" / f"f{MANY_FILES - 1:05d}.txt").exists(), "b has all", 300)
        wait_for_file(b.root / "hist.txt", f"edit {HISTORY - 1}\n", timeout=60)
        lags = []
        with polling(api, stop_after_s=120) as took:
            until(lambda: len(took) >= POLLERS, "the first answers", 60)
            for n in range(3):
                written = time.monotonic()
                (a.root / f"probe-{n}.txt").write_text(f"probe {n}\n")
                wait_for_file(b.root / f"probe-{n}.txt", f"probe {n}\n", timeout=60)
                lags.append(time.monotonic() - written)
        print(
            f"a → b while polled: {[round(s, 2) for s in lags]} s; {len(took)} requests, "
            f"median {statistics.median(took):.3f} s, max {max(took):.3f} s"
        )
        assert max(lags) < PROPAGATION_S, lags


def test_R10_deleted_entries_are_listed_when_asked_and_restored_from_their_history(
    lone,
) -> None:
    device, _, api = lone
    (device.root / "gone.txt").write_text("keep me\n")
    scan(api, "solo")
    (device.root / "gone.txt").unlink()

    def recorded() -> list[Json]:
        scan(api, "solo")  # (or the watcher's scan has taken it)
        return _deleted_listed(api)

    until(recorded, "the deletion recorded")
    plain = api.call("GET", "/api/shares/solo/files")[1]["entries"]
    assert "gone.txt" not in [e["path"] for e in plain]
    (entry,) = _deleted_listed(api)
    assert entry["kind"] == "file" and entry["versions"][0]["kind"] == "deleted"
    history = api.call("GET", "/api/shares/solo/history?path=gone.txt")[1]
    kept = next(v["version"] for v in history if v["kind"] == "file")
    status, answer, _ = api.call(
        "POST", "/api/shares/solo/restore", {"path": "gone.txt", "version": kept}
    )
    assert status == 200, answer
    assert (device.root / "gone.txt").read_text() == "keep me\n"
    assert not _deleted_listed(api)


def _deleted_listed(api: Api) -> list[Json]:
    listing = api.call("GET", "/api/shares/solo/files?deleted=1")[1]["entries"]
    return [e for e in listing if e["deleted"]]


def test_R19_without_a_session_the_page_says_how_to_log_in_and_the_api_answers_json(
    lone,
) -> None:
    _, _, api = lone
    status, answer, response = api.call("GET", "/", key=None)
    assert status == 401
    assert response.headers["Content-Type"].startswith("text/html")
    assert "Session ended: run 'backer open' again" in answer
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "password" not in answer  # (on loopback: 'backer open' alone)
    status, answer, response = api.call("GET", "/api/shares", key=None)
    assert (status, answer) == (401, {"error": "log in first: run 'backer open'"})
    assert api.call("GET", "/static/app.js", key=None)[0] == 401
    assert api.call("GET", "/", key="wrong")[0] == 401
    assert api.call("GET", "/")[0] == 200  # (the key still opens the page)

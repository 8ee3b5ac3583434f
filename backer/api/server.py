"""The node's HTTP server: the web UI and the JSON API, on the node's own event loop.

aiohttp's ``AppRunner``/``TCPSite`` run inside the loop ``backer run`` already has, and
leave its signal handlers alone (docs/decisions.md). Every request passes, in order:

1. **Host**: the bound address or a loopback name with the bound port, else 403 (a page
   of another site that a rebinding DNS points at 127.0.0.1 names its own host);
2. **Origin**: absent or this server's own, else 403 (no CORS is ever answered);
3. **credentials**: the API key as a bearer token, or a session cookie from a login
   (see :mod:`backer.api.access`), else 401; with a cookie, every ``/api/`` request also
   needs the session's CSRF token in ``X-CSRF-Token`` (``/api/events``, which a
   browser's EventSource opens without headers: as ``?csrf=``), else 403.

Why every request, reads too: a cookie is scoped by host, not port, so a browser sends
it to any other server on 127.0.0.1 as well. The token is what such a server cannot
have: the page gets it once, in the fragment of the login redirect (never sent to a
server), and keeps it in ``sessionStorage``, which is per origin, port included; no
endpoint hands it out for a cookie.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from backer.api import access
from backer.api.access import Settings
from backer.api.reads import Reader
from backer.api.routes import NODE, READER, routes
from backer.connections.addresses import advertised, format_address
from backer.connections.limits import Admission
from backer.errors import BackerError
from backer.node.node import Node

COOKIE = "backer_session_{port}"  # per port: two nodes on one machine keep their own
MAX_BODY = 64 * 1024
SHUTDOWN_S = 1.0
MAX_CONNECTIONS = 128  # open HTTP connections, event streams included; the oldest goes first
MAX_PER_ADDRESS = 32  # beyond loopback, one address churns only its own connections
IDLE_S = 15.0  # a connection with no request in flight (none yet, too) is closed after this
STATIC = Path(__file__).parent / "static"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/login"})  # reachable without credentials (Host, Origin checked)
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'",
}
ENDED_PAGE = (STATIC / "ended.html").read_text(encoding="utf-8")
PASSWORD_FORM = (
    '<form method="post" action="/login"><input type="password" name="password" '
    'aria-label="Password" autocomplete="current-password" required>'
    '<button type="submit">Log in with the password</button></form>'
)
_ENDED_STYLE = re.search(r"<style>(.*?)</style>", ENDED_PAGE, re.S)
assert _ENDED_STYLE is not None
ENDED_CSP = HEADERS["Content-Security-Policy"].replace(
    "default-src 'self'",
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_ENDED_STYLE.group(1).encode()).digest()).decode()
    + "'",
)
CREDENTIALS: web.AppKey[access.Credentials] = web.AppKey("credentials")
ATTEMPTS: web.AppKey[access.Attempts] = web.AppKey("attempts")
HOSTS: web.AppKey[frozenset[str]] = web.AppKey("hosts")
COOKIE_NAME: web.AppKey[str] = web.AppKey("cookie_name")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refuse(status: type[web.HTTPException], reason: str) -> web.HTTPException:
    return status(text=json.dumps({"error": reason}), content_type="application/json")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, Origin, credentials and CSRF (see the module docstring), then the view;
    a BackerError becomes 400 with its one line."""
    host = (request.headers.get("Host") or "").lower()
    if host not in request.app[HOSTS]:
        raise _refuse(web.HTTPForbidden, "this server does not answer for that host")
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != f"{request.scheme}://{host}":
        raise _refuse(web.HTTPForbidden, "cross-origin requests are refused")
    credentials = request.app[CREDENTIALS]
    if request.path not in OPEN_PATHS and not credentials.bearer(
        request.headers.get("Authorization", "")
    ):
        csrf = credentials.csrf(request.cookies.get(request.app[COOKIE_NAME]))
        if csrf is None and request.path == "/" and request.method in SAFE_METHODS:
            return _session_ended(credentials.password is not None)
        if csrf is None:
            raise _refuse(web.HTTPUnauthorized, "log in first: run 'backer open'")
        given = request.headers.get("X-CSRF-Token", "")
        if request.path == "/api/events" and not given:
            given = request.query.get("csrf", "")
        checked = request.path.startswith("/api/") or request.method not in SAFE_METHODS
        if checked and not hmac.compare_digest(given.encode(), csrf.encode()):
            raise _refuse(
                web.HTTPForbidden, "missing or wrong CSRF token: open the page with 'backer open'"
            )
    try:
        return await handler(request)
    except BackerError as exc:
        raise _refuse(web.HTTPBadRequest, str(exc)) from exc


async def _headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)


def _session_ended(password: bool) -> web.Response:
    """The page without a session (a browser's reload once its session is gone): 401
    and a few words on how to log in again, as HTML a person reads, where an API path
    answers JSON; served beyond loopback, with the password form (``POST /login``).
    Its only style is inline, allowed by its hash alone."""
    return web.Response(
        status=401,
        text=ENDED_PAGE.replace("<!--password-->", PASSWORD_FORM if password else ""),
        content_type="text/html",
        headers={"Content-Security-Policy": ENDED_CSP},
    )


def _logged_in(request: web.Request) -> web.Response:
    """A new session: its cookie set, and on to the page with the session's CSRF token
    in the fragment (the only way it is ever handed out; see the module docstring)."""
    credentials = request.app[CREDENTIALS]
    cookie = credentials.open_session()
    response = web.HTTPSeeOther(f"/#csrf={credentials.csrf(cookie)}")
    response.set_cookie(
        request.app[COOKIE_NAME],
        cookie,
        httponly=True,
        samesite="Strict",
        path="/",
        max_age=access.SESSION_TTL_S,
    )
    return response


async def login(request: web.Request) -> web.Response:
    """``GET /login?token=...`` (from ``backer open``), or ``POST /login`` with the
    password (a form field), opens a session. Too many wrong passwords from one
    address: 429 with Retry-After, even for the right one, until it is allowed again."""
    credentials = request.app[CREDENTIALS]
    if request.method == "POST":
        attempts, address = request.app[ATTEMPTS], request.remote or "?"
        wait = attempts.retry_after(address)
        if wait is not None:
            refused = _refuse(web.HTTPTooManyRequests, f"too many wrong passwords: wait {wait} s")
            refused.headers["Retry-After"] = str(wait)
            raise refused
        form = await request.post()
        if not credentials.check_password(str(form.get("password", ""))):
            attempts.failed(address)
            raise _refuse(web.HTTPUnauthorized, "wrong password")
        attempts.succeeded(address)
    elif not credentials.redeem(request.query.get("token", "")):
        raise _refuse(
            web.HTTPUnauthorized, "this login link is used or expired: run 'backer open' again"
        )
    return _logged_in(request)


async def page(_request: web.Request) -> web.FileResponse:
    """The web UI: one page, plain HTML/CSS/JS from backer/api/static (no build step)."""
    return web.FileResponse(STATIC / "index.html")


def allowed_hosts(settings: Settings, port: int) -> frozenset[str]:
    """The Host headers this server answers: loopback names, the bound address, and
    (bound to every address) each address of this machine."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    hosts = {f"{name}:{port}" for name in names}
    hosts |= {a.lower() for a in advertised(settings.host, port)}
    return frozenset(hosts)


def application(
    node: Node, credentials: access.Credentials, hosts: frozenset[str], port: int
) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[NODE] = node
    app[READER] = Reader()
    app.on_cleanup.append(lambda app: app[READER].close())
    app[CREDENTIALS] = credentials
    app[ATTEMPTS] = access.Attempts(lambda line: node.log.warning("%s", line))
    app[HOSTS] = hosts
    app[COOKIE_NAME] = COOKIE.format(port=port)
    app.on_response_prepare.append(_headers)
    app.router.add_get("/login", login)
    app.router.add_post("/login", login)
    app.router.add_get("/", page)
    app.router.add_static("/static", STATIC)
    app.add_routes(routes)
    return app


class CountedConnection(asyncio.Protocol):
    """One HTTP connection, admitted by an :class:`Admission` before aiohttp sees it:
    without a cap, idle connections (aiohttp keeps one an hour by default, before the
    first request too) held every descriptor of the node, and then its peers, database
    and scans failed to open anything."""

    def __init__(self, inner: asyncio.Protocol, admission: Admission) -> None:
        self.inner = inner
        self.admission = admission
        self.ticket: object | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        self.ticket = self.admission.enter(address, transport.abort)  # type: ignore[attr-defined]
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.admission.leave(self.ticket)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def serve(node: Node, settings: Settings, home: Path, stop: asyncio.Event) -> None:
    """Serve the UI for ``node`` until ``stop`` is set. A port already taken is
    logged and the node goes on without a UI (syncing matters more). The socket is
    bound before the application is made: it answers Host headers and names its
    cookie by the port bound (``--api HOST:0`` asks for any free one)."""
    credentials = access.Credentials(access.api_key(home), settings.password, home)
    await node.started.wait()
    admission = Admission(MAX_CONNECTIONS, MAX_PER_ADDRESS)
    handlers: web.Server  # (set before the listener starts serving)
    try:
        listener = await asyncio.get_running_loop().create_server(
            lambda: CountedConnection(handlers(), admission),
            settings.host,
            settings.port,
            reuse_address=True,
            start_serving=False,
        )
    except OSError as exc:
        node.log.warning(
            "the web UI is not served: cannot listen on %s: %s",
            format_address(settings.host, settings.port),
            exc.strerror,
        )
        return
    port = listener.sockets[0].getsockname()[1]
    runner = web.AppRunner(
        application(node, credentials, allowed_hosts(settings, port), port),
        access_log=None,
        shutdown_timeout=SHUTDOWN_S,
        keepalive_timeout=IDLE_S,
    )
    try:
        await runner.setup()
        assert runner.server is not None
        handlers = runner.server
        await listener.start_serving()
        url = f"http://{format_address(settings.host, port)}"
        if settings.host in ("0.0.0.0", "::"):
            url = f"http://{format_address('127.0.0.1', port)}"
        access.publish_address(home, url)
        node.log.info("web UI on %s ('backer open' logs a browser in)", url)
        try:
            await stop.wait()
        finally:
            access.withdraw_address(home)
    finally:
        listener.close()
        await runner.cleanup()

"""Who may use the web UI and HTTP API of a running node, and how they prove it.

- The **API key** (``api-key`` in the device home, mode 0600, made on first use): a
  script sends it as ``Authorization: Bearer KEY``.
- A **login URL** for a browser (``backer open``): a one-time token signed with the
  key, valid for LOGIN_TTL_S; the node exchanges it once for a session cookie
  (``HttpOnly``, ``SameSite=Strict``) and a CSRF token that the page sends back with
  every state-changing request.
- A **password** (``BACKER_API_PASSWORD``) is required before the node serves the UI on
  an address other machines can reach; ``POST /login`` with it also opens a session.
  Wrong passwords are limited per client address (:class:`Attempts`).

A login token is used once: the node remembers the ones it took until they expire, and
takes none made before it started (a link it took before a restart stays used).

Sessions outlive a restart of the node: ``api-sessions`` in the device home (mode 0600)
holds each session's SHA-256 and expiry, never the cookie itself; the CSRF token is
derived from the cookie with the key, so nothing else needs keeping.

Only the device's owner can read the key, so only they can sign a login token. Where
the node serves the UI is written to ``web`` in the device home (with its pid) while it
runs, so ``backer open`` finds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import json
import math
import os
import secrets
import stat
import sys
import time
import webbrowser
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backer.connections.addresses import format_address, loopback_only, parse_address
from backer.errors import BackerError
from backer.numbers import natural

DEFAULT_ADDRESS = "127.0.0.1:7655"
PASSWORD_VARIABLE = "BACKER_API_PASSWORD"
KEY_FILE = "api-key"
WEB_FILE = "web"
SESSIONS_FILE = "api-sessions"
LOGIN_PAGE = "login.html"
LOGIN_TTL_S = 120
SESSION_TTL_S = 30 * 86400  # a browser logged in stays so this long (then: 'backer open')
MAX_SESSIONS = 64  # the session closest to its expiry is dropped beyond this many
MIN_PASSWORD = 12  # characters: 5 guesses a minute then take ages on any real password
MAX_FAILURES = 5  # wrong passwords from one address within FAILURE_WINDOW_S: then 429
FAILURE_WINDOW_S = 60.0
MAX_CLIENTS = 4096  # addresses whose failures are remembered (the oldest forgotten)


@dataclass(frozen=True)
class Settings:
    """Where to serve the UI, and the password that another address requires."""

    host: str
    port: int
    password: str | None = None

    @property
    def loopback(self) -> bool:
        return loopback_only([format_address(self.host, self.port)])

    def __post_init__(self) -> None:
        if not self.loopback and len(self.password or "") < MIN_PASSWORD:
            raise BackerError(
                f"the web UI is served on {format_address(self.host, self.port)} (reachable "
                f"from other machines) only with a password of at least {MIN_PASSWORD} "
                f"characters: set {PASSWORD_VARIABLE}"
            )


def settings_from(text: str) -> Settings | None:
    """``--api HOST:PORT`` (or ``off``) and the password from the environment."""
    if text.strip().lower() == "off":
        return None
    host, port = parse_address(text, listening=True)
    return Settings(host, port, os.environ.get(PASSWORD_VARIABLE) or None)


def api_key(home: Path) -> str:
    """The device's API key, made (mode 0600) if there is none yet."""
    path = home / KEY_FILE
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
        raise BackerError(f"{path} must be a file only its owner can read (chmod 600 {path})")
    key = path.read_text().strip()
    if len(key) < 32:
        raise BackerError(f"{path} holds no usable key (remove it: a new one is made)")
    return key


def _mac(key: str, nonce: str, expires_ms: int) -> str:
    message = f"backer login {nonce} {expires_ms}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def login_token(key: str, now_ms: int | None = None) -> str:
    """A one-time login token, valid for LOGIN_TTL_S."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    nonce, expires_ms = secrets.token_hex(16), now_ms + LOGIN_TTL_S * 1000
    return f"{nonce}.{expires_ms}.{_mac(key, nonce, expires_ms)}"


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` (mode 0600, replaced whole, never through a link left there)."""
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


def publish_address(home: Path, url: str) -> None:
    """Tell ``backer open`` where this node serves the UI (mode 0600, replaced whole)."""
    _write_private(home / WEB_FILE, json.dumps({"url": url, "pid": os.getpid()}))


def withdraw_address(home: Path) -> None:
    """The node stops serving the UI (the file is removed only if it is still ours)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads((home / WEB_FILE).read_text()).get("pid") == os.getpid():
            (home / WEB_FILE).unlink()


def login_url(home: Path) -> str:
    """A one-time URL that logs a browser in to the running node's UI."""
    try:
        served = json.loads((home / WEB_FILE).read_text())
        url, pid = str(served["url"]), int(served["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackerError(
            "no web UI is being served on this device: start 'backer run' first"
        ) from exc
    return f"{url}/login?token={login_token(api_key(home))}"


def login_page(home: Path) -> Path:
    """A page (``login.html`` in the device home, mode 0600) that sends a browser on to
    a login URL of its own one-time token. A browser is started with what it opens on
    its command line, which every user of the machine can read (``/proc/PID/cmdline``):
    given the URL, another user could redeem the token before the browser did (R50)."""
    url = html.escape(login_url(home))
    page = home / LOGIN_PAGE
    _write_private(
        page,
        f'<!doctype html><meta charset="utf-8"><meta name="referrer" content="no-referrer">'
        f'<meta http-equiv="refresh" content="0; url={url}">'
        f'<title>backer</title><a href="{url}">Log in to backer</a>\n',
    )
    return page


def open_browser(home: Path) -> bool:
    """Open the :func:`login_page` in a browser, where there is a graphical one to
    open; whether it was."""
    graphical = sys.platform in ("darwin", "win32") or any(
        os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY")
    )
    return graphical and webbrowser.open(login_page(home).as_uri())


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


@dataclass
class Credentials:
    """What the node accepts: the key, one-time login tokens, sessions, a password.
    With ``home``, sessions are kept in its ``api-sessions`` (see the module docstring)."""

    key: str
    password: str | None = None
    home: Path | None = None

    def __post_init__(self) -> None:
        self.sessions: dict[str, int] = self._load()  # SHA-256 of the cookie -> expiry ms
        self.used: dict[str, int] = {}  # login nonces taken, until they expire
        self.since_ms = _now_ms()  # tokens made before are refused: ``used`` was another
        # run's, and a link it redeemed would open a session again (R52)

    def bearer(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.key.encode()
        )

    def redeem(self, token: str, now_ms: int | None = None) -> bool:
        """Whether ``token`` is a valid login token not used before (then it is used)."""
        now_ms = _now_ms() if now_ms is None else now_ms
        self.used = {n: e for n, e in self.used.items() if e >= now_ms}
        nonce, _, rest = token.partition(".")
        expires_text, _, mac = rest.partition(".")
        expires_ms = natural(expires_text)
        if expires_ms is None or nonce in self.used:
            return False
        if not now_ms <= expires_ms <= now_ms + LOGIN_TTL_S * 1000:
            return False
        if expires_ms - LOGIN_TTL_S * 1000 < self.since_ms:
            return False
        if not hmac.compare_digest(mac.encode(), _mac(self.key, nonce, expires_ms).encode()):
            return False
        self.used[nonce] = expires_ms
        return True

    def check_password(self, given: str) -> bool:
        return self.password is not None and hmac.compare_digest(
            given.encode(), self.password.encode()
        )

    def open_session(self, now_ms: int | None = None) -> str:
        """A new session's cookie value (valid SESSION_TTL_S, kept)."""
        now_ms = _now_ms() if now_ms is None else now_ms
        cookie = secrets.token_urlsafe(32)
        live = {d: e for d, e in self.sessions.items() if e > now_ms}
        live[_digest(cookie)] = now_ms + SESSION_TTL_S * 1000
        kept = sorted(live.items(), key=lambda item: item[1])[-MAX_SESSIONS:]
        self.sessions = dict(kept)
        self._save()
        return cookie

    def csrf(self, cookie: str | None, now_ms: int | None = None) -> str | None:
        """The CSRF token of the session ``cookie`` (None: no such session, or expired)."""
        now_ms = _now_ms() if now_ms is None else now_ms
        if not cookie or self.sessions.get(_digest(cookie), 0) <= now_ms:
            return None
        return hmac.new(self.key.encode(), b"backer csrf " + cookie.encode(), "sha256").hexdigest()

    def _load(self) -> dict[str, int]:
        """The sessions kept by an earlier run (none if the file is absent or damaged)."""
        if self.home is None:
            return {}
        try:
            kept = json.loads((self.home / SESSIONS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(kept, dict):
            return {}
        now_ms = _now_ms()
        return {
            d: e for d, e in kept.items() if isinstance(d, str) and type(e) is int and e > now_ms
        }

    def _save(self) -> None:
        """Write the sessions (mode 0600, replaced whole, durable)."""
        if self.home is None:
            return
        path = self.home / SESSIONS_FILE
        temp = self.home / f"{SESSIONS_FILE}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.sessions, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)


class Attempts:
    """Wrong passwords per client address: after MAX_FAILURES within FAILURE_WINDOW_S
    the address is refused (429) until the oldest of them is that old, whatever it
    sends, and the lock-out is logged once. Bounded: MAX_CLIENTS addresses at most."""

    def __init__(
        self, log: Callable[[str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log = log
        self.clock = clock
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str) -> deque[float]:
        times = self.failures.get(address, deque())
        while times and times[0] <= self.clock() - FAILURE_WINDOW_S:
            times.popleft()
        return times

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again (None: it may now)."""
        times = self._recent(address)
        if len(times) < MAX_FAILURES:
            return None
        return max(1, math.ceil(times[-MAX_FAILURES] + FAILURE_WINDOW_S - self.clock()))

    def failed(self, address: str) -> None:
        """A wrong password from ``address``."""
        times = self._recent(address)
        times.append(self.clock())
        self.failures[address] = times
        self.failures.move_to_end(address)
        while len(self.failures) > MAX_CLIENTS:
            self.failures.popitem(last=False)
        if len(times) == MAX_FAILURES:
            self.log(
                f"web UI: {MAX_FAILURES} wrong passwords from {address} within "
                f"{FAILURE_WINDOW_S:.0f} s: its logins are refused for "
                f"{self.retry_after(address)} s"
            )

    def succeeded(self, address: str) -> None:
        self.failures.pop(address, None)

"""Who may use the web UI and HTTP API of a running node, and how they prove it.

- The **API key** (``api-key`` in the device home, mode 0600, made on first use): a
  script sends it as ``Authorization: Bearer KEY``.
- A **login URL** for a browser (``backer open``): a one-time token signed with the
  key, valid for LOGIN_TTL_S; the node exchanges it once for a session cookie
  (``HttpOnly``, ``SameSite=Strict``) and a CSRF token that the page sends back with
  every state-changing request.
- A **password** (``BACKER_API_PASSWORD``) is required before the node serves the UI on
  an address other machines can reach; ``POST /login`` with it also opens a session.

Only the device's owner can read the key, so only they can sign a login token. Where
the node serves the UI is written to ``web`` in the device home (with its pid) while it
runs, so ``backer open`` finds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
import time
import webbrowser
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from backer.connections.addresses import format_address, loopback_only
from backer.errors import BackerError
from backer.numbers import natural
from backer.protocol.invite import parse_address

DEFAULT_ADDRESS = "127.0.0.1:7655"
PASSWORD_VARIABLE = "BACKER_API_PASSWORD"
KEY_FILE = "api-key"
WEB_FILE = "web"
LOGIN_TTL_S = 120
MAX_SESSIONS = 64  # the oldest session is dropped beyond this many


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
        if not self.loopback and not self.password:
            raise BackerError(
                f"the web UI is served on {format_address(self.host, self.port)} (reachable "
                f"from other machines) only with a password: set {PASSWORD_VARIABLE}"
            )


def settings_from(text: str) -> Settings | None:
    """``--api HOST:PORT`` (or ``off``) and the password from the environment."""
    if text.strip().lower() == "off":
        return None
    host, port = parse_address(text)
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


def publish_address(home: Path, url: str) -> None:
    """Tell ``backer open`` where this node serves the UI (mode 0600, replaced whole)."""
    temp = home / f"{WEB_FILE}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"url": url, "pid": os.getpid()}, handle)
    os.replace(temp, home / WEB_FILE)


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


def open_browser(home: Path) -> bool:
    """Open a login URL (its own one-time token) in a browser, where there is a
    graphical one to open; whether it was."""
    graphical = sys.platform in ("darwin", "win32") or any(
        os.environ.get(name) for name in ("DISPLAY", "WAYLAND_DISPLAY")
    )
    return graphical and webbrowser.open(login_url(home))


@dataclass
class Credentials:
    """What the node accepts: the key, one-time login tokens, sessions, a password."""

    key: str
    password: str | None = None

    def __post_init__(self) -> None:
        self.sessions: OrderedDict[str, str] = OrderedDict()  # cookie -> CSRF token
        self.used: dict[str, int] = {}  # login nonces taken, until they expire

    def bearer(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.key.encode()
        )

    def redeem(self, token: str, now_ms: int | None = None) -> bool:
        """Whether ``token`` is a valid login token not used before (then it is used)."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        self.used = {n: e for n, e in self.used.items() if e >= now_ms}
        nonce, _, rest = token.partition(".")
        expires_text, _, mac = rest.partition(".")
        expires_ms = natural(expires_text)
        if expires_ms is None or nonce in self.used:
            return False
        if not now_ms <= expires_ms <= now_ms + LOGIN_TTL_S * 1000:
            return False
        if not hmac.compare_digest(mac.encode(), _mac(self.key, nonce, expires_ms).encode()):
            return False
        self.used[nonce] = expires_ms
        return True

    def check_password(self, given: str) -> bool:
        return self.password is not None and hmac.compare_digest(
            given.encode(), self.password.encode()
        )

    def open_session(self) -> str:
        """A new session's cookie value."""
        cookie = secrets.token_urlsafe(32)
        self.sessions[cookie] = secrets.token_urlsafe(32)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return cookie

    def csrf(self, cookie: str | None) -> str | None:
        """The CSRF token of the session ``cookie`` (None: no such session)."""
        return self.sessions.get(cookie) if cookie else None

"""The ``backer`` command line. Thin: parse, call the engine, print, map errors to exits.

Every failure the user can act on is a :class:`BackerError` (or a journal error) and
becomes one line on stderr with exit status 1; anything unexpected becomes one line
with status 70 (set ``BACKER_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

# What every command loads stays small: click and the modules that need neither the
# database nor the CRDT nor the network, so that '--version', '--help', 'id', 'shares',
# 'forget', 'open' and 'service' start in a fraction of the engine's import time (every
# process pays it, tests run hundreds). A command imports the engine's parts it uses in
# its own body (tests/test_startup.py checks what the light commands load).
from backer import __version__
from backer.api import access as api_access
from backer.config import registry
from backer.config import service as service_mod
from backer.config.identity import device_id, home, load_or_create_key, parse_device_id, short_id
from backer.connections.addresses import advertised, loopback_only, parse_address
from backer.connections.limits import raise_fd_limit
from backer.db.recovery import make_directories
from backer.errors import BackerError
from backer.errors import reason as error_reason
from backer.fs.paths import METADATA_DIR
from backer.model import entropy
from backer.model.records import Kind, Version, timestamp
from backer.numbers import natural

if TYPE_CHECKING:
    import asyncio

    from backer.connections import transport
    from backer.db.catalog import Problem
    from backer.model import revisions
    from backer.model.replicator import Replicator
    from backer.model.share import Share, ShareBusy
    from backer.node.node import Node
    from backer.progress import Reporter
    from backer.protocol.channel import SecureChannel
    from backer.protocol.invite import InviteToken
    from backer.protocol.session import Session

EXIT_ERROR = 1
EXIT_FILES_FAILED = 3  # the command did its job, but some files could not be recorded/applied
EXIT_INTERNAL = 70
SHOWN_PER_REASON = 10


AHEAD_MS = 60_000  # a time more than this past this device's clock is in its future


def _when(time_ms: int) -> str:
    return timestamp(time_ms)


def _dated(time_ms: int) -> str:
    """A recorded time as ``history`` and ``log`` show it: one in this device's future
    was made on a device whose clock was ahead, and is said to be."""
    if time_ms > time.time_ns() // 1_000_000 + AHEAD_MS:
        return f"{_when(time_ms)} (ahead of this device's clock)"
    return _when(time_ms)


_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(text: str) -> str:
    """``text`` safe for a terminal: names come from other devices, and a control
    character (C0, DEL, C1) or a bidi override in them could drive the terminal or
    disguise what is printed, so each is written as an escape (``\\x1b``, ``\\u202e``)."""
    return _UNSHOWN.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _say(text: str, err: bool = False) -> None:
    click.echo(_shown(text), err=err)


def _describe(version: Version) -> str:
    if version.kind == Kind.FILE:
        executable = ", executable" if version.executable else ""
        return f"file, {version.size} B, {version.content.hex()[:12]}{executable}"
    if version.kind == Kind.SYMLINK:
        return f"symlink -> {version.link_target}"
    return version.kind.name.lower()


def _quiet(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.meta["backer.quiet"] = value


quiet_option = click.option(
    "-q", "--quiet", is_flag=True, expose_value=False, callback=_quiet, help="Show no progress."
)


def _progress(label: str) -> contextlib.AbstractContextManager[Reporter | None]:
    """The command's progress display (see :mod:`backer.progress`), unless ``--quiet``.
    Each call starts a step of a long command (a scan; a sync's sessions, once the event
    loop answers Ctrl-C itself): a Ctrl-C Python swallowed since the command's start-up
    check (see backer.entry), in the display's own loading of rich or in a finalizer
    while the scan ran, ends the command here."""
    from backer.entry import raise_if_interrupted
    from backer.progress import reporter

    raise_if_interrupted()
    return reporter(label, click.get_current_context().meta.get("backer.quiet", False))


share_option = click.option(
    "--share",
    "--dir",
    "directory",
    metavar="NAME|DIR",
    help="The share: its name (see 'backer shares') or a directory inside it "
    "(default: the share holding PATH, if the command takes one, else the current "
    "directory).",
)


def _locate(text: str | None, path: str | None = None) -> Path:
    """``--share``: a registered share's name (a name wins over a directory of the same
    name: write ``./NAME`` for that), else a directory, inside a share or not yet one.
    Without it: the share holding ``path`` (see :func:`_share_of`), else the current
    directory."""
    if text is None:
        return _share_of(path) if path is not None else _current_share()
    if text and os.sep not in text and text not in (".", ".."):
        for entry in registry.registered(home()):
            if entry.name == text:
                return entry.root
    path = Path(os.path.abspath(text))
    if not path.exists():
        raise BackerError(
            f"no share named {text!r} (see 'backer shares') and no directory {path}"
            if os.sep not in text
            else f"directory does not exist: {path}"
        )
    return path


def _current_share() -> Path:
    """The current directory, for a share command given neither ``--share`` nor PATH;
    where it is in no share (none on disk, none registered): this device's only share
    (as ``--share`` would name it), or, while it has several, an error naming them
    (rather than suggesting a repair of the directory)."""
    from backer.model.share import find_root

    cwd = Path.cwd()
    entries = registry.registered(home())
    if not entries or any(e.root == cwd or e.root in cwd.parents for e in entries):
        return cwd
    if find_root(cwd) is None and not any((p / METADATA_DIR).is_dir() for p in (cwd, *cwd.parents)):
        if len(entries) == 1:
            return entries[0].root
        names = ", ".join(entry.name for entry in entries)
        raise BackerError(
            f"not inside a share: {cwd}; this device's shares: {names} (see 'backer "
            "shares'): run the command inside one or name it with --share NAME"
        )
    return cwd


def _share_of(path: str) -> Path:
    """The share a command's PATH is in, when no ``--share`` names one: the registered
    share whose folder holds it (the innermost), else the share above it on disk (one
    not registered); a path in no share is an error, whatever the current directory."""
    from backer.model.share import find_root

    absolute = Path(os.path.abspath(path))
    spellings = dict.fromkeys([absolute, absolute.resolve()])  # (as typed, links resolved)
    roots = [entry.root for entry in registry.registered(home())]
    for where in spellings:
        holding = [root for root in roots if root == where or root in where.parents]
        if holding:
            return max(holding, key=lambda root: len(root.parts))
    for where in spellings:
        existing = next(p for p in (where, *where.parents) if p.exists())
        if (root := find_root(existing)) is not None:
            return root
        if any((p / METADATA_DIR).is_dir() for p in (existing, *existing.parents)):
            return existing  # a share that lost its database: Share.open says what to do
    raise BackerError(
        f"{absolute} is not inside any share of this device (see 'backer shares'): "
        "run the command inside the share or name it with --share NAME|DIR"
    )


def _open(directory: str | None, exclusive: bool = True, path: str | None = None) -> Share:
    """The share ``--share`` names, or else the one holding ``path`` (a command's PATH
    argument), or else the current directory's; ``exclusive=False`` for read-only
    commands."""
    from backer.model.share import Share

    return Share.open(_locate(directory, path), load_or_create_key(), exclusive, home())


def _share_path(share: Share, path: str) -> str:
    """A user-given path (relative to the cwd, or absolute) as a share-relative key."""
    absolute = Path(os.path.abspath(path))
    try:
        relative = absolute.relative_to(share.root)
    except ValueError as exc:
        raise BackerError(f"{path} is not inside the share {share.root}") from exc
    return relative.as_posix() if str(relative) != "." else ""


def _recorded_path(share: Share, key: str) -> str:
    """The path as recorded: ``key`` itself, or the one recorded spelling that differs
    from it only by Unicode normalisation (NFC as typed, NFD as macOS writes, or back)."""
    if not key:  # ("no history for ''" read as a bug)
        raise BackerError(
            "the share's top folder has no versions of its own: name a path inside it"
            " ('backer log' lists every change, 'backer ls' the top folder)"
        )
    if share.catalog.history(key):
        return key
    spellings = share.catalog.spellings(key)
    if len(spellings) == 1:
        return spellings[0]
    if spellings:
        raise BackerError(f"{key!r} matches several recorded names: {', '.join(spellings)}")
    raise BackerError(f"no history for {key!r} in this share")


def _problem_lines(problems: Iterable[Problem], limit: int = SHOWN_PER_REASON) -> list[str]:
    """Problems grouped by reason (errors first, then the largest groups): the first
    ``limit`` paths of each and how many more."""
    groups: dict[tuple[bool, str], list[str]] = {}
    for problem in problems:
        groups.setdefault((problem.warning, problem.reason), []).append(problem.path)
    lines = []
    for (warning, reason), paths in sorted(groups.items(), key=lambda g: (g[0][0], -len(g[1]))):
        label = "warning" if warning else "error"
        if len(paths) == 1:
            lines.append(f"{label}: {paths[0]}: {reason}" if paths[0] else f"{label}: {reason}")
            continue
        lines.append(f"{label}: {reason}: {len(paths)} files")
        lines += [f"    {path}" for path in sorted(paths)[:limit]]
        if len(paths) > limit:
            lines.append(f"    ... and {len(paths) - limit} more")
    return lines


def _print_fresh(share: Share) -> list[Problem]:
    """Print (grouped, on stderr) the problems this process met that were not reported
    before and are still there; they are not printed again."""
    current = set(share.problems.values())
    fresh = [p for p in dict.fromkeys(share.fresh_problems) if p in current]
    share.fresh_problems.clear()
    for line in _problem_lines(fresh):
        _say(line, err=True)
    return fresh


def _report_problems(share: Share) -> int:
    """Print this process's problems not reported before (grouped) on stderr, and the
    exit status they call for."""
    from backer.node import commands

    fresh = _print_fresh(share)
    known = len(share.problems) - len(fresh)
    if known > 0:
        click.echo(f"{known} problems reported before remain (see 'backer status')", err=True)
    return EXIT_FILES_FAILED if commands.failures(share) else 0


def _scan_and_report(share: Share, as_json: bool) -> int:
    """Scan, print the summary (or JSON), and return the exit status."""
    from backer.node import commands

    with _progress("scanning") as progress:
        summary = share.scan(progress)
    if summary.waiting:
        _say(f"warning: {summary.waiting}", err=True)
    return _print_scan(commands.scan_report(share, summary), as_json, share)


def _reported_problems(report: dict[str, Any]) -> list[Problem]:
    from backer.db.catalog import Problem

    return [Problem(p["path"], p["reason"], p["warning"]) for p in report["problems"]]


def _print_scan(report: dict[str, Any], as_json: bool, share: Share | None = None) -> int:
    """Print a scan's report (this process's, or a node's reply without ``share``) and
    return the exit status."""
    from backer.node import commands

    problems = _reported_problems(report)
    failed = commands.failures(share) if share else sum(not p.warning for p in problems)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return EXIT_FILES_FAILED if failed else 0
    click.echo(
        f"scanned in {report['seconds']:.2f}s: {len(report['added'])} added, "
        f"{len(report['modified'])} modified, {len(report['deleted'])} deleted, "
        f"{report['unchanged']} unchanged, {report['hashed_bytes']} bytes hashed, "
        f"{failed} files failed"
    )
    if share is not None:
        return _report_problems(share)
    for line in _problem_lines(problems):
        _say(line, err=True)
    return EXIT_FILES_FAILED if failed else 0


def _node_answer(root: Path, request: dict[str, Any]) -> Any:
    """What the node serving the share at ``root`` (``backer run``) answers to
    ``request``: the value its reply holds under the op's name."""
    from backer.connections import control

    key = {
        "scan": "scan",
        "status": "status",
        "sync": "sync",
        "rename": "renamed",
        "restore": "revised",
        "resolve": "revised",
        "prune": "prune",
    }[request["op"]]
    for reply in control.request(root, request):
        if key in reply:
            return reply[key]
    raise BackerError(f"the backer process serving the share {root} gave no {key} answer")


@click.group()
@click.version_option(__version__)  # (not the installed metadata: finding it costs ~0.08 CPU s)
def cli() -> None:
    """backer mirrors a folder between all of your own computers.

    \b
    Environment:
      BACKER_HOME   this device's directory (its key, what it knows of its shares);
                    default: the platform's config directory for backer
      BACKER_DEBUG  set to 1 to get the traceback of an unexpected error
      BACKER_PROGRESS_INTERVAL  seconds between progress lines when stderr is not
                    a terminal (default 10; none for shorter runs; --quiet: none)

    \b
    Exit status: 0 done; 1 error (one line on stderr); 3 done, but some files could
    not be recorded or applied (listed with the reason); 70 internal error.
    """


@cli.command()
def id() -> None:
    """Print this device's id."""
    click.echo(device_id(bytes(load_or_create_key().verify_key)))


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=True))
@quiet_option
def init(directory: str) -> None:
    """Make DIRECTORY a new share, with this device as its first member (a share of
    this device already: register it again, see 'backer forget')."""
    from backer.model.share import DB_FILE, Share, abandoned_create

    root = Path(os.path.abspath(directory))
    key = load_or_create_key()
    if (root / METADATA_DIR / DB_FILE).exists() and not abandoned_create(root, home()):
        with Share.open(root, key, exclusive=False, home=home()) as share:
            entry = registry.register(share.share_id, share.root, home())
        _say(f"{root} is a share already ({entry.share_id.hex()}), named {entry.name}")
        return
    with Share.create(root, key, home=home()) as share:
        entry = registry.register(share.share_id, share.root, home())
        _say(f"initialised share {share.share_id.hex()} at {root} (named {entry.name})")
        status = _scan_and_report(share, as_json=False)
    sys.exit(status)


@cli.command()
@share_option
@click.option(
    "--forget-lost-history",
    is_flag=True,
    help="After a restore from an old copy: give up this device's newer events that no "
    "peer returned (their files are scanned again).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@quiet_option
def scan(directory: str | None, forget_lost_history: bool, as_json: bool) -> None:
    """Record every change made to the share's files since the last scan.

    Files that cannot be recorded are listed with the reason (each one once; 'status'
    keeps listing them until a scan records them) and the exit status is 3. While
    'backer run' serves the share, it scans (it also does by itself on every change)."""
    from backer.model.share import ShareBusy

    try:
        share = _open(directory)
    except ShareBusy as busy:
        if forget_lost_history:
            raise BackerError(f"{busy}: stop it to use --forget-lost-history") from None
        sys.exit(_print_scan(_node_answer(busy.root, {"op": "scan"}), as_json))
    with share:
        if forget_lost_history:
            lost = share.forget_lost_history()
            click.echo(f"gave up {lost} events of this device that no peer returned", err=as_json)
        if share.own_events_missing:
            raise BackerError(share.behind_itself)
        status = _scan_and_report(share, as_json)
    sys.exit(status)


@cli.command()
@share_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(directory: str | None, as_json: bool) -> None:
    """Show the share: files, bytes, devices, conflicts, last scan; per device, while
    'backer run' serves the share: connected or last seen, address, in sync or not,
    transfer progress (else when this device last connected to it, if it did)."""
    from backer.connections import control

    with _open(directory, exclusive=False) as share:
        if control.answering(share.root):
            report = _node_answer(share.root, {"op": "status"})
        else:
            report = _offline_status(share)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _say(f"share     {report['share_id']} at {report['root']}")
    _say(f"device    {report['device']}")
    _say(
        f"contents  {report['files']} files, {report['directories']} directories, "
        f"{report['symlinks']} symlinks, {report['bytes']} bytes"
    )
    _say(f"conflicts {report['conflicts']}")
    _say(f"journal   {report['events']} events, {report['forks']} forks")
    for held in report["quarantined"]:
        _say(
            f"quarantined event {held['seq']} of {held['author'][:7]} (never applied, "
            f"not relayed): {held['reason']}"
        )
    for reuse in report["invites_used_twice"]:
        _say(_invite_reuse_line(reuse["invite"], reuse["devices"]))
    _say(f"last scan {report['last_scan'] or 'never'}")
    if "listening" in report:
        _say(f"listening {', '.join(report['listening']) or 'nowhere'} (backer run)")
    problems = _reported_problems(report)
    _say(f"problems  {len(problems)}")
    for line in _problem_lines(problems):
        _say(f"  {line}")
    if (missing := report.get("not_here")) and missing["files"]:
        _say(f"not here  {missing['files']} files, {missing['bytes']} bytes the share lists")
        shown = missing["paths"][:SHOWN_PER_REASON]
        for path in shown:
            _say(f"  {path}")
        if missing["files"] > len(shown):
            _say(f"  ... and {missing['files'] - len(shown)} more")
    _say(f"devices   {len(report['devices'])}")
    for device in report["devices"]:
        _say(_device_line(device))


def _invite_reuse_line(invite: str, devices: list[str]) -> str:
    return (
        f"warning: invite {invite[:8]} admitted {len(devices)} devices: "
        f"{', '.join(devices)} (two devices that were out of touch each let one join "
        "with the same token): remove any that is not yours with 'backer device remove'"
    )


def _device_line(device: dict[str, Any]) -> str:
    """One device of ``status``: id, name, then what is known of its link and state."""
    address = device.get("address")
    where = f" at {address}" if address else ""
    said = []
    if device.get("this"):
        said.append("this device")
    elif device.get("connected"):
        said.append(f"connected{where}")
    elif device.get("last_seen_ms"):
        said.append(f"last seen {_when(device['last_seen_ms'])}{where}")
    elif "connected" in device:
        said.append(f"not connected{where}")
    if device.get("in_sync"):
        said.append("in sync")
    elif device.get("need_files") or device.get("need_bytes"):  # (as the node knows it)
        said.append(f"needs {device['need_files']} files, {device['need_bytes']} bytes")
    elif device.get("in_sync") is False:
        said.append("not in sync yet")
    if device.get("last_error"):
        said.append(f"its last session failed: {device['last_error']}")
    if transfer := device.get("transfer"):
        said.append(
            f"{transfer['files_done']}/{transfer['files_total']} files, "
            f"{transfer['bytes_done']}/{transfer['bytes_total']} bytes done"
        )
    if device.get("rate_in") or device.get("rate_out"):
        said.append(f"{device['rate_in']} B/s in, {device['rate_out']} B/s out")
    return f"  {device['id']}  {device['name']}" + (f"  ({'; '.join(said)})" if said else "")


def _offline_status(share: Share) -> dict[str, Any]:
    """``status --json`` of a share no node serves: each device as a node shows it, with
    what the share recorded of the last session with it."""
    from backer.node import commands

    report = commands.status_report(share)
    missing = report["not_here"]
    for device in report["devices"]:
        key = parse_device_id(device["id"])
        last_seen_ms, address = commands.last_seen(share, key)
        this = key == share.device
        device.update(
            this=this,
            connected=False,
            last_seen_ms=last_seen_ms,
            address=address,
            in_sync=None,
            need_files=missing["files"] if this else None,
            need_bytes=missing["bytes"] if this else None,
            rate_in=0,
            rate_out=0,
            transfer=None,
        )
    return report


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def shares(as_json: bool) -> None:
    """List this device's shares (what 'backer run' serves): name, folder, id."""
    entries = registry.registered(home())
    if as_json:
        rows = [
            {"name": e.name, "root": str(e.root), "share_id": e.share_id.hex()} for e in entries
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    for entry in entries:
        _say(f"{entry.name}  {entry.root}  {entry.share_id.hex()}")


@cli.command()
@click.argument("name_or_dir", metavar="NAME|DIR")
def forget(name_or_dir: str) -> None:
    """Stop serving a share on this device: it is no longer listed by 'backer shares'
    nor served by 'backer run'. Its files and its .backer/ stay as they are ('backer
    scan' and the others still work in it); 'backer init DIR' registers it again."""
    entry = registry.forget(name_or_dir, home())
    _say(f"forgot share {entry.name} at {entry.root} (its files and .backer/ are untouched)")


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _parse_time(text: str, option: str) -> int:
    """``--since``, ``--at``: a UTC date and time as printed, or an age (``12h``); in ms.
    A time in this device's future is refused: a share has no state yet at it, and
    ``--at 2099-01-01`` silently meant "now" (a mistyped year, or a local time taken
    for UTC, is said at once)."""
    text = text.strip()
    now_ms = time.time_ns() // 1_000_000
    age = natural(text[:-1])
    if age is not None and text[-1:] in _AGE_UNITS:
        return max(0, now_ms - age * _AGE_UNITS[text[-1]] * 1000)
    for pattern in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"):
        try:
            stamp = dt.datetime.strptime(text, pattern).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
        stamp_ms = int(stamp.timestamp() * 1000)
        if stamp_ms > now_ms + AHEAD_MS:
            raise BackerError(
                f"{option}: {text!r} is in the future: it is {_when(now_ms)} UTC on this device"
            )
        return stamp_ms
    raise BackerError(
        f"{option}: not a date ('YYYY-MM-DD[ HH:MM[:SS]]', UTC) or an age "
        f"('30m', '12h', '7d': a number and one of {', '.join(_AGE_UNITS)}): {text!r}"
    )


_MARKS = {"added": "+", "modified": "~", "deleted": "-"}


def _matches(path: str, wanted: str) -> bool:
    return not wanted or path == wanted or path.startswith(wanted + "/")


@cli.command()
@click.argument("path", required=False)
@share_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Only the N most recent events (shown oldest first).",
)
@click.option(
    "--since",
    "since_text",
    metavar="WHEN",
    help="Only events from WHEN on: 'YYYY-MM-DD[ HH:MM[:SS]]' (UTC, as printed) or an age "
    "such as 30m, 12h, 7d.",
)
def log(
    path: str | None,
    directory: str | None,
    as_json: bool,
    limit: int | None,
    since_text: str | None,
) -> None:
    """Show the journal, oldest first; with PATH, only events that touched it."""
    from backer.node import commands

    since_ms = _parse_time(since_text, "--since") if since_text else 0
    with _open(directory, exclusive=False, path=path) as share:
        wanted = _share_path(share, path) if path else ""
        wanted = _recorded_path(share, wanted) if wanted else ""  # either Unicode spelling
        events = [(p, e) for p, e in share.journal.since(0) if e.time_ms >= since_ms]
        lines: list[dict[str, Any]] = []
        for position, event in reversed(events):  # newest first, so --limit stops early
            if limit is not None and len(lines) >= limit:
                break
            changes = [
                (p, vid, v)
                for p, vid, v in share.catalog.versions_at(position)
                if _matches(p, wanted)
            ]
            if wanted and not changes:
                continue
            lines.append(
                {
                    "position": position,
                    "time": _when(event.time_ms),
                    "time_ms": event.time_ms,
                    "author": device_id(event.author),
                    "seq": event.seq,
                    "kind": commands.event_kind(event.kind),
                    "id": event.id.hex(),
                    "changes": [
                        {
                            "path": p,
                            "version": vid,
                            "change": share.catalog.change_type(v),
                            **commands.version_json(v),
                        }
                        for p, vid, v in changes
                    ],
                }
            )
    lines.reverse()
    if as_json:
        click.echo(json.dumps(lines, indent=2))
        return
    for line in lines:
        _say(f"{_dated(line['time_ms'])}  {line['author'][:7]}#{line['seq']}  {line['kind']}")
        for change in line["changes"]:
            _say(f"    {_MARKS[change['change']]} {change['path']}")


@cli.command()
@click.argument("path")
@share_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def history(path: str, directory: str | None, as_json: bool) -> None:
    """Show every version of PATH: when, by which device, size and hash."""
    from backer.node import commands

    with _open(directory, exclusive=False, path=path) as share:
        key = _recorded_path(share, _share_path(share, path))
        entries = share.catalog.history(key)
        rows = commands.history_report(share, entries)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for e, row in zip(entries, rows, strict=True):
        _say(
            f"{'*' if e.live else ' '} {_dated(e.version.time_ms)}  {short_id(e.author)}  "
            f"{e.version_id}  {_describe(e.version)}{_whereabouts(row)}"
        )


def _whereabouts(row: dict[str, Any]) -> str:
    """Where a replaced version's bytes may be, when not here (see ``history_report``):
    only what is known. A device that never held them (the version was replaced before
    it was stored) says it lacks them as one that pruned them does, so "pruned" is said
    only of this device, where it is recorded; the others "may" hold what they have not
    said they lack."""
    if row["bytes"] in (None, "here"):
        return ""
    lost = f"pruned here {row['pruned']}" if row["pruned"] else "not here"
    if row["bytes"] == "nowhere":
        return f"  (bytes {lost}; no device holds them: no restore can bring them back)"
    return f"  (bytes {lost}; perhaps on {', '.join(row['held_by'])}: not said to lack them)"


def _user_key(share: Share, path: str) -> str:
    """A user-given path as the share path recorded for it ("" for the share's top)."""
    key = _share_path(share, path)
    return _recorded_path(share, key) if key else ""


@cli.command()
@share_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def conflicts(directory: str | None, as_json: bool) -> None:
    """List every conflict: the path, then each competing version (when the file was
    modified, device, size) and where its conflict copy is; the first holds the path
    now."""
    from backer.node import commands

    with _open(directory, exclusive=False) as share:
        rows = commands.conflicts_report(share)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        _say("no conflicts")
    for row in rows:
        _say(row["path"])
        for v in row["versions"]:
            where = f"copy {v['copy']}" if v["copy"] else "holds the path"
            _say(
                f"  {v['version']}  modified {v['modified']}  {v['device']} {v['device_name']}  "
                f"{v['size']} bytes  {where}"
            )


@cli.command()
@click.argument("path")
@click.option(
    "--keep",
    "keep",
    metavar="VERSION",
    help="Keep this version: its id (see 'conflicts'), or any part of it naming one.",
)
@click.option("--keep-both", is_flag=True, help="Keep every copy as an ordinary file.")
@click.option(
    "--keep-newest", is_flag=True, help="Keep the version modified last ('backer conflicts')."
)
@share_option
def resolve(
    path: str, keep: str | None, keep_both: bool, keep_newest: bool, directory: str | None
) -> None:
    """Resolve the conflict at PATH: the kept version holds PATH on every device and the
    conflict copies go away everywhere (the other versions stay in 'history')."""
    if (keep is not None) + keep_both + keep_newest != 1:
        raise BackerError("give one of --keep VERSION, --keep-both, --keep-newest")
    request = {"op": "resolve", "keep": keep, "keep_both": keep_both}
    sys.exit(_revise(directory, path, request))


@cli.command()
@click.argument("path")
@click.option("--version", "version_id", help="The version to bring back (an id from 'history').")
@click.option(
    "--at",
    "at_text",
    metavar="WHEN",
    help="PATH (a file or a folder) as it was at WHEN: 'YYYY-MM-DD[ HH:MM[:SS]]' (UTC) or "
    "an age such as 2h.",
)
@click.option(
    "--to",
    "dest",
    metavar="DEST",
    help="Restore there instead: a path in the share (recorded), or outside it (written only).",
)
@click.option(
    "--from",
    "source",
    metavar="HOST:PORT",
    help="Fetch bytes this device no longer holds from this device of the share.",
)
@share_option
def restore(
    path: str,
    version_id: str | None,
    at_text: str | None,
    dest: str | None,
    source: str | None,
    directory: str | None,
) -> None:
    """Bring back a version of PATH, deleted or not, or a whole folder as it was: as new
    versions, so every device gets them and the restore itself can be undone (what PATH
    holds now is kept). Bytes this device lacks come from a connected device (through
    'backer run') or from --from HOST:PORT."""
    if (version_id is None) == (at_text is None):
        raise BackerError("give either --version or --at")
    if source is not None:
        parse_address(source)
    at_ms = _parse_time(at_text, "--at") if at_text is not None else None
    request = {"op": "restore", "version": version_id, "at": at_ms, "source": source}
    if dest is not None:
        request["to"] = os.path.abspath(dest)
    sys.exit(_revise(directory, path, request))


@cli.command("ls")
@click.argument("path", required=False)
@click.option(
    "--at",
    "at_text",
    metavar="WHEN",
    help="As it was at WHEN: 'YYYY-MM-DD[ HH:MM[:SS]]' (UTC) or an age such as 2h.",
)
@share_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls(path: str | None, at_text: str | None, directory: str | None, as_json: bool) -> None:
    """List the folder PATH (default: the current one, or the share's top from outside
    it) as recorded now, or as it was at WHEN (what was deleted since included): time,
    version id, size, name. A PATH that was no folder then (a file, a link, deleted)
    is an error: see 'backer history PATH'."""
    from backer.model import revisions
    from backer.node import commands

    with _open(directory, exclusive=False, path=path) as share:
        cwd = Path.cwd()
        if path is None and (cwd == share.root or share.root in cwd.parents):
            path = "."
        key = _user_key(share, path) if path is not None else ""
        at_ms = _parse_time(at_text, "--at") if at_text else entropy.now_ms()
        revisions.check_moment(share, at_ms)
        entries = revisions.listing(share.catalog, key, at_ms)
    rows = [
        {"path": e.path, "version": e.version_id, **commands.version_json(e.version)}
        for e in entries
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row, entry in zip(rows, entries, strict=True):
        name = entry.path.rpartition("/")[2] + ("/" if entry.version.kind == Kind.DIRECTORY else "")
        _say(f"{row['time']}  {row['version']}  {entry.version.size:>12}  {name}")


def _revise(directory: str | None, path: str, request: dict[str, Any]) -> int:
    """Run a ``restore`` or ``resolve`` here, or ask the node serving the share."""
    from backer.model import revisions
    from backer.model.share import Share, ShareBusy
    from backer.node import commands

    try:
        share = _open(directory, path=path)
    except ShareBusy as busy:
        with Share.open(busy.root, load_or_create_key(), exclusive=False, home=home()) as seen:
            request["path"] = _user_key(seen, path)
        if request.get("source"):
            raise BackerError(f"{busy}: it fetches from the devices it is connected to") from None
        reply = _node_answer(busy.root, request)
        _say(reply["said"])
        for line in _problem_lines(_reported_problems(reply)):
            _say(line, err=True)
        return EXIT_FILES_FAILED if reply["problems"] else 0
    with share:
        request["path"] = _user_key(share, path)
        share.scan(paths=commands.revision_scope(share, request))
        if request["op"] == "resolve":
            keep, both = request["keep"], request["keep_both"]
            _say(revisions.resolve_conflict(share, request["path"], keep, both))
        else:
            plan, outside, fetched = commands.restore_plan(share, request)
            if fetched is not None:
                try:
                    _fetch_from(share, fetched, request["source"], plan.summary)
                except BaseException:
                    fetched.close()
                    raise
            _say(commands.finish_restore(share, plan, outside, fetched))
        return _report_problems(share)


def _fetch_from(share: Share, fetched: revisions.Fetched, source: str | None, what: str) -> None:
    """Fetch what ``fetched`` wants from the device at ``source`` (a one-shot sync)."""
    import asyncio

    from backer.connections import transport

    if source is None:
        raise BackerError(
            f"the bytes of {what} are not on this device: give --from HOST:PORT of a device "
            "that has them, or let 'backer run' fetch them from the devices it is connected to"
        )
    hub = transport.Hub(share, _name())
    hub.replicator.retrieve(fetched)
    opening = functools.partial(transport.tcp_streams, *parse_address(source))
    _results(asyncio.run(_sync_over(hub, [opening])), [source])


@cli.command()
@share_option
@click.option("--dry-run", is_flag=True, help="Only say what would be freed.")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Drop every kept content, the last hour's too (a full disk: deleting files frees "
    "nothing, their contents are kept).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def prune(directory: str | None, dry_run: bool, everything: bool, as_json: bool) -> None:
    """Drop the kept contents of replaced and deleted versions that the share's
    retention policy no longer keeps (see 'backer config'), and say what that frees.
    The history of every version stays. 'backer run' does this every hour by itself."""
    from backer.model.share import ShareBusy
    from backer.versioner.prune import DROP_ALL, prune_share

    policy = DROP_ALL if everything else None
    try:
        with _open(directory) as share:
            report = prune_share(share, entropy.now_ms(), dry_run, policy).as_json()
    except ShareBusy as busy:
        request = {"op": "prune", "dry_run": dry_run, "all": everything}
        report = _node_answer(busy.root, request)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    verb = "would free" if dry_run else "freed"
    _say(
        f"{verb} {report['bytes']} bytes: {report['files']} kept contents of "
        f"{report['versions']} versions; {report['kept_files']} kept contents left "
        f"({report['kept_bytes']} bytes, cap {report['cap']} bytes)"
    )


@cli.command("config")
@click.argument("key", required=False)
@click.argument("value", required=False)
@share_option
def config_command(key: str | None, value: str | None, directory: str | None) -> None:
    """Show or change the share's settings on this device: without KEY, all of them;
    with KEY, its value; with KEY and VALUE, set it. Retention of replaced and deleted
    contents: every version for keep-all, then one per hour until hourly-for, one per
    day until daily-for, one per week until weekly-for; at most max-disk of the free
    disk (durations: 90m, 1h, 30d, 52w; max-disk: a percentage)."""
    from backer.versioner import config as retention_config

    with _open(directory, exclusive=False) as share:
        if key is not None and value is not None:
            with share.db.conn:
                shown = retention_config.set_value(share.catalog, key, value)
            _say(f"{key} = {shown}")
            return
        current = retention_config.settings(share.catalog)
    if key is not None:
        if key not in current:
            known = ", ".join(current)
            raise BackerError(f"unknown setting {key!r} (settings: {known})")
        _say(current[key][0])
        return
    for name, (shown, was_set, meaning) in current.items():
        origin = "" if was_set else " (default)"
        _say(f"{name} = {shown}{origin}  # {meaning}")


# -- replication commands ------------------------------------------------------------------


def _summary_line(sessions: list[Session], replicator: Replicator | None = None) -> str:
    from backer.node import commands

    return _sync_line(commands.sync_summary(sessions, replicator))


def _sync_line(s: dict[str, Any]) -> str:
    """A sync summary (``sync_summary``'s dict) as one line; what was applied, if it says."""
    applied = "files_written" in s
    who = ", ".join(p[:7] if p else "peer" for p in s["peers"])
    line = f"synced with {who}: events received {s['events_received']}, sent {s['events_sent']}; "
    if applied:
        line += f"files written {s['files_written']}, deleted {s['files_deleted']}; "
    line += f"chunk bytes received {s['chunk_bytes_received']}, sent {s['chunk_bytes_sent']}; "
    if applied:
        line += (
            f"chunks reused {s['chunks_reused']}, fetched {s['chunks_fetched']}; "
            f"local edits kept {s['local_edits_kept']}; errors {s['errors']}; "
        )
    if "not_here" in s:
        line += f"not here {s['not_here']['files']}; "
    return line + f"wire bytes received {s['wire_bytes_received']}, sent {s['wire_bytes_sent']}"


def _report_sync(sessions: list[Session], hub: transport.Hub, as_json: bool, hint: str = "") -> int:
    """Print what a sync did (a line per peer too when there were several), and the
    problems; return the exit status (a full disk fails the command, after that)."""
    from backer.node import commands

    report = commands.sync_report(sessions, hub.replicator)
    status = _print_sync(report, as_json, hub.share)
    _warn_of_forks(hub.share)
    _check_applied(hub, hint)
    return status


def _print_sync(report: dict[str, Any], as_json: bool, share: Share | None = None) -> int:
    """Print a sync's report (this process's, or a node's reply without ``share``) and
    return the exit status."""
    missing = report["not_here"]
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_sync_line(report))
        for peer in report["per_peer"]:
            click.echo("  " + _sync_line(peer).replace("synced with", "from"))
        if share is not None:
            status = _report_problems(share)
        else:
            for line in _problem_lines(_reported_problems(report)):
                _say(line, err=True)
        for line in _not_here_lines(missing, SHOWN_PER_REASON):
            _say(line, err=True)
        if share is not None:
            return status or (EXIT_FILES_FAILED if missing["files"] else 0)
    return EXIT_FILES_FAILED if report["errors"] or missing["files"] else 0


def _not_here_lines(missing: dict[str, Any], limit: int) -> list[str]:
    """The entries a sync's report lists as not here (``commands.sync_report``): one
    line each up to ``limit``, how many more, and a summary."""
    files, paths = missing["files"], missing["paths"][:limit]
    if not files:
        return []
    lines = [f"error: {path}: not here: {missing['reason']}" for path in paths]
    if files > len(paths):
        lines.append(f"error: ... and {files - len(paths)} more not here")
    lines.append(
        f"{files} files ({missing['bytes']} bytes) the share lists are not here: "
        f"{missing['reason']}; 'backer status' names them until they are"
    )
    return lines


def _warn_of_forks(share: Share) -> None:
    """A device that signed two different histories (a copied device key, or a device
    misbehaving) is said at every sync, not only by ``status``: its diverging events
    are refused, so what it writes no longer reaches this device. So is an invite that
    admitted two devices (one of them may be a stranger that saw the token)."""
    for invite, devices in share.invites_used_twice().items():
        _say("backer: " + _invite_reuse_line(invite.hex(), list(map(device_id, devices))), err=True)
    authors = {fork.author for fork in share.journal.forks()}
    for author in sorted(authors):
        name = share.members.names.get(author, "")
        _say(
            f"backer: warning: device {short_id(author)} {name} signed two different "
            "histories (a copied device key?): its diverging events are refused; "
            "see 'backer status', and remove it with 'backer device remove' if it is not yours",
            err=True,
        )


async def _sync_over(
    hub: transport.Hub,
    openings: list[Callable[[], Awaitable[transport.Streams]]],
    channel: Callable[[], SecureChannel] | None = None,
) -> list[Session | BaseException]:
    """One-shot sessions over every stream at once, sharing ``hub`` (so chunk requests
    spread over all peers); a session's result, or the error that ended it."""
    import asyncio

    from backer.connections import transport

    replicator = hub.replicator
    with _progress("receiving") as progress:

        def report(session: Session) -> None:
            if progress is not None:
                progress(*replicator.progress())

        dials = (transport.dial(hub, o, True, channel=channel, progress=report) for o in openings)
        return await asyncio.gather(*dials, return_exceptions=True)


def _scan_share(share: Share) -> None:
    """Scan outside any session: before the connections open (the sessions' hub then
    never scans: a scan inside the event loop stalls every session, and a large share
    outlasts a peer's handshake deadline), and again after them only when the share
    got its own lost events back (its scans waited for them)."""
    with _progress("scanning") as progress:
        share.scan(progress)


def _name() -> str:
    return socket.gethostname()


def _check_applied(hub: transport.Hub, hint: str = "") -> None:
    """A plan stopped by a full disk fails the command (after its summary)."""
    from backer.node import commands
    from backer.versioner.prune import held_by_kept

    if (full := hub.replicator.disk_full) is not None:
        held = held_by_kept(hub.share.root, hub.share.catalog, entropy.now_ms())
        raise BackerError(f"{commands.disk_full_line(full, held)}{hint}")


def _results(outcomes: list[Session | BaseException], labels: list[str]) -> list[Session]:
    """The sessions that completed; report the others (raise if none completed)."""
    from backer.connections import transport
    from backer.protocol.session import Session

    failures = []
    for label, outcome in zip(labels, outcomes, strict=True):
        if isinstance(outcome, transport.SessionClosed):
            failures.append(f"{label}: sync failed: {outcome}")
        elif isinstance(outcome, BackerError):
            failures.append(str(outcome))
        elif isinstance(outcome, BaseException):
            raise outcome
    done = [o for o in outcomes if isinstance(o, Session)]
    if not done:
        raise BackerError("; ".join(failures))
    for failure in failures:
        _say(f"backer: warning: {failure}", err=True)
    return done


@cli.command()
@click.argument("addresses", nargs=-1)
@share_option
@click.option(
    "--command",
    help="Sync over this command's stdin/stdout, e.g. 'ssh host backer stdio --dir DIR'.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@quiet_option
def sync(
    addresses: tuple[str, ...], directory: str | None, command: str | None, as_json: bool
) -> None:
    """Reconcile with peers both ways, then exit: every ADDRESS at once (HOST:PORT), or
    else every peer used before. Chunks are fetched from all of them.

    Files that cannot be recorded or applied are listed with the reason (each one once;
    'status' keeps listing them until resolved) and the exit status is 3. While 'backer
    run' serves the share, it syncs (it also does by itself, with every device it
    knows)."""
    import asyncio

    from backer.connections import transport
    from backer.model.share import ShareBusy
    from backer.protocol.session import Session

    _imported()

    try:
        share = _open(directory)
    except ShareBusy as busy:
        sys.exit(_node_sync(busy, addresses, command, as_json))
    with share:
        _scan_share(share)
        hub = transport.Hub(share, _name(), scan_first=False)
        if command:
            labels = [command]
            openings = [functools.partial(transport.command_streams, command)]
        else:
            labels = list(addresses) or transport.known_addresses(share)
            if not labels:
                raise BackerError("no peer known yet: give an address (HOST:PORT)")
            openings = [functools.partial(transport.tcp_streams, *parse_address(t)) for t in labels]
        outcomes = asyncio.run(_sync_over(hub, openings))
        if share.rescan_due:  # its own events came back from a peer (Share._rescan_now)
            _scan_share(share)
        sessions = _results(outcomes, labels)
        if not command:
            for target, outcome in zip(labels, outcomes, strict=True):
                if isinstance(outcome, Session):
                    transport.remember_address(share, target)
        status = _report_sync(sessions, hub, as_json)
    sys.exit(status)


def _node_sync(
    busy: ShareBusy, addresses: tuple[str, ...], command: str | None, as_json: bool
) -> int:
    """``sync`` done by the node serving the share: its report, printed as ours."""
    from backer.model.share import Share

    if command:
        raise BackerError(f"{busy}: it syncs by itself; stop it to sync over --command")
    for address in addresses:
        parse_address(address)
    report = _node_answer(busy.root, {"op": "sync", "addresses": list(addresses)})
    for failed in report.get("failed", []):
        _say(f"backer: warning: {failed['address']}: sync failed: {failed['reason']}", err=True)
    status = _print_sync(report, as_json)
    with Share.open(busy.root, load_or_create_key(), exclusive=False, home=home()) as share:
        _warn_of_forks(share)
    return status


@cli.command()
@share_option
def stdio(directory: str | None) -> None:
    """Serve one sync session over stdin/stdout (the remote end of 'sync --command')."""
    import asyncio

    from backer.connections import transport

    _imported()
    with _open(directory) as share:
        hub = transport.Hub(share, _name())

        async def serve_one() -> Session:
            streams = await transport.stdio_streams()
            channel = transport.responder(share, share.key)
            return await hub.run(streams, channel, hub.accept, False)

        try:
            session = asyncio.run(serve_one())
        except transport.SessionClosed as exc:
            raise BackerError(f"sync failed: {exc}") from exc
        click.echo(_summary_line([session], hub.replicator), err=True)
        _check_applied(hub)


class _ShownFormatter(logging.Formatter):
    """Log lines as safe for a terminal as everything else printed (names, paths), one
    line per record: an error a library logs with its traceback says its exception
    after the message (the traceback with ``BACKER_DEBUG=1``)."""

    def format(self, record: logging.LogRecord) -> str:
        if (
            record.exc_info
            and record.exc_info[1] is not None
            and not os.environ.get("BACKER_DEBUG")
        ):
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {error_reason(exc)}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return _shown(super().format(record))


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` of the node: a library's warning is one line of its log
    (with time and level), not Python's two raw lines on stderr."""
    where = f"{Path(filename).name}:{lineno}"
    logging.getLogger("py.warnings").warning("%s: %s (%s)", category.__name__, message, where)


def _logger(level: str) -> logging.Logger:
    """The ``backer`` logger on stderr, with timestamps and levels; the libraries'
    warnings and errors (watchdog's, ``warnings.warn``) go to the same log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ShownFormatter("%(asctime)s %(levelname)s %(message)s"))
    log = logging.getLogger("backer")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    libraries = logging.getLogger()
    libraries.handlers[:] = [handler]
    libraries.setLevel(max(logging.WARNING, log.level))
    warnings.showwarning = _log_warning
    return log


def _print_token(token: str) -> None:
    """The token on stdout; a warning on stderr when it names loopback addresses only."""
    from backer.protocol.invite import InviteToken

    click.echo(token)
    sys.stdout.flush()
    addresses = InviteToken.decode(token).addresses
    if loopback_only(addresses):
        _say(
            f"backer: warning: the token names only {', '.join(addresses)} (loopback: the "
            "node listens there alone, or this device has no network address), so only "
            "this machine can join with it (give --address HOST:PORT to name another)",
            err=True,
        )


async def _until_signalled(
    node: Node, also: Callable[[asyncio.Event], Awaitable[None]] | None = None
) -> None:
    """Run ``node`` until SIGINT or SIGTERM (or until ``also`` returns); a SIGINT the
    parent ignores stays ignored, as during start-up (SIGTERM, a service manager's stop,
    always stops). A failure the user can act on is raised after the ``except*``, not
    inside it: Python 3.11.0-3.11.3 (Debian 12's) wrap an exception raised there in a
    group, an "internal error"."""
    import asyncio

    from backer.entry import raise_if_interrupted
    from journal import JournalError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signum == signal.SIGTERM or signal.getsignal(signum) is not signal.SIG_IGN:
            loop.add_signal_handler(signum, stop.set)
    raise_if_interrupted()  # (one Python swallowed before the handlers above were in place)
    failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(node.run(stop))
            if also is not None:
                await also(stop)
    except* (BackerError, JournalError) as group:
        failure = group.exceptions[0]
    if failure is not None:
        raise failure


@cli.command()
@click.option(
    "--listen",
    default="0.0.0.0:7654",
    show_default=True,
    help="HOST:PORT to accept peers on (port 0: any free port, logged and shown by status).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="What to log on stderr.",
)
@click.option(
    "--api",
    "api_address",
    default=api_access.DEFAULT_ADDRESS,
    show_default=True,
    metavar="HOST:PORT|off",
    help="Where to serve the web UI and HTTP API; an address other machines can reach "
    f"needs a password in {api_access.PASSWORD_VARIABLE}.",
)
def run(listen: str, log_level: str, api_address: str) -> None:
    """Serve every share of this device until interrupted: record local changes as
    they happen, connect to the other devices and keep them in sync."""
    import asyncio

    from backer.node.node import Node, hold_home

    host, port = parse_address(listen, listening=True)
    settings = api_access.settings_from(api_address)
    serve = None
    if settings is not None:  # (aiohttp, ~0.2 CPU s to load: only for a node that serves it)
        from backer.api import server as api_server

        serve = api_server.serve
    _imported()
    key = load_or_create_key()
    with hold_home(home()):
        node = Node(None, key, listen=(host, port), log=_logger(log_level))
        ui = None if serve is None else functools.partial(serve, node, settings, home())
        asyncio.run(_until_signalled(node, ui))


@cli.command("open")
@click.option("--no-browser", is_flag=True, help="Only print the link.")
def open_ui(no_browser: bool) -> None:
    """Print a one-time link that logs a browser in to the web UI of the running
    'backer run' (and open one in a browser, where there is one)."""
    click.echo(api_access.login_url(home()))
    if not no_browser:
        api_access.open_browser(home())


@cli.group()
def device() -> None:
    """The share's devices: list them, rename this one, remove a lost or stolen one."""


@device.command("list")
@share_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def device_list(directory: str | None, as_json: bool) -> None:
    """List the share's devices, removed ones included."""
    with _open(directory, exclusive=False) as share:
        rows = [
            {
                "id": device_id(k),
                "name": name,
                "removed": k in share.members.removed,
                "this": k == share.device,
            }
            for k, name in share.members.names.items()
        ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "removed" if row["removed"] else "member "
        this = "  (this device)" if row.get("this") else ""
        _say(f"{row['id']}  {state}  {row['name']}{this}")


@device.command("remove")
@click.argument("device_id_text", metavar="DEVICE")
@share_option
def device_remove(device_id_text: str, directory: str | None) -> None:
    """Remove DEVICE (its id, or its first characters as 'device list' shows them):
    e.g. a lost or stolen laptop. Peers refuse it from then on, its later events are
    rejected, and the share key changes for the remaining devices. While 'backer run'
    serves the share, it does it (and drops the device's open sessions)."""
    from backer.connections import control
    from backer.model.share import ShareBusy
    from backer.node import commands

    try:
        share = _open(directory)
    except ShareBusy as busy:
        for reply in control.request(busy.root, {"op": "remove", "device": device_id_text}):
            _say(reply["removed"])
        return
    with share:
        _say(commands.remove_device(share, device_id_text)[1])


@device.command("rename")
@click.argument("name")
@share_option
def device_rename(name: str, directory: str | None) -> None:
    """Give this device a new NAME in the share (the hostname until then); the others
    show it once they sync. A device renames only itself. While 'backer run' serves the
    share, it does it."""
    from backer.model.membership import checked_name
    from backer.model.share import ShareBusy

    name = checked_name(name)
    try:
        share = _open(directory)
    except ShareBusy as busy:
        this = device_id(bytes(load_or_create_key().verify_key))
        request = {"op": "rename", "device": this, "name": name}
        _say(f"renamed device {_node_answer(busy.root, request)}")
        return
    with share:
        share.rename_device(share.device, name)
        _say(f"renamed device {device_id(share.device)} {name}")


@cli.command()
@click.option(
    "--listen",
    default="0.0.0.0:7654",
    show_default=True,
    help="HOST:PORT to wait on (and put in the token).",
)
@click.option(
    "--address",
    "addresses",
    multiple=True,
    help="Address to put in the token instead (repeatable).",
)
@click.option("--expires", default=86400, show_default=True, help="Seconds the invite stays valid.")
@click.option(
    "--no-wait",
    is_flag=True,
    help="Print the token and exit; a running 'backer run' admits the joiner.",
)
@share_option
def invite(
    listen: str, addresses: tuple[str, ...], expires: int, no_wait: bool, directory: str | None
) -> None:
    """Print a single-use, expiring invite token, and wait for the device to join.

    While 'backer run' serves the share, it makes the invite (and admits the joiner)."""
    import asyncio

    from backer.connections import control
    from backer.model.share import ShareBusy
    from backer.node import commands
    from backer.node.node import Node
    from backer.protocol.invite import MAX_EXPIRES_S

    if not 0 < expires <= MAX_EXPIRES_S:
        raise BackerError(f"--expires must be a number of seconds from 1 to {MAX_EXPIRES_S}")
    for address in addresses:
        parse_address(address)
    host, port = parse_address(listen)
    try:
        share = _open(directory)
    except ShareBusy as busy:
        wanted = {"op": "invite", "expires": expires, "addresses": addresses, "wait": not no_wait}
        for reply in control.request(busy.root, wanted):
            _print_invite_reply(reply)
        return
    with share:
        if no_wait:
            named = addresses or advertised(host, port)
            _print_token(commands.new_invite(share, expires, named)[1])
            return
        entry = registry.RegisteredShare(share.share_id, share.root.name, share.root)
    node = Node([entry], load_or_create_key(), listen=(host, port), log=_logger("warning"))
    wanted = {"op": "invite", "expires": expires, "addresses": addresses, "wait": True}

    async def invite_and_wait(stop: asyncio.Event) -> None:
        await node.started.wait()
        async for reply in node.ask(entry.share_id, wanted):
            _print_invite_reply(reply)
        stop.set()

    asyncio.run(_until_signalled(node, invite_and_wait))


def _print_invite_reply(reply: dict[str, Any]) -> None:
    if "error" in reply:
        raise BackerError(str(reply["error"]))
    if "token" in reply:
        _print_token(reply["token"])
    else:
        click.echo(f"device {reply['joined']} joined", err=True)


def _read_token(token: str | None, token_file: str | None) -> InviteToken:
    """The invite token from the argument, from stdin (``-``) or from a file."""
    from backer.protocol.invite import InviteToken

    if token_file is not None:
        try:
            text = Path(token_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BackerError(f"cannot read the token file {token_file}: {exc}") from exc
    elif token == "-":
        text = sys.stdin.read()
    elif token:
        text = token
    else:
        raise BackerError("no invite token: give TOKEN, '-' to read it from stdin, or --token-file")
    return InviteToken.decode(text)


def _joining_share(root: Path, key: Any, invitation: InviteToken) -> Share:
    """The share to join into: a new one, or the one an interrupted join of the same
    share left (it is resumed: the device it admitted is welcomed again)."""
    from backer.model.share import DB_FILE, Share, abandoned_create, clear_abandoned

    metadata = root / METADATA_DIR
    if abandoned_create(root, home()):  # a join killed while it made its database
        clear_abandoned(root)
    if (metadata / DB_FILE).exists():
        share = Share.open(root, key, home=home())
        if share.root != root or share.share_id != invitation.share_id:
            share.close()
            raise BackerError(f"already a share: {share.root} (not the one this token invites to)")
        if not share.members:  # welcomed, then cut off before the history: ask again,
            share.set_share_key(b"")  # with the inviter checked as on the first attempt
        return share
    return Share.create(root, key, joining=(invitation.share_id, b""), home=home())


@cli.command()
@click.argument("token", required=False)
@click.argument("directory", required=False, type=click.Path(file_okay=True))
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    help="Read the token from this file (then the only argument is DIRECTORY).",
)
@quiet_option
def join(token: str | None, directory: str | None, token_file: str | None) -> None:
    """Join a share with an invite TOKEN and mirror it into DIRECTORY (default: the
    current directory).

    TOKEN '-' reads the token from stdin. A TOKEN on the command line is visible to
    other users of this machine (e.g. in 'ps') while join runs: prefer '-' or
    --token-file. An interrupted join can be run again with the same token."""
    import asyncio

    from backer.connections import transport
    from backer.connections.addresses import AddressBook
    from backer.model.membership import host_name
    from backer.protocol.channel import MODE_JOIN, SecureChannel

    _imported()

    if token_file is not None and token is not None:
        if directory is not None:
            raise BackerError("give either TOKEN or --token-file, not both")
        token, directory = None, token
    invitation = _read_token(token, token_file)
    root = Path(os.path.abspath(directory or "."))
    if directory is None:
        _say(f"joining into the current directory, {root}", err=True)
    try:
        make_directories(root)
    except FileExistsError as exc:  # (a file where a folder of DIRECTORY should be)
        raise BackerError(f"not a directory: {exc.filename}") from exc
    key = load_or_create_key()
    share = _joining_share(root, key, invitation)
    failures = []
    status = None
    with share:
        _scan_share(share)  # (a joiner records nothing; it finds local chunks)
        book = AddressBook(share.catalog, share.share_id, key)
        for address in invitation.addresses:
            book.learn(invitation.inviter, *parse_address(address), "invite")
        for address in invitation.addresses:  # one at a time: the invite is single-use

            def channel() -> SecureChannel:
                if share.share_key:  # welcomed before an interruption: a member now
                    return transport.initiator(share, key)
                return SecureChannel(
                    key,
                    invitation.check_responder,
                    header=MODE_JOIN + invitation.invite_id,
                    psk=invitation.psk,
                )

            hub = transport.Hub(share, _name(), scan_first=False)
            opening = functools.partial(transport.tcp_streams, *parse_address(address))
            try:
                outcomes = asyncio.run(_sync_over(hub, [opening], channel))
            except KeyboardInterrupt:  # ("aborted" alone left the temp files unexplained)
                raise BackerError(
                    "join interrupted: run the same 'backer join' again to go on from "
                    "what it received (the .backer-*.tmp files it left)"
                ) from None
            try:
                sessions = _results(outcomes, [address])
            except BackerError as exc:
                failures.append(str(exc))
                continue
            transport.remember_address(share, address)
            entry = registry.register(share.share_id, share.root, home())
            _say(
                f"joined share {share.share_id.hex()} at {root} (named {entry.name}); "
                "'backer run' keeps it in sync"
            )
            share.rename_device(share.device, host_name())  # admitted as "joined with ..."
            hint = "; joined: run 'backer sync' to finish once there is room"
            status = _report_sync(sessions, hub, as_json=False, hint=hint)
            break
        nothing_yet = not share.share_key and not share.journal.count()
    if status is not None:
        sys.exit(status)
    if nothing_yet:
        shutil.rmtree(root / METADATA_DIR, ignore_errors=True)
    raise BackerError("could not join: " + "; ".join(failures or ["the token names no address"]))


@cli.command()
@click.argument("path", required=False)
@share_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@quiet_option
def verify(path: str | None, directory: str | None, as_json: bool) -> None:
    """Re-hash files (all, or those under PATH) whose stat is as last scanned and report
    each whose bytes no longer match its recorded version (bit rot, a bad disk); exit
    status 3 if any. Such a file is never sent to peers as that version."""
    from backer.model import verify as verify_mod

    with _open(directory, exclusive=False, path=path) as share:
        wanted = _recorded_path(share, _share_path(share, path)) if path else ""
        with _progress("verifying") as progress:
            found = verify_mod.verify(share, wanted, progress)
    if as_json:
        click.echo(json.dumps(vars(found), indent=2))
    else:
        for bad in found.mismatched:
            _say(f"{bad}: content does not match its recorded version", err=True)
        for unreadable in found.unreadable:
            _say(f"{unreadable}: cannot be read", err=True)
        click.echo(
            f"verified {found.checked} files and links ({found.checked_bytes} bytes): "
            f"{len(found.mismatched)} do not match their recorded version, "
            f"{len(found.unreadable)} unreadable, {len(found.changed)} changed since the "
            "last scan (not checked)"
        )
    if found.mismatched or found.unreadable:
        sys.exit(EXIT_FILES_FAILED)


@cli.command()
@click.option(
    "--from", "addresses", multiple=True, help="HOST:PORT of a device of the share (repeatable)."
)
@click.option("--token", help="An invite from a device of the share (if this key was lost too).")
@share_option
def repair(addresses: tuple[str, ...], token: str | None, directory: str | None) -> None:
    """Rebuild a damaged or lost .backer/ from a peer, in place: files whose content is
    a live version are recognised as it (no bytes move, no version is recorded); the
    rest is scanned as local changes. The damaged database is kept aside."""
    import asyncio

    from backer.connections import transport
    from backer.model import repair as repair_mod
    from backer.protocol.channel import MODE_JOIN, MODE_SYNC, SecureChannel
    from backer.protocol.invite import InviteToken
    from backer.protocol.session import Session

    _imported()

    invitation = InviteToken.decode(token) if token else None
    key = load_or_create_key()
    target = repair_mod.locate(_locate(directory), key, home(), invitation)
    targets = list(addresses) or (list(invitation.addresses) if invitation else target.peers)
    if not targets:
        raise BackerError("no peer to repair from: give one with --from HOST:PORT")
    openings = [functools.partial(transport.tcp_streams, *parse_address(t)) for t in targets]
    share = repair_mod.begin(target, key, home())

    def channel() -> SecureChannel:  # membership is checked once the journal is back
        if invitation is not None:
            header = MODE_JOIN + invitation.invite_id
            return SecureChannel(key, invitation.check_responder, header=header, psk=invitation.psk)
        header = MODE_SYNC + target.share_id
        return SecureChannel(key, lambda *_: None, header=header, psk=target.share_key)

    hub = transport.Hub(share, _name(), scan_first=False)  # repair.finish scans
    try:
        outcomes = asyncio.run(_sync_over(hub, openings, channel))
        sessions = _results(outcomes, targets)
        outcome = repair_mod.finish(share, [s.peer for s in sessions], target.founder)
    except BaseException:
        repair_mod.abandon(share)
        raise
    with share:
        for address, result in zip(targets, outcomes, strict=True):
            if isinstance(result, Session):
                transport.remember_address(share, address)
        registry.register(share.share_id, share.root, home())
        click.echo(f"repaired share {share.share_id.hex()} at {share.root}")
        click.echo(_summary_line(sessions))
        scan = outcome.scan
        click.echo(
            f"recognised {outcome.recognised} entries as their recorded versions "
            f"({outcome.older} older ones, updated at the next sync); "
            f"recorded {len(scan.added)} added and {len(scan.modified)} modified as local "
            "changes"
        )
        if outcome.lost_events:
            click.echo(
                f"gave up {outcome.lost_events} events of this device that no peer had "
                "(their files were scanned again)"
            )
        if target.damaged_copy is not None:
            click.echo(f"the damaged database is kept as {target.damaged_copy}")
        status = _report_problems(share)
    sys.exit(status)


@cli.group()
def service() -> None:
    """Run 'backer run' at login: a systemd user unit (Linux) or a launchd agent (macOS)."""


@service.command("install")
def service_install() -> None:
    """Write the unit that runs this backer's 'backer run' (with the BACKER_HOME set
    now, if any), and print the command that enables it; nothing is enabled here."""
    installed = service_mod.install()
    _say(f"wrote {installed.path}:")
    click.echo(installed.text.rstrip("\n"))
    _say(f"enable and start it with: {installed.enable}")


@service.command("uninstall")
def service_uninstall() -> None:
    """Remove the unit written by 'backer service install'."""
    path, stop = service_mod.uninstall()
    _say(f"removed {path}; then run: {stop}")


def _imported() -> None:
    """What the imports made lives as long as the process: no collection scans it again
    (a 1 GiB join ran a full collection over ~46,000 such objects). Called at start, and
    by the long commands (sync, join, repair, stdio, run) once they have imported the
    engine, before they open a share: a frozen object is never collected, so nothing
    but what the imports made may be frozen. A Ctrl-C Python swallowed while they
    loaded ends the command here (see backer.entry)."""
    from backer.entry import raise_if_interrupted

    raise_if_interrupted()
    gc.freeze()


def main() -> None:
    """Console entry point: run the CLI, turning errors into one line and an exit code."""
    try:
        _imported()
        raise_fd_limit()
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BackerError as exc:
        _say(f"backer: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except (sqlite3.DatabaseError, OSError) as exc:
        if os.environ.get("BACKER_DEBUG"):
            raise
        damaged = isinstance(exc, sqlite3.DatabaseError) and _is_damage(exc)
        hint = "; the share database is damaged: run 'backer repair --from HOST:PORT'"
        _say(f"backer: error: {error_reason(exc)}{hint if damaged else ''}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        if _is_journal_error(exc):
            _say(f"backer: error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        if os.environ.get("BACKER_DEBUG"):
            raise
        _say(f"backer: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_INTERNAL)


def _is_journal_error(exc: Exception) -> bool:
    """A journal's error is one the user can act on, said as a :class:`BackerError` is
    (the journal is loaded here, on the way out, not by every command's start)."""
    from journal import JournalError

    return isinstance(exc, JournalError)


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the share database is damaged (see ``share.is_damage``)."""
    from backer.model.share import is_damage

    return is_damage(exc)

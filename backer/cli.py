"""The ``backer`` command line. Thin: parse, call the engine, print, map errors to exits.

Every failure the user can act on is a :class:`BackerError` (or a journal error) and
becomes one line on stderr with exit status 1; anything unexpected becomes one line
with status 70 (set ``BACKER_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from journal import JournalError

from .catalog import HistoryEntry
from .errors import BackerError
from .identity import device_id, load_or_create_key, short_id
from .membership import EventKind
from .records import Kind, Version
from .share import ScanSummary, Share

EXIT_ERROR = 1
EXIT_INTERNAL = 70


def _when(time_ms: int) -> str:
    stamp = dt.datetime.fromtimestamp(time_ms / 1000, tz=dt.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def _describe(version: Version) -> str:
    if version.kind == Kind.FILE:
        executable = ", executable" if version.executable else ""
        return f"file, {version.size} B, {version.content.hex()[:12]}{executable}"
    if version.kind == Kind.SYMLINK:
        return f"symlink -> {version.link_target}"
    return version.kind.name.lower()


def _version_json(version: Version) -> dict[str, Any]:
    return {
        "kind": version.kind.name.lower(),
        "size": version.size,
        "executable": version.executable,
        "hash": version.content.hex() if version.kind == Kind.FILE else None,
        "target": version.link_target if version.kind == Kind.SYMLINK else None,
        "time": _when(version.time_ms),
        "supersedes": list(version.supersedes),
    }


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Any]:
    """A byte counter on a terminal, nothing otherwise (pipes and tests stay clean)."""
    if not sys.stderr.isatty():
        yield None
        return
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True, console=None) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _open(directory: str) -> Share:
    return Share.open(Path(directory), load_or_create_key())


def _share_path(share: Share, path: str) -> str:
    """A user-given path (relative to the cwd, or absolute) as a share-relative key."""
    absolute = Path(os.path.abspath(path))
    try:
        relative = absolute.relative_to(share.root)
    except ValueError as exc:
        raise BackerError(f"{path} is not inside the share {share.root}") from exc
    return relative.as_posix() if str(relative) != "." else ""


def _print_scan(summary: ScanSummary) -> None:
    for error in summary.errors:
        click.echo(f"warning: {error}", err=True)
    click.echo(
        f"scanned in {summary.seconds:.2f}s: {len(summary.added)} added, "
        f"{len(summary.modified)} modified, {len(summary.deleted)} deleted, "
        f"{summary.unchanged} unchanged, {summary.hashed_bytes} bytes hashed"
    )


@click.group()
@click.version_option(package_name="backer")
def cli() -> None:
    """backer mirrors a folder between all of your own computers."""


@cli.command()
def id() -> None:
    """Print this device's id."""
    click.echo(device_id(bytes(load_or_create_key().verify_key)))


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=True))
def init(directory: str) -> None:
    """Make DIRECTORY a new share, with this device as its first member."""
    root = Path(os.path.abspath(directory))
    with Share.create(root, load_or_create_key()) as share, _progress("scanning") as progress:
        summary = share.scan(progress)
        click.echo(f"initialised share {share.share_id.hex()} at {root}")
        _print_scan(summary)


@cli.command()
@click.option("--dir", "directory", default=".", help="A directory inside the share.")
def scan(directory: str) -> None:
    """Record every change made to the share's files since the last scan."""
    with _open(directory) as share, _progress("scanning") as progress:
        _print_scan(share.scan(progress))


@cli.command()
@click.option("--dir", "directory", default=".", help="A directory inside the share.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(directory: str, as_json: bool) -> None:
    """Show the share: files, bytes, devices, conflicts, last scan."""
    with _open(directory) as share:
        totals = share.catalog.totals()
        last_scan = share.catalog.get_int("last_scan_ms")
        report = {
            "root": str(share.root),
            "share_id": share.share_id.hex(),
            "device": device_id(share.device),
            **totals,
            "devices": [
                {"id": device_id(key), "name": name}
                for key, name in share.catalog.members().items()
            ],
            "events": share.journal.count(),
            "forks": len(share.journal.forks()),
            "last_scan": _when(last_scan) if last_scan else None,
        }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"share     {report['share_id']} at {report['root']}")
    click.echo(f"device    {report['device']}")
    click.echo(
        f"contents  {totals['files']} files, {totals['directories']} directories, "
        f"{totals['symlinks']} symlinks, {totals['bytes']} bytes"
    )
    click.echo(f"conflicts {totals['conflicts']}")
    click.echo(f"journal   {report['events']} events, {report['forks']} forks")
    click.echo(f"last scan {report['last_scan'] or 'never'}")
    click.echo(f"devices   {len(report['devices'])}")
    for device in report["devices"]:
        click.echo(f"  {device['id']}  {device['name']}")


_MARKS = {"added": "+", "modified": "~", "deleted": "-"}


def _matches(path: str, wanted: str) -> bool:
    return not wanted or path == wanted or path.startswith(wanted + "/")


@cli.command()
@click.argument("path", required=False)
@click.option("--dir", "directory", default=".", help="A directory inside the share.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def log(path: str | None, directory: str, as_json: bool) -> None:
    """Show the journal, oldest first; with PATH, only events that touched it."""
    with _open(directory) as share:
        wanted = _share_path(share, path) if path else ""
        lines: list[dict[str, Any]] = []
        for position, event in share.journal.since(0):
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
                    "author": device_id(event.author),
                    "seq": event.seq,
                    "kind": EventKind(event.kind).name.lower(),
                    "id": event.id.hex(),
                    "changes": [
                        {
                            "path": p,
                            "version": vid,
                            "change": share.catalog.change_type(v),
                            **_version_json(v),
                        }
                        for p, vid, v in changes
                    ],
                }
            )
    if as_json:
        click.echo(json.dumps(lines, indent=2))
        return
    for line in lines:
        click.echo(f"{line['time']}  {line['author'][:7]}#{line['seq']}  {line['kind']}")
        for change in line["changes"]:
            click.echo(f"    {_MARKS[change['change']]} {change['path']}")


@cli.command()
@click.argument("path")
@click.option("--dir", "directory", default=".", help="A directory inside the share.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def history(path: str, directory: str, as_json: bool) -> None:
    """Show every version of PATH: when, by which device, size and hash."""
    with _open(directory) as share:
        key = _share_path(share, path)
        entries: list[HistoryEntry] = share.catalog.history(key)
    if not entries:
        raise BackerError(f"no history for {key!r} in this share")
    if as_json:
        rows = [
            {
                "version": e.version_id,
                "author": device_id(e.author),
                "live": e.live,
                **_version_json(e.version),
            }
            for e in entries
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    for e in entries:
        marker = "*" if e.live else " "
        click.echo(
            f"{marker} {_when(e.version.time_ms)}  {short_id(e.author)}  "
            f"{e.version_id}  {_describe(e.version)}"
        )


def main() -> None:
    """Console entry point: run the CLI, turning errors into one line and an exit code."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (BackerError, JournalError) as exc:
        click.echo(f"backer: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except (sqlite3.DatabaseError, OSError) as exc:
        if os.environ.get("BACKER_DEBUG"):
            raise
        click.echo(f"backer: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        if os.environ.get("BACKER_DEBUG"):
            raise
        click.echo(f"backer: internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_INTERNAL)

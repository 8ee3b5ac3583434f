"""What a share's commands do, as data: the control-channel ops a running node answers,
and the reports (``--json`` dicts) the CLI prints, built in one place for both.

Ops (one JSON object per request; every reply may be ``{"error": "one line"}``):
``scan``, ``status``, ``sync``, ``invite``, ``remove``, ``rename``, ``restore``,
``resolve``, ``prune`` (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Container, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backer.config.identity import device_id, parse_device_id, short_id
from backer.connections import control
from backer.connections.addresses import format_address, parse_address
from backer.db.catalog import Catalog, HistoryEntry, Problem
from backer.errors import BackerError, reason
from backer.model import revisions
from backer.model.materializer import not_in_place
from backer.model.membership import EventKind
from backer.model.records import Kind, Version, timestamp
from backer.model.replicator import Replicator
from backer.model.share import ScanSummary, Share
from backer.protocol.invite import InviteToken
from backer.protocol.session import Session, WireStats
from backer.scanner.chunks import ChunkStore
from backer.versioner.store import Store

if TYPE_CHECKING:
    from backer.node.node import Node, Runtime

MB = 1024 * 1024
SYNC_WAIT_S = 120.0  # a node's ``sync`` gives up on a peer that has not caught up by then
FETCH_WAIT_S = 120.0  # a node's ``restore`` gives up on bytes that have not arrived by then
NOT_HERE_SHOWN = 100  # paths ``status --json`` and ``sync --json`` name of those not here


def problems_json(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    return [{"path": p.path, "reason": p.reason, "warning": p.warning} for p in problems]


def disk_full_line(full: BaseException, held: int) -> str:
    """A full disk as one line that says what frees room now: deleting files does not
    (their contents are kept as versions for keep-all), ``backer prune --all`` does
    (``held``: what it frees, :func:`held_by_kept`)."""
    if held == 0:
        return str(full)
    return (
        f"{full}; kept versions of replaced and deleted files hold {-(-held // MB)} MB "
        "(deleting files frees nothing until keep-all ends): 'backer prune --all' frees it now"
    )


async def warn_disk_full(runtime: Runtime, full: BaseException) -> None:
    """Log a full disk with what frees room, and say so in ``status`` while the disk is
    in that state; what kept versions hold is read off the loop (``runtime.kept``)."""
    said = disk_full_line(full, await runtime.kept.measure(runtime.share))
    runtime.log.warning("%s: %s (the files that fit were applied)", runtime.name, said)
    if runtime.disk_full_logged == str(full):  # (not after a later state of the disk)
        runtime.disk_full_said = said


def failures(share: Share) -> int:
    """How many files this process could not record or apply (warnings aside)."""
    return sum(1 for problem in share.problems.values() if not problem.warning)


def event_kind(kind: int) -> str:
    """A journal event's kind as text; a kind this version does not know, by number."""
    try:
        return EventKind(kind).name.lower()
    except ValueError:
        return f"kind-{kind}"


def version_json(version: Version) -> dict[str, Any]:
    """One version as ``history --json``, ``log --json`` and the HTTP API show it."""
    return {
        "kind": version.kind.name.lower(),
        "size": version.size,
        "permissions": oct(version.permissions),
        "executable": version.executable,
        "hash": version.content.hex() if version.kind == Kind.FILE else None,
        "target": version.link_target if version.kind == Kind.SYMLINK else None,
        "time": timestamp(version.time_ms),
        "time_ms": version.time_ms,
        "supersedes": list(version.supersedes),
    }


def history_report(share: Share, entries: list[HistoryEntry]) -> list[dict[str, Any]]:
    """Every version of a path as ``history --json`` and the HTTP API show it. For a
    replaced file version whose bytes this device does not hold: ``pruned`` (when it
    dropped them, if it did), ``held_by`` (the other members that have not said they
    dropped them) and ``bytes``: ``here``, ``elsewhere``, or ``nowhere`` once every
    member has said so (then no restore can bring it back)."""
    store = Store(share.root, share.catalog)
    pruned = store.pruned(e.version_id for e in entries)
    dropped = share.catalog.unheld_by(
        e.version.content for e in entries if e.version.kind == Kind.FILE
    )
    others = {k: n for k, n in share.members.active.items() if k != share.device}
    on_disk: set[bytes] | None = None  # read once, only if a version's bytes are not kept
    rows = []
    for e in entries:
        row: dict[str, Any] = {
            "version": e.version_id,
            "device": device_id(e.author),
            "device_name": share.members.names.get(e.author, ""),
            "live": e.live,
            **version_json(e.version),
            "pruned": timestamp(pruned[e.version_id]) if e.version_id in pruned else None,
            "bytes": None,
            "held_by": [],
        }
        if e.version.kind == Kind.FILE:
            gone = dropped.get(e.version.content, set())
            here = e.live or store.has(e.version.content)
            if not here:
                on_disk = _contents_on_disk(share) if on_disk is None else on_disk
                here = e.version.content in on_disk
            held_by = [name for key, name in others.items() if key not in gone]
            row["bytes"] = "here" if here else "elsewhere" if held_by else "nowhere"
            row["held_by"] = [] if here else held_by
        rows.append(row)
    return rows


def not_here(
    catalog: Catalog, root: Path, skip: Container[str] = (), shown: int = NOT_HERE_SHOWN
) -> dict[str, Any]:
    """What the share at ``root`` lists that this device does not hold
    (``not_in_place``), but the paths in ``skip``: how many entries, their bytes, and
    the first ``shown`` paths."""
    files = size = 0
    paths: list[str] = []
    for path, version in not_in_place(catalog, root):
        if path in skip:
            continue
        files += 1
        size += version.size if version.kind == Kind.FILE else 0
        if len(paths) < shown:
            paths.append(path)
    return {"files": files, "bytes": size, "paths": paths}


def _contents_on_disk(share: Share) -> set[bytes]:
    """The contents of the files on disk here as the last scan recorded them (what
    ``prune`` also counts as held)."""
    rows = share.catalog.conn.execute(
        "SELECT versions.record FROM local JOIN versions ON versions.vid = local.vid"
    )
    return {Version.decode(record).content for (record,) in rows}


def conflicts_report(
    share: Share, found: list[revisions.Conflict] | None = None
) -> list[dict[str, Any]]:
    """What ``backer conflicts --json`` prints (and the HTTP API answers): per conflict,
    its path and each competing version, the one holding the path first (``found``:
    the conflicts as read elsewhere, e.g. off the event loop). ``modified`` is the
    file's own time, which ``--keep-newest`` goes by; ``time`` is when it was recorded,
    which for an edit made while the node was stopped is its next start."""
    names = {key[:8]: name for key, name in share.members.names.items()}
    return [
        {
            "path": conflict.path,
            "versions": [
                {
                    "version": c.version_id,
                    "device": short_id(c.version.device),
                    "device_name": names.get(c.version.device, "?"),
                    "copy": c.copy_path,
                    **version_json(c.version),
                    "modified": timestamp(c.version.mtime_ns // 1_000_000),
                    "modified_ms": c.version.mtime_ns // 1_000_000,
                }
                for c in conflict.contenders
            ],
        }
        for conflict in (revisions.conflicts(share.catalog) if found is None else found)
    ]


def scan_report(share: Share, summary: ScanSummary) -> dict[str, Any]:
    """What ``backer scan --json`` prints."""
    return {
        "added": summary.added,
        "modified": summary.modified,
        "deleted": summary.deleted,
        "unchanged": summary.unchanged,
        "hashed_bytes": summary.hashed_bytes,
        "seconds": round(summary.seconds, 3),
        "problems": problems_json(summary.errors),
    }


def status_report(
    share: Share, counts: dict[str, int] | None = None, missing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ``backer status --json`` prints (a running node adds each device's state).
    ``counts``: the totals and the number of conflicts, and ``missing``: the entries
    listed that this device does not hold (``not_here``), as read elsewhere; they scan
    the whole share, so the web API reads them off the event loop."""
    last_scan = share.catalog.get_int("last_scan_ms")
    if counts is None:
        counts = {**share.catalog.totals(), "conflicts": len(revisions.conflicts(share.catalog))}
        missing = not_here(share.catalog, share.root)
    report = {
        "root": str(share.root),
        "share_id": share.share_id.hex(),
        "device": device_id(share.device),
        **counts,
        "devices": [
            {"id": device_id(key), "name": name} for key, name in share.members.active.items()
        ],
        "events": share.journal.count(),
        "forks": len(share.journal.forks()),
        "quarantined": [
            {"author": device_id(author), "seq": seq, "reason": reason}
            for author, seq, reason in share.journal.quarantined()
        ],
        "invites_used_twice": [
            {"invite": invite.hex(), "devices": [device_id(d) for d in devices]}
            for invite, devices in share.invites_used_twice().items()
        ],
        "last_scan": timestamp(last_scan) if last_scan else None,
        "problems": [
            {**problems_json([problem])[0], "during": source, "since": timestamp(since)}
            for source, problem, since in share.catalog.problems()
        ],
    }
    if missing is not None:
        report["not_here"] = missing
    return report


def sync_summary(sessions: list[Session], replicator: Replicator | None = None) -> dict[str, Any]:
    """What moved: wire counters of ``sessions``; with ``replicator``, what was applied
    (and how many files failed in this process)."""
    total = WireStats()
    for session in sessions:
        for name, value in vars(session.stats).items():
            setattr(total, name, getattr(total, name) + value)
    summary: dict[str, Any] = {
        "peers": [device_id(s.peer) if s.peer else None for s in sessions],
        **vars(total),
    }
    if replicator is not None:
        summary["files_written"] = replicator.stats.files_written
        summary["files_deleted"] = replicator.stats.files_deleted
        summary["chunks_reused"] = replicator.stats.chunks_reused
        summary["local_edits_kept"] = replicator.stats.local_edits_kept
        summary["errors"] = failures(replicator.share)
    return summary


def sync_report(sessions: list[Session], replicator: Replicator) -> dict[str, Any]:
    """What ``backer sync --json`` prints. ``not_here``: what the share lists that this
    device still does not hold, but the files listed with a problem and those a local
    edit kept (the summary's ``local edits kept``), and why."""
    share = replicator.share
    report = sync_summary(sessions, replicator)
    report["per_peer"] = [sync_summary([s]) for s in sessions] if len(sessions) > 1 else []
    report["problems"] = problems_json(share.problems.values())
    explained = {p.path for _, p, _ in share.catalog.problems()} | replicator.edits_kept
    report["not_here"] = {
        **not_here(share.catalog, share.root, explained),
        "reason": _why_not_here(replicator),
    }
    return report


def _why_not_here(replicator: Replicator) -> str:
    """Why the files a sync's report lists as not here are not."""
    if replicator.disk_full is not None:
        return "no room on the disk for them"
    if not replicator.idle:
        return "still arriving"
    return "no device reached had their content"


def revision_scope(share: Share, request: dict[str, Any]) -> list[str]:
    """The paths a ``restore`` or ``resolve`` request replaces: scanned before it."""
    paths = [str(request["path"])]
    conflict = None
    if request["op"] == "resolve":
        conflict = revisions.find_conflict(share.catalog, paths[0])
        paths = [conflict.path, *(c.copy_path for c in conflict.contenders if c.copy_path)]
    elif request.get("to") and revisions.outside_target(share, request["to"]) is None:
        paths.append(revisions.inside_target(share, request["to"]))
    return paths


def restore_plan(
    share: Share, request: dict[str, Any]
) -> tuple[revisions.RestorePlan, Path | None, revisions.Fetched | None]:
    """The plan of a ``restore`` request (after the scan of :func:`revision_scope`),
    where it goes outside the share if it does, and, when some of its bytes are not on
    this device, the :class:`~backer.model.revisions.Fetched` to fill from peers."""
    path, to = str(request["path"]), request.get("to")
    outside = revisions.outside_target(share, to) if to else None
    inside = revisions.inside_target(share, to) if to and outside is None else None
    at = request.get("at")
    plan = revisions.plan_restore(
        share, path, request.get("version"), None if at is None else int(at), inside
    )
    store = ChunkStore(share.root, share.catalog)
    missing = revisions.missing_chunks(share.catalog, store, [e.version for e in plan.entries])
    return plan, outside, revisions.Fetched(share, missing) if missing else None


def finish_restore(
    share: Share,
    plan: revisions.RestorePlan,
    outside: Path | None,
    fetched: revisions.Fetched | None,
) -> str:
    """Carry out a restore once what was missing was fetched (if anything was)."""
    try:
        if fetched is not None and (fetched.wanted or fetched.lacking):
            raise revisions.unreachable(plan.summary)
        store = fetched or ChunkStore(share.root, share.catalog)
        return revisions.carry_out(share, plan, store, outside)
    finally:
        if fetched is not None:
            fetched.close()


def find_device(share: Share, text: str) -> bytes:
    """The member (or removed device) whose id is ``text`` or starts with it."""
    wanted = text.strip().upper().replace("-", "")
    if len(wanted) < 7:
        raise BackerError(f"give a device id, or at least its first 7 characters: {text!r}")
    if len(wanted) == 56:
        return parse_device_id(wanted)
    found = [k for k in share.members.names if device_id(k).replace("-", "").startswith(wanted)]
    if len(found) != 1:
        problem = "matches no device" if not found else "matches several devices"
        raise BackerError(f"{text!r} {problem} of this share (see 'backer device list')")
    return found[0]


def remove_device(share: Share, text: str) -> tuple[bytes, str]:
    """Remove a device; (its key, what to tell the person)."""
    device = find_device(share, text)
    name = share.members.names.get(device, "")
    share.remove_device(device)
    others = len(share.members.active) - 1
    return device, (
        f"removed device {device_id(device)} ({name}); the share key was changed and "
        f"sealed to the {others} other remaining device(s): each gets it at its next sync"
    )


def new_invite(share: Share, expires: int, addresses: tuple[str, ...]) -> tuple[bytes, str]:
    """Record a single-use invite; its id and the token text naming ``addresses``."""
    invite_id, psk = share.create_invite(expires)
    return invite_id, InviteToken(share.share_id, invite_id, psk, share.device, addresses).encode()


async def invite_outcome(share: Share, invite_id: bytes) -> str:
    """Wait until the invite is used (the joiner's device id) or expires (raise)."""
    while (joiner := share.invite_outcome(invite_id)) is None:
        await asyncio.sleep(0.2)
    return device_id(joiner)


SEEN_META = "devices_seen"  # device id -> [ms, address]: sessions opened and closed


def note_seen(share: Share, device: bytes, address: str | None) -> None:
    """A session with ``device`` opened or ended now: kept in the share's database, so
    that 'last seen' survives a restart of the node (and shows in an offline status).
    Not written on a full disk: a session must not fail for it."""
    seen = _seen(share)
    seen[device.hex()] = [time.time_ns() // 1_000_000, address]
    with contextlib.suppress(sqlite3.OperationalError), share.db.conn:
        share.catalog.set_meta(SEEN_META, json.dumps(seen))


def _seen(share: Share) -> dict[str, Any]:
    try:
        seen = json.loads(share.catalog.get_meta(SEEN_META) or b"{}")
    except ValueError:
        return {}
    return seen if isinstance(seen, dict) else {}


def last_seen(share: Share, device: bytes) -> tuple[int | None, str | None]:
    """When a session with ``device`` last opened or ended, and where it is reached (the
    address dialled, else the address book's best); never noted: what the address book
    says (:func:`last_contact`)."""
    noted = _seen(share).get(device.hex())
    if isinstance(noted, list) and len(noted) == 2 and isinstance(noted[0], int):
        address = noted[1] if isinstance(noted[1], str) else last_contact(share, device)[1]
        return noted[0], address
    return last_contact(share, device)


def last_contact(share: Share, device: bytes) -> tuple[int | None, str | None]:
    """When this device last had a session with ``device`` that the share recorded
    (dialled, or accepted from it) and at which address; never: (None, its best known
    address, if any)."""
    known = share.catalog.addresses_of(device) if device != share.device else []
    best: tuple[int | None, str | None] = (None, None)
    for host, port, source, seen_ms, success_ms in known:
        contact = success_ms or (seen_ms if source == "inbound" else None)
        if contact and (best[0] is None or contact > best[0]):
            best = (contact, format_address(host, port))
    if best[0] is None and known:
        best = (None, format_address(known[0][0], known[0][1]))
    return best


# -- a running node's answers ------------------------------------------------------------


def handler(node: Node, runtime: Runtime) -> control.Handler:
    """The control-channel handler of one share served by ``node``."""

    async def handle(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        op = request.get("op")
        unserved = runtime.gone or stopped(runtime)
        if unserved is not None and op != "status":
            yield {"error": unserved}
            return
        try:
            if op == "scan":
                yield {"scan": scan_report(runtime.share, await runtime.scan())}
            elif op == "status":
                yield {"status": node_status(runtime)}
            elif op == "prune":
                pruned = runtime.prune(bool(request.get("dry_run")), bool(request.get("all")))
                yield {"prune": pruned.as_json()}
            elif op == "sync":
                yield {"sync": await node_sync(runtime, list(request.get("addresses") or []))}
            elif op == "invite":
                async for reply in node_invite(node, runtime, request):
                    yield reply
            elif op == "remove":
                removed, said = remove_device(runtime.share, str(request.get("device", "")))
                runtime.hub.disconnect(removed)  # before its removal is relayed
                runtime.hub.journal_grew()
                yield {"removed": said}
            elif op == "rename":
                device = find_device(runtime.share, str(request.get("device", "")))
                runtime.share.rename_device(device, str(request.get("name", "")))
                runtime.hub.journal_grew()
                name = runtime.share.members.names[device]
                yield {"renamed": f"{device_id(device)} {name}"}
            elif op in ("restore", "resolve"):
                yield {"revised": await node_revise(runtime, request)}
            else:
                yield {"error": f"unknown request {op!r}"}
        except (BackerError, KeyError, TypeError, ValueError) as exc:
            yield {"error": reason(exc)}
        except Exception as exc:  # the disk's, or one no check foresaw: answered and
            # logged once, never a dead handler and a request closed unanswered
            node.log.error("%s: %s failed: %s: %s", runtime.name, op, type(exc).__name__, exc)
            yield {"error": reason(exc)}

    return handle


def node_status(
    runtime: Runtime, counts: dict[str, int] | None = None, missing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``status`` plus where the node listens (``listening``: the addresses peers can
    dial, with the port bound) and, per device, what the node knows of it now:
    connected or last seen, what it still needs (``need_files``/``need_bytes``;
    another device's as it last said on its session, None while unknown), whether it
    is in sync, transfer rates (chunk bytes/s from and to it; this device: in all) and
    progress (``counts``, ``missing``: see :func:`status_report`)."""
    share = runtime.share
    report = status_report(share, counts, missing)
    ours = {author: c.length for author, c in share.journal.summary().items()}
    replicator = runtime.hub.replicator
    own_need = replicator.need()
    devices = []
    for entry in report["devices"]:
        key = parse_device_id(entry["id"])
        link = runtime.links.get(key)
        session = link.session if link is not None else None
        seen_ms, address = last_seen(share, key)
        if key == share.device:
            every = [k.rates for k in runtime.links.values()]
            rates = (sum(r for r, _ in every), sum(s for _, s in every))
            need: tuple[int, int] | None = own_need
            in_sync = None
            transfer = _own_transfer(replicator)
        else:
            rates = link.rates if link is not None else (0.0, 0.0)
            need = session.peer_need if session is not None else None
            in_sync = None if session is None else _in_sync(session, ours)
            transfer = _peer_transfer(session) if session is not None else None
        devices.append(
            {
                **entry,
                "this": key == share.device,
                "connected": link is not None,
                "last_seen_ms": seen_ms,
                "address": link.address if link is not None else address,
                "in_sync": in_sync,
                "need_files": None if need is None else need[0],
                "need_bytes": None if need is None else need[1],
                "rate_in": round(rates[0]),
                "rate_out": round(rates[1]),
                "transfer": transfer,
                "last_error": runtime.failed.get(key, (0, None))[1],
            }
        )
    report["devices"] = devices
    report["listening"] = list(runtime.node.addresses)  # (as bound: --listen HOST:0 too)
    if runtime.disk_full_said is not None:
        full = {"path": "", "reason": runtime.disk_full_said, "warning": False}
        report["problems"].insert(0, {**full, "during": "applying", "since": None})
    unserved = runtime.gone or stopped(runtime)
    if unserved is not None:
        gone = {"path": "", "reason": unserved, "warning": False}
        report["problems"].insert(0, {**gone, "during": "serving", "since": None})
    return report


def stopped(runtime: Runtime) -> str | None:
    """Why the share's runtime failed and when it restarts, while it is stopped."""
    if runtime.stopped is None:
        return None
    why, restart = runtime.stopped
    return f"stopped: {why}, retry in {max(0, round(restart - time.monotonic()))} s"


def _in_sync(session: Session, ours: dict[bytes, int]) -> bool | None:
    """Whether the peer of ``session`` holds our journal, took in everything we sent,
    and says it needs nothing (None: its summary has not arrived yet)."""
    if session.peer_lengths is None:
        return None
    theirs = {a: n for a, n in session.peer_lengths.items() if n}
    return (
        theirs == ours
        and session.replicator.idle
        and session.peer_caught_up
        and session.peer_acknowledged == session.events_messages_sent
        and session.peer_need == (0, 0)
    )


def _own_transfer(replicator: Replicator) -> dict[str, int] | None:
    """What this device fetches now (the totals count every plan of the run)."""
    if replicator.operations is None:
        return None
    done, total, got, wanted = replicator.progress()
    return {"files_done": done, "files_total": total, "bytes_done": got, "bytes_total": wanted}


def _peer_transfer(session: Session) -> dict[str, int] | None:
    """How far the peer is since it last needed nothing, from what it said it needs."""
    if not session.peer_need or session.peer_need == (0, 0):
        return None
    (files, size), (most_files, most_bytes) = session.peer_need, session.peer_need_peak
    return {
        "files_done": most_files - files,
        "files_total": most_files,
        "bytes_done": most_bytes - size,
        "bytes_total": most_bytes,
    }


async def node_sync(runtime: Runtime, addresses: list[str]) -> dict[str, Any]:
    """Dial ``addresses`` (none: every known one) now; reply once each peer has caught
    us up and acknowledged what we sent, and we applied (or its dial failed)."""
    for address in addresses:
        parse_address(address)
    if runtime.paused:
        raise BackerError("the share is paused on this device: resume it first (web UI)")
    share = runtime.share
    targets = addresses or [
        a
        for a, t in runtime.targets.items()
        if t.device is None or (t.device in share.members and t.device != share.device)
    ]
    if not targets and not runtime.links:
        raise BackerError("no peer known yet: give an address (HOST:PORT)")
    runtime.learn(None, targets)
    started = {a: runtime.targets[a].attempts for a in targets}
    for address in targets:
        runtime.wake(address=address)
    deadline = time.monotonic() + SYNC_WAIT_S * runtime.node.scale
    failed: dict[str, str] = {}
    while True:
        sessions: list[Session] = []
        waiting = False
        for address in targets:
            target = runtime.targets[address]
            link = runtime.links.get(target.device or b"")
            if link is not None and link.session is not None:
                sessions.append(link.session)
                waiting |= not link.session.complete
                failed.pop(address, None)
            elif target.attempts > started[address] and not target.dialling and target.error:
                failed[address] = target.error
            else:
                waiting = True
        if not addresses:  # every connected device too
            extra = [link.session for link in runtime.links.values() if link.session]
            for session in extra:
                if session not in sessions:
                    sessions.append(session)
                    waiting |= not session.complete
        if not waiting or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    if not sessions:
        raise BackerError("; ".join(f"{a}: {e}" for a, e in failed.items()) or "no peer answered")
    report = sync_report(sessions, runtime.hub.replicator)
    report["failed"] = [{"address": a, "reason": e} for a, e in failed.items()]
    return report


async def node_revise(runtime: Runtime, request: dict[str, Any]) -> dict[str, Any]:
    """``restore`` or ``resolve`` by the node: the paths scanned first, bytes this
    device lacks fetched from the connected peers, the new versions pushed to them."""
    share = runtime.share
    await runtime.scan(frozenset(revision_scope(share, request)))
    if request["op"] == "resolve":
        before = dict(share.problems)
        said = revisions.resolve_conflict(
            share, str(request["path"]), request.get("keep"), bool(request.get("keep_both"))
        )
    else:
        plan, outside, fetched = restore_plan(share, request)
        if fetched is not None:
            try:
                await _fetch(runtime, fetched)
            except BaseException:
                fetched.close()
                raise
        before = dict(share.problems)
        said = finish_restore(share, plan, outside, fetched)
    runtime.hub.journal_grew()
    return {"said": said, "problems": problems_json(_own_failures(share, before))}


def _own_failures(share: Share, before: dict[tuple[str, str], Problem]) -> list[Problem]:
    """The failures noted while an operation ran (no await between ``before`` and now,
    so nothing else noted them): the share's standing problems (a skipped file) are not
    the operation's and must not make it look failed."""
    return [
        p for key, p in share.problems.items() if not p.warning and before.get(key) is not p
    ]


async def _fetch(runtime: Runtime, fetched: revisions.Fetched) -> None:
    """Ask the connected peers for what ``fetched`` wants, until it has it all, every
    peer lacked some of it, or FETCH_WAIT_S passed."""
    replicator = runtime.hub.replicator
    if not any(s.peer_caught_up for s in replicator.sessions):
        return  # (finish_restore says that no reachable device has them)
    replicator.retrieve(fetched)
    runtime.hub.flush()
    deadline = time.monotonic() + FETCH_WAIT_S * runtime.node.scale
    while fetched.wanted and time.monotonic() < deadline:
        if not any(s.peer_caught_up for s in replicator.sessions):
            break
        await asyncio.sleep(0.05)
    if fetched in replicator.sinks:
        replicator.sinks.remove(fetched)


async def node_invite(
    node: Node, runtime: Runtime, request: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """A single-use invite naming the node's addresses (or those asked for); with
    ``wait``, also the device that joined with it."""
    expires = int(request["expires"])
    if expires <= 0:
        raise BackerError("--expires must be a positive number of seconds")
    addresses = tuple(str(a) for a in request.get("addresses") or node.addresses)
    invite_id, token = new_invite(runtime.share, expires, addresses)
    runtime.hub.journal_grew()  # connected members learn of it: they may admit too
    yield {"token": token}
    if request.get("wait"):
        yield {"joined": await invite_outcome(runtime.share, invite_id)}

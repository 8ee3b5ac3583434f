"""The JSON API of a running node (documented in docs/api.md).

Every view acts on the node's shares in the node's own event loop, through the same
functions as the control channel and the CLI (``backer.node.commands``,
``backer.model.revisions``); what reads more than a few rows of a share's database is
read off the loop (:mod:`backer.api.reads`). A share is named in the URL by its
registered name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import segno
from aiohttp import web

from backer.api import reads
from backer.api.reads import Cursor
from backer.config.identity import device_id
from backer.errors import BackerError
from backer.events import Event, EventType, paths
from backer.model.records import Kind, new_version_id, timestamp
from backer.node import commands
from backer.numbers import natural
from backer.protocol.invite import MAX_EXPIRES_S
from backer.scanner.ignore import (
    IGNORE_FILE,
    MAX_IGNORE_BYTES,
    IgnoreRules,
    read_rules,
    replace_rules,
)

if TYPE_CHECKING:
    from backer.db.catalog import Catalog
    from backer.node.node import Node, Runtime

NODE: web.AppKey[Node] = web.AppKey("node")
READER: web.AppKey[reads.Reader] = web.AppKey("reader")
PAGE_LIMIT = 50  # changes per page unless asked
MAX_PAGE = 500
SSE_KEEPALIVE_S = 15.0  # a comment line this often, so a dead client is noticed
SSE_QUEUE = 256  # events waiting for a slow client (beyond: it falls behind, then `missed`)

routes = web.RouteTableDef()


def _fail(status: type[web.HTTPException], reason: str) -> web.HTTPException:
    return status(text=json.dumps({"error": reason}), content_type="application/json")


def _runtime(request: web.Request) -> Runtime:
    name = request.match_info["share"]
    for runtime in request.app[NODE].runtimes.values():
        if runtime.name == name:
            return runtime
    raise _fail(web.HTTPNotFound, f"no share named {name!r} is served here")


def _text(value: Any, name: str) -> str:
    """``value`` if it is a string that UTF-8 can spell (JSON lets through lone
    surrogates, which no file or database takes), else 400 naming ``name``."""
    if not isinstance(value, str):
        raise _fail(web.HTTPBadRequest, f"{name} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(web.HTTPBadRequest, f"{name} is not valid Unicode") from None
    return value


def _path(request: web.Request, body: dict[str, Any] | None = None) -> str:
    """A share-relative path from the query (or the body): no leading or trailing '/'."""
    return _text((body or {}).get("path", request.query.get("path", "")), "path").strip("/")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise _fail(web.HTTPBadRequest, "the body is not JSON") from exc
    if not isinstance(body, dict):
        raise _fail(web.HTTPBadRequest, "the body must be a JSON object")
    return body


async def _share_json(request: web.Request, runtime: Runtime) -> dict[str, Any]:
    root = runtime.share.root
    counts, missing = await request.app[READER].run(root, reads.share_state(root))
    status = commands.node_status(runtime, counts, missing)
    return {"name": runtime.name, "paused": runtime.paused, **status}


@routes.get("/api/shares")
async def shares(request: web.Request) -> web.Response:
    """Every share this node serves, with its state and its devices'."""
    runtimes = list(request.app[NODE].runtimes.values())
    return web.json_response([await _share_json(request, r) for r in runtimes])


@routes.get("/api/shares/{share}")
async def share(request: web.Request) -> web.Response:
    return web.json_response(await _share_json(request, _runtime(request)))


@routes.get("/api/shares/{share}/devices")
async def devices(request: web.Request) -> web.Response:
    return web.json_response((await _share_json(request, _runtime(request)))["devices"])


def _int(request: web.Request, name: str, default: int | None) -> int | None:
    text = request.query.get(name)
    if text is None:
        return default
    number = natural(text)
    if number is None:
        raise _fail(web.HTTPBadRequest, f"{name} must be a whole number")
    return number


@routes.get("/api/shares/{share}/changes")
async def changes(request: web.Request) -> web.Response:
    """The journal, newest first, a page of at most ``limit`` changes at a time
    (``before``: the ``next`` of the last page; a large event goes on over several
    pages), only changes at ``path`` (or below it) and/or events by ``device``."""
    runtime = _runtime(request)
    share = runtime.share
    limit = min(_int(request, "limit", PAGE_LIMIT) or PAGE_LIMIT, MAX_PAGE)
    try:
        cursor = Cursor.parse(request.query.get("before"))
    except ValueError:
        raise _fail(web.HTTPBadRequest, "before must be the next of an earlier page") from None
    wanted = _path(request)
    author = request.query.get("device", "")
    device = commands.find_device(share, author) if author else None
    names = dict(share.members.names)
    page = await request.app[READER].run(
        share.root, lambda catalog, _: reads.changes_page(catalog, cursor, limit, wanted, device)
    )
    events = [
        {
            "position": position,
            "time": timestamp(event.time_ms),
            "time_ms": event.time_ms,
            "device": device_id(event.author),
            "device_name": names.get(event.author, ""),
            "kind": commands.event_kind(event.kind),
            "skipped": skipped,
            "changes": [
                {"path": p, "version": vid, "change": page.change_types[vid]}
                | commands.version_json(v)
                for p, vid, v in versions
            ],
        }
        for position, event, versions, skipped in page.events
    ]
    following = str(page.next) if page.next is not None else None
    return web.json_response({"changes": events, "next": following})


@routes.get("/api/shares/{share}/files")
async def files(request: web.Request) -> web.Response:
    """The entries of one directory (``path``; none: the top), each with its live
    versions, and whether it is part of a conflict (the path or one of its copies).
    Deleted paths only with ``deleted=1``: flagged ``deleted``, with the kind they had
    (their history has what a restore brings back). Read from the folder index: a
    folder costs its own entries, not the share's."""
    runtime = _runtime(request)
    directory = _path(request)
    with_deleted = request.query.get("deleted", "0") not in ("0", "false", "")

    def read(catalog: Catalog, cached: reads.Cached) -> dict[str, Any]:
        entries: dict[str, dict[str, Any]] = {}
        for path, vid, version in catalog.live_in(directory):
            if version.kind == Kind.DELETED and not with_deleted:
                continue
            name = path[len(directory) + 1 :] if directory else path
            entry = entries.setdefault(path, {"name": name, "path": path, "versions": []})
            entry["versions"].append({"version": vid, **commands.version_json(version)})
        conflicted = reads.conflicted(catalog, cached) if entries else set()
        for entry in entries.values():
            kinds = [v["kind"] for v in entry["versions"]]
            entry["deleted"] = all(kind == "deleted" for kind in kinds)
            entry["kind"] = next((k for k in kinds if k != "deleted"), None) or _kind_before(
                catalog, entry["path"]
            )
            entry["conflict"] = entry["path"] in conflicted
        return {"path": directory, "entries": list(entries.values())}

    return web.json_response(await request.app[READER].run(runtime.share.root, read))


def _kind_before(catalog: Catalog, path: str) -> str:
    """What a deleted path was before its deletion ('file' if history has no other)."""
    kinds = [e.version.kind for e in catalog.history(path) if e.version.kind != Kind.DELETED]
    return kinds[-1].name.lower() if kinds else "file"


@routes.get("/api/shares/{share}/history")
async def history(request: web.Request) -> web.Response:
    """Every version of ``path``, oldest first; ``live`` marks the current one(s)."""
    runtime = _runtime(request)
    path = _path(request)
    entries = runtime.share.catalog.history(path)
    if not entries:
        raise _fail(web.HTTPNotFound, f"no history for {path!r} in this share")
    return web.json_response(commands.history_report(runtime.share, entries))


@routes.post("/api/shares/{share}/restore")
async def restore(request: web.Request) -> web.Response:
    """Make version ``version`` of ``path`` current again (a new version, sent to
    every device; what the path holds now is kept in the content store)."""
    runtime = _runtime(request)
    body = await _body(request)
    path, version = _path(request, body), _text(body.get("version", ""), "version")
    if not any(e.version_id == version for e in runtime.share.catalog.history(path)):
        raise _fail(web.HTTPNotFound, f"no version {version!r} of {path!r}")
    request_ = {"op": "restore", "path": path, "version": version}
    try:  # (the same code as 'backer restore': scans first, fetches what is missing)
        revised = await commands.node_revise(runtime, request_)
    except BackerError as exc:
        raise _fail(web.HTTPConflict, str(exc)) from exc
    if revised["problems"]:
        raise _fail(web.HTTPInternalServerError, revised["problems"][0]["reason"])
    runtime.publish(EventType.LOCAL_CHANGE, change="restored", **paths([path]))
    return web.json_response({"restored": path, "version": version})


@routes.get("/api/shares/{share}/conflicts")
async def conflicts(request: web.Request) -> web.Response:
    """Every conflict: its path and each competing version, the holder first."""
    runtime = _runtime(request)
    found = await request.app[READER].run(runtime.share.root, reads.conflicts)
    return web.json_response(commands.conflicts_report(runtime.share, found))


@routes.post("/api/shares/{share}/resolve")
async def resolve(request: web.Request) -> web.Response:
    """Resolve the conflict at ``path``: keep version ``keep`` (none: the newest), or
    with ``keep_both`` every copy as an ordinary file (the same code as 'backer
    resolve'); the losers stay in history."""
    runtime = _runtime(request)
    body = await _body(request)
    path = _path(request, body)
    keep, keep_both = body.get("keep"), body.get("keep_both", False)
    if not isinstance(keep_both, bool):
        raise _fail(web.HTTPBadRequest, "keep_both must be true or false")
    ask = {"op": "resolve", "path": path, "keep": None if keep is None else _text(keep, "keep")}
    ask["keep_both"] = keep_both
    try:
        revised = await commands.node_revise(runtime, ask)
    except BackerError as exc:
        raise _fail(web.HTTPConflict, str(exc)) from exc
    runtime.publish(EventType.CONFLICT_RESOLVED, path=path, said=revised["said"])
    return web.json_response({"resolved": path, **revised})


@routes.post("/api/shares/{share}/pause")
async def pause(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    runtime.pause(True)
    return web.json_response({"paused": True})


@routes.post("/api/shares/{share}/resume")
async def resume(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    runtime.pause(False)
    return web.json_response({"paused": False})


@routes.post("/api/shares/{share}/scan")
async def scan(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    return web.json_response(commands.scan_report(runtime.share, await runtime.scan()))


@routes.post("/api/shares/{share}/invite")
async def invite(request: web.Request) -> web.Response:
    """A single-use invite token naming this node's addresses (``expires``: seconds)."""
    runtime = _runtime(request)
    body = await _body(request)
    expires = body.get("expires", 86400)
    whole = isinstance(expires, int) and not isinstance(expires, bool)
    if not whole or not 0 < expires <= MAX_EXPIRES_S:
        reason = f"expires must be a whole number of seconds from 1 to {MAX_EXPIRES_S}"
        raise _fail(web.HTTPBadRequest, reason)
    ask = {"expires": expires}
    replies = commands.node_invite(request.app[NODE], runtime, ask)
    try:
        token = (await anext(replies))["token"]
    except (BackerError, ValueError, TypeError) as exc:
        raise _fail(web.HTTPBadRequest, str(exc)) from exc
    finally:
        await replies.aclose()
    return web.json_response({"token": token, "qr": qr_rows(token)})


def qr_rows(text: str) -> list[str]:
    """``text`` as a QR code (error correction M, no quiet zone): one string of 0 and 1
    per row, 1 dark; the page draws it (so no image crosses the CSP)."""
    matrix = segno.make(text, error="m", micro=False).matrix
    return ["".join("1" if module else "0" for module in row) for row in matrix]


def _ignore_text(runtime: Runtime) -> str:
    """The share's rules, read as the scanner reads them (409 if it does not: a link,
    a folder, a fifo or a file too large is never read, here or there)."""
    text, unread = read_rules(runtime.share.root)
    if unread is not None:
        raise _fail(web.HTTPConflict, f"{IGNORE_FILE} {unread}")
    return text


@routes.get("/api/shares/{share}/ignore")
async def ignore_rules(request: web.Request) -> web.Response:
    """The share's .backerignore, and the lines that are skipped as not valid."""
    text = _ignore_text(_runtime(request))
    return web.json_response({"rules": text, "invalid": IgnoreRules(text.splitlines()).invalid})


@routes.put("/api/shares/{share}/ignore")
async def edit_ignore_rules(request: web.Request) -> web.Response:
    """Replace .backerignore with ``rules``, if it still holds ``previous`` (else 409:
    someone edited it meanwhile). Written by a temp file, fsynced, renamed; the watcher
    records it like any edit, and it reaches every device."""
    runtime = _runtime(request)
    body = await _body(request)
    if not isinstance(body.get("rules"), str) or not isinstance(body.get("previous"), str):
        raise _fail(web.HTTPBadRequest, "give rules and previous (the text it replaces)")
    rules, previous = _text(body["rules"], "rules"), _text(body["previous"], "previous")
    if len(rules.encode("utf-8")) > MAX_IGNORE_BYTES:
        raise _fail(web.HTTPBadRequest, f"rules longer than {MAX_IGNORE_BYTES} bytes")
    checked = IgnoreRules(rules.splitlines())
    if checked.unread is not None:  # (more rules than are read: none would apply)
        raise _fail(web.HTTPBadRequest, f"rules: the file {checked.unread}")
    if _ignore_text(runtime) != previous:
        raise _fail(web.HTTPConflict, f"{IGNORE_FILE} changed meanwhile: reload it")
    if not replace_rules(runtime.share.root, rules, previous, new_version_id()):
        raise _fail(web.HTTPConflict, f"{IGNORE_FILE} changed meanwhile: reload it")
    summary = await runtime.scan(frozenset({IGNORE_FILE}))
    invalid = checked.invalid
    return web.json_response({"rules": rules, "invalid": invalid, "recorded": bool(summary.events)})


def _sse(event: Event) -> bytes:
    data = json.dumps(event.as_json())
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


@routes.get("/api/events")
async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every event of the node from now on, or after the id in
    ``Last-Event-ID`` (or ``?since=``) while it is still buffered (see backer.events)."""
    since_text = request.headers.get("Last-Event-ID") or request.query.get("since")
    since = natural(since_text)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    queue: asyncio.Queue[Event | None] = asyncio.Queue(SSE_QUEUE)

    async def pump(stream: AsyncIterator[Event]) -> None:
        async for event in stream:
            await queue.put(event)
        await queue.put(None)  # the node stops

    pumping = asyncio.ensure_future(pump(request.app[NODE].events(since)))
    try:
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if event is None:
                break
            await response.write(_sse(event))
    except ConnectionResetError:
        pass  # the client went away
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping
    return response

"""Revisions a person can use: conflicts and their resolution, a path as it was at a
moment, and restores — all recorded as ordinary new versions, so every device applies
them and history is never rewritten.

The CLI and the web API call these functions; a running node calls the same ones for
``backer restore`` and ``backer resolve`` (see :mod:`backer.node.commands`).

- **Conflicts.** The materializer resolves a concurrent write at once and alike on every
  device: one version keeps the path, each other becomes a *conflict copy* — a live
  entry at ``name.sync-conflict-…`` whose record names its source version in
  ``supersedes`` under a key derived from it (:func:`materializer.is_copy_of`). A
  conflict is therefore a path plus its live copies (and, for a moment, a path with
  several live versions that the next plan resolves). :func:`resolve_conflict` records
  the person's choice: the kept content as a new version of the path if it is not the
  one there, a deletion of every copy (or, to keep both, each copy re-recorded as an
  ordinary file); the losers stay in history.
- **Time travel.** :func:`state_at` rebuilds a subtree at a moment from the versions
  recorded then (their ``supersedes`` and the materializer's precedence), so ``ls --at``
  and ``restore DIR --at`` need no replay of the journal.
- **Restore.** :func:`plan_restore` lists the new versions that bring a file or folder
  back (a folder's entries created since are deleted); :func:`apply` records and writes
  them; :func:`export` writes them to a place outside the share instead.
  :func:`missing_chunks` is the one answer to "are these bytes on this device"; what is
  missing is fetched from peers into a :class:`Fetched` file through the replicator.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from blake3 import blake3

from backer.db.catalog import Catalog
from backer.errors import BackerError
from backer.fs.dirs import rename_new_at
from backer.fs.paths import METADATA_DIR, BadPath, check
from backer.model.materializer import (
    Materializer,
    Operation,
    Report,
    data_chunks,
    is_copy_of,
    precedence,
    seal,
)
from backer.model.materializer import plan as disk_plan
from backer.model.records import Kind, Version, timestamp
from backer.model.share import Share
from backer.scanner.chunks import ChunkStore
from backer.scanner.ignore import CONFLICT_MARK

# -- conflicts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One of a conflict's competing versions."""

    version_id: str  # the version itself (in ``history`` of the conflict's path)
    version: Version
    copy_path: str | None  # where its conflict copy is; None: it holds the path
    copy_id: str | None = None  # the copy's own live key


@dataclass(frozen=True)
class Conflict:
    """A path with competing versions: the one holding it first, then each copy."""

    path: str
    contenders: list[Contender]


def conflicts(catalog: Catalog) -> list[Conflict]:
    """Every conflict of the share, by path: each live conflict copy grouped under the
    path its source version was written at, with what holds that path now; plus any
    path that has several live versions until the next plan resolves it."""
    groups: dict[str, list[Contender]] = {}
    copies = list(catalog.live_containing(CONFLICT_MARK))
    sources = catalog.located(s for _, vid, v in copies if (s := is_copy_of(vid, v)))
    for copy_path, copy_id, record in copies:
        source = is_copy_of(copy_id, record)
        if source is None or source not in sources:
            continue
        path, version = sources[source]
        groups.setdefault(path, []).append(Contender(source, version, copy_path, copy_id))
    for path in catalog.conflicted_paths():
        groups.setdefault(path, [])
    result = []
    live = catalog.live_for(sorted(groups))
    for path in sorted(groups):
        holders = [
            Contender(vid, v, None)
            for vid, v in sorted(live.get(path, {}).items())
            if v.kind != Kind.DELETED
        ]
        contenders = holders + sorted(groups[path], key=lambda c: c.copy_path or "")
        if len(contenders) > 1:
            result.append(Conflict(path, contenders))
    return result


def find_conflict(catalog: Catalog, path: str) -> Conflict:
    """The conflict at ``path``, else the one of which ``path`` is a conflict copy (a
    copy can have a conflict of its own: that one is meant by its path)."""
    found = conflicts(catalog)
    for conflict in found:
        if conflict.path == path:
            return conflict
    for conflict in found:
        if any(c.copy_path == path for c in conflict.contenders):
            return conflict
    raise BackerError(f"no conflict at {path!r} (see 'backer conflicts')")


def resolve_conflict(
    share: Share, path: str, keep: str | None = None, keep_both: bool = False
) -> str:
    """Record how the conflict at ``path`` is resolved, apply it here, and say so in one
    line (per-file problems are the share's).

    ``keep``: the version id (or any part of it that names one contender: ids made in
    the same second share their first digits, so the end tells them apart) that keeps
    the path; None with ``keep_both`` False: the newest (latest modification);
    ``keep_both``: every copy stays as an ordinary file. The conflict copies are deleted
    as new versions (the losers stay in history), so every device removes them; peers
    get it as events.
    Scan the paths first: a resolution supersedes what the disk holds."""
    conflict = find_conflict(share.catalog, path)
    contenders = conflict.contenders
    writes: list[tuple[str, Version]] = []
    if keep_both:
        for c in contenders:
            if c.copy_path is not None and c.copy_id is not None:
                copy = share.catalog.live_versions(c.copy_path)[c.copy_id]
                writes.append((c.copy_path, _mine(share, copy, (c.copy_id,))))
        apply(share, writes)
        return f"resolved {conflict.path}: kept all {len(contenders)} versions as files"
    if keep is None:
        chosen = max(
            contenders, key=lambda c: (c.version.mtime_ns, c.version.time_ms, c.version_id)
        )
    else:
        matching = [c for c in contenders if keep and keep in c.version_id]
        if len(matching) != 1:
            ids = ", ".join(c.version_id for c in contenders)
            raise BackerError(f"{keep!r} is not one of the versions of {conflict.path!r}: {ids}")
        chosen = matching[0]
    _refuse_a_kind_change(share, conflict, chosen)
    holding = tuple(sorted(share.catalog.live_versions(conflict.path)))
    if chosen.copy_path is not None or len(holding) > 1:  # (not yet planned: no copies)
        writes.append((conflict.path, _mine(share, chosen.version, holding)))
    for c in contenders:
        if c.copy_path is not None and c.copy_id is not None:
            writes.append((c.copy_path, _deletion(share, (c.copy_id,))))
    apply(share, writes)
    copies = len(contenders) - 1
    return f"resolved {conflict.path}: kept version {chosen.version_id}, {copies} copies removed"


_KIND_NAMES = {Kind.FILE: "file", Kind.DIRECTORY: "folder", Kind.SYMLINK: "link"}


def _refuse_a_kind_change(share: Share, conflict: Conflict, chosen: Contender) -> None:
    """Refuse to put a conflict copy in place of a folder, or a folder copy in place of
    a file or link: a folder's entries are versions of their own paths, which one new
    version at the path neither deletes nor brings along (the materializer kept the
    folder and made the kept version a new conflict copy). Said before anything is
    recorded, with what the person can do instead."""
    if chosen.copy_path is None:
        return
    held = next((c for c in conflict.contenders if c.copy_path is None), None)
    if held is None or held.version.kind == chosen.version.kind:
        return
    if Kind.DIRECTORY not in (held.version.kind, chosen.version.kind):
        return
    path, copy = conflict.path, chosen.copy_path
    kept, there = _KIND_NAMES[chosen.version.kind], _KIND_NAMES[held.version.kind]
    if held.version.kind == Kind.DIRECTORY:
        entries = sum(1 for _ in share.catalog.live_under(path))
        raise BackerError(
            f"cannot keep the {kept} at {path}: {path} is a folder with {entries} entries, "
            f"which resolve does not delete; move or delete the folder {path}, then rename "
            f"{copy} to {path}"
        )
    raise BackerError(
        f"cannot keep the folder {copy} at {path}: {path} is a {there}; move or delete "
        f"{path}, then rename the folder {copy} to {path}"
    )


# -- time travel --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A path as it was at a moment: the version that held it."""

    path: str
    version_id: str
    version: Version


def check_moment(share: Share, at_ms: int) -> int:
    """``at_ms``, unless it is before the share began (its first event)."""
    began = next((event.time_ms for _, event in share.journal.since(0)), 0)
    if at_ms < began:
        raise BackerError(
            f"the share did not exist yet at {timestamp(at_ms)} (it began {timestamp(began)})"
        )
    return at_ms


def state_at(catalog: Catalog, top: str, at_ms: int) -> dict[str, Entry]:
    """Every entry at or below ``top`` ("" for the whole share) as it was at ``at_ms``.

    A version recorded by then is live at that moment unless a version recorded by then
    supersedes it; of a path's live versions the one the materializer would keep holds
    it (a modification beats a deletion, then the latest modification). A conflict
    copy shows while its source lost and its own device had not replaced the source."""
    recorded = [(p, vid, v) for p, vid, v in catalog.versions_under(top) if v.time_ms <= at_ms]
    superseded_by: dict[str, set[str]] = {}
    for _, vid, version in recorded:
        for old in version.supersedes:
            superseded_by.setdefault(old, set()).add(vid)
    alive: dict[str, dict[str, Version]] = {}
    copies: list[tuple[str, str, Version, str]] = []
    for path, vid, version in recorded:
        if vid in superseded_by:
            continue
        source = is_copy_of(vid, version)
        if source is None:
            alive.setdefault(path, {})[vid] = version
        else:
            copies.append((path, vid, version, source))
    entries = current(alive)
    holders = {e.version_id for e in entries.values()}
    for path, vid, version, source in copies:
        moot = superseded_by.get(source, set()) - {vid}
        if source not in holders and not moot and path not in entries:
            entries[path] = Entry(path, vid, version)
    return _a_tree(entries)


def _a_tree(entries: dict[str, Entry]) -> dict[str, Entry]:
    """``entries`` without those below a link or a file: a member's events may hold both
    ``x`` (a link) and ``x/y``, and no disk can; what was there is only what a tree can
    hold (else a restore elsewhere would write ``y`` wherever the link points)."""
    tree: dict[str, Entry] = {}
    for path, entry in sorted(entries.items()):
        parent = path.rpartition("/")[0]
        above = tree.get(parent)
        below_a_non_folder = above is None or above.version.kind != Kind.DIRECTORY
        if parent in entries and below_a_non_folder:  # (a link, a file, or left out)
            continue
        tree[path] = entry
    return tree


def current(live: dict[str, dict[str, Version]]) -> dict[str, Entry]:
    """What holds each path of ``live`` (path -> live versions) now, as :func:`state_at`
    decides for a past moment."""
    entries = {}
    for path, versions in live.items():
        existing = [(vid, v) for vid, v in versions.items() if v.kind != Kind.DELETED]
        if existing:
            vid, version = max(existing, key=precedence)
            entries[path] = Entry(path, vid, version)
    return entries


def listing(catalog: Catalog, directory: str, at_ms: int) -> list[Entry]:
    """The entries directly in ``directory`` ("" for the share's top) at ``at_ms``.

    A ``directory`` that was no folder then (a file, a link, deleted, not made yet) is
    an error, not an empty listing: that read as an empty folder."""
    state = state_at(catalog, directory, at_ms)
    held = state.get(directory)
    if directory and (held is None or held.version.kind != Kind.DIRECTORY):
        what = "not there (deleted, or not made yet)" if held is None else "a file"
        if held is not None and held.version.kind == Kind.SYMLINK:
            what = "a link"
        raise BackerError(
            f"not a folder at {timestamp(at_ms)}: {directory!r} was {what}"
            f" (see 'backer history {directory}')"
        )
    prefix = directory + "/" if directory else ""
    return [
        e
        for p, e in state.items()
        if p.startswith(prefix) and "/" not in p[len(prefix) :] and p != directory
    ]


# -- restore ------------------------------------------------------------------------------


@dataclass
class RestorePlan:
    """What a restore brings back (``entries``, at or below ``top``) and, to do it in
    the share, the versions to record (a deletion for what was created since)."""

    top: str
    summary: str  # what it restores, for the message
    entries: list[Entry] = field(default_factory=list)
    writes: list[tuple[str, Version]] = field(default_factory=list)


def plan_restore(
    share: Share,
    path: str,
    version_id: str | None = None,
    at_ms: int | None = None,
    dest: str | None = None,
) -> RestorePlan:
    """The new versions that bring ``path`` back: the version ``version_id`` of a file,
    or (``at_ms``) the file or the whole folder as it was then — a folder's entries
    created since are deleted, so the restore itself can be undone. ``dest``: a path
    inside the share to restore to instead of ``path`` itself.

    Scan the paths concerned first: a restore supersedes what the disk holds."""
    catalog = share.catalog
    if (version_id is None) == (at_ms is None):
        raise BackerError("give either --version or --at")
    target = path if dest is None else dest
    if version_id is not None:
        entry = next((e for e in catalog.history(path) if e.version_id == version_id), None)
        if entry is None:
            raise BackerError(f"no version {version_id} of {path!r} (see 'backer history')")
        if entry.version.kind == Kind.DELETED:
            raise BackerError(f"version {version_id} of {path!r} is its deletion")
        then = {path: Entry(path, version_id, entry.version)}
        summary = f"{path} to version {version_id} of {timestamp(entry.version.time_ms)}"
    else:
        assert at_ms is not None
        then = state_at(catalog, path, check_moment(share, at_ms))
        if path and path not in then:
            raise BackerError(f"{path!r} did not exist at {timestamp(at_ms)}")
        summary = f"{path or 'the share'} as it was at {timestamp(at_ms)}"
    live: dict[str, dict[str, Version]] = {}
    for live_path, vid, version in catalog.live_under(target):  # (below it)
        live.setdefault(live_path, {})[vid] = version
    live.update(
        catalog.live_for([target, *(p for p in _moved(then, path, target) if p not in live)])
    )
    now = current(live)
    plan = RestorePlan(path, summary, list(then.values()))
    for old_path, entry in then.items():
        new_path = _moved_path(old_path, path, target)
        held = now.get(new_path)
        if held is not None and held.version.same_content(entry.version):
            continue
        holding = tuple(sorted(live.get(new_path, {})))
        plan.writes.append((new_path, _mine(share, entry.version, holding)))
    if at_ms is not None:
        wanted = set(_moved(then, path, target))
        for new_path in sorted(now):
            if new_path not in wanted:
                holding = tuple(sorted(live.get(new_path, {})))
                plan.writes.append((new_path, _deletion(share, holding)))
    return plan


def _moved_path(old: str, top: str, target: str) -> str:
    return target + old[len(top) :] if top else (f"{target}/{old}" if target else old)


def _moved(then: dict[str, Entry], top: str, target: str) -> list[str]:
    return [_moved_path(p, top, target) for p in then]


def _mine(share: Share, old: Version, supersedes: tuple[str, ...]) -> Version:
    """``old``'s content as a new version written by this device now."""
    return dataclasses.replace(
        old, device=share.device[:8], time_ms=share.now_ms(), supersedes=supersedes
    )


def _deletion(share: Share, supersedes: tuple[str, ...]) -> Version:
    return Version(
        Kind.DELETED, device=share.device[:8], time_ms=share.now_ms(), supersedes=supersedes
    )


def missing_chunks(
    catalog: Catalog, store: ChunkStore, versions: Iterable[Version]
) -> dict[bytes, int]:
    """The chunks of ``versions``' files that no file on this device holds (hash ->
    length): empty when their bytes are all here. The one place that answers it."""
    missing: dict[bytes, int] = {}
    seen: set[bytes] = set()
    for version in versions:
        if version.kind != Kind.FILE:
            continue
        manifest = catalog.manifest(version.content)
        if manifest is None:
            raise BackerError(
                f"the chunk list of content {version.content.hex()[:16]} is not on this device"
            )
        for ref in data_chunks(manifest):
            if ref.hash in seen:
                continue
            seen.add(ref.hash)
            if store.read(ref.hash) is None:
                missing[ref.hash] = ref.length
    return missing


def apply(
    share: Share, writes: list[tuple[str, Version]], store: ChunkStore | None = None
) -> Report:
    """Record ``writes`` as new versions (one event per batch) and write them here the
    way a received version is written (every replaced content kept). A version whose
    content the disk already holds only takes over the scan-cache entry."""
    if share.own_events_missing:
        raise BackerError(share.behind_itself)
    if not writes:
        return Report()
    store = store or ChunkStore(share.root, share.catalog)
    if missing_chunks(share.catalog, store, [v for _, v in writes]):
        raise BackerError("the bytes to restore are not all on this device")
    wanted = dict(writes)
    operations = []

    def settle(assigned: dict[str, str]) -> None:
        """Within each event's transaction (see :meth:`Share.commit`): a version whose
        content the disk holds takes over its scan-cache entry there."""
        local = share.catalog.local_entries(list(assigned))
        live = share.catalog.live_for(list(assigned))
        adopted = []
        for path, version_id in assigned.items():
            version, cached = wanted[path], local.get(path)
            held = share.catalog.version(cached.version_id) if cached is not None else None
            if cached is not None and version.same_content(held):
                adopted.append(cached._replace(version_id=version_id))
                continue
            if version.kind == Kind.DELETED and cached is None:
                continue
            if cached is not None and cached.version_id in live.get(path, {}):
                continue  # the disk holds a concurrent version this one does not replace:
                # it stays, and the next plan resolves the two like any concurrent writes
            on_disk = cached.version_id if cached is not None else ""
            operations.append(Operation(path, version_id, version, on_disk))
        share.catalog.set_local(adopted)

    share.commit(writes, settle)
    operations.sort(key=lambda op: (op.version.kind == Kind.DELETED, op.path))
    gone = [op for op in operations if op.version.kind == Kind.DELETED]
    ordered = operations[: len(operations) - len(gone)] + gone[::-1]  # (deepest first)
    return _materialize(share, ordered, store)


def _materialize(share: Share, operations: list[Operation], store: ChunkStore) -> Report:
    """Write ``operations`` (writes in path order, then deletions deepest first) the way
    a received version is written, and keep the outcome's problems."""
    report = Materializer(share.root, share.catalog, store).start(operations).finish()
    share.db.conn.commit()
    share.note_applied(report)
    return report


def finish_recorded(share: Share, excluded: Callable[[str, bool], bool] | None = None) -> Report:
    """Write what this device recorded as its own new versions but the disk does not hold
    yet: a restore or a resolution records its versions before writing them, so a crash
    in between leaves them live in the journal (peers apply them) and absent here, and
    nothing else would write them (no peer sends a device its own versions, and a scan
    only compares the disk with what it last saw). Run at start, before anything else
    writes the share; versions whose bytes are not all here are left to the replicator,
    which fetches them from peers."""
    if share.own_events_missing:
        return Report()
    mine = share.device[:8]
    store = ChunkStore(share.root, share.catalog)
    operations = []
    with disk_plan(share.catalog, share.root, excluded) as planned:
        for op in planned:
            if op.version.device != mine:
                continue
            if op.version.kind == Kind.FILE and (
                share.catalog.manifest(op.version.content) is None
                or missing_chunks(share.catalog, store, [op.version])
            ):
                continue
            operations.append(op)
    if not operations:
        return Report()
    report = _materialize(share, operations, store)
    share.sweep_resumable()
    return report


def carry_out(share: Share, plan: RestorePlan, store: ChunkStore, outside: Path | None) -> str:
    """Do a restore whose bytes ``store`` holds: record and write ``plan.writes`` in the
    share, or write its entries to ``outside`` (a place outside the share the person
    named). Returns the one line that says what was done; per-file problems are the
    share's (``share.problems``)."""
    if outside is not None:
        written = export(share, plan, outside, store)
        return f"wrote {len(written)} entries of {plan.summary} to {outside}"
    if not plan.writes:
        return f"nothing to restore: {plan.top or 'the share'} already holds that"
    report = apply(share, plan.writes, store)
    if report.kept_local_edits:
        edited = ", ".join(report.kept_local_edits[:3])
        raise BackerError(f"{edited} changed while being restored; that change was kept")
    if report.errors and not (report.written or report.deleted):  # (e.g. a folder now
        problem = report.errors[0]  # stands where a file is restored): nothing happened
        raise BackerError(f"{problem.path}: not restored: {problem.reason}")
    deleted = sum(v.kind == Kind.DELETED for _, v in plan.writes)
    counts = f" ({len(plan.writes) - deleted} written, {deleted} deleted)" if deleted else ""
    return f"restored {plan.summary}{counts}"


def export(share: Share, plan: RestorePlan, dest: Path, store: ChunkStore) -> list[Path]:
    """Write the plan's entries under ``dest``, outside the share: files from verified
    chunks into a temp file, verified, made durable, then linked into place (nothing
    there is ever replaced); links as links. Returns what was written."""
    top, written = plan.top, []
    if dest.is_dir():  # into it, as cp does
        dest = dest / (top.rpartition("/")[2] or share.root.name)
    folders = {""}  # relative paths of the real directories written into (never a link)
    dest.parent.mkdir(parents=True, exist_ok=True)  # as mkdir -p
    if not any(entry.path == top for entry in plan.entries):  # a folder: make its top
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise BackerError(f"{dest} already exists and is not a directory")
        dest.mkdir(mode=0o755, parents=True, exist_ok=True)
    for entry in plan.entries:
        relative = entry.path[len(top) :].lstrip("/") if top else entry.path
        if relative.rpartition("/")[0] not in folders:
            continue  # below something that is not a directory written here: never followed
        target = dest / relative if relative else dest
        if os.path.lexists(target):
            if entry.version.kind == Kind.DIRECTORY and target.is_dir() and not target.is_symlink():
                folders.add(relative)
                continue
            raise BackerError(f"{target} already exists; nothing there is replaced")
        if entry.version.kind == Kind.DIRECTORY:
            target.mkdir(mode=entry.version.permissions or 0o755)
            folders.add(relative)
        elif entry.version.kind == Kind.SYMLINK:
            os.symlink(entry.version.link_target, target)
        else:
            _write_file(share, entry.version, target, store)
        written.append(target)
    return written


def _write_file(share: Share, version: Version, target: Path, store: ChunkStore) -> None:
    manifest = share.catalog.manifest(version.content)
    if manifest is None:
        raise BackerError(f"the chunk list of {target.name} is not on this device")
    temp = target.with_name(f".{target.name}.backer-{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.ftruncate(fd, version.size)
            for ref in data_chunks(manifest):
                data = store.read(ref.hash)
                if data is None:
                    raise BackerError(f"a chunk of {target.name} is not on this device")
                view = memoryview(data)
                offset = ref.offset
                while view:
                    done = os.pwrite(fd, view, offset)
                    view, offset = view[done:], offset + done
            os.fsync(fd)
        finally:
            os.close(fd)
        seal(temp, manifest, version)
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:  # never replaces what is there (EEXIST), with or without hard links
            rename_new_at(directory, temp.name, directory, target.name, str(target))
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        temp.unlink(missing_ok=True)


def outside_target(share: Share, dest: str) -> Path | None:
    """``dest`` as a place outside the share (None if it is inside: a share path);
    refused if a link on its way leads back into the share."""
    absolute = Path(os.path.abspath(dest))
    try:
        absolute.relative_to(share.root)
    except ValueError:
        existing = absolute
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            Path(os.path.realpath(existing)).relative_to(os.path.realpath(share.root))
        except ValueError:
            return absolute
        raise BackerError(f"{dest} leads into the share through a link") from None
    return None


def inside_target(share: Share, dest: str) -> str:
    """``dest`` (inside the share) as a share path, refused if it is in ``.backer`` or
    if anything above it is not a real directory (a link in the share is never
    followed: the restore would be recorded where no device can write it)."""
    relative = Path(os.path.abspath(dest)).relative_to(share.root).as_posix()
    try:
        path = check(relative) if relative != "." else ""
    except BadPath as exc:
        raise BackerError(f"{dest}: {exc}") from exc
    parts = path.split("/")
    for depth in range(1, len(parts)):
        parent = share.root.joinpath(*parts[:depth])
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            raise BackerError(f"{dest}: {parent} is not a directory (links are not followed)")
    return path


# -- bytes fetched from peers -------------------------------------------------------------


class Fetched(ChunkStore):
    """Chunks of old versions fetched from peers for a restore, kept in one private temp
    file under ``.backer/`` until the restore is written (then removed), read before
    the share's own files. The replicator fills it (:meth:`place`) and says which no
    connected peer had (:meth:`unavailable`)."""

    def __init__(self, share: Share, wanted: dict[bytes, int]) -> None:
        super().__init__(share.root, share.catalog)
        self.wanted = dict(wanted)  # still to arrive
        self.lacking: set[bytes] = set()
        self.offsets: dict[bytes, tuple[int, int]] = {}
        offset = 0
        for chunk_hash, length in wanted.items():
            self.offsets[chunk_hash] = (offset, length)
            offset += length
        metadata = share.root / METADATA_DIR
        for leftover in metadata.glob("fetched-*.tmp"):  # a crash's: we hold the share's lock
            leftover.unlink(missing_ok=True)
        self.path = metadata / f"fetched-{secrets.token_hex(8)}.tmp"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)

    @property
    def settled(self) -> bool:
        return not self.wanted

    def place(self, chunk_hash: bytes, data: bytes) -> None:
        """A verified chunk arrived."""
        if chunk_hash not in self.wanted:
            return
        offset, _ = self.offsets[chunk_hash]
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done
        del self.wanted[chunk_hash]

    def unavailable(self, chunk_hash: bytes) -> None:
        """No connected peer has this chunk."""
        if self.wanted.pop(chunk_hash, None) is not None:
            self.lacking.add(chunk_hash)

    def read(self, chunk_hash: bytes) -> bytes | None:
        place = self.offsets.get(chunk_hash)
        if place is not None and chunk_hash not in self.wanted:
            data = os.pread(self.fd, place[1], place[0])
            if blake3(data).digest() == chunk_hash:
                return data
        return super().read(chunk_hash)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


def unreachable(what: str) -> BackerError:
    """The one line said when no reachable device has the bytes of ``what``."""
    return BackerError(f"the bytes of {what} are on no reachable device")

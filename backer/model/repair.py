"""Bring a device whose ``.backer/`` is damaged or lost back into its share, in place.

The journal is the truth and every peer holds it, so nothing on this device's disk has
to move: a fresh, empty replica of the share is made beside the files (the damaged
database is kept aside, never deleted), a peer gives the whole journal back (nothing is
scanned or applied meanwhile), then every file whose content is a version of its path
is recognised as that version — without recording a new version or fetching a byte —
and one ordinary scan records what differs as local changes (conflicts where they are
concurrent). The device's own events that no peer holds are given up, as with
``backer scan --forget-lost-history``: the files they described are still on disk and
are scanned again. A repair never records a deletion: a file this device wrote and no
longer has comes back from the peers at the next sync.

Which share the folder was comes from an invite token, or from the device home (which
remembers each share's folder and key, see :mod:`backer.db.recovery`), or from whatever
is still readable in the damaged database.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import nacl.signing

from backer.db import recovery
from backer.errors import BackerError
from backer.fs.paths import METADATA_DIR
from backer.model import entropy
from backer.model.share import (
    DB_FILE,
    DamagedShare,
    ScanSummary,
    Share,
    find_root,
    same_entry,
    take_lock,
)
from backer.protocol.invite import InviteToken
from backer.scanner.walk import cache_entry, observe
from backer.versioner.store import Store

DB_SIDECARS = ("", "-wal", "-shm")  # sqlite's files of one database


@dataclass
class Target:
    """The share to repair: its folder, identity, and what the damaged copy told us."""

    root: Path
    share_id: bytes
    share_key: bytes  # empty with an invite: the peer sends it
    peers: list[str] = field(default_factory=list)  # addresses the damaged copy knew
    damaged_copy: Path | None = None
    founder: bytes = b""  # the founder's key, if the device home knows it


@dataclass
class Outcome:
    """What the repair found on disk once the journal was back."""

    recognised: int
    older: int  # of those, entries equal to an older version: the next sync updates them
    lost_events: int
    scan: ScanSummary


def _readable_meta(db: Path) -> dict[str, bytes]:
    """Whatever identity a damaged database still gives (best effort, read only)."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('share_id', 'share_key', 'peers')"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return {}
    return {key: value for key, value in rows if isinstance(value, bytes)}


def _is_healthy(root: Path, key: nacl.signing.SigningKey, home: Path) -> bool:
    try:
        Share.open(root, key, home=home).close()
    except DamagedShare:
        return False
    return True


def _move_aside(root: Path) -> Path:
    """Rename the database (and its journal files) to ``backer.db.damaged-TIME``."""
    stamp = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%dT%H%M%S")
    base = root / METADATA_DIR / DB_FILE
    aside = base.with_name(f"{DB_FILE}.damaged-{stamp}")
    with take_lock(root):  # no other backer process may be using it meanwhile
        for suffix in DB_SIDECARS:
            source = Path(f"{base}{suffix}")
            if source.exists():
                os.replace(source, f"{aside}{suffix}")
    return aside


def locate(
    start: Path, key: nacl.signing.SigningKey, home: Path, token: InviteToken | None
) -> Target:
    """Which share the folder ``start`` was, and where; a damaged database is moved
    aside. Raises if the share is healthy or cannot be identified."""
    root = find_root(start)
    damaged_copy = None
    meta: dict[str, bytes] = {}
    if root is not None:
        if _is_healthy(root, key, home):
            raise BackerError(
                f"the share at {root} is not damaged: nothing to repair "
                "('backer verify' re-checks its files)"
            )
        meta = _readable_meta(root / METADATA_DIR / DB_FILE)
        damaged_copy = _move_aside(root)
    else:
        root = next((c for c in (start, *start.parents) if (c / METADATA_DIR).is_dir()), None)
    known = recovery.share_at(home, root or start)
    root = root or (known.root if known else start)
    share_id = token.share_id if token else known.share_id if known else meta.get("share_id")
    if share_id is None:
        raise BackerError(
            f"cannot tell which share {root} was: give an invite from one of its devices "
            "('backer repair --token TOKEN')"
        )
    for other in (known.share_id if known else None, meta.get("share_id")):
        if other is not None and other != share_id:
            raise BackerError(f"the invite is for another share than the one at {root}")
    share_key = b"" if token else known.share_key if known else meta.get("share_key", b"")
    peers = [a for a in meta.get("peers", b"").decode(errors="replace").split("\n") if a]
    founder = known.founder if known else b""
    return Target(root, share_id, share_key, peers, damaged_copy, founder)


def begin(target: Target, key: nacl.signing.SigningKey, home: Path) -> Share:
    """A fresh, empty replica of the share in place, that scans and applies nothing
    until :func:`finish`: a peer is to give it the journal."""
    share = Share.create(
        target.root, key, joining=(target.share_id, target.share_key), home=home, repairing=True
    )
    share.repairing = True
    return share


def abandon(share: Share) -> None:
    """The journal could not be had: drop the fresh database (the folder is again a
    share without one, and ``repair`` can be run again)."""
    share.close()
    for suffix in DB_SIDECARS:
        Path(f"{share.root / METADATA_DIR / DB_FILE}{suffix}").unlink(missing_ok=True)


def finish(share: Share, peers: list[bytes | None], founder: bytes = b"") -> Outcome:
    """The journal is back: check that it is the share's (founded by ``founder``, when
    the device home knows it: a share's id is only a name its GENESIS event carries, and
    a device that knows the share key, removed since, could found a share of that id and
    admit us) and came from members (the peers could not be checked before: only members
    know the share key or an invite's, but a removed device may still know the key),
    give up own events no peer had, then recognise the disk."""
    if not share.members:
        raise BackerError("the peer did not give the share's history back")
    if founder and share.members.founder != founder:
        raise BackerError(
            "the peer gave back the history of another share under this share's id "
            "(founded by another device): refused"
        )
    if any(peer not in share.members for peer in peers):
        raise BackerError("a peer that is not a member of the share answered")
    lost = share.forget_lost_history() if share.own_events_missing else 0
    gone = [p for p in share.catalog.local_entries() if not os.path.lexists(share.root / p)]
    with share.db.conn:  # own versions no longer on disk: fetched again, never deleted
        share.catalog.drop_local(gone)
    older = _recognise(share)
    share.repairing = False
    summary = share.scan()
    recorded = len(summary.added) + len(summary.modified)
    recognised = len(share.catalog.local_entries()) - recorded
    return Outcome(recognised, older, lost, summary)


def _recognise(share: Share) -> int:
    """Take every entry on disk that equals a version of its path (kind, content, and
    permission bits where the disk keeps them) as that version: a live one, else the
    newest older one (the device was behind; the next sync updates it like any stale
    copy). Entries the recovered own versions already describe are left to the scan.
    Returns how many were older."""
    local = share.catalog.local_entries()
    found = observe(share.root, local, lambda entry: None)
    now_ns = entropy.now_ns()
    entries, manifests, older = [], [], 0
    for seen, manifest, content in found.changed:
        if seen.path in local:
            continue
        wanted = (seen.kind, content, seen.permissions)
        equal = [
            h
            for h in share.catalog.history(seen.path)
            if same_entry(h.version, wanted, found.permissions_kept)
        ]
        if not equal:
            continue
        chosen = max(equal, key=lambda h: (h.live, h.position))
        older += not chosen.live
        entries.append(cache_entry(seen.path, chosen.version_id, seen.stat_key, now_ns))
        if manifest is not None:
            manifests.append((seen.path, manifest))
    with share.db.conn:
        share.catalog.set_local(entries)
        share.catalog.put_manifests(manifests)
        Store(share.root, share.catalog).keep_entries(entries)  # by link: no second copy
    return older

"""The content store: file contents kept by their content id, once each.

``.backer/store/AB/ABCD…`` (the 64 hex digits of a version's content id, its BLAKE3
manifest id) is a hard link to the bytes of that content: kept for free while a file of
the share still holds them, and the only copy once that file is replaced or deleted.
Identical contents and renames are one entry; an entry is never a link and never
reached through one. Table ``store`` (content, size, since_ms) is the index; the
entry's chunks are registered in the catalog's chunk index once the share file they
were linked from goes away, so any later write finds them there.

A hard link shares the inode: an edit made *in place* (the same inode rewritten)
changes the kept bytes too. :meth:`Store.edited_in_place` drops such an entry when a
scan sees it, and :func:`held_bytes` verifies every byte it returns.

Where the filesystem has no hard links (exFAT, FAT, some FUSE and SMB mounts) the entry
is a copy, made durable before it is noted: without it every edit there lost the
version it replaced (see docs/decisions.md).

An entry is made under a spare name in ``.backer/store/spares/`` and renamed into its
fan directory; what a killed process left there (a whole file's copy, at most, per
kill) is removed when the share is next opened to be changed (:func:`remove_spares`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

from backer.db.catalog import EMPTY_MANIFEST, Catalog, LocalEntry
from backer.fs.dirs import NO_HARD_LINKS, InShare
from backer.fs.paths import METADATA_DIR
from backer.model.records import Kind
from backer.scanner.chunks import ChunkStore
from backer.scanner.content import manifest_of_bytes, manifest_of_file

STORE_DIR = "store"
SPARES = "spares"  # under STORE_DIR: entries being made (not a fan: those are 2 hex digits)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS store (content BLOB PRIMARY KEY, size INTEGER, "
    "since_ms INTEGER) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS pruned (vid TEXT PRIMARY KEY, ms INTEGER) WITHOUT ROWID",
    # contents to register (Store.register) that a crash may have left unregistered
    "CREATE TABLE IF NOT EXISTS unregistered (content BLOB PRIMARY KEY) WITHOUT ROWID",
)


def open_directory_at(parent: int, name: str) -> int:
    """The directory ``name`` under the descriptor ``parent``, made (0700) if missing;
    a link there is never followed (ELOOP or ENOTDIR)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        os.mkdir(name, 0o700, dir_fd=parent)
        return os.open(name, flags, dir_fd=parent)


class ShareFile(Protocol):
    """A share file as the store links it: by its parent's descriptor (InShare) or
    :class:`AtDirectory`."""

    def lstat(self) -> os.stat_result: ...

    def open(self, flags: int) -> int: ...

    def link_into(self, directory_fd: int, name: str) -> None: ...


class AtDirectory(NamedTuple):
    """A share file by its path relative to a descriptor of the share's root (or by its
    absolute path, ``directory`` None): one lookup from there, not from ``/``."""

    directory: int | None
    path: str

    def lstat(self) -> os.stat_result:
        return os.stat(self.path, dir_fd=self.directory, follow_symlinks=False)

    def open(self, flags: int) -> int:
        return os.open(self.path, flags | os.O_NOFOLLOW, dir_fd=self.directory)

    def link_into(self, directory_fd: int, name: str) -> None:
        os.link(
            self.path, name, src_dir_fd=self.directory, dst_dir_fd=directory_fd,
            follow_symlinks=False,
        )  # fmt: skip


class _FanRemoved(Exception):
    """The fan directory being linked into was removed (see Store._keep_in_fan)."""


def _fan(item: tuple[str, bytes, int, int]) -> str:
    """The fan directory of a (path, content, size, inode) to keep."""
    return item[1].hex()[:2]


def entry_name(content: bytes) -> str:
    """An entry's path below the share root (``.backer/store/AB/ABCD…``)."""
    name = content.hex()
    return f"{METADATA_DIR}/{STORE_DIR}/{name[:2]}/{name}"


class Store:
    """The kept contents of one share on this device."""

    def __init__(self, root: Path, catalog: Catalog) -> None:
        self.root = root
        self.catalog = catalog
        self.conn = catalog.conn
        for statement in _SCHEMA:
            self.conn.execute(statement)

    # -- what is held ---------------------------------------------------------------------

    def has(self, content: bytes) -> bool:
        """Whether the index holds ``content`` (its bytes are verified when read)."""
        row = self.conn.execute("SELECT 1 FROM store WHERE content = ?", (content,))
        return content == EMPTY_MANIFEST.id or row.fetchone() is not None

    def contents(self) -> dict[bytes, int]:
        """Every content held, with its size."""
        return dict(self.conn.execute("SELECT content, size FROM store"))

    def pruned(self, version_ids: Iterable[str]) -> dict[str, int]:
        """When this device dropped the bytes of each of ``version_ids`` that it did."""
        found = {}
        for vid in version_ids:
            row = self.conn.execute("SELECT ms FROM pruned WHERE vid = ?", (vid,)).fetchone()
            if row is not None:
                found[vid] = row[0]
        return found

    def note_pruned(self, version_ids: Iterable[str], now_ms: int) -> None:
        self.conn.executemany(
            "INSERT OR IGNORE INTO pruned (vid, ms) VALUES (?, ?)",
            [(vid, now_ms) for vid in version_ids],
        )

    # -- keeping --------------------------------------------------------------------------

    def keep(
        self,
        path: str,
        content: bytes,
        size: int,
        retiring: bool = False,
        source: InShare | None = None,
        inode: int | None = None,
    ) -> None:
        """Hold the bytes of the share file at ``path`` (recorded as ``content``) by a
        hard link. An entry that already holds them stays, unless only the store holds
        it while this file has the same bytes (checked by hashing it): then the entry
        becomes this file's inode (one copy on disk, not two). A file ``retiring`` (about
        to be replaced or deleted, as recorded) always becomes the entry: an entry that
        is another file's inode may have been rewritten in place since (:meth:`rejoin`
        gives the extra copy back once that file is checked). ``source``: the file,
        reached through its parent's descriptor (see backer.fs.dirs) rather than by
        name; ``inode``: the file recorded there (see :meth:`_link`). Raises OSError
        when the link cannot be made."""
        if content == EMPTY_MANIFEST.id:
            return
        file: ShareFile = source or AtDirectory(None, str(self.root / path))
        with self._directory(content.hex()[:2]) as fd:
            self._link(fd, path, content, file, retiring, inode)
        self._note([(content, size)])

    def _link(
        self,
        fd: int,
        path: str,
        content: bytes,
        source: ShareFile,
        retiring: bool = False,
        inode: int | None = None,
    ) -> None:
        """:meth:`keep`'s link, in the entry's fan directory ``fd``. The link is tried
        first: a first scan finds no entry for nearly every file, so the entry is only
        looked at when one is there. With ``inode`` (the file the scan hashed or the
        window wrote), only that file is linked: a path names another once the file was
        replaced since, or once a folder on the way was swapped for a link (a name is
        looked up through every folder but its last), and an entry holding another
        file's bytes, or a file outside the share, is no kept version (R38). (Checked
        on the lstat just before the link; a stat of every link made as well costs ~5 µs
        a file, 5 s of a million-file first scan, for a window of microseconds.)"""
        name = content.hex()
        live = source.lstat()
        if not stat.S_ISREG(live.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {path}")
        if inode is not None and live.st_ino != inode:
            raise OSError(errno.ESTALE, f"no longer the file recorded: {path}")
        try:
            source.link_into(fd, name)
            return
        except FileExistsError:
            held = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in NO_HARD_LINKS:
                raise
            with self._directory(SPARES) as spares:
                _copy_into(spares, fd, name, source, live, content)
            return
        if held.st_ino != live.st_ino and (
            retiring
            or (
                held.st_nlink == 1
                and manifest_of_file(self.root / path, live.st_size).id == content
            )
        ):
            with self._directory(SPARES) as spares:
                spare = _spare_name(name)
                try:
                    source.link_into(spares, spare)
                except OSError as exc:
                    if exc.errno not in NO_HARD_LINKS:
                        raise
                    # the entry is a copy (no share file can rewrite it); the file about
                    # to go must hold it too, or its bytes are the person's, not kept (R72)
                    if manifest_of_file(self.root / path, live.st_size).id != content:
                        raise OSError(
                            errno.ESTALE, "the file no longer holds the bytes recorded"
                        ) from None
                    return
                os.replace(spare, name, src_dir_fd=spares, dst_dir_fd=fd)

    def _note(self, kept: list[tuple[bytes, int]]) -> None:
        now_ms = time.time_ns() // 1_000_000  # (not entropy's: a note only)
        self.conn.executemany(
            "INSERT OR IGNORE INTO store (content, size, since_ms) VALUES (?, ?, ?)",
            [(content, size, now_ms) for content, size in kept],
        )

    def keep_files(self, files: Iterable[tuple[str, bytes, int, int]]) -> None:
        """:meth:`keep` each (path, content, size, inode) of files just recorded or
        written, as far as possible: a link that cannot be made costs a kept version, never a file.
        A first scan keeps 100,000s of files: each fan directory is opened once, every
        file is reached from one descriptor of the share's root, and the index gets one
        INSERT for them all."""
        wanted = sorted((f for f in files if f[1] != EMPTY_MANIFEST.id), key=_fan)
        kept: list[tuple[bytes, int]] = []
        with contextlib.suppress(OSError), self._share_root() as root:
            for fan, group in itertools.groupby(wanted, key=_fan):
                kept += self._keep_in_fan(root, fan, list(group))
        self._note(kept)

    def _keep_in_fan(
        self, root: int, fan: str, group: list[tuple[str, bytes, int, int]]
    ) -> list[tuple[bytes, int]]:
        """:meth:`keep_files` for the files whose entries go into ``fan``. A fan
        directory removed meanwhile (by a person cleaning up .backer) takes the links
        already made in it along: it is made again and the whole group linked into it
        again, once (linking a file that is there already changes nothing)."""
        kept: list[tuple[bytes, int]] = []
        for _ in range(2):
            kept = []
            try:
                with self._directory(fan) as fd:
                    for path, content, size, inode in group:
                        try:
                            source = AtDirectory(root, path)
                            self._link(fd, path, content, source, False, inode)
                        except OSError:
                            if os.fstat(fd).st_nlink == 0:
                                raise _FanRemoved from None
                            continue
                        kept.append((content, size))
                return kept
            except _FanRemoved:
                continue
            except OSError:
                break
        return kept

    def keep_entries(self, entries: Iterable[LocalEntry]) -> None:
        """:meth:`keep_files` for scan-cache entries (the file versions among them)."""
        files = []
        for entry in entries:
            version = self.catalog.version(entry.version_id)
            if version is not None and version.kind == Kind.FILE:
                files.append((entry.path, version.content, version.size, entry.inode))
        self.keep_files(files)

    def retire(self, path: str, content: bytes) -> None:
        """The share file at ``path`` (``content``) is about to go: its chunk locations
        move to the store's entry, where they can still be read."""
        if self.has(content) and content != EMPTY_MANIFEST.id:
            self.catalog.move_chunk_locations(path, entry_name(content))

    def register(self, content: bytes) -> None:
        """Note the chunks of a held content at its entry (its share file went away
        before :meth:`retire` could be told, e.g. a person's edit or deletion)."""
        manifest = self.catalog.manifest(content)
        if manifest is not None and self.has(content) and content != EMPTY_MANIFEST.id:
            self.catalog.put_manifests([(entry_name(content), manifest)])
        self.conn.execute("DELETE FROM unregistered WHERE content = ?", (content,))

    def to_register(self, contents: Iterable[bytes]) -> None:
        """Note, in the transaction that records their replacement, contents to
        :meth:`register` later: a crash before then leaves them to
        :meth:`register_left`. Unregistered, an entry's bytes are on disk and no read
        finds them (a restore says they are not on this device; R39)."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO unregistered (content) VALUES (?)", [(c,) for c in contents]
        )

    def register_left(self) -> None:
        """:meth:`register` what a process that died left noted by :meth:`to_register`."""
        for (content,) in self.conn.execute("SELECT content FROM unregistered").fetchall():
            self.register(content)

    def rejoin(self, content: bytes) -> None:
        """After a share file holding ``content`` went away: if only the store holds the
        entry now while another share file recorded here has the same bytes (a rename,
        a copy), the entry becomes that file's inode: one copy on disk, not two."""
        manifest = self.catalog.manifest(content)
        if manifest is None or not manifest.chunks or not self.has(content):
            return
        try:
            if os.lstat(self.root / entry_name(content)).st_nlink != 1:
                return
        except OSError:
            return
        paths = [p for p, _, _ in self.catalog.chunk_locations(manifest.chunks[0].hash)]
        recorded = self.catalog.local_entries(p for p in paths if not p.startswith(METADATA_DIR))
        for entry in recorded.values():
            version = self.catalog.version(entry.version_id)
            if version is not None and version.content == content:
                with contextlib.suppress(OSError):
                    self.keep(entry.path, content, version.size, inode=entry.inode)
                    return

    def holds_apart(self, content: bytes, inode: int) -> bool:
        """Whether an entry holds ``content`` in an inode other than ``inode`` (a share
        file's, which an edit in place would rewrite)."""
        if not self.has(content):
            return False
        try:  # (a look, as freed_by_removing's: no fan directory made for it)
            return os.lstat(self.root / entry_name(content)).st_ino != inode
        except OSError:
            return False

    def edited_in_place(self, content: bytes, inode: int) -> None:
        """A share file of inode ``inode`` that held ``content`` was rewritten in place:
        if the entry is that inode, its bytes are gone, so the entry goes."""
        with contextlib.suppress(OSError), self._directory(content.hex()[:2]) as fd:
            if os.stat(content.hex(), dir_fd=fd, follow_symlinks=False).st_ino == inode:
                self.remove(content)

    # -- dropping -------------------------------------------------------------------------

    def freed_by_removing(self, content: bytes) -> int:
        """Bytes of disk that removing ``content``'s entry would free (none while a
        share file shares its inode)."""
        try:
            info = os.lstat(self.root / entry_name(content))
        except OSError:
            return 0
        return info.st_blocks * 512 if info.st_nlink == 1 else 0

    def remove(self, content: bytes) -> None:
        """Drop an entry: its file, its index row and its chunk locations."""
        name = content.hex()
        with contextlib.suppress(FileNotFoundError), self._directory(name[:2]) as fd:
            os.unlink(name, dir_fd=fd)
        self.conn.execute("DELETE FROM store WHERE content = ?", (content,))
        self.conn.execute("DELETE FROM chunks WHERE path = ?", (entry_name(content),))
        self.conn.execute("DELETE FROM unregistered WHERE content = ?", (content,))

    # -- reading --------------------------------------------------------------------------

    def get(self, content: bytes) -> bytes | None:
        """The verified bytes of ``content`` from its entry (None if not held or no
        longer those bytes)."""
        if content == EMPTY_MANIFEST.id:
            return b""
        if not self.has(content):
            return None
        name = content.hex()
        try:
            with self._directory(name[:2]) as fd:
                handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
                with os.fdopen(handle, "rb") as file:
                    data = file.read()
        except OSError:
            return None
        return data if manifest_of_bytes(data).id == content else None

    @contextlib.contextmanager
    def _share_root(self) -> Iterator[int]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _directory(self, fan: str) -> Iterator[int]:
        """A descriptor on ``.backer/store/FAN`` (or SPARES; made as needed), never
        through a link."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in (METADATA_DIR, STORE_DIR, fan):
                child = open_directory_at(fd, part)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)


def _spare_name(name: str) -> str:
    return f"{name}.{secrets.token_hex(4)}.tmp"


def remove_spares(root: Path) -> None:
    """Remove what a killed process left in ``.backer/store/spares/`` (the share at
    ``root``): entries it was making, a whole file's copy each where the filesystem has
    no hard links, which nothing else would ever remove. Only for the holder of the
    share's lock, before it keeps anything: every spare there is then a dead one's.
    Nothing is made here (a killed ``init``'s ``.backer`` must stay as it left it)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        for part in (METADATA_DIR, STORE_DIR, SPARES):  # (never through a link)
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        for left in os.listdir(fd):
            with contextlib.suppress(OSError):
                os.unlink(left, dir_fd=fd)
    except OSError:
        return  # (none yet, most often)
    finally:
        os.close(fd)


def _copy_into(
    spares: int,
    directory_fd: int,
    name: str,
    source: ShareFile,
    looked: os.stat_result,
    content: bytes,
) -> None:
    """Make entry ``name`` (in ``directory_fd``) a copy of ``source`` (the file
    ``looked`` at, recorded as ``content``), on a filesystem without hard links: written
    under a spare name in ``spares``, fsync'd (once its share file is replaced, it is
    the only copy), checked, then renamed in. A file that changed while it was copied
    (size, time or inode not those looked at), or whose bytes are not ``content``
    (rewritten in place since it was recorded: a copy, unlike a link, would keep the
    wrong bytes under the entry's name for good), leaves no entry: OSError."""
    spare = _spare_name(name)
    reading = source.open(os.O_RDONLY | os.O_NONBLOCK)  # (a fifo put there: not waited on)
    try:
        writing = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=spares)
        try:
            if _stamp(os.fstat(reading)) != _stamp(looked):
                raise OSError(errno.ESTALE, "the file changed before it was kept")
            copied = _copy_bytes(reading, writing, looked.st_size)
            if copied != looked.st_size or _stamp(os.fstat(reading)) != _stamp(looked):
                raise OSError(errno.ESTALE, "the file changed while it was kept")
            os.fsync(writing)
        finally:
            os.close(writing)
        if manifest_of_file(spare, copied, spares).id != content:
            raise OSError(errno.ESTALE, "the file no longer holds the bytes recorded")
        os.replace(spare, name, src_dir_fd=spares, dst_dir_fd=directory_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spare, dir_fd=spares)
        raise
    finally:
        os.close(reading)


def _copy_bytes(reading: int, writing: int, size: int) -> int:
    """Copy up to ``size`` bytes in the kernel (``copy_file_range``), or through a
    buffer where the filesystem cannot; the bytes copied."""
    done = 0
    try:
        while done < size and (step := os.copy_file_range(reading, writing, size - done)):
            done += step
        return done
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while done < size and (block := os.pread(reading, min(size - done, 1 << 20), done)):
        done += os.pwrite(writing, block, done)
    return done


def _stamp(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_ino, info.st_size, info.st_mtime_ns


def held_bytes(root: Path, catalog: Catalog, content: bytes) -> bytes | None:
    """The bytes of content id ``content`` if this device still holds them — in the
    store, or chunk by chunk in any file of the share — every byte verified; None if
    not (then a peer must provide them)."""
    kept = Store(root, catalog).get(content)
    if kept is not None:
        return kept
    manifest = catalog.manifest(content)
    if manifest is None:
        return None
    chunks, parts = ChunkStore(root, catalog), []
    for ref in manifest.chunks:
        data = chunks.read(ref.hash)
        if data is None or len(data) != ref.length:
            return None
        parts.append(data)
    return b"".join(parts)

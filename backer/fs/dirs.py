"""Writing into a share without ever following a link on the way.

Checking that every parent of a path is a real directory and then writing by that path
leaves a window: a parent swapped for a link in between (a person moving a folder away
and linking it back, any program with write access to the share) sends the write
wherever the link points, outside the share. So the materializer makes every change
relative to a descriptor of the entry's parent directory, opened one component at a
time from the share's root with ``O_NOFOLLOW``: the change lands in that very
directory, whatever happens to the path meanwhile (:class:`InShare`).

The descriptors of one window are kept in :class:`Directories` (a few dozen at most,
least recently used closed first) and closed when the window ends. Each folder is opened
from the nearest one held, above it or below it (``..``, taken only if it leads to the
very folder found at that path before): a window works down a tree for its writes and
up it for its deletions (deepest first), and either way a deep tree costs a few opens
per folder, not one per folder and level.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from backer.fs.mounts import ShareDisk, share_disk
from backer.fs.paths import fitted_name, stem_and_extension
from backer.fs.placeholders import noted

OPEN_DIRECTORIES = 64
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2's flags (linux/fs.h)
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # (glibc 2.28+)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # a flag the filesystem lacks
NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

Identity = tuple[int, int]  # a directory's (st_dev, st_ino): which folder it is, wherever
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | os.PathLike[str], directory: int | None = None) -> int:
    """A descriptor of the regular file at ``path`` to read, never a link's target and
    never a wait: a share file looked at a moment ago may be a fifo or a link by now
    (anyone writing in the share can swap it), whose open blocked until a writer came,
    or, through a link to ``/dev/zero``, read without end. Anything but a regular
    file is OSError."""
    fd = os.open(path, READ_FLAGS, dir_fd=directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def identity(fd: int) -> Identity:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


class NotADirectory(OSError):
    """A component of the path is a link or not a directory: nothing is written there."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ENOTDIR, "not a directory (or a link to one)", path)


class MountedHere(OSError):
    """A folder on the way is another filesystem mounted inside the share (a USB disk, a
    bind): nothing is written below it. The scan does not follow a mount point, so what
    a window put there would be recorded, and once the disk was unmounted the next scan
    would record it deleted, on every device (docs/security.md, R57)."""

    def __init__(self, mount_point: str) -> None:
        super().__init__(
            errno.EXDEV, f"not written: another filesystem is mounted at {mount_point}"
        )



def open_directory(
    root: Path,
    relative: str,
    make: Callable[[str], bool] | None = None,
    start: tuple[str, int] | None = None,
    found: dict[str, Identity] | None = None,
    disk: ShareDisk | None = None,
) -> int:
    """A descriptor of the directory ``relative`` ('' for ``root``), reached from
    ``root`` one component at a time, never through a link; or, with ``start`` (an
    ancestor's relative path and a descriptor of it, left open), from that ancestor. A
    missing component is made when ``make(its relative path)`` says so (else
    FileNotFoundError). ``found`` gets the identity of each folder the walk reached.
    With ``disk`` (the share's filesystem and mount points), a folder on another one, or
    a bind, is :class:`MountedHere`, before anything is made in it."""
    if start is None:
        fd = os.open(os.path.join(root, ""), DIRECTORY_FLAGS & ~os.O_NOFOLLOW)
        done = []
        rest = relative
        if found is not None:
            found[""] = identity(fd)
    else:
        fd = os.dup(start[1])
        done = [start[0]] if start[0] else []
        rest = relative[len(start[0]) :].lstrip("/")
    try:
        for part in rest.split("/") if rest else ():
            done.append(part)
            try:
                child = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if make is None or not make("/".join(done)):
                    raise
                os.mkdir(part, dir_fd=fd)
                child = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NotADirectory("/".join(done)) from exc
                raise
            os.close(fd)
            fd = child
            if found is not None or disk is not None:
                info = os.fstat(fd)
                reached = info.st_dev, info.st_ino
                if disk is not None and disk.crosses("/".join(done), info, fd):
                    raise MountedHere("/".join(done))
                if found is not None:
                    found["/".join(done)] = reached
    except BaseException:
        os.close(fd)
        raise
    return fd


def _depth(relative: str) -> int:
    """Levels below the share's root: 0 for the root itself."""
    return relative.count("/") + 1 if relative else 0


def _under(path: str, folder: str) -> bool:
    """Whether ``path`` is strictly below ``folder`` ('' for the root)."""
    if not folder:
        return bool(path)
    size = len(folder)
    return len(path) > size and path[size] == "/" and path.startswith(folder)


def _ancestors(relative: str) -> Iterator[str]:
    """The strict ancestors of ``relative``, nearest first, the root ('') last."""
    while relative:
        relative = relative.rpartition("/")[0]
        yield relative


class Directories:
    """Open descriptors of a share's directories, by relative path (thread-safe: the
    writer and checker threads use them too). A descriptor stays the directory it was
    opened on: after removing a directory, :meth:`forget` it (and what is under it)."""

    def __init__(self, root: Path, limit: int | None = None) -> None:
        self.root = root
        self.limit = OPEN_DIRECTORIES if limit is None else limit  # (read when made)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._using: dict[str, int] = {}  # descriptors lent out: never closed meanwhile
        self._found: dict[str, Identity] = {}  # the folder each walk found at each path
        self._lock = threading.Lock()
        self._disk: ShareDisk | None = None  # the share's filesystem: never left

    def open(
        self,
        relative: str,
        make: Callable[[str], bool] | None = None,
        lend: _Lent | None = None,
    ) -> None:
        """Open ``relative`` unless it is open already: from the nearest folder open here,
        above it (see :func:`open_directory`) or below it (``..`` a level at a time, kept
        only if that reaches the very folder a walk found at ``relative`` before), so a
        deep tree costs one open per folder, not one per folder and level, whether the
        window goes down it (writes) or up it (deletions, deepest first). Neither is
        looser than holding ``relative`` itself since then: :meth:`moved` checks.
        ``lend``: lent to it in the same pass through the lock that finds or adds it —
        between two passes, other threads' opens could evict it (a join's writer
        threads failed with a KeyError of a folder's name)."""
        with self._lock:
            if relative in self._fds:
                self._fds.move_to_end(relative)
                if lend is not None:
                    lend.take()
                return
            above, below, levels = self._nearest(relative)
        fd = None if below is None else self._climb(relative, below, levels)
        if fd is None:
            found: dict[str, Identity] = {}
            if self._disk is None:
                self._disk = share_disk(self.root)
            if above is None:
                fd = open_directory(self.root, relative, make, None, found, self._disk)
            else:
                with self.at(above) as start:
                    start_at = (above, start)
                    fd = open_directory(self.root, relative, make, start_at, found, self._disk)
            with self._lock:
                self._found.update(found)
        with self._lock:
            if relative in self._fds:  # opened meanwhile by another thread
                os.close(fd)
                self._fds.move_to_end(relative)
            else:
                self._fds[relative] = fd
            if lend is not None:
                lend.take()  # (before the eviction: what is lent is never closed)
            self._evict()

    def refuse_mount_point(self, relative: str, info: os.stat_result) -> None:
        """:class:`MountedHere` if the entry at ``relative`` (``info``: its lstat) is a
        mount point: a folder's mode and times are the mounted disk's, not the share's,
        and a bound file's bytes are outside the share; neither is the share's to
        replace or remove (the scan does not record them either)."""
        if self._disk is None:
            self._disk = share_disk(self.root)
        if self._disk.crosses(relative, info, os.path.join(self.root, relative)):
            raise MountedHere(relative)

    def _nearest(self, relative: str) -> tuple[str | None, str | None, int]:
        """(lock held) The nearest folders open here above ``relative`` and below it,
        one look at each (a deep path has more ancestors than there are descriptors
        here). The one below (and how many levels below) only if a climb from it is
        shorter than the walk down, and a walk found ``relative`` before (a climb is
        checked against what it found)."""
        parent = relative.rpartition("/")[0]
        if relative and parent in self._fds:  # (the common case: no closer folder)
            return parent, None, 0
        above = below = None
        known = relative in self._found
        for path in self._fds:
            if _under(relative, path):
                if above is None or len(path) > len(above):
                    above = path
            elif known and _under(path, relative) and (below is None or len(path) < len(below)):
                below = path
        if below is None:
            return above, None, 0
        depth = _depth(relative)
        levels_down = depth + 1 if above is None else depth - _depth(above)  # (root: opened)
        levels_up = _depth(below) - depth
        return (above, None, 0) if levels_up >= levels_down else (above, below, levels_up)

    def _climb(self, relative: str, below: str, levels: int) -> int | None:
        """A descriptor of ``relative`` reached from the folder open as ``below``,
        ``levels`` under it, by ``..``; None if it is not the folder found at
        ``relative`` before (it moved, or ``below`` did: a walk down decides then)."""
        try:
            with self.at(below) as start:
                fd = os.open("..", DIRECTORY_FLAGS, dir_fd=start)
            try:
                for _ in range(levels - 1):
                    parent = os.open("..", DIRECTORY_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = parent
                reached = identity(fd)
            except BaseException:
                os.close(fd)
                raise
        except OSError:
            return None
        with self._lock:
            wanted = self._found.get(relative)
        if reached != wanted:
            os.close(fd)
            return None
        return fd

    def at(self, relative: str) -> _Lent:
        """The descriptor of directory ``relative``, opened if need be, for the block."""
        return _Lent(self, relative)

    def moved(self, relative: str, settled: dict[str, Identity] | None = None) -> bool:
        """Whether the directory open as ``relative`` is no longer the one that path
        reaches (renamed, removed, or a link put in its place since it was opened).
        ``settled``: the folders this check's caller found at their paths a moment ago,
        by identity: ``relative`` among them is compared with that, no walk; else the
        walk starts at the nearest of them above it (if the folder open here as that one
        is still it) instead of the root, and every folder it reaches is settled too —
        going up a deep tree, deepest first, then costs no walk per folder."""
        found: dict[str, Identity] = {}
        try:
            with self.at(relative) as fd:
                held = identity(fd)
            if settled is not None and relative in settled:
                return settled[relative] != held
            fresh = self._walk(relative, settled or {}, found)
        except (FileNotFoundError, NotADirectory):
            return True
        try:
            now = identity(fresh)
        finally:
            os.close(fresh)
        if settled is not None:
            settled.update(found)
        with self._lock:
            self._found.update(found)
        return now != held

    def at_its_path(self, relative: str) -> bool:
        """Whether the folder open as ``relative`` is the one its path names now, by one
        stat of the whole path (the kernel's walk: no descriptor per level). What
        :meth:`moved` trusts within a batch — a folder found in place a moment ago —
        this sees renamed since; a link put in place of a folder on the way it
        follows (the walks of :meth:`moved` are what refuse those)."""
        try:
            with self.at(relative) as fd:
                held = identity(fd)
            now = os.stat(os.path.join(self.root, relative), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return (now.st_dev, now.st_ino) == held

    def _walk(self, relative: str, settled: dict[str, Identity], found: dict[str, Identity]) -> int:
        """A fresh descriptor of ``relative``: from the nearest ``settled`` folder above
        it that is open here as itself, else from the root."""
        near = next((a for a in _ancestors(relative) if a and a in settled), None)
        if near is not None:
            with self.at(near) as start:
                if identity(start) == settled[near]:
                    return open_directory(self.root, relative, start=(near, start), found=found)
        return open_directory(self.root, relative, found=found)

    def forget(self, relative: str) -> None:
        """Drop the descriptors of ``relative`` and of every directory under it (it
        was removed, or replaced)."""
        prefix = relative + "/"
        with self._lock:
            self._found.pop(relative, None)
            for path in [p for p in self._fds if p == relative or p.startswith(prefix)]:
                fd = self._fds.pop(path)
                if path not in self._using:
                    os.close(fd)

    def close(self) -> None:
        with self._lock:
            for path, fd in self._fds.items():
                if path not in self._using:
                    os.close(fd)
            self._fds.clear()
            self._found.clear()
            self._disk = None  # (read again by the next window: disks come and go)

    def _evict(self) -> None:
        """(lock held) Close the least recently used descriptors beyond the limit (the
        common case, none, costs one comparison: this runs after every change made)."""
        if len(self._fds) <= self.limit:
            return
        for path in list(self._fds):
            if len(self._fds) <= self.limit:
                return
            if path not in self._using:
                os.close(self._fds.pop(path))


class _Lent:
    """:meth:`Directories.at`'s block (a class, not a generator: a first sync enters a
    dozen of them per file, and the generator's machinery cost more than the calls)."""

    __slots__ = ("dirs", "fd", "relative")

    def __init__(self, dirs: Directories, relative: str) -> None:
        self.dirs = dirs
        self.relative = relative
        self.fd = -1

    def __enter__(self) -> int:
        self.dirs.open(self.relative, lend=self)  # (open already: one pass through the lock)
        return self.fd

    def take(self) -> None:
        """(lock held, the folder open) Take its descriptor, counted as lent until
        :meth:`__exit__`."""
        dirs, relative = self.dirs, self.relative
        self.fd = dirs._fds[relative]
        dirs._using[relative] = dirs._using.get(relative, 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        dirs, relative = self.dirs, self.relative
        with dirs._lock:
            using = dirs._using[relative] - 1
            if using:
                dirs._using[relative] = using
                return
            del dirs._using[relative]
            if dirs._fds.get(relative) != self.fd:
                os.close(self.fd)  # forgotten while lent
            if len(dirs._fds) > dirs.limit:
                dirs._evict()


@dataclass(frozen=True)
class InShare:
    """An entry of the share, every change to it made relative to its parent's
    descriptor (see the module's docstring)."""

    dirs: Directories
    parent: str  # relative to the share's root, '' for the root itself
    name: str

    @classmethod
    def of(cls, dirs: Directories, path: str) -> InShare:
        parent, _, name = path.rpartition("/")
        return cls(dirs, parent, name)

    @property
    def path(self) -> Path:
        """Where it is by name (for messages and reports, never for a change)."""
        return self.dirs.root / self.parent / self.name

    @property
    def relative(self) -> str:
        return f"{self.parent}/{self.name}" if self.parent else self.name

    def with_name(self, name: str) -> InShare:
        return InShare(self.dirs, self.parent, name)

    def lstat(self) -> os.stat_result:
        with self.dirs.at(self.parent) as fd:
            return os.stat(self.name, dir_fd=fd, follow_symlinks=False)

    def open(self, flags: int, mode: int = 0o777) -> int:
        """``os.open`` of the entry itself, never of a link's target."""
        with self.dirs.at(self.parent) as fd:
            return os.open(self.name, flags | os.O_NOFOLLOW, mode, dir_fd=fd)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            with self.dirs.at(self.parent) as fd:
                os.unlink(self.name, dir_fd=fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def remove(self) -> None:
        """Remove this entry (a temp file given up) from the directory its parent's
        descriptor holds and, if that folder is no longer at its path (moved, or removed
        and made again since the window opened it), from the one the path reaches now:
        a temp made in either must not stay behind."""
        with contextlib.suppress(NotADirectory):
            self.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError, NotADirectory):
            fresh = open_directory(self.dirs.root, self.parent)  # (not the window's)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.name, dir_fd=fresh)
            finally:
                os.close(fresh)

    def rmdir(self) -> None:
        with self.dirs.at(self.parent) as fd:
            os.rmdir(self.name, dir_fd=fd)
        self.dirs.forget(self.relative)

    def mkdir(self) -> None:
        with self.dirs.at(self.parent) as fd:
            os.mkdir(self.name, dir_fd=fd)

    def symlink(self, link_target: str) -> None:
        """Make the entry a link to ``link_target`` (which is never followed here)."""
        with self.dirs.at(self.parent) as fd:
            os.symlink(link_target, self.name, dir_fd=fd)

    def replace(self, target: InShare) -> None:
        """Rename this entry onto ``target`` (atomic), both by their parents."""
        with self.dirs.at(self.parent) as source_fd, self.dirs.at(target.parent) as target_fd:
            os.replace(self.name, target.name, src_dir_fd=source_fd, dst_dir_fd=target_fd)

    def exchange(self, target: InShare) -> bool:
        """Swap this entry and ``target`` in one step (``renameat2(RENAME_EXCHANGE)``);
        False, with nothing done, where the kernel or the filesystem cannot."""
        if _renameat2 is None:
            return False
        with self.dirs.at(self.parent) as source_fd, self.dirs.at(target.parent) as target_fd:
            source, name = os.fsencode(self.name), os.fsencode(target.name)
            if not _renameat2(source_fd, source, target_fd, name, RENAME_EXCHANGE):
                return True
            code = ctypes.get_errno()
            if code in _UNSUPPORTED:
                return False
            raise OSError(code, os.strerror(code), str(target.path))

    def rename_new(self, target: InShare) -> None:
        """Rename this entry to ``target``, found absent a moment ago: FileExistsError
        if something was put there since (see :func:`rename_new_at`)."""
        with self.dirs.at(self.parent) as source_fd, self.dirs.at(target.parent) as target_fd:
            note = functools.partial(noted, self.dirs.root, target.relative)
            shown = os.path.join(self.dirs.root, target.parent, target.name)  # (not .path:
            rename_new_at(source_fd, self.name, target_fd, target.name, shown, note)  # per file)

    def link_into(self, directory_fd: int, name: str) -> None:
        """Hard-link this entry (a regular file) as ``name`` in ``directory_fd``."""
        with self.dirs.at(self.parent) as fd:
            os.link(self.name, name, src_dir_fd=fd, dst_dir_fd=directory_fd, follow_symlinks=False)

    def utime_ns(self, times: tuple[int, int]) -> None:
        """Set the entry's own times (a link's, never its target's)."""
        with self.dirs.at(self.parent) as fd:
            os.utime(self.name, ns=times, dir_fd=fd, follow_symlinks=False)

    def chmod(self, mode: int) -> None:
        """Set a file's or directory's permissions; a link found there is left alone
        (its own mode means nothing on Linux, and following it could reach outside)."""
        with self.dirs.at(self.parent) as fd:
            if stat.S_ISLNK(os.stat(self.name, dir_fd=fd, follow_symlinks=False).st_mode):
                raise NotADirectory(self.relative)
            try:
                entry = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
            except PermissionError:  # (unreadable: by name, the last component checked above)
                os.chmod(self.name, mode, dir_fd=fd)
                return
            try:
                os.fchmod(entry, mode)
            finally:
                os.close(entry)

    def fsync_parent(self) -> None:
        with self.dirs.at(self.parent) as fd:
            os.fsync(fd)


def rename_new_at(
    source_fd: int,
    source: str,
    target_fd: int,
    name: str,
    shown: str,
    note: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> None:
    """Rename ``source`` to ``name`` (each in its directory's descriptor), found absent
    a moment ago: FileExistsError (naming ``shown``) if something was put there since (a
    file the person just made is never replaced). One step with
    ``renameat2(RENAME_NOREPLACE)``; where the kernel or the filesystem lacks it (NFS,
    some FUSE), a hard link to ``name``, which fails with EEXIST if anything is there,
    then the temp name's unlink (R47); where neither exists (exFAT through FUSE, FAT),
    :func:`_rename_onto_placeholder`, within ``note()`` (for a share's path:
    :func:`backer.fs.placeholders.noted`)."""
    if _renameat2 is not None:
        if not _renameat2(
            source_fd, os.fsencode(source), target_fd, os.fsencode(name), RENAME_NOREPLACE
        ):
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code), shown)
    try:
        os.link(source, name, src_dir_fd=source_fd, dst_dir_fd=target_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise  # (FileExistsError: something is there)
    else:
        os.unlink(source, dir_fd=source_fd)
        return
    moved = os.stat(source, dir_fd=source_fd, follow_symlinks=False)
    if stat.S_ISDIR(moved.st_mode):
        _rename_directory_new(source_fd, source, target_fd, name, shown)
    else:
        with note():
            _rename_onto_placeholder(source_fd, source, target_fd, name, shown, moved)


def _rename_directory_new(
    source_fd: int, source: str, target_fd: int, name: str, shown: str
) -> None:
    """A directory onto an absent name, with neither primitive: a look just before the
    rename (a directory replaces only an empty directory, so no file can be lost)."""
    try:
        os.stat(name, dir_fd=target_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.replace(source, name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), shown)


def _rename_onto_placeholder(
    source_fd: int, source: str, target_fd: int, name: str, shown: str, moved: os.stat_result
) -> None:
    """A file onto an absent name where the filesystem has neither an atomic no-replace
    rename nor hard links. An empty placeholder made with ``O_EXCL`` takes the name
    first (a person's exclusive create then fails instead of being replaced), and backer
    keeps it open across the rename: a person's program that wrote into it meanwhile (as
    an editor saving a new file does: open, truncate, write) left bytes that only that
    descriptor still reaches, so :func:`_give_back` puts them back at ``name``
    (FileExistsError: the person's file stands). Left: a program that renames its own
    file over the placeholder in the microseconds between the last look and the rename.
    A crash in that window leaves an empty file at ``name``, which the caller's note
    has the next scan remove (see :mod:`backer.fs.placeholders`)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        held = os.open(name, flags, 0o600, dir_fd=target_fd)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), shown) from None
    try:
        made = os.fstat(held)
        there = os.stat(name, dir_fd=target_fd, follow_symlinks=False)
        if _written_since(held, made) or (there.st_dev, there.st_ino) != (made.st_dev, made.st_ino):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), shown)
        os.replace(source, name, src_dir_fd=source_fd, dst_dir_fd=target_fd)
        if _written_since(held, made):
            _give_back(held, target_fd, name, moved)
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), shown)
    finally:
        os.close(held)


def _written_since(held: int, made: os.stat_result) -> bool:
    now = os.fstat(held)
    return now.st_size != 0 or now.st_mtime_ns != made.st_mtime_ns


def _give_back(held: int, target_fd: int, name: str, moved: os.stat_result) -> None:
    """The person wrote into the placeholder the rename just took away, and only
    ``held`` still reaches their bytes. They are first copied into a file of their own
    beside ``name`` and flushed (a kill from then on leaves them there, the person's new
    file under that name), and only then does that file replace the received one
    (``moved``) at ``name``, in one rename. A newer file of theirs found at ``name``
    stands, their earlier bytes beside it. The received file is dropped: a verified copy
    of a version peers hold, which a later window writes again. Left: a kill between
    the rename and the copy's last write, and a disk that fails every try of
    :func:`_copy_out` (the error is raised): the person's bytes are then lost."""
    copy = _copy_out(held, target_fd, name, moved)
    if copy != name and _holds(target_fd, name, moved):
        os.replace(copy, name, src_dir_fd=target_fd, dst_dir_fd=target_fd)
    os.fsync(target_fd)


GIVE_BACK_TRIES = 10  # copies of a placeholder's bytes tried before they are given up
READ_TRIES = 5  # reads of one block of the placeholder, within one copy
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _copy_out(held: int, target_fd: int, name: str, moved: os.stat_result) -> str:
    """The name of a new, flushed file beside ``name`` holding what ``held`` holds. A
    read that fails is made again (:data:`READ_TRIES`); a failed try (a write's error, a
    flush's, no room) removes its partial copy and is made again, up to
    :data:`GIVE_BACK_TRIES` times (a flush that failed may have dropped what it was to
    write: the whole copy is written anew); no room first removes the received file
    (``moved``) at ``name`` if it is still there, which gives back its space."""
    for _ in range(GIVE_BACK_TRIES - 1):
        try:
            return _copy_once(held, target_fd, name)
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                with contextlib.suppress(OSError):  # (room is only tried for)
                    _remove_if_still(target_fd, name, moved)
    return _copy_once(held, target_fd, name)


def _copy_once(held: int, target_fd: int, name: str) -> str:
    """One try of :func:`_copy_out`, at ``name`` itself if it is free (the received
    file removed to make room), else at ``stem.saved.ext`` (``.saved-2`` ... if taken),
    each made with ``O_EXCL``: nothing is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for aside in _copy_names(name):
        try:
            copy = os.open(aside, flags, 0o644, dir_fd=target_fd)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), name)
    try:
        offset = 0
        while block := _read_retried(held, offset):
            view = memoryview(block)
            while view:
                done = os.pwrite(copy, view, offset)
                view, offset = view[done:], offset + done
        os.fsync(copy)
    except BaseException:
        os.close(copy)
        with contextlib.suppress(OSError):
            os.unlink(aside, dir_fd=target_fd)
        raise
    os.close(copy)
    return aside


def _copy_names(name: str) -> Iterator[str]:
    """``name``, then ``stem.saved.ext``, ``stem.saved-2.ext`` ... (100 in all), each
    within NAME_MAX (a name with no room for one failed with ENAMETOOLONG, R62)."""
    stem, ext = stem_and_extension(name, ".saved-99")
    yield name
    yield fitted_name(stem, f".saved{ext}")
    for number in range(2, 100):
        yield fitted_name(stem, f".saved-{number}{ext}")


def _read_retried(held: int, offset: int) -> bytes:
    for _ in range(READ_TRIES - 1):
        with contextlib.suppress(OSError):
            return os.pread(held, 1 << 20, offset)
    return os.pread(held, 1 << 20, offset)


def _remove_if_still(target_fd: int, name: str, moved: os.stat_result) -> None:
    if _holds(target_fd, name, moved):
        os.unlink(name, dir_fd=target_fd)


def _holds(target_fd: int, name: str, moved: os.stat_result) -> bool:
    """Whether ``name`` is still the file ``moved``."""
    try:
        there = os.stat(name, dir_fd=target_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (there.st_dev, there.st_ino) == (moved.st_dev, moved.st_ino)

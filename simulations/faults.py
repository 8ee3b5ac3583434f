"""A seeded fault layer over one node's disk, as the real world has it.

Real disks fill up and fail: a write can be short or fail with ``ENOSPC``, ``EIO`` or
``EDQUOT``, and so can fsync, rename, link and mkdir. While installed, :class:`Disks`
replaces the ``os`` functions (and the content hasher's ``open``) with proxies that
fail — seeded, so a seed replays the same faults — but only for calls made by backer's
materializer, scanner, hasher and chunk store, and only on a node whose faults are
switched on (a plan). The harness's own edits, the journal and the database are never
touched. A plan can also be a disk budget: ``statvfs`` reports it as the free space,
writes beyond it are short, then fail with ``ENOSPC``, until the disk is freed.

A node may also have a meddling person (:meth:`Disks.meddle`): right before backer
creates a file in one of the share's folders, the folder is moved aside and a link to a
folder outside the share put in its place, undone right after the creation — the race
a person moving a folder away and linking it back makes with backer's writes. Nothing
may then land outside the share (the sandboxes of :mod:`.hostile` check it).

A node's process may also be killed inside one of backer's operations
(:meth:`Disks.kill_at`): backer's Nth durable step on that node (a commit of its
database, a rename, an unlink or rmdir, an fsync or syncfs, a link into the content
store) does not happen, and neither does any change backer would make there after it:
each fails as ``Killed`` (a denied commit as SQLite's 'not authorized'). The harness
then ends the process; its open transaction is rolled back, the page cache (the files
already written) survives, as with SIGKILL.

A node may also have a person who saves first (:meth:`Disks.save_first`): right before
backer renames (or hard-links) a file onto a path of the share where nothing is, the
person saves a new file there. backer must leave it (the next scan records it), never
replace it. A node's filesystem may lack renameat2's flags (:meth:`Disks.plain_renames`)
or hard links (:meth:`Disks.no_hard_links`).
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import os
import random
import sqlite3
import stat
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from backer.fs import dirs
from backer.fs.paths import METADATA_DIR
from backer.model import entropy, materializer
from backer.scanner import content
from backer.scanner.ignore import is_temp_name

FAULTED = frozenset(
    {
        "backer.model.materializer",
        "backer.fs.dirs",
        "backer.scanner.walk",
        "backer.scanner.content",
        "backer.scanner.chunks",
    }
)
SEES_BUDGET = frozenset({"backer.versioner.prune"})  # its size cap: a share of the free disk
PLACEHOLDERS = "_rename_onto_placeholder"  # backer's function that holds a name (O_EXCL)
CALLERS_SEEN_THROUGH = frozenset({"pathlib", "os", "posixpath", "genericpath", "contextlib"})
SHORT = "short write"

# What each call can do on a real disk, besides succeeding.
FAILURES: dict[str, tuple[int | str, ...]] = {
    "create": (errno.ENOSPC, errno.EDQUOT, errno.EIO),
    "read": (errno.EIO,),
    "write": (SHORT, errno.ENOSPC, errno.EDQUOT, errno.EIO),
    "fsync": (errno.EIO, errno.ENOSPC),
    "syncfs": (errno.EIO,),
    "rename": (errno.EIO, errno.ENOSPC),
    "mkdir": (errno.ENOSPC, errno.EDQUOT, errno.EIO),
    "link": (errno.ENOSPC, errno.EDQUOT, errno.EIO),
    "truncate": (errno.EIO, errno.EFBIG),
    "metadata": (errno.EIO,),
    "remove": (errno.EIO,),
}
NEEDS_SPACE = frozenset({"create", "mkdir", "link"})
DURABLE = frozenset({"fsync", "syncfs", "rename", "link", "remove"})  # steps a kill counts
CHANGES = frozenset({"create", "write", "truncate", "metadata", "mkdir"}) | DURABLE
KILLED_BY = ("backer.", "journal.")  # the modules whose calls a killed process no longer makes
SQLITE_READS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
HARNESS_PRAGMAS = frozenset({"page_count", "page_size", "max_page_count"})  # (limit_catalogs)


class InjectedFault(OSError):
    """An error the fault layer made up (never one the code under test raised)."""


class Killed(InjectedFault):
    """The node's process was killed before this call (see :meth:`Disks.kill_at`)."""


@dataclass
class Kill:
    """A node's process dies at its ``countdown``-th durable step from now."""

    countdown: int
    roots: tuple[str, str]  # the node's root as backer names it, and as the kernel does
    fired: bool = False
    at: str = ""  # the step it died before

    def step(self, call: str) -> bool:
        """Count a durable step; True if the process is dead before it."""
        if not self.fired:
            self.countdown -= 1
            self.fired, self.at = self.countdown <= 0, call
        return self.fired


@dataclass
class Plan:
    """One node's faults: a failure rate per call and/or a disk budget in bytes."""

    rate: float = 0.0
    random: random.Random = field(default_factory=random.Random)
    budget: int | None = None  # bytes the disk still takes; None: no limit
    plain_renames: bool = False  # renameat2 has no flags here (EINVAL), as on NFS
    no_hard_links: bool = False  # link() fails here (EPERM), as on exFAT or FAT
    mount_mode: int | None = None  # every entry shows this mode, chmod is ignored (exFAT)

    @property
    def active(self) -> bool:
        return self.rate > 0 or self.budget is not None


@dataclass
class Meddler:
    """A node's person who races backer's file creations (see :meth:`Disks.meddle`)."""

    outside: str
    random: random.Random
    rate: float
    person: Callable[[str], None]


@dataclass
class Saver:
    """A node's person who saves a file where backer is about to rename one (see
    :meth:`Disks.save_first`)."""

    random: random.Random
    rate: float
    person: Callable[[str], None]


class Disks:
    """The fault plans of every node, by root directory; a context manager installs them."""

    def __init__(self) -> None:
        self.plans: dict[str, Plan] = {}
        self.fds: dict[int, Plan] = {}
        self.injected: Counter[str] = Counter()
        self.unflushed: set[int | None] = set()  # inodes written on a budget, not flushed yet
        self.folder_opens = 0  # by backer, on any node: a deep tree must not make it O(depth²)
        self.meddlers: dict[str, Meddler] = {}  # by root
        # one swap at a time, from the look at the folder to the undo: two writer threads
        # creating in one folder at once swapped it twice (the second took the folder
        # already moved aside for its own), and the undos left it aside for good
        self.meddling = threading.Lock()
        self.kills: dict[str, Kill] = {}  # by root
        self.savers: dict[str, Saver] = {}  # by root
        self.replaced: list[str] = []  # files the person saved that backer replaced
        self.saved: set[bytes] = set()  # the contents (manifest ids) of the files saved first
        self.placeholders: dict[int, str] = {}  # backer's open placeholders (fd: path)
        self.made_placeholders: set[tuple[int, int]] = set()  # every one's (device, inode)
        self.written_into: dict[str, tuple[str, str, bytes]] = {}  # placeholders saved into
        self._real: dict[str, Callable[..., Any]] = {}

    # -- switching ---------------------------------------------------------------------

    def _plan(self, root: os.PathLike[str]) -> Plan:
        return self.plans.setdefault(os.fspath(root) + os.sep, Plan())

    def faults_on(self, root: os.PathLike[str], seed: int, rate: float) -> None:
        plan = self._plan(root)
        plan.rate, plan.random = rate, random.Random(seed)

    def faults_off(self, root: os.PathLike[str]) -> None:
        self._plan(root).rate = 0.0

    def fill(self, root: os.PathLike[str], budget: int) -> None:
        """The node's disk takes ``budget`` more bytes, then is full."""
        self._plan(root).budget = budget

    def plain_renames(self, root: os.PathLike[str]) -> None:
        """The node's filesystem lacks renameat2's flags (EINVAL, as NFS and some FUSE
        do): backer's no-replace rename and its swap take their fallbacks."""
        self._plan(root).plain_renames = True

    def no_hard_links(self, root: os.PathLike[str]) -> None:
        """The node's filesystem has no hard links (EPERM, as exFAT, FAT and many FUSE or
        SMB mounts): the content store copies, a no-replace rename takes its fallback."""
        self._plan(root).no_hard_links = True

    def no_permission_bits(self, root: os.PathLike[str], mode: int) -> None:
        """The node's filesystem keeps no permission bits (exFAT, FAT, many FUSE and SMB
        mounts): every entry shows the mount's ``mode`` and chmod changes nothing.
        Entries made since are given it by :meth:`show_mount_mode`, which the machine
        calls after every step."""
        self._plan(root).mount_mode = mode
        self.show_mount_mode(root)

    def show_mount_mode(self, root: os.PathLike[str]) -> None:
        """Every entry under ``root`` (not links) shows its disk's mount mode, if any."""
        mode = self._plan(root).mount_mode
        if mode is None:
            return
        chmod = self._real.get("chmod", os.chmod)
        for folder, folders, files in os.walk(root):
            for name in folders + files:
                path = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    if not stat.S_ISLNK(os.lstat(path).st_mode):
                        chmod(path, mode)

    def free(self, root: os.PathLike[str]) -> None:
        self._plan(root).budget = None

    def budget(self, root: os.PathLike[str]) -> int | None:
        """The bytes the node's disk still takes (None: no limit)."""
        plan = self.plans.get(os.fspath(root) + os.sep)
        return None if plan is None else plan.budget

    def meddle(
        self,
        root: os.PathLike[str],
        outside: os.PathLike[str],
        seed: int,
        rate: float,
        person: Callable[[str], None],
    ) -> None:
        """Before a ``rate`` share of backer's file creations in a folder of the share at
        ``root``, swap that folder for a link to ``outside`` (see the module's docstring);
        ``person(folder)`` is told, as the folder's times are the person's doing."""
        key = os.fspath(root) + os.sep
        self.meddlers[key] = Meddler(os.fspath(outside), random.Random(seed), rate, person)

    def _meddle(self, path: Any, flags: int, dir_fd: int | None) -> tuple[str, str] | None:
        """Swap the folder of a file backer is about to create; its undo's arguments."""
        if not flags & os.O_CREAT or not self.meddlers or not _from_backer():
            return None
        name = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(name):
            folder = os.readlink(f"/proc/self/fd/{dir_fd}")
        else:
            folder = os.path.dirname(name)
        for root, meddler in self.meddlers.items():
            inside = folder[len(root) :]
            if (
                folder.startswith(root)
                and inside
                and not inside.startswith(METADATA_DIR)  # (a person's folders only)
                and meddler.random.random() < meddler.rate
            ):
                aside = folder + ".aside"
                self._real["rename"](folder, aside)
                self._real["symlink"](meddler.outside, folder)
                meddler.person(inside)
                self.injected["folder swapped for a link"] += 1
                return folder, aside
        return None

    def save_first(
        self, root: os.PathLike[str], seed: int, rate: float, person: Callable[[str], None]
    ) -> None:
        """Before a ``rate`` share of backer's renames onto a path of the share at
        ``root`` where nothing is, the person saves a new file there (``person(path)``
        is told, as its watcher would be); one that backer's rename replaced goes into
        :attr:`replaced`."""
        self.savers[os.fspath(root) + os.sep] = Saver(random.Random(seed), rate, person)

    def _save_first(self, name: Any, dir_fd: int | None) -> tuple[str, str, bytes] | None:
        """The person saves a file where backer is about to rename one (if nothing is
        there); (its path, its path in the share, its bytes) for :meth:`_saved`. Where
        backer holds an empty placeholder there (a filesystem with neither renameat2's
        flags nor hard links), the person's program writes into it instead, as an editor
        saving a new file does, and the look waits until backer closes it."""
        if not self.savers or not isinstance(name, str | bytes | os.PathLike):
            return None
        if not _from_backer():
            return None
        target = self._absolute(name, dir_fd)
        placeholder = self._placeholder_at(target)
        for root, saver in self.savers.items():
            inside = target[len(root) :]
            if (
                target.startswith(root)
                and inside
                and not inside.startswith(METADATA_DIR)  # (a person's files only)
                and not is_temp_name(os.path.basename(inside))  # (backer's, named at random)
                and (placeholder or not os.path.lexists(target))
                and saver.random.random() < saver.rate
            ):
                data = b"saved by the person first " + saver.random.randbytes(8).hex().encode()
                with builtins.open(target, "r+b" if placeholder else "xb") as saved:
                    saved.write(data)
                now = entropy.now_ns()  # (the node's seeded clock: a seed replays alike)
                self._real["utime"](target, ns=(now, now))
                saver.person(inside)
                self.injected["file saved before a rename"] += 1
                self.saved.add(content.manifest_of_bytes(data).id)
                if placeholder:
                    self.written_into[target] = (target, inside, data)
                    return None
                return target, inside, data
        return None

    def _placeholder_at(self, target: str) -> bool:
        """Whether ``target`` is one of backer's open placeholders (not what backer
        renamed over it since: the person's program wrote into the placeholder)."""
        try:
            there = os.lstat(target)
        except OSError:
            return False
        for fd, path in self.placeholders.items():
            held = os.fstat(fd)
            if path == target and (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                return True
        return False

    def _absolute(self, name: Any, dir_fd: int | None) -> str:
        target = os.fsdecode(name)
        if dir_fd is not None and not os.path.isabs(target):
            target = os.path.join(self._real["readlink"](f"/proc/self/fd/{dir_fd}"), target)
        return target

    def _saved(self, target: str, inside: str, data: bytes, beside: bool = False) -> None:
        """After backer's rename: the person's file must still be there as saved (or,
        ``beside``, for what they wrote into a placeholder: in a file of its folder,
        where a newer file at the name or a fault or kill in the give-back left it)."""
        folder = os.path.dirname(target)
        try:
            others = [os.path.join(folder, n) for n in os.listdir(folder)] if beside else []
        except OSError:
            others = []
        holding = [name for name in [target, *others] if self._holds(name, data)]
        if not holding:
            self.replaced.append(inside)
        elif target not in holding:  # (the person's file now, heard as theirs)
            for root, saver in self.savers.items():
                if target.startswith(root):
                    saver.person(holding[0][len(root) :])

    @staticmethod
    def _holds(path: str, data: bytes) -> bool:
        try:
            with builtins.open(path, "rb") as saved:
                return saved.read() == data and not os.path.islink(path)
        except OSError:
            return False

    def _unmeddle(self, folder: str, aside: str) -> None:
        self._real["unlink"](folder)
        self._real["rename"](aside, folder)

    def active(self, root: os.PathLike[str]) -> bool:
        plan = self.plans.get(os.fspath(root) + os.sep)
        return plan is not None and plan.active

    # -- killing -----------------------------------------------------------------------

    def kill_at(self, root: os.PathLike[str], nth: int, conn: sqlite3.Connection) -> None:
        """The process of the node at ``root`` (its database ``conn``) dies before its
        ``nth`` durable step from now (see the module's docstring)."""
        named = os.fspath(root) + os.sep
        kill = self.kills[named] = Kill(nth, (named, os.path.realpath(root) + os.sep))

        def authorize(action: int, what: str | None, *_: object) -> int:
            harness = action == sqlite3.SQLITE_PRAGMA and what in HARNESS_PRAGMAS
            if kill.fired and action not in SQLITE_READS and not harness:
                return sqlite3.SQLITE_DENY  # (a BEGIN too: nothing is written after it)
            if action == sqlite3.SQLITE_TRANSACTION and what == "COMMIT":
                return sqlite3.SQLITE_DENY if kill.step("commit") else sqlite3.SQLITE_OK
            return sqlite3.SQLITE_OK

        conn.set_authorizer(authorize)  # (SQLite prepares each COMMIT and BEGIN anew)

    def killed(self, root: os.PathLike[str]) -> Kill | None:
        """The node's kill, if it fired."""
        kill = self.kills.get(os.fspath(root) + os.sep)
        return kill if kill is not None and kill.fired else None

    def disarm(self, root: os.PathLike[str], conn: sqlite3.Connection | None) -> None:
        """No kill pending on the node (``conn``: its database, if still open)."""
        self.kills.pop(os.fspath(root) + os.sep, None)
        if conn is not None:
            conn.set_authorizer(None)

    def _check_kill(self, call: str, path: Any = None, dir_fd: int | None = None) -> None:
        """Raise Killed if backer's ``call`` on a node that is being killed is at or
        after its kill point (``path``: a path, or an open descriptor's number)."""
        if call not in CHANGES or not _caller().startswith(KILLED_BY):
            return
        if isinstance(path, int):
            name = self._real["readlink"](f"/proc/self/fd/{path}")
        elif isinstance(path, str | bytes | os.PathLike):
            name = os.fsdecode(path)
            if dir_fd is not None and not os.path.isabs(name):
                name = os.path.join(self._real["readlink"](f"/proc/self/fd/{dir_fd}"), name)
        else:
            return
        for kill in self.kills.values():
            mine = (name + os.sep).startswith(kill.roots)
            if mine and (kill.fired or (call in DURABLE and kill.step(call))):
                raise Killed(errno.EIO, "killed", name)

    def calm(self) -> None:
        """Faults stop, every disk is freed and no person saves first any more (the
        network heals next, and the checks that count bytes on the wire follow)."""
        for plan in self.plans.values():
            plan.rate, plan.budget = 0.0, None
        self.savers.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No plan applies within (the harness's own checks read backer's files)."""
        plans, self.plans = self.plans, {}
        try:
            yield
        finally:
            self.plans = plans

    # -- deciding ----------------------------------------------------------------------

    def _for_path(
        self, path: Any, dir_fd: int | None = None, modules: frozenset[str] = FAULTED
    ) -> Plan | None:
        """The active plan of the node ``path`` is on, for a call from ``modules``."""
        plan = self._node_plan(path, dir_fd)
        return plan if plan is not None and plan.active and _from_backer(modules) else None

    def _node_plan(self, path: Any, dir_fd: int | None = None) -> Plan | None:
        """The plan of the node ``path`` is on (switched on or not)."""
        if not isinstance(path, str | bytes | os.PathLike):
            return None
        name = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(name):  # relative to an open directory
            return self.fds.get(dir_fd)
        for root, plan in self.plans.items():
            if name.startswith(root):
                return plan
        return None

    def _for_fd(self, fd: int) -> Plan | None:
        plan = self.fds.get(fd)
        return plan if plan is not None and plan.active and _from_backer() else None

    def track(self, root: os.PathLike[str]) -> None:
        """Know ``root`` as a node's: what backer opens there keeps its node's plan, so a
        disk that fills (or starts failing) later reaches the descriptors already open
        (a window's temp files, written by the writer and copier threads)."""
        self._plan(root)

    def _maybe_fail(self, plan: Plan | None, call: str, path: Any = None) -> int | str | None:
        """Raise (or, for a short write, return ``SHORT``) when the plan says so."""
        if plan is None:
            return None
        if call in NEEDS_SPACE and plan.budget == 0:
            self._raise(call, errno.ENOSPC, path)
        if plan.rate and plan.random.random() < plan.rate:
            failure = plan.random.choice(FAILURES[call])
            if failure == SHORT:
                self.injected[SHORT] += 1
                return SHORT
            self._raise(call, int(failure), path)
        return None

    def _raise(self, call: str, code: int, path: Any) -> None:
        self.injected[f"{call} {errno.errorcode[code]}"] += 1
        name = os.fsdecode(path) if path is not None else None
        raise InjectedFault(code, os.strerror(code), name)

    # -- installing --------------------------------------------------------------------

    @contextmanager
    def installed(self) -> Iterator[Disks]:
        real = self._real = {name: getattr(os, name) for name in _PROXIES}
        real_syncfs = materializer._syncfs
        real_renameat2 = dirs._renameat2
        proxies = {name: make(self, real[name]) for name, make in _PROXIES.items()}
        try:
            for name, proxy in proxies.items():
                setattr(os, name, proxy)
            content.open = _faulty_open(self, builtins.open)  # type: ignore[attr-defined]
            if real_syncfs is not None:
                materializer._syncfs = _faulty_syncfs(self, real_syncfs)
            if real_renameat2 is not None:
                dirs._renameat2 = _faulty_renameat2(self, real_renameat2)
            yield self
        finally:
            for name, function in real.items():
                setattr(os, name, function)
            del content.open  # type: ignore[attr-defined]
            materializer._syncfs = real_syncfs
            dirs._renameat2 = real_renameat2


def _from_backer(modules: frozenset[str] = FAULTED) -> bool:
    """True when the os call comes from backer's disk I/O in ``modules`` (through
    pathlib or not)."""
    return _caller() in modules


def _caller() -> str:
    """The module that made the os call (seen through pathlib and the like)."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != __name__ and module not in CALLERS_SEEN_THROUGH:
            return module
        frame = frame.f_back
    return ""


# Each proxy takes the fault plans and the real function.
Proxy = Callable[[Disks, Callable[..., Any]], Callable[..., Any]]


def _open(disks: Disks, real: Callable[..., int]) -> Callable[..., int]:
    def proxy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        caller = _caller()
        if flags & os.O_DIRECTORY and caller.startswith("backer."):
            disks.folder_opens += 1
        if disks.kills and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            disks._check_kill("create", path, kw.get("dir_fd"))
        plan = disks._node_plan(path, kw.get("dir_fd")) if caller in FAULTED else None
        if plan is not None and plan.active:
            disks._maybe_fail(plan, "create" if flags & os.O_CREAT else "read", path)
        meddling = disks.meddling if disks.meddlers else contextlib.nullcontext()
        with meddling:
            swapped = disks._meddle(path, flags, kw.get("dir_fd"))
            try:
                fd = real(path, flags, mode, **kw)
            finally:
                if swapped is not None:
                    disks._unmeddle(*swapped)
        if plan is not None:
            disks.fds[fd] = plan
        if sys._getframe(1).f_code.co_name == PLACEHOLDERS:
            made = os.fstat(fd)
            disks.made_placeholders.add((made.st_dev, made.st_ino))
            if disks.savers:
                disks.placeholders[fd] = disks._absolute(path, kw.get("dir_fd"))
        return fd

    return proxy


def _close(disks: Disks, real: Callable[..., None]) -> Callable[..., None]:
    def proxy(fd: int) -> None:
        disks.fds.pop(fd, None)
        placeholder = disks.placeholders.pop(fd, None)
        real(fd)
        if placeholder in disks.written_into:  # backer is done with it: the person's stays
            disks._saved(*disks.written_into.pop(placeholder), beside=True)

    return proxy


def _pwrite(disks: Disks, real: Callable[..., int]) -> Callable[..., int]:
    def proxy(fd: int, data: bytes, offset: int) -> int:
        if disks.kills:
            disks._check_kill("write", fd)
        plan = disks._for_fd(fd)
        if plan is None:
            return real(fd, data, offset)
        view = memoryview(data)
        if plan.budget is not None:
            if plan.budget == 0 and len(view):
                disks._raise("write", errno.ENOSPC, None)
            view = view[: plan.budget]
        if disks._maybe_fail(plan, "write") == SHORT and len(view) > 1:
            view = view[: plan.random.randrange(1, len(view))]
        written = real(fd, view, offset)
        if plan.budget is not None:
            plan.budget -= written
            disks.unflushed.add(os.fstat(fd).st_ino)
        return written

    return proxy


def _on_fd(call: str) -> Proxy:
    def make(disks: Disks, real: Callable[..., Any]) -> Callable[..., Any]:
        def proxy(fd: int, *args: Any) -> Any:
            if disks.kills:
                disks._check_kill(call, fd)
            plan = disks._for_fd(fd)
            flushed = os.fstat(fd).st_ino if call == "fsync" and disks.unflushed else None
            if flushed in disks.unflushed and plan is not None and plan.budget == 0:
                disks._raise(call, errno.ENOSPC, None)  # its pages got no blocks
            disks._maybe_fail(plan, call)
            result = real(fd, *args)
            disks.unflushed.discard(flushed)
            return result

        return proxy

    return make


def _on_path(call: str, argument: int = 0) -> Proxy:
    """A proxy for a call whose ``argument``-th parameter is the path it changes."""

    def make(disks: Disks, real: Callable[..., Any]) -> Callable[..., Any]:
        def proxy(*args: Any, **kw: Any) -> Any:
            path = args[argument] if len(args) > argument else None
            at = kw.get("dst_dir_fd", kw.get("dir_fd")) if argument else kw.get("dir_fd")
            if disks.kills:
                disks._check_kill(call, path, at)
            disks._maybe_fail(disks._for_path(path, at), call, path)
            return real(*args, **kw)

        return proxy

    return make


def _saved_first(op: str) -> Proxy:
    """A call that puts something at its second argument's path (``os.replace``,
    ``os.rename``, ``os.link``: a link is how a file goes to a path where renameat2 has
    no RENAME_NOREPLACE): it can fail, and a person may save a file at the target
    first (which backer must then not replace: see :meth:`Disks.save_first`)."""

    def make(disks: Disks, real: Callable[..., Any]) -> Callable[..., Any]:
        faulty = _on_path(op, 1)(disks, real)

        def proxy(*args: Any, **kw: Any) -> Any:
            saved = disks._save_first(args[1] if len(args) > 1 else None, kw.get("dst_dir_fd"))
            try:
                return faulty(*args, **kw)
            finally:
                if saved is not None:
                    disks._saved(*saved)

        return proxy

    return make


def link_without_hard_links(
    source: Any,
    target: Any,
    *,
    src_dir_fd: int | None = None,
    dst_dir_fd: int | None = None,
    follow_symlinks: bool = True,
) -> None:
    """``os.link`` as a filesystem without hard links answers it (exFAT through FUSE,
    FAT): the kernel looks both names up before it asks the filesystem, so a missing
    source is ENOENT and a name already taken EEXIST; only then is the link refused,
    EPERM (``tests/test_e2e_exfat.py`` compares the two on a real mount)."""
    os.stat(source, dir_fd=src_dir_fd, follow_symlinks=follow_symlinks)
    try:
        os.stat(target, dir_fd=dst_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), target) from None
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)


def _link(disks: Disks, real: Callable[..., Any]) -> Callable[..., Any]:
    """``os.link``, as :func:`_saved_first`; on a node without hard links, as
    :func:`link_without_hard_links`."""
    saved_first = _saved_first("link")(disks, real)

    def proxy(*args: Any, **kw: Any) -> Any:
        target, at = os.fsdecode(args[1]), kw.get("dst_dir_fd")
        if at is not None and not os.path.isabs(target):  # (by any module: the filesystem's
            folder = disks._real["readlink"](f"/proc/self/fd/{at}")  # own limit, not a fault)
            target = os.path.join(folder, target)
        plan = disks._node_plan(target)
        if plan is not None and plan.no_hard_links:
            disks.injected["link without hard links"] += 1
            link_without_hard_links(*args, **kw)
        return saved_first(*args, **kw)

    return proxy


def _chmod(disks: Disks, real: Callable[..., Any]) -> Callable[..., Any]:
    """``os.chmod``, as :func:`_on_path`; on a disk without permission bits the entry
    keeps the mount's mode, whoever asks (the person too)."""
    faulty = _on_path("metadata")(disks, real)

    def proxy(path: Any, mode: int, **kw: Any) -> Any:
        plan = disks._node_plan(path, kw.get("dir_fd"))
        if plan is not None and plan.mount_mode is not None:
            mode = plan.mount_mode
        return faulty(path, mode, **kw)

    return proxy


def _fchmod(disks: Disks, real: Callable[..., Any]) -> Callable[..., Any]:
    """``os.fchmod``, as :func:`_on_fd`; on a disk without permission bits the file keeps
    the mount's mode."""
    faulty = _on_fd("metadata")(disks, real)

    def proxy(fd: int, mode: int) -> Any:
        plan = disks._node_plan(disks._real["readlink"](f"/proc/self/fd/{fd}"))
        if plan is not None and plan.mount_mode is not None:
            mode = plan.mount_mode
        return faulty(fd, mode)

    return proxy


def _statvfs(disks: Disks, real: Callable[..., os.statvfs_result]) -> Callable[..., Any]:
    """Free space as the budget says, on a node whose disk is filling up (also to the
    pruner, which asks about the share's root itself)."""

    def proxy(path: Any) -> os.statvfs_result:
        info = real(path)
        plan = disks._for_path(path) or disks._for_path(
            os.path.join(os.fsdecode(path), ""), modules=SEES_BUDGET
        )
        if plan is None or plan.budget is None:
            return info
        free = plan.budget // info.f_frsize
        fields = list(info)
        fields[3] = fields[4] = free  # f_bfree, f_bavail
        return os.statvfs_result(fields)

    return proxy


_PROXIES: dict[str, Proxy] = {
    "open": _open,
    "close": _close,
    "pwrite": _pwrite,
    "pread": _on_fd("read"),
    "preadv": _on_fd("read"),  # (a peer's chunks and local copies are read with it)
    "fsync": _on_fd("fsync"),
    "ftruncate": _on_fd("truncate"),
    "fchmod": _fchmod,
    "replace": _saved_first("rename"),
    "rename": _saved_first("rename"),
    "mkdir": _on_path("mkdir"),
    "link": _link,
    "symlink": _on_path("link", 1),
    "utime": _on_path("metadata"),
    "chmod": _chmod,
    "unlink": _on_path("remove"),
    "rmdir": _on_path("remove"),
    "scandir": _on_path("read"),
    "readlink": _on_path("read"),
    "statvfs": _statvfs,
}


def _faulty_open(disks: Disks, real: Callable[..., Any]) -> Callable[..., Any]:
    """The hasher's ``open``: reading a file can fail with EIO."""

    def proxy(path: Any, *args: Any, **kw: Any) -> Any:
        disks._maybe_fail(disks._for_path(path), "read", path)
        return real(path, *args, **kw)

    return proxy


def _faulty_renameat2(disks: Disks, real: Callable[..., int]) -> Callable[..., int]:
    """``renameat2`` (through ctypes: -1 and errno on failure), as :func:`_saved_first`."""

    def proxy(source_fd: int, source: bytes, target_fd: int, target: bytes, flags: int) -> int:
        plan = disks.fds.get(target_fd)
        if flags and plan is not None and plan.plain_renames:
            ctypes.set_errno(errno.EINVAL)
            return -1
        try:
            if disks.kills:
                disks._check_kill("rename", target, target_fd)
            disks._maybe_fail(disks._for_fd(target_fd), "rename")
        except InjectedFault as fault:
            ctypes.set_errno(fault.errno)
            return -1
        saved = disks._save_first(target, target_fd)
        try:
            return real(source_fd, source, target_fd, target, flags)
        finally:
            if saved is not None:
                disks._saved(*saved)

    return proxy


def _faulty_syncfs(disks: Disks, real: Callable[[int], int]) -> Callable[[int], int]:
    def proxy(fd: int) -> int:
        try:
            if disks.kills:
                disks._check_kill("syncfs", fd)
            disks._maybe_fail(disks._for_fd(fd), "syncfs")
        except InjectedFault:
            return -1
        return real(fd)

    return proxy

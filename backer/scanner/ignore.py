"""Which paths backer leaves alone: ``.backerignore`` (gitignore syntax) plus temp files.

The metadata directory ``.backer/`` is never walked at all. The ignore file itself is
synced, so every device applies the same rules and converges to the same tree. A
matching directory is not descended into, as in git.

A rule only ever stops syncing (as in Syncthing): an ignored path is neither recorded
nor written nor deleted on this device; a path that becomes ignored is forgotten
locally (no deletion is recorded for it; the version it held is kept as the basis of
a later edit), and one that stops being ignored is scanned again. The conflict copy of
an ignored path is ignored too: it carries that path's bytes under another name.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import stat
from pathlib import Path

import pathspec
from blake3 import blake3
from pathspec.patterns.gitignore.spec import _DIR_MARK, GitIgnoreSpecPattern
from pathspec.util import normalize_file

IGNORE_FILE = ".backerignore"
TEMP_PREFIX = ".backer-"
TEMP_SUFFIX = ".tmp"
CONFLICT_MARK = ".sync-conflict-"  # then YYYYMMDD-HHMMSS-DEVICE (see materializer)
_CONFLICT = re.compile(re.escape(CONFLICT_MARK) + r"\d{8}-\d{6}-[A-Z2-7]{7}")
_ID = 16  # hex digits of the (path, version) identity, then as many of its check
TEMP_NAME_BYTES = len(TEMP_PREFIX) + 2 * _ID + len(TEMP_SUFFIX)  # 44: fits any NAME_MAX
MAX_IGNORE_BYTES = 1024 * 1024  # a larger .backerignore is not read
MAX_RULES = 1000  # nor one with more rules: every path may be matched against each


def _check(identity: str) -> str:
    return blake3(b"backer temp file " + identity.encode()).hexdigest()[:_ID]


def temp_name(path: str, version_id: str) -> str:
    """The name of the temp file that writes ``version_id`` at ``path``, beside it.

    Fixed length (44 bytes, whatever the target's name), the same on every attempt (so
    an interrupted transfer's verified bytes are found again), and self-certifying: the
    identity is followed by a hash of it, so a user's file is never taken for one of
    ours (a chance of 2^-64 for a name of exactly this shape)."""
    identity = blake3(os.fsencode(f"{path}\0{version_id}")).hexdigest()[:_ID]
    return f"{TEMP_PREFIX}{identity}{_check(identity)}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one backer made for a temp file (see :func:`temp_name`)."""
    if len(name) != TEMP_NAME_BYTES or not name.startswith(TEMP_PREFIX):
        return False
    identity = name[len(TEMP_PREFIX) : len(TEMP_PREFIX) + _ID]
    return name == f"{TEMP_PREFIX}{identity}{_check(identity)}{TEMP_SUFFIX}"


def copy_origin(path: str) -> str | None:
    """The path a conflict copy was made from (every mark removed, for a copy of a
    copy), or None if ``path``'s name carries no mark. A stem cut to fit NAME_MAX stays
    cut: such an origin is matched by its shortened name."""
    parent, slash, name = path.rpartition("/")
    if CONFLICT_MARK not in name:
        return None
    origin = _CONFLICT.sub("", name)
    return parent + slash + origin if origin != name and origin else None


def _glob_pieces(glob: str) -> list[str]:
    """The regex of each piece of one path segment's glob between its wildcards ``*``,
    read as pathspec reads a glob (escapes, ``?``, bracket expressions), except that a
    bracket expression never matches ``/`` (as in git; pathspec's ``[!a]`` did)."""
    pieces, regex, i = [], "", 0
    while i < len(glob):
        char = glob[i]
        i += 1
        if char == "\\":
            regex += re.escape(glob[i : i + 1])
            i += 1
        elif char == "*":
            pieces.append(regex)
            regex = ""
        elif char == "?":
            regex += "[^/]"
        elif char == "[" and (close := _bracket_end(glob, i)) != -1:
            negated = glob[i] in "!^"
            body = glob[i + negated : close].replace("\\", "\\\\")
            regex += f"(?!/)[{'^' if negated else ''}{body}]"
            i = close + 1
        else:
            regex += re.escape(char)
    return [*pieces, regex]


def _bracket_end(glob: str, start: int) -> int:
    """Where the bracket expression opened just before ``start`` closes (-1: it does
    not, and ``[`` is a literal; pathspec's rule: a leading ``!``/``^``, then a leading
    ``]``, are part of it)."""
    j = start + (glob[start : start + 1] in ("!", "^"))
    j += glob[j : j + 1] == "]"
    return glob.find("]", j)


class LinearPattern(GitIgnoreSpecPattern):
    """A gitignore pattern compiled so that matching it costs about linear time.

    pathspec's regex gives each ``*`` a ``[^/]*`` and each ``**`` a ``.+``; Python's
    engine backtracks through every way of splitting a name among them, so a rule such
    as ``*a*a*a*a*a*a*a*a*b`` against a long name of ``a`` took longer than any scan
    may: any member can write ``.backerignore`` and name files, and matching runs with
    the interpreter lock held, so every device's node froze. Here every wildcard but the
    last of a segment (and every ``**`` but the last of a pattern) takes the first place
    where what follows it matches, in an atomic group: that is exact, because a glob's
    pieces between wildcards have fixed lengths (whole segments, for ``**``) and the
    earliest place for one leaves the most room for the rest. The same paths match."""

    __slots__ = ()

    @staticmethod
    def _translate_segment_glob(pattern: str, range_error: str) -> str:  # type: ignore[override]
        GitIgnoreSpecPattern._translate_segment_glob(pattern, range_error)  # type: ignore[arg-type]
        # (pathspec's own, for its refusals: an unclosed bracket, a trailing escape)
        pieces = _glob_pieces(pattern)
        if len(pieces) == 1:
            return pieces[0]
        middle = "".join(f"(?>[^/]*?{piece})" for piece in pieces[1:-1])
        return f"{pieces[0]}{middle}[^/]*{pieces[-1]}"

    @classmethod
    def _GitIgnoreSpecPattern__translate_segments(  # pathspec's (private) segment step
        cls, is_dir_pattern: bool, segments: list[str]
    ) -> list[str]:
        parts = super()._GitIgnoreSpecPattern__translate_segments(  # type: ignore[misc]
            is_dir_pattern, segments
        )
        gaps = [i for i, part in enumerate(parts) if part in _GAPS]
        for gap, following in reversed(list(itertools.pairwise(gaps))):
            block = "".join(parts[gap + 1 : following])
            parts[gap:following] = [_GAPS[parts[gap]].format(block)]
        return parts


_GAPS = {  # pathspec's regex for a leading and an inner '**', here taking the fewest
    "^(?:.+/)?": "^(?>(?:.+?/)??{}(?=/))",  # segments (the block after it ends where
    "(?:/.+)?": "(?>(?:/.+?)??{}(?=/))",  # a segment does: the next '**' needs a '/')
}


def _spec(lines: list[str]) -> pathspec.GitIgnoreSpec:
    return pathspec.GitIgnoreSpec.from_lines(lines, LinearPattern, backend="simple")


@functools.lru_cache(maxsize=8)
def _compiled(
    rules: tuple[str, ...],
) -> tuple[tuple[str, ...], pathspec.GitIgnoreSpec | None, re.Pattern[str] | None]:
    """The invalid lines of ``rules``, the spec of the others, and one regex matching
    wherever any rule that ignores matches (None if it cannot be made). Kept for the
    last few rule sets: the rules are loaded for every scan, plan and apply window, and
    compiling a large file took seconds with the interpreter lock held."""
    invalid = tuple(line for line in rules if not _valid_pattern(line))
    valid = [line for line in rules if line not in invalid]
    if not valid:
        return invalid, None, None
    spec = _spec(valid)
    ignoring = [p.regex.pattern for p in spec.patterns if p.include and p.regex is not None]
    branches = [p.replace(f"(?P<{_DIR_MARK}>", "(?:") for p in ignoring]
    try:
        any_rule = re.compile("|".join(f"(?:{branch})" for branch in branches) or "(?!)")
    except re.error:  # (a pattern spelled in a way the union cannot hold: no shortcut)
        any_rule = None
    return invalid, spec, any_rule


def _valid_pattern(line: str) -> bool:
    """Whether gitignore syntax accepts ``line`` (a file edited by hand, or garbled,
    must not stop every scan: its bad lines are skipped and reported)."""
    try:
        _spec([line])
    except (ValueError, TypeError, re.error):  # (GitIgnorePatternError is a ValueError;
        # a reversed range such as [z-a] fails only when compiled: re.error)
        return False
    return True


def read_rules(root: Path, name: str = IGNORE_FILE) -> tuple[str, str | None]:
    """The text of ``root``'s ignore file (or of the file ``name`` beside it) and, when
    one is there but not read, why.

    Only a regular file in the share, of at most :data:`MAX_IGNORE_BYTES`, is read: any
    member can make ``.backerignore`` a link (links replicate as links), a folder or a
    fifo, and following it would hang every device on a fifo, read a file outside the
    share into the rules, or read a device until memory runs out."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
    try:
        fd = os.open(root / name, flags)
    except (FileNotFoundError, NotADirectoryError):
        return "", None
    except OSError as exc:
        link = exc.errno == errno.ELOOP
        return "", "is a link, not read" if link else f"not read: {exc.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "", "is not a regular file, not read"
        data = os.read(fd, MAX_IGNORE_BYTES + 1)
        while data and len(data) <= MAX_IGNORE_BYTES and (more := os.read(fd, 65536)):
            data += more
    except OSError as exc:
        return "", f"not read: {exc.strerror}"
    finally:
        os.close(fd)
    if len(data) > MAX_IGNORE_BYTES:
        return "", f"is larger than {MAX_IGNORE_BYTES} bytes, not read"
    return data.decode("utf-8", errors="replace"), None


def replace_rules(root: Path, rules: str, previous: str, version_id: str) -> bool:
    """Make ``rules`` the share's ignore file if it still holds ``previous`` when it is
    replaced; False, with nothing changed, if someone edited it meanwhile. Written to a
    temp file beside it and fsynced first; then swapped with the file in one step, and
    the file swapped out must still read ``previous`` (else it is swapped back): an edit
    saved while the temp was written is never overwritten. A file that was not there
    is made only if there is still none. Where no swap can be made, the check comes just
    before the rename."""
    from backer.fs.dirs import Directories, InShare

    dirs = Directories(root)
    target = InShare.of(dirs, IGNORE_FILE)
    temp = target.with_name(temp_name(IGNORE_FILE, version_id))
    try:
        fd = temp.open(os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, rules.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if not os.path.lexists(target.path):
            if previous:
                return False
            try:
                temp.rename_new(target)
            except FileExistsError:
                return False
            return True
        if temp.exchange(target):
            if read_rules(root, temp.name) == (previous, None):
                return True
            temp.exchange(target)
            return False
        if read_rules(root) != (previous, None):
            return False
        temp.replace(target)
        return True
    finally:
        temp.unlink(missing_ok=True)
        dirs.close()


class IgnoreRules:
    """The share's own rules; backer's temp files are always ignored (checked first,
    cheaply, since most shares have no ``.backerignore`` at all)."""

    def __init__(self, lines: list[str], unread: str | None = None) -> None:
        self.unread = unread  # why the ignore file there was not read (no rules, then)
        rules = tuple(line for line in lines if line.strip() and not line.lstrip().startswith("#"))
        if len(rules) > MAX_RULES:
            self.unread, rules = f"has {len(rules)} rules, more than {MAX_RULES}: not read", ()
        invalid, self.spec, self._any = _compiled(rules)
        self.invalid = list(invalid)  # skipped (the scan says which)
        self._directories: dict[str, bool] = {}  # excluded() asks about parents repeatedly

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        text, unread = read_rules(root)
        return cls(text.splitlines(), unread)

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether the rules match ``path`` itself (the walk never enters an ignored
        directory, so it need not ask about parents)."""
        if is_temp_name(path.rpartition("/")[2]):
            return True
        if self.spec is None:
            return False
        if self._matches(path + "/" if is_dir else path):
            return True
        origin = copy_origin(path)  # a conflict copy is as ignored as what it copies
        return origin is not None and self._matches(origin + "/" if is_dir else origin)

    def _matches(self, path: str) -> bool:
        """The spec's answer, after one regex call that rules out most paths: only a
        rule that ignores can make a path ignored, so none of them matching is a no."""
        assert self.spec is not None
        if self._any is not None and not self._any.match(normalize_file(path)):
            return False
        return self.spec.match_file(path)

    def excluded(self, path: str, is_dir: bool = False) -> bool:
        """Whether ``path`` is out of the walk: ignored itself or below an ignored
        directory. For paths that come from the state rather than from the disk."""
        if self.spec is None:
            return is_temp_name(path.rpartition("/")[2])
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            found = self._directories.get(parent)
            if found is None:
                found = self._directories[parent] = self.ignored(parent, True)
            if found:
                return True
        return self.ignored(path, is_dir)

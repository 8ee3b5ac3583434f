"""A hostile member: one node of the cluster runs a modified client.

It is a member like the others (its events are signed with its own key), but besides
its person's ordinary edits it records events that no honest client makes — through the
library, as a modified client would (``Share.commit``, ``FileState.write`` and the
journal): paths that leave the share or cannot exist, links to outside the share with
files recorded through them, a ``.backerignore`` that is a link, a folder or 2 MiB,
sizes and contents that lie, kind changes, one version id at two paths, times at the
ends of the range, floods of tiny events, versions under another member's name; it
may stop answering chunk requests half way through a transfer, serve chunks and
manifests that do not hash to what they claim, answer that it lacks every chunk it is
asked for, never end a run of its events, or never acknowledge the events it is sent.

Every node lives in a sandbox directory: its share root, its home, a sentinel file and
an ``outside/`` directory (with its own sentinel) that the hostile links point to.
After every step nothing else may be in a sandbox, the sentinels are unchanged, and no
node's ignore rules come from anything but a regular file in its share.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from backer.fs.paths import is_valid
from backer.model import entropy
from backer.model.membership import EventKind
from backer.model.records import MAX_TIME_MS, Kind, Version, new_version_id
from backer.model.share import Share
from backer.protocol.wire import (
    Chunks,
    Done,
    Events,
    Manifests,
    Message,
    WantChunks,
    WantManifests,
)
from backer.scanner.content import manifest_of_bytes
from backer.scanner.ignore import IGNORE_FILE, read_rules

from .world import InvariantBroken

SENTINEL = "sentinel"
OUTSIDE = "outside"
SENTINEL_BYTES = b"*\n"  # as rules it would ignore everything: read through a link, it shows
ABSOLUTE_TRAP = "/dev/shm/backer-sim-hostile-trap"  # a path no node may ever create
EMPTY = manifest_of_bytes(b"").id
BIG_RULES = b"# a rule file far above the size backer reads\n" * (2 * 1024 * 1024 // 47 + 1)
FLOOD = 150  # tiny events in one flood (bounded)

BAD_PATHS = [
    "../outside/pwn",
    "a/../../outside/pwn",
    ABSOLUTE_TRAP + "/pwn",
    "a//pwn",
    "./pwn",
    "a/.",
    "nul\0pwn",
    "a\\..\\..\\outside\\pwn",
    ".backer/pwn",
    ".Backer/backer.db",
    "p" * 256,
    "/".join(["d" * 200] * 21) + "/pwn",  # 4,221 bytes: longer than PATH_MAX
    "",
]
TO_SENTINEL = f"../{OUTSIDE}/{SENTINEL}".encode()
LINK_TARGETS = [b"../outside", b"..", b"../..", TO_SENTINEL]
TIMES = [0, 1, MAX_TIME_MS, MAX_TIME_MS + 1, 2**63 - 1]
MTIMES = [0, -(2**63), 2**63 - 1, -1]
SIZES = [0, 1, 2**50, 2**50 + 1, 2**64 - 1]
CRAFTS = [
    "bad_path",  # refused by every honest node
    "escape_link",  # a link out of the share, then files recorded through it
    "nested_link",  # a folder holding such a link, and files below the link
    "through_link",  # later: a file below a link recorded before (on disk by now)
    "ignore_link",  # .backerignore recorded as a link (to the outside sentinel)
    "ignore_folder",  # .backerignore recorded as a folder holding a file
    "ignore_big",  # its person writes a 2 MiB .backerignore
    "lying_size",  # a real content under a size it does not have
    "unknown_content",  # a content id nobody holds
    "kind_change",  # file -> folder -> link at one path
    "same_id",  # one version id at two paths
    "time",  # version times and file times at the ends of their ranges
    "flood",  # many tiny events
    "spoof",  # a version under another member's name
    "mute",  # stops answering chunk and manifest requests
    "tamper",  # serves chunks and manifests that do not hash to what they claim
    "deaf",  # never acknowledges the events it is sent (no Done), while it pings
    "stingy",  # answers every chunk request saying it lacks each chunk (R71)
    "hoard",  # never ends a run of its events: honest nodes hold them, unverified (R70)
]


def reason_kind(reason: str) -> str:
    """A refusal without its particulars (paths, ids, numbers), to count it by kind."""
    particulars = r"'[^']*'|\"[^\"]*\"|\S*\d\S*|\.\.\.|\b[\w-]{12}\b"  # (12: a version id)
    return re.sub(r"\s+", " ", re.sub(particulars, "", reason)).strip()


@dataclass
class Sandbox:
    """A node's box: its share root, its home, a sentinel and the outside directory.
    Its person may write outside the share through a link of theirs (``f`` -> ``../g``):
    what the box holds after each of the person's edits is what backer must leave."""

    box: Path
    root_name: str
    expected: dict[str, bytes] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.box / self.root_name

    @property
    def home(self) -> Path:
        return self.box / "home"

    def make(self) -> None:
        (self.box / OUTSIDE).mkdir(parents=True)
        self.root.mkdir()
        (self.box / SENTINEL).write_bytes(SENTINEL_BYTES)
        (self.box / OUTSIDE / SENTINEL).write_bytes(SENTINEL_BYTES)
        self.person_edited()

    def person_edited(self) -> None:
        self.expected = self._outside()

    def _outside(self) -> dict[str, bytes]:
        """Everything in the box but the share and the home: name -> bytes (a link:
        its target, a directory: nothing)."""
        found: dict[str, bytes] = {}
        for dirpath, dirnames, filenames in os.walk(self.box):
            if dirpath == os.fspath(self.box):
                dirnames[:] = [d for d in dirnames if d not in (self.root_name, "home")]
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                relative = os.path.relpath(path, self.box)
                if os.path.islink(path):
                    found[relative] = b"-> " + os.fsencode(os.readlink(path))
                elif os.path.isdir(path):
                    found[relative] = b"/"
                else:
                    with open(path, "rb") as handle:
                        found[relative] = handle.read()
        return found

    def check(self, name: str) -> None:
        """Nothing was written outside the share root and the home since the person's
        last edit (the sentinels unchanged); the rules come only from a regular file in
        the share."""
        now = self._outside()
        if now != self.expected:
            changed = sorted(
                p for p in now.keys() | self.expected if now.get(p) != self.expected.get(p)
            )
            raise InvariantBroken(f"{name} wrote outside its share: {changed[:5]}")
        rules = self.root / IGNORE_FILE
        own = rules.read_bytes() if rules.is_file() and not rules.is_symlink() else b""
        if read_rules(self.root)[0] not in ("", own.decode("utf-8", "replace")):
            raise InvariantBroken(f"{name} read its ignore rules from outside its share")


def check_sandboxes(base: Path, boxes: list[Sandbox], names: list[str]) -> None:
    for box, name in zip(boxes, names, strict=True):
        box.check(name)
    if os.path.lexists(ABSOLUTE_TRAP):
        raise InvariantBroken(f"a node wrote the absolute path {ABSOLUTE_TRAP}")
    extra = [n for n in os.listdir(base) if not re.fullmatch(r"box\d+|backup\d+", n)]
    if extra:
        raise InvariantBroken(f"a node wrote beside the sandboxes: {sorted(extra)}")


@dataclass
class Hostile:
    """The hostile member's modified client and what the others refused of it."""

    index: int
    device: bytes
    crafted: set[str] = field(default_factory=set)  # version ids it crafted
    refusals: Counter[str] = field(default_factory=Counter)
    crafts: int = 0
    crashes: int = 0  # its own client failed on what it crafted (not a bug of backer's)
    mute: bool = False
    tamper: bool = False
    deaf: bool = False
    stingy: bool = False
    hoard: bool = False

    def refused(self, reason: str) -> None:
        """An honest node closed its session with the hostile one: with a reason."""
        if not reason.strip():
            raise InvariantBroken("a node refused the hostile member without a reason")
        self.refusals[reason_kind(reason)] += 1

    def drops(self, message: Message) -> bool:
        """Whether the hostile node, muted, leaves ``message`` unanswered."""
        return self.mute and isinstance(message, WantChunks | WantManifests)

    def withholds(self, message: Message) -> bool:
        """Whether the hostile node, deaf, does not send ``message``: it takes the events
        honest nodes send it and never acknowledges them (real nodes close such a
        session after ``transport.Limits.acknowledge_s``; here the link stays, and the
        honest nodes must converge among themselves all the same)."""
        return self.deaf and isinstance(message, Done)

    def forge(self, message: Message) -> Message:
        """What the hostile node sends instead of ``message`` when it tampers, answers
        that it lacks every chunk asked of it (stingy: real nodes drop such a peer
        after ``transport.Limits.request_s``, as such an answer does not restart the
        clock; here the honest nodes must get the chunks elsewhere or go without), or
        never ends a run of its events (hoard: real nodes close the session after
        ``Limits.run_s``; here honest nodes hold the run, within the session's caps)."""
        if self.stingy and isinstance(message, Chunks):
            return Chunks(message.hashes, [b""] * len(message.hashes))
        if self.hoard and isinstance(message, Events):
            return Events(b"", message.events, 1)
        if not self.tamper:
            return message
        if isinstance(message, Chunks) and any(message.data):
            data = list(message.data)
            at = next(i for i, chunk in enumerate(data) if chunk)  # the first it holds
            data[at] = bytes([data[at][0] ^ 1]) + bytes(data[at][1:])
            return Chunks(message.hashes, data)
        if isinstance(message, Manifests):
            return Manifests(message.ids, [b + b"\0" * 40 if b else b for b in message.bodies])
        return message

    def craft(self, share: Share, kind: str, pick: int, others: list[bytes]) -> None:
        """Record one crafted change (``kind``, varied by ``pick``) in ``share``'s journal."""
        self.crafts += 1
        if kind == "mute":
            self.mute = True
            return
        if kind == "tamper":
            self.tamper = True
            return
        if kind in ("deaf", "stingy", "hoard"):
            setattr(self, kind, True)
            return
        device, now = share.device[:8], entropy.now_ms()
        live_file = self._a_live_file(share, pick)
        stamp = entropy.now_ns()  # (a folder applied without a time would keep the real
        # clock's, and the harness would move it to the seeded clock's behind backer's back)
        empty = Version(Kind.FILE, 0, stamp, 0o644, EMPTY, device, now)
        folder = Version(Kind.DIRECTORY, 0, stamp, 0o755, b"", device, now)
        payload = live_file or empty
        link = LINK_TARGETS[pick % len(LINK_TARGETS)]
        batches: list[list[tuple[str, Version]]]
        if kind == "bad_path":
            batches = [[(BAD_PATHS[pick % len(BAD_PATHS)], payload)]]
        elif kind == "escape_link":
            name = ["lnk", "f", "a"][pick % 3]
            through = [(f"{name}/pwn", payload), (f"{name}/{SENTINEL}", payload)]
            symlink = (name, Version(Kind.SYMLINK, content=link, device=device, time_ms=now))
            batches = [[symlink, *through]] if pick % 2 else [[symlink], through]
        elif kind == "nested_link":
            symlink = Version(Kind.SYMLINK, content=b"../" + link, device=device, time_ms=now)
            batches = [[("d", folder), ("d/lnk", symlink)], [("d/lnk/sub/pwn", payload)]]
        elif kind == "through_link":
            links = sorted(p for p, _, v in share.catalog.all_live() if v.kind == Kind.SYMLINK)
            batches = [[(f"{links[pick % len(links)]}/pwn", payload)]] if links else []
        elif kind == "ignore_link":
            symlink = Version(Kind.SYMLINK, content=TO_SENTINEL, device=device, time_ms=now)
            batches = [[(IGNORE_FILE, self._over(share, IGNORE_FILE, symlink))]]
        elif kind == "ignore_folder":
            batches = [[(IGNORE_FILE, self._over(share, IGNORE_FILE, folder))],
                       [(IGNORE_FILE + "/f", payload)]]  # fmt: skip
        elif kind == "lying_size":
            batches = [[("f", dataclasses.replace(payload, size=SIZES[pick % len(SIZES)]))]]
        elif kind == "unknown_content":
            content = entropy.token(32)
            batches = [[("g", dataclasses.replace(payload, content=content, size=1 + pick))]]
        elif kind == "kind_change":
            path = ["a/c", "f", "b"][pick % 3]
            symlink = Version(Kind.SYMLINK, content=link, device=device, time_ms=now)
            batches = [[(path, v)] for v in (payload, folder, symlink)[pick % 3 :]]
        elif kind == "same_id":
            self._same_id(share, payload, pick)
            return
        elif kind == "time":
            stamped = dataclasses.replace(payload, time_ms=TIMES[pick % len(TIMES)])
            batches = [[("f", dataclasses.replace(stamped, mtime_ns=MTIMES[pick % len(MTIMES)]))]]
        elif kind == "flood":
            batches = [[(f"flood/{n:03}", empty)] for n in range(FLOOD)]
        elif kind == "spoof":
            name = others[pick % len(others)][:8]
            batches = [[(["f", "a/f", "g"][pick % 3], dataclasses.replace(payload, device=name))]]
        else:
            raise ValueError(f"unknown craft {kind!r}")
        for batch in batches:
            self._commit(share, [(path, self._over(share, path, v)) for path, v in batch])

    def _commit(self, share: Share, versions: list[tuple[str, Version]]) -> None:
        """Record ``versions`` as they are, unchecked (as a modified client can)."""
        writes = [(path, new_version_id(), version) for path, version in versions]
        self.crafted.update(vid for _, vid, _ in writes)
        update, delta = share.state.write(writes)
        share._append(EventKind.STATE, update, delta)

    def _same_id(self, share: Share, version: Version, pick: int) -> None:
        vid = new_version_id()
        self.crafted.add(vid)
        paths = [("f", "g"), ("a/f", "b/g"), ("f", "a/f")][pick % 3]
        update, delta = share.state.write([(p, vid, self._over(share, p, version)) for p in paths])
        share._append(EventKind.STATE, update, delta)

    @staticmethod
    def _over(share: Share, path: str, version: Version) -> Version:
        """``version`` superseding what is live at ``path`` (if the path is valid)."""
        live = share.catalog.live_versions(path) if is_valid(path) else {}
        return dataclasses.replace(version, supersedes=tuple(sorted(live)))

    @staticmethod
    def _a_live_file(share: Share, pick: int) -> Version | None:
        files = sorted(
            (path, vid, v) for path, vid, v in share.catalog.all_live() if v.kind == Kind.FILE
        )
        return files[pick % len(files)][2] if files else None

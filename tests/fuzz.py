"""Fuzz targets: every decoder a peer (or a pasted token) can reach, each of which must
either accept its input or reject it with its own exception type — nothing else.

``tests/test_fuzz.py`` runs them under hypothesis on every test run (bounded);
``tests/fuzz_campaign.py`` runs them coverage-guided for as long as asked. Inputs that
once crashed a target are kept in ``tests/fuzz_cases/`` (named ``TARGET-anything``)
and replayed on every test run.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nacl.signing

from backer.connections.addresses import AddressBook
from backer.discover.lan import Beacon, lan_key, seal, unseal
from backer.errors import BackerError
from backer.model.records import BadVersion, Kind, Version
from backer.model.share import Share
from backer.model.state import BadUpdate, FileState
from backer.protocol.announce import Announcement
from backer.protocol.invite import InviteToken
from backer.protocol.session import Session
from backer.protocol.wire import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Addresses,
    Events,
    FrameReader,
    Hello,
    Manifests,
    Message,
    ProtocolError,
    Summary,
)
from backer.scanner.content import BadManifest, Manifest, check_manifest, manifest_of_bytes
from journal import Checkpoint, Event, InvalidEvent

CASES = Path(__file__).parent / "fuzz_cases"
_KEY = nacl.signing.SigningKey(bytes(range(32)))
_OTHER_CLIENT = 7  # a client id "owned by another device" in the state target
_PEER = nacl.signing.SigningKey(bytes(range(1, 33)))  # announces addresses
_LAN_KEYS = [(bytes(16), lan_key(bytes(32)))]


def _base_state() -> tuple[bytes, int, list[bytes]]:
    """A small document, the client id that wrote it, and updates of every shape."""
    state = FileState()
    updates = []
    for n, version in enumerate(
        [
            Version(Kind.FILE, 5, 1, 0o644, bytes(32), b"d" * 8, 1),
            Version(Kind.DIRECTORY, device=b"d" * 8, time_ms=2),
            Version(Kind.SYMLINK, 3, content=b"../x", device=b"d" * 8, time_ms=3),
        ]
    ):
        update, _ = state.write([(f"p{n}/f", f"AAAAAAAAAAA{n}", version)])
        updates.append(update)
    update, _ = state.write(
        [("p0/f", "BBBBBBBBBBBB", Version(Kind.DELETED, supersedes=("AAAAAAAAAAA0",)))]
    )
    updates.append(update)
    return state.snapshot(), state.doc.client_id, updates


_SNAPSHOT, _OWN_CLIENT, _UPDATES = _base_state()


def frames(data: bytes) -> None:
    """Wire framing and every message body."""
    with contextlib.suppress(ProtocolError):
        list(FrameReader().feed(data))


def events(data: bytes) -> None:
    """Journal events and checkpoints, signatures included."""
    with contextlib.suppress(InvalidEvent):
        Event.decode(data).verify()
    with contextlib.suppress(InvalidEvent):
        Checkpoint.decode(data).verify()


def state(data: bytes) -> None:
    """STATE payloads: the parser, the checks against a document, then yrs itself (a
    panic is a BaseException: it fails the target)."""
    document = FileState(_SNAPSHOT)
    try:
        shape = document.check(data, lambda client: client == _OTHER_CLIENT)
        document.apply(data, shape)
        document.snapshot()  # an accepted update must leave a document yrs can encode
    except BadUpdate:
        pass
    finally:
        document.close()


def versions(data: bytes) -> None:
    """Version records, as decoded from the replicated state."""
    with contextlib.suppress(BadVersion):
        Version.decode(data).check()


def manifests(data: bytes) -> None:
    """Manifests as received, checked against a declared size (the first 8 bytes)."""
    size = int.from_bytes(data[:8], "big")
    with contextlib.suppress(BadManifest):
        check_manifest(Manifest.decode(data[8:]), size)


def invites(data: bytes) -> None:
    """Invite tokens as pasted by a user: any text."""
    with contextlib.suppress(BackerError):
        InviteToken.decode(data.decode("utf-8", "replace"))


def announcements(data: bytes) -> None:
    """Signed announcements of listen addresses, as gossiped by members."""
    with contextlib.suppress(ValueError):
        Announcement.decode(data)


def lan(data: bytes) -> None:
    """LAN discovery datagrams, as anyone on the network can send them."""
    unseal(data, _LAN_KEYS)


_member: list[Share] = []  # the share of the ``session`` target, while one is open


@contextlib.contextmanager
def member_share(base: Path) -> Iterator[Share]:
    """The share (one file) a ``session`` target's member holds, made under ``base``
    (a test's temp dir, removed by its owner) and closed when the block ends."""
    root, home = base / "share", base / "home"
    root.mkdir()
    (root / "a.txt").write_bytes(b"content")
    share = Share.create(root, _KEY, home=home)
    _member.append(share)
    try:
        yield share
    finally:
        _member.remove(share)
        share.close()


def _share() -> Share:
    """The share of the innermost ``member_share`` block; outside one (the campaign, a
    plain process), one in a temp dir that is removed when the process exits."""
    if not _member:
        base = Path(tempfile.mkdtemp(prefix="backer-fuzz-"))
        atexit.register(shutil.rmtree, base, True)
        member_share(base).__enter__()
    return _member[-1]


def session(data: bytes) -> None:
    """Whole messages as a connected member would send them, handled by a live session."""
    share = _share()
    receiver = Session(share, "fuzz", addresses=AddressBook(share.catalog, share.share_id, _KEY))
    try:
        for message in FrameReader().feed(data):
            receiver.receive(message)
    except ProtocolError:
        pass
    finally:
        receiver.close()
        _share().db.conn.rollback()


TARGETS: dict[str, Callable[[bytes], None]] = {
    f.__name__: f
    for f in (frames, events, state, versions, manifests, invites, session, announcements, lan)
}


def seeds() -> dict[str, list[bytes]]:
    """Valid inputs of every target: where mutation starts."""
    event = Event.create(_KEY, 0, bytes(32), 1, 3, _UPDATES[0])
    checkpoint = Checkpoint.create(_KEY, 1, bytes(32))
    manifest = manifest_of_bytes(bytes(range(256)) * 400)
    messages = [_sample(cls) for cls in MESSAGE_TYPES.values()]
    messages.append(dataclasses.replace(_sample(Events), events=[event.raw]))
    messages.append(Manifests([manifest.id], [manifest.encoded]))
    token = InviteToken(bytes(16), bytes(16), bytes(32), bytes(32), ("127.0.0.1:7654",))
    announcement = Announcement.make(
        _PEER, _share().share_id, 1, [("10.0.0.1", 7654), ("fd00::1", 7654)]
    ).raw
    opening = Hello(PROTOCOL_VERSION, b"fuzz").encode() + Summary([], 0).encode()
    return {
        "frames": [m.encode() for m in messages],
        "events": [event.raw, checkpoint.encode()],
        "state": [*_UPDATES, _SNAPSHOT],
        "versions": [
            Version(Kind.FILE, 5, 1, 0o644, bytes(32), b"d" * 8, 1, ("AAAAAAAAAAAA",)).encode()
        ],
        "manifests": [manifest.size.to_bytes(8, "big") + manifest.encoded],
        "invites": [token.encode().encode()],
        "session": [
            opening,
            opening + Addresses([announcement]).encode(),
            *(m.encode() for m in messages),
        ],
        "announcements": [announcement],
        "lan": [seal(Beacon(bytes(16), bytes(32), 1, 7654), _LAN_KEYS[0][1])],
    }


def _sample(cls: type[Message]) -> Message:
    """A well-formed message of any type, whatever its fields."""
    values: list[object] = []
    for field in dataclasses.fields(cls):
        kind = str(field.type)
        blob = kind.startswith("bytes")  # (a chunk's data: ``bytes | memoryview``)
        values.append(1 if kind == "int" else b"x" * 32 if blob else [b"x" * 32])
    return cls(*values)


def saved_cases() -> list[tuple[str, bytes]]:
    """Inputs that once crashed a target, kept as regression cases."""
    if not CASES.is_dir():
        return []
    return [(p.name.split("-")[0], p.read_bytes()) for p in sorted(CASES.iterdir())]


def one_input(data: bytes) -> None:
    """The campaign's entry: the first byte picks the target."""
    if data:
        names = list(TARGETS)
        TARGETS[names[data[0] % len(names)]](data[1:])

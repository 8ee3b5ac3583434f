"""The replicated file state: one pycrdt ``Doc`` per share, a multi-value register per path.

Each version of a path is its own key, ``path \\0 version-id``, written once and never
again, so two devices can never write the same key concurrently (Yjs would keep one
value and silently drop the other). Writing a version deletes the keys of the versions
it supersedes; the live versions of a path are simply the keys still present, and
two or more of them are a conflict. Deleting a key that a peer concurrently
superseded too is harmless: deletes commute.

Every change, local or remote, comes out of :meth:`FileState.apply` or
:meth:`FileState.write` as a :class:`Delta`, from one observer, so the SQLite catalog
is maintained by a single code path. Updates must be applied in causal order (each
device's journal order): a version that arrives already deleted is integrated and
removed in one step and never shows up in a delta.

A received update is hostile until checked. :func:`parse_update` reads the Yjs v1
encoding itself and accepts only what :meth:`FileState.write` produces: items of the
root map ``files`` holding one byte string, under client ids bound to the event's author
(:meth:`FileState.check`; a device declares each id it derives, see :func:`derive_client`),
continuing from what the document already holds. Only then is it handed to yrs, whose
failures (including panics, which are BaseExceptions) become :class:`BadUpdate` too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from blake3 import blake3
from pycrdt import Doc, Map, MapEvent, TransactionEvent

from backer.fs.paths import BadPath, check
from backer.model import entropy
from backer.model.records import BadVersion, Version, check_version_id, make_key, split_key

ROOT = "files"
MAX_CLIENT = 2**53  # Yjs client ids are JavaScript-safe integers
MAX_CLOCK = 2**32  # yrs counts clocks in 32 bits
CLIENT_NONCE_BYTES = 16
_ANY = 8  # Yjs content refs
_DELETED = 1
_GC = 0
_SKIP = 10
_BUFFER = 116  # lib0 "any" type tag of a byte string
_ORIGIN, _RIGHT_ORIGIN, _PARENT_SUB = 0x80, 0x40, 0x20


class BadUpdate(ValueError):
    """A received event that must not be applied: a STATE payload that is malformed,
    out of range or touching what its author does not own, or an event out of range."""


@dataclass
class UpdateShape:
    """What a parsed update would do: per client id the clock range it adds, the
    ``(key, value)`` of each item that names its key, and the ids its items continue;
    once :meth:`FileState.check` accepted it, each key's checked value (checked once: a
    first sync of a large share receives 100,000s of them)."""

    clients: dict[int, tuple[int, int]] = field(default_factory=dict)
    writes: list[tuple[str, bytes]] = field(default_factory=list)
    origins: list[tuple[int, int]] = field(default_factory=list)
    checked: dict[str, bytes] = field(default_factory=dict)  # by check()


class _Cursor:
    """Bounds-checked reads of lib0 encodings."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def uint(self, limit: int = 2**64) -> int:
        value = shift = 0
        while True:
            if self.offset >= len(self.data):
                raise BadUpdate("update is truncated")
            byte = self.data[self.offset]
            self.offset += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise BadUpdate("integer too long")
        if value >= limit:
            raise BadUpdate(f"integer {value} is out of range")
        return value

    def byte(self) -> int:
        if self.offset >= len(self.data):
            raise BadUpdate("update is truncated")
        self.offset += 1
        return self.data[self.offset - 1]

    def raw(self) -> bytes:
        size = self.uint(len(self.data) + 1)
        if self.offset + size > len(self.data):
            raise BadUpdate("update is truncated")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def text(self) -> str:
        try:
            return self.raw().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadUpdate("a string is not UTF-8") from exc


def check_entry(key: str, value: bytes) -> tuple[str, str, Version]:
    """``(path, version id, version)`` of a state entry; raise :class:`BadUpdate` unless
    the path is a valid share path, the id one a device makes, the record in range."""
    if not isinstance(value, bytes | bytearray):  # yrs hands byte strings back as either
        raise BadUpdate(f"an entry whose value is a {type(value).__name__}")
    try:
        path, version_id = split_key(key)
        return check(path), check_version_id(version_id), Version.decode(value).check()
    except (BadPath, BadVersion) as exc:
        raise BadUpdate(f"bad entry: {exc}") from exc


def parse_update(update: bytes) -> UpdateShape:
    """Read a Yjs v1 update, accepting only what :meth:`FileState.write` makes (plus
    garbage-collected and skipped ranges); raise :class:`BadUpdate` otherwise."""
    reader = _Cursor(bytes(update))
    shape = UpdateShape()
    for _ in range(reader.uint(len(reader.data) + 1)):
        count = reader.uint(len(reader.data) + 1)
        client = reader.uint(MAX_CLIENT)
        start = clock = reader.uint(MAX_CLOCK)
        if client in shape.clients:
            raise BadUpdate(f"client {client} appears twice")
        if not count:
            raise BadUpdate(f"client {client} has no items")
        for _ in range(count):
            info = reader.byte()
            ref = info & 0x1F
            if ref in (_GC, _SKIP):
                length = reader.uint(MAX_CLOCK)
                if not length:  # yrs takes it, then panics dividing by it (snapshots)
                    raise BadUpdate("an empty garbage-collected range")
                clock += length
            else:
                clock += _item(reader, info, shape)
            if clock > MAX_CLOCK:
                raise BadUpdate("clock out of range")
        shape.clients[client] = (start, clock)
    for _ in range(reader.uint(len(reader.data) + 1)):  # the delete set: any client's items
        reader.uint(MAX_CLIENT)
        for _ in range(reader.uint(len(reader.data) + 1)):
            if reader.uint(MAX_CLOCK) + reader.uint(MAX_CLOCK) > MAX_CLOCK:
                raise BadUpdate("deleted range out of range")
    if reader.offset != len(reader.data):
        raise BadUpdate("update has trailing bytes")
    return shape


def _item(reader: _Cursor, info: int, shape: UpdateShape) -> int:
    """Read one item of the ``files`` map; return its length in clock ticks."""
    if info & _RIGHT_ORIGIN:
        raise BadUpdate("an item with a right origin (not a map entry)")
    key = None
    if info & _ORIGIN:  # continues an existing entry: its key is the origin's
        shape.origins.append((reader.uint(MAX_CLIENT), reader.uint(MAX_CLOCK)))
    else:
        if reader.uint(2) != 1 or reader.text() != ROOT:
            raise BadUpdate(f"an item outside the {ROOT!r} map")
        if not info & _PARENT_SUB:
            raise BadUpdate("an item without a key")
        key = reader.text()
    ref = info & 0x1F
    if ref == _DELETED:
        length = reader.uint(MAX_CLOCK)
        if not length:
            raise BadUpdate("an empty deleted item")
        return length
    if ref != _ANY or reader.uint() != 1 or reader.byte() != _BUFFER:
        raise BadUpdate("an entry whose value is not one byte string")
    value = reader.raw()
    if key is not None:
        shape.writes.append((key, value))
    return 1


def derive_client(device: bytes, nonce: bytes) -> int:
    """The Yjs client id that ``device`` declares with ``nonce`` (a CLIENT event): a hash
    of its own key, so no other device can declare it and take its items for its own."""
    digest = blake3(b"backer yjs client" + device + nonce).digest()[:8]
    return int.from_bytes(digest, "big") & (MAX_CLIENT - 1)


@dataclass
class Delta:
    """Keys that became live (each with its encoded version, the bytes the catalog
    stores: a first sync's run of events holds 100,000s of them until it is stored,
    and a decoded :class:`Version` costs twice the bytes) and keys that stopped being
    live in one transaction."""

    added: dict[str, bytes] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class FileState:
    """The CRDT document. A fresh Yjs client id every time one is created (a reused id
    with a lost state would let two updates claim the same clock), derived from
    ``device`` and a fresh ``nonce`` that the share declares before its first write."""

    def __init__(self, snapshot: bytes | None = None, device: bytes = bytes(32)) -> None:
        self.nonce = entropy.token(CLIENT_NONCE_BYTES)
        self.doc: Doc = Doc(client_id=derive_client(device, self.nonce))
        self.files: Map = self.doc.get(ROOT, type=Map)
        self._delta = Delta()
        self._added: dict[str, bytes] = {}  # raw values: decoded once the transaction is over
        self._update = b""
        if snapshot:
            self.doc.apply_update(snapshot)
        self._subscriptions = (
            self.files.observe(self._on_files),
            self.doc.observe(self._on_transaction),
        )

    def close(self) -> None:
        """Drop the observers: yrs holds them, and with them this whole document (a
        document replaced after a refused update would otherwise never be freed)."""
        self.files.unobserve(self._subscriptions[0])
        self.doc.unobserve(self._subscriptions[1])

    def _on_files(self, event: MapEvent) -> None:
        for key, change in event.keys.items():
            if change["action"] in ("add", "update"):
                self._added[key] = change["newValue"]
                continue
            was_added_here = self._added.pop(key, None) is not None
            if change["action"] == "delete" and not was_added_here:
                self._delta.removed.append(key)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self._update = event.update

    def _take(self, checked: dict[str, bytes] | None = None) -> tuple[bytes, Delta]:
        """The transaction's update and delta. With ``checked`` (a received update's
        checked entries), every entry not among them with that very value is checked."""
        update, delta, added = self._update, self._delta, self._added
        self._reset()
        for key, value in added.items():
            record = bytes(value)  # (yrs may hand back a bytearray)
            if checked is not None and checked.get(key) != record:
                check_entry(key, record)
            delta.added[key] = record
        return update, delta

    def write(
        self,
        versions: Iterable[tuple[str, str, Version]],
        removals: Iterable[tuple[str, str]] = (),
    ) -> tuple[bytes, Delta]:
        """Record local versions ``(path, version_id, version)`` and remove the keys
        ``(path, version_id)`` of ``removals``, in one transaction.

        Returns the update bytes (the payload of the journal event) and the delta.
        """
        with self.doc.transaction():
            for path, version_id in removals:
                key = make_key(path, version_id)
                if key in self.files:
                    del self.files[key]
            for path, version_id, version in versions:
                self.files[make_key(path, version_id)] = version.encode()
                for old in version.supersedes:
                    old_key = make_key(path, old)
                    if old_key in self.files:
                        del self.files[old_key]
        return self._take()

    def apply(self, update: bytes, shape: UpdateShape | None = None) -> Delta:
        """Merge an update that :meth:`check` accepted (its ``shape``: the entries it
        checked are not checked again).

        Raises :class:`BadUpdate` if yrs fails or the result holds an invalid entry; the
        document may then be half-changed and must be reloaded (see Share)."""
        try:
            self.doc.apply_update(update)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # yrs panics surface as BaseExceptions
            self._reset()
            raise BadUpdate(f"the CRDT could not apply it: {type(exc).__name__}: {exc}") from exc
        return self._take(shape.checked if shape is not None else {})[1]

    def _reset(self) -> None:
        self._update, self._delta, self._added = b"", Delta(), {}

    def clock(self) -> dict[int, int]:
        """The document's state vector: per client id, the next clock it expects."""
        reader = _Cursor(self.doc.get_state())
        vector = {}
        for _ in range(reader.uint()):
            client = reader.uint()
            vector[client] = reader.uint()
        return vector

    def check(self, update: bytes, refusal: Callable[[int], str | None]) -> UpdateShape:
        """Raise :class:`BadUpdate` unless ``update`` may be applied: well-formed (see
        :func:`parse_update`), every entry it names valid, no item under a client id for
        which ``refusal`` gives a reason (one not bound to the event's author), no gap
        after what the document holds, and every entry it continues already present."""
        shape = parse_update(update)
        for key, value in shape.writes:
            check_entry(key, value)
            shape.checked[key] = value
        vector = self.clock()
        for client, (start, _) in shape.clients.items():
            reason = refusal(client)
            if reason is not None:
                raise BadUpdate(reason)
            if start > vector.get(client, 0):
                raise BadUpdate(f"client id {client} skips clocks {vector.get(client, 0)}..{start}")
        for client, clock in shape.origins:
            known = max(vector.get(client, 0), shape.clients.get(client, (0, 0))[1])
            if clock >= known:
                raise BadUpdate("an item continues an entry this device does not hold")
        return shape

    def snapshot(self) -> bytes:
        """The whole document, for the start-up checkpoint kept in SQLite."""
        return self.doc.get_update()

    def live(self) -> Iterator[tuple[str, str, Version]]:
        """Every live ``(path, version_id, version)``; walks the whole document."""
        for key, value in self.files.items():
            path, version_id = split_key(key)
            yield path, version_id, Version.decode(value)

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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pycrdt import Doc, Map, MapEvent, TransactionEvent

from . import entropy
from .records import Version, make_key, split_key

ROOT = "files"


@dataclass
class Delta:
    """Keys that became live and keys that stopped being live in one transaction."""

    added: dict[str, Version] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class FileState:
    """The CRDT document. A fresh random Yjs client id every time one is created
    (a reused id with a lost state would let two updates claim the same clock)."""

    def __init__(self, snapshot: bytes | None = None) -> None:
        self.doc: Doc = Doc(client_id=entropy.client_id())
        self.files: Map = self.doc.get(ROOT, type=Map)
        self._delta = Delta()
        self._update = b""
        if snapshot:
            self.doc.apply_update(snapshot)
        self.files.observe(self._on_files)
        self.doc.observe(self._on_transaction)

    def _on_files(self, event: MapEvent) -> None:
        for key, change in event.keys.items():
            if change["action"] in ("add", "update"):
                self._delta.added[key] = Version.decode(change["newValue"])
                continue
            was_added_here = self._delta.added.pop(key, None) is not None
            if change["action"] == "delete" and not was_added_here:
                self._delta.removed.append(key)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self._update = event.update

    def _take(self) -> tuple[bytes, Delta]:
        update, delta = self._update, self._delta
        self._update, self._delta = b"", Delta()
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

    def apply(self, update: bytes) -> Delta:
        """Merge a remote (or replayed) update; idempotent and order-free."""
        self.doc.apply_update(update)
        return self._take()[1]

    def snapshot(self) -> bytes:
        """The whole document, for the start-up checkpoint kept in SQLite."""
        return self.doc.get_update()

    def live(self) -> Iterator[tuple[str, str, Version]]:
        """Every live ``(path, version_id, version)``; walks the whole document."""
        for key, value in self.files.items():
            path, version_id = split_key(key)
            yield path, version_id, Version.decode(value)

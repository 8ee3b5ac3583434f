"""Signed, hash-chained, per-author append-only logs in SQLite, with merkle catch-up.

The package knows nothing of files: payloads are opaque bytes tagged with a kind.
"""

from .event import Checkpoint, Event, InvalidEvent
from .store import CorruptJournal, Fork, IngestResult, Journal, JournalError, Range, RejectedBatch

__all__ = [
    "Checkpoint",
    "CorruptJournal",
    "Event",
    "Fork",
    "IngestResult",
    "InvalidEvent",
    "Journal",
    "JournalError",
    "Range",
    "RejectedBatch",
]

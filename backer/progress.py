"""Progress of a long command (scan, verify, sync, join): files and bytes done of their
totals, the rate and the time left, computed by ``rich.progress``.

On a terminal it is one live line on stderr. Otherwise (a log, systemd) it is a plain
line on stderr at most every ``BACKER_PROGRESS_INTERVAL`` seconds (10 by default), the
first only once that long has passed, so short runs print nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from backer.errors import BackerError

INTERVAL_ENV = "BACKER_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0
RECENT_S = 2.0  # rich's rate is of the bytes that last arrived: older than this, stale

ProgressCallback = Callable[[int, int, int, int], None]
"""Called as ``progress(files_done, files_total, bytes_done, bytes_total)``."""


def interval() -> float:
    """Seconds between plain progress lines, from the environment (for logs and tests)."""
    text = os.environ.get(INTERVAL_ENV, "")
    if not text:
        return DEFAULT_INTERVAL
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # (also NaN)
        raise BackerError(f"{INTERVAL_ENV} must be a number of seconds, not {text!r}")
    return seconds


def _speed(task: Task) -> float | None:
    """Bytes/s: rich's estimate from the last samples while bytes keep arriving; else
    the average since the step began. rich's alone said '?' until a second update
    (for the whole of a transfer done in one or two) and, when bytes stopped coming
    (a slow peer, the last files committed), showed their last rate and time left
    for as long as the stall lasted."""
    if task.finished_speed:
        return task.finished_speed
    moved_at = task.fields.get("moved_at")
    if task.speed and moved_at is not None and time.monotonic() - moved_at < RECENT_S:
        return task.speed
    elapsed = task.elapsed
    return task.completed / elapsed if task.completed and elapsed else None


class _Rate(TransferSpeedColumn):
    """rich's transfer speed, from :func:`_speed`."""

    def render(self, task: Task) -> Text:
        speed = _speed(task)
        shown = "?" if speed is None else f"{filesize.decimal(int(speed))}/s"
        return Text(shown, style="progress.data.speed")


class _TimeLeft(TimeRemainingColumn):
    """rich's time remaining, from :func:`_speed`."""

    def render(self, task: Task) -> Text:
        speed = _speed(task)
        if task.total is None or speed is None:
            return Text("-:--:--", style="progress.remaining")
        minutes, seconds = divmod(math.ceil(max(task.total - task.completed, 0) / speed), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


def _columns() -> list[ProgressColumn]:
    """What both displays show: files, bytes, rate, time left."""
    return [
        TextColumn("{task.fields[files]}/{task.fields[files_total]} files"),
        DownloadColumn(),
        _Rate(),
        _TimeLeft(),
    ]


class Reporter:
    """The running display: call it with the counts; :meth:`phase` starts a new step
    (a sync scans, then receives) from zero under a new label."""

    def __init__(self, bar: Progress, label: str, lines_every: float | None) -> None:
        self.bar, self.label = bar, label
        self.task = bar.add_task(label, total=None, files=0, files_total=0)
        self.bytes_done = 0
        self.columns = _columns()
        self.every = lines_every  # None: live on a terminal, no plain lines
        self.next_at = time.monotonic() + (lines_every or 0.0)

    def __call__(
        self, files_done: int, files_total: int, bytes_done: int, bytes_total: int
    ) -> None:
        moved = {"moved_at": time.monotonic()} if bytes_done != self.bytes_done else {}
        self.bytes_done = bytes_done
        self.bar.update(
            self.task,
            completed=bytes_done,
            total=bytes_total or None,
            files=files_done,
            files_total=files_total,
            **moved,
        )
        self._line()

    def phase(self, label: str) -> None:
        if label != self.label:
            self.label = label
            self.bar.remove_task(self.task)  # (a reset would keep the old total)
            self.task = self.bar.add_task(label, total=None, files=0, files_total=0)
            self.bytes_done = 0

    def _line(self) -> None:
        """A plain line on stderr, unless one was printed less than ``every`` s ago."""
        now = time.monotonic()
        if self.every is None or now < self.next_at:
            return
        self.next_at = now + self.every
        task = next(t for t in self.bar.tasks if t.id == self.task)
        files, size, rate, left = (str(c.render(task)) for c in self.columns)
        print(f"backer: {self.label}: {files}, {size}, {rate}, {left} left", file=sys.stderr)
        sys.stderr.flush()


@contextlib.contextmanager
def reporter(label: str, quiet: bool = False) -> Iterator[Reporter | None]:
    """The progress display for the duration of the block (None when ``quiet``)."""
    if quiet:
        yield None
        return
    every = interval()
    live = sys.stderr.isatty()
    columns = [TextColumn("{task.description}"), BarColumn(), *_columns()]
    console = Console(stderr=True)
    with Progress(*columns, transient=True, console=console, disable=not live) as bar:
        yield Reporter(bar, label, None if live else every)

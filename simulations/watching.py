"""What ``backer run``'s watcher makes of a folder its person made or moved in.

The simulation's resident nodes scan the paths their person edited, as told by the
harness; a folder that appears with a whole tree inside is the one edit a real watcher
walks: it watches every folder below it, and watchdog's hook for the creations it
already holds is called (backer's answers none: the folder's own event makes the node
scan its subtree). Those walks run here for real (backer's ``_Watches`` over a real
inotify descriptor, closed at once), and the node scans what they report: a walk that
recursed raised RecursionError on a tree of 1,000 levels and killed the watcher's
thread (R35).
"""

from __future__ import annotations

import os
from pathlib import Path

from watchdog.observers.inotify_c import InotifyFD

from backer.scanner.watch import MASK, _Watches


def reported(root: Path, folder: str) -> list[str]:
    """``folder`` (relative to the share ``root``; its subtree is scanned) and whatever
    the watcher reports below it: its watches added over the whole share (as when it
    starts or rebuilds them), then watchdog's simulated creations for ``folder``."""
    share = os.fsencode(root)
    inotify = InotifyFD()
    try:
        watches = _Watches(inotify, share, event_mask=MASK, is_recursive=True)
        found = [folder]
        for event in watches._recursive_simulate(os.path.join(share, os.fsencode(folder))):
            where = os.path.join(watches._active_callbacks_by_watch[event.wd], event.name)
            found.append(os.fsdecode(os.path.relpath(where, share)))
        watches.deactivate()
    finally:
        inotify.close()
    return found

"""Where another filesystem, or a bind, is mounted inside a share.

A folder's device number tells a disk mounted there, not a bind of a folder of the same
filesystem (``mount --bind ~/Photos ~/Backer/photos``), which has the share's. Both are
gone at an unmount (a reboot, an unplugged disk), and what was below them would be
recorded as deleted on every device; so the mount table is read too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

MOUNT_TABLE = "/proc/self/mountinfo"  # (Linux; elsewhere the device number alone)
_ESCAPED = re.compile(rb"\\([0-7]{3})")  # a space, tab, newline or backslash in a path


class ShareDisk(NamedTuple):
    """The share's filesystem (its root's ``st_dev``) and the mount points below its root
    (share-relative paths, spelled as on disk)."""

    device: int
    mount_points: frozenset[str]

    def crosses(self, path: str, info: os.stat_result) -> bool:
        """Whether the folder at ``path`` (``info``: its stat) is a mount point."""
        return info.st_dev != self.device or path in self.mount_points

    def below_mount(self, path: str) -> bool:
        """Whether ``path`` is a mount point or lies below one of the table's."""
        return any(path == m or path.startswith(m + "/") for m in self.mount_points)


def share_disk(root: Path | str) -> ShareDisk:
    """The :class:`ShareDisk` of the share at ``root``, read now."""
    return ShareDisk(os.stat(root).st_dev, mount_points_below(root))


def mount_points_below(root: Path | str) -> frozenset[str]:
    """The mount points strictly below ``root``, relative to it (none where there is no
    mount table to read)."""
    try:
        with open(MOUNT_TABLE, "rb") as table:
            lines = table.read().splitlines()
    except OSError:
        return frozenset()
    prefix = os.path.realpath(root).rstrip("/") + "/"
    found = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            point = os.fsdecode(_ESCAPED.sub(lambda m: bytes([int(m[1], 8)]), fields[4]))
            if point.startswith(prefix) and len(point) > len(prefix):
                found.add(point[len(prefix) :])
    return frozenset(found)

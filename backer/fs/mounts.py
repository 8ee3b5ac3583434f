"""Where another filesystem, or a bind, is mounted inside a share.

A folder's device number tells a disk mounted there, not a bind of a folder of the same
filesystem (``mount --bind ~/Photos ~/Backer/photos``), which has the share's. Both are
gone at an unmount (a reboot, an unplugged disk), and what was below them would be
recorded as deleted on every device; so the mount table is read too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import stat
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

MOUNT_TABLE = "/proc/self/mountinfo"  # (Linux; elsewhere the device number alone)
_ESCAPED = re.compile(rb"\\([0-7]{3})")  # a space, tab, newline or backslash in a path
_statx = getattr(ctypes.CDLL(None, use_errno=True), "statx", None)  # (glibc 2.28+)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
_AT_FDCWD, _AT_SYMLINK_NOFOLLOW, _AT_NO_AUTOMOUNT, _AT_EMPTY_PATH = -100, 0x100, 0x800, 0x1000
_STATX_TYPE, _STATX_ATTR_MOUNT_ROOT = 0x1, 0x2000  # (the attribute: Linux 5.8+)
_STATX_SIZE = 256


class ShareDisk(NamedTuple):
    """The share's filesystem (its root's ``st_dev``) and the mount points below its root
    (share-relative paths, spelled as on disk)."""

    device: int
    mount_points: frozenset[str]

    def crosses(self, path: str, info: os.stat_result, at: str | int) -> bool:
        """Whether the entry at ``path`` (``info``: its lstat; ``at``: its path on disk,
        or a descriptor of it) is a mount point: a folder, or a file bound onto
        (``mount --bind /etc/hostname share/x``, R69). The table was read a while ago (a
        whole scan walks for minutes), so the kernel is asked too (R66). Only a folder's
        device number tells: a file's can be its lower layer's (an overlayfs)."""
        if stat.S_ISDIR(info.st_mode) and info.st_dev != self.device:
            return True
        return path in self.mount_points or is_mount_root(at)

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


def is_mount_root(at: str | int) -> bool:
    """Whether the folder or file at the path ``at`` (not followed if a link), or open as the
    descriptor ``at``, is the root of a mount now, a bind of the same filesystem
    included (``statx``'s STATX_ATTR_MOUNT_ROOT); False where the kernel cannot say
    (before Linux 5.8, or no ``statx``): the table alone decides there."""
    if _statx is None:
        return False
    flags = _AT_SYMLINK_NOFOLLOW | _AT_NO_AUTOMOUNT
    if isinstance(at, int):
        fd, path, flags = at, b"", flags | _AT_EMPTY_PATH
    else:
        fd, path = _AT_FDCWD, os.fsencode(at)
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, path, flags, _STATX_TYPE, buffer) != 0:
        return False
    (attributes,) = struct.unpack_from("=Q", buffer, 8)  # stx_attributes
    (known,) = struct.unpack_from("=Q", buffer, 56)  # stx_attributes_mask
    return bool(attributes & known & _STATX_ATTR_MOUNT_ROOT)


_KEEPS_PERMISSIONS: dict[tuple[str, int], bool] = {}
PERMISSIONS_PROBE = ".permissions-probe-"


def keeps_permissions(folder: Path | str) -> bool:
    """Whether the filesystem of ``folder`` keeps permission bits. exFAT, FAT and many
    FUSE and SMB mounts show every entry with the mount's mode (often 0o777) and ignore
    chmod: a scan there must not take that mode for a person's change. Probed once per
    folder and filesystem (a file in ``folder`` given two modes); unknown is taken as
    kept, as before the probe existed."""
    try:
        key = (os.fspath(folder), os.stat(folder).st_dev)
    except OSError:
        return True
    if key not in _KEEPS_PERMISSIONS:
        try:
            descriptor, probe = tempfile.mkstemp(dir=folder, prefix=PERMISSIONS_PROBE)
            os.close(descriptor)
            try:
                modes = []
                for mode in (0o600, 0o640):
                    with contextlib.suppress(PermissionError):
                        os.chmod(probe, mode)
                    modes.append(stat.S_IMODE(os.lstat(probe).st_mode))
            finally:
                os.unlink(probe)
        except OSError:
            return True
        _KEEPS_PERMISSIONS[key] = modes == [0o600, 0o640]
    return _KEEPS_PERMISSIONS[key]

"""Seeded benchmark datasets and the mutations applied to them between syncs.

The same seed gives byte-identical trees (file contents come from BLAKE3's extendable
output keyed by seed and file name: incompressible, and ~1 GB/s to produce), so every
tool syncs exactly the same data. Files are back-dated an hour, as on a disk that was
not just written (tools treat very fresh files more carefully).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

KIB, MIB = 1024, 1024 * 1024
PIECE = 4 * MIB


def _content(seed: int, name: str, size: int, offset: int = 0) -> bytes:
    return blake3(f"{seed}:{name}".encode()).digest(length=size, seek=offset)


def _write(path: Path, seed: int, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for offset in range(0, size, PIECE):
            handle.write(_content(seed, path.name, min(PIECE, size - offset), offset))


def _backdate(root: Path) -> None:
    old = time.time() - 3600
    for path in root.rglob("*"):
        os.utime(path, (old, old))


def small(root: Path, seed: int) -> None:
    """10,000 files of 1-16 KiB in 100 directories."""
    rng = random.Random(seed)
    for index in range(10_000):
        _write(
            root / f"dir{index % 100:02d}" / f"file{index:05d}.txt",
            seed,
            rng.randint(KIB, 16 * KIB),
        )


def large(root: Path, seed: int) -> None:
    """4 files of 256 MiB."""
    for index in range(4):
        _write(root / f"large-{index}.bin", seed, 256 * MIB)


def mixed(root: Path, seed: int) -> None:
    """About 2,000 files of log-normal sizes (median ~64 KiB, a few of tens of MiB),
    ~500 MiB in all, in 20 directories of 100."""
    rng = random.Random(seed)
    sizes = [min(64 * MIB, int(rng.lognormvariate(math.log(64 * KIB), 1.7))) for _ in range(2000)]
    scale = 500 * MIB / sum(sizes)
    for index, size in enumerate(sizes):
        _write(
            root / f"set{index % 20:02d}" / f"item{index:04d}.dat", seed, max(1, int(size * scale))
        )


def many(root: Path, seed: int, count: int = 100_000) -> None:
    """100,000 files of 1-4 KiB in 1,000 directories."""
    rng = random.Random(seed)
    for index in range(count):
        _write(root / f"d{index % 1000:03d}" / f"f{index:06d}.txt", seed, rng.randint(KIB, 4 * KIB))


# -- mutations ----------------------------------------------------------------------------


def _files(root: Path, exclude: tuple[str, ...]) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in exclude
    )


def insert_in_large_files(
    root: Path, seed: int, exclude: tuple[str, ...], staging: Path | None = None
) -> str:
    """10 bytes inserted in the middle of each file of 4 MiB or more: all after shifts.

    Each new version is written next to its file, or in ``staging`` (same file system)
    when given: then all of them are renamed into place only at the end, at once, so a
    watching tool sees four renames, not files being written."""
    written = []
    for path in _files(root, exclude):
        size = path.stat().st_size
        if size < 4 * MIB:
            continue
        temp = (staging or path.parent) / (path.name + ".mutating")
        with open(path, "rb") as source, open(temp, "wb") as target:
            target.write(source.read(size // 2))
            target.write(_content(seed, f"insert-{path.name}-{size}", 10))
            while block := source.read(PIECE):
                target.write(block)
        if staging is None:
            os.replace(temp, path)
        written.append((temp, path))
    if staging is not None:
        for temp, path in written:
            os.replace(temp, path)
    return f"10 bytes inserted in the middle of {len(written)} large files"


def modify_small_files(root: Path, seed: int, exclude: tuple[str, ...]) -> str:
    """10 files of at most 1 MiB get new contents."""
    candidates = [p for p in _files(root, exclude) if p.stat().st_size <= MIB]
    for path in random.Random(seed).sample(candidates, 10):
        _write(path, seed + 1 + path.stat().st_size, path.stat().st_size)
    return "10 small files modified"


def rename_directory(root: Path, seed: int, exclude: tuple[str, ...]) -> str:
    """A directory of 100 files is renamed."""
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in exclude):
        if sum(1 for p in directory.iterdir() if p.is_file()) == 100:
            directory.rename(root / f"{directory.name}-renamed")
            return "a directory of 100 files renamed"
    raise RuntimeError("no directory of 100 files to rename")


def delete_one_percent(root: Path, seed: int, exclude: tuple[str, ...]) -> str:
    files = _files(root, exclude)
    for path in random.Random(seed).sample(files, max(1, len(files) // 100)):
        path.unlink()
    return f"{max(1, len(files) // 100)} files (1 %) deleted"


Mutation = Callable[[Path, int, tuple[str, ...]], str]


@dataclass(frozen=True)
class Profile:
    name: str
    make: Callable[[Path, int], None]
    mutations: tuple[Mutation, ...]

    def build(self, root: Path, seed: int) -> None:
        self.make(root, seed)
        _backdate(root)


COMMON = (modify_small_files, rename_directory, delete_one_percent)
PROFILES = {
    "small": Profile("small", small, COMMON),
    # twice: Syncthing's weak hash is on for the first insert and off for the second
    "large": Profile("large", large, (insert_in_large_files, insert_in_large_files)),
    "mixed": Profile("mixed", mixed, (insert_in_large_files, *COMMON)),
    "many": Profile("many", many, (modify_small_files, delete_one_percent)),
}

"""A giant file syncs (finding 13): the path ``python -m benchmarks.giant`` takes with
50 GiB, at a size CI affords — the real CLI over TCP, a sparse file whose manifest
travels in ``ManifestPart``s, all-zero chunks neither fetched nor written."""

from __future__ import annotations

from pathlib import Path

from benchmarks.giant import GIB, MIB, run

REPLY_BYTES = 64 * 1024  # below this 2 GiB file's manifest (~300 KB), as 4 MiB is below
# a 50 GiB file's (~7 MB)


def test_finding_13_a_2_gib_sparse_file_syncs_with_its_manifest_in_parts(tmp_path: Path) -> None:
    result = run(tmp_path, 2 * GIB, regions=8, region_bytes=MIB, reply_bytes=REPLY_BYTES)
    assert result.manifest_bytes > 4 * REPLY_BYTES  # so it crossed as several parts
    assert result.wire_bytes < result.data_bytes + result.manifest_bytes + 4 * MIB
    assert result.allocated_b < 2 * result.data_bytes + MIB  # holes stayed holes
    assert result.rss_mib["a (serve, anonymous)"] < 256
    assert result.rss_mib["b (join, anonymous)"] < 256

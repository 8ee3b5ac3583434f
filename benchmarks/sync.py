"""Initial sync between two local processes: 1 GiB in four large files, and 10,000 small
files, with resident memory of each process; rsync measured in the same run.

    python benchmarks/sync.py

The same measurement as ``python -m benchmarks --profiles large,small --tools
backer,rsync`` (see ``benchmarks/__main__.py``), kept under this name as the replication
benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.__main__ import main

if __name__ == "__main__":
    sys.argv[1:] = ["--profiles", "large,small", "--tools", "backer,rsync", *sys.argv[1:]]
    main()

"""The long fuzzing campaign: coverage-guided (atheris, ``pip install -e '.[fuzz]'``)
over every target of tests/fuzz.py at once, one byte of each input picking the target.
From the repository's root::

    python -m tests.fuzz_campaign --seconds 600 [--corpus DIR] [libFuzzer options]

A crash stops it with the input saved as ``crash-*``: keep that file, less its first
byte, in ``tests/fuzz_cases/`` as ``TARGET-name`` so that every test run replays it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["backer", "journal"]):
    from tests.fuzz import TARGETS, one_input, seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument(
        "--corpus", type=Path, default=Path(tempfile.gettempdir()) / "backer-fuzz-corpus"
    )
    args, rest = parser.parse_known_args()
    args.corpus.mkdir(parents=True, exist_ok=True)
    names = list(TARGETS)
    for name, inputs in seeds().items():
        for n, seed in enumerate(inputs):
            (args.corpus / f"seed-{name}-{n}").write_bytes(bytes([names.index(name)]) + seed)
    options = [f"-max_total_time={args.seconds}", "-print_final_stats=1", *rest]
    atheris.Setup([sys.argv[0], *options, str(args.corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

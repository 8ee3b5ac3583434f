"""``python -m tests.small_windows FILES ARGS...``: backer's CLI applying at most FILES
files per window, so a join of a few dozen files takes several windows, as one of
tens of thousands does."""

from __future__ import annotations

import runpy
import sys

from backer.model import replicator

replicator.WINDOW_FILES = int(sys.argv[1])
sys.argv = ["backer", *sys.argv[2:]]
runpy.run_module("backer", run_name="__main__", alter_sys=True)

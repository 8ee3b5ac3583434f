"""``python -m tests.clock_offset SECONDS ARGS...``: backer's CLI on a device whose wall
clock is SECONDS off (negative: behind, as after an RTC reset), as faketime would make
it: every reading of the wall clock in the process is moved, the boot clock is not."""

from __future__ import annotations

import runpy
import sys
import time

offset_ns = int(float(sys.argv[1]) * 1e9)
real_ns, real_s = time.time_ns, time.time
time.time_ns = lambda: real_ns() + offset_ns
time.time = lambda: real_s() + offset_ns / 1e9
sys.argv = ["backer", *sys.argv[2:]]
runpy.run_module("backer", run_name="__main__", alter_sys=True)

"""The console entry point, which imports nothing of backer's before it runs:
loading the CLI's modules takes a second or more on a loaded machine, and a Ctrl-C
meanwhile (a node started and stopped at once) printed the traceback of whatever
import it interrupted. It is one line and exit status 1, as during a command."""

from __future__ import annotations

import sys

EXIT_ERROR = 1  # (backer.cli's: that module is what may not be loaded yet)


def main() -> None:
    try:
        from backer.cli import main as run
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    run()

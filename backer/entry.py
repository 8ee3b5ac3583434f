"""The console entry point, which imports nothing of backer's before it runs:
loading the CLI's modules takes a second or more on a loaded machine. A Ctrl-C
meanwhile (a node started and stopped at once) printed the traceback of whatever import
it interrupted, or was lost for good when it landed in the import system's own clean-up
("Exception ignored in ... _get_module_lock"), and the command ran on. It is now held
until the modules are loaded, then ends the command: one line and exit status 1, as
during a command.

A SIGINT its parent ignores (a shell script's background job: ``backer run &``) stays
ignored, as Python leaves it, here and in the node (see docs/decisions.md)."""

from __future__ import annotations

import signal
import sys

EXIT_ERROR = 1  # (backer.cli's: that module is what may not be loaded yet)


def main() -> None:
    interrupted: list[int] = []
    held = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    if held:
        previous = signal.signal(signal.SIGINT, lambda signum, _: interrupted.append(signum))
    try:
        from backer.cli import main as run
    except KeyboardInterrupt:  # (one that came before the handler above was in place)
        interrupted.append(signal.SIGINT)
    finally:
        if held:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    run()

"""The console entry point, which imports nothing of backer's before it runs:
loading the CLI's modules takes a second or more on a loaded machine. A Ctrl-C
meanwhile (a node started and stopped at once) printed the traceback of whatever import
it interrupted. It is now held until the CLI's modules are loaded, then ends the
command: one line and exit status 1, as during a command.

The commands load the rest of what they use lazily, after that. A Ctrl-C that lands in
the import system's own clean-up there is swallowed by Python ("Exception ignored in
... _get_module_lock") and the command ran on: ``backer run`` served for good. Such a
swallowed interrupt is now remembered, quietly, and :func:`raise_if_interrupted` ends
the command at its next check (the long commands check once loaded, the node once its
own signal handlers are in place).

What runs before the hold is in place is as short as it can be: this module imports
nothing but ``signal`` (``typing`` made most of a window where a Ctrl-C printed the
traceback of that import), and ``python -m backer`` turns a Ctrl-C that comes while it
loads this module into the same one line.

A SIGINT its parent ignores (a shell script's background job: ``backer run &``) stays
ignored, as Python leaves it, here and in the node (see docs/decisions.md)."""

from __future__ import annotations

import signal
import sys

EXIT_ERROR = 1  # (backer.cli's: that module is what may not be loaded yet)

_swallowed: list[KeyboardInterrupt] = []  # (KeyboardInterrupts Python could not raise: see above)


def _remember_swallowed_interrupts(unraisable: sys.UnraisableHookArgs) -> None:
    """``sys.unraisablehook``: keep a KeyboardInterrupt raised where Python cannot raise
    it (a callback it calls itself) for :func:`raise_if_interrupted`, instead of printing
    its traceback; say anything else as Python would."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _swallowed.append(unraisable.exc_value)
    else:
        sys.__unraisablehook__(unraisable)


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt Python swallowed since the command started, if any."""
    if _swallowed:
        raise KeyboardInterrupt


def main() -> None:
    """Hold a Ctrl-C while the CLI's modules load, then run the command; one that comes
    before the hold is in place, or after it ends but before the command handles its own,
    ends the command the same way."""
    try:
        sys.unraisablehook = _remember_swallowed_interrupts
        interrupted: list[int] = []
        held = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        if held:
            previous = signal.signal(signal.SIGINT, lambda signum, _: interrupted.append(signum))
        try:
            from backer.cli import main as run
        finally:
            if held:
                signal.signal(signal.SIGINT, previous)
        if interrupted or _swallowed:
            raise KeyboardInterrupt
        run()
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(EXIT_ERROR)

"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class BackerError(Exception):
    """A problem the user can act on; its message is shown as is, on one line."""


def reason(exc: Exception) -> str:
    """One line for an error: ``PATH: reason`` for a system call's, as coreutils say
    it, not Python's ``[Errno N] reason: 'PATH'``."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__

"""What bounds this process's connections: the admission of those not yet
authenticated, and the limit on open descriptors. Apart from :mod:`backer.connections.transport`
so that the control socket and the CLI's start-up use them without loading the sessions."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable


class Admission:
    """Connections at most ``total``, at most ``per_address`` from one address: peers
    still in their handshake (not yet authenticated), or the web UI's HTTP connections.
    When full, the oldest is closed to make room: a stranger trickling bytes cannot keep
    a member out, whose handshake takes milliseconds, and cannot hold more than
    ``total`` descriptors."""

    def __init__(self, total: int = 256, per_address: int = 32) -> None:
        self.total = total
        self.per_address = per_address
        self.pending: dict[object, tuple[str, Callable[[], None]]] = {}  # oldest first

    def enter(self, address: str, evict: Callable[[], None]) -> object:
        """Admit a new connection; ``evict`` closes it if room is needed later."""
        same = [t for t, (a, _) in self.pending.items() if a == address]
        if len(same) >= self.per_address:
            self._evict(same[0])
        if len(self.pending) >= self.total:
            self._evict(next(iter(self.pending)))
        ticket = object()
        self.pending[ticket] = (address, evict)
        return ticket

    def leave(self, ticket: object) -> None:
        """The connection is authenticated or gone."""
        self.pending.pop(ticket, None)

    def _evict(self, ticket: object) -> None:
        _, evict = self.pending.pop(ticket)
        evict()


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard limit: every peer is a descriptor."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

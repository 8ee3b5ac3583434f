"""Each message is legal in some phases of a session only; out of order closes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from backer.protocol.session import Session
from backer.protocol.wire import (
    PROTOCOL_VERSION,
    CaughtUp,
    Events,
    Hello,
    Ping,
    ProtocolError,
    Summary,
    WantChunks,
)
from tests.helpers import make_devices, sync, syncing


@pytest.mark.parametrize(
    ("before", "message", "reason"),
    [
        ([], WantChunks([bytes(32)]), "unexpected WantChunks before Hello"),
        ([], Summary([], 0), "unexpected Summary before Hello"),
        ([Hello(PROTOCOL_VERSION, b"p")], Events(b"", [b"x"], 0), "Events before the Summary"),
        ([Hello(PROTOCOL_VERSION, b"p")], Hello(PROTOCOL_VERSION, b"p"), "Hello before the"),
        ([Hello(PROTOCOL_VERSION, b"p"), Summary([], 0)], Summary([], 0), "Summary after"),
    ],
)
def test_finding_6_out_of_order_messages_close_the_session(
    tmp_path: Path, before: list, message: object, reason: str
) -> None:
    a, b = make_devices(tmp_path, 2)
    sync(a, b)
    session = Session(b, "b")
    for earlier in before:
        session.receive(earlier)
    with pytest.raises(ProtocolError, match=reason):
        session.receive(message)  # type: ignore[arg-type]


def test_finding_6_ping_is_legal_in_every_phase_and_caught_up_after_summary(
    tmp_path: Path,
) -> None:
    (a,) = make_devices(tmp_path, 1)
    session = Session(a, "a")
    assert session.receive(Ping()) == []
    session = syncing(session)
    session.receive(Ping())
    session.receive(CaughtUp())
    assert session.peer_caught_up

"""An Events message whose events the receiver already holds is acknowledged too: the
sender's one-shot sync waits for that ``Done``."""

from __future__ import annotations

from pathlib import Path

from backer.model.replicator import Replicator
from backer.protocol.session import Session
from tests.helpers import Links, make_devices, sync


def test_events_a_peer_already_got_through_a_third_device_are_acknowledged(
    tmp_path: Path,
) -> None:
    """a's new event reaches b and c at once; each relays it to the other over their own
    session, where it arrives as nothing new. Neither said Done for that message, so
    neither session could complete."""
    a, b, c = make_devices(tmp_path, 3)
    sync(a, b)
    sync(a, c)
    sync(a, b)  # b knows c is a member now
    (a.root / "new").mkdir()  # (no content to fetch: applied in the step it arrives)
    a.scan()
    b_hub, c_hub = Replicator(b), Replicator(c)
    b_c, c_b = Session(b, "b", replicator=b_hub), Session(c, "c", replicator=c_hub)
    links = Links(
        [
            (Session(a, "a"), Session(b, "b", replicator=b_hub)),
            (Session(a, "a"), Session(c, "c", replicator=c_hub)),
            (b_c, c_b),
        ]
    )
    links.run()
    assert (b.root / "new").is_dir() and (c.root / "new").is_dir()
    assert b_c.events_messages_sent == c_b.events_messages_received == 1  # the relay
    assert b_c.stats.events_received == c_b.stats.events_received == 0  # nothing new
    assert b_c.peer_acknowledged == b_c.events_messages_sent
    assert c_b.peer_acknowledged == c_b.events_messages_sent
    assert b_c.complete and c_b.complete

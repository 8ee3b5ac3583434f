"""A one-shot sync whose relayed events the peer got first from a third device still
ends (through the real CLI over TCP on 127.0.0.1)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e import Device, forwarder, free_port, join_through
from tests.helpers import timing


@timing  # c's node must record and pass on its news while b's messages are held back
def test_a_sync_relaying_events_the_peer_got_first_from_a_third_device_completes(
    tmp_path: Path,
) -> None:
    """b syncs with a and c at once, its messages to both held back a few seconds on the
    way; meanwhile c records a new directory and its node gives it to a directly. b then
    relays it to a (or the event a gives b, to c): nothing new there. Such an Events
    message was never acknowledged, so b's sync waited for that ``Done`` forever."""
    a, b, c = (Device(tmp_path, name) for name in "abc")
    a.root.mkdir()
    a.run("init", str(a.root))
    a_port = free_port()
    join_through(a, [b, c], a_port, introduce=True)
    (b.root / "from-b").mkdir()  # b's own news keeps its session with a waiting for Done
    a_node = a.start(a_port)
    c_node = c.start()
    try:
        c_node.wait_for("open (127.0.0.1:")  # c's node dialled a's
        with (
            forwarder(a_node.address, hold=(2, 5.0)) as via_a,  # the handshake passes at
            forwarder(c_node.address, hold=(2, 5.0)) as via_c,  # once, the rest 5 s late
        ):
            syncing = subprocess.Popen(
                b.command("sync", via_a, via_c, "--dir", str(b.root)),
                env=b.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                a_node.wait_for("accepted)", count=2)  # c's session, then b's
                c_node.wait_for("accepted)")  # b's
                (c.root / "from-c").mkdir()
                out, err = syncing.communicate(timeout=60)
            finally:
                syncing.kill()
                syncing.wait()
    finally:
        a_node.stop()
        c_node.stop()
    assert syncing.returncode == 0, err
    assert out.count("from ") == 2, out + err
    assert (b.root / "from-c").is_dir() and (a.root / "from-b").is_dir()

"""The secure channel: mutual authentication, membership, refusal without learning."""

from __future__ import annotations

import os
import re

import nacl.signing
import pytest

from backer.model.membership import REMOVED
from backer.protocol.channel import (
    MODE_SYNC,
    PEER_REFUSED,
    WAS_REMOVED,
    ChannelError,
    SecureChannel,
    refusal,
)

SHARE_ID = os.urandom(16)
HEADER = MODE_SYNC + SHARE_ID


def pair(initiator_psk: bytes, responder_psk: bytes, members: set[bytes]):
    alice, bob = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    members = members or {bytes(alice.verify_key), bytes(bob.verify_key)}

    def check(peer: bytes, header: bytes, proof: bytes) -> str | None:
        return None if peer in members else "not a member of this share"

    client = SecureChannel(alice, check, header=HEADER, psk=initiator_psk)
    server = SecureChannel(bob, check, lookup_psk=lambda h: [responder_psk] if h == HEADER else [])
    return alice, bob, client, server


def shake(client: SecureChannel, server: SecureChannel) -> None:
    for _ in range(4):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())


def test_members_with_the_share_key_authenticate_each_other_and_talk() -> None:
    psk = os.urandom(32)
    alice, bob, client, server = pair(psk, psk, set())
    shake(client, server)
    assert client.established and server.established
    assert client.peer == bytes(bob.verify_key) and server.peer == bytes(alice.verify_key)
    big = os.urandom(200_000)
    client.send(big)
    wire = bytes(client.data_to_send())
    assert big not in wire
    assert bytes(server.receive_data(wire[:1000])) + bytes(server.receive_data(wire[1000:])) == big


def test_received_plaintext_held_by_the_caller_is_never_decrypted_over() -> None:
    """Plaintext is decrypted into reused buffers (a fresh 4 MiB one per read cost its
    zeroing and page faults), but never into one that the caller still views: chunks
    wait as views of it for the writer thread."""
    psk = os.urandom(32)
    _, _, client, server = pair(psk, psk, set())
    shake(client, server)
    messages = [os.urandom(300_000) for _ in range(4)]
    held = []
    for message in messages:
        client.send(message)
        held.append(server.receive_data(bytes(client.data_to_send()))[100:])
    assert [bytes(view) for view in held] == [message[100:] for message in messages]
    first = held[0].obj
    held.clear()  # nothing views the buffers now: the next read reuses one
    client.send(messages[0])
    assert server.receive_data(bytes(client.data_to_send())).obj is first


def test_records_are_encrypted_into_one_reused_buffer_once_the_transport_gave_it_back() -> None:
    """A send encrypts into the buffer of the last one (not a new buffer per send: a
    GiB is ~250 of them), but only after ``reuse``: never into one the transport may
    still hold."""
    psk = os.urandom(32)
    _, _, client, server = pair(psk, psk, set())
    shake(client, server)
    client.send(b"a" * 100_000)
    first = client.data_to_send()
    sent = bytes(first)
    client.send(b"b" * 100_000)  # the transport still holds the first: a new buffer
    second = client.data_to_send()
    assert bytes(first) == sent
    assert server.receive_data(first) == b"a" * 100_000
    assert server.receive_data(second) == b"b" * 100_000
    client.reuse()
    client.send(b"c" * 1000)
    third = client.data_to_send()
    assert isinstance(third, memoryview) and isinstance(second, memoryview)
    assert third.obj is second.obj
    assert server.receive_data(third) == b"c" * 1000


def test_wrong_share_key_is_refused_before_anything_is_revealed() -> None:
    _, _, client, server = pair(os.urandom(32), os.urandom(32), set())
    with pytest.raises(ChannelError):
        server.receive_data(client.data_to_send())
    assert server.data_to_send() == b""  # the server sent nothing, not even its key


def test_non_member_is_refused_at_the_handshake() -> None:
    psk = os.urandom(32)
    outsider = nacl.signing.SigningKey.generate()
    _, _, client, server = pair(psk, psk, {bytes(outsider.verify_key)})
    server.receive_data(client.data_to_send())
    with pytest.raises(ChannelError, match="not a member"):
        client.receive_data(server.data_to_send())


def test_tampered_record_closes_the_channel() -> None:
    psk = os.urandom(32)
    _, _, client, server = pair(psk, psk, set())
    shake(client, server)
    client.send(b"hello")
    wire = bytearray(client.data_to_send())
    wire[5] ^= 0x20
    with pytest.raises(ChannelError):
        server.receive_data(bytes(wire))


def test_garbage_instead_of_a_handshake_is_refused() -> None:
    psk = os.urandom(32)
    _, _, _, server = pair(psk, psk, set())
    with pytest.raises(ChannelError):
        server.receive_data(HEADER + b"\x00\x20" + os.urandom(32))


@pytest.mark.parametrize("split", [None, 1, 2])
def test_a_refusal_after_the_initiators_last_handshake_message_reads_as_a_refusal(
    split: int | None,
) -> None:
    """The initiator is established once it sends its last handshake message; the
    responder checks membership only on reading it, and refuses a removed device then.
    That refusal was read as an encrypted record and failed ("shorter than its
    authentication tag"): the removed device took it for a broken link and redialled
    at once, over and over."""
    psk = os.urandom(32)
    _, _, client, server = pair(psk, psk, set())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.established
    wire = refusal(WAS_REMOVED)
    with pytest.raises(ChannelError, match=re.escape(PEER_REFUSED + REMOVED)) as refused:
        if split is None:
            client.receive_data(wire)
        else:
            client.receive_data(wire[:split])
            client.receive_data(wire[split:])
    assert refused.value.refusal is None

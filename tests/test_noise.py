"""The Noise engine against the published cacophony test vectors, and its failure modes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backer.protocol.noise import HandshakeState, NoiseError

VECTORS = (
    Path(__file__).resolve().parents[2] / "shared" / "testdata" / "noise-cacophony-vectors.json"
)


def _load() -> list[dict]:
    if not VECTORS.exists():
        return []
    supported = []
    for vector in json.loads(VECTORS.read_text())["vectors"]:
        try:
            HandshakeState(
                vector["protocol_name"],
                True,
                psks=[bytes(32)] * vector["protocol_name"].count("psk"),
            )
        except ValueError as exc:
            if "unsupported" in str(exc):
                continue
        supported.append(vector)
    return supported


VECTOR_LIST = _load()


def _side(vector: dict, prefix: str, initiator: bool) -> HandshakeState:
    def get(key: str) -> bytes | None:
        name = f"{prefix}_{key}"
        return bytes.fromhex(vector[name]) if name in vector else None

    return HandshakeState(
        vector["protocol_name"],
        initiator,
        prologue=get("prologue") or b"",
        static_private=get("static"),
        remote_static=get("remote_static"),
        psks=[bytes.fromhex(p) for p in vector.get(f"{prefix}_psks", [])],
        ephemeral_private=get("ephemeral"),
    )


@pytest.mark.skipif(
    not VECTOR_LIST, reason="../shared/testdata/noise-cacophony-vectors.json is absent"
)
def test_vectors_cover_the_suites_backer_relies_on() -> None:
    names = {v["protocol_name"] for v in VECTOR_LIST}
    assert "Noise_XXpsk3_25519_AESGCM_SHA256" in names
    assert "Noise_NNpsk0_25519_AESGCM_SHA256" in names  # psk0 placement, as backer uses it
    assert (
        len(VECTOR_LIST) == 288
    )  # every Curve25519 vector of the interactive and one-way patterns


@pytest.mark.skipif(
    not VECTOR_LIST, reason="../shared/testdata/noise-cacophony-vectors.json is absent"
)
@pytest.mark.parametrize("vector", VECTOR_LIST, ids=lambda v: v["protocol_name"])
def test_cacophony_vector(vector: dict) -> None:
    initiator, responder = _side(vector, "init", True), _side(vector, "resp", False)
    send = receive = None
    for number, message in enumerate(vector["messages"]):
        payload, expected = bytes.fromhex(message["payload"]), bytes.fromhex(message["ciphertext"])
        sender_is_initiator = number % 2 == 0
        if not initiator.complete:
            writer, reader = (
                (initiator, responder) if sender_is_initiator else (responder, initiator)
            )
            assert writer.write_message(payload) == expected
            assert reader.read_message(expected) == payload
            if initiator.complete:
                assert initiator.h.hex() == vector["handshake_hash"] == responder.h.hex()
                send, receive = initiator.split(), responder.split()
            continue
        one_way = len(initiator.messages) == 1
        if sender_is_initiator or one_way:
            cipher_out, cipher_in = send[0], receive[1]
        else:
            cipher_out, cipher_in = receive[0], send[1]
        assert cipher_out.encrypt(b"", payload) == expected
        assert cipher_in.decrypt(b"", expected) == payload


def _pair(psk_a: bytes, psk_b: bytes) -> tuple[HandshakeState, HandshakeState]:
    name = "Noise_XXpsk0_25519_AESGCM_SHA256"
    return (
        HandshakeState(name, True, b"backer", os.urandom(32), psks=[psk_a]),
        HandshakeState(name, False, b"backer", os.urandom(32), psks=[psk_b]),
    )


def test_wrong_psk_fails_at_the_first_message_revealing_nothing() -> None:
    initiator, responder = _pair(os.urandom(32), os.urandom(32))
    first = initiator.write_message(b"hello")
    with pytest.raises(NoiseError):
        responder.read_message(first)
    assert responder.rs is None  # never learned who we are


def test_tampered_handshake_and_transport_messages_are_rejected() -> None:
    psk = os.urandom(32)
    initiator, responder = _pair(psk, psk)
    responder.read_message(initiator.write_message())
    second = bytearray(responder.write_message(b"me"))
    second[40] ^= 1
    with pytest.raises(NoiseError):
        initiator.read_message(bytes(second))
    initiator, responder = _pair(psk, psk)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    responder.read_message(initiator.write_message())
    (send, _), (_, receive) = initiator.split(), responder.split()
    message = bytearray(send.encrypt(b"", b"payload"))
    message[0] ^= 1
    with pytest.raises(NoiseError):
        receive.decrypt(b"", bytes(message))

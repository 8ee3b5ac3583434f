from __future__ import annotations

import stat
from pathlib import Path

import pytest

from backer.config.identity import KEY_FILE, device_id, load_or_create_key, parse_device_id
from backer.errors import BackerError


def test_key_is_created_once_owner_only_and_reused(backer_home: Path) -> None:
    first = load_or_create_key()
    mode = stat.S_IMODE((backer_home / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    assert bytes(load_or_create_key().verify_key) == bytes(first.verify_key)


def test_damaged_key_is_a_clear_error(backer_home: Path) -> None:
    backer_home.mkdir()
    (backer_home / KEY_FILE).write_bytes(b"short")
    with pytest.raises(BackerError, match="damaged"):
        load_or_create_key()


def test_device_id_round_trips_and_catches_every_single_typo(key) -> None:
    public = bytes(key.verify_key)
    text = device_id(public)
    assert len(text) == 63 and text.count("-") == 7
    assert parse_device_id(text.lower()) == public
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    for position, char in enumerate(text):
        if char == "-":
            continue
        typo = alphabet[(alphabet.index(char) + 1) % 32]
        with pytest.raises(BackerError):
            parse_device_id(text[:position] + typo + text[position + 1 :])

from __future__ import annotations

import stat
import threading
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


def test_R21_processes_creating_the_key_at_once_all_use_the_saved_one(backer_home: Path) -> None:
    """Two commands started at once on a new home each made a key and renamed it into
    place: one of them went on with a key that was not the saved one."""
    start = threading.Barrier(8)
    keys: list[bytes] = []

    def create() -> None:
        start.wait()
        keys.append(bytes(load_or_create_key().verify_key))

    workers = [threading.Thread(target=create) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    saved = bytes(load_or_create_key().verify_key)
    assert keys == [saved] * 8
    assert sorted(p.name for p in backer_home.iterdir()) == [KEY_FILE]

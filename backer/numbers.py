"""Whole numbers typed by a person or sent by a client: ASCII digits only, bounded.

``str.isdigit`` takes ``²`` and ``int`` refuses more than 4,300 digits with a
ValueError, so ``"²".isdigit() and int("²")`` is an internal error where the input
deserved a one-line refusal; every parse of such a number goes through here."""

from __future__ import annotations

MAX_DIGITS = 19  # a signed 64-bit integer's


def natural(text: str | None) -> int | None:
    """``text`` as a non-negative integer, or None if it is not 1 to :data:`MAX_DIGITS`
    ASCII digits."""
    if not text or len(text) > MAX_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)

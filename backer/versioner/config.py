"""A share's retention settings (``backer config``), kept in its database on this device.

Each setting is a row ``retention.KEY`` of the ``meta`` table; a key never set has its
default. Values are checked when set; one stored otherwise (by another version of
backer, by hand, by a damaged database) is not used: its default is, with a warning.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re

from backer.db.catalog import Catalog
from backer.errors import BackerError
from backer.versioner.retention import DAY, HOUR, MINUTE, SECOND, WEEK, Policy

_UNITS = {"s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY, "w": WEEK}
_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_PERCENT = re.compile(r"(\d{1,3}(?:\.\d{1,2})?)%")
# key -> (Policy field, what it means)
KEYS = {
    "keep-all": ("keep_all_ms", "every version kept for this long after it was replaced"),
    "hourly-for": ("hourly_until_ms", "then one per hour until this age"),
    "daily-for": ("daily_until_ms", "then one per day until this age"),
    "weekly-for": ("weekly_until_ms", "then one per week until this age; none after"),
    "max-disk": ("max_disk", "kept versions may use at most this share of the free disk"),
}
_PREFIX = "retention."
DURATIONS = ("keep-all", "hourly-for", "daily-for", "weekly-for")  # each >= the one before
log = logging.getLogger("backer.retention")
_warned: set[tuple[str, object]] = set()  # (key, stored value): each warned of once


def duration_text(ms: int) -> str:
    """``ms`` in the largest unit that divides it (``3600000`` → ``1h``)."""
    if ms == 0:
        return "0s"
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms // SECOND}s"


def _text(key: str, policy: Policy) -> str:
    value = getattr(policy, KEYS[key][0])
    return f"{value * 100:g}%" if key == "max-disk" else duration_text(value)


def _parse(key: str, text: str) -> int | float:
    if key == "max-disk":
        match = _PERCENT.fullmatch(text.strip())
        if match is None or float(match[1]) > 100:
            raise BackerError(f"max-disk: {text!r} is not a percentage from 0% to 100%")
        return float(match[1]) / 100
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise BackerError(f"{key}: {text!r} is not a duration such as 90m, 1h, 30d or 52w")
    return int(match[1]) * _UNITS[match[2]]


def _stored(catalog: Catalog, key: str) -> int | float | None:
    """The value stored for ``key``, or None (its default) if none is, or if what is
    there is not a value backer writes: retention must never stop a share being served."""
    stored = catalog.get_meta(_PREFIX + key)
    if stored is None:
        return None
    try:
        if not isinstance(stored, str | bytes):
            raise BackerError(f"{key}: {stored!r} is not text")
        return _parse(key, stored.decode() if isinstance(stored, bytes) else stored)
    except (BackerError, UnicodeDecodeError) as exc:
        if (key, stored) not in _warned:
            _warned.add((key, stored))
            log.warning("retention setting ignored, its default used: %s", exc)
        return None


def policy(catalog: Catalog) -> Policy:
    """The share's policy: defaults, with what was set."""
    found = {}
    for key, (field, _) in KEYS.items():
        value = _stored(catalog, key)
        if value is not None:
            found[field] = value
    return dataclasses.replace(Policy(), **found)


def settings(catalog: Catalog) -> dict[str, tuple[str, bool, str]]:
    """key -> (value as text, whether set here, what it means)."""
    current = policy(catalog)
    return {
        key: (_text(key, current), _stored(catalog, key) is not None, meaning)
        for key, (_, meaning) in KEYS.items()
    }


def set_value(catalog: Catalog, key: str, text: str) -> str:
    """Check and store one setting (in the caller's transaction); its value as text."""
    if key not in KEYS:
        raise BackerError(f"unknown setting {key!r} (settings: {', '.join(KEYS)})")
    value = _parse(key, text)
    changed = dataclasses.replace(policy(catalog), **{KEYS[key][0]: value})
    for shorter, longer in itertools.pairwise(DURATIONS):
        low, high = (getattr(changed, KEYS[k][0]) for k in (shorter, longer))
        if high < low:
            raise BackerError(
                f"{key}: {longer} ({duration_text(high)}) cannot be shorter than "
                f"{shorter} ({duration_text(low)})"
            )
    shown = _text(key, changed)
    catalog.set_meta(_PREFIX + key, shown)
    return shown

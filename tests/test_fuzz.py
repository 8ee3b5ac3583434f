"""Every decoder a peer can reach rejects what it cannot accept with its own exception
type, never another one (see tests/fuzz.py for the targets and the long campaign)."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import TARGETS, member_share, saved_cases, seeds

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = functools.cache(seeds)  # (made inside the module's share block)


@pytest.fixture(scope="module", autouse=True)
def member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The ``session`` target's share in a pytest temp dir: a worker of pytest-xdist
    exits without running atexit, so a share made in a temp dir of its own was left
    behind in /tmp by every run."""
    with member_share(tmp_path_factory.mktemp("fuzz")):
        yield


@st.composite
def mutated(draw: st.DrawFn, target: str) -> bytes:
    """A valid input of ``target`` with a few bytes flipped, cut, inserted or truncated."""
    data = bytearray(draw(st.sampled_from(SEEDS()[target])))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if action == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position : position + draw(st.integers(1, 16))]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position:]
    return bytes(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
@EXAMPLES
@given(data=st.data())
def test_decoders_reject_mutated_input_cleanly(target: str, data: st.DataObject) -> None:
    TARGETS[target](data.draw(mutated(target)))


@pytest.mark.parametrize("target", sorted(TARGETS))
@EXAMPLES
@given(raw=st.binary(max_size=512))
def test_decoders_reject_random_bytes_cleanly(target: str, raw: bytes) -> None:
    TARGETS[target](raw)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_decoders_accept_their_seeds(target: str) -> None:
    for seed in SEEDS()[target]:
        TARGETS[target](seed)


@pytest.mark.parametrize(("target", "data"), saved_cases())
def test_inputs_the_campaign_found(target: str, data: bytes) -> None:
    TARGETS[target](data)

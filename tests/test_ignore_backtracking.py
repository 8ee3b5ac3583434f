"""R20: a member's `.backerignore` rule whose regex backtracks without end froze every
device (matching holds the interpreter lock, so the whole node stopped)."""

from __future__ import annotations

import time
from pathlib import Path

import pathspec
from hypothesis import given, settings
from hypothesis import strategies as st

from backer.scanner.ignore import IgnoreRules
from backer.scanner.walk import look

EVIL = "*a" * 7 + "*b"  # O(n^7) steps for a name of n 'a' with pathspec's regex (5 more '*a':
# for ever); 64 'a': about 10 s of CPU, here under a millisecond
DEEP = "**/a/**/a/**/a/**/b"  # O(L^4) for a path a/a/a/... of L levels: 250, about 5 s


def _cpu(call) -> float:
    started = time.process_time()
    call()
    return time.process_time() - started


def test_R20_a_rule_with_many_wildcards_matches_a_long_name_at_once() -> None:
    rules = IgnoreRules([EVIL, DEEP])
    name = "a" * 64
    deep = "/".join(["a"] * 250)
    assert _cpu(lambda: rules.ignored(name, False)) < 0.5
    assert _cpu(lambda: rules.ignored(deep, False)) < 0.5
    assert not rules.ignored(name, False) and not rules.ignored(deep, False)
    assert rules.ignored(name + "b", False) and rules.ignored(deep + "/b", False)


def test_R20_a_scan_under_such_a_rule_finishes(tmp_path: Path) -> None:
    (tmp_path / ".backerignore").write_text(f"{EVIL}\n{DEEP}\n")
    (tmp_path / ("a" * 64)).write_text("x")
    (tmp_path / ("a" * 63 + "b")).write_text("ignored")
    walks = []
    assert _cpu(lambda: walks.append(look(tmp_path, lambda paths, subtrees: {}))) < 5
    (found,) = walks
    assert sorted(seen.path for seen, _, _ in found.candidates) == [".backerignore", "a" * 64]


_PIECES = ["a", "b", "ab", "*", "?", "[ab]", "[]a]", "**", "\\*", "*a", "a*b", "*?*", "[a"]
_PIECES += ["*a*b*", "a*?*b"]
_NAMES = ["a", "b", "ab", "ba", "aab", "*", "a*b", "]"]


@settings(max_examples=400, deadline=None)
@given(
    segments=st.lists(st.sampled_from(_PIECES), min_size=1, max_size=4),
    lead=st.sampled_from(["", "/", "!"]),
    trail=st.sampled_from(["", "/"]),
    paths=st.lists(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=5), max_size=6),
)
def test_R20_the_linear_patterns_match_exactly_what_pathspec_matches(
    segments: list[str], lead: str, trail: str, paths: list[list[str]]
) -> None:
    line = lead + "/".join(segments) + trail
    try:
        reference = pathspec.GitIgnoreSpec.from_lines([line])
    except ValueError:
        return  # not a valid pattern: skipped (and reported) either way
    ours = IgnoreRules([line]).spec
    assert ours is not None
    for parts in paths:
        for path in ("/".join(parts), "/".join(parts) + "/"):
            assert ours.match_file(path) == reference.match_file(path), (line, path)


def test_R20_a_negated_bracket_expression_never_matches_a_slash() -> None:
    """As in git (pathspec's ``[!x]`` matched '/', which the linear form cannot keep)."""
    spec = IgnoreRules(["a[!x]b"]).spec
    assert spec is not None
    assert spec.match_file("ayb") and spec.match_file("d/ayb")
    assert not spec.match_file("a/b") and not spec.match_file("axb")

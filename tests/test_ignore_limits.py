"""R27: a member's `.backerignore` of many simple rules (under the 1 MiB cap) stalled every
device: the rules were compiled again at every scan, plan and apply window (11 s for
59,208 rules, with the interpreter lock held) and each path was matched against every
rule in Python (26 ms a path: a 35,000-entry scan took a quarter of an hour)."""

from __future__ import annotations

import random
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from backer.scanner.ignore import MAX_IGNORE_BYTES, MAX_RULES, IgnoreRules
from backer.scanner.walk import look


def _rules(count: int, seed: int = 1) -> list[str]:
    """Rules such as a member could write: cheap each, many in all."""
    draw = random.Random(seed)
    return [f"x{draw.randrange(10**6):06d}*/*y{draw.randrange(1000)}*z" for _ in range(count)]


def _cpu(call) -> float:
    started = time.process_time()
    call()
    return time.process_time() - started


def test_R27_a_file_of_more_rules_than_the_cap_is_not_read_and_the_scan_says_so(
    tmp_path: Path,
) -> None:
    lines = _rules(59_208)
    text = "\n".join(lines) + "\n"
    assert len(text.encode()) <= MAX_IGNORE_BYTES  # under the size cap: only the count binds
    (tmp_path / ".backerignore").write_text(text)
    (tmp_path / "kept.txt").write_text("x")
    rules: list[IgnoreRules] = []
    assert _cpu(lambda: rules.append(IgnoreRules.load(tmp_path))) < 2
    assert rules[0].spec is None and "more than" in (rules[0].unread or "")
    walks = []
    assert _cpu(lambda: walks.append(look(tmp_path, lambda paths, subtrees: {}))) < 10
    (found,) = walks
    assert any("rules" in problem.reason for problem in found.errors), found.errors
    assert sorted(seen.path for seen, _, _ in found.candidates) == [".backerignore", "kept.txt"]


def test_R27_with_rules_up_to_the_cap_a_path_no_rule_matches_costs_one_call() -> None:
    rules = IgnoreRules(_rules(MAX_RULES))
    paths = [f"src/dir{i % 50}/sub/file{i}.py" for i in range(20_000)]
    assert _cpu(lambda: [rules.ignored(path, False) for path in paths]) < 1.5  # was ~3.5 s
    assert rules.ignored("x000001a/b/yy12zz", False) == rules.spec.match_file("x000001a/b/yy12zz")


def test_R27_the_same_rules_are_compiled_once(tmp_path: Path) -> None:
    (tmp_path / ".backerignore").write_text("\n".join(_rules(MAX_RULES, seed=2)) + "\n")
    first = IgnoreRules.load(tmp_path)
    assert _cpu(lambda: IgnoreRules.load(tmp_path)) < 0.05
    assert IgnoreRules.load(tmp_path).spec is first.spec


_LINES = ["*.log", "!keep.log", "build/", "/top", "a/**/b", "!a/x/b", "**/c*", "d?", "!d1/"]
_LINES += ["e/", "!e/f", "[ab]*", "*", "!*.txt", "x/*/y", "\\!z", "q/"]
_NAMES = ["a", "b", "c1", "d1", "e", "f", "keep.log", "z.log", "top", "x", "y", "t.txt", "!z"]


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.sampled_from(_LINES), min_size=1, max_size=6),
    paths=st.lists(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4), max_size=8),
)
def test_R27_the_one_call_shortcut_answers_as_the_rules_do(
    lines: list[str], paths: list[list[str]]
) -> None:
    rules = IgnoreRules(lines)
    assert rules.spec is not None
    for parts in paths:
        path = "/".join(parts)
        for is_dir in (False, True):
            expected = rules.spec.match_file(path + "/" if is_dir else path)
            assert rules.ignored(path, is_dir) == expected, (lines, path, is_dir)

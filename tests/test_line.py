"""The queued predictions' line (service/line.py): places in O(log n). No broker."""

from __future__ import annotations

import itertools
import random

import pytest

import service.line
from service.line import MIN_CAPACITY, SHRINK_FACTOR, Line


def line_of(*prediction_ids: str) -> Line:
    line = Line()
    for prediction_id in prediction_ids:
        line.join(prediction_id)
    return line


def test_each_counts_those_who_joined_before_it() -> None:
    line = line_of("a", "b", "c")
    assert [line.ahead(name) for name in "abc"] == [0, 1, 2]
    assert len(line) == 3


def test_leaving_from_the_middle_moves_only_those_behind() -> None:
    line = line_of("a", "b", "c", "d")
    line.leave("b")
    assert [line.ahead(name) for name in "abcd"] == [0, None, 1, 2]
    line.leave("a")
    line.leave("d")
    assert [line.ahead(name) for name in "abcd"] == [None, None, 0, None]


def test_a_rejoin_goes_to_the_end() -> None:
    line = line_of("a", "b", "c")
    line.leave("a")
    line.join("a")
    assert [line.ahead(name) for name in "bca"] == [0, 1, 2]


def test_join_and_leave_twice_change_nothing_more() -> None:
    line = line_of("a", "b")
    line.join("a")  # already in line: keeps its place
    assert (line.ahead("a"), line.ahead("b"), len(line)) == (0, 1, 2)
    line.leave("a")
    line.leave("a")
    line.leave("never-joined")
    assert (line.ahead("b"), len(line)) == (0, 1)


def test_an_unknown_id_has_no_place() -> None:
    assert Line().ahead("nobody") is None
    assert line_of("a").ahead("b") is None


def test_len_contains_and_clear() -> None:
    line = line_of("a", "b")
    assert "a" in line
    assert "c" not in line
    assert 3 not in line  # any object can be asked about
    line.clear()
    assert (len(line), "a" in line, line.ahead("a"), line.capacity) == (
        0,
        False,
        None,
        MIN_CAPACITY,
    )
    line.join("b")
    assert line.ahead("b") == 0


@pytest.mark.parametrize("smallest_window", [MIN_CAPACITY, 16])
def test_random_operations_match_a_list(
    smallest_window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 seeded operations against a plain list, across many rebuilds.

    The line grows and drains in phases, so the window is rebuilt both
    when full and when mostly empty; a smallest window of 16 makes
    rebuilds far more frequent, at many sizes.
    """
    monkeypatch.setattr(service.line, "MIN_CAPACITY", smallest_window)
    rng = random.Random(20240601)
    line, model = Line(), list[str]()
    capacities, joins = [line.capacity], 0
    for step in range(20_000):
        join_share = 0.65 if (step // 2_500) % 2 == 0 else 0.3  # grow, then drain
        prediction_id = f"p{rng.randrange(4_000)}"
        if rng.random() < join_share:
            line.join(prediction_id)
            if prediction_id not in model:
                model.append(prediction_id)
                joins += 1
        else:
            leaving = rng.choice(model) if model and rng.random() < 0.9 else prediction_id
            line.leave(leaving)
            if leaving in model:
                model.remove(leaving)
        asked = prediction_id if rng.random() < 0.5 or not model else rng.choice(model)
        assert line.ahead(asked) == (model.index(asked) if asked in model else None)
        assert len(line) == len(model)
        assert line.capacity <= max(SHRINK_FACTOR * len(line), smallest_window)
        if line.capacity != capacities[-1]:
            capacities.append(line.capacity)
        if step % 1_000 == 0:
            assert [line.ahead(member) for member in model] == list(range(len(model)))
    assert joins > 5 * smallest_window  # slots are never reused: the window filled many times
    grown = sum(after > before for before, after in itertools.pairwise(capacities))
    shrunk = sum(after < before for before, after in itertools.pairwise(capacities))
    assert grown >= 4
    assert shrunk >= 4


def test_memory_follows_the_line_not_everything_ever_queued() -> None:
    line, prediction_ids = Line(), [str(number) for number in range(1_000_000)]
    for number, prediction_id in enumerate(prediction_ids):
        line.join(prediction_id)
        if number >= 10:
            line.leave(prediction_ids[number - 10])  # never more than 10 in line
        if number % 10_000 == 0:
            assert line.capacity == MIN_CAPACITY
    assert (len(line), line.ahead("999990"), line.ahead("999999")) == (10, 0, 9)
    assert line.capacity == MIN_CAPACITY


def test_a_drained_line_gives_its_window_back() -> None:
    line = Line()
    for number in range(100_000):
        line.join(str(number))
    assert line.capacity >= 100_000
    for number in range(99_990):
        line.leave(str(number))
    assert line.capacity == MIN_CAPACITY
    assert [line.ahead(str(number)) for number in range(99_990, 100_000)] == list(range(10))

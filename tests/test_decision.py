"""What becomes of a task, case by case: service/decision.py, no broker."""

from __future__ import annotations

import pytest

from service.decision import (
    DELAY_LEVELS,
    Decision,
    Known,
    NotRun,
    Policy,
    Raised,
    Ran,
    Record,
    Retry,
    Run,
    Seen,
    Split,
    Take,
    admit,
    decide,
    on_delivery,
    retry_delay_s,
)
from service.schemas import Accepted, Done, Failed

POLICY = Policy(max_attempts=3, backoff_s=1.0)
NOW_S = 1_000.0


def task(attempts: int = 0, last_error: str = "") -> Accepted:
    return Accepted("id-1", "text", 10.0, attempts=attempts, last_error=last_error)


def decided(accepted: Accepted, crashes: int, seen: Seen, jitter: float = 0.5) -> Decision:
    return decide(accepted, crashes, seen, POLICY, now_s=NOW_S, jitter=jitter)


def test_a_fresh_task_runs_as_its_first_attempt() -> None:
    assert decided(task(), 0, NotRun()) == Run(attempt=1)


def test_attempts_count_what_the_task_carries_and_the_crashes() -> None:
    assert decided(task(attempts=1), 1, NotRun()) == Run(attempt=3)


def test_a_task_whose_attempts_are_used_up_by_crashes_fails_without_running() -> None:
    decision = decided(task(attempts=1), 2, NotRun())
    error = "the worker stopped during each of 3 attempts"
    failed = Failed("id-1", "text", error, NOW_S, attempts=3)
    assert decision == Record(failed, dead_letter=True, attempts=3)


def test_used_up_attempts_keep_the_last_model_error() -> None:
    decision = decided(task(attempts=2, last_error="ValueError: no"), 1, NotRun())
    assert isinstance(decision, Record)
    assert decision.outcome == Failed("id-1", "text", "ValueError: no", NOW_S, attempts=3)


def test_joining_a_run_still_going_here_is_not_a_new_attempt() -> None:
    # The broker counted the delivery whose connection dropped mid-run.
    assert decided(task(attempts=2), 1, NotRun(joining=True)) == Run(attempt=4)


def test_a_known_outcome_is_recorded_again_and_never_rerun() -> None:
    done = Done("id-1", "text", "42", 5.0)
    assert decided(task(), 0, Known(done)) == Record(done)
    failed = Failed("id-1", "text", "boom", 5.0)
    # Its dead-letter copy went with the first record: not sent twice.
    assert decided(task(attempts=5), 9, Known(failed)) == Record(failed)


def test_a_run_that_answers_is_recorded_done_with_its_start_and_attempt() -> None:
    done = Done("id-1", "text", "42", NOW_S, started_at_s=990.0, attempts=2)
    assert decided(task(attempts=1), 0, Ran("42", started_at_s=990.0)) == Record(done)


def test_a_failed_run_is_retried_later_carrying_its_count_and_error() -> None:
    decision = decided(task(), 0, Raised("ConnectionError: hiccup"), jitter=0.5)
    assert decision == Retry(task(attempts=1, last_error="ConnectionError: hiccup"), 1.0, 1)


def test_the_second_failure_waits_twice_as_long() -> None:
    decision = decided(task(attempts=1), 0, Raised("x"), jitter=0.5)
    assert isinstance(decision, Retry)
    assert (decision.delay_s, decision.level, decision.task.attempts) == (2.0, 2, 2)


def test_a_crash_before_a_failure_counts_toward_the_retry() -> None:
    decision = decided(task(), 1, Raised("x"))
    assert isinstance(decision, Retry)
    assert decision.task.attempts == 2


def test_a_joined_run_that_fails_is_charged_once() -> None:
    # The drop that brought the redelivery was this very run: the broker's
    # count already holds it.
    decision = decided(task(attempts=1), 1, Raised("x", joined=True))
    assert isinstance(decision, Retry)
    assert decision.task.attempts == 2
    # Not joined, the same failure would be a third attempt.
    assert decided(task(attempts=1), 1, Raised("x")) == Record(
        Failed("id-1", "text", "x", NOW_S, attempts=3), dead_letter=True, attempts=3
    )


def test_the_last_attempt_failing_fails_for_good_and_dead_letters() -> None:
    decision = decided(task(attempts=2), 0, Raised("ValueError: no", started_at_s=990.0))
    failed = Failed("id-1", "text", "ValueError: no", NOW_S, started_at_s=990.0, attempts=3)
    assert decision == Record(failed, dead_letter=True, attempts=3)


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
def test_a_task_that_always_fails_runs_exactly_max_attempts_times(max_attempts: int) -> None:
    policy = Policy(max_attempts, backoff_s=1.0)
    current, runs = task(), 0
    while True:
        before = decide(current, 0, NotRun(), policy, now_s=NOW_S, jitter=0.0)
        assert isinstance(before, Run)
        runs += 1
        after = decide(current, 0, Raised("x"), policy, now_s=NOW_S, jitter=0.0)
        if isinstance(after, Record):
            break
        assert isinstance(after, Retry)
        current = after.task
    assert runs == max_attempts


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.999])
def test_the_delay_stays_within_a_quarter_of_its_nominal_value(jitter: float) -> None:
    for level in range(1, DELAY_LEVELS + 1):
        nominal = 0.5 * 2 ** (level - 1)
        assert 0.75 * nominal <= retry_delay_s(level, 0.5, jitter) <= 1.25 * nominal


def test_the_delay_stops_doubling_at_the_last_level() -> None:
    policy = Policy(max_attempts=50, backoff_s=1.0)
    decision = decide(task(attempts=30), 0, Raised("x"), policy, now_s=NOW_S, jitter=0.5)
    assert isinstance(decision, Retry)
    assert decision.level == DELAY_LEVELS
    assert decision.delay_s == 2.0 ** (DELAY_LEVELS - 1)


def test_no_backoff_retries_at_once() -> None:
    policy = Policy(max_attempts=3, backoff_s=0.0)
    decision = decide(task(), 0, Raised("x"), policy, now_s=NOW_S, jitter=0.7)
    assert isinstance(decision, Retry)
    assert decision.delay_s == 0.0


def test_a_message_delivered_for_the_first_time_is_taken() -> None:
    assert on_delivery([task(), task()], 0, {}) == Take([(task(), 0), (task(), 0)])


def test_a_lone_task_back_after_crashes_is_taken_with_its_crashes() -> None:
    assert on_delivery([task()], 2, {}) == Take([(task(), 2)])


def test_a_return_known_to_be_no_run_is_not_a_crash() -> None:
    # It waited for a slot here when its connection dropped.
    assert on_delivery([task()], 2, {"id-1": 1}) == Take([(task(), 1)])


def test_a_batch_back_after_a_crash_is_split_each_task_charged() -> None:
    first, second = Accepted("a", "x", 1.0), Accepted("b", "y", 1.0, attempts=1)
    assert on_delivery([first, second], 1, {}) == Split(
        [Accepted("a", "x", 1.0, attempts=1), Accepted("b", "y", 1.0, attempts=2)]
    )


def test_a_batch_split_charges_none_for_a_return_known_to_be_no_run() -> None:
    first, second = Accepted("a", "x", 1.0), Accepted("b", "y", 1.0)
    assert on_delivery([first, second], 1, {"b": 1}) == Split(
        [Accepted("a", "x", 1.0, attempts=1), Accepted("b", "y", 1.0, attempts=0)]
    )


def test_tasks_beyond_the_free_slots_go_back_once_with_their_count() -> None:
    first, second, third = (Accepted(name, "x", 1.0) for name in "abc")
    kept, bounced = admit(Take([(first, 0), (second, 1), (third, 0)]), free_slots=1)
    assert kept == [(first, 0)]
    assert bounced == [
        Accepted("b", "x", 1.0, attempts=1, bounced=True),
        Accepted("c", "x", 1.0, bounced=True),
    ]


def test_a_task_that_went_back_once_waits_in_line() -> None:
    waited = Accepted("a", "x", 1.0, bounced=True)
    assert admit(Take([(waited, 0)]), free_slots=0) == ([(waited, 0)], [])
    assert admit(Take([(waited, 0)]), free_slots=-2) == ([(waited, 0)], [])

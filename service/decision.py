"""What becomes of a task: pure functions, no broker, no clock, no randomness of their own.

The worker (service/consumer.py) asks twice per task: when a message
brings it (`on_delivery`, then `decide` with `NotRun`), and once it knows
more (`decide` with what the run or the mapping said). Every answer is a
value of a union type; the worker carries it out and settles the message.

Attempts have one source of truth: the count a task carries
(`Accepted.attempts`), plus the broker's `x-delivery-count` of the message
that brought it, which counts the deliveries that ended without a
settlement: a worker that crashed, or lost its connection, mid-run (and,
rarely, a message the broker was handing over as a worker stopped). A
failed run is never requeued (that would count a delivery); it goes back
on the work queue through a delay queue with its count raised by one. So a
task runs MAX_ATTEMPTS times at most, alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from service.schemas import Accepted, Done, Failed, Outcome

# The retry delay's spread around its nominal value, so that tasks which
# failed together (a model server restarting) do not all come back together.
JITTER = 0.25
# Delays double after each failure up to this many failures (128x), then
# stay there; the broker keeps one delay queue per level (service/broker.py).
DELAY_LEVELS = 8


# -- what the worker knows about a task --------------------------------------


@dataclass(frozen=True)
class NotRun:
    """Nothing yet: just delivered. `joining` if a run of it is already going here."""

    joining: bool = False


@dataclass(frozen=True)
class Known:
    """The mapping already holds its outcome (it was recorded before a redelivery)."""

    outcome: Outcome


@dataclass(frozen=True)
class Ran:
    result: str
    started_at_s: float = 0.0  # when the run began (the outcome tells it)


@dataclass(frozen=True)
class Raised:
    """The run failed. `joined`: it was a run an earlier delivery started, which
    the broker already counted when that delivery's connection dropped."""

    error: str
    joined: bool = False
    started_at_s: float = 0.0


Seen = NotRun | Known | Ran | Raised


# -- what to do --------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run the model; this is attempt number `attempt`."""

    attempt: int


@dataclass(frozen=True)
class Record:
    """Publish the outcome; with `dead_letter`, also a copy of the task for operators."""

    outcome: Outcome
    dead_letter: bool = False
    attempts: int = 0  # spent, for the log line of a task that failed for good


@dataclass(frozen=True)
class Retry:
    """Back on the work queue after `delay_s`, carrying the attempts it spent.

    `level`: which delay queue holds it meanwhile (its failures so far, capped).
    """

    task: Accepted
    delay_s: float
    level: int


Decision = Run | Record | Retry


@dataclass(frozen=True)
class Policy:
    max_attempts: int
    backoff_s: float  # RETRY_BACKOFF_S: the wait after the first failed attempt


def decide(
    task: Accepted, crashes: int, seen: Seen, policy: Policy, *, now_s: float, jitter: float
) -> Decision:
    """The task's fate. `crashes`: deliveries of its message that ended unsettled.

    The caller reads the clock (`now_s`) and draws `jitter` in [0, 1), so
    that this stays pure.
    """
    if isinstance(seen, Known):
        # Already on the stream (the mapping is built from it); published
        # again all the same, which costs one message. The dead-letter copy
        # is not sent twice.
        return Record(seen.outcome)
    joined = isinstance(seen, Raised) and seen.joined
    attempt = task.attempts + crashes + (0 if joined else 1)
    if isinstance(seen, NotRun):
        # A run still going here is the attempt the broker counted when the
        # connection dropped, not a spent one: joining it costs nothing.
        if attempt > policy.max_attempts and not seen.joining:
            spent = attempt - 1
            error = task.last_error or f"the worker stopped during each of {spent} attempts"
            return _give_up(task, spent, error, now_s)
        return Run(attempt)
    if isinstance(seen, Ran):
        done = Done(task.prediction_id, task.input, seen.result, now_s, seen.started_at_s, attempt)
        return Record(done)
    if attempt >= policy.max_attempts:
        return _give_up(task, attempt, seen.error, now_s, seen.started_at_s)
    charged = msgspec.structs.replace(task, attempts=attempt, last_error=seen.error)
    level = delay_level(attempt)
    return Retry(charged, retry_delay_s(level, policy.backoff_s, jitter), level)


def delay_level(failed_attempts: int) -> int:
    return min(failed_attempts, DELAY_LEVELS)


def retry_delay_s(level: int, backoff_s: float, jitter: float) -> float:
    """The wait at a delay level: backoff_s, doubled per level past the first, +-JITTER."""
    nominal = backoff_s * 2.0 ** (level - 1)
    return nominal * (1 - JITTER + 2 * JITTER * jitter)


@dataclass(frozen=True)
class Take:
    """Run the message's tasks here, each with the crashes it has been through."""

    tasks: list[tuple[Accepted, int]]


@dataclass(frozen=True)
class Split:
    """Put each task back as a message of its own, charged as given, and ack this one."""

    tasks: list[Accepted]


def on_delivery(
    tasks: Sequence[Accepted], redeliveries: int, not_started: Mapping[str, int]
) -> Take | Split:
    """Take a message's tasks, or split a batch that came back unsettled.

    `redeliveries` is the message's x-delivery-count; `not_started`, per
    task, the returns this replica knows were no run of it (it was still
    waiting for a slot when the connection dropped).

    A batch that came back may hold what stopped the last worker: apart,
    each task gets a delivery count of its own, so one that keeps crashing
    workers fails alone. Each is charged the returns but those known to be
    no run: after a crash nobody can tell a task that ran from one that
    waited for a slot behind it, so both are charged.
    """
    crashes = [max(redeliveries - not_started.get(t.prediction_id, 0), 0) for t in tasks]
    if len(tasks) > 1 and redeliveries:
        return Split([charge(t, t.attempts + c) for t, c in zip(tasks, crashes, strict=True)])
    return Take(list(zip(tasks, crashes, strict=True)))


def admit(plan: Take, free_slots: int) -> tuple[list[tuple[Accepted, int]], list[Accepted]]:
    """The tasks to keep here, and those to put back at once, marked bounced.

    Tasks beyond the free slots go back for a replica with room, each with
    its count, unless they went back so once already: those wait here in
    line. So a batch does not queue behind this replica's model while
    another replica idles, and no task is put back more than once for want
    of a slot (a full replica's consumer may well take it straight back).
    """
    free = max(free_slots, 0)
    kept, bounced = list(plan.tasks[:free]), []
    for task, crashes in plan.tasks[free:]:
        if task.bounced:
            kept.append((task, crashes))
        else:
            spent = task.attempts + crashes
            bounced.append(msgspec.structs.replace(task, attempts=spent, bounced=True))
    return kept, bounced


def charge(task: Accepted, spent: int) -> Accepted:
    return msgspec.structs.replace(task, attempts=spent)


def _give_up(
    task: Accepted, spent: int, error: str, at_s: float, started_at_s: float = 0.0
) -> Record:
    failed = Failed(task.prediction_id, task.input, error, at_s, started_at_s, spent)
    return Record(failed, True, spent)

"""A place in line (service/line.py) at 1,000 and at 100,000 queued.

    python -m bench.line               # 3 rounds, about 5 seconds
    python -m bench.line --rounds 9

What a status request pays for `queued_ahead`, and what the line's
upkeep costs as predictions join and leave:

- ahead: `Line.ahead(id)` for members picked at random, at 100,000
  queued against the same at 1,000 (O(log n): about 1.7x if only the
  tree's depth counted; a scan would be 100x), and against the naive
  way at 100,000: the queued ids in a list, in join order, and
  `list.index(id)`, which is the count of those before it (a scan, but
  in C, the cheapest naive one). Caches slow any map that grows, so a
  bare dict lookup of the same ids is measured beside, for reference.
- join+leave: a random member leaves and a new id joins, the steady
  churn of a busy queue, at 100,000 against 1,000, and against the list
  (`remove` and `append`). The line runs as many pairs as it has
  members, so the averages include the window's rebuilds.

No broker, no service: this process only. Rounds interleave the sides,
and every row is the median of the rounds' ratios (bench/report.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from bench.context import Context
from bench.report import Goal, Row, table
from service.line import Line

_T = TypeVar("_T")

SMALL, LARGE = 1_000, 100_000
LINE_QUERIES = 20_000
# Ids a naive measurement scans in all (about 0.1 s at most), so both sizes get
# enough operations for a steady figure and 100,000 does not take minutes.
SCAN_BUDGET = 5_000_000
SEED = 20240601
# At 100,000 queued the line should be far more than this many times faster.
VS_SCAN_GOAL = Goal(">=", 10.0)


@dataclass(frozen=True)
class Workload:
    """Precomputed operations on `size` queued ids, the same for every side and round."""

    members: list[str]  # in join order
    queries: list[str]  # members whose place is asked
    churn: list[tuple[str, str]]  # (a member that leaves, a new id that joins), in order


def workload(size: int, rng: random.Random) -> Workload:
    members = [random_id(rng) for _ in range(size)]
    queries = [rng.choice(members) for _ in range(LINE_QUERIES)]
    live, churn = list(members), []
    for _ in range(size):  # as many pairs as members: a window's worth for the line
        index = rng.randrange(len(live))
        joining = random_id(rng)
        churn.append((live[index], joining))
        live[index] = joining  # where it sits in `live` does not matter, only who
    return Workload(members, queries, churn)


def random_id(rng: random.Random) -> str:
    """An id shaped as the service's (str(uuid4())), faster to make from a seed."""
    digits = f"{rng.getrandbits(128):032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def per_op_us(operations: Callable[[], int]) -> float:
    """Microseconds per operation; `operations` runs them and says how many."""
    started_ns = time.perf_counter_ns()
    count = operations()
    return (time.perf_counter_ns() - started_ns) / count / 1000


def scan_share(work: Workload, operations: list[_T]) -> list[_T]:
    """As many of `operations` as scanning SCAN_BUDGET ids takes (100 at least)."""
    return operations[: max(100, SCAN_BUDGET // len(work.members))]


# -- the measurements ---------------------------------------------------------------


def line_us(work: Workload) -> tuple[float, float]:
    """The line's ahead() and join+leave, in microseconds, on one line filled once."""
    line = Line()
    for prediction_id in work.members:
        line.join(prediction_id)

    def ask() -> int:
        ahead = line.ahead
        for prediction_id in work.queries:
            ahead(prediction_id)
        return len(work.queries)

    def churn() -> int:  # a window's worth of pairs, so its rebuilds are in the average
        for leaving, joining in work.churn:
            line.leave(leaving)
            line.join(joining)
        return len(work.churn)

    return per_op_us(ask), per_op_us(churn)


def scan_us(work: Workload) -> tuple[float, float]:
    """The same on a list in join order: index() (the count before it), remove, append."""
    queue = list(work.members)
    queries, pairs = scan_share(work, work.queries), scan_share(work, work.churn)

    def ask() -> int:
        index = queue.index
        for prediction_id in queries:
            index(prediction_id)
        return len(queries)

    def churn() -> int:
        for leaving, joining in pairs:
            queue.remove(leaving)
            queue.append(joining)
        return len(pairs)

    return per_op_us(ask), per_op_us(churn)


def dict_get_us(work: Workload) -> float:
    """A bare dict lookup of the same ids: how much caches alone slow a larger map."""
    slots = {prediction_id: slot for slot, prediction_id in enumerate(work.members)}

    def ask() -> int:
        get = slots.get
        for prediction_id in work.queries:
            get(prediction_id)
        return len(work.queries)

    return per_op_us(ask)


# -- rows ---------------------------------------------------------------------------


def measure(rounds: int) -> list[Row]:
    rng = random.Random(SEED)
    works = {"small": workload(SMALL, rng), "large": workload(LARGE, rng)}
    figures: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    for _ in range(rounds):  # interleaved: each round measures every side once
        for size, work in works.items():
            line_ahead, line_churn = line_us(work)
            scan_ahead, scan_churn = scan_us(work)
            record(f"line_ahead_{size}", line_ahead)
            record(f"scan_ahead_{size}", scan_ahead)
            record(f"dict_get_{size}", dict_get_us(work))
            record(f"line_churn_{size}", line_churn)
            record(f"scan_churn_{size}", scan_churn)
    details = {"sizes": [SMALL, LARGE], "rounds": rounds, "us_per_op": figures}
    return [
        Row(
            "line_ahead_scaling",
            "ahead(): line at 100k vs line at 1k",
            "us",
            "us at 1k",
            figures["line_ahead_large"],
            figures["line_ahead_small"],
            details=details,
        ),
        Row(
            "line_dict_scaling",
            "(reference) dict.get at 100k vs at 1k",
            "us",
            "us at 1k",
            figures["dict_get_large"],
            figures["dict_get_small"],
        ),
        Row(
            "line_ahead_speedup",
            "ahead() at 100k: list scan / line",
            "us scan",
            "us line",
            figures["scan_ahead_large"],
            figures["line_ahead_large"],
            VS_SCAN_GOAL,
        ),
        Row(
            "line_churn_scaling",
            "join+leave: line at 100k vs line at 1k",
            "us",
            "us at 1k",
            figures["line_churn_large"],
            figures["line_churn_small"],
        ),
        Row(
            "line_churn_speedup",
            "join+leave at 100k: list / line",
            "us list",
            "us line",
            figures["scan_churn_large"],
            figures["line_churn_large"],
            VS_SCAN_GOAL,
        ),
    ]


def run(ctx: Context) -> list[Row]:
    """`python -m bench --only line`: the place-in-line cost at 1k and 100k queued."""
    return measure(1 if ctx.quick else ctx.sizes.rounds)


def absolute_table(figures: dict[str, list[float]]) -> str:
    """Median microseconds per operation, each side at each size."""
    lines = [f"{'us per op (median)':<22}{'1k':>10}{'100k':>10}"]
    for side in ("line_ahead", "scan_ahead", "dict_get", "line_churn", "scan_churn"):
        small, large = (sorted(figures[f"{side}_{size}"]) for size in ("small", "large"))
        lines.append(
            f"{side.replace('_', ' '):<22}{small[len(small) // 2]:>10.3f}"
            f"{large[len(large) // 2]:>10.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.line", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args(argv)
    started_s = time.perf_counter()
    rows = measure(args.rounds)
    print(table(rows, judged=True))
    print()
    print(absolute_table(rows[0].details["us_per_op"]))
    print(f"\ntook {time.perf_counter() - started_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

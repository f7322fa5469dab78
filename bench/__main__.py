"""`python -m bench`: run the benchmarks, print a table, write JSON results.

    python -m bench                      # everything, full sizes (~5 min)
    python -m bench --quick              # tiny sizes: proves the scripts run (~15 s)
    python -m bench --only get post      # a subset: get post pipeline capacity memory state
                                         # line fanout
    python -m bench --rounds 7 --duration 5 --profile

Needs the RabbitMQ of RABBITMQ_URL (default: the local one). Uses wrk when
it is on PATH (`apt-get install wrk`), else a Python load generator.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import capacity, fanout, http_overhead, line, memory, pipeline, state
from bench.context import NAMES, QUICK, Context, Sizes
from bench.loadgen import wrk_available
from bench.report import Row, encode, table

# Each benchmark with the names it covers (items 1 and 2 share two servers).
BENCHMARKS: list[tuple[frozenset[str], Callable[[Context], list[Row]]]] = [
    (frozenset({"get", "post"}), http_overhead.run),
    (frozenset({"pipeline"}), pipeline.run),
    (frozenset({"capacity"}), capacity.run),
    (frozenset({"memory"}), memory.run),
    (frozenset({"state"}), state.run),
    (frozenset({"line"}), line.run),
    (frozenset({"fanout"}), fanout.run),
]
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="a subset")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per comparison")
    parser.add_argument("--duration", type=float, help="seconds per side per HTTP round")
    parser.add_argument("--pipeline-count", type=int, help="async predictions per round")
    parser.add_argument("--memory-count", type=int, help="predictions stored for item 5")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--profile", action="store_true", help="py-spy the HTTP benchmarks")
    parser.add_argument("--rabbitmq-url", default=os.environ.get("RABBITMQ_URL", DEFAULT_URL))
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    changes = {
        "rounds": args.rounds,
        "http_duration_s": args.duration,
        "pipeline_count": args.pipeline_count,
        "memory_count": args.memory_count,
    }
    return dataclasses.replace(sizes, **{k: v for k, v in changes.items() if v is not None})


def context_from(args: argparse.Namespace) -> Context:
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if wrk_available() else "python"
    return Context(
        sizes=sizes_from(args),
        rabbitmq_url=args.rabbitmq_url,
        out_dir=args.output_dir,
        loadgen=loadgen,
        profile=args.profile,
        quick=args.quick,
        only=frozenset(args.only or NAMES),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = context_from(args)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    started_s = time.perf_counter()
    rows: list[Row] = []
    for names, benchmark in BENCHMARKS:
        if names & ctx.only:
            print(f"--- {' and '.join(sorted(names & ctx.only))}", file=sys.stderr, flush=True)
            rows += benchmark(ctx)
    path = write_results(ctx, rows, argv, time.perf_counter() - started_s)
    print(table(rows, judged=not ctx.quick))
    print(f"\nresults: {path}")
    return 0


def write_results(ctx: Context, rows: list[Row], argv: list[str] | None, took_s: float) -> Path:
    document = {
        "run_id": ctx.run_id,
        "command": ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
        "quick": ctx.quick,
        "sizes": dataclasses.asdict(ctx.sizes),
        "loadgen": ctx.loadgen,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "took_s": took_s,
        "rows": [row.as_json() for row in rows],
    }
    path = ctx.out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{ctx.run_id}.json"
    path.write_bytes(encode(document))
    return path


if __name__ == "__main__":
    sys.exit(main())

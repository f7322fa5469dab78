"""Items 1 and 2 of the issue: the service's HTTP overhead.

Requests/s of the service against the bare Starlette app of
bench/bare_app.py, on the same uvicorn options, same body sizes:

1. GET /predict/{id} of a finished prediction (goal: ratio >= 0.90);
2. sync POST /predict with the mock's delay set to 0 (goal: >= 0.85).

Both servers run side by side; each round loads the baseline, then the
service, for the same time with the same load generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from bench import profile
from bench.context import Context
from bench.loadgen import Load, LoadResult, run_load
from bench.procs import (
    Server,
    cpu_shares,
    delete_namespace,
    http_request,
    running_bare_app,
    running_service,
)
from bench.report import Goal, Row

INPUT_BODY = b'{"input":"the quick brown fox jumps over the lazy dog"}'
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Pair:
    key: str
    title: str
    subject: Load  # sent to the service
    baseline: Load  # sent to the bare app
    goal: Goal


@dataclass
class Side:
    """One side's measurements, round by round."""

    rates: list[float]
    results: list[LoadResult]
    server_cpu: list[float]  # share of one core

    @property
    def per_cpu_s(self) -> list[float]:
        """Requests answered per CPU-second the server used."""
        return [rate / cpu for rate, cpu in zip(self.rates, self.server_cpu, strict=True)]


def run(ctx: Context) -> list[Row]:
    namespace = ctx.namespace("http")
    try:
        with running_service(
            ctx.rabbitmq_url, namespace, ctx.log_dir, model_delay_min_s=0, model_delay_max_s=0
        ) as service:
            prediction_id, get_body = finished_prediction(service.port)
            with running_bare_app(get_body, ctx.log_dir) as bare:
                chosen = [p for p in pairs(service, bare, prediction_id) if p.key in ctx.only]
                return [row for pair in chosen for row in compare(ctx, pair, service, bare)]
    finally:
        delete_namespace(ctx.rabbitmq_url, namespace)


def finished_prediction(port: int) -> tuple[str, bytes]:
    """An async prediction through the real pipeline, and its finished GET body."""
    headers = JSON_HEADERS | {"Async-Mode": "true"}
    status, body = http_request(port, "POST", "/predict", INPUT_BODY, headers)
    if status != 202:
        raise RuntimeError(f"async POST answered {status}: {body!r}")
    prediction_id: str = msgspec.json.decode(body)["prediction_id"]
    status, body = http_request(
        port, "GET", f"/predict/{prediction_id}", headers={"Prefer": "wait=30"}
    )
    if status != 200:
        raise RuntimeError(f"the prediction did not finish: {status} {body!r}")
    return prediction_id, body


def pairs(service: Server, bare: Server, prediction_id: str) -> list[Pair]:
    path = f"/predict/{prediction_id}"
    return [
        Pair(
            "get",
            "1. GET /predict/{id} (done) vs bare Starlette",
            Load(service.port, "GET", path),
            Load(bare.port, "GET", path),
            Goal(">=", 0.95),  # issue 10: on the default settings, the request log on
        ),
        Pair(
            "post",
            "2. sync POST /predict (delay 0) vs bare Starlette",
            Load(service.port, "POST", "/predict", INPUT_BODY, JSON_HEADERS),
            Load(bare.port, "POST", "/predict", INPUT_BODY, JSON_HEADERS),
            Goal(">=", 0.95),
        ),
    ]


def compare(ctx: Context, pair: Pair, service: Server, bare: Server) -> list[Row]:
    """Two rows: requests/s, and requests per CPU-second of the server.

    Neither server quite saturates its core here (wakeups between the load
    generator and the server cost idle time on this VM), so requests/s
    swings by a third from one run to the next. The server's CPU per
    request hardly moves: its ratio is what requests/s would show if both
    servers were CPU-bound, and it is the steadier figure.
    """
    sizes = ctx.sizes
    for load in (pair.baseline, pair.subject):  # warm both up; not counted
        run_load(load, sizes.warmup_s, sizes.http_connections, ctx.loadgen)
    subject, baseline = Side([], [], []), Side([], [], [])
    for _ in range(sizes.rounds):
        _measure(ctx, pair.baseline, bare, baseline)
        _measure(ctx, pair.subject, service, subject)
    throughput = Row(
        key=pair.key,
        title=pair.title,
        unit="req/s",
        baseline_name="req/s",
        values=subject.rates,
        baselines=baseline.rates,
        goal=pair.goal,
        loadgen_cpu=[r.loadgen_cpu_share for r in subject.results + baseline.results],
        details=_details(ctx, subject, baseline),
    )
    if ctx.profile:
        throughput.details["profile"] = _profile(ctx, pair, service)
    efficiency = Row(
        key=f"{pair.key}_cpu",
        title=f"{pair.title.split(' vs ')[0]}, per server CPU-second",
        unit="req/cpu-s",
        baseline_name="req/cpu-s",
        values=subject.per_cpu_s,
        baselines=baseline.per_cpu_s,
        goal=pair.goal,
    )
    return [throughput, efficiency]


def _measure(ctx: Context, load: Load, server: Server, side: Side) -> None:
    with cpu_shares({"server": server.process.pid}) as shares:
        result = run_load(load, ctx.sizes.http_duration_s, ctx.sizes.http_connections, ctx.loadgen)
    side.rates.append(result.rate)
    side.results.append(result)
    side.server_cpu.append(shares["server"])


def _details(ctx: Context, subject: Side, baseline: Side) -> dict[str, Any]:
    return {
        "loadgen": ctx.loadgen,
        "connections": ctx.sizes.http_connections,
        "duration_s": ctx.sizes.http_duration_s,
        "service_requests": sum(r.requests for r in subject.results),
        "service_bad": sum(r.bad for r in subject.results),
        "baseline_requests": sum(r.requests for r in baseline.results),
        "baseline_bad": sum(r.bad for r in baseline.results),
        "service_statuses": _merged([r.statuses for r in subject.results]),
        "service_cpu": subject.server_cpu,
        "baseline_cpu": baseline.server_cpu,
    }


def _merged(statuses: list[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for counts in statuses:
        for status, count in counts.items():
            merged[status] = merged.get(status, 0) + count
    return merged


def _profile(ctx: Context, pair: Pair, service: Server) -> dict[str, Any]:
    if not profile.available():
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    output = ctx.out_dir / f"profile-{ctx.run_id}-{pair.key}.txt"
    duration_s = ctx.sizes.http_duration_s
    with profile.sampling(service.process.pid, output, duration_s):
        result = run_load(pair.subject, duration_s, ctx.sizes.http_connections, ctx.loadgen)
    return {"collapsed_stacks": str(output), "rate": result.rate, **profile.summarise(output)}

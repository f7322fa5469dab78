"""What one benchmark run is given: sizes, the broker, where to write."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

# What `--only` can pick; items 1 and 2 of the issue are "get" and "post".
NAMES = ("get", "post", "pipeline", "capacity", "memory", "state", "line", "fanout")


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark does; `QUICK` only proves the scripts still work."""

    rounds: int = 5
    http_duration_s: float = 5
    http_connections: int = 64
    pipeline_count: int = 4_000
    pipeline_connections: int = 64
    capacity_async: int = 2_000
    capacity_sync: int = 500
    capacity_connections: int = 200  # carrying the async POSTs; each sync one has its own
    capacity_delay_min_s: float = 10  # the brief's model
    capacity_delay_max_s: float = 17
    # 4b: a burst deeper than the model slots (the worker issue's churn case).
    burst_async: int = 2_000
    burst_concurrency: int = 100  # the default MODEL_CONCURRENCY
    burst_delay_min_s: float = 1
    burst_delay_max_s: float = 2
    memory_count: int = 100_000
    memory_warmup: int = 2_000  # filled before the first reading, so buffers are warm
    fanout_count: int = 20_000  # predictions on the stream each replica count reads
    warmup_s: float = 2
    restart_counts: tuple[int, ...] = (1_000, 100_000, 1_000_000)
    rss_budget_bytes: int = 268_435_456  # the default RESULTS_MEMORY_MAX_BYTES
    latency_requests: int = 2_000


QUICK = Sizes(
    rounds=1,
    http_duration_s=1,
    http_connections=8,
    pipeline_count=60,
    pipeline_connections=8,
    capacity_async=40,
    capacity_sync=10,
    capacity_connections=8,
    capacity_delay_min_s=0.05,
    capacity_delay_max_s=0.2,
    burst_async=60,
    burst_concurrency=10,
    burst_delay_min_s=0.05,
    burst_delay_max_s=0.1,
    memory_count=600,
    memory_warmup=100,
    fanout_count=200,
    warmup_s=1,
    restart_counts=(200, 1_000),
    rss_budget_bytes=4 * 1024 * 1024,
    latency_requests=100,
)


@dataclass(frozen=True)
class Context:
    sizes: Sizes
    rabbitmq_url: str
    out_dir: Path
    loadgen: str  # "wrk" or "python"
    profile: bool = False
    quick: bool = False
    only: frozenset[str] = frozenset(NAMES)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def log_dir(self) -> Path:
        return self.out_dir / f"logs-{self.run_id}"

    def namespace(self, purpose: str) -> str:
        """A BROKER_NAMESPACE of this run's own, deleted when the benchmark ends."""
        return f"bench-{self.run_id}-{purpose}"

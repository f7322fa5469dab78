"""Per-request metrics and access log, as a plain ASGI middleware.

A plain ASGI callable (not BaseHTTPMiddleware) costs one closure and a
clock read per request, which keeps the HTTP overhead benchmark honest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

access_log = logging.getLogger("service.access")

# Probes and scrapes arrive every few seconds and say nothing new.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


class InstrumentMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, route_of: Mapping[Callable[..., object], str]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            elapsed_s = time.perf_counter() - started_s
            route = self.route_of.get(scope.get("endpoint"), "unmatched")  # type: ignore[arg-type]
            self.metrics.http.record(scope["method"], route, status, elapsed_s)
            if route not in QUIET_ROUTES and access_log.isEnabledFor(logging.INFO):
                _log_access(scope, status, elapsed_s)


def _log_access(scope: Scope, status: int, elapsed_s: float) -> None:
    access_log.info(
        "%s %s %d %.1f ms",
        scope["method"],
        scope["path"],
        status,
        elapsed_s * 1000,
        extra={
            "http_status": status,
            "duration_ms": round(elapsed_s * 1000, 2),
            "prediction_id": scope.get("path_params", {}).get("prediction_id"),
        },
    )

"""Per-request metrics and access log, as a plain ASGI middleware.

A plain ASGI callable (not BaseHTTPMiddleware), which does not even wrap
`send`: the status is read from the scope, where the app's responses note
it. It costs two clock reads and a dict update per request, and the request
log one string handed to the log writer (service/logs.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from service import logs
from service.http.responses import STATUS_KEY
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.http.hotroutes import HotRoutes

access_log = logging.getLogger("service.access")

# The id an async POST was given, noted in the scope for its request line.
ACCEPTED_ID_KEY = "service.accepted_id"
# Probes and scrapes arrive every few seconds and say nothing new.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


class InstrumentMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        route_of: Mapping[Callable[..., object], str],
        hot_routes: HotRoutes | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.route_of = route_of
        self.hot_routes = hot_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_s = time.perf_counter()
        app = self.app
        if self.hot_routes is not None:
            app = self.hot_routes.match(scope) or app  # past the router (http.hotroutes)
        try:
            await app(scope, receive, send)
        finally:
            elapsed_s = time.perf_counter() - started_s
            # Every response of the app notes its status in the scope
            # (responses.NotedResponse); none noted means it never answered,
            # and Starlette's outermost middleware answers 500.
            status = scope.get(STATUS_KEY, 500)
            route = self.route_of.get(scope.get("endpoint"), "unmatched")  # type: ignore[arg-type]
            self.metrics.http.record(scope["method"], route, status, elapsed_s)
            if route not in QUIET_ROUTES and access_log.isEnabledFor(logging.INFO):
                _log_access(scope, status, elapsed_s)


def _log_access(scope: Scope, status: int, elapsed_s: float) -> None:
    prediction_id = scope.get(ACCEPTED_ID_KEY) or scope.get("path_params", {}).get("prediction_id")
    if logs.request_log is not None:
        logs.request_log.write(scope["method"], scope["path"], status, elapsed_s, prediction_id)
        return
    # Without configure_logging (the app run in-process by the tests).
    access_log.info(
        "%s %s %d %.1f ms",
        scope["method"],
        scope["path"],
        status,
        elapsed_s * 1000,
        extra={
            "http_status": status,
            "duration_ms": round(elapsed_s * 1000, 2),
            "prediction_id": prediction_id,
        },
    )

"""Wiring only: routes, exception handlers, middleware and the lifespan.

The lifespan creates every resource and yields them as request state. The
broker side (connect, replay the event stream, consume tasks) runs in the
background, so the HTTP server answers from the first moment: sync
predictions and /healthz work while the broker is still coming up, and
/readyz says when the rest is ready.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.broker import Broker, BrokerAddress
from service.consumer import TaskWorker
from service.decision import Policy
from service.follower import EventFollower
from service.http import api, lifecycle
from service.http.docs import SwaggerDocs
from service.http.errors import EXCEPTION_HANDLERS
from service.http.hotroutes import HotRoutes
from service.http.instrument import InstrumentMiddleware
from service.http.openapi import build_openapi
from service.http.responses import JsonResponse
from service.journal import Journal
from service.lifecycle import BrokerSide, OnFatal
from service.metrics import Metrics
from service.model import ModelRunner, Predictor, load_predictor
from service.schemas import json_encoder
from service.services import Services
from service.settings import Settings
from service.statedir import StateDir
from service.store import ResultStore
from service.webhooks.sender import WebhookSender

log = logging.getLogger(__name__)

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[dict[str, Services]]]


def create_app(settings: Settings | None = None, *, on_fatal: OnFatal | None = None) -> Starlette:
    """The ASGI app. Raises ConfigError (one line) if a setting is unusable.

    It takes STATE_DIR's lock at once, so a second replica pointed at the
    same directory fails to start with one line, before it serves anything.
    """
    settings = settings or Settings.from_env()
    predictor = load_predictor(settings)
    state_dir = StateDir.acquire(settings.state_dir)
    metrics = Metrics()
    docs = SwaggerDocs()
    openapi = json_encoder.encode(build_openapi(_version(), settings.max_wait_s))

    async def openapi_json(_: Request) -> Response:
        return JsonResponse(openapi)

    routes = [
        Route("/predict", api.predict, methods=["POST"]),
        # `:path` so that any string, slashes included, gets the contract's 404.
        # `path`: an id holding a slash is unknown (404), as on GET /predict/{id}.
        Route("/predict/{prediction_id:path}/status", lifecycle.get_status, methods=["GET"]),
        Route("/predict/{prediction_id:path}/cancel", lifecycle.cancel, methods=["POST"]),
        # Else the route below takes a GET of it, and says 404 for an id that exists.
        Route("/predict/{prediction_id:path}/cancel", lifecycle.cancel_is_a_post, methods=["GET"]),
        Route("/predict/{prediction_id:path}", api.get_prediction, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs.page, methods=["GET"]),
        Route("/docs/static/{name}", docs.asset, methods=["GET"]),
    ]
    # Metrics label requests by route template as documented: /predict/{prediction_id}.
    route_of = {route.endpoint: route.path_format for route in routes}
    services = _build_services(settings, predictor, metrics, state_dir)
    broker_side = BrokerSide(services, on_fatal) if on_fatal else BrokerSide(services)
    app = Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            Middleware(
                InstrumentMiddleware,
                metrics=metrics,
                route_of=route_of,
                hot_routes=HotRoutes(api.get_prediction, api.predict, EXCEPTION_HANDLERS),
            )
        ],
        lifespan=_lifespan(services, broker_side),
    )
    # `/healthz/` answers the JSON 404 of any unknown path: Starlette's slash
    # redirect would be a 307 with an empty body, and every body is JSON.
    app.router.redirect_slashes = False
    # `python -m service` begins its stop on SIGTERM, before uvicorn drains
    # connections, so the worker stops taking tasks at once.
    app.state.broker_side = broker_side
    return app


def _lifespan(services: Services, broker_side: BrokerSide) -> Lifespan:
    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[dict[str, Services]]:
        log.info("%s", startup_line(services.settings))
        broker_side.start()
        try:
            yield {"services": services}
        finally:
            await broker_side.stop(services.settings.shutdown_grace_s)

    return lifespan


def _build_services(
    settings: Settings, predictor: Predictor, metrics: Metrics, state_dir: StateDir
) -> Services:
    store = ResultStore(settings.result_ttl_s, settings.results_memory_max_bytes)
    runner = ModelRunner(predictor, settings.model_concurrency, metrics.model_latency.observe)
    metrics.track(
        in_flight=lambda: runner.running,
        queue_depth=lambda: store.pending,
        long_polls=lambda: store.waiting,
    )
    metrics.track_results(store)
    broker = Broker(settings, metrics)
    journal = Journal(store, broker)
    policy = Policy(settings.max_attempts, settings.retry_backoff_s)
    follower = EventFollower(broker, store)
    worker = TaskWorker(
        broker, journal, runner, metrics, policy, read_log_up_to_now=follower.fences.wait
    )
    store.on_canceled.append(worker.stop_canceled_run)
    metrics.track_stream(follower)
    services = Services(
        settings, store, runner, broker, journal, follower, worker, metrics, state_dir
    )
    if not settings.webhook_secret:
        return services
    # Its bodies are status bodies, built as GET /predict/{id}/status builds them.
    sender = WebhookSender(
        broker,
        settings,
        metrics,
        partial(lifecycle.current_status, services),
        read_up_to_now=follower.fences.wait,
    )
    metrics.webhooks_owed.set_function(lambda: sender.owed)
    return dataclasses.replace(services, webhooks=sender)


def startup_line(settings: Settings) -> str:
    """What this replica runs with, in one line: address, model, broker and limits.

    The broker is named without its password; the user, to tell replicas apart.
    """
    return (
        f"starting on {_listen_address(settings)}: model {_model(settings)}, "
        f"broker {_broker(settings)}, namespace {settings.broker_namespace!r}, "
        f"model concurrency {settings.model_concurrency}, "
        f"max body {settings.max_body_bytes} B, results kept {_seconds(settings.result_ttl_s)} s, "
        f"memory budget {settings.results_memory_max_bytes} B, "
        f"state dir {repr(settings.state_dir) if settings.state_dir else '(temporary)'}"
    )


def _listen_address(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address
    return f"{host}:{settings.port}"


def _model(settings: Settings) -> str:
    if settings.predictor:
        return settings.predictor
    delays = (_seconds(settings.model_delay_min_s), _seconds(settings.model_delay_max_s))
    return f"mock ({delays[0]}-{delays[1]} s)"


def _seconds(value: float) -> str:
    # Whole seconds in full: `:g` alone writes 30 days as 2.592e+06.
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


def _broker(settings: Settings) -> str:
    addresses = [BrokerAddress.parse(url) for url in settings.rabbitmq_urls]
    first = addresses[0]
    tls = " (TLS)" if first.tls else ""
    nodes = ", ".join(map(str, addresses))
    return f"{nodes}{tls} vhost {first.vhost!r} as {first.user}"


def _version() -> str:
    try:
        return importlib.metadata.version("prediction-service")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"

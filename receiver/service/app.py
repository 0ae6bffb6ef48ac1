"""The application factory and its wiring. `create_app` performs no I/O."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from receiver import config, db, errors, metrics, redaction, vault
from receiver.db import migrations
from receiver.debitura import schedule
from receiver.lifecycle import committer, retention
from receiver.service import openapi, scrape, state, webhook
from receiver.signals import outbox

log = structlog.get_logger(__name__)

WEBHOOK_PATH = "/webhooks/debitura"
_ROUTINE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# Workers are started as new processes (`serve --workers`), never forked from this
# one: the id is read once, not with a system call per request.
_PID = os.getpid()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_HTTP_ERRORS: dict[int, type[errors.ReceiverError]] = {
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.BodyTooLarge,
}


def _error_response(exc: errors.ReceiverError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


def _from_http(exc: web.HTTPException) -> errors.ReceiverError:
    kind = _HTTP_ERRORS.get(exc.status)
    if kind is not None:
        return kind(exc.reason.lower())
    if exc.status >= 500:
        return errors.InternalError("internal error, retry later")
    return errors.InvalidRequest(exc.reason.lower())


async def _refuse_token_in_url(_: web.Request) -> web.StreamResponse:
    raise errors.InvalidRequest("tokens must never be sent in a URL")


@web.middleware
async def canonical_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, turn every error into the JSON error body, and write one
    log line per request (the canonical log line)."""
    structlog.contextvars.clear_contextvars()
    given = request.headers.get("X-Request-Id", "")
    # A request id only has to be unique among log lines, not unguessable: no
    # os.urandom system call per request (uuid4 was ~1% of the request path).
    request_id = given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    error_code = None
    # A token in a URL (path or query) ends up in proxies' logs: refuse it, and never
    # hand that path to our own logger either.
    token_in_url = redaction.TOKEN_PATTERN.search(request.raw_path) is not None
    path = "[refused: token in URL]" if token_in_url else request.path
    response: web.StreamResponse
    try:
        response = await (_refuse_token_in_url(request) if token_in_url else handler(request))
    except errors.ReceiverError as exc:
        error_code = exc.code
        if isinstance(exc, errors.InvalidSignature):
            metrics.child(metrics.SIGNATURE_FAILURES, exc.reason).inc()
            # Which check failed, from a fixed set: missing, malformed, stale, future,
            # mismatch (the answer's body stays as terse as before).
            structlog.contextvars.bind_contextvars(signature_failure=exc.reason)
        response = _error_response(exc)
    except web.HTTPException as exc:
        mapped = _from_http(exc)
        error_code = mapped.code
        response = _error_response(mapped)
        if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        # A fault of ours, never of the input: answered 503 so the sender retries
        # (after a fix) rather than counting a 500 towards switching us off.
        log.exception("request_failed")
        metrics.INTERNAL_ERRORS.inc()
        error_code = "internal_error"
        response = _error_response(errors.InternalError("internal error, retry later"))
    response.headers["X-Request-Id"] = request_id
    elapsed = time.perf_counter() - started
    route = _route_label(request)
    metrics.child(metrics.REQUESTS, route, str(response.status)).inc()
    metrics.child(metrics.REQUEST_SECONDS, route).observe(elapsed)
    # Probes and scrapes that went well are routine: at debug, so a crowd of them
    # neither floods the log nor takes the event loop from deliveries.
    routine = route in _ROUTINE_ROUTES and response.status < 400
    (log.debug if routine else log.info)(
        "request",
        method=request.method,
        path=path,
        status=response.status,
        error=error_code,
        duration_ms=round(elapsed * 1000, 2),
        remote=client_address(request),
        pid=_PID,  # which process answered (serve --workers)
    )
    return response


def client_address(request: web.Request) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the
    nearest address in X-Forwarded-For that is not itself a trusted proxy (read from
    the right: only what trusted proxies appended can be believed)."""
    peer = request.remote
    trusted = request.app[state.SETTINGS].trusted_proxies
    if not trusted or peer is None or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    address = peer
    for hop in reversed([h for h in hops if h]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage: nothing further left can be believed
        address = hop
        if not _trusted(hop, trusted):
            break
    return address


def _trusted(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _route_label(request: web.Request) -> str:
    # The route's template, never the raw path: a path is client input.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


async def healthz(_: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Postgres answers, the schema is current, writes are not failing, and
    we are not shutting down."""
    if request.app[state.DRAINING].is_set():
        raise errors.ShuttingDown("shutting down: send new requests elsewhere")
    if request.app[state.COMMITTER].writes_failing:
        # A ping can succeed while every write fails (disk full, a read-only standby).
        raise errors.DatabaseUnavailable("writes are failing: the last commit did not succeed")
    database = request.app[state.DATABASE]
    await database.fetchval("ping")
    behind = await migrations.pending(database)
    if behind:
        raise errors.SchemaNotReady(f"schema is behind: {len(behind)} migration(s) pending")
    return web.json_response({"status": "ready"})


def create_app(settings: config.Settings) -> web.Application:
    """Build the application; resources open in cleanup contexts when it starts."""
    if settings.database_url is None:
        raise errors.ConfigError("RECEIVER_DATABASE_URL must be resolved before the app is built")
    app = web.Application(
        middlewares=[canonical_request],
        client_max_size=settings.max_body_bytes,
    )
    app[state.SETTINGS] = settings
    app[state.SEALER] = vault.Sealer.from_settings(settings)
    app.cleanup_ctx.append(_database)
    if settings.cache_url is not None:
        app.cleanup_ctx.append(_dispatcher)
    if settings.prune_interval_seconds > 0:
        app.cleanup_ctx.append(_pruner)
    app.cleanup_ctx.append(_token_rotation)
    app.router.add_post(WEBHOOK_PATH, webhook.receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/openapi.json", openapi_endpoint)
    app[state.DRAINING] = asyncio.Event()
    app[state.GAUGES] = scrape.DatabaseGauges(
        app[state.SEALER].keyring.primary_id, settings.metrics_refresh_seconds
    )
    app[state.LOAD] = state.Load()
    app[state.SECRET_SETS] = settings.webhook_secret_sets()
    app.on_shutdown.append(_start_draining)
    return app


async def _start_draining(app: web.Application) -> None:
    # Runs as shutdown begins, before in-flight requests are awaited: from now on the
    # readiness probe fails, so load balancers stop sending new deliveries here.
    app[state.DRAINING].set()
    log.info("shutting_down")


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    body = await scrape.render(request.app[state.DATABASE], request.app[state.GAUGES])
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def openapi_endpoint(_: web.Request) -> web.Response:
    """The OpenAPI description of the endpoints."""
    return web.json_response(openapi.document())


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[state.SETTINGS]
    assert settings.database_url is not None  # checked by create_app
    database = await db.Database.open(
        settings.database_url.get_secret_value(),
        statement_timeout=settings.statement_timeout_seconds,
        lock_timeout=settings.lock_timeout_seconds,
        pooled=settings.database_pooled,
    )
    app[state.DATABASE] = database
    app[state.COMMITTER] = committer.GroupCommit(
        database, channel=settings.notify_channel, http_delivery=settings.cache_url is not None
    )
    yield
    await app[state.DATABASE].close()


async def _pruner(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        retention.prune_every(app[state.DATABASE], app[state.SETTINGS]), name="pruner"
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _token_rotation(app: web.Application) -> AsyncIterator[None]:
    # Scheduled rotation and the resumption of unfinished ones (docs/design.md §9);
    # it says once that it is off when no Debitura API key is configured.
    task = asyncio.create_task(
        schedule.run(app[state.DATABASE], app[state.SETTINGS], app[state.SEALER]),
        name="token_rotation",
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _dispatcher(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession() as session:
        dispatcher = outbox.Dispatcher(app[state.DATABASE], app[state.SETTINGS], session)
        app[state.DISPATCHER] = dispatcher
        task = asyncio.create_task(dispatcher.run_until_stopped(), name="dispatcher")
        yield
        # Cancelling run_until_stopped stops the dispatcher gracefully: the batch in
        # flight finishes and is recorded, so no other dispatcher sends it again.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

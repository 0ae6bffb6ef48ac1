"""The application factory and its wiring. `create_app` performs no I/O."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from receiver import config, db, errors, metrics, vault
from receiver.debitura import api, schedule
from receiver.lifecycle import committer, events, retention
from receiver.service import (
    admin_api,
    middleware,
    openapi,
    probes,
    scrape,
    state,
    webconsole,
    webhook,
)
from receiver.signals import outbox

log = structlog.get_logger(__name__)

WEBHOOK_PATH = "/webhooks/debitura"


def create_app(settings: config.Settings) -> web.Application:
    """Build the application; resources open in cleanup contexts when it starts."""
    if settings.database_url is None:
        raise errors.ConfigError("RECEIVER_DATABASE_URL must be resolved before the app is built")
    metrics.initialise_labels(
        event_types=events.KNOWN_TYPES,
        outcomes=events.OUTCOMES,
        quarantine_reasons=events.QUARANTINE_REASONS,
    )
    middlewares: list[Middleware] = [middleware.canonical_request]
    if settings.admin_port is not None:
        middlewares.append(middleware.admin_split(settings.admin_port))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app.on_response_prepare.append(middleware.no_server_version)
    app[state.SETTINGS] = settings
    app[state.LIVE] = state.Live(settings)
    app[state.SEALER] = vault.Sealer.from_settings(settings)
    app.cleanup_ctx.append(_database)
    if settings.cache_url is not None:
        app.cleanup_ctx.append(_dispatcher)
    if settings.prune_interval_seconds > 0:
        app.cleanup_ctx.append(_pruner)
    app.cleanup_ctx.append(_token_rotation)
    app.cleanup_ctx.append(_reconcile)
    # Every route, the catch-all for unmatched paths included, with our expectation
    # handler (aiohttp's own answers an unknown `Expect` with 417 echoing its value,
    # before any middleware).
    expect = middleware.expect_continue
    app.router.add_post(WEBHOOK_PATH, webhook.receive, expect_handler=expect)
    app.router.add_get("/healthz", probes.healthz, expect_handler=expect)
    app.router.add_get("/readyz", probes.readyz, expect_handler=expect)
    app.router.add_get("/metrics", probes.metrics, expect_handler=expect)
    app.router.add_get("/openapi.json", openapi.serve_document, expect_handler=expect)
    # Answers 404 unless on the admin listener with RECEIVER_ADMIN_TOKENS set.
    app.router.add_post(admin_api.CLIENTS_PATH, admin_api.link_client, expect_handler=expect)
    # The operator console: 404 too, unless on the admin listener with admin tokens.
    webconsole.add_routes(app, expect)
    if settings.admin_tokens:
        app.cleanup_ctx.append(admin_api.debitura_session)
    app.router.add_route(
        "*", "/{path:.*}", middleware.unrouted, name=middleware.UNMATCHED, expect_handler=expect
    )
    app[state.DRAINING] = asyncio.Event()
    keyring = app[state.SEALER].keyring
    app[state.GAUGES] = scrape.DatabaseGauges(
        keyring.primary_id,
        settings.metrics_refresh_seconds,
        key_ids=keyring.key_ids,
        reconcile_interval_seconds=settings.reconcile_interval_hours * 3600,
        reconciled_environments=api.configured(settings),
    )
    app[state.LOAD] = state.Load()
    app[state.SECRET_SETS] = settings.webhook_secret_sets()
    app.on_shutdown.append(_start_draining)
    return app


async def _start_draining(app: web.Application) -> None:
    # Runs as shutdown begins, before in-flight requests are awaited: from now on the
    # readiness probe fails, so load balancers stop sending new deliveries here. (On a
    # signal, `serve` has set it already, a delay before.)
    if not app[state.DRAINING].is_set():
        app[state.DRAINING].set()
        log.info("shutting_down", pid=os.getpid())


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
    await scrape.check_keys(database, app[state.SEALER].keyring)
    app[state.COMMITTER] = committer.GroupCommit(
        database,
        sealer=app[state.SEALER],
        channel=settings.notify_channel,
        http_delivery=settings.cache_url is not None,
    )
    yield
    await app[state.DATABASE].close()


async def _token_rotation(app: web.Application) -> AsyncIterator[None]:
    # Scheduled rotation and the resumption of unfinished ones (docs/design.md §9);
    # it says once that it is off when no Debitura API key is configured.
    task = asyncio.create_task(
        schedule.run(app[state.DATABASE], app[state.SETTINGS], app[state.SEALER], _live(app)),
        name="token_rotation",
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _live(app: web.Application) -> schedule.Live:
    """The settings in force now (SIGHUP may have changed the API keys)."""
    live = app[state.LIVE]
    return lambda: live.settings


async def _reconcile(app: web.Application) -> AsyncIterator[None]:
    # Reconciling the vault with Debitura, on schedule and on partner applications'
    # reports (docs/design.md §9); off, said once, without a Debitura API key.
    task = asyncio.create_task(
        schedule.reconcile_forever(
            app[state.DATABASE], app[state.SETTINGS], app[state.SEALER], _live(app)
        ),
        name="reconcile",
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _pruner(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        retention.prune_every(app[state.DATABASE], app[state.SETTINGS]), name="pruner"
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

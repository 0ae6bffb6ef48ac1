"""What orchestrators and Prometheus poll: `/healthz`, `/readyz` and `/metrics`."""

from __future__ import annotations

from aiohttp import web

from receiver import errors
from receiver.db import migrations
from receiver.service import scrape, state


async def healthz(_: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Postgres answers, the schema is current, writes are not failing, and
    we are not shutting down."""
    await check_ready(request.app)
    return web.json_response({"status": "ready"})


async def check_ready(app: web.Application) -> None:
    """Raise the error readiness fails with (the probe's answer, the console's
    overview), or return when ready."""
    if app[state.DRAINING].is_set():
        raise errors.ShuttingDown("shutting down: send new requests elsewhere")
    if app[state.COMMITTER].writes_failing:
        # A ping can succeed while every write fails (disk full, a read-only standby).
        raise errors.DatabaseUnavailable("writes are failing: the last commit did not succeed")
    database = app[state.DATABASE]
    await database.fetchval("ping")
    behind = await migrations.pending(database)
    if behind:
        raise errors.SchemaNotReady(f"schema is behind: {len(behind)} migration(s) pending")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    body = await scrape.render(request.app[state.DATABASE], request.app[state.GAUGES])
    return web.Response(body=body, content_type="text/plain", charset="utf-8")

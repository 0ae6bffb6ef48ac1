"""The long-running commands: `serve`, `dispatch`, and `migrate` (docs/design.md §6).

`serve --workers N` hands its processes to workers.supervise."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from receiver import config, console, db, errors
from receiver.db import embedded, migrations
from receiver.service import app, server, workers
from receiver.signals import outbox

logger = structlog.get_logger(__name__)

STARTUP_DB_WAIT_SECONDS = 30.0
# On SIGTERM: stop accepting, fail /readyz, let requests in flight finish for at most
# this long (Debitura waits 10 s for an answer), then release leases and close.
SHUTDOWN_TIMEOUT_SECONDS = 10.0


async def _migrate_when_reachable(dsn: str) -> list[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_DB_WAIT_SECONDS
    while True:
        try:
            return await migrations.apply(dsn)
        except errors.DatabaseUnavailable:
            if loop.time() > deadline:
                raise
            logger.warning("database_waiting", retry_in_seconds=1)
            await asyncio.sleep(1)


async def _check_behind_pooler(dsn: str) -> None:
    """Behind a transaction-mode pooler, `serve` does not migrate (the migration lock is
    a session lock, which a pooler cannot keep): it checks that nothing is pending, and
    that the role's own settings keep every 200 durable."""
    database = await db.Database.open(dsn, max_size=1, pooled=True)
    try:
        pending = await migrations.pending(database)
        if pending:
            raise errors.ConfigError(
                f"{len(pending)} migration(s) pending: run `receiver migrate` against the "
                "database itself (not through the pooler) before serving"
            )
        rows = await database.fetch("session_settings")
    finally:
        await database.close()
    values = {row["name"]: row["setting"] for row in rows}
    if values.get("synchronous_commit") != "on":
        raise errors.ConfigError(
            "behind a pooler the role's settings apply, and synchronous_commit is not on: "
            "ALTER ROLE … SET synchronous_commit = on (a 200 must follow a durable commit)"
        )
    if values.get("statement_timeout") in (None, "0"):
        logger.warning(
            "pooled_without_statement_timeout", advice="ALTER ROLE … SET statement_timeout = '5s'"
        )


def serve(args: argparse.Namespace) -> int:
    """`receiver serve`."""
    settings = console.start(args, service=True)
    if args.worker:  # one of `serve --workers N`'s processes: the parent migrated
        _run_worker(settings, args.host, args.port, reuse_port=True)
        return 0
    if settings.database_pooled:
        asyncio.run(_check_behind_pooler(console.dsn(settings)))
    else:
        asyncio.run(_migrate_when_reachable(console.dsn(settings)))
    url = f"http://{args.host}:{args.port}"
    if args.dev:
        cache_dsn = asyncio.run(embedded.cache_login(console.dsn(settings)))
        _print_dev_help(settings, url, cache_dsn)
    if args.workers == 1:
        _run_worker(settings, args.host, args.port, reuse_port=False)
        return 0
    return workers.supervise(
        settings, host=args.host, port=args.port, count=args.workers, dev=args.dev
    )


def _run_worker(settings: config.Settings, host: str, port: int, *, reuse_port: bool) -> None:
    _event_loop_runner(settings)(_serve_until_stopped(settings, host, port, reuse_port=reuse_port))


def _event_loop_runner(settings: config.Settings) -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop's `run` when the setting asks for it (or, on `auto`, when the `fast`
    extra installed it), else asyncio's: uvloop is what aiohttp's own production
    worker uses, and it makes socket writes cheaper (figures: bench/README.md)."""
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if settings.event_loop == "uvloop":
                raise errors.ConfigError(
                    "RECEIVER_EVENT_LOOP=uvloop needs uvloop: pip install 'receiver[fast]'"
                ) from None
        else:
            return uvloop.run
    return asyncio.run


async def _serve_until_stopped(
    settings: config.Settings, host: str, port: int, *, reuse_port: bool
) -> None:
    """Serve until SIGTERM or SIGINT, then drain (aiohttp's graceful shutdown)."""
    _allow_open_files(settings.max_connections + 256)  # the pool, logs, listeners
    runner = server.Runner(
        app.create_app(settings),
        max_connections=settings.max_connections,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        # aiohttp starts this timer when a connection opens and again after each answer,
        # and closes the connection if no complete request has arrived when it fires:
        # it bounds idle keep-alive connections and headers trickled byte by byte alike.
        keepalive_timeout=settings.keepalive_seconds,
        access_log=None,  # the canonical request line replaces it, without the query string
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        logger.info("listening", url=f"http://{host}:{port}", pid=os.getpid())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _allow_open_files(wanted: int) -> None:
    """Raise the soft limit on open files towards `wanted` (never past the hard limit):
    with the common default of 1024, accept() would fail before the connection cap
    is reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def dispatch(args: argparse.Namespace) -> int:
    """`receiver dispatch`."""
    settings = console.start(args, service=True)
    if settings.cache_url is None:
        raise errors.ConfigError("RECEIVER_CACHE_URL is required to dispatch signals")
    asyncio.run(_dispatch_until_stopped(settings, console.dsn(settings)))
    return 0


async def _dispatch_until_stopped(settings: config.Settings, dsn: str) -> None:
    database = await db.Database.open(dsn, max_size=4, pooled=settings.database_pooled)
    try:
        async with aiohttp.ClientSession() as session:
            dispatcher = outbox.Dispatcher(database, settings, session)
            task = asyncio.create_task(dispatcher.run_until_stopped())
            loop = asyncio.get_running_loop()
            for stop in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(stop, task.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await database.close()


def _print_dev_help(settings: config.Settings, url: str, cache_dsn: str) -> None:
    command = (
        sys.argv[0] if Path(sys.argv[0]).name == "receiver" else f"{sys.executable} -m receiver"
    )
    data_dir = shlex.quote(str(settings.data_dir.resolve()))
    print(
        "\nreceiver is running (dev mode: embedded Postgres unless RECEIVER_DATABASE_URL is set,\n"
        f"dev secrets in {data_dir}/{config.DEV_SECRETS_FILE}, mode 0600).\n"
        "Fire a signed test event from another terminal:\n\n"
        f"  RECEIVER_DATA_DIR={data_dir} {shlex.quote(command)} replay trigger "
        f"client.onboarding_completed --dev --to {url}{app.WEBHOOK_PATH}\n\n"
        "A partner application's token cache connects read-only (receiver_cache_reader),\n"
        f"with RECEIVER_TOKEN_KEYS from the dev secrets file and:\n\n"
        f"  RECEIVER_CACHE_DATABASE_URL={shlex.quote(cache_dsn)}\n",
        flush=True,
    )


def migrate(args: argparse.Namespace) -> int:
    """`receiver migrate`."""
    settings = console.start(args)
    applied = asyncio.run(migrations.apply(console.dsn(settings)))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0

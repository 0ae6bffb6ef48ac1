"""The long-running commands: `serve`, `dispatch`, and `migrate` (docs/design.md §6).

`serve --workers N` hands its processes to workers.supervise."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import json
import os
import resource
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from receiver import config, console, db, errors, metrics
from receiver.db import embedded, migrations
from receiver.service import app, reload, server, state, workers
from receiver.signals import outbox

logger = structlog.get_logger(__name__)

STARTUP_DB_WAIT_SECONDS = 30.0
# On SIGTERM: stop accepting, fail /readyz, let requests in flight finish for at most
# this long (Debitura waits 10 s for an answer), then release leases and close.
SHUTDOWN_TIMEOUT_SECONDS = 10.0
# Before that, /readyz fails this long (RECEIVER_SHUTDOWN_DELAY_SECONDS unset, no --dev).
DEFAULT_SHUTDOWN_DELAY_SECONDS = 5.0


async def _migrate_when_reachable(dsn: str) -> list[str]:
    """Migrate, waiting (1 s, doubling to 8 s; STARTUP_DB_WAIT_SECONDS in all) for a
    Postgres that is starting or unreachable; a refusal waiting cannot cure (the wrong
    role, database or password) ends at once in one line."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_DB_WAIT_SECONDS
    pause = 1.0
    while True:
        try:
            return await migrations.apply(dsn)
        except (errors.DatabasePermission, errors.DatabaseRefused):
            raise
        except errors.DatabaseUnavailable:
            if loop.time() + pause > deadline:
                raise
            logger.warning(
                "database_waiting", database=console.database_label(dsn), retry_in_seconds=pause
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 8.0)


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


# SIGHUPs that came while `serve` was starting (waiting for the database, migrating):
# remembered, not fatal, and honoured once it serves (the settings were read before).
_RELOADS_WHILE_STARTING: list[int] = []


def _remember_reload(signum: int, _: object) -> None:
    _RELOADS_WHILE_STARTING.append(signum)


def serve(args: argparse.Namespace) -> int:
    """`receiver serve`."""
    signal.signal(signal.SIGHUP, _remember_reload)
    settings = console.start(args, service=True)
    if args.worker:  # one of `serve --workers N`'s processes: the parent migrated
        _run_worker(settings, args, reuse_port=True)
        return 0
    if settings.admin_port == args.port:
        raise errors.ConfigError("RECEIVER_ADMIN_PORT must differ from --port")
    # Before migrating or printing anything: a second `make run` is one line, exit 1.
    for host, port in _listeners(settings, args.host, args.port):
        _check_port_free(host, port)
    if settings.database_pooled:
        asyncio.run(_check_behind_pooler(console.dsn(settings)))
    else:
        asyncio.run(_migrate_when_reachable(console.dsn(settings)))
    url = f"http://{args.host}:{args.port}"
    if args.dev:
        try:
            cache_dsn: str | None = asyncio.run(embedded.cache_login(console.dsn(settings)))
        except errors.DatabasePermission:
            cache_dsn = None  # a RECEIVER_DATABASE_URL whose role may not create roles
        _print_dev_help(settings, url, cache_dsn)
    if args.workers == 1:
        _run_worker(settings, args, reuse_port=False)
        return 0
    return workers.supervise(
        settings, host=args.host, port=args.port, count=args.workers, dev=args.dev
    )


def _listeners(settings: config.Settings, host: str, port: int) -> list[tuple[str, int]]:
    """Where `serve` listens: the public address, and the admin listener (on
    RECEIVER_ADMIN_HOST, loopback by default) when RECEIVER_ADMIN_PORT is set."""
    if settings.admin_port is None:
        return [(host, port)]
    return [(host, port), (settings.admin_host, settings.admin_port)]


def _check_port_free(host: str, port: int) -> None:
    """Raise `errors.ListenError` when something listens on host:port already. Bound
    without SO_REUSEPORT, so a listener that has it (an earlier `serve --workers`)
    counts too."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise errors.ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise errors.ListenError(_listen_failure(host, port, exc)) from None


def _listen_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {host}:{port}: the port is in use (another receiver?)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def shutdown_delay(settings: config.Settings, *, dev: bool) -> float:
    """How long /readyz fails before the listener stops: the setting, else 5 s (0
    with --dev, where no load balancer waits)."""
    if settings.shutdown_delay_seconds is not None:
        return settings.shutdown_delay_seconds
    return 0.0 if dev else DEFAULT_SHUTDOWN_DELAY_SECONDS


def _run_worker(settings: config.Settings, args: argparse.Namespace, *, reuse_port: bool) -> None:
    _event_loop_runner(settings)(
        _serve_until_stopped(
            settings,
            args.host,
            args.port,
            reuse_port=reuse_port,
            delay=shutdown_delay(settings, dev=args.dev),
            supervisor_fd=getattr(args, "supervisor_fd", None),
            dev=args.dev,
        )
    )


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
    settings: config.Settings,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    delay: float,
    supervisor_fd: int | None = None,
    dev: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully (SIGHUP reloads: `reload`):
    /readyz fails for
    `delay` seconds while deliveries are still answered (a load balancer moves away),
    then the listener closes and requests in flight finish (aiohttp's graceful
    shutdown). A worker whose supervisor is gone (`supervisor_fd` reads end of file)
    stops at once, without the delay."""
    _allow_open_files(settings.max_connections + 256)  # the pool, logs, listeners
    application = app.create_app(settings)
    runner = server.Runner(
        application,
        max_connections=settings.max_connections,
        # A new connection's first request line and headers: a sender has as long for
        # them as for a body, and a stranger holding connections open without a
        # request loses each that soon (not after the keep-alive timeout).
        header_seconds=min(settings.body_timeout_seconds, settings.keepalive_seconds),
        # A body slower than this (after the grace) holds a connection for nothing: a
        # delivery is a few KB sent at once. Strangers from one address hold at most
        # so many connections until one authenticates (README "Security").
        body_floor=settings.min_body_bytes_per_second,
        body_grace=settings.min_body_rate_grace_seconds,
        max_per_source=settings.max_connections_per_source,
        trusted=settings.trusted_proxies,
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
        # aiohttp starts this timer when a connection opens and again after each answer,
        # and closes the connection if no complete request has arrived when it fires:
        # it bounds idle keep-alive connections and headers trickled byte by byte alike.
        keepalive_timeout=settings.keepalive_seconds,
        access_log=None,  # the canonical request line replaces it, without the query string
    )
    await runner.setup()
    try:
        for listen_host, listen_port in _listeners(settings, host, port):
            try:
                await web.TCPSite(runner, listen_host, listen_port, reuse_port=reuse_port).start()
            except OSError as exc:
                raise errors.ListenError(_listen_failure(listen_host, listen_port, exc)) from None
        logger.info(
            "listening",
            url=f"http://{host}:{port}",
            admin_url=None
            if settings.admin_port is None
            else f"http://{settings.admin_host}:{settings.admin_port}",
            version=metrics.version(),
            database=console.database_label(console.dsn(settings)),
            pid=os.getpid(),
        )
        stop = asyncio.Event()
        why: list[str] = []
        loop = asyncio.get_running_loop()

        def on_signal(signum: signal.Signals) -> None:
            why.append(signum.name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        # SIGHUP reloads (systemd's ExecReload sends it); the service keeps serving.
        loop.add_signal_handler(
            signal.SIGHUP, functools.partial(reload.reload, application, dev=dev)
        )
        if _RELOADS_WHILE_STARTING:
            _RELOADS_WHILE_STARTING.clear()
            reload.reload(application, dev=dev)

        def on_supervisor_gone() -> None:
            why.append("supervisor_gone")
            stop.set()

        if supervisor_fd is not None:
            loop.add_reader(supervisor_fd, on_supervisor_gone)
        await stop.wait()
        if supervisor_fd is not None:
            loop.remove_reader(supervisor_fd)
        wait = 0.0 if why[0] == "supervisor_gone" else delay
        application[state.DRAINING].set()
        logger.info("shutting_down", signal=why[0], pid=os.getpid(), readiness_delay_seconds=wait)
        if wait > 0:
            stop.clear()  # a second signal cuts the delay short
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
    finally:
        await runner.cleanup()
    logger.info("stopped", pid=os.getpid())


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
    settings = console.start(args, service=True, needs=config.NEEDS_DATABASE)
    if settings.cache_url is None:
        raise errors.ConfigError("RECEIVER_CACHE_URL is required to dispatch signals")
    asyncio.run(_dispatch_until_stopped(settings, console.dsn(settings), dev=args.dev))
    return 0


async def _dispatch_until_stopped(settings: config.Settings, dsn: str, *, dev: bool) -> None:
    database = await db.Database.open(dsn, max_size=4, pooled=settings.database_pooled)
    try:
        try:
            # The dispatcher's loop rides out an outage; a wrong role (a refused login,
            # the cache reader's URL) would never pass: one line, exit 2, as serve says.
            await database.fetch("open_signal_counts")
        except (errors.DatabasePermission, errors.DatabaseRefused):
            raise
        except errors.DatabaseUnavailable:
            pass  # down, or not migrated yet: the loop waits for it
        async with aiohttp.ClientSession() as session:
            dispatcher = outbox.Dispatcher(database, settings, session)
            task = asyncio.create_task(dispatcher.run_until_stopped())
            loop = asyncio.get_running_loop()
            for stop in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(stop, task.cancel)
            in_force = settings

            def hang_up() -> None:
                # A reload, as serve's (the cache secret and the log level): the
                # dispatcher keeps delivering.
                nonlocal in_force
                fresh = reload.reread(in_force, dev=dev, needs=config.NEEDS_DATABASE)
                if fresh is not in_force:
                    in_force = fresh
                    dispatcher.use_secrets(fresh)

            loop.add_signal_handler(signal.SIGHUP, hang_up)
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await database.close()


def _print_dev_help(settings: config.Settings, url: str, cache_dsn: str | None) -> None:
    command = (
        sys.argv[0] if Path(sys.argv[0]).name == "receiver" else f"{sys.executable} -m receiver"
    )
    data_dir = shlex.quote(str(settings.data_dir.resolve()))
    dsn = console.dsn(settings)
    text = (
        "\nreceiver is running (dev mode: embedded Postgres unless RECEIVER_DATABASE_URL is set,\n"
        f"dev secrets in {data_dir}/{config.DEV_SECRETS_FILE}, mode 0600).\n"
        "Fire a signed test event from another terminal:\n\n"
        f"  RECEIVER_DATA_DIR={data_dir} {shlex.quote(command)} replay trigger "
        f"client.onboarding_completed --dev --to {url}{app.WEBHOOK_PATH}\n"
    )
    if not urlsplit(dsn).password:
        # The embedded Postgres's URL (it has no password). A URL you set may hold one,
        # which is never printed; you know it already.
        text += (
            "\nCommands without --dev (as the README writes them) need the database URL:\n\n"
            f"  export RECEIVER_DATABASE_URL={shlex.quote(dsn)}\n"
        )
    if cache_dsn is None:
        text += (
            "\nNo login for a partner application's token cache: the role in "
            "RECEIVER_DATABASE_URL may not create roles.\n"
        )
    else:
        text += (
            "\nA partner application's token cache connects read-only (receiver_cache_reader),\n"
            f"with RECEIVER_TOKEN_KEYS from the dev secrets file and:\n\n"
            f"  RECEIVER_CACHE_DATABASE_URL={shlex.quote(cache_dsn)}\n"
        )
    print(text, flush=True)


def migrate(args: argparse.Namespace) -> int:
    """`receiver migrate`: apply; with --status list applied and pending migrations;
    with --check exit 1 when any is pending; with --print-roles print the group roles'
    SQL. Needs the database URL and nothing else (--print-roles not even that)."""
    if args.print_roles:
        print(migrations.roles_sql(), end="")
        return 0
    settings = console.start(args, needs=config.NEEDS_DATABASE)
    if args.status or args.check:
        pending = asyncio.run(_migration_status(settings, listing=args.status, as_json=args.json))
        return console.EXIT_FAILURE if pending and args.check else 0
    applied = asyncio.run(migrations.apply(console.dsn(settings)))
    if args.json:
        print(json.dumps({"applied": applied}))
    else:
        print(
            f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else "")
        )
    return 0


async def _migration_status(
    settings: config.Settings, *, listing: bool, as_json: bool = False
) -> list[str]:
    database = await db.Database.open(
        console.dsn(settings), max_size=1, pooled=settings.database_pooled
    )
    try:
        known = await migrations.status(database)
    finally:
        await database.close()
    pending = [name for name, applied_at in known if applied_at is None]
    if as_json:
        for name, applied_at in known if listing else ():
            print(json.dumps({"name": name, "applied_at": applied_at and db.iso(applied_at)}))
        print(json.dumps({"applied": len(known) - len(pending), "pending": pending}))
        return pending
    if listing:
        for name, applied_at in known:
            when = "pending" if applied_at is None else f"applied {db.iso(applied_at)}"
            print(f"{name}  {when}")
    print(f"{len(known) - len(pending)} applied, {len(pending)} pending")
    return pending

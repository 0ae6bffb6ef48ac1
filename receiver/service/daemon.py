"""The long-running commands: `serve`, `dispatch`, and `migrate` (docs/design.md §6)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import multiprocess

from receiver import config, console, db, errors
from receiver.db import migrations
from receiver.service import app, server
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
        cache_dsn = asyncio.run(_dev_cache_role(console.dsn(settings)))
        _print_dev_help(settings, url, cache_dsn)
    if args.workers == 1:
        _run_worker(settings, args.host, args.port, reuse_port=False)
        return 0
    return _run_workers(settings, args)


def _run_worker(settings: config.Settings, host: str, port: int, *, reuse_port: bool) -> None:
    _event_loop_runner(settings)(_serve_until_stopped(settings, host, port, reuse_port=reuse_port))


def _event_loop_runner(settings: config.Settings) -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop's `run` when the setting asks for it (or, on `auto`, when the `fast`
    extra installed it), else asyncio's: uvloop is what aiohttp's own production
    worker uses, and it halves the cost of socket writes (bench/README.md)."""
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


# A dead worker is replaced after a pause that doubles from 1 s up to 30 s; a worker
# that ran for a minute resets it. Five deaths within a minute is a crash loop: the
# service stops (exit 1) and the orchestrator takes over.
RESTART_DELAY_SECONDS = 1.0
RESTART_DELAY_CAP_SECONDS = 30.0
HEALTHY_RUN_SECONDS = 60.0
CRASH_LOOP_DEATHS = 5


def _run_workers(settings: config.Settings, args: argparse.Namespace) -> int:
    """N worker processes share the port (SO_REUSEPORT; the kernel spreads connections).

    Each worker is a fresh interpreter started with PROMETHEUS_MULTIPROC_DIR set, which
    prometheus-client reads when it is imported: the workers keep their metrics in
    files there, and any worker's /metrics reports the sum. The parent has migrated;
    it forwards SIGTERM/SIGINT. A worker that dies is replaced after a backoff, as
    gunicorn's arbiter does, while the others keep serving; only a crash loop stops
    the service.
    """
    assert settings.database_url is not None
    metrics_dir = tempfile.mkdtemp(prefix="receiver-metrics-")
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        # As resolved here (the embedded Postgres in dev): workers must not start another.
        "RECEIVER_DATABASE_URL": settings.database_url.get_secret_value(),
    }
    argv = [sys.executable, "-m", "receiver", "serve", "--worker"]
    argv += ["--host", args.host, "--port", str(args.port), *(["--dev"] if args.dev else [])]
    # Only waitpid() below reaps the workers: `running` is the bookkeeping. The Popen
    # objects are kept until then: one dropped while its process runs would be reaped
    # by subprocess's own cleanup at the next Popen, behind our back.
    running: dict[int, float] = {}  # pid -> when it started
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _: object = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def start_one() -> None:
        # A session of their own: a terminal's Ctrl-C (or any signal to the parent's
        # group) reaches the parent alone, which forwards it once. A second signal
        # would cut a worker's drain short. (Containers and systemd kill the whole
        # cgroup on SIGKILL, so workers do not outlive a killed parent there.)
        child = subprocess.Popen(argv, env=env, start_new_session=True)  # noqa: S603
        running[child.pid] = time.monotonic()
        children[child.pid] = child

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    deaths: list[float] = []
    restarts_due: list[float] = []
    delay = RESTART_DELAY_SECONDS
    try:
        for _ in range(args.workers):
            start_one()
        while running or (restarts_due and not stopping):
            now = time.monotonic()
            if restarts_due and restarts_due[0] <= now and not stopping:
                restarts_due.pop(0)
                start_one()
                logger.info("worker_restarted", workers=len(running))
                continue
            # Polled, not a blocking wait(): a restart may be due before any child exits.
            pid, status = os.waitpid(-1, os.WNOHANG) if running else (0, 0)
            if pid == 0:
                time.sleep(0.1)
                continue
            started = running.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            children.pop(pid).returncode = code  # reaped: Popen must not wait for it
            multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
            if stopping and code in (0, -signal.SIGTERM, -signal.SIGINT):
                continue
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < HEALTHY_RUN_SECONDS] + [now]
            if len(deaths) >= CRASH_LOOP_DEATHS:
                logger.error("worker_crash_loop", pid=pid, status=code, deaths=len(deaths))
                stop_all()
                for other in list(running):  # let the others drain, then report
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(other, 0)
                    children.pop(other).returncode = 0
                running.clear()
                return 1
            delay = RESTART_DELAY_SECONDS if now - started >= HEALTHY_RUN_SECONDS else delay
            logger.error("worker_exited", pid=pid, status=code, restart_in_seconds=delay)
            restarts_due.append(now + delay)
            delay = min(delay * 2, RESTART_DELAY_CAP_SECONDS)
        return 0
    finally:
        stop_all()
        shutil.rmtree(metrics_dir, ignore_errors=True)


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


DEV_CACHE_ROLE = "receiver_cache_dev"


async def _dev_cache_role(dsn: str) -> str:
    """Dev mode: a login role in receiver_cache_reader (with a fresh password each
    start) for a partner application's token cache; its connection string."""
    password = secrets.token_urlsafe(18)
    conn = await db.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", DEV_CACHE_ROLE)
        verb = "ALTER" if exists else "CREATE"
        # Identifiers and passwords cannot be bind parameters in DDL; both are ours.
        await conn.execute(f"{verb} ROLE {DEV_CACHE_ROLE} LOGIN PASSWORD '{password}'")
        await conn.execute(f"GRANT receiver_cache_reader TO {DEV_CACHE_ROLE}")
    finally:
        await conn.close()
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{DEV_CACHE_ROLE}:{password}@{host}"))


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

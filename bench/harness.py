"""Shared parts of the benchmarks: a Postgres, a migrated database, a real
`receiver serve` process, a stand-in cache, and signed senders. Loopback only."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiohttp import web

from bench import loadgen
from receiver import signing
from receiver.db import embedded, migrations


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


def summary_ms(values: list[float]) -> str:
    """p50/p99/max of seconds, in milliseconds."""
    if not values:
        return "no samples"
    p50, p99 = percentile(values, 50) * 1000, percentile(values, 99) * 1000
    mean = statistics.mean(values) * 1000
    return (
        f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  max {max(values) * 1000:7.2f} ms"
        f"  (n={len(values)}, mean {mean:.2f})"
    )


def server_dsn() -> str:
    """RECEIVER_BENCH_DATABASE_URL, else an embedded Postgres in a temporary directory."""
    given = os.environ.get("RECEIVER_BENCH_DATABASE_URL")
    if given:
        return given
    return embedded.start(Path(tempfile.mkdtemp(prefix="receiver-bench-")))


@asynccontextmanager
async def fresh_database(dsn: str, *, migrate: bool = True) -> AsyncIterator[str]:
    """A new database on the server, migrated unless told not to; dropped afterwards."""
    name = f"receiver_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))
    try:
        if migrate:
            await migrations.apply(url)
        await recycle_wal(url)
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def recycle_wal(url: str, segments: int = 6) -> None:
    """Give a new Postgres cluster the write-ahead log of one that has been running.

    A fresh cluster creates (and zero-fills) each 16 MB WAL segment the first time it
    reaches it; the full path writes about 2 KB of WAL per event, so at 1,000 events/s
    that is a new segment every 8 s, and each creation stalled commits for 25-70 ms
    (measured: with wal_init_zero off the stalls were gone). A server that has been
    running reuses old segments instead. Writing a few segments' worth and taking a
    checkpoint makes the cluster do the same, so the figures describe the steady state.
    Skipped (with a note) where the role may not switch WAL or checkpoint.
    """
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_wal (x int)")
        for _ in range(segments):
            await conn.execute("INSERT INTO bench_wal VALUES (1)")
            await conn.execute("SELECT pg_switch_wal()")
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        print("note: no privilege to recycle WAL; figures include new-segment stalls")
    finally:
        await conn.close()


def secrets_env(database_url: str, **extra: str) -> dict[str, str]:
    """An environment for a receiver process with fresh secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env.update(
        RECEIVER_DATABASE_URL=database_url,
        RECEIVER_WEBHOOK_SECRETS=base64.b64encode(secrets.token_bytes(32)).decode(),
        RECEIVER_TOKEN_KEYS="k1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        RECEIVER_INDEX_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        RECEIVER_LOG_FORMAT="json",  # what production writes: the canonical line per request
    )
    env.update(extra)
    return env


@contextmanager
def receiver_process(
    env: dict[str, str], port: int, command: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A server on loopback (`receiver serve` unless `command` says otherwise), its
    output in BENCH_SERVER_LOG if set; stopped with SIGTERM afterwards."""
    argv = command or [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
    with open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "ab") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            process.wait(timeout=30)


async def wait_ready(port: int, seconds: float = 60) -> None:
    """Poll /readyz until it answers 200 (bounded)."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("receiver did not become ready")


def token() -> str:
    """A fresh live-shaped token."""
    return "tok_live_" + secrets.token_hex(16)


def onboarding(client_id: str) -> bytes:
    """A client.onboarding_completed body."""
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "event": "client.onboarding_completed",
            "data": {
                "client_id": client_id,
                "bearer_token": token(),
                "onboarding_completed_at": "2024-01-15T10:30:00Z",
            },
        }
    ).encode()


def onboardings(count: int) -> list[bytes]:
    """`count` onboardings, each for a client never seen before."""
    return [onboarding(f"cli_{uuid.uuid4().hex[:12]}") for _ in range(count)]


def revocation(client_id: str) -> bytes:
    """A token.revoked body (no prefix: everything before now)."""
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "event": "token.revoked",
            "data": {"client_id": client_id, "revoked_at": "2030-01-01T00:00:00Z"},
        }
    ).encode()


async def post(
    session: aiohttp.ClientSession, url: str, secret: bytes, body: bytes
) -> tuple[int, float]:
    """POST a signed body; return the status and when the answer arrived."""
    headers = {
        "Content-Type": "application/json",
        signing.SIGNATURE_HEADER: signing.header_value(secret, body),
    }
    async with session.post(url, data=body, headers=headers) as response:
        await response.read()
        return response.status, time.monotonic()


class Cache:
    """A stand-in token cache that notes when each client's signal arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Cache:
        app = web.Application()
        app.router.add_post("/signals", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        payload = await request.json()
        key = f"{payload['client_id']}:{payload['reason']}"
        self.arrived.setdefault(key, time.monotonic())
        return web.json_response({"ok": True})


async def onboarding_load(
    database_url: str,
    concurrency: int,
    seconds: float,
    before: Callable[[], Awaitable[object]] | None = None,
) -> loadgen.Answers:
    """One `receiver serve` on the database, warmed up for a second, then a closed loop
    of new-client onboardings; `before` runs just before the measured load starts.
    Every answer must be 200."""
    port = free_port()
    env = secrets_env(database_url)
    secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
    with receiver_process(env, port):
        await wait_ready(port)
        await loadgen.closed_loop(port, loadgen.prebuilt(port, secret, onboardings(2_000)), 8, 1)
        requests = loadgen.prebuilt(port, secret, onboardings(int(seconds * 8_000)))
        if before is not None:
            await before()
        answers = await loadgen.closed_loop(port, requests, concurrency, seconds)
    return answers.only(200)

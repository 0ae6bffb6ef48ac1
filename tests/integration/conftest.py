"""Fixtures for tests that run the receiver against a real Postgres."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from receiver import config, db, log, vault
from receiver.config import Settings
from receiver.db import embedded
from receiver.partner import cache
from receiver.service import app
from tests import conftest, helpers
from tests.integration import processes
from tests.integration.processes import Served
from tests.integration.standins import StandInCache

Post = Callable[..., Awaitable[ClientResponse]]
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def webhook_secret() -> str:
    """The base64 webhook secret the receiver under test accepts."""
    return helpers.new_secret()


@pytest.fixture
def settings(database_url: str, webhook_secret: str) -> Settings:
    """Settings for a receiver on the per-test database."""
    return config.load_settings(
        database_url=database_url,
        webhook_secrets=webhook_secret,
        token_keys="k1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        index_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        metrics_refresh_seconds=0,  # each scrape reads Postgres: tests compare scrapes
        prune_interval_seconds=0,  # no prune in the background unless a test asks for one
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The partner application's own HTTP session (for the partner library's calls)."""
    async with aiohttp.ClientSession() as opened:
        yield opened


@pytest.fixture
def cache_secret() -> str:
    """The base64 secret that signs invalidation POSTs."""
    return helpers.new_secret()


@pytest.fixture
async def standin_cache(cache_secret: str) -> AsyncIterator[StandInCache]:
    """The partner's token cache service, listening on loopback."""
    cache = StandInCache(cache_secret, processes.free_port())
    await cache.start()
    yield cache
    await cache.stop()


def settings_values(settings: Settings) -> dict[str, Any]:
    """The settings written back in the form RECEIVER_* variables take."""
    values = {
        "webhook_secrets": ",".join(
            base64.b64encode(s.get_secret_value()).decode() for s in settings.webhook_secrets
        ),
        "token_keys": ",".join(
            f"{k}:{base64.b64encode(v.get_secret_value()).decode()}" for k, v in settings.token_keys
        ),
        "index_key": base64.b64encode(settings.index_key.get_secret_value()).decode(),
    }
    if settings.database_url is not None:
        values["database_url"] = settings.database_url.get_secret_value()
    return values


def operator_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a receiver process, or an operator's shell, for `settings`."""
    variables = {f"RECEIVER_{k.upper()}": v for k, v in settings_values(settings).items()}
    return processes.clean_env(**(variables | extra))


def with_cache(settings: Settings, cache: StandInCache, **extra: Any) -> Settings:
    """The settings with HTTP delivery to `cache` switched on, retries fast for tests."""
    values: dict[str, Any] = {
        **settings_values(settings),
        "cache_url": cache.url,
        "cache_secret": cache.secret_b64,
        "signal_retry_base_seconds": 0.05,
    }
    values.update(extra)
    return config.load_settings(**values)


def cache_settings(settings: Settings, **extra: Any) -> cache.CacheSettings:
    """What a partner application's cache is given, for the receiver under `settings`."""
    values: dict[str, Any] = {
        "database_url": settings.database_url,
        "token_keys": settings_values(settings)["token_keys"],
        "notify_channel": settings.notify_channel,
        "cache_secret": settings.cache_secret,
        "cache_ttl_seconds": 3600.0,
    }
    return cache.CacheSettings(**(values | extra))


@pytest.fixture
def sealer(settings: Settings) -> vault.Sealer:
    """The keyring and index key of the receiver under test."""
    return vault.Sealer.from_settings(settings)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> Client:
    """An HTTP client for a receiver serving on loopback."""
    served: Client = await aiohttp_client(app.create_app(settings))
    return served


@pytest.fixture
def post(client: Client, webhook_secret: str) -> Post:
    """POST a document (or raw bytes) to the webhook, signed unless told otherwise."""

    async def send(document: Any, *, secret: str | None = None, **headers: str) -> ClientResponse:
        body = document if isinstance(document, bytes) else helpers.encode(document)
        signed = helpers.signed_headers(secret or webhook_secret, body)
        signed.update(headers)
        return await client.post(app.WEBHOOK_PATH, data=body, headers=signed)

    return send


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[db.Database]:
    """The product's own pool on the test database."""
    opened = await db.Database.open(database_url)
    yield opened
    await opened.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, to look at what was stored."""
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
def log_lines(settings: Settings) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The JSON log lines written during the test, through the product's redaction."""
    stream = io.StringIO()
    log.configure(fmt="json", level="debug", secrets=settings.secret_values(), stream=stream)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]

    yield lines
    # What this test logged stays under the canary check, then logs go back there.
    (conftest.LOG_DIR / f"captured-{id(stream)}.log").write_text(stream.getvalue())
    conftest.log_to_session_file()


@pytest.fixture
def own_postgres() -> Any:
    """A Postgres started for this test alone, which the test may stop and start."""
    root = Path(tempfile.mkdtemp(prefix="receiver-fault-pg-"))
    dsn = embedded.start(root)
    data = root / "postgres"
    pg_ctl = str(embedded.bin_dir() / "pg_ctl")
    owner = data.owner()

    socket_dir = parse_qs(urlsplit(dsn).query)["host"][0]

    def control(action: str) -> None:
        options = ["-w", "-t", "30", "-D", str(data), "-l", str(data / "log")]
        if action == "stop":
            options += ["-m", "fast"]
        else:  # as the package started it: no TCP port, its own socket directory
            options += ["-o", f"-h '' -k {socket_dir}"]
        done = subprocess.run(
            [pg_ctl, *options, action],
            check=False,
            user=owner if owner != "root" else None,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            log_file = data / "log"
            server_log = log_file.read_text()[-3000:] if log_file.exists() else ""
            raise AssertionError(
                f"pg_ctl {action} exited {done.returncode}: {done.stdout}{done.stderr}\n"
                f"server log (tail):\n{server_log}"
            )

    yield dsn, control
    # A test that failed half-way through an outage may have left it stopped.
    if (data / "postmaster.pid").exists():
        control("stop")
    shutil.rmtree(root, ignore_errors=True)


_CLIENT_LOCK = "SELECT receiver.lock_clients_v1(ARRAY[$1::text])"
# Sessions of this database waiting for a row another transaction holds (a client's
# lock row, say).
ROW_LOCK_WAITS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND wait_event_type = 'Lock' AND wait_event IN ('transactionid', 'tuple')"
)


@contextlib.asynccontextmanager
async def client_lock(
    database_url: str, client_id: str
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Another session holding a client's lock (a long transaction on that client:
    its row of receiver.client_locks); yields `release()`, which the block may call
    early."""
    holder = await asyncpg.connect(database_url)
    held = False

    async def release() -> None:
        nonlocal held
        if held:
            await holder.execute("COMMIT")
            held = False

    try:
        await holder.execute("BEGIN")
        held = True
        await holder.execute(_CLIENT_LOCK, client_id)
        yield release
    finally:
        await holder.close()


@pytest.fixture(scope="module")
def served(server_dsn: str, template_name: str) -> Iterator[Served]:
    """`receiver serve` on a fresh clone of the template, with a 1 s body timeout and
    a 2 s keep-alive (header) timeout."""
    with conftest.cloned_database(server_dsn, template_name, "receiver_hostile") as url:
        keys = config.generate_dev_secrets()
        env = processes.clean_env(
            **{f"RECEIVER_{k.upper()}": v for k, v in keys.items()},
            RECEIVER_DATABASE_URL=url,
            RECEIVER_BODY_TIMEOUT_SECONDS="1",
            RECEIVER_KEEPALIVE_SECONDS="2",
            RECEIVER_METRICS_REFRESH_SECONDS="0",  # tests compare scrapes a moment apart
        )
        port = processes.free_port()
        with processes.serving(["--port", str(port)], env) as (process, output):
            asyncio.run(processes.wait_healthy(port, process))
            yield Served(f"http://127.0.0.1:{port}", keys["webhook_secrets"], url, keys, output)


@pytest.fixture
def test_secret() -> str:
    """A secret Debitura signs test deliveries with (RECEIVER_TEST_WEBHOOK_SECRETS)."""
    return helpers.new_secret()


@pytest.fixture
def two_world_settings(settings: Settings, test_secret: str) -> Settings:
    """The receiver's settings with a test webhook secret as well."""
    return config.load_settings(**settings_values(settings), test_webhook_secrets=test_secret)


@pytest.fixture
async def two_worlds(aiohttp_client: Any, two_world_settings: Settings) -> Client:
    """A receiver that knows a live and a test secret."""
    return await aiohttp_client(app.create_app(two_world_settings))  # type: ignore[no-any-return]

"""Probes and the 503 contract: Postgres away means "retry later", never a lost event."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr

from receiver import db, errors
from receiver.config import Settings
from receiver.db import migrations
from receiver.service import app, state
from tests import helpers
from tests.conftest import create_database, drop_database, unique_name, with_database
from tests.integration.conftest import Post, client_lock


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_healthz_and_readyz(client: Any) -> None:
    """With Postgres up and migrated, both probes answer 200."""
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready"}


async def test_readyz_fails_on_unmigrated_schema(
    aiohttp_client: Any, settings: Settings, empty_database_url: str
) -> None:
    """A reachable database without the schema is not ready."""
    unmigrated = settings.model_copy(update={"database_url": SecretStr(empty_database_url)})
    client = await aiohttp_client(app.create_app(unmigrated))
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await client.get("/healthz")).status == 200


async def test_unreachable_postgres_is_503_with_retry_after(
    aiohttp_client: Any, settings: Settings, webhook_secret: str
) -> None:
    """Connection refused: 503, a Retry-After header, and the Debitura error shape."""
    dsn = f"postgresql://postgres@127.0.0.1:{_closed_port()}/postgres"
    down = settings.model_copy(update={"database_url": SecretStr(dsn)})
    client = await aiohttp_client(app.create_app(down))
    body = helpers.encode(helpers.onboarding())
    response = await client.post(
        app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
    )
    assert response.status == 503
    assert response.headers["Retry-After"].isdigit()
    assert (await response.json())["error"]["code"] == "service_unavailable"
    assert (await client.get("/readyz")).status == 503


async def test_event_is_accepted_once_the_database_is_back(
    aiohttp_client: Any,
    settings: Settings,
    webhook_secret: str,
    server_dsn: str,
    template_name: str,
) -> None:
    """A delivery refused with 503 while the database is missing succeeds on Debitura's retry."""
    name = unique_name("receiver_late")
    late = settings.model_copy(update={"database_url": SecretStr(with_database(server_dsn, name))})
    client = await aiohttp_client(app.create_app(late))
    body = helpers.encode(helpers.onboarding())
    headers = helpers.signed_headers(webhook_secret, body)
    assert (await client.post(app.WEBHOOK_PATH, data=body, headers=headers)).status == 503

    await create_database(server_dsn, name, template_name)
    try:
        retry = await client.post(app.WEBHOOK_PATH, data=body, headers=headers)
        assert retry.status == 200
        assert (await retry.json())["status"] == "processed"
    finally:
        await client.close()
        await drop_database(server_dsn, name)


async def test_unmigrated_database_answers_503_not_500(
    aiohttp_client: Any, settings: Settings, empty_database_url: str, webhook_secret: str
) -> None:
    """Deliveries before `receiver migrate` are retried by Debitura, not failed."""
    unmigrated = settings.model_copy(update={"database_url": SecretStr(empty_database_url)})
    client = await aiohttp_client(app.create_app(unmigrated))
    body = helpers.encode(helpers.onboarding())
    response = await client.post(
        app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
    )
    assert response.status == 503


async def test_migrations_are_idempotent_and_safe_concurrently(empty_database_url: str) -> None:
    """Five replicas migrating at once apply each migration exactly once."""
    results = await asyncio.gather(*(migrations.apply(empty_database_url) for _ in range(5)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == [m.name for m in migrations.available()]
    assert await migrations.apply(empty_database_url) == []


async def test_edited_migration_is_refused(database_url: str) -> None:
    """A migration whose file changed after it was applied stops the migrator."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE receiver.schema_migrations SET checksum = 'edited'")
    finally:
        await conn.close()
    with pytest.raises(errors.MigrationError, match="forward-only"):
        await migrations.apply(database_url)


async def test_synchronous_commit_is_on_for_our_connections(
    post: Post, conn: asyncpg.Connection, database_url: str
) -> None:
    """Even when the database defaults to synchronous_commit=off, ours commit durably."""
    # The clone's own name (an embedded Postgres's DSN ends in a socket path instead).
    name = await conn.fetchval("SELECT current_database()")
    await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    database = await db.Database.open(database_url)
    try:
        async with database.connection() as pooled:
            assert await pooled.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await database.close()


async def test_sessions_ended_by_the_server_are_503_and_the_pool_recovers(
    post: Post, conn: asyncpg.Connection
) -> None:
    """Postgres ending our sessions mid-transaction (a restart, pg_terminate_backend, an
    idle timeout) is answered 503, never 500. A connection the driver is left unable to
    use is dropped, not pooled again, so Debitura's retries all succeed afterwards and
    every event is stored once."""
    documents = [helpers.onboarding() for _ in range(200)]
    statuses: list[int] = []
    queue = list(documents)
    killing = True

    async def sender() -> None:
        while killing or queue:
            if not queue:
                queue.extend(documents[:20])  # keep the pool busy while sessions end
            statuses.append((await post(queue.pop())).status)

    async def killer() -> None:
        for _ in range(200):
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'receiver' AND datname = current_database()"
            )
            await asyncio.sleep(0.01)

    senders = [asyncio.create_task(sender()) for _ in range(8)]
    await killer()
    killing = False
    await asyncio.gather(*senders)

    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert 503 in statuses, "no session was ended mid-request: the test proved nothing"
    retries = [(await post(d)).status for d in documents]
    assert set(retries) == {200}
    stored = await conn.fetchval("SELECT count(DISTINCT key) FROM receiver.events")
    assert stored == await conn.fetchval("SELECT count(*) FROM receiver.events") == 200


async def test_client_lock_held_too_long_is_a_503_within_the_lock_timeout(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, database_url: str, log_lines: Any
) -> None:
    """While another session holds the client's lock, a delivery for that client gets
    503 + Retry-After once the sessions' lock timeout passes (here 0.5 s), not an
    answer after Debitura's 10 s; once the lock is free, the retry is processed."""
    impatient = settings.model_copy(update={"lock_timeout_seconds": 0.5})
    client = await aiohttp_client(app.create_app(impatient))
    body = helpers.encode(helpers.onboarding("cli_locked"))
    async with client_lock(database_url, "cli_locked") as release:
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        # Postgres gave up on the lock (not the driver's 6 s backstop).
        faults = [line["error"] for line in log_lines() if line["event"] == "database_lock_busy"]
        assert faults == ["LockNotAvailableError"]
        await release()
    retry = await client.post(
        app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
    )
    assert (await retry.json())["status"] == "processed"


async def test_delivery_past_its_deadline_is_a_503_and_its_retry_changes_nothing(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, database_url: str
) -> None:
    """A delivery still not committed at its deadline (here 0.5 s; its group waits on a
    lock) is answered 503 rather than after the sender left. The group it was in
    commits once the lock is free, so Debitura's retry is a duplicate: stored once."""
    patient_db = settings.model_copy(
        update={"lock_timeout_seconds": 30.0, "request_deadline_seconds": 0.5}
    )
    client = await aiohttp_client(app.create_app(patient_db))
    body = helpers.encode(helpers.onboarding("cli_slow"))
    async with client_lock(database_url, "cli_slow") as release:
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        assert response.status == 503
        await release()
    retry = await client.post(
        app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
    )
    assert (await retry.json())["status"] == "duplicate"
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 1
        assert await conn.fetchval("SELECT count(*) FROM receiver.tokens") == 1
    finally:
        await conn.close()


async def test_readyz_fails_while_writes_fail_though_postgres_answers(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, database_url: str, server_dsn: str
) -> None:
    """A database that answers pings but refuses writes (here: read-only, as a standby
    or a full disk would) makes deliveries 503 and /readyz fail too, so the load
    balancer stops sending here; once a write succeeds again, /readyz is back."""
    probe = await asyncpg.connect(database_url)
    name = await probe.fetchval("SELECT current_database()")
    await probe.close()
    assert name.startswith("receiver_t_")  # this test's own clone, never a shared one
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        client = await aiohttp_client(app.create_app(settings))
        assert (await client.get("/readyz")).status == 200
        body = helpers.encode(helpers.onboarding())
        headers = helpers.signed_headers(webhook_secret, body)
        assert (await client.post(app.WEBHOOK_PATH, data=body, headers=headers)).status == 503
        readyz = await client.get("/readyz")
        assert readyz.status == 503
        assert "writes are failing" in (await readyz.json())["error"]["message"]
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        # The pool's sessions keep the setting they started with: new ones are needed.
        await client.app[state.DATABASE].pool.expire_connections()
        retry = await client.post(app.WEBHOOK_PATH, data=body, headers=headers)
        assert (await retry.json())["status"] == "processed"
        assert (await client.get("/readyz")).status == 200
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await admin.close()

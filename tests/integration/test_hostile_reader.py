"""A partner application's cache reader turned hostile (README "Security"): a login
role granted receiver_cache_reader, on a real Postgres, doing all that role can do
(take any advisory lock, NOTIFY on the channel, insert link reports) and nothing
changes for any other client, replica or schedule."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from receiver import config, db, vault
from receiver.config import Settings
from receiver.debitura import api, management, reconcile, rotation, schedule
from receiver.lifecycle import adoption, audit, retention
from receiver.partner import cache
from receiver.sandbox import Sandbox
from receiver.service import app
from tests import helpers
from tests.integration.conftest import Post, cache_settings, client_lock, settings_values
from tests.integration.standins import eventually
from tests.integration.test_partner import as_role

# Every advisory lock name the service ever used: the schedules', the migration's.
SERVICE_LOCK_NAMES = (
    "receiver.token_rotation",
    "receiver.reconcile",
    "receiver.reconcile_reports",
    "receiver.prune",
    "receiver.migrate",
)
HOLD = "SELECT pg_advisory_lock(hashtextextended($1, 0))"


@pytest.fixture
async def reader_url(conn: asyncpg.Connection, database_url: str) -> AsyncIterator[str]:
    """A login role granted only receiver_cache_reader, as a partner would make one."""
    role, password = f"cache_{uuid.uuid4().hex[:10]}", secrets.token_hex(12)
    await conn.execute(
        f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE receiver_cache_reader"
    )
    yield as_role(database_url, role, password)
    await conn.execute(f"DROP OWNED BY {role}")
    await conn.execute(f"DROP ROLE {role}")


@pytest.fixture
async def reader(reader_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A session of the cache-reader role."""
    connection = await asyncpg.connect(reader_url)
    yield connection
    await connection.close()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A stand-in Debitura (live) on loopback; its API key is a canary."""
    sb = Sandbox(environment="live")
    await sb.start()
    helpers.CANARIES.add(sb.api_key)
    yield sb
    await sb.stop()


async def test_advisory_locks_the_reader_holds_change_no_delivery_and_no_readiness(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, reader: asyncpg.Connection
) -> None:
    """The reader holding a client's advisory lock (and its deliveries' event keys, the
    schedules' and the migration's names): every delivery for that client is still
    answered 200 within the lock timeout (here 0.5 s), and /readyz stays 200."""
    impatient = settings.model_copy(update={"lock_timeout_seconds": 0.5})
    client = await aiohttp_client(app.create_app(impatient))
    keys = [f"evt_{i}_{uuid.uuid4().hex[:8]}" for i in range(5)]
    await reader.execute(HOLD, "receiver.client:cli_x")
    for key in keys:
        await reader.execute(HOLD, f"receiver.event:{key}")
    for name in SERVICE_LOCK_NAMES:
        await reader.execute(HOLD, name)
    statuses = []
    for i, key in enumerate(keys):
        document = helpers.onboarding(
            "cli_x", event_id=key, completed_at=f"2025-01-0{i + 1}T00:00:00Z"
        )
        body = helpers.encode(document)
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        statuses.append((response.status, (await response.json()).get("status")))
    assert statuses == [(200, "processed")] * 5
    assert (await client.get("/readyz")).status == 200


async def test_a_lock_timeout_on_one_clients_rows_leaves_readiness_alone(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, database_url: str
) -> None:
    """A delivery whose client's rows another transaction holds past the lock timeout
    is a 503 (the sender retries), but the replica stays ready: Postgres is fine, and
    a load balancer must not drop the replica for every other client."""
    impatient = settings.model_copy(update={"lock_timeout_seconds": 0.5})
    client = await aiohttp_client(app.create_app(impatient))
    body = helpers.encode(helpers.onboarding("cli_held"))
    async with client_lock(database_url, "cli_held"):
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        assert response.status == 503
        assert (await client.get("/readyz")).status == 200
    other = helpers.encode(helpers.onboarding("cli_free"))
    response = await client.post(
        app.WEBHOOK_PATH, data=other, headers=helpers.signed_headers(webhook_secret, other)
    )
    assert response.status == 200
    assert (await client.get("/readyz")).status == 200


async def test_schedule_names_the_reader_holds_stop_no_scheduled_run(
    settings: Settings,
    sandbox: Sandbox,
    database: db.Database,
    conn: asyncpg.Connection,
    reader: asyncpg.Connection,
) -> None:
    """The reader holding every schedule's advisory lock name: a scheduled rotation
    still rotates the due token, a reported client is still reconciled, a due
    reconcile still runs, and a prune still prunes."""
    for name in SERVICE_LOCK_NAMES:
        await reader.execute(HOLD, name)
    configured = config.load_settings(
        **settings_values(settings),
        debitura_api_url=sandbox.url,
        debitura_api_key=sandbox.api_key,
        debitura_retry_base_seconds=0.01,
    )
    sealer = vault.Sealer.from_settings(configured)
    token = sandbox.link_client("cli_due")
    helpers.CANARIES.add(token)
    await adoption.import_token(database, configured, sealer, "cli_due", token, audit.Actor("t"))
    await conn.execute(
        "UPDATE receiver.tokens SET onboarding_completed_at = now() - interval '100 days'"
    )
    await reader.execute(
        "INSERT INTO receiver.link_reports (client_id, environment, token_prefix, detail)"
        " VALUES ('cli_due', 'live', NULL, 'no token')"
    )
    async with aiohttp.ClientSession() as session:
        debitura = api.Api(session, configured)
        rotator = rotation.Rotator(database, configured, sealer, debitura)
        await schedule.run_once(rotator, configured)
        reconciler = reconcile.Reconciler(
            management.Manager(database, configured, sealer, debitura)
        )
        await schedule.reconcile_reported(reconciler, ["live"])
        await schedule.reconcile_due(reconciler, ["live"], 0.0)
    assert sandbox.calls["rotate"] == 1
    open_reports = "SELECT count(*) FROM receiver.link_reports WHERE reconciled_at IS NULL"
    assert await conn.fetchval(open_reports) == 0
    assert await conn.fetchval("SELECT count(*) FROM receiver.reconcile_runs") == 1
    assert (await retention.prune(database, configured)).ran


async def test_a_forged_notify_costs_at_most_the_one_client_it_names(
    post: Post, settings: Settings, reader_url: str, reader: asyncpg.Connection
) -> None:
    """A running cache (as the reader role) given NOTIFYs the reader forged: an
    unreadable payload and a `*` drop nothing; one naming a client drops that client's
    entry alone, and its next read is its current token again."""
    tokens = {c: helpers.canary_token() for c in ("cli_a", "cli_b")}
    for client_id, token in tokens.items():
        await post(helpers.onboarding(client_id, token))
    dropped: list[str] = []
    running = cache.TokenCache.from_settings(
        cache_settings(settings, database_url=None, cache_database_url=reader_url),
        on_invalidated=lambda client_id, _reason: dropped.append(client_id),
    )
    await running.start()
    try:
        assert running.listening
        assert [await running.get(c) for c in tokens] == list(tokens.values())
        dropped.clear()
        channel = settings.notify_channel
        for payload in (
            "not json",
            "{",
            json.dumps({"client_id": "*"}),
            json.dumps({"client_id": ["cli_a"]}),
            json.dumps({"signal_id": 1}),
            json.dumps({"client_id": "cli_b"}),
            json.dumps({"client_id": "cli_end"}),
        ):
            await reader.execute("SELECT pg_notify($1, $2)", channel, payload)

        async def all_read() -> bool:
            return "cli_end" in dropped

        await eventually(all_read)
        assert dropped == ["cli_b", "cli_end"]
        assert await running.get("cli_a") == tokens["cli_a"]
        assert await running.get("cli_b") == tokens["cli_b"]
    finally:
        await running.close()


async def test_link_reports_from_the_reader_are_bounded_in_size_and_number(
    post: Post,
    settings: Settings,
    conn: asyncpg.Connection,
    reader_url: str,
    reader: asyncpg.Connection,
) -> None:
    """A 1 MB detail is stored cut to 200 characters; a flood of reports for one client
    leaves at most 3 waiting for reconcile; the partner library's calls raise no
    error either way, and another client's report still gets in."""
    await post(helpers.onboarding("cli_r"))
    running = cache.TokenCache.from_settings(
        cache_settings(settings, database_url=None, cache_database_url=reader_url)
    )
    await running.start()
    try:
        await running.report_link_invalid("cli_r", "live", "tok_live_abcdef", "x" * 1_000_000)
        for _ in range(100):
            await running.report_no_token("cli_r", "live")
        await running.report_no_token("cli_other", "live")
    finally:
        await running.close()
    await reader.execute(
        "INSERT INTO receiver.link_reports (client_id, environment, token_prefix, detail)"
        " VALUES ('cli_r', 'live', 'tok_live_abcdef', repeat('y', 1000000))"
    )
    longest = await conn.fetchval("SELECT max(length(detail)) FROM receiver.link_reports")
    assert longest <= 200
    waiting = await conn.fetch(
        "SELECT client_id, count(*) AS n FROM receiver.link_reports"
        " WHERE reconciled_at IS NULL GROUP BY client_id ORDER BY client_id"
    )
    counts = {r["client_id"]: r["n"] for r in waiting}
    assert counts["cli_other"] == 1
    assert counts["cli_r"] == 3

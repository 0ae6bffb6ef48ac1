"""Interrupted commands and the roles' reach, on a real Postgres with real processes:
a killed `keys rotate` or `events reprocess` leaves exactly its committed work
audited; the runtime role cannot forge history; the migration lock says who holds it;
the cache reader sees no value of a token it may no longer use."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from receiver.config import Settings
from receiver.db import migrations
from tests import helpers
from tests.integration.conftest import ROW_LOCK_WAITS, Post, operator_env
from tests.integration.standins import eventually
from tests.integration.test_partner import as_role
from tests.integration.test_rotation import with_new_primary


async def killed_transactions_gone(conn: asyncpg.Connection) -> None:
    """Wait (bounded) until no other session of this database is inside a transaction:
    a killed client's open transaction has been rolled back."""

    async def settled() -> bool:
        busy = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
        )
        return bool(busy == 0)

    await eventually(settled)


async def test_a_killed_keys_rotate_leaves_exactly_its_committed_batches_audited(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """`keys rotate` SIGKILLed mid-run: every re-encrypted value is covered by a batch's
    audit row (written in the batch's transaction), and no audited batch is missing."""
    for _ in range(60):
        await post(helpers.onboarding())
    env = operator_env(with_new_primary(settings))
    rotator = subprocess.Popen(
        [sys.executable, "-m", "receiver", "keys", "rotate", "--batch-size", "3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert rotator.stderr is not None
        # The plan comes first ("would re-seal …", what must hold the key), then one
        # progress line per committed batch.
        first = await asyncio.to_thread(rotator.stderr.readline)
        while first and "re-encrypted" not in first:
            first = await asyncio.to_thread(rotator.stderr.readline)
        assert "re-encrypted" in first, first  # one batch committed
        rotator.kill()
    finally:
        rotator.kill()
        rotator.wait()
        assert rotator.stderr is not None
        rotator.stderr.close()
    await killed_transactions_gone(conn)

    moved = await conn.fetchval(
        "SELECT (SELECT count(*) FROM receiver.tokens WHERE receiver.sealed_key_id(token_sealed)"
        " = 'k2') + (SELECT count(*) FROM receiver.events"
        " WHERE receiver.sealed_key_id(body_sealed) = 'k2')"
    )
    audited = await conn.fetchval(
        "SELECT COALESCE(sum((detail->>'rotated')::int), 0) FROM receiver.audit "
        "WHERE action = 'keys_rotate' AND detail ? 'kind'"
    )
    assert 0 < moved < 120  # killed mid-run, after at least one batch
    assert audited == moved


async def test_a_killed_events_reprocess_leaves_exactly_its_committed_deliveries_audited(
    post: Post, conn: asyncpg.Connection, settings: Settings, database_url: str
) -> None:
    """`events reprocess` killed while the tenth delivery waits for its lock: the nine
    before it are reprocessed and audited, the tenth neither."""
    keys = [f"evt_{i:02d}_{uuid.uuid4().hex[:6]}" for i in range(20)]
    for key in keys:  # quarantined: invalid_data (no token), reprocessed as such
        body = {"id": key, "event": "client.onboarding_completed", "data": {"client_id": "c"}}
        assert (await (await post(body)).json())["status"] == "quarantined"
    holder = await asyncpg.connect(database_url)
    # The tenth's quarantined row, locked as a long transaction would (its
    # reprocessing deletes that row first).
    await holder.execute("BEGIN")
    await holder.execute("SELECT 1 FROM receiver.events WHERE key = $1 FOR UPDATE", keys[9])
    reprocessor = subprocess.Popen(
        [sys.executable, "-m", "receiver", "events", "reprocess", *keys],
        env=operator_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def waiting() -> bool:
            return bool(await conn.fetchval(ROW_LOCK_WAITS))

        await eventually(waiting, seconds=60)
        reprocessor.kill()
    finally:
        reprocessor.kill()
        reprocessor.wait()
        await holder.close()
    await killed_transactions_gone(conn)

    reprocessed = await conn.fetch(
        "SELECT key FROM receiver.events WHERE reprocessed_at IS NOT NULL ORDER BY key"
    )
    audited = await conn.fetch(
        "SELECT event_key FROM receiver.audit WHERE action = 'events_reprocess' ORDER BY 1"
    )
    assert [r["key"] for r in reprocessed] == keys[:9]
    assert [r["event_key"] for r in audited] == keys[:9]


@pytest.fixture
async def runtime_role(conn: asyncpg.Connection, database_url: str) -> AsyncIterator[str]:
    """A login role in receiver_runtime, as the service runs; yields its database URL."""
    role, password = f"app_{uuid.uuid4().hex[:10]}", secrets.token_hex(12)
    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE receiver_runtime")
    try:
        yield as_role(database_url, role, password)
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


async def test_the_runtime_role_cannot_forge_audit_history_or_the_migrations(
    runtime_role: str, conn: asyncpg.Connection
) -> None:
    """The runtime appends audit rows with the id and time the database gives them: an
    id or time of its choosing (OVERRIDING SYSTEM VALUE included) is refused, and it
    cannot add, change or remove a row of schema_migrations."""
    runtime = await asyncpg.connect(runtime_role)
    try:
        await runtime.execute(
            "INSERT INTO receiver.audit (actor, action) VALUES ('app', 'keys_rotate')"
        )
        for statement in (
            "INSERT INTO receiver.audit (id, at, actor, action) OVERRIDING SYSTEM VALUE "
            "VALUES (1, '2020-01-01', 'alice', 'token_reveal')",
            "INSERT INTO receiver.audit (at, actor, action) "
            "VALUES ('2020-01-01', 'alice', 'token_reveal')",
            "DELETE FROM receiver.schema_migrations",
            "UPDATE receiver.schema_migrations SET checksum = 'x'",
            "INSERT INTO receiver.schema_migrations (name, checksum) VALUES ('9999_x', 'x')",
            "TRUNCATE receiver.schema_migrations",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await runtime.execute(statement)
        assert await runtime.fetchval("SELECT count(*) FROM receiver.schema_migrations") > 0
    finally:
        await runtime.close()
    rows = await conn.fetch(
        "SELECT actor, at > now() - interval '1 hour' AS now FROM receiver.audit"
    )
    assert [tuple(r) for r in rows] == [("app", True)]


async def test_a_migration_says_who_holds_the_migration_lock_while_it_waits(
    empty_database_url: str, log_lines: Any
) -> None:
    """A migration pending while another session holds the migrations table's lock
    (another migrator's transaction) waits, logs who holds it, and applies once it is
    let go: replicas migrating at once take turns."""
    last = migrations.available()[-1].name
    before = [m.name for m in migrations.available()][-3]
    await migrations.apply(empty_database_url, until=before)
    holder = await asyncpg.connect(empty_database_url)
    try:
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE receiver.schema_migrations IN SHARE ROW EXCLUSIVE MODE")
        applying = asyncio.create_task(migrations.apply(empty_database_url))

        async def waiting() -> bool:
            return any(
                line["event"] == "migration_lock_waiting"
                and line.get("holder_pid") == holder.get_server_pid()
                for line in log_lines()
            )

        await eventually(waiting, seconds=30)
        assert not applying.done()
        await holder.execute("COMMIT")
        applied = await asyncio.wait_for(applying, timeout=30)
    finally:
        await holder.close()
    assert applied[-1] == last


async def test_the_cache_view_shows_values_only_of_tokens_still_usable(
    post: Post, conn: asyncpg.Connection
) -> None:
    """receiver.cache_tokens carries ciphertext for the active token and a superseded
    one inside its grace; a revoked or expired token keeps its row and status, no value."""
    await post(helpers.onboarding("cli_v", completed_at="2024-01-01T00:00:00Z"))
    await post(helpers.onboarding("cli_v", completed_at="2024-02-01T00:00:00Z"))
    await post(helpers.onboarding("cli_v", completed_at="2024-03-01T00:00:00Z"))
    await post(helpers.onboarding("cli_gone"))
    await post(helpers.revocation("cli_gone", None))
    await conn.execute(
        "UPDATE receiver.tokens SET expires_at = now() + interval '1 hour' "
        "WHERE client_id = 'cli_v' AND onboarding_completed_at = '2024-02-01T00:00:00Z'"
    )
    await conn.execute(
        "UPDATE receiver.tokens SET expires_at = now() - interval '1 hour' "
        "WHERE client_id = 'cli_v' AND onboarding_completed_at = '2024-01-01T00:00:00Z'"
    )
    rows = await conn.fetch(
        "SELECT client_id, status, token_sealed IS NOT NULL AS has_value "
        "FROM receiver.cache_tokens ORDER BY client_id, onboarding_completed_at"
    )
    assert [tuple(r) for r in rows] == [
        ("cli_gone", "revoked", False),
        ("cli_v", "expired", False),
        ("cli_v", "superseded", True),
        ("cli_v", "active", True),
    ]

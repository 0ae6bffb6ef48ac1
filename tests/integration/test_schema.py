"""The schema: its snapshot, the migrations' data changes, the row type the code
hands to SQL, and groups that never deadlock."""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import time
import uuid
from typing import Any

import asyncpg
import pytest

from receiver import db, errors, vault
from receiver.db import migrations
from receiver.lifecycle import events, rows
from tests import helpers, schema
from tests.conftest import create_database, drop_database, unique_name, with_database


async def test_schema_file_matches_the_migrations(empty_database_url: str, server_dsn: str) -> None:
    """A database built from sql/schema.sql and one built from the migrations have the
    same schema (`make schema` rewrites the file after a migration is added)."""
    await migrations.apply(empty_database_url)
    from_migrations = schema.dump(empty_database_url)
    name = unique_name("receiver_snap")
    await create_database(server_dsn, name)
    try:
        url = with_database(server_dsn, name)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(schema.SCHEMA_FILE.read_text())
        finally:
            await conn.close()
        from_file = schema.dump(url)
    finally:
        await drop_database(server_dsn, name)
    diff = "\n".join(
        difflib.unified_diff(
            from_file.splitlines(), from_migrations.splitlines(), "schema.sql", "migrations"
        )
    )
    assert from_file == from_migrations, f"run `make schema`:\n{diff}"


async def test_row_fields_match_the_sql_composite_in_order(conn: asyncpg.Connection) -> None:
    """rows.Row and receiver.event_row_v2 name the same fields in the same order, so a
    field swapped on one side cannot go unnoticed."""
    names = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'receiver.event_row_v2'::regclass "
        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
    )
    assert tuple(r["attname"] for r in names) == rows.Row._fields


_CALL = r"\breceiver\.{}\s*\("
_LIVE_ROOTS = """
SELECT p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
UNION
SELECT p.proname FROM pg_depend d JOIN pg_proc p ON p.oid = d.refobjid
 WHERE d.refclassid = 'pg_proc'::regclass
   AND d.classid IN ('pg_class'::regclass, 'pg_rewrite'::regclass)
"""


async def dead_functions(conn: asyncpg.Connection) -> set[str]:
    """The functions of the receiver schema that nothing live calls: not a named
    query (queries.sql), a trigger, an index or view, nor a function that is itself
    live. Bodies are read without their comments."""
    rows = await conn.fetch(
        "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'receiver'::regnamespace"
    )
    bodies = {r["proname"]: re.sub(r"--[^\n]*", "", r["prosrc"]) for r in rows}
    queries = re.sub(r"--[^\n]*", "", "\n".join(db.QUERIES.values()))
    live = {r["proname"] for r in await conn.fetch(_LIVE_ROOTS)} & set(bodies)
    live |= {name for name in bodies if re.search(_CALL.format(name), queries)}
    while True:
        called = {
            name
            for name in bodies
            if name not in live
            and any(re.search(_CALL.format(name), bodies[caller]) for caller in live)
        }
        if not called:
            return set(bodies) - live
        live |= called


async def test_every_function_in_the_schema_is_live(conn: asyncpg.Connection) -> None:
    """No function in the schema is referenced by nothing: one the code stopped calling
    is dropped by a post-migration (sql/README.md, "Functions have an end date")."""
    assert await dead_functions(conn) == set()


async def test_the_liveness_check_finds_dead_functions(
    empty_database_url: str,
) -> None:
    """At 0007 the check finds dead the eight functions 0008 drops, and not those an
    index, a view, a trigger or a named query uses (the check above can fail)."""
    await migrations.apply(empty_database_url, until="0007_set_based_group")
    conn = await asyncpg.connect(empty_database_url)
    try:
        dead = await dead_functions(conn)
    finally:
        await conn.close()
    dropped = {
        "record_event",
        "record_onboarding",
        "record_revocation",
        "insert_event",
        "lock_client",
        "enqueue_signal",
        "record_events_v2",
        "record_events_v3",
    }
    assert dropped <= dead
    assert not {"sealed_key_id", "body_key", "audit_is_append_only", "enqueue_signal_v2"} & dead


# --- migrations ------------------------------------------------------------------------

_V1 = (
    "SELECT receiver.record_event($1, $2, 'client.onboarding_completed', $3, now(), "
    "'\\x01026b31'::bytea, '{}'::jsonb, $4, $5::uuid, $6, $7, $8, '\\x01026b31'::bytea, $9, NULL, "
    "interval '24 hours', $10, NULL, 'token_invalidation', false)"
)


async def _v1_onboarding(
    conn: asyncpg.Connection, client_id: str, environment: str, completed: str, *, is_test: bool
) -> None:
    token = helpers.canary_token(environment)
    from datetime import datetime

    await conn.fetchval(
        _V1,
        "onboarding",
        f"evt_{uuid.uuid4().hex}",
        is_test,
        client_id,
        str(uuid.uuid4()),
        environment,
        token[:15],
        os.urandom(32),
        datetime.fromisoformat(completed),
        None,
    )


async def _v1_revocation(conn: asyncpg.Connection, client_id: str, *, is_test: bool) -> None:
    from datetime import UTC, datetime

    await conn.fetchval(
        _V1.replace("'client.onboarding_completed'", "'token.revoked'"),
        "revocation",
        f"evt_{uuid.uuid4().hex}",
        is_test,
        client_id,
        None,
        None,
        None,
        None,
        None,
        datetime.now(UTC),
    )


# What a database at the baseline still has to apply.
AFTER_BASELINE = [m.name for m in migrations.available() if m.name > migrations.BASELINE]


async def test_migration_keeps_existing_data_correct(empty_database_url: str) -> None:
    """Data written by the first release stays right after 0002: tokens keep the
    environment of their prefix, a live token a test onboarding had superseded is the
    active live token again, and old revocations get an environment."""
    await migrations.apply(empty_database_url, until=migrations.BASELINE)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await _v1_onboarding(conn, "cli_m", "live", "2024-01-01T00:00:00+00:00", is_test=False)
        await _v1_onboarding(conn, "cli_m", "test", "2024-02-01T00:00:00+00:00", is_test=True)
        await _v1_onboarding(conn, "cli_m2", "live", "2024-01-01T00:00:00+00:00", is_test=False)
        await _v1_onboarding(conn, "cli_m2", "live", "2024-03-01T00:00:00+00:00", is_test=False)
        await _v1_revocation(conn, "cli_r", is_test=True)
        before = await conn.fetch("SELECT client_id, environment, status FROM receiver.tokens")
        assert sorted(tuple(r) for r in before) == [
            ("cli_m", "live", "superseded"),  # the bug 0002 repairs
            ("cli_m", "test", "active"),
            ("cli_m2", "live", "active"),
            ("cli_m2", "live", "superseded"),
        ]
        assert await migrations.apply(empty_database_url) == AFTER_BASELINE
        after = await conn.fetch(
            "SELECT client_id, environment, status, superseded_at, expires_at FROM receiver.tokens"
        )
        assert sorted((r["client_id"], r["environment"], r["status"]) for r in after) == [
            ("cli_m", "live", "active"),
            ("cli_m", "test", "active"),
            ("cli_m2", "live", "active"),  # a live token superseded by a live one stays so
            ("cli_m2", "live", "superseded"),
        ]
        restored = next(
            r for r in after if r["client_id"] == "cli_m" and r["environment"] == "live"
        )
        assert restored["superseded_at"] is None
        assert restored["expires_at"] is None
        environment = await conn.fetchval("SELECT environment FROM receiver.revocations")
        assert environment == "test"
    finally:
        await conn.close()


async def test_database_built_by_the_squashed_files_is_adopted(empty_database_url: str) -> None:
    """A database the four pre-release files built (recorded under their names and
    checksums) is recorded as at the baseline, and migrates on from there; one whose
    records differ is refused with a clear message."""
    await migrations.apply(empty_database_url, until=migrations.BASELINE)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("DELETE FROM receiver.schema_migrations")
        await conn.executemany(
            "INSERT INTO receiver.schema_migrations (name, checksum) VALUES ($1, $2)",
            list(migrations.SQUASHED.items()),
        )
        assert await migrations.apply(empty_database_url) == AFTER_BASELINE
        names = await conn.fetch("SELECT name FROM receiver.schema_migrations ORDER BY name")
        assert [r["name"] for r in names] == [m.name for m in migrations.available()]
        await conn.execute(
            "INSERT INTO receiver.schema_migrations (name, checksum) VALUES ('0001_initial', 'x')"
        )
        with pytest.raises(errors.MigrationError, match="recreate it"):
            await migrations.apply(empty_database_url)
    finally:
        await conn.close()


# --- locking ------------------------------------------------------------------------


def _row(sealer: vault.Sealer, document: dict[str, Any]) -> tuple[Any, ...]:
    body = helpers.encode(document)
    delivery = rows.Arrival(body=body, is_test=False, test_header=False, signature=None)
    return rows.prepare(sealer, events.read(body, is_test=False), delivery).as_record()


async def _wait_until_blocked(watcher: asyncpg.Connection, pids: list[int]) -> None:
    deadline = time.monotonic() + 20
    waiting = 0
    while time.monotonic() < deadline:
        waiting = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE pid = ANY($1::int[]) AND wait_event_type = 'Lock'",
            pids,
        )
        if waiting == len(pids):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{waiting} of {len(pids)} sessions blocked after 20 s")


async def test_groups_sharing_keys_and_clients_never_deadlock(
    database_url: str, sealer: vault.Sealer
) -> None:
    """Two groups, sorted by client as the committer sorts them, that share a client
    and an event key: the one holding the client lock next needs the key the other
    holds while it waits for that lock. Both commit: every group takes all its locks
    first, in one order. (Taking the client lock after the event insert, as the first
    release did, this is a deadlock: Postgres aborts one group.)"""
    key_1, key_2 = f"evt_1_{uuid.uuid4().hex}", f"evt_2_{uuid.uuid4().hex}"
    first = [_row(sealer, helpers.onboarding("cli_a", event_id=key_1))]
    second = [
        _row(sealer, helpers.onboarding("cli_a", event_id=key_2)),
        _row(sealer, helpers.onboarding("cli_b", event_id=key_1)),
    ]
    lock = "SELECT pg_advisory_{}(hashtextextended('receiver.client:' || 'cli_a', 0))"
    holder = await asyncpg.connect(database_url)
    groups = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        await holder.execute(lock.format("lock"))
        calls = []
        # The second group queues for the client lock first, so it gets it first.
        for conn, group in ((groups[1], second), (groups[0], first)):
            await conn.execute("SET deadlock_timeout = '100ms'")
            calls.append(
                asyncio.create_task(conn.fetch(db.QUERIES["record_events"], group, "c", False))
            )
            await _wait_until_blocked(holder, [conn.get_server_pid()])
        await holder.execute(lock.format("unlock"))
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=20)
    finally:
        for conn in (holder, *groups):
            await conn.close()
    outcomes = [[r["outcome"] for r in result] for result in results]
    # Whichever stored key_1 first applied it; the other met it taken by other content.
    assert outcomes in (
        [["processed", "processed"], ["id_conflict"]],
        [["processed", "id_conflict"], ["processed"]],
    )

"""The schema: its snapshot, the migrations' data changes, the row type the code
hands to SQL, and groups that never deadlock."""

from __future__ import annotations

import asyncio
import difflib
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
    """rows.Row and receiver.event_row_v3 name the same fields in the same order, so a
    field swapped on one side cannot go unnoticed."""
    names = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'receiver.event_row_v3'::regclass "
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


async def test_the_liveness_check_finds_dead_functions(conn: asyncpg.Connection) -> None:
    """A function nothing references is found dead, and so is one only it calls or a
    live one names in a comment; those an index, a view, a trigger or another live
    function uses are not (the check above can fail)."""
    await conn.execute(
        """
        CREATE FUNCTION receiver.orphan_helper() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;
        CREATE FUNCTION receiver.orphan() RETURNS int LANGUAGE sql
            AS $$ SELECT receiver.orphan_helper() $$;
        CREATE FUNCTION receiver.named_in_a_comment() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;
        CREATE FUNCTION receiver.called_by_a_trigger() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN
                -- receiver.named_in_a_comment() is not a call
                RETURN NEW;
            END $$;
        CREATE TRIGGER probe BEFORE INSERT ON receiver.link_reports
            FOR EACH ROW EXECUTE FUNCTION receiver.called_by_a_trigger();
        """
    )
    assert await dead_functions(conn) == {"orphan", "orphan_helper", "named_in_a_comment"}


# --- migrations ------------------------------------------------------------------------

# What a database at the baseline still has to apply.
AFTER_BASELINE = [m.name for m in migrations.available() if m.name > migrations.BASELINE]


async def _record(conn: asyncpg.Connection, records: dict[str, str]) -> None:
    """Make the database's migration records say `records`, and nothing else."""
    await conn.execute("DELETE FROM receiver.schema_migrations")
    await conn.executemany(
        "INSERT INTO receiver.schema_migrations (name, checksum) VALUES ($1, $2)",
        list(records.items()),
    )


async def test_database_built_by_the_squashed_files_is_adopted(empty_database_url: str) -> None:
    """A database the ten squashed files built (recorded under their names and
    checksums, the first under the baseline's own name) is recorded as at the
    baseline with its data kept, and migrates on from there."""
    await migrations.apply(empty_database_url, until=migrations.BASELINE)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            "INSERT INTO receiver.events (key, type, status, is_test, body_sealed) "
            "VALUES ('evt_kept', 'ping', 'ignored', false, '\\x01026b31')"
        )
        await _record(conn, migrations.SQUASHED)
        assert await migrations.apply(empty_database_url) == AFTER_BASELINE
        records = await conn.fetch("SELECT name, checksum FROM receiver.schema_migrations")
        assert sorted(tuple(r) for r in records) == [
            (m.name, m.checksum) for m in migrations.available()
        ]
        assert await conn.fetchval("SELECT key FROM receiver.events") == "evt_kept"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "records",
    [
        # Part of the squashed files: a database stopped midway, which they no
        # longer can finish.
        {n: c for n, c in migrations.SQUASHED.items() if n <= "0005_roles_and_cache_view"},
        # The squashed 0001_baseline alone: its name is the baseline's, its checksum not.
        {migrations.BASELINE: migrations.SQUASHED[migrations.BASELINE]},
        # All of them, one edited after it was applied.
        migrations.SQUASHED | {"0007_set_based_group": "x"},
        # The first squash's files, which the baseline before this one replaced.
        dict.fromkeys(migrations.RETIRED, "x"),
    ],
    ids=["partial", "old_baseline_only", "edited", "first_squash"],
)
async def test_database_built_by_other_pre_release_files_is_refused(
    empty_database_url: str, records: dict[str, str]
) -> None:
    """A database built by pre-release files other than the ten last shipped is refused
    with a message that says to recreate it, and its records are left as they were."""
    await migrations.apply(empty_database_url, until=migrations.BASELINE)
    conn = await asyncpg.connect(empty_database_url)
    try:
        await _record(conn, records)
        with pytest.raises(errors.MigrationError, match="recreate it"):
            await migrations.apply(empty_database_url)
        after = await conn.fetch("SELECT name, checksum FROM receiver.schema_migrations")
        assert dict(tuple(r) for r in after) == records
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
    and an event key (for another client), both waiting for that client's lock row.
    Both commit: every group takes all its client locks first, in one order, and a key
    two groups write is kept apart by the events table's key (the second waits on the
    first's insert, then is retried and finds it taken). (Taking the client lock after
    the event insert, as the first release did, this is a deadlock.)"""
    key_1, key_2 = f"evt_1_{uuid.uuid4().hex}", f"evt_2_{uuid.uuid4().hex}"
    first = [_row(sealer, helpers.onboarding("cli_a", event_id=key_1))]
    second = [
        _row(sealer, helpers.onboarding("cli_a", event_id=key_2)),
        _row(sealer, helpers.onboarding("cli_b", event_id=key_1)),
    ]
    holder = await asyncpg.connect(database_url)
    groups = [await asyncpg.connect(database_url) for _ in range(2)]
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT receiver.lock_clients_v1(ARRAY['cli_a'])")
        calls = []
        # The second group queues for the client lock first, so it gets it first.
        for conn, group in ((groups[1], second), (groups[0], first)):
            await conn.execute("SET deadlock_timeout = '100ms'")
            calls.append(
                asyncio.create_task(conn.fetch(db.QUERIES["record_events"], group, "c", False))
            )
            await _wait_until_blocked(holder, [conn.get_server_pid()])
        await holder.execute("COMMIT")
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


async def test_the_lifecycle_functions_keep_their_generic_plans(conn: asyncpg.Connection) -> None:
    """The functions every delivery goes through use the generic plans their statements
    are written for (sql/0016): a new version of one, or a migration that recreates it,
    must carry the setting on, or each group is planned anew (bench/README.md)."""
    settings = {
        row["proname"]: row["proconfig"]
        for row in await conn.fetch(
            "SELECT proname, proconfig FROM pg_proc WHERE pronamespace = 'receiver'::regnamespace"
            " AND proname IN ('record_events_v7', 'apply_group_v2', 'reapply_v2')"
        )
    }
    assert set(settings) == {"record_events_v7", "apply_group_v2", "reapply_v2"}
    for name, config in settings.items():
        assert "plan_cache_mode=force_generic_plan" in (config or []), name

"""The sealed tallies' deltas are folded by the /metrics refresh within its bound,
however many piled up while nobody scraped."""

from __future__ import annotations

import asyncpg

from receiver import db
from receiver.admin import rekey
from receiver.config import Settings
from receiver.db import migrations
from receiver.lifecycle import retention
from receiver.service import scrape


async def test_each_refresh_folds_part_of_a_backlog_too_large_to_fold_at_once(
    database: db.Database, conn: asyncpg.Connection
) -> None:
    """Every intake statement adds a delta row to receiver.sealed_tallies; only the
    /metrics refresh folds them, inside its 1 s bound. After a while without scrapes
    (3M deltas: under two hours of a 500/s intake, a Prometheus outage) a fold of the
    whole table does not fit in that bound: cancelled, it rolls back, and each later
    refresh tries the same whole fold again, so the backlog only grows. Each refresh
    must fold part of it, and the counts must not change."""
    await conn.execute(
        "INSERT INTO receiver.sealed_tallies (kind, key_id, n) "
        "SELECT 'events', 'k1', 1 FROM generate_series(1, 3000000)"
    )
    gauges = scrape.DatabaseGauges("k2", refresh_seconds=0)
    for _ in range(3):
        await gauges.families(database)
    left = await conn.fetchval("SELECT count(*) FROM receiver.sealed_tallies")
    assert left < 3_000_000 - 100_000, f"{left} delta rows left after 3 refreshes"
    assert await rekey.sealed_key_counts(database) == {("events", "k1"): 3_000_000}


async def test_migration_0024_mends_a_redacted_body_with_no_value_and_no_drop_time(
    empty_database_url: str,
) -> None:
    """A row from before the baseline's NOT VALID check with a redacted body but
    neither a sealed body nor a drop time: 0024 clears its redacted body and gives it
    its drop time. Clearing the redacted body first wrote a new version of a row the
    (not valid, yet enforced on writes) "value or drop time" check refuses, and the
    migration failed: `serve` could not start on such a database."""
    await migrations.apply(empty_database_url, until="0023_sealed_key_id_only_where_sealed")
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            """
            ALTER TABLE receiver.events DROP CONSTRAINT events_body_or_dropped;
            INSERT INTO receiver.events
                (key, type, status, is_test, body_sealed, body_redacted, body_dropped_at)
            VALUES ('evt_a', 'ping', 'ignored', false, NULL, '{"id": "evt_a"}', NULL);
            ALTER TABLE receiver.events ADD CONSTRAINT events_body_or_dropped
                CHECK (body_sealed IS NOT NULL OR body_dropped_at IS NOT NULL) NOT VALID;
            """
        )
        await migrations.apply(empty_database_url)
        row = await conn.fetchrow(
            "SELECT body_redacted, body_dropped_at = received_at AS dropped "
            "FROM receiver.events WHERE key = 'evt_a'"
        )
        assert row is not None
        assert (row["body_redacted"], row["dropped"]) == (None, True)
    finally:
        await conn.close()


async def test_a_database_migrated_by_the_first_0024_text_stays_current(
    database_url: str, database: db.Database, conn: asyncpg.Connection
) -> None:
    """Where 0024's first text applied, it did what the reordered text does: a database
    that recorded its checksum is at 0024, not "edited"."""
    earlier = next(iter(migrations.EQUIVALENT["0024_reseal_in_place"]))
    await conn.execute(
        "UPDATE receiver.schema_migrations SET checksum = $1 WHERE name = '0024_reseal_in_place'",
        earlier,
    )
    assert await migrations.apply(database_url) == []


async def test_migration_0024_on_an_active_token_with_no_value_and_no_drop_time(
    empty_database_url: str,
) -> None:
    """The baseline's NOT VALID checks let through a token that is active yet holds no
    value (tokens_active_has_value) and has no drop time (tokens_value_or_dropped):
    0024 migrates such a database (it failed, and `serve` with it), leaves that row as
    it is, and leaves the check it breaks unvalidated."""
    await migrations.apply(empty_database_url, until="0023_sealed_key_id_only_where_sealed")
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            """
            INSERT INTO receiver.events (key, type, status, is_test, body_sealed)
            VALUES ('evt_a', 'ping', 'processed', false, '\\x01026b31aa');
            ALTER TABLE receiver.tokens DROP CONSTRAINT tokens_value_or_dropped,
                DROP CONSTRAINT tokens_active_has_value;
            INSERT INTO receiver.tokens (id, client_id, environment, prefix, token_index,
                token_sealed, status, onboarding_completed_at, created_by_event)
            VALUES (gen_random_uuid(), 'cli_a', 'live', 'tok_live_a', '\\x03', NULL,
                'active', now(), 'evt_a');
            ALTER TABLE receiver.tokens ADD CONSTRAINT tokens_active_has_value
                CHECK (status <> 'active' OR token_sealed IS NOT NULL) NOT VALID;
            ALTER TABLE receiver.tokens ADD CONSTRAINT tokens_value_or_dropped
                CHECK (token_sealed IS NOT NULL OR value_dropped_at IS NOT NULL) NOT VALID;
            """
        )
        assert "0024_reseal_in_place" in await migrations.apply(empty_database_url)
        assert await conn.fetchval(
            "SELECT value_dropped_at IS NULL FROM receiver.tokens WHERE client_id = 'cli_a'"
        )
        assert not await conn.fetchval(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'tokens_value_or_dropped'"
        )
    finally:
        await conn.close()


async def test_each_refresh_folds_at_most_a_chunk_of_the_token_tallies(
    database: db.Database, conn: asyncpg.Connection
) -> None:
    """The token tallies' deltas are folded as the sealed ones are: a refresh takes at
    most 100,000 of them (a whole-table fold of a backlog outgrew the refresh's 1 s
    bound, which covers every query of the refresh together), the next ones take the
    rest, and the active-token gauges read the same sums throughout."""
    await conn.execute(
        "INSERT INTO receiver.token_tallies (environment, kind, day, n) "
        "SELECT 'live', 'active', (now() AT TIME ZONE 'UTC')::date - 200, 1 "
        "FROM generate_series(1, 250000)"
    )
    gauges = scrape.DatabaseGauges("k1", refresh_seconds=0)

    async def over_90_days() -> float:
        text = (await gauges.exposition(database)).decode()
        line = next(
            row
            for row in text.splitlines()
            if row.startswith("receiver_tokens_active{")
            and 'environment="live"' in row
            and 'age="over_90d"' in row
        )
        return float(line.rsplit(" ", 1)[1])

    assert await over_90_days() == 250_000
    left = await conn.fetchval("SELECT count(*) FROM receiver.token_tallies")
    assert 150_000 <= left < 250_000
    assert await over_90_days() == 250_000
    assert await over_90_days() == 250_000
    assert await conn.fetchval("SELECT count(*) FROM receiver.token_tallies") < 10


async def test_a_prune_folds_every_tally_delta_where_nobody_scrapes(
    database: db.Database, conn: asyncpg.Connection, settings: Settings
) -> None:
    """Without scrapes nothing else folds the tallies: a prune folds all of them, a
    chunk at a time, and every sum stays what it was."""
    await conn.execute(
        "INSERT INTO receiver.sealed_tallies (kind, key_id, n) "
        "SELECT 'events', 'k1', 1 FROM generate_series(1, 250000)"
    )
    await conn.execute(
        "INSERT INTO receiver.token_tallies (environment, kind, day, n) "
        "SELECT 'live', 'active', (now() AT TIME ZONE 'UTC')::date - 200, 1 "
        "FROM generate_series(1, 250000)"
    )
    sums = (
        "SELECT (SELECT sum(n) FROM receiver.sealed_tallies), "
        "(SELECT sum(n) FROM receiver.token_tallies)"
    )
    before = await conn.fetchrow(sums)
    assert before is not None
    await retention.prune(database, settings)
    assert await conn.fetchval("SELECT count(*) FROM receiver.sealed_tallies") < 10
    assert await conn.fetchval("SELECT count(*) FROM receiver.token_tallies") < 10
    assert await conn.fetchrow(sums) == before

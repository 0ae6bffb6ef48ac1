"""The sealed tallies' deltas are folded by the /metrics refresh within its bound,
however many piled up while nobody scraped."""

from __future__ import annotations

import asyncpg

from receiver import db
from receiver.admin import rekey
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

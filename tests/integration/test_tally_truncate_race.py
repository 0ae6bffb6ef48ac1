"""A hand-made TRUNCATE of tokens or events racing the /metrics refresh's fold."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

_SUMS = """
SELECT 'sealed' AS t, kind AS a, key_id AS b, sum(n)::bigint AS n FROM receiver.sealed_tallies
 GROUP BY 1, 2, 3 HAVING sum(n) <> 0
UNION ALL
SELECT 'token', environment, kind, sum(n)::bigint FROM receiver.token_tallies
 GROUP BY 1, 2, 3 HAVING sum(n) <> 0
"""


@pytest.mark.parametrize(
    ("table", "fold"),
    [
        ("tokens", "sealed_tallies_fold_v2"),
        ("events", "sealed_tallies_fold_v2"),
    ],
)
async def test_a_truncate_racing_a_fold_leaves_no_tally(
    database_url: str, conn: asyncpg.Connection, table: str, fold: str
) -> None:
    """The fold has deleted the deltas and inserted their sum, not yet committed; the
    truncate's trigger clears the tallies of the table meanwhile. It waits for the
    fold's row locks, skips the rows the fold deleted, and must not leave the fold's
    sum behind: the table is empty, every tally of it must say 0."""
    await conn.execute(
        "INSERT INTO receiver.sealed_tallies (kind, key_id, n) "
        "SELECT k, 'k1', 1 FROM unnest(ARRAY['tokens', 'events']) AS k, generate_series(1, 5)"
    )
    await conn.execute(
        "INSERT INTO receiver.token_tallies (environment, kind, day, n) "
        "SELECT 'live', 'active', current_date, 1 FROM generate_series(1, 5)"
    )
    folder = await asyncpg.connect(database_url)
    truncater = await asyncpg.connect(database_url)
    try:
        tx = folder.transaction()
        await tx.start()
        assert (
            await folder.fetchval(f"SELECT receiver.{fold}(100000)") == 10
            if (fold == "sealed_tallies_fold_v2")
            else 5
        )
        truncate = asyncio.create_task(truncater.execute(f"TRUNCATE receiver.{table} CASCADE"))
        # The truncate's trigger waits on the fold's row locks (the v1 DELETE), or ends.
        for _ in range(100):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'TRUNCATE%' AND datname = current_database()"
            )
            if waiting or truncate.done():
                break
            await asyncio.sleep(0.05)
        assert waiting or truncate.done()
        await tx.commit()
        await truncate
    finally:
        await folder.close()
        await truncater.close()
    sums = {(r["t"], r["a"], r["b"]): r["n"] for r in await conn.fetch(_SUMS)}
    # TRUNCATE events CASCADE truncates tokens too (tokens.created_by_event).
    assert sums == ({("sealed", "events", "k1"): 5} if table == "tokens" else {}), sums

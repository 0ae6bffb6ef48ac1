"""Group commit against a real Postgres: concurrent rows share one transaction, and
a row Postgres refuses fails alone."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import asyncpg
import structlog

from receiver import committer, db, errors, events, store, vault
from tests import helpers


def _row(sealer: vault.Sealer) -> store.Row:
    body = helpers.encode(helpers.onboarding())
    delivery = store.Delivery(body=body, is_test=False, test_header=False, signature=None)
    return store.prepare(sealer, events.read(body, is_test=False), delivery)


async def test_a_refused_row_fails_alone_and_the_rest_commit(
    database: db.Database, sealer: vault.Sealer, conn: asyncpg.Connection, log_lines: Any
) -> None:
    """Four rows recorded at once form one group; one of them holds a value Postgres
    refuses, so the group is retried row by row: three commit, one fails with
    UnstorableValue, and nothing of it is stored. The commit runs in a context of its
    own: its log lines never carry the id of the request that happened to start it."""
    group = committer.GroupCommit(database, channel="token_invalidation", http_delivery=False)
    rows = [_row(sealer) for _ in range(4)]
    rows[1] = dataclasses.replace(rows[1], body_redacted="{not json")
    structlog.contextvars.bind_contextvars(request_id="req-that-started-it")
    try:
        results = await asyncio.gather(*(group.record(r) for r in rows), return_exceptions=True)
    finally:
        structlog.contextvars.clear_contextvars()
    assert [getattr(results[i], "outcome", None) for i in (0, 2, 3)] == ["processed"] * 3
    assert isinstance(results[1], errors.UnstorableValue)
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 3
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE key = $1", rows[1].key) == 0
    )
    splits = [line for line in log_lines() if line["event"] == "group_commit_split"]
    assert [line["size"] for line in splits] == [4]
    assert "request_id" not in splits[0]

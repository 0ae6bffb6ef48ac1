"""Group commit against a real Postgres: concurrent rows share one transaction, and
a row Postgres refuses fails alone."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog

from receiver import db, errors, vault
from receiver.config import Settings
from receiver.lifecycle import committer, events, rows
from receiver.service import app
from tests import helpers
from tests.integration.conftest import ROW_LOCK_WAITS, client_lock
from tests.integration.standins import eventually


def _row(sealer: vault.Sealer, client_id: str | None = None) -> rows.Row:
    body = helpers.encode(helpers.onboarding(client_id))
    delivery = rows.Arrival(body=body, is_test=False, test_header=False, signature=None)
    return rows.prepare(sealer, events.read(body, is_test=False), delivery)


async def test_a_refused_row_fails_alone_and_the_rest_commit(
    database: db.Database, sealer: vault.Sealer, conn: asyncpg.Connection, log_lines: Any
) -> None:
    """Four rows recorded at once form one group; one of them holds a value Postgres
    refuses, so the group is retried row by row: three commit, one fails with
    UnstorableValue, and nothing of it is stored. The commit runs in a context of its
    own: its log lines never carry the id of the request that happened to start it."""
    group = committer.GroupCommit(
        database, sealer=sealer, channel="token_invalidation", http_delivery=False
    )
    batch = [_row(sealer) for _ in range(4)]
    batch[1] = batch[1]._replace(body_redacted="{not json")
    structlog.contextvars.bind_contextvars(request_id="req-that-started-it")
    try:
        results = await asyncio.gather(*(group.record(r) for r in batch), return_exceptions=True)
    finally:
        structlog.contextvars.clear_contextvars()
    assert [getattr(results[i], "outcome", None) for i in (0, 2, 3)] == ["processed"] * 3
    assert isinstance(results[1], errors.UnstorableValue)
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 3
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE key = $1", batch[1].key)
        == 0
    )
    splits = [line for line in log_lines() if line["event"] == "group_commit_split"]
    assert [line["size"] for line in splits] == [4]
    assert "request_id" not in splits[0]


async def test_a_group_stuck_on_a_lock_does_not_hold_up_the_next(
    aiohttp_client: Any,
    settings: Settings,
    webhook_secret: str,
    database_url: str,
    conn: asyncpg.Connection,
) -> None:
    """One group commits at a time while groups are quick; a group that waits (here on
    a client's lock another session holds) is slow, and the deliveries behind it are
    committed in a group beside it: answered while the lock is still held."""
    patient = settings.model_copy(update={"lock_timeout_seconds": 30.0})
    client = await aiohttp_client(app.create_app(patient))

    async def deliver(client_id: str) -> Any:
        body = helpers.encode(helpers.onboarding(client_id))
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        return response.status, (await response.json())["status"]

    async with client_lock(database_url, "cli_held") as release:
        stuck = asyncio.create_task(deliver("cli_held"))

        async def stuck_on_the_lock() -> bool:
            # Postgres itself says the group is blocked on the client's lock row;
            # a delivery merely inside the handler could still join the same group.
            waiting = await conn.fetchval(ROW_LOCK_WAITS)
            return bool(waiting == 1)

        await eventually(stuck_on_the_lock)
        assert await asyncio.wait_for(deliver("cli_free"), timeout=20) == (200, "processed")
        assert not stuck.done()
        await release()
    assert await stuck == (200, "processed")


async def test_a_row_still_queued_at_its_deadline_is_never_committed(
    database: db.Database,
    sealer: vault.Sealer,
    conn: asyncpg.Connection,
    database_url: str,
) -> None:
    """With the only group slot taken by a group waiting on a lock, a row behind it is
    still queued at its deadline: its caller gets DatabaseUnavailable (a 503: the sender
    retries), the row leaves the queue, and nothing of it is ever stored, even once the
    group ahead has committed."""
    group = committer.GroupCommit(
        database, sealer=sealer, channel="token_invalidation", http_delivery=False,
        max_in_flight=1,
    )  # fmt: skip
    held, behind = _row(sealer, "cli_held"), _row(sealer)
    loop = asyncio.get_running_loop()
    async with client_lock(database_url, "cli_held") as release:
        first = asyncio.create_task(group.record(held))

        async def blocked() -> bool:
            waits = await conn.fetchval(ROW_LOCK_WAITS)
            return bool(waits)

        await eventually(blocked)
        try:
            await group.record(behind, deadline=loop.time() + 0.2)
        except errors.DatabaseUnavailable:
            pass
        else:
            raise AssertionError("the queued row was not answered at its deadline")
        assert not group._queue
        await release()
        assert (await first).outcome == "processed"
    stored = await conn.fetch("SELECT key FROM receiver.events")
    assert [r["key"] for r in stored] == [held.key]

"""Invalidation signals reach the partner's token cache, at least once, whatever fails."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from receiver import db, vault
from receiver.config import Settings
from receiver.lifecycle import events, rows, store
from receiver.partner import cache
from receiver.service import app
from receiver.signals import outbox
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import cache_settings, operator_env, with_cache
from tests.integration.standins import StandInCache, eventually


async def signal_statuses(conn: asyncpg.Connection) -> list[str]:
    """Every signal's status."""
    return [r["status"] for r in await conn.fetch("SELECT status FROM receiver.signals")]


async def seed(
    database: db.Database, settings: Settings, count: int, *, http: bool = True
) -> list[str]:
    """Record `count` revocations (each queues one signal) the way the webhook does."""
    sealer = vault.Sealer.from_settings(settings)
    for _ in range(count):
        body = helpers.encode(helpers.revocation(f"cli_{os.urandom(4).hex()}", None))
        delivery = rows.Arrival(body=body, is_test=False, test_header=False, signature=None)
        row = rows.prepare(sealer, events.read(body, is_test=False), delivery)
        await store.record_rows(
            database, sealer, [row], channel=settings.notify_channel, http_delivery=http
        )
    listed = await database.fetch("list_signals", None, 100_000)
    return [r["id"] for r in listed]


@contextlib.asynccontextmanager
async def dispatching(
    database: db.Database, settings: Settings, **options: Any
) -> AsyncIterator[outbox.Dispatcher]:
    """A dispatcher running for the block, stopped (leases handed back) at its end."""
    async with aiohttp.ClientSession() as session:
        dispatcher = outbox.Dispatcher(database, settings, session, **options)
        task = asyncio.create_task(dispatcher.run())
        try:
            yield dispatcher
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_without_a_cache_url_signals_are_notify_only(
    post: Any, conn: asyncpg.Connection
) -> None:
    """With HTTP delivery off, the outbox keeps a 'notified' record, nothing pending."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_n", token))
    await post(helpers.revocation("cli_n", token[:15]))
    assert await signal_statuses(conn) == ["notified", "notified"]


async def test_revocation_reaches_the_cache_over_http(
    aiohttp_client: Any,
    settings: Settings,
    webhook_secret: str,
    standin_cache: StandInCache,
    conn: asyncpg.Connection,
) -> None:
    """An onboarding and a revocation each reach the cache: signed, keyed, without a token."""
    client = await aiohttp_client(app.create_app(with_cache(settings, standin_cache)))
    token = helpers.canary_token()
    for document in (helpers.onboarding("cli_h", token), helpers.revocation("cli_h", token[:15])):
        body = helpers.encode(document)
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        assert response.status == 200

    async def both_delivered() -> bool:
        return await signal_statuses(conn) == ["delivered", "delivered"]

    await eventually(both_delivered)
    # Delivered concurrently: arrival order is not guaranteed, nor needed ("drop and re-read").
    bodies = sorted((r["body"] for r in standin_cache.received), key=lambda b: b["reason"])
    assert [b["reason"] for b in bodies] == ["token_issued", "token_revoked"]
    assert {b["client_id"] for b in bodies} == {"cli_h"}
    assert {b["token_prefix"] for b in bodies} == {token[:15]}
    for record in standin_cache.received:
        assert record["headers"]["Idempotency-Key"] == record["body"]["signal_id"]
        assert token not in json.dumps(record)


async def test_revocation_reaches_listeners_over_notify(
    post: Any, database_url: str, settings: Settings
) -> None:
    """A LISTENing connection gets a small payload naming the client, in the same commit."""
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(settings.notify_channel, lambda *args: received.put_nowait(args[3]))
    try:
        await post(helpers.revocation("cli_notify", "tok_live_abc123"))
        payload = await asyncio.wait_for(received.get(), 10)
    finally:
        await listener.close()
    message = json.loads(payload)
    assert message["client_id"] == "cli_notify"
    assert message["token_prefix"] == "tok_live_abc123"
    assert message["reason"] == "token_revoked"
    assert len(payload) < 1000


async def test_cache_down_for_a_while_loses_nothing(
    database: db.Database, settings: Settings, standin_cache: StandInCache, conn: asyncpg.Connection
) -> None:
    """A long outage, scaled down: with the cache's port closed, every signal is tried
    more than the 12 times after which the first release gave up, and none is
    dead-lettered; once the cache is back, all arrive."""
    await standin_cache.stop()
    ids = await seed(database, settings, 20)
    scaled = with_cache(settings, standin_cache, signal_retry_cap_seconds=0.1)
    async with dispatching(database, scaled, poll_interval=0.05):

        async def retried() -> bool:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM receiver.signals WHERE status = 'pending' "
                "AND attempts > 12 AND last_error LIKE 'cache unreachable%'"
            )
            return bool(waiting == 20)

        await eventually(retried, seconds=60)
        await standin_cache.start()

        async def all_delivered() -> bool:
            return set(await signal_statuses(conn)) == {"delivered"}

        await eventually(all_delivered, seconds=30)
    assert set(standin_cache.ids()) == set(ids)


async def test_4xx_dead_letters_at_once_and_retry_recovers_it(
    database: db.Database,
    database_url: str,
    settings: Settings,
    standin_cache: StandInCache,
    conn: asyncpg.Connection,
) -> None:
    """A 400 from the cache dead-letters the signal on its first attempt, loudly;
    `receiver signals retry` puts it back (audited: who and why) and it is delivered."""
    ids = await seed(database, settings, 1)
    standin_cache.statuses.append(400)
    cache_settings = with_cache(settings, standin_cache)
    async with dispatching(database, cache_settings, poll_interval=0.05) as dispatcher:

        async def dead() -> bool:
            return await signal_statuses(conn) == ["dead"]

        await eventually(dead)
        row = await conn.fetchrow("SELECT attempts, last_error FROM receiver.signals")
        assert row is not None
        assert (row["attempts"], row["last_error"]) == (1, "cache answered 400")

        env = operator_env(settings)
        listing = await asyncio.to_thread(
            processes.run, ["signals", "list", "--status", "dead"], env
        )
        assert "cache answered 400" in listing.stdout
        assert "dead=1" in listing.stderr  # the summary; stdout is the listing
        retried = await asyncio.to_thread(
            processes.run, ["signals", "retry", "--actor", "ops", "--reason", "INC-9"], env
        )
        assert "1 dead signal(s) back to pending" in retried.stdout
        audited = await conn.fetchrow(
            "SELECT actor, reason, detail FROM receiver.audit WHERE action = 'signals_retry'"
        )
        assert audited is not None
        assert (audited["actor"], audited["reason"]) == ("ops", "INC-9")
        dispatcher.wake()

        async def delivered() -> bool:
            return await signal_statuses(conn) == ["delivered"]

        await eventually(delivered)
    assert standin_cache.ids() == ids * 2


async def test_5xx_is_retried_with_backoff(
    database: db.Database, settings: Settings, standin_cache: StandInCache, conn: asyncpg.Connection
) -> None:
    """503, 429 and 500 are retried; the signal is delivered on the fourth attempt."""
    await seed(database, settings, 1)
    standin_cache.statuses.extend([503, 429, 500])
    async with dispatching(database, with_cache(settings, standin_cache), poll_interval=0.05):

        async def delivered() -> bool:
            return await signal_statuses(conn) == ["delivered"]

        await eventually(delivered)
    assert await conn.fetchval("SELECT attempts FROM receiver.signals") == 4


async def test_failing_signal_is_retried_until_it_no_longer_matters(
    database: db.Database, settings: Settings, standin_cache: StandInCache, conn: asyncpg.Connection
) -> None:
    """A cache that keeps answering 503 is retried, attempt after attempt (never dead
    after a small count), until the signal is older than RECEIVER_SIGNAL_MAX_AGE (here
    scaled down to 2 s); then it is dead-lettered, loudly."""
    await seed(database, settings, 1)
    standin_cache.statuses.extend([503] * 10_000)
    scaled = with_cache(settings, standin_cache, signal_max_age=2.0, signal_retry_cap_seconds=0.1)
    async with dispatching(database, scaled, poll_interval=0.05):

        async def dead() -> bool:
            return await signal_statuses(conn) == ["dead"]

        await eventually(dead)
    row = await conn.fetchrow(
        "SELECT attempts, last_error, next_attempt_at - created_at AS last_at FROM receiver.signals"
    )
    assert row is not None
    assert row["attempts"] > 12  # what the old count-bound allowed
    assert row["last_error"] == "cache answered 503"
    assert row["last_at"].total_seconds() <= 2.0  # the last retry was not after the age
    assert len(standin_cache.received) == row["attempts"]


async def test_backlog_drains_at_once_when_the_cache_is_back(
    database: db.Database, settings: Settings, standin_cache: StandInCache, conn: asyncpg.Connection
) -> None:
    """Signals that failed while the cache was down wait on long backoff steps (here up
    to 10 minutes); the first success after it is back sends every one of them, rather
    than each at its own next step."""
    ids = await seed(database, settings, 30)
    standin_cache.statuses.extend([503] * 30)
    slow = with_cache(settings, standin_cache, signal_retry_base_seconds=600.0)
    async with dispatching(database, slow, poll_interval=0.05) as dispatcher:

        async def all_failed_once() -> bool:
            # Every failure recorded, not only sent: a row still in flight would have
            # its next attempt set by the dispatcher after the test's update below.
            in_flight = await conn.fetchval(
                "SELECT count(*) FROM receiver.signals WHERE status = 'in_flight'"
            )
            return len(standin_cache.received) >= 30 and in_flight == 0

        await eventually(all_failed_once)
        # Back now; one waiting signal made due (as its backoff step would): the rest
        # follow it. (One retried early by its own jitter would have released them too.)
        await conn.execute(
            "UPDATE receiver.signals SET next_attempt_at = now() WHERE id = "
            "(SELECT id FROM receiver.signals WHERE status = 'pending' ORDER BY id LIMIT 1)"
        )
        dispatcher.wake()

        async def all_delivered() -> bool:
            return set(await signal_statuses(conn)) == {"delivered"}

        await eventually(all_delivered)
    assert set(standin_cache.ids()[30:]) == set(ids)


async def test_killed_dispatcher_is_covered_after_its_lease_expires(
    database: db.Database,
    database_url: str,
    settings: Settings,
    standin_cache: StandInCache,
    conn: asyncpg.Connection,
) -> None:
    """`receiver dispatch` killed with SIGKILL mid-delivery: once its lease expires,
    another dispatcher delivers the signal."""
    ids = await seed(database, settings, 1)
    standin_cache.hang = asyncio.Event()
    env = operator_env(
        settings,
        RECEIVER_CACHE_URL=standin_cache.url,
        RECEIVER_CACHE_SECRET=standin_cache.secret_b64,
        RECEIVER_SIGNAL_LEASE_SECONDS="1",
    )
    with processes.background(["dispatch"], env) as (process, _):

        async def hanging() -> bool:
            return len(standin_cache.received) == 1

        await eventually(hanging, seconds=30)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert await signal_statuses(conn) == ["in_flight"]
    standin_cache.hang.set()  # let the orphaned request finish
    standin_cache.hang = None
    async with dispatching(database, with_cache(settings, standin_cache), poll_interval=0.1):

        async def delivered() -> bool:
            return await signal_statuses(conn) == ["delivered"]

        await eventually(delivered)
    assert standin_cache.ids() == ids * 2  # the hung attempt, then the redelivery


async def test_signal_whose_leases_keep_expiring_dies(
    database: db.Database, settings: Settings, standin_cache: StandInCache, conn: asyncpg.Connection
) -> None:
    """A signal whose every claim ended in an expired lease (it kills or stalls each
    dispatcher that takes it) is dead-lettered by the reaper once it is older than the
    max age, instead of cycling forever; nothing is sent for it."""
    await seed(database, settings, 1)
    await conn.execute(
        "UPDATE receiver.signals SET status = 'in_flight', lease_id = gen_random_uuid(), "
        "lease_expires_at = now() - interval '1 second', attempts = 3, "
        "created_at = now() - interval '2 seconds'"
    )
    async with dispatching(
        database, with_cache(settings, standin_cache, signal_max_age=1.0), poll_interval=0.05
    ):

        async def dead() -> bool:
            return await signal_statuses(conn) == ["dead"]

        await eventually(dead)
    assert standin_cache.received == []
    assert "lease expired" in await conn.fetchval("SELECT last_error FROM receiver.signals")


async def test_sigterm_never_makes_a_signal_go_twice(
    database: db.Database,
    settings: Settings,
    standin_cache: StandInCache,
    conn: asyncpg.Connection,
) -> None:
    """`receiver dispatch` stopped with SIGTERM three times while deliveries are in
    flight to a slow cache: each stop lets its batch finish and records it, leaves no
    lease behind, and every signal reaches the cache exactly once."""
    ids = await seed(database, settings, 300)
    # Each answer takes 0.5 s, so a batch (50 signals) is in flight when SIGTERM lands.
    standin_cache.latency = 0.5
    env = operator_env(
        settings,
        RECEIVER_CACHE_URL=standin_cache.url,
        RECEIVER_CACHE_SECRET=standin_cache.secret_b64,
    )
    for cycle in range(3):
        seen = len(standin_cache.received)
        with processes.background(["dispatch"], env) as (process, _):

            async def in_flight(seen: int = seen) -> bool:  # this run's first batch arrived
                return len(standin_cache.received) > seen

            await eventually(in_flight, seconds=30)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0
        held = await conn.fetchval(
            "SELECT count(*) FROM receiver.signals WHERE status = 'in_flight'"
        )
        assert held == 0, f"cycle {cycle}: leases left behind"
    standin_cache.latency = 0.0
    async with dispatching(database, with_cache(settings, standin_cache), poll_interval=0.05):

        async def all_delivered() -> bool:
            return set(await signal_statuses(conn)) == {"delivered"}

        await eventually(all_delivered, seconds=30)
    assert sorted(standin_cache.ids()) == sorted(ids)  # each once: no duplicate


async def test_sigterm_of_serve_under_load_never_makes_a_signal_go_twice(
    database: db.Database,
    settings: Settings,
    webhook_secret: str,
    standin_cache: StandInCache,
    conn: asyncpg.Connection,
) -> None:
    """`receiver serve` stopped with SIGTERM three times while revocations keep
    arriving and its dispatcher has a batch in flight to a slow cache: each stop exits
    0, leaves no lease behind, loses no acknowledged delivery, and every signal
    reaches the cache exactly once."""
    await seed(database, settings, 200)
    standin_cache.latency = 0.5
    env = operator_env(
        settings,
        RECEIVER_CACHE_URL=standin_cache.url,
        RECEIVER_CACHE_SECRET=standin_cache.secret_b64,
    )
    acknowledged: list[str] = []
    for cycle in range(3):
        seen = len(standin_cache.received)
        port = processes.free_port()
        with processes.serving(["--port", str(port)], env) as (process, _):
            await processes.wait_healthy(port, process)
            stop_load = asyncio.Event()

            async def load(port: int = port, stop: asyncio.Event = stop_load) -> None:
                # Deliveries until the process stops answering; only 200s count.
                url = f"http://127.0.0.1:{port}{app.WEBHOOK_PATH}"
                async with aiohttp.ClientSession() as session:
                    while not stop.is_set():
                        document = helpers.revocation(f"cli_{os.urandom(4).hex()}", None)
                        body = helpers.encode(document)
                        headers = helpers.signed_headers(webhook_secret, body)
                        try:
                            async with session.post(url, data=body, headers=headers) as answer:
                                if answer.status == 200:
                                    acknowledged.append(document["id"])
                        except aiohttp.ClientError:
                            return

            loader = asyncio.create_task(load())

            answered = len(acknowledged)

            async def busy(seen: int = seen, answered: int = answered) -> bool:
                # Signals in flight to the cache and deliveries being answered.
                return len(standin_cache.received) > seen and len(acknowledged) > answered + 5

            await eventually(busy, seconds=30)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0
            stop_load.set()
            await loader
        held = await conn.fetchval(
            "SELECT count(*) FROM receiver.signals WHERE status = 'in_flight'"
        )
        assert held == 0, f"cycle {cycle}: leases left behind"
    assert acknowledged, "no delivery was answered during the cycles"
    stored = await conn.fetch("SELECT key FROM receiver.events WHERE key = ANY($1)", acknowledged)
    assert len(stored) == len(acknowledged)  # nothing acknowledged was lost
    standin_cache.latency = 0.0
    async with dispatching(database, with_cache(settings, standin_cache), poll_interval=0.05):

        async def all_delivered() -> bool:
            return set(await signal_statuses(conn)) == {"delivered"}

        await eventually(all_delivered, seconds=30)
    ids = [r["id"] for r in await database.fetch("list_signals", None, 100_000)]
    assert len(ids) == 200 + len(acknowledged)
    assert sorted(standin_cache.ids()) == sorted(ids)  # each once: no duplicate


async def test_three_dispatchers_share_the_work_without_duplicates(
    database: db.Database, settings: Settings, standin_cache: StandInCache, conn: asyncpg.Connection
) -> None:
    """Three dispatchers on one database deliver every signal exactly once while no
    lease expires."""
    ids = await seed(database, settings, 150)
    cache_settings = with_cache(settings, standin_cache)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(
                dispatching(database, cache_settings, poll_interval=0.05, batch_size=10)
            )

        async def all_delivered() -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM receiver.signals WHERE status = 'delivered'"
                )
                == 150
            )

        await eventually(all_delivered, seconds=60)
    assert sorted(standin_cache.ids()) == sorted(ids)


async def test_stopping_a_dispatcher_hands_back_its_leases(
    database: db.Database, settings: Settings, standin_cache: StandInCache, conn: asyncpg.Connection
) -> None:
    """A dispatcher stopped mid-delivery returns its signals to pending at once."""
    await seed(database, settings, 3)
    standin_cache.hang = asyncio.Event()
    async with dispatching(database, with_cache(settings, standin_cache), poll_interval=0.05):

        async def in_flight() -> bool:
            return len(standin_cache.received) == 3

        await eventually(in_flight)
    standin_cache.hang.set()  # only after the dispatcher stopped
    rows = await conn.fetch("SELECT status, attempts, lease_id FROM receiver.signals")
    assert {(r["status"], r["attempts"], r["lease_id"]) for r in rows} == {("pending", 0, None)}


async def test_token_cache_follows_rotation_and_revocation(post: Any, settings: Settings) -> None:
    """cache.get returns the active token, the new one after a rotation, and nothing
    after a revocation, each within one signal."""
    first, second = helpers.canary_token(), helpers.canary_token()
    token_cache = cache.TokenCache.from_settings(cache_settings(settings))
    await token_cache.start()
    try:
        assert token_cache.listening
        assert await token_cache.get("cli_tc") is None
        await post(helpers.onboarding("cli_tc", first, completed_at="2024-01-01T00:00:00Z"))

        async def is_token(expected: str | None) -> bool:
            return await token_cache.get("cli_tc") == expected

        await eventually(lambda: is_token(first))
        await post(helpers.onboarding("cli_tc", second, completed_at="2024-02-01T00:00:00Z"))
        await eventually(lambda: is_token(second))
        await post(helpers.revocation("cli_tc", second[:15]))
        await eventually(lambda: is_token(None))
        assert first not in repr(token_cache)
    finally:
        await token_cache.close()


async def test_token_cache_flushes_after_losing_its_listener(
    post: Any, settings: Settings, conn: asyncpg.Connection
) -> None:
    """When the LISTEN connection dies, the cache reconnects and drops everything it
    held, since notifications sent meanwhile are lost."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_fl", token))
    token_cache = cache.TokenCache.from_settings(cache_settings(settings))
    await token_cache.start()
    try:
        assert await token_cache.get("cli_fl") == token
        # A change no notification announces: only a flush can reveal it.
        await conn.execute(
            "UPDATE receiver.tokens SET status = 'revoked' WHERE client_id = 'cli_fl'"
        )
        assert await token_cache.get("cli_fl") == token
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        assert killed == 1

        async def flushed() -> bool:
            return token_cache.listening and await token_cache.get("cli_fl") is None

        await eventually(flushed)
    finally:
        await token_cache.close()


async def test_token_cache_does_not_keep_a_read_that_raced_an_invalidation(
    post: Any, settings: Settings, conn: asyncpg.Connection, database_url: str
) -> None:
    """A read that started before an invalidation returns what it read but does not
    cache it: the next read goes to Postgres again (the generation counter)."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_race", token))
    token_cache = cache.TokenCache.from_settings(cache_settings(settings))
    await token_cache.start()
    try:
        async with conn.transaction():
            # Holds the cache's read until the invalidation below has happened.
            await conn.execute("LOCK TABLE receiver.tokens IN ACCESS EXCLUSIVE MODE")
            read = asyncio.create_task(token_cache.get("cli_race"))
            await eventually(lambda: _reads_blocked(database_url))
            token_cache.invalidate("cli_race")
        assert await read == token  # the read completes and returns what it read...
        # ...but is not cached: a change no signal announces shows at the next read.
        await conn.execute(
            "UPDATE receiver.tokens SET status = 'revoked' WHERE client_id = 'cli_race'"
        )
        assert await token_cache.get("cli_race") is None
    finally:
        await token_cache.close()


async def _reads_blocked(database_url: str) -> bool:
    # A connection of its own: inside a transaction pg_stat_activity is a snapshot.
    watcher = await asyncpg.connect(database_url)
    try:
        waiting: int = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%FROM receiver.cache_tokens%'"
        )
    finally:
        await watcher.close()
    return bool(waiting == 1)


async def test_token_cache_applies_signed_http_signals(
    aiohttp_client: Any,
    settings: Settings,
    webhook_secret: str,
    cache_secret: str,
    database_url: str,
) -> None:
    """The cache's aiohttp handler verifies the receiver's signed POST and invalidates;
    an unsigned POST is refused."""
    old, new = helpers.canary_token(), helpers.canary_token()
    quiet = cache.TokenCache(
        database_url,
        vault.Sealer.from_settings(settings).keyring,
        channel="unused_channel",
        signal_secret=base64.b64decode(cache_secret),
    )
    await quiet.start()
    partner = web.Application()
    partner.router.add_post("/signals", quiet.signal_handler)
    server = TestServer(partner, host="127.0.0.1")
    await server.start_server()
    try:
        stand_in = StandInCache(cache_secret, server.port or 0)  # only for its URL
        client = await aiohttp_client(app.create_app(with_cache(settings, stand_in)))

        async def send(document: dict[str, Any]) -> None:
            body = helpers.encode(document)
            response = await client.post(
                app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
            )
            assert response.status == 200

        await send(helpers.onboarding("cli_http", old, completed_at="2024-01-01T00:00:00Z"))
        assert await quiet.get("cli_http") == old
        await send(helpers.onboarding("cli_http", new, completed_at="2024-02-01T00:00:00Z"))

        async def fresh() -> bool:
            return await quiet.get("cli_http") == new

        await eventually(fresh)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{server.port}/signals", json={"client_id": "x"}
            ) as refused,
        ):
            assert refused.status == 401
    finally:
        await server.close()
        await quiet.close()


async def test_a_revocation_goes_before_a_backlog_of_issued_tokens(
    database: db.Database, settings: Settings, standin_cache: StandInCache
) -> None:
    """Signals are "drop and re-read", so their order is free: a revoked token must
    leave the cache first. Ten onboardings queue ten token_issued signals, then one
    revocation queues its own; a dispatcher claiming two at a time sends the
    revocation in its first batch, not after the five batches before it."""
    client_ids = [f"cli_{os.urandom(4).hex()}" for _ in range(10)]
    documents = [helpers.onboarding(c) for c in client_ids]
    documents.append(helpers.revocation(client_ids[0], None))
    for document in documents:  # one at a time: the revocation is the newest signal
        await record(database, settings, document)
    async with dispatching(database, with_cache(settings, standin_cache), batch_size=2):

        async def all_received() -> bool:
            return len(standin_cache.received) == 11

        await eventually(all_received)
    reasons = [signal["body"]["reason"] for signal in standin_cache.received]
    assert "token_revoked" in reasons[:2]
    assert reasons.count("token_issued") == 10


@pytest.mark.parametrize("reloaded", [False, True], ids=["as_started", "after_a_reload"])
async def test_a_revocation_is_sent_while_a_batch_is_still_out(
    database: db.Database, settings: Settings, standin_cache: StandInCache, reloaded: bool
) -> None:
    """The revocation lane: while the dispatcher's batch of issued-token signals hangs
    at the cache, a revocation committed now is sent beside it, not after it. Also
    after a SIGHUP re-signed with the cache secret read again (`use_secrets`): before,
    the reload swapped the lane's wake-up event, so revocations waited for the next
    poll, and none came while the batch hung."""
    for _ in range(4):
        await record(database, settings, helpers.onboarding(f"cli_{os.urandom(4).hex()}"))
    standin_cache.hang = asyncio.Event()
    cache = with_cache(settings, standin_cache)
    try:
        async with dispatching(database, cache, batch_size=2) as dispatcher:

            async def batch_out() -> bool:
                return len(standin_cache.received) == 2

            await eventually(batch_out)
            if reloaded:
                dispatcher.use_secrets(cache)  # as reload.reload does
            await record(database, settings, helpers.revocation("cli_revoked", None))
            dispatcher.wake(revocation=True)

            async def revocation_arrived() -> bool:
                return any(r["body"]["reason"] == "token_revoked" for r in standin_cache.received)

            # Well before the hanging batch times out (after which the main loop's
            # next claim would send the revocation anyway).
            await eventually(revocation_arrived, seconds=outbox.DELIVERY_TIMEOUT_SECONDS / 2)
            assert len(standin_cache.received) == 3  # the hanging batch, and the revocation
            standin_cache.hang.set()

            async def all_arrived() -> bool:
                return len(standin_cache.received) == 5

            await eventually(all_arrived)
    finally:
        standin_cache.hang.set()


async def record(database: db.Database, settings: Settings, document: dict[str, Any]) -> None:
    """Record one delivery the way the webhook does, its signals for HTTP delivery."""
    sealer = vault.Sealer.from_settings(settings)
    body = helpers.encode(document)
    delivery = rows.Arrival(body=body, is_test=False, test_header=False, signature=None)
    row = rows.prepare(sealer, events.read(body, is_test=False), delivery)
    await store.record_rows(
        database, sealer, [row], channel=settings.notify_channel, http_delivery=True
    )

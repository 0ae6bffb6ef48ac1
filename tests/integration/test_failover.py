"""Losing the Postgres primary (docs/design.md §9, Failover): a real `receiver serve` on a
multi-host URL, deliveries at a steady rate, the primary crashed (`pg_ctl stop -m
immediate`) and its streaming standby promoted mid-load. With synchronous replication
nothing acknowledged is lost; with asynchronous replication the test prints what was.

Run with `-s` to see the figures (deliveries sent, acknowledged, found after the
failover, 503s, seconds without service)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from receiver import config, db, endpoints, errors, vault
from receiver.config import Settings
from receiver.partner import cache
from receiver.service import app
from tests import helpers
from tests.integration import processes, replication, standins
from tests.integration.conftest import settings_values
from tests.integration.standins import StandInCache

SENDERS = 4
RATE_PER_SECOND = 60.0  # all senders together: a steady load, not a flood
BEFORE_CRASH = 120  # acknowledged deliveries before the primary is crashed
AFTER_RECOVERY = 120  # and after the service serves again
LAGGING = 30  # acknowledged while the standby lags (asynchronous replication)
# The contract (§12): serving again within 10 s of the promotion, with no restart.
RECOVERY_BOUND_SECONDS = 10.0


@pytest.fixture
def bindir() -> Path:
    """The Postgres server programs, or a skip saying why there are none."""
    found, why = replication.server_programs()
    if found is None:
        pytest.skip(f"no Postgres server programs to replicate with: {why}")
    return found


@dataclass
class Sent:
    """One delivery and what the receiver answered."""

    event_id: str
    client_id: str
    token: str
    sent_at: float
    status: int = 0
    answered_at: float = 0.0
    retry_after: str | None = None
    failure: str = ""


@dataclass
class Run:
    """What a failover under load showed."""

    sent: list[Sent] = field(default_factory=list)
    paused_at: float = 0.0  # the standby stopped receiving WAL (asynchronous only)
    crashed_at: float = 0.0  # pg_ctl stop called
    down_at: float = 0.0  # and returned: no primary until the promotion starts
    promoting_at: float = 0.0  # pg_ctl promote called
    promoted_at: float = 0.0  # and returned: the new primary takes writes
    readiness: list[tuple[float, int]] = field(default_factory=list)

    def answered(self, status: int) -> list[Sent]:
        return [s for s in self.sent if s.status == status]

    def first_200_after(self, moment: float) -> float:
        return min(s.answered_at for s in self.answered(200) if s.sent_at >= moment)

    def last_200_before(self, moment: float) -> float:
        return max(s.answered_at for s in self.answered(200) if s.answered_at <= moment)


async def _send_steadily(
    port: int, secret: str, run: Run, stop: asyncio.Event, acked: asyncio.Condition
) -> None:
    url = f"http://127.0.0.1:{port}/webhooks/debitura"
    interval = SENDERS / RATE_PER_SECOND
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        next_at = time.monotonic()
        while not stop.is_set():
            document = helpers.onboarding(token=helpers.canary_token("test"))
            body = helpers.encode(document)
            sent = Sent(
                document["id"],
                document["data"]["client_id"],
                document["data"]["bearer_token"],
                time.monotonic(),
            )
            run.sent.append(sent)
            try:
                headers = helpers.signed_headers(secret, body)
                async with session.post(url, data=body, headers=headers) as answer:
                    sent.status = answer.status
                    sent.retry_after = answer.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                sent.failure = type(exc).__name__
            sent.answered_at = time.monotonic()
            async with acked:
                acked.notify_all()
            # Pacing the load (a steady rate), not waiting for anything to happen.
            next_at = max(next_at + interval, time.monotonic() - interval)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _watch_readiness(port: int, run: Run, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stop.is_set():
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as answer:
                    run.readiness.append((time.monotonic(), answer.status))
            except (aiohttp.ClientError, TimeoutError):
                run.readiness.append((time.monotonic(), 0))
            await asyncio.sleep(0.05)


async def _wait_for(acked: asyncio.Condition, holds: Any, seconds: float, what: str) -> None:
    try:
        async with asyncio.timeout(seconds), acked:
            await acked.wait_for(holds)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {seconds} s") from None


async def _failover_under_load(
    pair: replication.Replicated, synchronous: bool, cache: StandInCache, *, lag: int = 0
) -> tuple[Run, dict[str, str]]:
    await pair.start(synchronous=synchronous)
    env, secret = processes.receiver_env(
        pair.dsn(),
        RECEIVER_TEST_WEBHOOK_SECRETS=helpers.new_secret(),
        RECEIVER_CACHE_URL=cache.url,
        RECEIVER_CACHE_SECRET=cache.secret_b64,
        RECEIVER_SIGNAL_RETRY_BASE_SECONDS="0.05",
        RECEIVER_SIGNAL_RETRY_CAP_SECONDS="1",
        # A prune (under its lease) every second: the schedules' leases are taken
        # again on the new primary.
        RECEIVER_PRUNE_INTERVAL_SECONDS="1",
    )
    # Canary test tokens come with test deliveries: signed with the test secret.
    secret = env["RECEIVER_TEST_WEBHOOK_SECRETS"]
    port = processes.free_port()
    run = Run()
    with processes.serving(["--port", str(port)], env) as (serve, output):
        await processes.wait_healthy(port, serve)
        stop = asyncio.Event()
        acked = asyncio.Condition()
        senders = [
            asyncio.create_task(_send_steadily(port, secret, run, stop, acked))
            for _ in range(SENDERS)
        ]
        watcher = asyncio.create_task(_watch_readiness(port, run, stop))
        try:
            await _wait_for(
                acked, lambda: len(run.answered(200)) >= BEFORE_CRASH, 60, "deliveries before"
            )
            if lag:  # the standby falls behind for the last `lag` acknowledgements
                await pair.pause_replication()
                run.paused_at = time.monotonic()
                await _wait_for(
                    acked,
                    lambda: sum(s.sent_at > run.paused_at for s in run.answered(200)) >= lag,
                    60,
                    "deliveries while the standby lags",
                )
            run.crashed_at = time.monotonic()
            await asyncio.to_thread(pair.crash_primary)
            run.down_at = time.monotonic()
            # Mid-load: the service has seen the primary gone before the promotion.
            await _wait_for(
                acked,
                lambda: any(s.status == 503 and s.sent_at > run.crashed_at for s in run.sent),
                30,
                "a 503 after the crash",
            )

            async def not_ready() -> bool:
                return any(at > run.down_at and status != 200 for at, status in run.readiness)

            await standins.eventually(not_ready, seconds=30)
            run.promoting_at = time.monotonic()
            await asyncio.to_thread(pair.promote_standby)
            run.promoted_at = time.monotonic()
            pruned_before = output.read_text().count("prune_done")
            await _wait_for(
                acked,
                lambda: (
                    sum(s.sent_at > run.promoted_at for s in run.answered(200)) >= AFTER_RECOVERY
                ),
                60,
                "deliveries after the promotion",
            )
            # Within the lease's TTL (60 s): a crash in the middle of a prune leaves
            # its lease held on the new primary until it expires.
            await standins.eventually(
                lambda: _true(output.read_text().count("prune_done") > pruned_before), 90
            )
        finally:
            stop.set()
            await asyncio.gather(*senders, watcher, return_exceptions=True)
        assert serve.poll() is None, f"serve exited; its log: {output}"
    return run, env


async def _stored(pair: replication.Replicated, run: Run) -> dict[str, list[asyncpg.Record]]:
    """The rows of every delivery sent, on the promoted standby, by event id."""
    conn = await asyncpg.connect(pair.single(pair.standby_port))
    try:
        rows = await conn.fetch(
            "SELECT e.envelope_id, e.status, t.token_index, t.environment,"
            " (SELECT count(*) FROM receiver.signals s WHERE s.event_key = e.key) AS signals"
            " FROM receiver.events e LEFT JOIN receiver.tokens t ON t.created_by_event = e.key"
            " WHERE e.envelope_id = ANY($1::text[])",
            [s.event_id for s in run.sent],
        )
    finally:
        await conn.close()
    found: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        found.setdefault(row["envelope_id"], []).append(row)
    return found


def _figures(run: Run, found: dict[str, list[asyncpg.Record]], label: str) -> dict[str, float]:
    acked = run.answered(200)
    figures = {
        "sent": len(run.sent),
        "acknowledged": len(acked),
        "acknowledged_found": sum(s.event_id in found for s in acked),
        "acknowledged_lost": sum(s.event_id not in found for s in acked),
        "answered_503": len(run.answered(503)),
        "503_found_anyway": sum(s.event_id in found for s in run.answered(503)),
        "seconds_without_service": round(
            run.first_200_after(run.crashed_at) - run.last_200_before(run.crashed_at), 2
        ),
        "seconds_to_serve_after_promotion": round(
            run.first_200_after(run.promoted_at) - run.promoted_at, 2
        ),
    }
    print(f"\nfailover ({label} replication): {figures}")
    return figures


def _check_answers(run: Run, found: dict[str, list[asyncpg.Record]], index_key: bytes) -> None:
    assert [s.failure for s in run.sent if s.failure] == []
    statuses = {s.status for s in run.sent if s.status}
    assert statuses <= {200, 503}, statuses
    assert all(s.retry_after for s in run.answered(503))
    for event_id, rows in found.items():  # exactly once, with its token and its signal
        assert len(rows) == 1, event_id
    for sent in run.answered(200):
        if sent.event_id not in found:
            continue
        (row,) = found[sent.event_id]
        assert row["status"] == "processed"
        assert row["environment"] == "test"
        assert row["token_index"] == vault.blind_index(index_key, sent.token)
        assert row["signals"] == 1


def _index_key(env: dict[str, str]) -> bytes:
    return base64.b64decode(env["RECEIVER_INDEX_KEY"])


async def _signals_delivered(pair: replication.Replicated, run: Run) -> None:
    """The dispatcher, on the new primary, delivers the signal of every delivery
    acknowledged after the promotion (it took its work up again by itself)."""
    conn = await asyncpg.connect(pair.single(pair.standby_port))
    after = [s.event_id for s in run.answered(200) if s.sent_at > run.promoted_at]
    try:

        async def all_delivered() -> bool:
            pending = await conn.fetchval(
                "SELECT count(*) FROM receiver.signals s JOIN receiver.events e"
                " ON e.key = s.event_key WHERE e.envelope_id = ANY($1::text[])"
                " AND s.status <> 'delivered'",
                after,
            )
            return bool(pending == 0)

        await standins.eventually(all_delivered, seconds=60)
    finally:
        await conn.close()


def _check_readiness(run: Run) -> None:
    recovered = run.first_200_after(run.promoted_at)
    during = [status for at, status in run.readiness if run.down_at < at < run.promoting_at]
    assert during, "readiness was not polled during the outage"
    assert 200 not in during, "readiness passed while no primary took writes"
    assert any(s == 200 for at, s in run.readiness if at > recovered), "not ready again"


async def test_nothing_acknowledged_is_lost_across_a_failover_with_synchronous_replication(
    bindir: Path, standin_cache: StandInCache
) -> None:
    """Primary crashed and standby promoted under steady load, synchronous replication:
    every delivery answered 200 is on the new primary exactly once with its token and
    signal, every other answer is a 503 with Retry-After, readiness fails meanwhile,
    the same process serves again within 10 s of the promotion, prunes again under its
    lease, and its dispatcher delivers the new signals."""
    with replication.replicated(bindir) as pair:
        async with asyncio.timeout(300):
            run, env = await _failover_under_load(pair, True, standin_cache)
            found = await _stored(pair, run)
            figures = _figures(run, found, "synchronous")
            _check_answers(run, found, _index_key(env))
            assert figures["acknowledged_lost"] == 0
            assert figures["seconds_to_serve_after_promotion"] <= RECOVERY_BOUND_SECONDS
            _check_readiness(run)
            await _signals_delivered(pair, run)


async def test_asynchronous_replication_loses_what_the_standby_had_not_received(
    bindir: Path, standin_cache: StandInCache
) -> None:
    """The same failover with asynchronous replication and a standby that falls behind
    just before the crash (its WAL sender paused): answers are still only 200 or 503
    and the service comes back by itself, but deliveries acknowledged while the
    standby lagged are lost (README "High availability"); none acknowledged before
    the lag, none after the promotion."""
    with replication.replicated(bindir) as pair:
        async with asyncio.timeout(300):
            run, env = await _failover_under_load(pair, False, standin_cache, lag=LAGGING)
            found = await _stored(pair, run)
            figures = _figures(run, found, "asynchronous")
            _check_answers(run, found, _index_key(env))
            lost = [s for s in run.answered(200) if s.event_id not in found]
            # Commits after the pause never left the primary: the later of the
            # acknowledgements while it lagged are certainly among them.
            assert lost, "nothing acknowledged while the standby lagged was lost"
            assert all(run.paused_at < s.answered_at < run.promoted_at for s in lost)
            assert figures["seconds_to_serve_after_promotion"] <= RECOVERY_BOUND_SECONDS
            _check_readiness(run)


async def test_a_standby_reached_by_mistake_is_a_503_naming_its_host(
    bindir: Path, aiohttp_client: Any, settings: Settings, webhook_secret: str, log_lines: Any
) -> None:
    """A URL naming only the standby (no target_session_attrs): deliveries get 503 with
    Retry-After, never 500, and a `database_read_only` line names the standby."""
    with replication.replicated(bindir) as pair:
        await pair.start(synchronous=False)
        standby = pair.single(pair.standby_port)
        on_standby = config.load_settings(**{**settings_values(settings), "database_url": standby})
        client = await aiohttp_client(app.create_app(on_standby))
        for _ in range(3):
            body = helpers.encode(helpers.onboarding())
            answer = await client.post(
                app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
            )
            assert answer.status == 503
            assert answer.headers["Retry-After"].isdigit()
        named = {line["host"] for line in log_lines() if line["event"] == "database_read_only"}
        assert named == {f"127.0.0.1:{pair.standby_port}"}


async def test_a_lost_primary_that_hangs_instead_of_refusing_is_passed_over(
    bindir: Path, aiohttp_client: Any, settings: Settings, webhook_secret: str
) -> None:
    """The lost primary's address accepts connections and never answers (its machine
    gone behind an address that still takes them): the promoted standby named after it
    is reached all the same, each host having its own connect timeout, and deliveries
    are stored again within 10 s of the promotion."""
    with replication.replicated(bindir) as pair:
        await pair.start(synchronous=False)
        served = config.load_settings(**{**settings_values(settings), "database_url": pair.dsn()})
        client = await aiohttp_client(app.create_app(served))

        async def stored() -> bool:
            body = helpers.encode(helpers.onboarding())
            answer = await client.post(
                app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
            )
            status: int = answer.status
            assert status in (200, 503)
            return status == 200

        assert await stored()
        await asyncio.to_thread(pair.crash_primary)
        async with _silent_listener(pair.primary_port):
            assert not await stored()
            await asyncio.to_thread(pair.promote_standby)
            promoted = time.monotonic()
            await standins.eventually(stored, seconds=30)
            took = time.monotonic() - promoted
            print(f"\nserving again {took:.2f} s after the promotion, the old primary hanging")
            assert took <= RECOVERY_BOUND_SECONDS


@contextlib.asynccontextmanager
async def _silent_listener(port: int) -> AsyncIterator[None]:
    """Something on `port` that accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_the_partner_cache_listens_on_the_primary_again_after_a_failover(
    bindir: Path,
) -> None:
    """A cache whose URL prefers the standby (for its reads) listens on the primary (a
    standby refuses LISTEN, and NOTIFY is not replicated); after the primary is crashed
    and the standby promoted it listens again by itself, on the new primary, having
    flushed everything (what was announced meanwhile is lost)."""
    seen: list[tuple[str, str]] = []
    with replication.replicated(bindir) as pair:
        await pair.start(synchronous=False)
        tokens = cache.TokenCache(
            pair.dsn("prefer-standby"),
            vault.Keyring([("k1", secrets.token_bytes(32))]),
            on_invalidated=lambda client_id, reason: seen.append((client_id, reason)),
        )
        await tokens.start(wait_listening=20)
        try:
            assert tokens.listening
            assert (await tokens.lookup("cli_nobody")).token is None  # read on the standby
            await _notify(pair.single(pair.primary_port), "cli_before")
            await standins.eventually(lambda: _true(("cli_before", "signal") in seen), 20)

            await asyncio.to_thread(pair.crash_primary)
            await standins.eventually(lambda: _true(not tokens.listening), 20)
            seen.clear()
            await asyncio.to_thread(pair.promote_standby)
            await standins.eventually(lambda: _true(tokens.listening), 30)
            assert ("*", "reconnect") in seen

            await _notify(pair.single(pair.standby_port), "cli_after")
            await standins.eventually(lambda: _true(("cli_after", "signal") in seen), 20)
            # No standby left: reads go to the new primary.
            assert (await tokens.lookup("cli_nobody_either")).token is None
        finally:
            await tokens.close()


async def _notify(url: str, client_id: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        payload = json.dumps({"client_id": client_id})
        await conn.execute("SELECT pg_notify('token_invalidation', $1)", payload)
    finally:
        await conn.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_retried_delivery_is_not_acknowledged_before_its_first_commit_reached_the_standby(
    bindir: Path, aiohttp_client: Any, settings: Settings, webhook_secret: str
) -> None:
    """Synchronous replication with the standby stalled: a delivery's commit waits for
    it, and the driver's timeout cancels the wait, which Postgres answers by committing
    locally (not on the standby); the sender gets a 503 and retries. The retry finds
    the delivery stored: a duplicate, and a duplicate writes nothing (no client row to
    lock for a quarantined or ignored delivery), so its commit waited for nothing. It
    must not be answered 200 while the delivery is not on the standby: the primary
    crashed then, the promoted standby has no trace of it (nothing acknowledged lost)."""
    with replication.replicated(bindir) as pair:
        await pair.start(synchronous=True)
        served = config.load_settings(**{**settings_values(settings), "database_url": pair.dsn()})
        client = await aiohttp_client(app.create_app(served))
        bodies = [  # deliveries naming no client: quarantined, and ignored
            json.dumps(["not an object", secrets.token_hex(8)]).encode(),
            helpers.encode(
                {**helpers.onboarding(), "event": "client.not_a_known_event", "data": {}}
            ),
        ]

        async def send(body: bytes) -> int:
            headers = helpers.signed_headers(webhook_secret, body)
            async with client.post(app.WEBHOOK_PATH, data=body, headers=headers) as answer:
                status: int = answer.status
                return status

        await pair.pause_replication()
        assert await asyncio.gather(*(send(body) for body in bodies)) == [503, 503]
        primary = await asyncpg.connect(pair.single(pair.primary_port))
        try:  # committed locally once the wait was cancelled
            assert await primary.fetchval("SELECT count(*) FROM receiver.events") == 2
        finally:
            await primary.close()
        retried = await asyncio.gather(*(send(body) for body in bodies))
        await asyncio.to_thread(pair.crash_primary)
        await asyncio.to_thread(pair.promote_standby)
        promoted = await asyncpg.connect(pair.single(pair.standby_port))
        try:
            assert await promoted.fetchval("SELECT count(*) FROM receiver.events") == 0
        finally:
            await promoted.close()
        assert retried == [503, 503], "acknowledged, and lost with the primary"


async def test_hosts_that_never_answer_do_not_keep_the_pool_from_the_one_that_does(
    database_url: str,
) -> None:
    """Three hosts of a multi-host URL take connections and never answer (a lost zone),
    the fourth is the primary: a pool acquisition gives up after 3 s, before the 1 s
    per host reaches the fourth. The next one starts with the hosts that did not fail
    to answer, and connects (it started over from the first host, for ever)."""
    ((host, port),) = endpoints.database_addresses(database_url)
    parts = urlsplit(database_url)
    async with contextlib.AsyncExitStack() as stack:
        silent = [processes.free_port() for _ in range(3)]
        for silent_port in silent:
            await stack.enter_async_context(_silent_listener(silent_port))
        hosts = ",".join(["127.0.0.1"] * len(silent) + [host])
        ports = ",".join(str(p) for p in [*silent, port])
        url = (
            urlunsplit((parts.scheme, parts.netloc.rpartition("@")[0] + "@", parts.path, "", ""))
            + f"?host={hosts}&port={ports}&target_session_attrs=read-write"
        )
        database = await db.Database.open(url, max_size=2)
        try:

            async def connected() -> bool:
                try:
                    async with database.connection() as conn:
                        return bool(await conn.fetchval("SELECT 1") == 1)
                except errors.DatabaseUnavailable:
                    return False

            await standins.eventually(connected, seconds=12)
        finally:
            await database.close()

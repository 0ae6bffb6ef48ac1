"""Faults under load: nothing acknowledged is lost, nothing is applied twice.

Bounded in count and time, loopback only; the Postgres that is stopped is one this
test starts for itself, never the shared one.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from receiver.db import migrations
from tests import helpers
from tests.conftest import with_database
from tests.integration import processes


async def deliver(
    session: aiohttp.ClientSession, url: str, secret: str, body: bytes
) -> tuple[int | None, dict[str, str]]:
    """One signed delivery; None when no HTTP answer came back."""
    try:
        async with session.post(
            url,
            data=body,
            headers=helpers.signed_headers(secret, body),
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            await response.read()
            return response.status, dict(response.headers)
    except (aiohttp.ClientError, TimeoutError):
        return None, {}


async def stored_keys(database_url: str) -> list[str]:
    """Every stored event key (duplicates would show twice)."""
    conn = await asyncpg.connect(database_url)
    try:
        return [r["key"] for r in await conn.fetch("SELECT key FROM receiver.events")]
    finally:
        await conn.close()


@pytest.mark.slow
async def test_kill_9_under_load_loses_nothing_acknowledged(database_url: str) -> None:
    """SIGKILL while a load generator sends: after a restart, every event that got a
    200 is stored exactly once, and Debitura's retries store the rest once too."""
    env, secret = processes.receiver_env(database_url)
    documents = [helpers.onboarding() for _ in range(400)]
    bodies = {d["id"]: helpers.encode(d) for d in documents}
    acknowledged: set[str] = set()
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}/webhooks/debitura"
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)
        queue = list(bodies.items())
        async with aiohttp.ClientSession() as session:

            async def sender() -> None:
                while queue:
                    key, body = queue.pop()
                    status, _ = await deliver(session, url, secret, body)
                    if status == 200:
                        acknowledged.add(key)
                    if len(acknowledged) >= 150 and process.poll() is None:
                        process.send_signal(signal.SIGKILL)

            await asyncio.gather(*(sender() for _ in range(16)))
        process.wait(timeout=10)
    assert 150 <= len(acknowledged) < 400
    keys = await stored_keys(database_url)
    assert len(keys) == len(set(keys))
    assert acknowledged <= set(keys)

    # Debitura retries everything it did not see acknowledged.
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(
                *(
                    deliver(session, url, secret, b)
                    for k, b in bodies.items()
                    if k not in acknowledged
                )
            )
    assert {status for status, _ in answers} == {200}
    keys = await stored_keys(database_url)
    assert sorted(keys) == sorted(bodies)


@pytest.mark.slow
async def test_postgres_restart_under_load(own_postgres: Any) -> None:
    """Postgres stopped and started again while events arrive: the receiver answers 503
    with Retry-After meanwhile, recovers by itself, and loses nothing acknowledged."""
    dsn, control = own_postgres
    admin = await asyncpg.connect(dsn)
    await admin.execute("CREATE DATABASE faults")
    await admin.close()
    database_url = with_database(dsn, "faults")
    await migrations.apply(database_url)
    env, secret = processes.receiver_env(database_url)
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}/webhooks/debitura"
    bodies = {d["id"]: helpers.encode(d) for d in (helpers.onboarding() for _ in range(300))}
    acknowledged: set[str] = set()
    unavailable: list[dict[str, str]] = []
    other: list[int | None] = []  # any answer but 200 or 503 is a defect, shown below
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)
        queue = list(bodies.items())
        async with aiohttp.ClientSession() as session:

            async def sender() -> None:
                while queue:
                    key, body = queue.pop(0)
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:  # Debitura retries, compressed
                        status, headers = await deliver(session, url, secret, body)
                        if status == 200:
                            acknowledged.add(key)
                            break
                        if status == 503:
                            unavailable.append(headers)
                        else:
                            other.append(status)
                        await asyncio.sleep(0.2)
                    await asyncio.sleep(0.01)

            async def outage() -> None:
                while len(acknowledged) < 100:  # noqa: ASYNC110 - a count, not an event
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(control, "stop")
                await asyncio.sleep(2)
                await asyncio.to_thread(control, "start")

            await asyncio.gather(outage(), *(sender() for _ in range(8)))
    assert other == [], f"answers other than 200/503 during the outage: {other}"
    assert unavailable, "the outage produced no 503"
    assert all(h.get("Retry-After", "").isdigit() for h in unavailable)
    assert acknowledged == set(bodies)
    keys = await stored_keys(database_url)
    assert sorted(keys) == sorted(bodies)


@pytest.mark.slow
async def test_two_receivers_fed_every_event_twice(database_url: str) -> None:
    """Two processes on one database, each event delivered to both at once: every
    event stored once, every token once, every signal once."""
    env, secret = processes.receiver_env(database_url)
    ports = [processes.free_port(), processes.free_port()]
    documents = [helpers.onboarding() for _ in range(200)]
    with (
        processes.serving(["--port", str(ports[0])], env) as (first, _),
        processes.serving(["--port", str(ports[1])], env) as (second, _),
    ):
        await processes.wait_healthy(ports[0], first)
        await processes.wait_healthy(ports[1], second)
        async with aiohttp.ClientSession() as session:

            async def both(document: dict[str, Any]) -> list[int | None]:
                body = helpers.encode(document)
                answers = await asyncio.gather(
                    *(
                        deliver(session, f"http://127.0.0.1:{p}/webhooks/debitura", secret, body)
                        for p in ports
                    )
                )
                return [status for status, _ in answers]

            statuses = await asyncio.gather(*(both(d) for d in documents))
    assert all(s == [200, 200] for s in statuses)
    conn = await asyncpg.connect(database_url)
    try:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM receiver.events) AS events, "
            "(SELECT count(*) FROM receiver.tokens) AS tokens, "
            "(SELECT count(*) FROM receiver.signals) AS signals"
        )
        assert counts is not None
    finally:
        await conn.close()
    assert dict(counts) == {"events": 200, "tokens": 200, "signals": 200}

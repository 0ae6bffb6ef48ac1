"""A rolling restart costs no retry: deliveries keep flowing through a SIGTERM,
because /readyz fails first, for RECEIVER_SHUTDOWN_DELAY_SECONDS, while the stopping
receiver still answers. Two real receiver processes on one database, real HTTP on
loopback."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import asyncpg

from tests import helpers
from tests.integration import processes

DELIVERIES = 3_000
CONCURRENCY = 32
SIGTERM_AFTER = 1_000


async def test_deliveries_through_a_sigterm_see_no_connection_error(database_url: str) -> None:
    """3,000 deliveries at concurrency 32, SIGTERM to the first replica after 1,000:
    clients that stop opening connections to it once its /readyz fails (as a load
    balancer does) see no connection error, and every 200 is stored."""
    env_a, secret = processes.receiver_env(database_url, RECEIVER_SHUTDOWN_DELAY_SECONDS="3")
    env_b = {**env_a, "RECEIVER_SHUTDOWN_DELAY_SECONDS": "0"}
    port_a, port_b = processes.free_port(), processes.free_port()
    bodies = [helpers.encode(helpers.onboarding()) for _ in range(DELIVERIES)]
    statuses: list[int] = []
    failures: list[str] = []
    with (
        processes.serving(["--port", str(port_a)], env_a) as (replica_a, _),
        processes.serving(["--port", str(port_b)], env_b) as (replica_b, _),
    ):
        await processes.wait_healthy(port_a, replica_a)
        await processes.wait_healthy(port_b, replica_b)
        target = [port_a]
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)
        terminated = asyncio.Event()

        async def watch_readiness(session: aiohttp.ClientSession) -> None:
            # The load balancer: once A's /readyz fails, new requests go to B.
            await terminated.wait()
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port_a}/readyz") as answer:
                        ready = answer.status == 200
                except aiohttp.ClientError:
                    ready = False
                if not ready:
                    target[0] = port_b
                    return
                await asyncio.sleep(0.02)

        async def client(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                body = queue.get_nowait()
                url = f"http://127.0.0.1:{target[0]}/webhooks/debitura"
                try:
                    headers = helpers.signed_headers(secret, body)
                    async with session.post(url, data=body, headers=headers) as answer:
                        statuses.append(answer.status)
                except aiohttp.ClientError as exc:
                    failures.append(f"{url}: {type(exc).__name__}: {exc}")
                if len(statuses) == SIGTERM_AFTER and not terminated.is_set():
                    replica_a.send_signal(signal.SIGTERM)
                    terminated.set()

        connector = aiohttp.TCPConnector(limit=CONCURRENCY + 1)
        async with asyncio.timeout(300), aiohttp.ClientSession(connector=connector) as session:
            watcher = asyncio.create_task(watch_readiness(session))
            await asyncio.gather(*(client(session) for _ in range(CONCURRENCY)))
            await watcher
        assert await asyncio.to_thread(replica_a.wait, 60) == 0
    assert failures == []
    assert len(statuses) == DELIVERIES
    assert set(statuses) == {200}
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM receiver.events")
    finally:
        await conn.close()
    assert stored == DELIVERIES

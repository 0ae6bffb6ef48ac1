"""Closed-loop throughput of one `receiver serve` process (quick check).

.venv/bin/python -m bench.throughput [--concurrency 32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
import uuid

import aiohttp

from bench import harness


async def closed_loop(
    url: str, secret: bytes, concurrency: int, seconds: float
) -> tuple[int, list[float]]:
    """`concurrency` senders, each sending as soon as its last answer arrived."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def sender() -> None:
            while time.monotonic() < deadline:
                body = harness.onboarding(f"cli_{uuid.uuid4().hex[:10]}")
                started = time.monotonic()
                status, answered = await harness.post(session, url, secret, body)
                assert status == 200, status
                latencies.append(answered - started)

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return len(latencies), latencies


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    async with harness.fresh_database(harness.server_dsn()) as database_url:
        port = harness.free_port()
        env = harness.secrets_env(database_url)
        secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
        with harness.receiver_process(env, port):
            await harness.wait_ready(port)
            url = f"http://127.0.0.1:{port}/webhooks/debitura"
            await closed_loop(url, secret, 8, 1)
            count, latencies = await closed_loop(url, secret, args.concurrency, args.seconds)
    print(f"{count / args.seconds:.0f} events/s  {harness.summary_ms(latencies)}")


if __name__ == "__main__":
    asyncio.run(main())

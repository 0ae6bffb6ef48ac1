"""Time from a webhook's 200 to the stand-in cache receiving the invalidation signal.

Idle: revocations one at a time. Under load: the same while a background sender
offers onboardings at a fixed rate. Everything runs on loopback; the receiver is a
real `receiver serve` process with HTTP delivery on.

    .venv/bin/python -m bench.signal_latency [--samples 200] [--load-rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
import uuid

import aiohttp

from bench import harness, loadgen


async def measure(url: str, secret: bytes, cache: harness.Cache, samples: int) -> list[float]:
    """Send `samples` revocations one at a time; return each 200-to-signal delay
    (a signal later than 10 s counts as 10 s)."""
    delays = []
    async with aiohttp.ClientSession() as session:
        for _ in range(samples):
            client = f"cli_{uuid.uuid4().hex[:10]}"
            status, answered = await harness.post(session, url, secret, harness.revocation(client))
            assert status == 200, status
            key = f"{client}:token_revoked"
            deadline = time.monotonic() + 10
            # Polling at 0.5 ms resolution is the measurement itself, bounded by deadline.
            while key not in cache.arrived and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            delays.append(cache.arrived.get(key, deadline) - answered)
            await asyncio.sleep(0.01)
    return delays


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--load-rate", type=float, default=1000.0)
    args = parser.parse_args()

    dsn = harness.server_dsn()
    async with harness.fresh_database(dsn) as database_url, harness.Cache() as cache:
        port = harness.free_port()
        cache_secret = base64.b64encode(b"c" * 32).decode()
        env = harness.secrets_env(
            database_url,
            RECEIVER_CACHE_URL=f"http://127.0.0.1:{cache.port}/signals",
            RECEIVER_CACHE_SECRET=cache_secret,
        )
        secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
        url = f"http://127.0.0.1:{port}/webhooks/debitura"
        with harness.receiver_process(env, port):
            await harness.wait_ready(port)
            await measure(url, secret, cache, 20)  # warm-up: connections, plans
            idle = await measure(url, secret, cache, args.samples)
            # Built before the samples start: building them meanwhile would stall the
            # event loop the samples are taken on.
            requests = loadgen.prebuilt(port, secret, harness.onboardings(int(args.load_rate * 30)))
            stop = asyncio.Event()
            load = asyncio.create_task(
                loadgen.open_loop(port, requests, args.load_rate, stop.is_set)
            )
            loaded = await measure(url, secret, cache, args.samples)
            stop.set()
            answers = await load
            if answers.exhausted:
                print("note: the background load ran out of requests before the samples")
            accepted = answers.statuses.get(200, 0)
            achieved = answers.rate
            expected = accepted + 2 * args.samples + 20
            drain_started = time.monotonic()
            while len(cache.arrived) < expected and time.monotonic() - drain_started < 120:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            drained = time.monotonic() - drain_started
    print("revocation 200 -> cache signal (one receiver process, HTTP delivery)")
    print(f"  idle                               {harness.summary_ms(idle)}")
    print(
        f"  under load ({args.load_rate:.0f}/s offered, {achieved:.0f}/s accepted)"
        f"  {harness.summary_ms(loaded)}"
    )
    print(
        f"  signals received {len(cache.arrived)}/{expected}; backlog drained "
        f"{drained:.1f} s after the load stopped"
    )


if __name__ == "__main__":
    asyncio.run(main())

"""A flood of strangers against one receiver: its resident memory and the latency of
signed deliveries with and without the flood.

    .venv/bin/python -m bench.flood [--strangers 1100] [--seconds 15] [--python PY]

The strangers each send headers for `POST /webhooks/debitura` with Content-Length
60000, then a byte every 2 s, reopened whenever the server closes them (from loopback
addresses 127.0.1.x, 50 each). One signed delivery every 0.25 s, each on a new
connection, 10 s timeout. `--python` runs another checkout's receiver (its
`.venv/bin/python`, run from that checkout) against the same kind of database.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import resource
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil

from bench import harness

HEAD = (
    b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 60000\r\n\r\n"
)


async def _stranger(port: int, address: str, until: float) -> None:
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(address, 0)
            )
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            writer.write(HEAD)
            while time.monotonic() < until and not reader.at_eof():
                await asyncio.sleep(2)  # the trickle is the attack
                writer.write(b"x")
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def _deliveries(port: int, secret: bytes, seconds: float) -> tuple[Counter[str], list[float]]:
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    url = f"http://127.0.0.1:{port}/webhooks/debitura"
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int) -> None:
            body = harness.onboarding(f"cli_flood_{index}_{time.monotonic_ns()}")
            started = time.perf_counter()
            try:
                status, _ = await harness.post(session, url, secret, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes[type(exc).__name__] += 1
                return
            outcomes[str(status)] += 1
            if status == 200:
                latencies.append(time.perf_counter() - started)

        tasks = []
        for index in range(int(seconds / 0.25)):
            tasks.append(asyncio.create_task(one(index)))
            await asyncio.sleep(0.25)
        await asyncio.gather(*tasks)
    return outcomes, latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strangers", type=int, default=1100)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--python", type=Path, default=None)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.strangers + 1024), hard))
    dsn = harness.server_dsn()
    async with harness.fresh_database(dsn) as url:
        env = harness.secrets_env(url)
        secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
        port = harness.free_port()
        command = None
        if args.python is not None:
            command = [str(args.python), "-m", "receiver", "serve", "--port", str(port)]
        with harness.receiver_process(env, port, command) as process:
            await harness.wait_ready(port)
            server = psutil.Process(process.pid)
            quiet, quiet_ms = await _deliveries(port, secret, args.seconds)
            rss_before = server.memory_info().rss
            until = time.monotonic() + args.seconds + 5
            strangers = [
                asyncio.create_task(_stranger(port, f"127.0.1.{1 + i // 50}", until))
                for i in range(args.strangers)
            ]
            await asyncio.sleep(4)
            peak = 0

            async def sample() -> None:
                nonlocal peak
                while time.monotonic() < until:
                    peak = max(peak, server.memory_info().rss)
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            flooded, flooded_ms = await _deliveries(port, secret, args.seconds)
            await asyncio.gather(*strangers, sampler)
    for label, outcomes, latencies in (
        ("no flood", quiet, quiet_ms),
        (f"{args.strangers:,} trickled bodies", flooded, flooded_ms),
    ):
        sent = sum(outcomes.values())
        figures = harness.summary_ms(latencies) if latencies else "no 200s"
        print(f"{label}: {outcomes['200']}/{sent} answered 200; {figures}; {dict(outcomes)}")
    print(f"RSS: {rss_before / 2**20:.0f} MiB before the flood, peak {peak / 2**20:.0f} MiB during")


if __name__ == "__main__":
    asyncio.run(main())

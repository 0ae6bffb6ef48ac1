"""Does scraping /metrics hurt ingest? Webhook latency at a fixed offered rate, with no
scraper and with 64 scrapers each scraping every `--interval` seconds (0: each scrape
right after the last, a flood rather than monitoring), on one `receiver serve`
process. Interleaved runs; medians printed with the ratio.

    .venv/bin/python -m bench.scrapes [--rate 500] [--seconds 5] [--scrapers 64]
                                      [--interval 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import random
import statistics
import time

import aiohttp

from bench import harness, loadgen


async def _scrape_forever(
    port: int, interval: float, stop: asyncio.Event, count: list[int]
) -> None:
    async with aiohttp.ClientSession() as session:
        # Scrapers are not in lockstep: each starts at its own point of the interval.
        await asyncio.sleep(random.uniform(0, interval))
        while not stop.is_set():
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                await response.read()
            count[0] += 1
            if interval:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await stop.wait()


async def _run(
    url: str, rate: float, seconds: float, scrapers: int, interval: float
) -> tuple[float, int]:
    port = harness.free_port()
    env = harness.secrets_env(url)
    secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
    with harness.receiver_process(env, port):
        await harness.wait_ready(port)
        await loadgen.closed_loop(
            port, loadgen.prebuilt(port, secret, harness.onboardings(1_000)), 8, 1
        )
        requests = loadgen.prebuilt(port, secret, harness.onboardings(int(rate * seconds) + 100))
        stop, scraped = asyncio.Event(), [0]
        tasks = [
            asyncio.create_task(_scrape_forever(port, interval, stop, scraped))
            for _ in range(scrapers)
        ]
        end = time.monotonic() + seconds
        answers = await loadgen.open_loop(port, requests, rate, lambda: time.monotonic() >= end)
        stop.set()
        await asyncio.gather(*tasks)
    p99 = harness.percentile(answers.only(200).latencies, 99) * 1000
    return p99, scraped[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--scrapers", type=int, default=64)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    quiet: list[float] = []
    scraped_p99: list[float] = []
    async with harness.fresh_database(harness.server_dsn()) as url:
        for _ in range(args.runs):
            p99, _ = await _run(url, args.rate, args.seconds, 0, args.interval)
            quiet.append(p99)
            p99, scrapes = await _run(url, args.rate, args.seconds, args.scrapers, args.interval)
            scraped_p99.append(p99)
            print(
                f"  no scraper p99 {quiet[-1]:6.2f} ms | {args.scrapers} scrapers p99 "
                f"{p99:6.2f} ms ({scrapes / args.seconds:.0f} scrapes/s)"
            )
    a, b = statistics.median(quiet), statistics.median(scraped_p99)
    print(
        f"webhook p99 at {args.rate:.0f}/s offered: median {a:.2f} ms unscraped, "
        f"{b:.2f} ms scraped by {args.scrapers}: ratio {b / a:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())

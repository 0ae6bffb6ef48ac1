"""Closed-loop throughput of one `receiver serve` process (quick check).

.venv/bin/python -m bench.throughput [--concurrency 32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio

from bench import harness


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    async with harness.fresh_database(harness.server_dsn()) as database_url:
        answers = await harness.onboarding_load(database_url, args.concurrency, args.seconds)
    ran_out = " (requests ran out)" if answers.exhausted else ""
    print(f"{answers.rate:.0f} events/s{ran_out}  {harness.summary_ms(answers.latencies)}")


if __name__ == "__main__":
    asyncio.run(main())

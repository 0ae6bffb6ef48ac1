"""Closed-loop throughput of one `receiver serve` process (quick check).

.venv/bin/python -m bench.throughput [--concurrency 32] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64

from bench import harness, loadgen


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
            warm_up = loadgen.prebuilt(port, secret, harness.onboardings(2_000))
            await loadgen.closed_loop(port, warm_up, 8, 1)
            requests = loadgen.prebuilt(
                port, secret, harness.onboardings(int(args.seconds * 8_000))
            )
            answers = await loadgen.closed_loop(port, requests, args.concurrency, args.seconds)
    answers.only(200)
    ran_out = " (requests ran out)" if answers.exhausted else ""
    print(f"{answers.rate:.0f} events/s{ran_out}  {harness.summary_ms(answers.latencies)}")


if __name__ == "__main__":
    asyncio.run(main())

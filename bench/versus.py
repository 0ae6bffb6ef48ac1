"""The receiver against the lean reference, interleaved (the hot path's yardstick).

    .venv/bin/python -m bench.versus [--runs 3] [--seconds 8] [--concurrency 32]
                                     [--workers 1]

Closed loop, the same prebuilt signed onboardings for both servers, the same
Postgres; runs alternate lean, receiver, lean, ... and the medians are compared.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys

from bench import harness
from bench.run import scenario


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    lean: list[float] = []
    receiver: list[float] = []
    async with harness.fresh_database(harness.server_dsn()) as url:
        env = harness.secrets_env(url)
        secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
        port = harness.free_port()
        serve = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
        serve += ["--workers", str(args.workers)] if args.workers > 1 else []
        for _ in range(args.runs):
            for name, command, rates in (
                ("lean", [sys.executable, "-m", "bench.lean_server", str(port)], lean),
                (f"receiver x{args.workers}", serve, receiver),
            ):
                result = await scenario(
                    name, command, env, port, secret, harness.onboardings,
                    args.concurrency, args.seconds,
                )  # fmt: skip
                rates.append(result.rate)
                print(result.row(), flush=True)
    a, b = statistics.median(lean), statistics.median(receiver)
    print(
        f"median: lean {a:.0f}/s, receiver x{args.workers} {b:.0f}/s: ratio {b / a:.2f}"
        f" (runs: lean {', '.join(f'{r:.0f}' for r in lean)}; receiver "
        f"{', '.join(f'{r:.0f}' for r in receiver)})"
    )


if __name__ == "__main__":
    asyncio.run(main())

"""The receiver against the lean reference, interleaved (the hot path's yardstick).

    .venv/bin/python -m bench.versus [--runs 3] [--seconds 8] [--concurrency 32]
                                     [--workers 1] [--also DIR ...]

Closed loop, the same prebuilt signed onboardings for both servers, the same
Postgres; runs alternate lean, receiver, lean, ... and the medians are compared.

`--also DIR`: another checkout of the receiver (with its own `.venv`, from `make
.venv/.installed` there), measured in the same rotation on a database its own
migrations made: how a change moves the figure, with the noise of the same minutes
(one lever at a time: `git worktree add DIR COMMIT`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

from bench import harness
from bench.run import scenario


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--also", action="append", default=[], type=Path, metavar="DIR")
    args = parser.parse_args()
    dsn = harness.server_dsn()
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(harness.fresh_database(dsn))
        env = harness.secrets_env(url)
        secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
        port = harness.free_port()
        tail = ["serve", "--port", str(port)]
        tail += ["--workers", str(args.workers)] if args.workers > 1 else []
        servers = [
            ("lean", [sys.executable, "-m", "bench.lean_server", str(port)], env),
            (f"receiver x{args.workers}", [sys.executable, "-m", "receiver", *tail], env),
        ]
        for checkout in args.also:
            # `-P`: not this directory first on sys.path, or `-m receiver` would run this
            # checkout's code with the other's interpreter (its own editable install is
            # what must run).
            python = str(checkout.resolve() / ".venv" / "bin" / "python")
            # Its own schema, from its own migrations (an older checkout's functions).
            own = await stack.enter_async_context(harness.fresh_database(dsn, migrate=False))
            own_env = env | {"RECEIVER_DATABASE_URL": own}
            migrating = await asyncio.create_subprocess_exec(
                python, "-P", "-m", "receiver", "migrate", env=own_env, stdout=subprocess.DEVNULL
            )
            if await migrating.wait() != 0:
                raise SystemExit(f"{checkout}: receiver migrate failed")
            servers.append(
                (
                    f"{checkout.name} x{args.workers}",
                    [python, "-P", "-m", "receiver", *tail],
                    own_env,
                )
            )
        rates: dict[str, list[float]] = {name: [] for name, _, _ in servers}
        for _ in range(args.runs):
            for name, command, server_env in servers:
                result = await scenario(
                    name, command, server_env, port, secret, harness.onboardings,
                    args.concurrency, args.seconds,
                )  # fmt: skip
                rates[name].append(result.rate)
                print(result.row(), flush=True)
    lean = statistics.median(rates["lean"])
    for name, runs in rates.items():
        if name == "lean":
            continue
        print(
            f"median: lean {lean:.0f}/s, {name} {statistics.median(runs):.0f}/s: ratio "
            f"{statistics.median(runs) / lean:.2f} (runs: lean "
            f"{', '.join(f'{r:.0f}' for r in rates['lean'])}; {name} "
            f"{', '.join(f'{r:.0f}' for r in runs)})"
        )


if __name__ == "__main__":
    asyncio.run(main())

"""Where Postgres spends its time on the full path: per-function time of the SQL
functions that record events, under a closed-loop load of onboardings.

    .venv/bin/python -m bench.pg_functions [--seconds 5] [--concurrency 32]

Function tracking is switched on for the bench's own database only (ALTER DATABASE,
dropped with it afterwards), so a shared server's settings are left alone.
"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import urlsplit

import asyncpg

from bench import harness


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    async with harness.fresh_database(harness.server_dsn()) as url:
        conn = await asyncpg.connect(url)
        try:
            name = urlsplit(url).path.lstrip("/")
            await conn.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")
            answers = await harness.onboarding_load(
                url,
                args.concurrency,
                args.seconds,
                before=lambda: conn.execute("SELECT pg_stat_reset()"),
            )
            # Backends flush statistics at most once a second, so a few calls from the
            # warm-up may be counted too: figures are per call, not per event sent.
            await asyncio.sleep(1)
            rows = await conn.fetch(
                "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions "
                "WHERE schemaname = 'receiver' ORDER BY self_time DESC"
            )
            # A sequential scan on the hot path's tables is a plan gone wrong.
            scans = await conn.fetch(
                "SELECT relname, seq_scan, idx_scan FROM pg_stat_user_tables "
                "WHERE schemaname = 'receiver' AND relname IN "
                "('events', 'tokens', 'revocations', 'signals') ORDER BY relname"
            )
        finally:
            await conn.close()
    print(f"{len(answers.latencies)} onboardings at {answers.rate:.0f}/s; time per call:")
    for row in rows:
        calls = row["calls"]
        print(
            f"  {row['funcname']:<20} calls {calls:>7}  "
            f"self {row['self_time'] * 1000 / calls:6.1f} µs  "
            f"total {row['total_time'] * 1000 / calls:6.1f} µs"
        )
    print("table scans: " + ", ".join(
        f"{r['relname']} {r['seq_scan']} sequential / {r['idx_scan']} index" for r in scans
    ))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

"""Does retention hurt ingest? Webhook latency at a fixed offered rate on one
`receiver serve` process, alone and while `receiver prune` drops the bodies of old
events past their retention (batches of 500, each its own transaction). Each run
adds `--old` old events, so each prune finds twice that (its own and the quiet
run's before it).
Interleaved runs; medians printed with the ratio, and the prune's own rate.

    .venv/bin/python -m bench.prune [--rate 500] [--seconds 5] [--old 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import time

import asyncpg

from bench import harness, loadgen

# Old deliveries as the receiver stores them (a well-formed sealed header, then
# ~1 KB), 40 days old: past the default 30-day retention of bodies.
_SEED = """
INSERT INTO receiver.events (key, type, status, client_id, is_test, received_at,
                             body_sealed, body_redacted)
SELECT 'evt_old_' || $1::text || '_' || g, 'client.onboarding_completed', 'processed',
       'cli_' || g, false, now() - interval '40 days',
       '\\x01026b31'::bytea || decode(repeat('ab', 1000), 'hex'),
       jsonb_build_object('id', 'evt_old_' || g,
                          'data', jsonb_build_object('client_id', 'cli_' || g))
  FROM generate_series(1, $2) g
"""


async def _seed(url: str, run: str, count: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_SEED, run, count)
        await conn.execute("VACUUM ANALYZE receiver.events")
    finally:
        await conn.close()


async def _prune(env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "receiver", "prune", "--json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await process.communicate()
    return time.monotonic() - started, out.decode().strip()


async def _run(
    url: str, rate: float, seconds: float, old: int, run: str, prune: bool
) -> tuple[float, float, str]:
    port = harness.free_port()
    env = harness.secrets_env(url, RECEIVER_PRUNE_INTERVAL_SECONDS="0")
    secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
    with harness.receiver_process(env, port):
        await harness.wait_ready(port)
        await _seed(url, run, old)
        await loadgen.closed_loop(
            port, loadgen.prebuilt(port, secret, harness.onboardings(1_000)), 8, 1
        )
        requests = loadgen.prebuilt(port, secret, harness.onboardings(int(rate * seconds) + 100))
        end = time.monotonic() + seconds
        pruning = asyncio.create_task(_prune(env)) if prune else None
        answers = await loadgen.open_loop(port, requests, rate, lambda: time.monotonic() >= end)
        took, report = await pruning if pruning is not None else (0.0, "")
    p99 = harness.percentile(answers.only(200).latencies, 99) * 1000
    return p99, took, report


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--old", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    quiet: list[float] = []
    pruned: list[float] = []
    async with harness.fresh_database(harness.server_dsn()) as url:
        for n in range(args.runs):
            p99, _, _ = await _run(url, args.rate, args.seconds, args.old, f"q{n}", prune=False)
            quiet.append(p99)
            p99, took, report = await _run(
                url, args.rate, args.seconds, args.old, f"p{n}", prune=True
            )
            pruned.append(p99)
            print(
                f"  no prune p99 {quiet[-1]:6.2f} ms | while pruning p99 {p99:6.2f} ms; "
                f"prune {report} in {took:.1f} s"
            )
    a, b = statistics.median(quiet), statistics.median(pruned)
    print(
        f"webhook p99 at {args.rate:.0f}/s offered: median {a:.2f} ms alone, {b:.2f} ms while "
        f"pruning {2 * args.old:,} old bodies: ratio {b / a:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())

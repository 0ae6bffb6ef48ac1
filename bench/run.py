"""The benchmark: the receiver against this machine's own ceilings, in one run.

    .venv/bin/python -m bench.run [--concurrency 32] [--seconds 10] [--memory-events 100000]

At the same concurrency, with the same load generator:
  1. HTTP ceiling: a bare aiohttp handler that reads the body and answers 200;
  2. database ceiling: single-row INSERT commits from asyncpg (no HTTP);
  L. the lean reference receiver (bench/lean_server.py: HMAC, pydantic, AES-GCM, one
     INSERT, uvloop), the yardstick of the hot path;
  3. the receiver's full path: signed client.onboarding_completed events;
  4. the same with 10% token.revoked mixed in (signals and NOTIFY on the path);
  5. the full path with two `receiver serve` processes sharing the port.
Then: 200-to-cache-signal latency idle and at 1,000 events/s offered, and the
receiver's resident memory after --memory-events events. Loopback only; every
load is bounded in time. Set RECEIVER_BENCH_DATABASE_URL to use an existing
Postgres instead of an embedded one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import asyncpg
import psutil

from bench import harness, loadgen, signal_latency


@dataclass
class Result:
    """One scenario's figures."""

    name: str
    rate: float
    latencies: list[float]
    server_cpu: float | None = None
    postgres_cpu: float | None = None
    generator_cpu: float | None = None
    # Events per commit group, mean over the process's life (warm-up included); None
    # for a server that does not count them (the lean reference, the ceilings).
    group_size: float | None = None

    def row(self) -> str:
        """One table line of this scenario's figures."""
        p50 = harness.percentile(self.latencies, 50) * 1000
        p99 = harness.percentile(self.latencies, 99) * 1000
        group = f"  group {self.group_size:5.1f}" if self.group_size is not None else ""
        return (
            f"{self.name:<44} {self.rate:8.0f}/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
            f"  server {cpu(self.server_cpu)}  postgres {cpu(self.postgres_cpu)}"
            f"  load generator {cpu(self.generator_cpu)}{group}"
        )


class CpuMeter:
    """CPU used by a set of processes (and their children) over an interval, in %
    of one core."""

    def __init__(self, pids: list[int], *, children: bool = True) -> None:
        self._procs = []
        for pid in pids:
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
            self._procs += [proc, *(proc.children(recursive=True) if children else [])]
        self._start = self._total()
        self._t0 = time.monotonic()

    def _total(self) -> float:
        total = 0.0
        for proc in self._procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def percent(self) -> float:
        return 100 * (self._total() - self._start) / (time.monotonic() - self._t0)


def postgres_pids() -> list[int]:
    """Every Postgres server process on this machine (the bench's own and the shared
    one: whichever serves the run is busy, the other idle)."""
    return [
        p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postmaster")
    ]


# Requests are built before each load starts, up to this many per second of load; a
# load that uses them all up ends early and is measured over the time it ran.
BUDGET_PER_SECOND = {"ceiling": 25_000, "receiver": 8_000}


async def warm_up(
    port: int, secret: bytes, bodies: Callable[[int], list[bytes]], concurrency: int
) -> None:
    """One second of closed-loop load: pooled connections opened, statements prepared."""
    requests = loadgen.prebuilt(port, secret, bodies(BUDGET_PER_SECOND["receiver"]))
    (await loadgen.closed_loop(port, requests, concurrency, 1.0)).only(200)


def mixed(count: int) -> list[bytes]:
    """Onboardings of new clients, every tenth event a revocation instead."""
    clients = [f"cli_{uuid.uuid4().hex[:12]}" for _ in range(count)]
    return [
        harness.revocation(c) if n % 10 == 9 else harness.onboarding(c)
        for n, c in enumerate(clients)
    ]


async def database_ceiling(dsn: str, concurrency: int, seconds: float) -> Result:
    """Single-row INSERT commits (one round trip each), `concurrency` at a time."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=concurrency,
        max_size=concurrency,
        server_settings={"synchronous_commit": "on"},
    )
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_ceiling (id uuid PRIMARY KEY, body bytea)")
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    meter = CpuMeter(postgres_pids())

    async def writer() -> None:
        async with pool.acquire() as conn:
            while time.monotonic() < deadline:
                started = time.monotonic()
                await conn.execute(
                    "INSERT INTO bench_ceiling VALUES ($1, $2)", uuid.uuid4(), os.urandom(200)
                )
                latencies.append(time.monotonic() - started)

    started = time.monotonic()
    await asyncio.gather(*(writer() for _ in range(concurrency)))
    rate = len(latencies) / (time.monotonic() - started)
    pg_cpu = meter.percent()
    await pool.close()
    return Result("2. database ceiling (INSERT commit)", rate, latencies, None, pg_cpu)


async def scenario(
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    secret: bytes,
    bodies: Callable[[int], list[bytes]],
    concurrency: int,
    seconds: float,
    budget: str = "receiver",
) -> Result:
    """Start a server, warm it up, measure one closed-loop load with CPU."""
    with harness.receiver_process(env, port, command) as process:
        await harness.wait_ready(port)
        await warm_up(port, secret, bodies, concurrency)
        requests = loadgen.prebuilt(port, secret, bodies(int(seconds * BUDGET_PER_SECOND[budget])))
        server = CpuMeter([process.pid])
        postgres = CpuMeter(postgres_pids())
        generator = CpuMeter([os.getpid()], children=False)
        answers = (await loadgen.closed_loop(port, requests, concurrency, seconds)).only(200)
        name += " (requests ran out)" if answers.exhausted else ""
        return Result(
            name,
            answers.rate,
            answers.latencies,
            server.percent(),
            postgres.percent(),
            generator.percent(),
            await group_size(port),
        )


async def group_size(port: int) -> float | None:
    """The mean commit group size a receiver's /metrics reports (None: no such metric)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text() if response.status == 200 else ""
        except aiohttp.ClientError:
            return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("receiver_commit_group_size_sum", "receiver_commit_group_size_count"):
            values[name] = float(value)
    count = values.get("receiver_commit_group_size_count")
    return values["receiver_commit_group_size_sum"] / count if count else None


async def open_loop_latency(
    command: list[str],
    env: dict[str, str],
    port: int,
    secret: bytes,
    *,
    rate: float,
    seconds: float,
) -> str:
    """Latency of the full path when events arrive at a fixed rate, as Debitura sends."""
    with harness.receiver_process(env, port, command):
        await harness.wait_ready(port)
        await warm_up(port, secret, harness.onboardings, 8)  # the steady state, as above
        requests = loadgen.prebuilt(port, secret, harness.onboardings(int(rate * seconds) + 1))
        deadline = time.monotonic() + seconds
        answers = await loadgen.open_loop(
            port, requests, rate, lambda: time.monotonic() >= deadline
        )
        # Past its capacity the receiver sheds load with 503 (RECEIVER_MAX_REQUESTS_IN_
        # FLIGHT): reported, not fatal, since that is the figure this line is for.
        refused = {s: n for s, n in answers.statuses.items() if s != 200}
        if set(refused) - {503}:
            answers.only(200)
        shed = f", {refused[503]:,} answered 503 (over capacity)" if refused else ""
        return f"{answers.rate:.0f}/s answered, {harness.summary_ms(answers.latencies)}{shed}"


async def resident_memory(env: dict[str, str], port: int, secret: bytes, events: int) -> float:
    """RSS of one receiver process (MiB) after `events` onboardings."""
    with harness.receiver_process(env, port) as process:
        await harness.wait_ready(port)
        sent = 0
        while sent < events:
            chunk = min(20_000, events - sent)
            requests = loadgen.prebuilt(port, secret, harness.onboardings(chunk))
            answers = await loadgen.closed_loop(port, requests, 32, float("inf"))
            sent += len(answers.only(200).latencies)
        return float(psutil.Process(process.pid).memory_info().rss) / 2**20


async def main() -> None:
    parser = argparse.ArgumentParser(description="receiver benchmark")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--memory-events", type=int, default=100_000)
    args = parser.parse_args()
    c, s = args.concurrency, args.seconds
    results: list[Result] = []
    dsn = harness.server_dsn()
    async with harness.fresh_database(dsn) as url:
        env = harness.secrets_env(url)
        secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
        port = harness.free_port()
        serve = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
        results.append(
            await scenario(
                "1. HTTP ceiling (bare aiohttp handler)",
                [sys.executable, "-m", "bench.bare_server", str(port)],
                env,
                port,
                secret,
                harness.onboardings,
                c,
                s,
                budget="ceiling",
            )
        )
        results.append(await database_ceiling(url, c, s))
        results.append(
            await scenario(
                "L. lean reference (bench/lean_server.py)",
                [sys.executable, "-m", "bench.lean_server", str(port)],
                env,
                port,
                secret,
                harness.onboardings,
                c,
                s,
            )
        )
        results.append(
            await scenario(
                "3. receiver: onboardings", serve, env, port, secret, harness.onboardings, c, s
            )
        )
        results.append(
            await scenario("4. receiver: 10% revocations", serve, env, port, secret, mixed, c, s)
        )
        results.append(
            await scenario(
                "5. receiver: onboardings, 2 processes",
                [*serve, "--workers", "2"],
                env,
                port,
                secret,
                harness.onboardings,
                c,
                s,
            )
        )
        await harness.recycle_wal(url)  # the closed loops above used up the reused segments
        offered = {
            rate: await open_loop_latency(serve, env, port, secret, rate=rate, seconds=s)
            for rate in (1000.0, 2000.0)
        }
        memory = (
            await resident_memory(env, port, secret, args.memory_events)
            if args.memory_events
            else None
        )

    print(
        f"\nconcurrency {c}, {s:.0f} s per scenario, {os.cpu_count()} cores,"
        " load generator in this process (prebuilt requests, raw keep-alive HTTP/1.1)"
    )
    for result in results:
        print(result.row())
    http, database, lean, full, _, two_proc = results
    print(
        f"ratios: full path / lean reference = {full.rate / lean.rate:.2f} (target 0.7); "
        f"full path / HTTP ceiling = {full.rate / http.rate:.2f}; "
        f"full path / database ceiling = {full.rate / database.rate:.2f}; "
        f"two processes / one = {two_proc.rate / full.rate:.2f} (target 1.5)"
    )
    for rate, figures in offered.items():
        target = "< 10 ms" if rate == 1000 else "< 20 ms"
        print(
            f"receiver at {rate:,.0f} events/s offered (open loop, p99 target {target}): {figures}"
        )
    if memory is not None:
        print(
            f"resident memory of one receiver after {args.memory_events:,} events: {memory:.0f} MiB"
        )
    print("\nsignal latency:")
    sys.argv = [sys.argv[0], "--samples", "200", "--load-rate", "1000"]
    await signal_latency.main()


def cpu(value: float | None) -> str:
    """A CPU share for the table, or a dash when it was not measured."""
    return f"{value:5.0f}%" if value is not None else "    - "


if __name__ == "__main__":
    asyncio.run(main())

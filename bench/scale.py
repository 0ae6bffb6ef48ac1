"""Flat at a million clients? Each operator path and the /metrics gauge refresh timed
on a small database and on one with `--clients` N clients, interleaved, with the
plan of each hot statement (a sequential scan on tokens or events is flagged).

The databases are filled once and kept (bench/scale_data.py; `--database` names the
big one on the server of `--database-url`, `--refill` starts them over).

    .venv/bin/python -m bench.scale --clients 1000000 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres

Each trial does the same work at both sizes (one client erased; prune over rows the
trial itself made due), so a flat path shows a ratio near 1; the due listing's set
grows with N, so it is compared per row, and its Python memory peak.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from bench import scale_data
from bench.scale_data import KEY_IDS, RARE_TYPE, keyring, settings_for
from receiver import log, vault

# The hot statements, each with arguments for its plan (prepared, executed six times
# so Postgres may switch to its generic plan, then explained as the service runs it).
# `{client}` and `{primary}` are filled per database.
_PLANNED: dict[str, tuple[Any, ...]] = {
    "token_health": (),
    "tokens_due_rotation": (
        timedelta(days=90),
        ["live", "test"],
        500,
        datetime(1, 1, 1, tzinfo=UTC),
        "",
        "",
    ),
    "prune_counts": (30 * 86400.0, 30 * 86400.0, 7 * 86400.0),
    "prune_event_bodies": (30 * 86400.0, 500),
    "prune_token_values": (30 * 86400.0, 500),
    "erase_client_bodies": ("{client}", 500),
    "erase_pending": ("{client}", ["evt_none"]),
    "erase_bodies": ("{client}", ["evt_none"]),
    "erase_named_bodies": (4242, "{client}"),
    "erase_unnamed_bodies": ("", "{client}", 500),
    "rotation_tokens_sweep": (list(KEY_IDS), list(range(500)), []),
    "rotation_events_sweep": (list(KEY_IDS), list(range(500)), []),
    "rotation_store_tokens": ([(0, 1)], [b"x"], [b"y"]),
    "rotation_store_events": ([(0, 1)], [b"x"], [b"y"]),
    "sealed_to_rotate_counts": ("{primary}",),
    "token_inventory_of_client": ("{client}", None, None, None, 100),
    "list_events_of_type": (None, None, RARE_TYPE, 50),
}
# Run through Database.fetch_count (no sequential scan, one core, no JIT).
_COUNTED = frozenset({"prune_counts"})
# What a sequential scan may not touch.
_BIG_TABLES = ("tokens", "events")


@dataclass
class Db:
    """One of the two databases under measurement."""

    label: str
    url: str
    clients: int
    database: Any = None
    # Each run erases other clients than the runs before it (an erased one is a no-op).
    next_client: int = field(default_factory=lambda: random.randrange(1_000_000))
    trial: int = 0

    async def primary(self) -> str:
        conn = await asyncpg.connect(self.url)
        try:
            kid = await conn.fetchval(
                "SELECT receiver.sealed_key_id(token_sealed) FROM receiver.tokens"
                " WHERE token_sealed IS NOT NULL LIMIT 1"
            )
        finally:
            await conn.close()
        return str(kid)


async def plans(target: Db) -> dict[str, list[str]]:
    """Each hot statement's seq scans on tokens or events, in its custom plan and in
    its generic one (what a prepared statement may switch to after five runs)."""
    from receiver import db

    primary = await target.primary()
    found: dict[str, list[str]] = {}
    conn = await asyncpg.connect(target.url, server_settings={"jit": "off"})
    try:
        for name, raw_args in _PLANNED.items():
            if name not in db.QUERIES:
                continue
            args = [
                (a.format(client=f"cli_{target.clients // 2:07d}", primary=primary)
                 if isinstance(a, str) else a)
                for a in raw_args
            ]  # fmt: skip
            scans = set()
            # As the service runs it: the operator counts through Database.fetch_count.
            await conn.execute(
                "SET enable_seqscan = off" if name in _COUNTED else "RESET enable_seqscan"
            )
            for mode in ("auto", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                statement = await conn.prepare(db.QUERIES[name])
                plan = await statement.explain(*args)
                scans |= {f"{table} ({'generic' if 'generic' in mode else 'custom'})"
                          for table in _seq_scans(plan)}  # fmt: skip
            found[name] = sorted(scans)
    finally:
        await conn.close()
    return found


def _seq_scans(plan: Any) -> set[str]:
    scans: set[str] = set()
    stack = [plan[0]["Plan"]] if isinstance(plan, list) else [plan["Plan"]]
    while stack:
        node = stack.pop()
        if node.get("Node Type") == "Seq Scan" and node.get("Relation Name") in _BIG_TABLES:
            scans.add(node["Relation Name"])
        stack.extend(node.get("Plans", []))
    return scans


Measure = Callable[[Db], Awaitable[tuple[float, dict[str, float]]]]


async def _timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return time.perf_counter() - started, result


async def gauges(target: Db) -> tuple[float, dict[str, float]]:
    """One refresh of /metrics' database gauges, and whether they came up."""
    from receiver.service import scrape

    refresher = scrape.DatabaseGauges(await target.primary(), refresh_seconds=0)
    seconds, families = await _timed(lambda: refresher.families(target.database))
    up = next(f for f in families if f.name == "receiver_database_gauges_up")
    return seconds, {"gauges_up": up.samples[0].value}


async def erase(target: Db) -> tuple[float, dict[str, float]]:
    """`clients erase` of one client (a different one each trial)."""
    from receiver.lifecycle import audit, erasure

    n = (target.next_client * 7919) % target.clients
    target.next_client += 1
    settings = settings_for(target.url, await target.primary())
    sealer = vault.Sealer.from_settings(settings)
    seconds, done = await _timed(
        lambda: erasure.erase_client(
            target.database, settings, sealer, f"cli_{n:07d}", audit.Actor("bench")
        )
    )
    return seconds, {"bodies": float(done.bodies)}


async def _make_prunable(target: Db, count: int) -> None:
    """`count` old bodies and `count` // 2 expired token values, the same at any size."""
    target.trial += 1
    tag = f"{target.trial}_{uuid.uuid4().hex[:6]}"
    keys = keyring(await target.primary())
    long_ago = datetime.now(UTC) - timedelta(days=45)
    evts: list[tuple[Any, ...]] = []
    tokens: list[tuple[Any, ...]] = []
    filler = scale_data.Filler(
        scale_data.Shape(target.clients), keys, datetime.now(UTC), seed=uuid.uuid4().int
    )
    for i in range(count):
        client_id = f"prune_{tag}_{i}"
        evts.append(
            filler.event(
                "client.onboarding_completed", "processed", client_id, False, long_ago,
                {"client_id": client_id}, keep=True,
            )
        )  # fmt: skip
        if i % 2 == 0:
            filler.token_row(
                tokens, uuid.uuid4(), client_id, "live",
                scale_data.new_token("live", filler.rng), long_ago, evts[-1][0],
                status="superseded", ended=long_ago, keep=True,
            )  # fmt: skip
    conn = await asyncpg.connect(target.url)
    try:
        await conn.copy_records_to_table(
            "events", schema_name="receiver", records=evts, columns=scale_data.EVENT_COLUMNS
        )
        await conn.copy_records_to_table(
            "tokens", schema_name="receiver", records=tokens, columns=scale_data.TOKEN_COLUMNS
        )
    finally:
        await conn.close()


async def prune_dry(target: Db) -> tuple[float, dict[str, float]]:
    """`prune --dry-run` over a fixed number of due rows."""
    from receiver.lifecycle import retention

    await _make_prunable(target, 2000)
    settings = settings_for(target.url, await target.primary())
    seconds, report = await _timed(lambda: retention.prune(target.database, settings, dry_run=True))
    return seconds, {"due": float(report.event_bodies + report.token_values)}


async def prune(target: Db) -> tuple[float, dict[str, float]]:
    """`prune`: drops what `prune_dry` counted (and the fixed rows of this trial)."""
    from receiver.lifecycle import retention

    await _make_prunable(target, 2000)
    settings = settings_for(target.url, await target.primary())
    seconds, report = await _timed(lambda: retention.prune(target.database, settings))
    return seconds, {"rows": float(report.event_bodies + report.token_values)}


async def due_dry(target: Db) -> tuple[float, dict[str, float]]:
    """`tokens rotate --due --dry-run`'s listing: time, rows, peak Python memory."""
    import tracemalloc

    from receiver.debitura import api, rotation

    settings = settings_for(target.url, await target.primary())
    rows = 0

    async def listing() -> None:
        nonlocal rows
        async with aiohttp.ClientSession() as session:
            sealer = vault.Sealer.from_settings(settings)
            rotator = rotation.Rotator(
                target.database, settings, sealer, api.Api(session, settings)
            )
            async for page in rotator.due_pages():
                rows += len(page)

    tracemalloc.start()
    try:
        seconds, _ = await _timed(listing)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return seconds, {
        "rows": float(rows),
        "peak_mb": peak / 1e6,
        "us_per_row": seconds / max(rows, 1) * 1e6,
    }


def _fetcher(query: str, *args: Any) -> Measure:
    async def run(target: Db) -> tuple[float, dict[str, float]]:
        values = [
            a.format(client=f"cli_{target.clients // 5:07d}")
            if isinstance(a, str) and "{" in a
            else a
            for a in args
        ]
        # The seventh run: past the five after which Postgres may plan generically.
        for _ in range(6):
            await target.database.fetch(query, *values)
        seconds, rows = await _timed(lambda: target.database.fetch(query, *values))
        return seconds, {"rows": float(len(rows))}

    return run


async def keys_rotate(target: Db) -> tuple[float, dict[str, float]]:
    """Two `keys rotate` runs back to back (each to a new primary): rows/s of each."""
    from receiver.admin import rekey
    from receiver.lifecycle import audit

    extra: dict[str, float] = {}
    total = 0.0
    for run in ("first", "second"):
        current = await target.primary()
        primary = KEY_IDS[(KEY_IDS.index(current) + 1) % len(KEY_IDS)]
        started = time.perf_counter()
        report = await rekey.rotate(target.database, keyring(primary), actor=audit.Actor("bench"))
        seconds = time.perf_counter() - started
        rows = sum(report.rotated.values())
        extra[f"{run}_rows_per_s"] = rows / seconds
        total += seconds
    return total, extra


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _keys_env(url: str, primary: str) -> dict[str, str]:
    """An environment for a `receiver` process naming every bench key, `primary` first."""
    from bench import harness

    settings = settings_for(url, primary)
    return harness.secrets_env(
        url,
        RECEIVER_TOKEN_KEYS=",".join(
            f"{kid}:{base64.b64encode(key.get_secret_value()).decode()}"
            for kid, key in settings.token_keys
        ),
        RECEIVER_INDEX_KEY=base64.b64encode(settings.index_key.get_secret_value()).decode(),
        RECEIVER_PRUNE_INTERVAL_SECONDS="0",
    )


async def intake_while_rotating(
    target: Db,
    rate: float = 500,
    seconds: float = 5,
    rotate_args: tuple[str, ...] = (),
    pairs: int = 3,
) -> tuple[float, dict[str, float]]:
    """Webhook p99 at `rate` onboardings/s offered (open loop, one `receiver serve`),
    idle, then while `receiver keys rotate` runs in its own process with its defaults,
    as an operator runs it (stopped after the window with SIGINT: its batch in flight
    rolls back, and every key stays in the ring); `pairs` such pairs, each rotation to
    the next key, and the medians (a 5 s window's p99 is the 25th slowest of 2,500: one
    pair alone moved 0.85x-1.45x between runs). The rotation ran in this process
    before: its sealing held up the load generator's own loop, and its delays counted
    as intake's."""
    from bench import harness, loadgen

    current = await target.primary()
    env = _keys_env(target.url, current)
    secret = base64.b64decode(env["RECEIVER_WEBHOOK_SECRETS"])
    port = harness.free_port()
    p99: dict[str, list[float]] = {"idle": [], "rotating": []}
    throughout = 1.0
    primary = current
    with harness.receiver_process(env, port):
        await harness.wait_ready(port)
        await loadgen.closed_loop(
            port, loadgen.prebuilt(port, secret, harness.onboardings(500)), 8, 1
        )
        for window in ("idle", "rotating") * pairs:
            rotating = None
            if window == "rotating":
                primary = KEY_IDS[(KEY_IDS.index(primary) + 1) % len(KEY_IDS)]
                rotating = subprocess.Popen(
                    [sys.executable, "-m", "receiver", "keys", "rotate", *rotate_args],
                    env=_keys_env(target.url, primary),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    # SIGINT as at a terminal, even where this bench was started in the
                    # background (which ignores it, and a child inherits that).
                    preexec_fn=_interruptible,
                )
                await asyncio.sleep(1)  # under way before the window opens
            bodies = harness.onboardings(int(rate * seconds) + 100)
            deadline = time.monotonic() + seconds

            def over(deadline: float = deadline) -> bool:
                return time.monotonic() >= deadline

            answers = await loadgen.open_loop(
                port, loadgen.prebuilt(port, secret, bodies), rate, over
            )
            p99[window].append(harness.percentile(answers.only(200).latencies, 99))
            if rotating is not None:
                # 0: a rotation ended inside its window (a small database's may).
                throughout = min(throughout, float(rotating.poll() is None))
                rotating.send_signal(signal.SIGINT)
                await asyncio.to_thread(rotating.wait, 60)
    ratios = [r / i for i, r in zip(p99["idle"], p99["rotating"], strict=True)]
    return statistics.median(p99["rotating"]), {
        "idle_p99_ms": statistics.median(p99["idle"]) * 1000,
        "ratio_to_idle": statistics.median(ratios),
        "worst_ratio": max(ratios),
        "rotating_throughout": throughout,
    }


OPERATIONS: dict[str, Measure] = {
    "/metrics gauge refresh": gauges,
    "clients erase (one)": erase,
    "prune --dry-run": prune_dry,
    "prune (6,000 due)": prune,
    "tokens rotate --due --dry-run": due_dry,
    "tokens list --client": _fetcher(
        "token_inventory_of_client", "{client}", None, None, None, 100
    ),
    "events list --type (rare)": _fetcher("list_events_of_type", None, None, RARE_TYPE, 50),
}


async def measure(small: Db, big: Db, runs: int, only: list[str] | None) -> None:
    """Each operation (`only`: those whose name holds one of these) on both databases,
    interleaved, `runs` times; `keys rotate` once each, last; then the table."""
    from receiver import db

    for target in (small, big):
        target.database = await db.Database.open(target.url)
    results: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
    try:
        for _ in range(runs):
            for name, op in OPERATIONS.items():
                if only is not None and not any(part in name for part in only):
                    continue
                for target in (small, big):
                    results.setdefault((name, target.label), []).append(await op(target))
        if only is None or any(part in "intake p99 while keys rotate" for part in only):
            for target in (small, big):
                label = "intake p99 while keys rotate"
                results[(label, target.label)] = [await intake_while_rotating(target)]
        if only is None or any(part in "keys rotate" for part in only):
            for target in (small, big):
                results[("keys rotate (x2)", target.label)] = [await keys_rotate(target)]
    finally:
        for target in (small, big):
            await target.database.close()
    _table(results, small, big)
    for target in (small, big):
        print(f"\nplans at {target.label} ({target.clients:,} clients):")
        for name, scans in (await plans(target)).items():
            flag = f"SEQ SCAN on {', '.join(scans)}" if scans else "index only/index-backed"
            print(f"  {name:<26} {flag}")


def _table(
    results: dict[tuple[str, str], list[tuple[float, dict[str, float]]]], small: Db, big: Db
) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    print(
        f"\n{'operation':<32} {'small ms':>10} {'big ms':>10} {'ratio':>7}"
        "  notes (median; small | big)"
    )
    for name in names:
        a = results[(name, small.label)]
        b = results[(name, big.label)]
        ms_a = statistics.median(s for s, _ in a) * 1000
        ms_b = statistics.median(s for s, _ in b) * 1000
        notes = []
        for key in a[0][1]:
            va = statistics.median(e[key] for _, e in a)
            vb = statistics.median(e[key] for _, e in b)
            notes.append(f"{key} {va:,.1f} | {vb:,.1f}")
        print(f"{name:<32} {ms_a:>10.1f} {ms_b:>10.1f} {ms_b / ms_a:>6.2f}x  {'; '.join(notes)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000, help="clients in the small database")
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="the server (any database on it); the bench databases are made there",
    )
    parser.add_argument("--database", help="the big database's name (default receiver_scale_<N>)")
    parser.add_argument("--refill", action="store_true", help="drop and fill the databases again")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--only",
        help="comma-separated parts of operation names to run (e.g. 'keys rotate,erase')",
    )
    args = parser.parse_args()
    log.configure(level="error")  # a line per rotation batch would drown the table
    started = time.monotonic()
    small_url = await scale_data.ensure_filled(
        args.database_url, f"receiver_scale_{args.small}", args.small, refill=args.refill
    )
    big_url = await scale_data.ensure_filled(
        args.database_url,
        args.database or f"receiver_scale_{args.clients}",
        args.clients,
        refill=args.refill,
    )
    print(f"databases ready in {time.monotonic() - started:.0f} s")
    await measure(
        Db(f"{args.small:,}", small_url, args.small),
        Db(f"{args.clients:,}", big_url, args.clients),
        args.runs,
        args.only.split(",") if args.only else None,
    )


if __name__ == "__main__":
    asyncio.run(main())

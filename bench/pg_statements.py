"""Where Postgres spends a group's time, statement by statement: auto_explain (with
ANALYZE, nested statements) over groups of new-client onboardings recorded through
the lifecycle's one way in (`store.record_rows`), as the group committer sends them.

    .venv/bin/python -m bench.pg_statements [--groups 60] [--size 32] [--drop INDEX ...]

Prints, for each statement inside record_events_v5 and apply_group_v1, its share of
the summed statement time and its mean time per event, and the mean time per event
of the whole call (`record_events` as the client sees it, one round trip, no
commit). `--drop` drops indexes first (what each costs the hot path). auto_explain
is loaded into the bench's own session only (LOAD; superuser), and its lines come
back to the client as notices, so a shared server's log and settings are left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import re
import secrets
import statistics
import time

import asyncpg

from bench import harness
from receiver import config, vault
from receiver.lifecycle import events, rows, store

_QUERY = re.compile(r"Query Text: (.*?)\n(.*)", re.S)
_TIME = re.compile(r"actual time=[\d.]+\.\.([\d.]+) rows=\d+ loops=(\d+)")


def _sealer(url: str) -> vault.Sealer:
    settings = config.load_settings(
        database_url=url,
        webhook_secrets=base64.b64encode(secrets.token_bytes(32)).decode(),
        token_keys="k1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        index_key=base64.b64encode(secrets.token_bytes(32)).decode(),
    )
    return vault.Sealer.from_settings(settings)


def _group(sealer: vault.Sealer, size: int) -> list[rows.Row]:
    made = []
    for body in harness.onboardings(size):
        event = events.read(body, is_test=False)
        arrival = rows.Arrival(body=body, is_test=False, test_header=False, signature=None)
        made.append(rows.prepare(sealer, event, arrival))
    return made


def _label(query: str) -> str:
    text = " ".join(query.split())
    for word in ("INSERT INTO receiver.", "UPDATE receiver.", "SELECT", "WITH"):
        if word in text:
            start = text.index(word)
            return text[start : start + 90]
    return text[:90]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=60)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--drop", nargs="*", default=[], help="indexes to drop first")
    parser.add_argument("--set", nargs="*", default=[], help="session settings, NAME=VALUE")
    args = parser.parse_args()
    async with harness.fresh_database(harness.server_dsn()) as url:
        sealer = _sealer(url)
        conn = await asyncpg.connect(url)
        try:
            for index in args.drop:
                await conn.execute(f"DROP INDEX receiver.{index}")
            for setting in args.set:
                name, _, value = setting.partition("=")
                await conn.execute("SELECT set_config($1, $2, false)", name, value)
            plans: list[str] = []
            conn.add_log_listener(lambda _, message: plans.append(message.message))
            # Warm-up: plans cached, tables past their first pages.
            for _ in range(10):
                await store.record_rows(
                    conn, sealer, _group(sealer, args.size), channel="bench", http_delivery=False
                )
            walls = []
            await conn.execute(
                "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                " SET auto_explain.log_analyze = on; SET auto_explain.log_nested_statements = on;"
                " SET auto_explain.log_timing = on; SET client_min_messages = log"
            )
            explained: collections.defaultdict[str, float] = collections.defaultdict(float)
            jit = 0
            for _ in range(args.groups):
                group = _group(sealer, args.size)
                plans.clear()
                async with conn.transaction():
                    await store.record_rows(
                        conn, sealer, group, channel="bench", http_delivery=False
                    )
                for plan in plans:
                    found = _QUERY.search(plan)
                    if found is None:
                        continue
                    query, rest = found.groups()
                    jit += "JIT:" in rest
                    top = _TIME.search(rest)
                    if top is not None:
                        explained[_label(query)] += float(top.group(1)) * int(top.group(2))
            await conn.execute("SET auto_explain.log_min_duration = -1")
            for _ in range(args.groups):
                group = _group(sealer, args.size)
                started = time.perf_counter()
                async with conn.transaction():
                    await store.record_rows(
                        conn, sealer, group, channel="bench", http_delivery=False
                    )
                walls.append(time.perf_counter() - started)
        finally:
            await conn.close()
    events_count = args.groups * args.size
    print(
        f"{args.groups} groups of {args.size} new onboardings"
        + (f", without {', '.join(args.drop)}" if args.drop else "")
        + f": {statistics.median(walls) * 1e6 / args.size:.1f} µs per event"
        " (median group, call and commit, auto_explain off)"
    )
    if jit:
        print(f"  JIT compiled {jit} statement runs: a cost estimate past jit_above_cost")
    total = sum(explained.values())
    for label, ms in sorted(explained.items(), key=lambda item: -item[1])[:25]:
        print(f"  {ms / total:6.1%}  {ms * 1000 / events_count:7.1f} µs/event  {label}")


if __name__ == "__main__":
    asyncio.run(main())

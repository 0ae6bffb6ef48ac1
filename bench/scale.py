"""Flat at a million clients? Each operator path and the /metrics gauge refresh timed
on a small database and on one with `--clients` N clients, interleaved, with the
plan of each hot statement (a sequential scan on tokens or events is flagged).

The big database is filled once and kept (`--database` names it on the server of
`--database-url`; a filled one is reused, `--refill` starts it over): N clients, one
sealed token each (sealed by the service's own `receiver.vault`), half live and half
test, 10% with a superseded or revoked older token; about 3N events over 120 days in
the shapes the service writes (onboardings, revocations, ignored types, a few
quarantined), the last 30 days still holding their sealed bodies. Rows go in with
COPY; the secondary indexes are dropped for the fill and built again after it.

    .venv/bin/python -m bench.scale --clients 1000000 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres

Every trial does the same work at both sizes (one client erased; prune and the dry
listing over rows the trial itself made due), so a flat path shows a ratio near 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from receiver import config, log, vault
from receiver.db import migrations
from receiver.lifecycle import events as event_shapes

# Key material derived from fixed names: the filled database is reused across runs,
# and each run must open what an earlier one sealed (and rotated). Bench data only.
KEY_IDS = tuple(f"s{n}" for n in range(1, 10))
DAYS = 120
BODY_DAYS = 30  # retain_event_bodies_days' default: older events hold no body
CHUNK = 20_000
RARE_TYPE = "client.merged"
_FILLER_TYPES = ("referral.created", "referral.converted", "commission.paid", "client.updated")
_TOKEN_COLUMNS = (
    "id", "client_id", "environment", "prefix", "token_index", "token_sealed", "status",
    "onboarding_completed_at", "stored_at", "superseded_at", "revoked_at", "revoke_reason",
    "created_by_event", "changed_by_event", "updated_at", "expires_at", "value_dropped_at",
)  # fmt: skip
_EVENT_COLUMNS = (
    "key", "type", "status", "client_id", "is_test", "occurred_at", "received_at",
    "body_sealed", "body_redacted", "envelope_id", "body_hash", "quarantine_reason",
    "quarantine_detail", "body_dropped_at",
)  # fmt: skip


def _material(kid: str) -> bytes:
    return hashlib.sha256(f"bench.scale {kid}".encode()).digest()


def keyring(primary: str) -> vault.Keyring:
    """Every bench key, `primary` first."""
    return vault.Keyring(
        [(primary, _material(primary))] + [(k, _material(k)) for k in KEY_IDS if k != primary]
    )


INDEX_KEY = _material("index")


def settings_for(url: str, primary: str) -> config.Settings:
    """Settings naming the bench's keys (the due listing needs an API configured)."""
    keys = ",".join(
        f"{k}:{base64.b64encode(_material(k)).decode()}"
        for k in [primary, *(k for k in KEY_IDS if k != primary)]
    )
    return config.load_settings(
        database_url=url,
        webhook_secrets=base64.b64encode(_material("webhook")).decode(),
        token_keys=keys,
        index_key=base64.b64encode(INDEX_KEY).decode(),
        debitura_api_url="http://127.0.0.1:9",
        debitura_api_key="bench-scale-live-key-000000",
        debitura_test_api_url="http://127.0.0.1:9",
        debitura_test_api_key="bench-scale-test-key-000000",
    )


# ---------------------------------------------------------------- the fill


@dataclass(frozen=True, slots=True)
class Shape:
    """What one fill writes, derived from N."""

    clients: int

    @property
    def events(self) -> int:
        return 3 * self.clients


def _token(environment: str, rng: random.Random) -> str:
    return f"tok_{environment}_" + rng.randbytes(18).hex()


def _body(key: str, kind: str, data: dict[str, Any], at: datetime) -> bytes:
    envelope = key.removeprefix(event_shapes.TEST_KEY_PREFIX)
    return json.dumps(
        {"id": envelope, "event": kind, "created_at": at.isoformat(), "data": data}
    ).encode()


def _redacted(body: bytes) -> str:
    document = json.loads(body)
    token = document["data"].get("bearer_token")
    if token:
        document["data"]["bearer_token"] = token[:15] + "…"
    return json.dumps(document)


class Filler:
    """Builds the rows of one fill, in chunks, sealed under `keys`' primary key."""

    def __init__(self, shape: Shape, keys: vault.Keyring, now: datetime, seed: int = 7) -> None:
        self.shape = shape
        self.keys = keys
        self.now = now
        self.rng = random.Random(seed)

    def event(
        self, kind: str, status: str, client_id: str | None, is_test: bool, at: datetime,
        data: dict[str, Any], quarantine: str | None = None, *, keep: bool = False,
    ) -> tuple[Any, ...]:  # fmt: skip
        """One event row; its body kept when recent, quarantined, or `keep`."""
        key = ("test/" if is_test else "") + "evt_" + self.rng.randbytes(12).hex()
        envelope = key.removeprefix(event_shapes.TEST_KEY_PREFIX)
        body = _body(key, kind, data, at)
        body_hash = hashlib.sha256(body).digest()
        kept = keep or quarantine is not None or at > self.now - timedelta(days=BODY_DAYS)
        sealed = redacted = dropped = None
        if kept:
            sealed = self.keys.seal(
                body, vault.event_associated_data(event_shapes.body_key(body_hash))
            )
            redacted = _redacted(body)
        else:
            dropped = at + timedelta(days=BODY_DAYS)
        return (
            key, kind, status, client_id, is_test, at, at, sealed, redacted, envelope,
            body_hash, quarantine, "bench" if quarantine else None, dropped,
        )  # fmt: skip

    def _ago(self, low: float, high: float) -> datetime:
        return self.now - timedelta(days=self.rng.uniform(low, high))

    def client_rows(self, first: int, count: int) -> tuple[list[tuple[Any, ...]], ...]:
        """Tokens and their events for clients first…first+count-1."""
        tokens: list[tuple[Any, ...]] = []
        evts: list[tuple[Any, ...]] = []
        for n in range(first, first + count):
            client_id = f"cli_{n:07d}"
            environment = "live" if n % 2 == 0 else "test"
            is_test = environment == "test"
            history = n % 20 in (3, 4)  # 10%, in both environments
            active_at = self._ago(0, DAYS - 5 if history else DAYS)
            if history:
                old_at = active_at - timedelta(days=self.rng.uniform(1, 5))
                revoked = n % 40 < 20
                old_id, old_token = self._onboarding(client_id, environment, old_at, is_test, evts)
                old_key = evts[-1][0]
                ended = active_at if not revoked else old_at + timedelta(hours=1)
                if revoked:
                    evts.append(
                        self.event(
                            "token.revoked",
                            "processed",
                            client_id,
                            is_test,
                            ended,
                            {"client_id": client_id, "token_prefix": old_token[:15]},
                        )
                    )
                self.token_row(
                    tokens, old_id, client_id, environment, old_token, old_at, old_key,
                    status="revoked" if revoked else "superseded", ended=ended,
                )  # fmt: skip
            new_id, new_token = self._onboarding(client_id, environment, active_at, is_test, evts)
            self.token_row(
                tokens, new_id, client_id, environment, new_token, active_at, evts[-1][0],
                status="active", ended=None,
            )  # fmt: skip
        return tokens, evts

    def _onboarding(
        self, client_id: str, environment: str, at: datetime, is_test: bool,
        evts: list[tuple[Any, ...]],
    ) -> tuple[uuid.UUID, str]:  # fmt: skip
        token = _token(environment, self.rng)
        data = {
            "client_id": client_id,
            "bearer_token": token,
            "onboarding_completed_at": at.isoformat(),
        }
        evts.append(
            self.event("client.onboarding_completed", "processed", client_id, is_test, at, data)
        )
        return uuid.UUID(bytes=self.rng.randbytes(16), version=4), token

    def token_row(
        self, tokens: list[tuple[Any, ...]], row_id: uuid.UUID, client_id: str,
        environment: str, token: str, at: datetime, event_key: str, *, status: str,
        ended: datetime | None, keep: bool = False,
    ) -> None:  # fmt: skip
        """One token row; its value dropped when it ended past retention, unless `keep`."""
        dropped = not keep and ended is not None and ended < self.now - timedelta(days=BODY_DAYS)
        sealed = (
            None
            if dropped
            else self.keys.seal(token.encode(), vault.token_associated_data(str(row_id)))
        )
        tokens.append((
            row_id, client_id, environment, token[:15], vault.blind_index(INDEX_KEY, token),
            sealed, status, at, at,
            ended if status == "superseded" else None,
            ended if status == "revoked" else None,
            "compromised" if status == "revoked" else None,
            event_key, None, ended or at,
            ended + event_shapes.ROTATION_GRACE if status == "superseded" and ended else None,
            ended + timedelta(days=BODY_DAYS) if dropped and ended else None,
        ))  # fmt: skip

    def filler_rows(self, count: int, *, rare_every: int) -> list[tuple[Any, ...]]:
        """`count` events of types the receiver ignores (a few quarantined)."""
        rows = []
        for _ in range(count):
            n = self.rng.randrange(self.shape.clients)
            client_id = f"cli_{n:07d}"
            is_test = n % 2 == 1
            at = self._ago(0, DAYS)
            if self.rng.randrange(rare_every) == 0:
                kind = RARE_TYPE
            else:
                kind = _FILLER_TYPES[self.rng.randrange(len(_FILLER_TYPES))]
            quarantined = self.rng.randrange(1000) == 0
            rows.append(
                self.event(
                    kind,
                    "quarantined" if quarantined else "ignored",
                    client_id,
                    is_test,
                    at,
                    {"client_id": client_id, "amount": self.rng.randrange(100_000)},
                    quarantine="invalid_data" if quarantined else None,
                )
            )
        return rows


async def _secondary_indexes(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        """
        SELECT i.indexname, i.indexdef FROM pg_indexes i
         WHERE i.schemaname = 'receiver' AND i.tablename IN ('tokens', 'events')
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                            WHERE c.conname = i.indexname
                              AND c.connamespace = 'receiver'::regnamespace)
        """
    )
    return [(r["indexname"], r["indexdef"]) for r in rows]


async def fill(url: str, clients: int, primary: str = KEY_IDS[0]) -> float:
    """Migrate and fill the database at `url`; return the seconds it took."""
    started = time.monotonic()
    await migrations.apply(url)
    shape = Shape(clients)
    filler = Filler(shape, keyring(primary), datetime.now(UTC))
    conn = await asyncpg.connect(url)
    try:
        indexes = await _secondary_indexes(conn)
        # The tallies' triggers probe indexes dropped for the fill: off, and the
        # tallies counted once at the end (as migration 0019 counts them).
        await conn.execute("ALTER TABLE receiver.tokens DISABLE TRIGGER USER")
        for name, _ in indexes:
            await conn.execute(f"DROP INDEX receiver.{name}")
        written = 0
        for first in range(0, clients, CHUNK):
            tokens, evts = filler.client_rows(first, min(CHUNK, clients - first))
            await conn.copy_records_to_table(
                "events", schema_name="receiver", records=evts, columns=_EVENT_COLUMNS
            )
            await conn.copy_records_to_table(
                "tokens", schema_name="receiver", records=tokens, columns=_TOKEN_COLUMNS
            )
            written += len(evts)
            _progress(f"clients {first + CHUNK:,}/{clients:,}", started)
        remaining = shape.events - written
        rare_every = max(1, shape.events // 100)  # about 100 of the rare type at any N
        while remaining > 0:
            rows = filler.filler_rows(min(CHUNK * 2, remaining), rare_every=rare_every)
            await conn.copy_records_to_table(
                "events", schema_name="receiver", records=rows, columns=_EVENT_COLUMNS
            )
            remaining -= len(rows)
            _progress(f"events, {remaining:,} to go", started)
        for name, definition in indexes:
            _progress(f"index {name}", started)
            await conn.execute(definition)
        await conn.execute("ALTER TABLE receiver.tokens ENABLE TRIGGER USER")
        await conn.execute(_TALLIES)
        await conn.execute("VACUUM ANALYZE receiver.tokens")
        await conn.execute("VACUUM ANALYZE receiver.events")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS public.bench_scale (clients int, filled_at timestamptz)"
        )
        await conn.execute("INSERT INTO public.bench_scale VALUES ($1, now())", clients)
    finally:
        await conn.close()
    print(file=sys.stderr)
    return time.monotonic() - started


_TALLIES = """
DELETE FROM receiver.token_tallies;
INSERT INTO receiver.token_tallies (environment, kind, day, n)
SELECT environment, 'active', (onboarding_completed_at AT TIME ZONE 'UTC')::date, count(*)
  FROM receiver.tokens WHERE status = 'active'
 GROUP BY 1, 3
UNION ALL
SELECT environment, 'clients', NULL, count(DISTINCT client_id)
  FROM receiver.tokens
 GROUP BY 1;
"""


def _progress(what: str, started: float) -> None:
    print(f"\r  fill: {what} ({time.monotonic() - started:.0f} s)   ", end="", file=sys.stderr)


def database_url(server: str, name: str) -> str:
    """The URL of database `name` on the server `server` names."""
    return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))


async def ensure_filled(server: str, name: str, clients: int, *, refill: bool = False) -> str:
    """The URL of database `name`, filled with `clients` clients (created and filled
    now unless an earlier run did; `refill`: dropped and filled again)."""
    admin = await asyncpg.connect(server)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and refill:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = None
        if not exists:
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = database_url(server, name)
    conn = await asyncpg.connect(url)
    try:
        filled = await conn.fetchval(
            "SELECT clients FROM public.bench_scale LIMIT 1"
            if await conn.fetchval("SELECT to_regclass('public.bench_scale') IS NOT NULL")
            else "SELECT NULL::int"
        )
    finally:
        await conn.close()
    if filled is None:
        seconds = await fill(url, clients)
        print(f"filled {name}: {clients:,} clients in {seconds:.0f} s")
    elif filled != clients:
        raise SystemExit(f"{name} holds {filled:,} clients, not {clients:,}: use --refill")
    else:
        await migrations.apply(url)  # the indexes this checkout adds, built once
    return url


# ---------------------------------------------------------------- the measurements

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
    "rotation_tokens_below": ("{primary}", "", "00000000-0000-0000-0000-000000000000", 500),
    "rotation_tokens_above": ("{primary}", "", "00000000-0000-0000-0000-000000000000", 500),
    "rotation_events_below": ("{primary}", "", "", 500),
    "rotation_events_above": ("{primary}", "", "", 500),
    "token_inventory_of_client": ("{client}", None, None, None, 100),
    "list_events_of_type": (None, None, RARE_TYPE, 50),
}
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


@dataclass
class Figures:
    """The samples of one operation at one size."""

    seconds: list[float]
    extra: dict[str, float]


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
    filler = Filler(Shape(target.clients), keys, datetime.now(UTC), seed=uuid.uuid4().int)
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
                tokens, uuid.uuid4(), client_id, "live", _token("live", filler.rng), long_ago,
                evts[-1][0], status="superseded", ended=long_ago, keep=True,
            )  # fmt: skip
    conn = await asyncpg.connect(target.url)
    try:
        await conn.copy_records_to_table(
            "events", schema_name="receiver", records=evts, columns=_EVENT_COLUMNS
        )
        await conn.copy_records_to_table(
            "tokens", schema_name="receiver", records=tokens, columns=_TOKEN_COLUMNS
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


OPERATIONS: dict[str, Measure] = {
    "/metrics gauge refresh": gauges,
    "clients erase (one)": erase,
    "prune --dry-run": prune_dry,
    "prune (2,000 due)": prune,
    "tokens rotate --due --dry-run": due_dry,
    "tokens list --client": _fetcher(
        "token_inventory_of_client", "{client}", None, None, None, 100
    ),
    "events list --type (rare)": _fetcher("list_events_of_type", None, None, RARE_TYPE, 50),
}


async def measure(small: Db, big: Db, runs: int, rotate: bool) -> None:
    """Each operation on both databases, interleaved, `runs` times; then the table."""
    from receiver import db

    for target in (small, big):
        target.database = await db.Database.open(target.url)
    results: dict[tuple[str, str], list[tuple[float, dict[str, float]]]] = {}
    try:
        for _ in range(runs):
            for name, op in OPERATIONS.items():
                for target in (small, big):
                    results.setdefault((name, target.label), []).append(await op(target))
        if rotate:
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
    parser.add_argument("--no-rotate", action="store_true", help="skip keys rotate (minutes at 1M)")
    args = parser.parse_args()
    log.configure(level="error")  # a line per rotation batch would drown the table
    started = time.monotonic()
    small_url = await ensure_filled(
        args.database_url, f"receiver_scale_{args.small}", args.small, refill=args.refill
    )
    big_url = await ensure_filled(
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
        not args.no_rotate,
    )


if __name__ == "__main__":
    asyncio.run(main())

"""The data `bench.scale` measures against: N clients, one sealed token each (sealed
by the service's own `receiver.vault`), half live and half test, 10% with a
superseded or revoked older token; about 3N events over 120 days in the shapes the
service writes (onboardings, revocations, ignored types, a few quarantined), the
last 30 days still holding their sealed bodies. Rows go in with COPY; the secondary
indexes (and the token tallies' triggers) are off for the fill and rebuilt after it.
A filled database is kept and reused: filling 1M clients takes a minute or two.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from receiver import config, vault
from receiver.db import migrations
from receiver.lifecycle import events as event_shapes
from receiver.lifecycle import naming

# Key material derived from fixed names: the filled database is reused across runs,
# and each run must open what an earlier one sealed (and rotated). Bench data only.
KEY_IDS = tuple(f"s{n}" for n in range(1, 10))
DAYS = 120
BODY_DAYS = 30  # retain_event_bodies_days' default: older events hold no body
CHUNK = 20_000
RARE_TYPE = "client.merged"
_FILLER_TYPES = ("referral.created", "referral.converted", "commission.paid", "client.updated")
TOKEN_COLUMNS = (
    "id", "client_id", "environment", "prefix", "token_index", "token_sealed", "status",
    "onboarding_completed_at", "stored_at", "superseded_at", "revoked_at", "revoke_reason",
    "created_by_event", "changed_by_event", "updated_at", "expires_at", "value_dropped_at",
)  # fmt: skip
EVENT_COLUMNS = (
    "key", "type", "status", "client_id", "is_test", "occurred_at", "received_at",
    "body_sealed", "body_redacted", "envelope_id", "body_hash", "quarantine_reason",
    "quarantine_detail", "body_dropped_at", "body_names",
)  # fmt: skip


def _material(kid: str) -> bytes:
    return hashlib.sha256(f"bench.scale {kid}".encode()).digest()


def keyring(primary: str) -> vault.Keyring:
    """Every bench key, `primary` first."""
    return vault.Keyring(
        [(primary, _material(primary))] + [(k, _material(k)) for k in KEY_IDS if k != primary]
    )


INDEX_KEY = _material("index")
NAMES_KEY = vault.names_key(INDEX_KEY)


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


@dataclass(frozen=True, slots=True)
class Shape:
    """What one fill writes, derived from N."""

    clients: int

    @property
    def events(self) -> int:
        return 3 * self.clients


def new_token(environment: str, rng: random.Random) -> str:
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
        sealed = redacted = dropped = names = None
        if kept:
            sealed = self.keys.seal(
                body, vault.event_associated_data(event_shapes.body_key(body_hash))
            )
            redacted = _redacted(body)
            names = naming.body_names(NAMES_KEY, body)
        else:
            dropped = at + timedelta(days=BODY_DAYS)
        return (
            key, kind, status, client_id, is_test, at, at, sealed, redacted, envelope,
            body_hash, quarantine, "bench" if quarantine else None, dropped, names,
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
        token = new_token(environment, self.rng)
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
        # tallies counted once at the end (as migrations 0019 and 0024 count them).
        await conn.execute("ALTER TABLE receiver.tokens DISABLE TRIGGER USER")
        await conn.execute("ALTER TABLE receiver.events DISABLE TRIGGER USER")
        for name, _ in indexes:
            await conn.execute(f"DROP INDEX receiver.{name}")
        written = 0
        for first in range(0, clients, CHUNK):
            tokens, evts = filler.client_rows(first, min(CHUNK, clients - first))
            await conn.copy_records_to_table(
                "events", schema_name="receiver", records=evts, columns=EVENT_COLUMNS
            )
            await conn.copy_records_to_table(
                "tokens", schema_name="receiver", records=tokens, columns=TOKEN_COLUMNS
            )
            written += len(evts)
            _progress(f"clients {first + CHUNK:,}/{clients:,}", started)
        remaining = shape.events - written
        rare_every = max(1, shape.events // 100)  # about 100 of the rare type at any N
        while remaining > 0:
            rows = filler.filler_rows(min(CHUNK * 2, remaining), rare_every=rare_every)
            await conn.copy_records_to_table(
                "events", schema_name="receiver", records=rows, columns=EVENT_COLUMNS
            )
            remaining -= len(rows)
            _progress(f"events, {remaining:,} to go", started)
        for name, definition in indexes:
            _progress(f"index {name}", started)
            await conn.execute(definition)
        await conn.execute("ALTER TABLE receiver.tokens ENABLE TRIGGER USER")
        await conn.execute("ALTER TABLE receiver.events ENABLE TRIGGER USER")
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
DELETE FROM receiver.sealed_tallies;
INSERT INTO receiver.sealed_tallies (kind, key_id, n)
SELECT 'tokens', receiver.sealed_key_id(token_sealed), count(*)
  FROM receiver.tokens WHERE token_sealed IS NOT NULL GROUP BY 2
UNION ALL
SELECT 'events', receiver.sealed_key_id(body_sealed), count(*)
  FROM receiver.events WHERE body_sealed IS NOT NULL GROUP BY 2;
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

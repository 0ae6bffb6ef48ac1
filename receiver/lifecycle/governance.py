"""Data governance: what is kept and for how long (prune), forgetting one client
(erase), and the audit trail of every operator
action that opens or changes a secret (docs/decisions.md).

Retention drops values, never the rows that deduplication and the inventory need:
an event's key stays after its body goes, a token's inventory row after its
ciphertext goes.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from receiver import config, db, errors, redaction, vault

log = structlog.get_logger(__name__)

ACTIONS = (
    "token_reveal",
    "token_import",
    "client_erase",
    "keys_rotate",
    "events_reprocess",
    "event_resend",
    "token_fetch",
    "token_rotate",
    "client_revoke",
)
AUDIT_COLUMNS = (
    "id",
    "at",
    "actor",
    "action",
    "client_id",
    "environment",
    "token_prefix",
    "event_key",
    "reason",
    "detail",
)
# Rows per prune transaction: small enough that a batch holds its row locks for
# milliseconds, so ingest never waits on it.
PRUNE_BATCH = 500
PRUNE_PAUSE_RATIO = 1.0
_PRUNE_LOCK = "receiver.prune"
_TEXT_LIMIT = 200
DAY_SECONDS = 86_400.0


# --- the audit trail ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts and why, as the audit trail records it."""

    name: str
    reason: str | None = None

    @classmethod
    def of(cls, name: str | None, reason: str | None) -> Actor:
        """`--actor` (default: the OS user) and `--reason`, cut to 200 characters and
        with anything token-shaped masked: free text must not become a leak."""
        return cls(_clean(name or getpass.getuser()), _clean(reason) if reason else None)


_REDACTOR = redaction.Redactor()


def _clean(text: str) -> str:
    return _REDACTOR.text(text.replace("\x00", ""))[:_TEXT_LIMIT]


async def audit(
    conn: db.Connection,
    actor: Actor,
    action: str,
    *,
    client_id: str | None = None,
    client_hash: str | None = None,
    environment: str | None = None,
    token_prefix: str | None = None,
    event_key: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one row to `receiver.audit` (in the caller's transaction, so the record
    and the act commit together or not at all)."""
    await conn.execute(
        db.QUERIES["audit_record"],
        actor.name,
        action,
        client_id,
        client_hash,
        environment,
        token_prefix,
        event_key,
        actor.reason,
        json.dumps(detail or {}),
    )


async def audit_each(
    database: db.Database, actor: Actor, action: str, entries: list[dict[str, Any]]
) -> None:
    """One audit row per entry (keyword arguments of `audit`), in one transaction."""
    async with database.connection() as conn, conn.transaction():
        for entry in entries:
            await audit(conn, actor, action, **entry)


def client_hash(sealer: vault.Sealer, client_id: str) -> str:
    """The tombstone's name for a client: an HMAC under the blind-index key, so it can
    be matched to a client id one has, but not reversed by guessing ids."""
    return vault.blind_index(sealer.index_key, "client:" + client_id).hex()


async def audit_listing(
    database: db.Database,
    sealer: vault.Sealer,
    *,
    client_id: str | None,
    action: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Audit rows, newest first; `client_id` also finds that client's erasure."""
    hashed = client_hash(sealer, client_id) if client_id else None
    rows = await database.fetch("audit_list", client_id, hashed, action, limit)
    return [db.plain(row) for row in rows]


# --- retention ------------------------------------------------------------------


@dataclass(slots=True)
class PruneReport:
    """What a prune dropped (or, dry, would drop)."""

    event_bodies: int = 0
    token_values: int = 0
    signals: int = 0
    ran: bool = True  # False: another process held the prune lock

    def as_dict(self) -> dict[str, int]:
        """The counts, for log lines and JSON output."""
        return {
            "event_bodies": self.event_bodies,
            "token_values": self.token_values,
            "signals": self.signals,
        }


def _ages(settings: config.Settings) -> tuple[float, float, float]:
    return (
        settings.retain_event_bodies_days * DAY_SECONDS,
        settings.retain_token_values_days * DAY_SECONDS,
        settings.retain_signals_days * DAY_SECONDS,
    )


async def prune(
    database: db.Database, settings: config.Settings, *, dry_run: bool = False
) -> PruneReport:
    """Drop what has outlived its retention, in batches of `PRUNE_BATCH` rows, each in
    its own short transaction that first takes the prune's advisory lock: replicas
    never prune at the same time, and one that finds the lock taken stops
    (`ran=False`), leaving the work to the one that has it."""
    bodies_age, tokens_age, signals_age = _ages(settings)
    if dry_run:
        rows = await database.fetch("prune_counts", bodies_age, tokens_age, signals_age)
        return PruneReport(rows[0]["event_bodies"], rows[0]["token_values"], rows[0]["signals"])
    report = PruneReport()
    for name, query, age in (
        ("event_bodies", "prune_event_bodies", bodies_age),
        ("token_values", "prune_token_values", tokens_age),
        ("signals", "prune_signals", signals_age),
    ):
        done = await _batches(database, query, age)
        if done is None:
            report.ran = False
            break
        setattr(report, name, done)
    log.info("prune_done" if report.ran else "prune_skipped", **report.as_dict())
    return report


async def prune_every(database: db.Database, settings: config.Settings) -> None:
    """`serve`'s schedule: a prune every `RECEIVER_PRUNE_INTERVAL_SECONDS` (the first
    after a tenth of it, at most a minute), jittered so replicas spread out; the
    advisory lock lets one of them at a time do the work. A failed run is logged and
    tried again at the next interval: retention is never urgent, ingest is."""
    interval = settings.prune_interval_seconds
    delay = min(interval / 10, 60.0)
    while True:
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 (jitter only)
        delay = interval
        try:
            await prune(database, settings)
        except errors.ReceiverError as exc:
            log.warning("prune_failed", error=type(exc).__name__)
        except Exception:  # a bug must not end the schedule silently
            log.exception("prune_failed")


async def _batches(database: db.Database, query: str, age_seconds: float) -> int | None:
    """Run one prune query batch after batch until a short one; None when another
    process holds the prune lock."""
    total = 0
    while True:
        started = time.monotonic()
        async with database.connection() as conn, conn.transaction():
            if not await conn.fetchval(db.QUERIES["try_xact_lock"], _PRUNE_LOCK):
                return None if total == 0 else total
            done: int = await conn.fetchval(db.QUERIES[query], age_seconds, PRUNE_BATCH)
        total += done
        if done < PRUNE_BATCH:
            return total
        # Retention is never urgent, ingest always is: after each batch, a pause as
        # long as the batch took, so a prune takes at most half of one Postgres
        # backend's time and the WAL it writes comes in bursts ingest can absorb.
        await asyncio.sleep((time.monotonic() - started) * PRUNE_PAUSE_RATIO)


# --- erasure --------------------------------------------------------------------


@dataclass(slots=True)
class Erasure:
    """What erasing one client removed."""

    client_hash: str
    event_key: str | None = None  # None: there was nothing left to erase
    tokens: int = 0
    bodies: int = 0
    environments: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For the audit row and the command's output."""
        return {
            "client_hash": self.client_hash,
            "event_key": self.event_key,
            "tokens": self.tokens,
            "bodies": self.bodies,
            "environments": self.environments,
        }


async def erase_client(
    database: db.Database,
    settings: config.Settings,
    sealer: vault.Sealer,
    client_id: str,
    actor: Actor,
) -> Erasure:
    """Remove every token value and stored body of `client_id`, in one transaction
    under the client's lock (a delivery for it waits, then finds it erased): its
    tokens end revoked with no value and no blind index, its events keep their keys
    without bodies, an invalidation signal is queued per environment, and a
    tombstone (the client's hash, who, when, why) goes to the audit trail.

    Idempotent: when nothing is left to remove, nothing is written.
    """
    erasure = Erasure(client_hash=client_hash(sealer, client_id))
    async with database.connection() as conn, conn.transaction():
        await conn.execute(db.QUERIES["lock_client"], client_id)
        # Quarantined bodies that were not JSON have no redacted copy to search: they
        # are opened (in memory) and searched for the client id as a JSON string, so
        # that erasing cli_1 leaves cli_10's alone.
        quoted = json.dumps(client_id).encode()
        unreadable = [
            row["key"]
            for row in await conn.fetch(db.QUERIES["unreadable_bodies"])
            if quoted
            in sealer.keyring.open(
                row["body_sealed"], vault.event_associated_data(row["sealed_for"])
            )
        ]
        pending = await conn.fetchrow(db.QUERIES["erase_pending"], client_id, unreadable)
        assert pending is not None
        if not pending["tokens"] and not pending["bodies"]:
            return erasure
        erasure.event_key = f"erase_{uuid.uuid4().hex}"
        erasure.environments = list(pending["environments"] or ["live"])
        await conn.execute(
            db.QUERIES["insert_operator_event"], erasure.event_key, "receiver.client_erased"
        )
        erasure.tokens = len(
            await conn.fetch(db.QUERIES["erase_tokens"], client_id, erasure.event_key)
        )
        erasure.bodies = await conn.fetchval(db.QUERIES["erase_bodies"], client_id, unreadable)
        for environment in erasure.environments:
            await conn.execute(
                db.QUERIES["enqueue_signal"],
                client_id,
                environment,
                erasure.event_key,
                settings.notify_channel,
                settings.cache_url is not None,
            )
        await audit(
            conn,
            actor,
            "client_erase",
            client_hash=erasure.client_hash,
            event_key=erasure.event_key,
            detail=erasure.as_dict(),
        )
    log.warning("client_erased", actor=actor.name, **erasure.as_dict())
    return erasure


# --- import (the token itself: lifecycle.adoption) ---------------------------


def read_token(lines: Iterable[str]) -> str:
    """The token from stdin or a file: its first non-empty line, stripped."""
    for line in lines:
        if line.strip():
            return line.strip()
    raise errors.UsageError("no token given: pipe it on stdin, or use --file")

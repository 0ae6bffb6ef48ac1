"""The audit trail of every operator action that opens or changes a secret
(docs/decisions.md): who, when, why, which client and token prefix, never a value."""

from __future__ import annotations

import getpass
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from receiver import db, redaction, vault

log = structlog.get_logger(__name__)

ACTIONS = (
    "token_reveal",
    "token_import",
    "client_erase",
    "keys_rotate",
    "events_reprocess",
    "event_resend",
    "events_dismiss",
    "token_fetch",
    "token_rotate",
    "client_revoke",
    "client_link",
    "token_reconcile",
    "signals_retry",
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
_TEXT_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts and why, as the audit trail records it."""

    name: str
    reason: str | None = None

    @classmethod
    def of(cls, name: str | None, reason: str | None, secrets: Sequence[str] = ()) -> Actor:
        """`--actor` (default: the OS user) and `--reason`, cut to 200 characters and
        with anything token-shaped masked, and the configured `secrets`
        (`Settings.secret_values()`) where the caller has them: free text must not
        become a leak."""
        return cls(
            clean(name or getpass.getuser(), secrets),
            clean(reason, secrets) if reason else None,
        )


_REDACTOR = redaction.Redactor()


def clean(text: str, secrets: Sequence[str] = ()) -> str:
    """Free text as the audit trail keeps it: token-shaped parts and the given
    configured secrets masked, NULs gone, at most 200 characters."""
    redactor = redaction.Redactor(secrets) if secrets else _REDACTOR
    return redactor.text(text.replace("\x00", ""))[:_TEXT_LIMIT]


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
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Audit rows, newest first; `client_id` also finds that client's erasure;
    `actor` as recorded (`admin:3f2a…`, an OS user); `since` ≤ at < `until`."""
    hashed = client_hash(sealer, client_id) if client_id else None
    rows = await database.fetch("audit_list", client_id, hashed, action, limit, actor, since, until)
    # `detail` is an object in the output (the driver gives jsonb as its text).
    return [
        {**db.plain(row), "detail": json.loads(row["detail"]) if row["detail"] else None}
        for row in rows
    ]

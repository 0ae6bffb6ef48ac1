"""The token inventory, and opening a stored token when someone truly needs it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import structlog

from receiver import db, errors, vault
from receiver.lifecycle import audit

log = structlog.get_logger(__name__)

STATUSES = ("active", "superseded", "expired", "revoked")
INVENTORY_COLUMNS = (
    "client_id",
    "token_prefix",
    "environment",
    "status",
    "onboarding_completed_at",
    "issued_at",
    "expires_at",
    "revoked_at",
    "revoke_reason",
    "key_id",
    "link_invalid_at",
    "valid",
    "validated_at",
)


async def inventory(
    database: db.Database,
    *,
    client_id: str | None = None,
    status: str | None = None,
    environment: str | None = None,
    older_than: timedelta | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Every stored token's metadata, newest first per client; never the token.
    `older_than`: only tokens issued longer ago than that (rotation reminders)."""
    # One client: a query whose client filter is not optional, so a reused plan
    # still reads that client's index range (an optional one got a scan: 2.57 s at 1M).
    query = "token_inventory" if client_id is None else "token_inventory_of_client"
    rows = await database.fetch(query, client_id, status, environment, older_than, limit)
    return [db.plain(row) for row in rows]


async def reveal(
    database: db.Database,
    sealer: vault.Sealer,
    client_id: str,
    actor: audit.Actor,
    *,
    prefix: str | None = None,
    environment: str = "live",
) -> tuple[dict[str, Any], str]:
    """The client's active token in `environment` (or the one with `prefix`) in plain
    text. The audit row (who, why, which client and prefix) is committed before the
    token is opened: no reveal goes unrecorded."""
    rows = await database.fetch("token_to_open", client_id, prefix, environment)
    if not rows:
        raise errors.ReceiverError(
            f"no {'token with that prefix' if prefix else 'active token'} for client {client_id!r}"
        )
    row = rows[0]
    if row["token_sealed"] is None:
        raise errors.ReceiverError(
            f"token {row['prefix']}… of client {client_id!r} is {row['status']} and its value "
            "was dropped (retention or erasure)"
        )
    await audit.audit_each(
        database,
        actor,
        "token_reveal",
        [
            {
                "client_id": row["client_id"],
                "environment": row["environment"],
                "token_prefix": row["prefix"],
                "detail": {"status": row["status"]},
            }
        ],
    )
    token = sealer.open_token(row["id"], row["token_sealed"])
    log.warning(
        "token_revealed",
        client_id=row["client_id"],
        status=row["status"],
        requested_by=actor.name,
    )
    return {"client_id": row["client_id"], "prefix": row["prefix"], "status": row["status"]}, token

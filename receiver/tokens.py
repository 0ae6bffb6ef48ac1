"""The token inventory, and opening a stored token when someone truly needs it."""

from __future__ import annotations

import getpass
from typing import Any

import structlog

from receiver import db, errors, vault

log = structlog.get_logger(__name__)

STATUSES = ("active", "superseded", "expired", "revoked")
ENVIRONMENTS = ("live", "test")
INVENTORY_COLUMNS = (
    "client_id",
    "prefix",
    "environment",
    "status",
    "onboarding_completed_at",
    "expires_at",
    "revoked_at",
    "revoke_reason",
    "key_id",
)


async def inventory(
    database: db.Database,
    *,
    client_id: str | None = None,
    status: str | None = None,
    environment: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Every stored token's metadata, newest first per client; never the token."""
    rows = await database.fetch("token_inventory", client_id, status, environment, limit)
    return [db.plain(row) for row in rows]


async def reveal(
    database: db.Database,
    sealer: vault.Sealer,
    client_id: str,
    prefix: str | None = None,
    environment: str = "live",
) -> tuple[dict[str, Any], str]:
    """The client's active token in `environment` (or the one with `prefix`) in plain
    text, audited.

    The audit line names who asked and which token, never the token itself.
    """
    rows = await database.fetch("token_to_open", client_id, prefix, environment)
    if not rows:
        raise errors.ReceiverError(
            f"no {'token with that prefix' if prefix else 'active token'} for client {client_id!r}"
        )
    row = rows[0]
    token = sealer.open_token(row["id"], row["token_sealed"])
    log.warning(
        "token_revealed",
        client_id=row["client_id"],
        token_prefix=row["prefix"],
        status=row["status"],
        requested_by=getpass.getuser(),
    )
    return {"client_id": row["client_id"], "prefix": row["prefix"], "status": row["status"]}, token

"""Adoption: tokens that arrive outside a webhook (an API response, a re-import after
losing the keys), stored exactly as an onboarding webhook would store them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from receiver import config, db, errors, redaction, vault
from receiver.lifecycle import audit, events, rows, store

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Imported:
    """The outcome of `tokens import`."""

    event_key: str
    client_id: str
    environment: str
    prefix: str
    status: str  # active | superseded | revoked | already_stored


async def import_token(
    database: db.Database,
    settings: config.Settings,
    sealer: vault.Sealer,
    client_id: str,
    token: str,
    actor: audit.Actor,
    *,
    supersede: bool = False,
    old_expires_at: datetime | None = None,
) -> Imported:
    """Store a token that arrived outside a webhook (an API response, a re-import after
    losing the keys) exactly as an onboarding webhook would: the same event row, the
    same lifecycle, the same signal, plus an audit row, in one transaction.

    Refused (nothing stored) when the token or client id is malformed, or when the
    client already has an active token in that environment and `supersede` is not set.
    """
    problem = events.token_problem(token)
    if problem is not None:
        raise errors.UsageError(f"cannot import: the token {problem}")
    now = datetime.now(UTC)
    key = f"import_{uuid.uuid4().hex}"
    data: dict[str, Any] = {
        "client_id": client_id,
        "bearer_token": token,
        "onboarding_completed_at": now.isoformat(),
    }
    if old_expires_at is not None:
        data["old_token_expires_at"] = old_expires_at.isoformat()
    document = {
        "id": key,
        "event": "client.onboarding_completed",
        "timestamp": now.isoformat(),
        "data": data,
    }
    body = json.dumps(document).encode()
    environment = "test" if token.startswith("tok_test_") else "live"
    event = events.read(body, is_test=environment == "test")
    if event.quarantine is not None or not isinstance(event.data, events.OnboardingCompleted):
        detail = event.quarantine.detail if event.quarantine else "not an onboarding"
        # The detail names a field and an error kind, never a value.
        raise errors.UsageError(f"cannot import: {detail}")
    row = rows.prepare(
        sealer,
        event,
        rows.Arrival(body=body, is_test=event.is_test, test_header=False, signature=None),
    )
    prefix = redaction.token_prefix(token)
    async with database.connection() as conn, conn.transaction():
        active = await conn.fetchval(db.QUERIES["active_prefix"], client_id, environment)
        if active is not None and not supersede:
            raise errors.UsageError(
                f"client {client_id!r} already has an active {environment} token ({active}…): "
                "add --supersede to replace it"
            )
        # The lifecycle's one way in, inside this transaction (with the audit row).
        await store.record_rows(
            conn,
            sealer,
            [row],
            channel=settings.notify_channel,
            http_delivery=settings.cache_url is not None,
        )
        status = await conn.fetchval(db.QUERIES["token_created_by"], key)
        await audit.audit(
            conn,
            actor,
            "token_import",
            client_id=client_id,
            environment=environment,
            token_prefix=prefix,
            event_key=key,
            detail={"status": status or "already_stored", "superseded": active},
        )
    log.warning(
        "token_imported",
        actor=actor.name,
        client_id=client_id,
        environment=environment,
        token_prefix=prefix,
        status=status or "already_stored",
    )
    return Imported(key, client_id, environment, prefix, status or "already_stored")


def read_token(lines: Iterable[str]) -> str:
    """The token from stdin or a file: its first non-empty line, stripped."""
    for line in lines:
        if line.strip():
            return line.strip()
    raise errors.UsageError("no token given: pipe it on stdin, or use --file")

"""The one way in for tokens that arrive outside a webhook: `tokens import`, a fetch
from Debitura's API, a rotation (and a revocation made through the API).

Each becomes the event a webhook would have carried and goes through the same
lifecycle (`record_events`): sealed, the client's active token in its environment
superseded (or revoked), the revocation remembered, an outbox signal and its NOTIFY,
plus an audit row, all in one transaction. A later webhook about the same token is
a no-op: the lifecycle deduplicates on the token's blind index.
"""

from __future__ import annotations

import dataclasses
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
    """The outcome of storing a token that came from outside a webhook."""

    event_key: str
    client_id: str
    environment: str
    prefix: str
    status: str  # active | superseded | revoked | already_stored
    replaced: str | None = None  # the prefix of the active token it replaced


@dataclass(frozen=True, slots=True)
class IntentClosure:
    """A rotation intent to close in the same transaction as the token is stored."""

    intent_id: int
    outcome: str  # rotated | resumed


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
    revoke_old: bool = False,
    action: str = "token_import",
    key_prefix: str = "import",
    detail: dict[str, Any] | None = None,
    close_intent: IntentClosure | None = None,
    onboarded_at: datetime | None = None,
    issued_at: datetime | None = None,
) -> Imported:
    """Store a token that arrived outside a webhook (an API answer, a re-import after
    losing the keys) exactly as an onboarding webhook would: the same event row, the
    same lifecycle, the same signal, plus an audit row (`action`), in one
    transaction; `close_intent` closes a rotation intent in that same transaction.

    The replaced active token becomes superseded until `old_expires_at` (default: the
    24 h grace), or revoked with `revoke_old`. Refused (nothing stored) when the
    token or client id is malformed, or when the client already has an active token
    in that environment and `supersede` is not set.

    `onboarded_at` (default now) is the token's onboarding time as the lifecycle
    orders it: a rotation or a link passes the moment it began, so that a revocation
    of the client made here after that moment wins and the token is stored revoked.
    `issued_at`: Debitura's own issue time, the token's age for rotation.
    """
    problem = redaction.token_problem(token)
    if problem is not None:
        raise errors.UsageError(f"cannot import: the token {problem}")
    now = datetime.now(UTC)
    key = f"{key_prefix}_{uuid.uuid4().hex}"
    data: dict[str, Any] = {
        "client_id": client_id,
        "bearer_token": token,
        "onboarding_completed_at": (onboarded_at or now).isoformat(),
    }
    if old_expires_at is not None:
        data["old_token_expires_at"] = old_expires_at.isoformat()
    environment = redaction.token_environment(token)
    assert environment is not None  # token_problem has checked the token's form
    row = _row(sealer, key, "client.onboarding_completed", data, environment)
    prefix = redaction.token_prefix(token)
    async with database.connection() as conn, conn.transaction():
        active = await conn.fetchval(db.QUERIES["active_prefix"], client_id, environment)
        if active is not None and not supersede:
            raise errors.UsageError(
                f"client {client_id!r} already has an active {environment} token ({active}…): "
                "add --supersede to replace it"
            )
        batch = [row]
        if revoke_old and active is not None and active != prefix:
            # The replaced token is revoked as a token.revoked webhook would revoke it.
            revocation = {
                "client_id": client_id,
                "token_prefix": active,
                "revoked_at": now.isoformat(),
                "reason": "revoke_immediately",
            }
            batch.append(_row(sealer, f"{key}_old", "token.revoked", revocation, environment))
        # The lifecycle's one way in, inside this transaction (with the audit row).
        await store.record_rows(
            conn,
            sealer,
            batch,
            channel=settings.notify_channel,
            http_delivery=settings.cache_url is not None,
        )
        status = await conn.fetchval(db.QUERIES["token_created_by"], key) or "already_stored"
        if issued_at is not None:
            index = vault.blind_index(sealer.index_key, token)
            await conn.execute(db.QUERIES["token_issued"], index, issued_at)
        if close_intent is not None:
            # Stored, but not as the active token (revoked meanwhile, say), or stored
            # already: the intent says so, not that it rotated.
            await conn.execute(
                db.QUERIES["rotation_intent_close"],
                close_intent.intent_id,
                close_intent.outcome if status == "active" else status,
                prefix,
                None,
            )
        await audit.audit(
            conn,
            actor,
            action,
            client_id=client_id,
            environment=environment,
            token_prefix=prefix,
            event_key=key,
            detail={"status": status, "superseded": active, **(detail or {})},
        )
    log.warning(
        "token_imported" if action == "token_import" else "token_stored",
        action=action,
        actor=actor.name,
        client_id=client_id,
        environment=environment,
        token_prefix=prefix,
        status=status,
    )
    return Imported(key, client_id, environment, prefix, status, active)


async def revoke_client(
    database: db.Database,
    settings: config.Settings,
    sealer: vault.Sealer,
    client_id: str,
    environment: str,
    actor: audit.Actor,
    *,
    action: str = "client_revoke",
) -> int:
    """Revoke every token of the client in `environment` issued until now, as a
    prefix-less `token.revoked` webhook would (remembered, signalled even when no
    token matched), with an audit row (`action`); how many tokens it revoked."""
    now = datetime.now(UTC)
    key = f"revoke_{uuid.uuid4().hex}"
    data = {"client_id": client_id, "revoked_at": now.isoformat(), "reason": "client_revoke"}
    row = _row(sealer, key, "token.revoked", data, environment)
    async with database.connection() as conn, conn.transaction():
        recorded = await store.record_rows(
            conn,
            sealer,
            [row],
            channel=settings.notify_channel,
            http_delivery=settings.cache_url is not None,
        )
        revoked = recorded[0].revoked or 0
        await audit.audit(
            conn,
            actor,
            action,
            client_id=client_id,
            environment=environment,
            event_key=key,
            detail={"revoked": revoked},
        )
    log.warning(
        "client_revoked",
        actor=actor.name,
        client_id=client_id,
        environment=environment,
        revoked=revoked,
    )
    return revoked


def _row(
    sealer: vault.Sealer, key: str, kind: str, data: dict[str, Any], environment: str
) -> rows.Row:
    """The event a webhook would have carried, read and sealed as one."""
    document = {"id": key, "event": kind, "timestamp": data.get("revoked_at"), "data": data}
    if document["timestamp"] is None:
        document["timestamp"] = data["onboarding_completed_at"]
    body = json.dumps(document).encode()
    event = events.read(body, is_test=environment == "test")
    if event.quarantine is not None or event.data is None:
        detail = event.quarantine.detail if event.quarantine else "not applicable"
        # The detail names a field and an error kind, never a value.
        raise errors.UsageError(f"cannot import: {detail}")
    # Our own made-up key (unique already, named in audit rows and looked up by the
    # caller): kept as it is, without the test world's `test:` (events.event_key).
    event = dataclasses.replace(event, key=key)
    return rows.prepare(
        sealer,
        event,
        rows.Arrival(body=body, is_test=event.is_test, test_header=False, signature=None),
    )


def read_token(lines: Iterable[str]) -> str:
    """The token from stdin or a file: its first non-empty line, stripped."""
    for line in lines:
        if line.strip():
            return line.strip()
    raise errors.UsageError("no token given: pipe it on stdin, or use --file")

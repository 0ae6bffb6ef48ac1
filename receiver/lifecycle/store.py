"""Recording verified events: seal what is secret, then one round trip to Postgres.

Everything a delivery changes (the event row, the token, the revocation record, the
outbox signal and its NOTIFY) commits in one transaction inside one SQL function,
so a 200 always follows a durable commit of all of it, and a duplicate of any kind
changes nothing. Several deliveries share that transaction (`record_rows`, used by
the group committer); each still gets its own outcome. A delivery that cannot be
applied is stored all the same, quarantined.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from receiver import db, redaction, vault
from receiver.lifecycle import events


class Row(NamedTuple):
    """One delivery as SQL takes it (`receiver.event_row`, field for field and in its
    order: tests compare the two). Sealed bytes and the blind index only, never a token.

    A named tuple rather than a frozen dataclass: it is built once per delivery and
    handed to asyncpg as the composite's fields as it is (the dataclass's __init__
    and its copy into a tuple cost ~6 µs a delivery)."""

    kind: str  # onboarding | revocation | ignored | quarantined
    key: str
    envelope_id: str | None
    type: str
    is_test: bool
    test_header: bool | None
    signature: str | None
    occurred_at: datetime | None
    body_hash: bytes
    body_sealed: bytes
    body_redacted: str | None
    client_id: str | None = None
    environment: str | None = None
    token_id: uuid.UUID | None = None
    prefix: str | None = None
    token_index: bytes | None = None
    token_sealed: bytes | None = None
    completed_at: datetime | None = None
    old_expires_at: datetime | None = None
    grace: timedelta | None = None
    revoked_at: datetime | None = None
    reason: str | None = None
    quarantine_reason: str | None = None
    quarantine_detail: str | None = None

    def __repr__(self) -> str:
        return f"Row({self.kind!r}, key={self.key!r}, client_id={self.client_id!r})"

    def as_record(self) -> tuple[Any, ...]:
        """The row as the composite's positional fields: itself."""
        return self


@dataclass(frozen=True, slots=True)
class Delivery:
    """A verified delivery: its raw bytes and what its headers and secret said."""

    body: bytes
    is_test: bool  # verified by a test secret, or X-Debitura-Test: true
    test_header: bool
    signature: str | None

    def __repr__(self) -> str:
        return f"Delivery({len(self.body)} bytes, is_test={self.is_test})"


def prepare(sealer: vault.Sealer, event: events.Event, delivery: Delivery) -> Row:
    """Seal the delivery's body (and token) and lay it out for SQL."""
    common: dict[str, Any] = {
        "key": event.key,
        "envelope_id": event.envelope_id,
        "type": event.type,
        "is_test": event.is_test,
        "test_header": delivery.test_header,
        "signature": delivery.signature,
        "occurred_at": event.occurred_at,
        "body_hash": event.body_hash,
        "body_sealed": sealer.keyring.seal(
            delivery.body, vault.event_associated_data(events.body_key(event.body_hash))
        ),
        "body_redacted": None if event.document is None else json.dumps(event.document),
        "environment": event.environment,
    }
    if event.quarantine is not None:
        return Row(
            kind="quarantined",
            quarantine_reason=event.quarantine.reason,
            quarantine_detail=event.quarantine.detail,
            **common,
        )
    data = event.data
    if isinstance(data, events.OnboardingCompleted):
        token = data.bearer_token.get_secret_value()
        row_id = uuid.uuid4()
        return Row(
            kind="onboarding",
            client_id=data.client_id,
            token_id=row_id,
            prefix=redaction.token_prefix(token),
            token_index=vault.blind_index(sealer.index_key, token),
            token_sealed=sealer.keyring.seal(
                token.encode(), vault.token_associated_data(str(row_id))
            ),
            completed_at=data.onboarding_completed_at,
            old_expires_at=data.old_token_expires_at,
            grace=events.ROTATION_GRACE,
            **common,
        )
    if isinstance(data, events.TokenRevoked):
        return Row(
            kind="revocation",
            client_id=data.client_id,
            prefix=data.token_prefix,
            revoked_at=data.revoked_at or event.occurred_at or datetime.now(UTC),
            reason=data.reason,
            **common,
        )
    return Row(kind="ignored", **common)


class Recorded(NamedTuple):
    """What recording one delivery did: its outcome, the quarantine reason if it was
    quarantined, and for a processed revocation how many tokens it revoked."""

    outcome: events.Outcome
    reason: events.QuarantineReason | None = None
    revoked: int | None = None


def _recorded(outcome: str, row: Row, revoked: int | None = None) -> Recorded:
    if outcome == "id_conflict":
        return Recorded("quarantined", "id_conflict")
    if outcome == "quarantined":
        return Recorded("quarantined", cast(events.QuarantineReason, row.quarantine_reason))
    return Recorded(cast(events.Outcome, outcome), None, revoked)


async def record_rows(
    database: db.Database, rows: list[Row], *, channel: str, http_delivery: bool
) -> list[Recorded]:
    """Record several deliveries in one statement and one transaction; each one's
    outcome (and quarantine reason), in order."""
    records = await database.fetch(
        "record_events", [row.as_record() for row in rows], channel, http_delivery
    )
    return [
        _recorded(r["outcome"], row, r["revoked"]) for r, row in zip(records, rows, strict=True)
    ]


async def reprocess(
    conn: db.Connection, stored_key: str, row: Row, *, channel: str, http_delivery: bool
) -> str:
    """Re-apply the quarantined row `stored_key` as `row` now reads, on `conn` (in the
    caller's transaction, so its audit row commits with it); the outcome, or
    `not_quarantined` when it no longer is."""
    outcome: str = await conn.fetchval(
        db.QUERIES["reprocess_event"],
        stored_key,
        row.as_record(),
        channel,
        http_delivery,
        timeout=db.STATEMENT_TIMEOUT_SECONDS,
    )
    return outcome

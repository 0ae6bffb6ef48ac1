"""Recording verified events: seal what is secret, then one round trip to Postgres.

Everything an event changes (the event row, the token, the revocation record, the
outbox signal and its NOTIFY) commits in one transaction inside one SQL function,
so a 200 always follows a durable commit of all of it, and a duplicate of any kind
changes nothing. Several events can share that transaction (`record_rows`, used by
the group committer); each still gets its own outcome.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from receiver import config, db, events, redaction, vault


@dataclass(frozen=True, slots=True)
class Sealer:
    """The key material the request path needs: a keyring and the blind-index key."""

    keyring: vault.Keyring
    index_key: bytes

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Sealer:
        """The keyring and index key the settings configure."""
        return cls(
            keyring=vault.Keyring([(kid, k.get_secret_value()) for kid, k in settings.token_keys]),
            index_key=settings.index_key.get_secret_value(),
        )

    def __repr__(self) -> str:
        return f"Sealer(keyring={self.keyring!r})"


@dataclass(frozen=True, slots=True)
class Row:
    """One event as its SQL function takes it: sealed bytes and the blind index only."""

    kind: str  # onboarding | revocation | ignored
    key: str
    type: str
    is_test: bool
    occurred_at: datetime | None
    body_sealed: bytes
    body_redacted: str
    client_id: str | None = None
    token_id: str | None = None
    environment: str | None = None
    prefix: str | None = None
    token_index: bytes | None = None
    token_sealed: bytes | None = None
    completed_at: datetime | None = None
    old_expires_at: datetime | None = None
    grace: timedelta | None = None
    revoked_at: datetime | None = None
    reason: str | None = None

    def __repr__(self) -> str:
        return f"Row({self.kind!r}, key={self.key!r}, client_id={self.client_id!r})"


def prepare(sealer: Sealer, event: events.Event, body: bytes, *, is_test: bool) -> Row:
    """Seal the event's body (and token) and lay it out for SQL."""
    common: dict[str, Any] = {
        "key": event.key,
        "type": event.type,
        "is_test": is_test,
        "occurred_at": event.envelope.timestamp,
        "body_sealed": sealer.keyring.seal(body, vault.event_associated_data(event.key)),
        "body_redacted": json.dumps(events.redacted_document(event)),
    }
    data = event.data
    if isinstance(data, events.OnboardingCompleted):
        token = data.bearer_token.get_secret_value()
        row_id = str(uuid.uuid4())
        return Row(
            kind="onboarding",
            client_id=data.client_id,
            token_id=row_id,
            environment=token[4:8],  # "live" | "test", validated by the token pattern
            prefix=redaction.token_prefix(token),
            token_index=vault.blind_index(sealer.index_key, token),
            token_sealed=sealer.keyring.seal(token.encode(), vault.token_associated_data(row_id)),
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
            revoked_at=data.revoked_at or event.envelope.timestamp or datetime.now(UTC),
            reason=data.reason,
            **common,
        )
    return Row(kind="ignored", **common)


_COLUMNS = Row.__slots__


async def record_rows(
    database: db.Database, rows: list[Row], *, channel: str, http_delivery: bool
) -> list[events.Outcome]:
    """Record several events in one statement and one transaction; outcomes in order."""
    columns = [[getattr(row, name) for row in rows] for name in _COLUMNS]
    records = await database.fetch("record_events", *columns, channel, http_delivery)
    return [r["outcome"] for r in records]


async def record(
    database: db.Database,
    sealer: Sealer,
    event: events.Event,
    body: bytes,
    *,
    is_test: bool,
    channel: str,
    http_delivery: bool,
) -> events.Outcome:
    """Store one verified event and apply its effect; return what happened."""
    row = prepare(sealer, event, body, is_test=is_test)
    outcomes = await record_rows(database, [row], channel=channel, http_delivery=http_delivery)
    return outcomes[0]

"""A verified delivery laid out for SQL: its body and token sealed, its effect named
(`receiver.event_row_v3`, field for field). Only sealed bytes, blind indexes and
prefixes, never a token.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from receiver import redaction, vault
from receiver.lifecycle import events, naming


class Row(NamedTuple):
    """One delivery as SQL takes it (`receiver.event_row_v3`, field for field and in its
    order: tests compare the two). Sealed bytes and the blind index only, never a token.

    A named tuple rather than a frozen dataclass: it is built once per delivery and
    handed to asyncpg as the composite's fields as it is, with no __init__ to run and
    no copy into a tuple on the request path."""

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
    # Reprocessing: the stored key of the quarantined row this one applies again.
    replaces: str | None = None
    # Ids (tokens) or keys (revocations) checked in memory against a prefix longer
    # than the stored one and found not to match; None: not checked
    # (sql/0022_1_pre_body_names.sql, apply_group_v2).
    spared: list[str] | None = None
    # Keyed hashes of the identifiers the body names (lifecycle/naming.py): how an
    # erasure finds it. None: not known (erasure opens it).
    body_names: list[int] | None = None

    def __repr__(self) -> str:
        return f"Row({self.kind!r}, key={self.key!r}, client_id={self.client_id!r})"

    def as_record(self) -> tuple[Any, ...]:
        """The row as the composite's positional fields: itself."""
        return self


@dataclass(frozen=True, slots=True)
class Arrival:
    """How a verified delivery arrived: its raw bytes and what its headers and secret
    said (a webhook's, or as stored for reprocessing, or made up for an import)."""

    body: bytes
    is_test: bool  # verified by a test secret, or X-Debitura-Test: true
    test_header: bool
    signature: str | None

    def __repr__(self) -> str:
        return f"Arrival({len(self.body)} bytes, is_test={self.is_test})"


def prepare(
    sealer: vault.Sealer, event: events.Event, arrival: Arrival, *, replaces: str | None = None
) -> Row:
    """Seal the delivery's body (and token) and lay it out for SQL; `replaces`: the
    stored key of the quarantined delivery this one applies again."""
    common: dict[str, Any] = {
        "key": event.key,
        "envelope_id": event.envelope_id,
        "type": event.type,
        "is_test": event.is_test,
        "test_header": arrival.test_header,
        "signature": arrival.signature,
        "occurred_at": event.occurred_at,
        "body_hash": event.body_hash,
        "body_sealed": sealer.keyring.seal(
            arrival.body, vault.event_associated_data(events.body_key(event.body_hash))
        ),
        "body_redacted": None if event.document is None else json.dumps(event.document),
        "environment": event.environment,
        "replaces": replaces,
        "body_names": naming.body_names(sealer.names_key, arrival.body),
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
    if isinstance(data, events.TokenRevocation):
        return Row(
            kind="revocation",
            client_id=data.client_id,
            prefix=data.token_prefix,
            revoked_at=data.revoked_at or event.occurred_at or datetime.now(UTC),
            reason=data.reason,
            **common,
        )
    return Row(kind="ignored", **common)


def unstorable(event: events.Event, detail: str, *, keep_names: bool) -> events.Event:
    """The delivery as a quarantined `unstorable_value`, with its id and type or, when
    those are what Postgres refused, under its body hash and type `unknown`."""
    return events.Event(
        key=event.key
        if keep_names
        else events.event_key(None, event.body_hash, is_test=event.is_test),
        envelope_id=event.envelope_id if keep_names else None,
        type=event.type if keep_names else "unknown",
        is_test=event.is_test,
        body_hash=event.body_hash,
        quarantine=events.Quarantine("unstorable_value", detail),
    )

"""Recording rows: the lifecycle's one way in.

Everything a delivery changes (the event row, the token, the revocation record, the
outbox signal and its NOTIFY) commits in one transaction inside one SQL function
(`record_events`, sql/0001_baseline.sql), so a 200 always follows a durable commit
of all of it, and a duplicate of any kind changes nothing. Webhook deliveries
(through the group committer), `tokens import` and `events reprocess` all come in through
`record_rows`; `record_delivery` adds what any caller needs around it: a delivery
Postgres refuses a value of is kept all the same, quarantined.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, cast

from receiver import db, errors, vault
from receiver.lifecycle import events, rows


class Recorded(NamedTuple):
    """What recording one delivery did: its outcome (`processed`, `duplicate`,
    `ignored`, `quarantined`; `not_quarantined` for a reprocessing that found nothing
    to do), the quarantine reason if it was quarantined, and for a processed
    revocation how many tokens it revoked."""

    outcome: str
    reason: events.QuarantineReason | None = None
    revoked: int | None = None


def _recorded(outcome: str, row: rows.Row, revoked: int | None = None) -> Recorded:
    if outcome == "id_conflict":
        return Recorded("quarantined", "id_conflict")
    if outcome == "quarantined":
        return Recorded("quarantined", cast(events.QuarantineReason, row.quarantine_reason))
    return Recorded(outcome, None, revoked)


async def record_rows(
    target: db.Database | db.Connection,
    sealer: vault.Sealer,
    batch: list[rows.Row],
    *,
    channel: str,
    http_delivery: bool,
) -> list[Recorded]:
    """Record several rows in one statement and one transaction (`target`: the pool,
    or a connection whose transaction the caller holds); each one's outcome, in order.

    A revocation prefix longer than the stored 15-character one cannot be compared in
    SQL: a row that needs such a check comes back `recheck` with nothing written; it
    is checked here, in memory, and the group sent again (sql/0001_baseline.sql)."""
    while True:
        records = await _fetch(target, batch, channel, http_delivery)
        if all(r["outcome"] != "recheck" for r in records):
            if isinstance(target, db.Database) and any(
                r["outcome"] == "duplicate" for r in records
            ):
                # A duplicate writes nothing, so its commit waited for no standby; the
                # first copy may be committed on the primary alone (its wait for the
                # synchronous standby cancelled, its sender answered 503). A write
                # whose commit waits for the standby proves the first copy is there
                # too before the 200 (docs/design.md §9, Failover: a 200 survives it).
                await target.fetchval("confirm_replicated")
            return [
                _recorded(r["outcome"], row, r["revoked"])
                for r, row in zip(records, batch, strict=True)
            ]
        # Each pass checks at least one more row, and a checked row is never sent
        # back: this ends.
        batch = [
            await _checked(target, sealer, row) if r["outcome"] == "recheck" else row
            for r, row in zip(records, batch, strict=True)
        ]


async def _fetch(
    target: db.Database | db.Connection, batch: list[rows.Row], channel: str, http: bool
) -> list[Any]:
    records = [row.as_record() for row in batch]
    if isinstance(target, db.Database):
        return await target.fetch("record_events", records, channel, http)
    return await target.fetch(db.QUERIES["record_events"], records, channel, http)


async def _query(target: db.Database | db.Connection, name: str, *args: Any) -> list[Any]:
    if isinstance(target, db.Database):
        return await target.fetch(name, *args)
    return await target.fetch(db.QUERIES[name], *args)


async def _checked(
    target: db.Database | db.Connection, sealer: vault.Sealer, row: rows.Row
) -> rows.Row:
    """The row with `spared` filled in: what its prefix check found NOT to match (the
    tokens a long revocation prefix does not start, or the remembered long prefixes
    this onboarding's token does not start with). Tokens are opened here, in memory;
    only their ids and the prefixes go to SQL."""
    if row.kind == "onboarding":
        assert row.token_sealed is not None
        assert row.token_id is not None
        remembered = await _query(
            target, "revocations_to_check", row.client_id, row.environment, row.prefix
        )
        token = sealer.open_token(str(row.token_id), row.token_sealed)
        spared = [r["event_key"] for r in remembered if not token.startswith(r["token_prefix"])]
    else:
        assert row.prefix is not None
        candidates = await _query(
            target, "tokens_to_check", row.client_id, row.environment, row.prefix
        )
        # A token whose value is gone (retention, erasure) cannot be checked: unsure,
        # so it is revoked (not spared).
        spared = [
            c["id"]
            for c in candidates
            if c["token_sealed"] is not None
            and not sealer.open_token(c["id"], c["token_sealed"]).startswith(row.prefix)
        ]
    return row._replace(spared=spared)


async def record_delivery(
    record: Callable[[rows.Row], Awaitable[Recorded]],
    sealer: vault.Sealer,
    event: events.Event,
    arrival: rows.Arrival,
    *,
    replaces: str | None = None,
) -> tuple[Recorded, events.Event]:
    """Record one delivery through `record` (the group committer's, or `record_rows`
    on one row); what it did, and the event as finally stored.

    A value our own checks let through and Postgres refused: the delivery is kept all
    the same, as the bytes it came as, quarantined `unstorable_value`; if even its id
    or type is what Postgres refuses, under its body hash alone. What is left after
    that is our fault (InternalError: a 503, the sender retries)."""
    try:
        return await record(rows.prepare(sealer, event, arrival, replaces=replaces)), event
    except errors.UnstorableValue as exc:
        for named in (True, False):
            event = rows.unstorable(event, exc.message, keep_names=named)
            try:
                prepared = rows.prepare(sealer, event, arrival, replaces=replaces)
                return await record(prepared), event
            except errors.UnstorableValue:
                continue
        raise errors.InternalError("could not store the delivery, retry later") from exc

"""The stored deliveries as operators meet them: list, show (redacted), and reprocess
the quarantined ones under the current code and configuration.

Reprocessing reads the sealed original bytes again, exactly as the webhook would
now: the test/live verdict is re-derived from the stored signature header and the
secrets configured now (a secret moved out of `RECEIVER_TEST_WEBHOOK_SECRETS` is a
config fix that changes it), falling back to what was decided at arrival when no
configured secret verifies it any more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog

from receiver import config, db, errors, redaction, signing, vault
from receiver.lifecycle import audit, events, rows, store

log = structlog.get_logger(__name__)

STATUSES = ("processed", "ignored", "quarantined", "dismissed")
LIST_COLUMNS = ("key", "type", "status", "reason", "test", "received_at", "detail")
_REDACTOR = redaction.Redactor()
_SEALED = frozenset({"body_sealed", "sealed_for"})


async def listing(
    database: db.Database,
    *,
    status: str | None = None,
    reason: str | None = None,
    event_type: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Stored deliveries, newest first: metadata only, never a body."""
    # One type: its index range, newest first, whatever plan is reused.
    query = "list_events" if event_type is None else "list_events_of_type"
    rows = await database.fetch(query, status, reason, event_type, limit)
    return [db.plain(row) for row in rows]


async def show(
    database: db.Database, keyring: vault.Keyring, event_id: str
) -> list[dict[str, Any]]:
    """Every stored delivery under `event_id` (its key, or its envelope id: an id
    conflict keeps both), each with its body redacted: tokens cut to their prefix.

    A body that is not JSON has no stored copy to show; it is opened in memory and
    shown as text, masked the same way."""
    rows = await database.fetch("show_event", event_id)
    shown = []
    for row in rows:
        entry = db.plain(row, leave_out=_SEALED)
        if row["body_redacted"] is not None:
            entry["body"] = json.loads(row["body_redacted"])
        else:
            raw = keyring.open(row["body_sealed"], vault.event_associated_data(row["sealed_for"]))
            # As a reader would read it: a UTF-16 body as UTF-16 (its tokens masked as
            # such), not as UTF-8 with a replacement character between the letters.
            text = redaction.readings(raw)[-1 if b"\x00" in raw else 0]
            text = text.replace("\x00", "\ufffd")
            entry["body_text"] = _REDACTOR.text(text)
        del entry["body_redacted"]
        shown.append(entry)
    return shown


@dataclass(frozen=True, slots=True)
class Reprocessed:
    """What reprocessing one stored delivery did."""

    key: str
    outcome: str  # processed | ignored | duplicate | quarantined | not_quarantined | not_found
    reason: str | None = None
    detail: str | None = None


async def reprocess(
    database: db.Database,
    settings: config.Settings,
    keys: list[str],
    actor: audit.Actor,
) -> list[Reprocessed]:
    """Re-apply each quarantined delivery in `keys`; one outcome per key, in order.

    Each delivery is its own transaction, and its audit row commits in it: a run
    killed halfway leaves exactly the deliveries it re-applied audited.
    Idempotent: a delivery that left quarantine reports `not_quarantined` next time.
    """
    sealer = vault.Sealer.from_settings(settings)

    async def record(prepared: rows.Row) -> store.Recorded:
        # The lifecycle's one way in, as a webhook delivery takes it, on a connection
        # whose transaction also takes the audit row.
        async with database.connection() as conn, conn.transaction():
            (recorded,) = await store.record_rows(
                conn,
                sealer,
                [prepared],
                channel=settings.notify_channel,
                http_delivery=settings.cache_url is not None,
            )
            assert prepared.replaces is not None
            await _audit(conn, actor, prepared.replaces, recorded.outcome, recorded.reason)
        return recorded

    results = []
    for key in keys:
        found = await database.fetch("event_to_reprocess", key)
        if not found:
            # What was typed, not a stored key: on record as free text is (masked, cut).
            typed = audit.clean(key)
            results.append(await _audited(database, actor, Reprocessed(typed, "not_found")))
            continue
        stored = found[0]
        key = stored["key"]  # as stored: a test delivery's under `test:`
        if stored["status"] != "quarantined":
            results.append(await _audited(database, actor, Reprocessed(key, "not_quarantined")))
            continue
        if stored["body_sealed"] is None:  # erased (receiver clients erase)
            results.append(await _audited(database, actor, Reprocessed(key, "body_dropped")))
            continue
        body = sealer.keyring.open(
            stored["body_sealed"], vault.event_associated_data(stored["sealed_for"])
        )
        arrival = rows.Arrival(
            body=body,
            is_test=_is_test_now(settings, stored, body),
            test_header=bool(stored["test_header"]),
            signature=stored["signature"],
        )
        recorded, event = await store.record_delivery(
            record, sealer, events.read(body, is_test=arrival.is_test), arrival, replaces=key
        )
        outcome = "id_conflict" if recorded.reason == "id_conflict" else recorded.outcome
        result = _result(key, outcome, event)
        log.info("event_reprocessed", event_id=key, outcome=result.outcome, reason=result.reason)
        results.append(result)
    return results


async def _audit(
    conn: db.Connection, actor: audit.Actor, key: str, outcome: str, reason: str | None
) -> None:
    await audit.audit(
        conn,
        actor,
        "events_reprocess",
        event_key=key,
        detail={"outcome": outcome, "reason": reason},
    )


async def _audited(database: db.Database, actor: audit.Actor, result: Reprocessed) -> Reprocessed:
    # Nothing changed, but the attempt is on record all the same.
    async with database.connection() as conn, conn.transaction():
        await _audit(conn, actor, result.key, result.outcome, result.reason)
    return result


def _result(key: str, outcome: str, event: events.Event) -> Reprocessed:
    if outcome == "id_conflict":
        return Reprocessed(key, "quarantined", "id_conflict", "id: already used by other content")
    if outcome == "quarantined" and event.quarantine is not None:
        return Reprocessed(key, "quarantined", event.quarantine.reason, event.quarantine.detail)
    return Reprocessed(key, outcome)


def _is_test_now(settings: config.Settings, row: Any, body: bytes) -> bool:
    if row["test_header"]:
        return True
    header = row["signature"]
    try:
        # The stored header is checked for which secret made it, not for freshness.
        timestamp, _ = signing.parse(header or "")
        _, signed_by = signing.authenticate(
            header, body, settings.webhook_secret_sets(), settings.signature_tolerance, timestamp
        )
    except errors.InvalidSignature:
        return bool(row["is_test"])
    return signed_by == "test"


async def quarantined_keys(
    database: db.Database, *, reason: str | None = None, limit: int = 10_000
) -> list[str]:
    """Keys of the deliveries still quarantined (optionally for one reason), oldest first."""
    rows = await database.fetch("quarantined_keys", reason, limit)
    return [row["key"] for row in rows]


@dataclass(frozen=True, slots=True)
class Dismissal:
    """What `events dismiss` did with one key: `dismissed` now, `already_dismissed`
    (a second run: no change, no audit row), `not_quarantined` (applied, say) or
    `unknown`; `ok` for the first two."""

    key: str
    outcome: str
    quarantine_reason: str | None = None
    status: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("dismissed", "already_dismissed")


async def dismiss(database: db.Database, actor: audit.Actor, keys: list[str]) -> list[Dismissal]:
    """Close the named quarantined deliveries for good, each audited in the same
    transaction; one outcome per key (a key not quarantined is left alone)."""
    done: list[Dismissal] = []
    async with database.connection() as conn, conn.transaction():
        for key in keys:
            row = await conn.fetchrow(db.QUERIES["dismiss_event"], key)
            if row is None:
                found = await conn.fetchrow(db.QUERIES["event_status_by_key"], key)
                if found is None:
                    done.append(Dismissal(key, "unknown"))
                elif found["status"] == "dismissed":
                    done.append(Dismissal(found["key"], "already_dismissed", status="dismissed"))
                else:
                    done.append(Dismissal(found["key"], "not_quarantined", status=found["status"]))
                continue
            done.append(Dismissal(row["key"], "dismissed", row["quarantine_reason"]))
            await audit.audit(
                conn,
                actor,
                "events_dismiss",
                client_id=row["client_id"],
                event_key=row["key"],
                detail={"quarantine_reason": row["quarantine_reason"]},
            )
    return done

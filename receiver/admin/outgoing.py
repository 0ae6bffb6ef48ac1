"""What `receiver replay` sends: events built from a template (`trigger`), read from
files (`send`), or opened from storage with their exact bytes (`resend`). Tokens show
only as prefixes."""

from __future__ import annotations

import json
import secrets
import string
import sys
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from receiver import db, errors, redaction, vault
from receiver.admin import sender
from receiver.lifecycle import events

_ALPHABET = string.ascii_letters + string.digits


def new_test_token() -> str:
    """A fresh, realistic test token."""
    return "tok_test_" + "".join(secrets.choice(_ALPHABET) for _ in range(32))


SUPPORTED = (events.ONBOARDING_COMPLETED, events.TOKEN_REVOKED)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_event(
    event_type: str,
    *,
    client_id: str | None = None,
    token_prefix: str | None = None,
    overrides: Iterable[str] = (),
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """A realistic envelope for `event_type` with a new id; `overrides` are
    `path.to.key=value` (value read as JSON when it parses, else as a string). An event
    type the receiver does not know is refused unless `allow_unknown`."""
    if event_type not in SUPPORTED and not allow_unknown:
        raise errors.UsageError(
            f"unknown event {event_type!r}; supported: {', '.join(SUPPORTED)} "
            "(--allow-unknown sends it anyway, as Debitura might send a new type)"
        )
    client = client_id or f"cli_{uuid.uuid4().hex[:12]}"
    data: dict[str, Any]
    if event_type == events.ONBOARDING_COMPLETED:
        data = {
            "client_id": client,
            "bearer_token": new_test_token(),
            "onboarding_completed_at": _now(),
        }
    elif event_type == events.TOKEN_REVOKED:
        data = {"client_id": client, "revoked_at": _now(), "reason": "client_request"}
        if token_prefix:
            data["token_prefix"] = token_prefix
    else:
        data = {}
    document = {
        "id": f"evt_{uuid.uuid4().hex}",
        "specVersion": "1.0",
        "event": event_type,
        "timestamp": _now(),
        "data": data,
    }
    for override in overrides:
        _apply(document, override)
    return document


def _apply(document: dict[str, Any], override: str) -> None:
    path, sep, raw = override.partition("=")
    if not sep or not path:
        raise errors.UsageError(f"--set {override!r}: expected path.to.key=value")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    *parents, last = path.split(".")
    target = document
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise errors.UsageError(f"--set {path}: {part!r} is not an object")
        target = child
    target[last] = value


def from_document(document: dict[str, Any], body: bytes | None = None) -> sender.Outgoing:
    """An event ready to send; shows its token only as a prefix."""
    data = document.get("data") if isinstance(document.get("data"), dict) else {}
    assert isinstance(data, dict)
    prefix = None
    token = data.get("bearer_token")
    if isinstance(token, str) and redaction.TOKEN_PATTERN.fullmatch(token):
        prefix = redaction.token_prefix(token)
    elif isinstance(data.get("token_prefix"), str):
        # Cut to the public length: a sender may have put a whole token there.
        prefix = redaction.token_prefix(data["token_prefix"])
    event_id = document.get("id")
    return sender.Outgoing(
        body=body if body is not None else json.dumps(document).encode(),
        event_type=str(document.get("event")),
        event_id=str(event_id) if event_id is not None else None,
        token_prefix=prefix,
    )


def read_events(sources: list[str]) -> list[sender.Outgoing]:
    """Events from JSON files (one object or a list), NDJSON files, or `-` (stdin).
    Everything is checked before anything is sent."""
    found: list[sender.Outgoing] = []
    for source in sources:
        found.extend(_read_source(source))
    if not found:
        raise errors.UsageError("no events in the input")
    return found


def _read_source(source: str) -> list[sender.Outgoing]:
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise errors.UsageError(f"{name}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise errors.UsageError(f"{name}: not UTF-8 text") from None
    stripped = text.strip()
    try:
        whole = json.loads(stripped) if stripped else None
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return [_checked(whole, name, stripped.encode())]
    if isinstance(whole, list):
        return [_checked(item, f"{name}[{i}]") for i, item in enumerate(whole)]
    result = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except json.JSONDecodeError as exc:
            raise errors.UsageError(
                f"{name}:{number}: invalid JSON ({exc.msg}); expected one JSON object per line"
            ) from None
        result.append(_checked(document, f"{name}:{number}", line.strip().encode()))
    return result


def _checked(document: Any, where: str, body: bytes | None = None) -> sender.Outgoing:
    if not isinstance(document, dict):
        raise errors.UsageError(f"{where}: an event must be a JSON object")
    if not isinstance(document.get("event"), str) or not document["event"]:
        raise errors.UsageError(f"{where}: the event has no 'event' field (its type)")
    return from_document(document, body)


async def stored_events(
    database: db.Database,
    keyring: vault.Keyring,
    *,
    event_ids: list[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    event_type: str | None = None,
    status: str | None = None,
    limit: int = 10_000,
) -> list[tuple[dict[str, Any], sender.Outgoing]]:
    """Stored events with their exact original bytes, opened in memory only. Events
    whose body was dropped (retention, erasure) cannot be re-sent and are left out."""
    rows = await database.fetch("stored_events", event_ids, since, until, event_type, status, limit)
    found = []
    for row in rows:
        if row["body_sealed"] is None:
            continue
        body = keyring.open(row["body_sealed"], vault.event_associated_data(row["sealed_for"]))
        try:  # a quarantined body may be anything: it is re-sent as it came
            document = json.loads(body)
        except ValueError:
            document = None
        found_prefix = from_document(
            document if isinstance(document, dict) else {}, body
        ).token_prefix
        # The stored key and type, not the body's: they are clean of tokens by construction.
        sending = sender.Outgoing(
            body=body, event_type=row["type"], event_id=row["key"], token_prefix=found_prefix
        )
        # Judged on what a reader of the body sees (escaped, UTF-16, …), not the bytes:
        # `tok\u005flive_…` is a live token to whoever parses it.
        environments = redaction.token_environments(body)
        meta = {
            "event_id": row["key"],
            "type": row["type"],
            "status": row["status"],
            "received_at": db.iso(row["received_at"]),
            "live_token": "live" in environments,
        }
        found.append((meta, sending))
    return found

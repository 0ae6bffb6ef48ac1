"""The console's pages (GET): each reads through the functions the CLI reads through
(`receiver status`, `events list|show`, `tokens list`, `signals list`, `audit list`),
each bounded by a limit."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from aiohttp import web

from receiver import config, errors, vault
from receiver.admin import inbox, status, tokens
from receiver.debitura import rotation
from receiver.lifecycle import audit, events
from receiver.service import admin_api, probes, state
from receiver.service.webconsole import render, session
from receiver.signals import outbox

LIMITS = (50, 100, 500, 1000)
ROTATIONS_DUE_COUNTED = 100  # "100+" beyond
ROTATIONS_DUE_SHOWN = 10


def operator(
    request: web.Request, *accepted: str
) -> tuple[config.Settings, session.Session | None]:
    """The settings in force and the signed-in operator (None: not signed in); the
    console's absence (404) anywhere but the admin listener with admin tokens set.

    The page takes the query keys `accepted` and no other: a misspelt filter
    (`?stauts=dead`) is a 400, not a page that looks filtered and is not."""
    settings = admin_api.admin_settings(request)
    if not set(request.query).issubset(accepted):
        takes = ", ".join(accepted) if accepted else "none"
        raise errors.InvalidRequest(f"unknown query parameter: this page takes {takes}")
    return settings, session.current(request, settings)


def see_other(location: str) -> web.Response:
    """A redirect after a form, or to the sign-in page."""
    return web.Response(status=303, headers={"Location": location})


def _limit(request: web.Request) -> int:
    """One of the sizes the pages offer (100 when not given); anything else is refused,
    read as text (int() would take other digits, and refuse 4,300 of them)."""
    given = request.query.get("limit", "")
    if not given:
        return LIMITS[1]
    offered = {str(n): n for n in LIMITS}
    if given not in offered:
        raise errors.InvalidRequest(f"limit must be one of {', '.join(offered)}")
    return offered[given]


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query.get(name, "")
    if value and value not in allowed:
        raise errors.InvalidRequest(f"{name} must be one of {', '.join(allowed)}")
    return value or None


def _text(request: web.Request, name: str) -> str | None:
    return request.query.get(name, "").strip()[:200] or None


# The notice after a form, as the forms' redirects write it (actions.dismiss,
# actions.reprocess, actions.retry_signal) and nothing else: a link must not make the
# console's own status box say something of its own ("session expired: sign in at …").
_DONE = re.compile(
    r"dismissed|already dismissed|not an open quarantine: nothing done"
    r"|reprocessed: [a-z_]+(?: \([a-z_]+\))?"
)
_RETRIED = re.compile(r"[0-9]{1,6}")


def _notice(request: web.Request, name: str, said: re.Pattern[str]) -> str | None:
    given = request.query.get(name, "")
    if given and not said.fullmatch(given):
        raise errors.InvalidRequest(f"{name} says only what a console form says")
    return given or None


async def to_overview(request: web.Request) -> web.Response:
    """`/console` (as typed) leads to `/console/`."""
    operator(request)
    return see_other("/console/")


async def overview(request: web.Request) -> web.Response:
    """Health, traffic of the last hour, and everything that needs an operator."""
    settings, signed_in = operator(request)
    if signed_in is None:
        return see_other("/console/sign-in")
    database = request.app[state.DATABASE]
    try:
        await probes.check_ready(request.app)
        readiness = None
    except errors.ReceiverError as exc:
        readiness = exc.message
    report = await status.gather(settings, database)
    minutes: dict[str, dict[str, int]] = defaultdict(dict)
    totals = dict.fromkeys(inbox.STATUSES, 0)
    for row in await database.fetch("deliveries_per_minute"):
        minute = row["minute"].astimezone(UTC).strftime("%H:%M")
        minutes[minute][row["status"]] = row["n"]
        totals[row["status"]] = totals.get(row["status"], 0) + row["n"]
    busiest = max((sum(m.values()) for m in minutes.values()), default=0)
    health: dict[str, dict[str, int]] = {env: defaultdict(int) for env in vault.ENVIRONMENTS}
    for row in await database.fetch("token_health"):
        health[row["environment"]][row["kind"]] += row["n"]
    due = None
    if settings.token_rotate_after_days > 0:
        due = await database.fetch(
            "tokens_due_rotation",
            timedelta(days=settings.token_rotate_after_days),
            list(vault.ENVIRONMENTS),
            ROTATIONS_DUE_COUNTED + 1,
            *rotation.FIRST_DUE_PAGE,
        )
    return render.page(
        request,
        "overview.html",
        signed_in,
        readiness=readiness,
        report=report,
        attention=status.attention(report, settings),
        minutes=sorted(minutes.items()),
        totals=totals,
        busiest=busiest,
        token_counts=await database.fetch("token_status_counts"),
        health=health,
        due=due,
        due_shown=ROTATIONS_DUE_SHOWN,
        due_counted=ROTATIONS_DUE_COUNTED,
        reconciled={
            env: None if at is None else datetime.fromtimestamp(at, UTC).isoformat()
            for env, at in report["reconcile"]["environments"].items()
        },
    )


async def quarantine(request: web.Request) -> web.Response:
    """Stored deliveries (the open quarantine unless told otherwise), newest first."""
    _, signed_in = operator(request, "status", "reason", "type", "limit")
    if signed_in is None:
        return see_other("/console/sign-in")
    shown = _choice(request, "status", inbox.STATUSES) or "quarantined"
    reason = _choice(request, "reason", events.QUARANTINE_REASONS)
    event_type = _text(request, "type")
    limit = _limit(request)
    rows = await inbox.listing(
        request.app[state.DATABASE], status=shown, reason=reason, event_type=event_type, limit=limit
    )
    return render.page(
        request,
        "quarantine.html",
        signed_in,
        rows=rows,
        shown=shown,
        statuses=inbox.STATUSES,
        reason=reason,
        reasons=events.QUARANTINE_REASONS,
        event_type=event_type,
        limit=limit,
        limits=LIMITS,
        full=len(rows) == limit,
    )


async def delivery(request: web.Request) -> web.Response:
    """One stored delivery: its detail and its body, redacted; dismiss and reprocess."""
    settings, signed_in = operator(request, "key", "done")
    if signed_in is None:
        return see_other("/console/sign-in")
    key = request.query.get("key", "")
    shown = await inbox.show(
        request.app[state.DATABASE], vault.Sealer.from_settings(settings).keyring, key
    )
    if not key or not shown:
        raise errors.NotFound("no stored delivery with that key")
    for entry in shown:
        if "body" in entry:
            entry["body_text"] = json.dumps(entry.pop("body"), indent=2, ensure_ascii=False)
    return render.page(
        request,
        "delivery.html",
        signed_in,
        key=key,
        entries=shown,
        done=_notice(request, "done", _DONE),
    )


async def token_inventory(request: web.Request) -> web.Response:
    """The token inventory by prefix: metadata only (there is no reveal here)."""
    _, signed_in = operator(request, "client", "status", "environment", "limit")
    if signed_in is None:
        return see_other("/console/sign-in")
    limit = _limit(request)
    client_id = _text(request, "client")
    token_status = _choice(request, "status", tokens.STATUSES)
    environment = _choice(request, "environment", vault.ENVIRONMENTS)
    rows = await tokens.inventory(
        request.app[state.DATABASE],
        client_id=client_id,
        status=token_status,
        environment=environment,
        limit=limit,
    )
    return render.page(
        request,
        "tokens.html",
        signed_in,
        rows=rows,
        client_id=client_id,
        token_status=token_status,
        statuses=tokens.STATUSES,
        environment=environment,
        environments=vault.ENVIRONMENTS,
        limit=limit,
        limits=LIMITS,
        full=len(rows) == limit,
    )


async def signals(request: web.Request) -> web.Response:
    """The invalidation outbox: counts, then the newest signals (dead ones retryable)."""
    _, signed_in = operator(request, "status", "limit", "retried")
    if signed_in is None:
        return see_other("/console/sign-in")
    database = request.app[state.DATABASE]
    shown = _choice(request, "status", outbox.STATUSES)
    limit = _limit(request)
    rows = await outbox.listing(database, status=shown, limit=limit)
    return render.page(
        request,
        "signals.html",
        signed_in,
        counts=sorted((await outbox.counts(database)).items()),
        rows=rows,
        shown=shown,
        statuses=outbox.STATUSES,
        limit=limit,
        limits=LIMITS,
        full=len(rows) == limit,
        retried=_notice(request, "retried", _RETRIED),
    )


def _moment(request: web.Request, name: str) -> datetime | None:
    given = request.query.get(name, "")
    if not given:
        return None
    try:
        at = datetime.fromisoformat(given)
    except ValueError:
        raise errors.InvalidRequest(f"{name} must be a time (YYYY-MM-DDTHH:MM, UTC)") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def audit_trail(request: web.Request) -> web.Response:
    """The audit trail, newest first, by action, actor, client and time."""
    settings, signed_in = operator(request, "action", "actor", "client", "since", "until", "limit")
    if signed_in is None:
        return see_other("/console/sign-in")
    limit = _limit(request)
    filters: dict[str, Any] = {
        "action": _choice(request, "action", audit.ACTIONS),
        "actor": _text(request, "actor"),
        "client_id": _text(request, "client"),
        "since": _moment(request, "since"),
        "until": _moment(request, "until"),
    }
    rows = await audit.audit_listing(
        request.app[state.DATABASE], vault.Sealer.from_settings(settings), limit=limit, **filters
    )
    for row in rows:
        detail = row["detail"]
        if not isinstance(detail, str):
            detail = json.dumps(detail)
        row["detail"] = "" if detail in ("null", "{}") else detail
    return render.page(
        request,
        "audit.html",
        signed_in,
        rows=rows,
        actions=audit.ACTIONS,
        limit=limit,
        limits=LIMITS,
        full=len(rows) == limit,
        since=request.query.get("since", "")[:32],
        until=request.query.get("until", "")[:32],
        **{k: v for k, v in filters.items() if k not in ("since", "until")},
    )


_STYLESHEET = resources.files("receiver.service.webconsole").joinpath("static/console.css")


async def stylesheet(request: web.Request) -> web.Response:
    """The console's one stylesheet (no inline style anywhere: the policy forbids it)."""
    admin_api.admin_settings(request)
    return web.Response(body=_STYLESHEET.read_bytes(), content_type="text/css", charset="utf-8")

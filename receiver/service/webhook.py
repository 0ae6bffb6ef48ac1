"""`POST /webhooks/debitura`: verify, read, record, answer (docs/design.md §2).

Checks run cheapest first and before any parsing: size, content type, then the
HMAC over the raw bytes. Everything before the signature may refuse (401/413/415);
nothing after it does. A verified delivery is authentic: it is stored and answered
200, quarantined when it cannot be applied, and only an unavailable database makes
it a 503 (Debitura retries those; it switches a subscription off after 8 failures).
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import http_exceptions, web

from receiver import errors, metrics, signing
from receiver.lifecycle import events, rows
from receiver.service import server, state

log = structlog.get_logger(__name__)

TOKENS_REVOKED_HEADER = "X-Receiver-Tokens-Revoked"
TEST_HEADER = "X-Debitura-Test"


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def _read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    try:
        if request.content.is_eof():
            # Already here in full (a delivery usually comes in one packet with its
            # headers): nothing to wait for, so no timer to arm and cancel.
            return await request.read()
        # A sender that trickles its body must not hold a connection forever.
        async with asyncio.timeout(seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.BodyTooLarge(f"body is larger than {limit} bytes") from None
    except TimeoutError:
        raise errors.RequestTimeout("body was not received in time") from None
    except (web.RequestPayloadError, http_exceptions.HttpProcessingError):
        # A Content-Encoding the body does not match (gzip that is not gzip, …).
        raise errors.InvalidRequest(
            "body could not be decoded as its Content-Encoding says"
        ) from None


async def receive(request: web.Request) -> web.Response:
    """Receive one Debitura webhook delivery (at most RECEIVER_MAX_REQUESTS_IN_FLIGHT
    authentic deliveries at once; past that, a 503 at once).

    The body is read and its signature checked before the delivery takes one of
    those slots: a stranger trickling a body, or sending a forged one, holds a
    connection (bounded by RECEIVER_MAX_CONNECTIONS and the body timeout) but never
    a slot an authentic delivery needs."""
    settings = request.app[state.SETTINGS]
    deadline = asyncio.get_running_loop().time() + settings.request_deadline_seconds
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise errors.BodyTooLarge(f"body is larger than {limit} bytes")
    if not _is_json(request.content_type):
        raise errors.UnsupportedMediaType("content type must be application/json")
    body = await _read_body(request, limit, settings.body_timeout_seconds)
    signature = request.headers.get(signing.SIGNATURE_HEADER)
    secret_sets = request.app[state.SECRET_SETS]
    _, signed_by = signing.authenticate(signature, body, secret_sets, settings.signature_tolerance)
    server.note_authentic(request)
    load = request.app[state.LOAD]
    if load.in_flight >= settings.max_requests_in_flight:
        metrics.REQUESTS_REFUSED.inc()
        raise errors.Overloaded("too many deliveries in flight, retry shortly")
    load.in_flight += 1
    try:
        return await _receive(request, body, signature, signed_by, deadline)
    finally:
        load.in_flight -= 1


async def _receive(
    request: web.Request, body: bytes, signature: str | None, signed_by: str, deadline: float
) -> web.Response:
    # From here on the delivery is authentic: nothing below refuses it.
    test_header = request.headers.get(TEST_HEADER, "").strip().lower() == "true"
    arrival = rows.Arrival(
        body=body,
        is_test=test_header or signed_by == "test",
        test_header=test_header,
        # Verified, so it parses; only what verifies it is kept.
        signature=signing.stored_form(signature) if signature is not None else None,
    )
    event = events.read(body, is_test=arrival.is_test)
    structlog.contextvars.bind_contextvars(
        event_id=event.public_id,
        event_type=event.type,
        client_id=event.named_client_id,
        test=arrival.is_test,
    )
    # A delivery Postgres refuses a value of comes back quarantined (the committer
    # keeps it): an authentic delivery is never answered 4xx.
    recorded, event = await request.app[state.COMMITTER].record_delivery(
        event, arrival, deadline=deadline
    )
    outcome, reason = recorded.outcome, recorded.reason
    dispatcher = request.app.get(state.DISPATCHER)
    if dispatcher is not None and outcome == "processed" and event.data is not None:
        # A signal may have been queued: deliver it now, not at the poll.
        dispatcher.wake(revocation=isinstance(event.data, events.TokenRevocation))
    structlog.contextvars.bind_contextvars(outcome=outcome)
    metrics.child(metrics.EVENTS, events.type_label(event.type), outcome).inc()
    metrics.LAST_EVENT[arrival.is_test].set_to_current_time()
    if reason is None:
        answer = web.json_response({"status": outcome, "event_id": event.public_id})
        if recorded.revoked is not None:
            # Outside the contract's body: how many tokens this revocation revoked (0:
            # it matched none; the cache was signalled all the same).
            answer.headers[TOKENS_REVOKED_HEADER] = str(recorded.revoked)
            structlog.contextvars.bind_contextvars(tokens_revoked=recorded.revoked)
        return answer
    metrics.child(metrics.QUARANTINED, reason).inc()
    detail = "id already used by a delivery with other content"
    if event.quarantine is not None and reason == event.quarantine.reason:
        detail = event.quarantine.detail
    log.warning("event_quarantined", reason=reason, detail=detail)
    return web.json_response(
        {"status": "quarantined", "event_id": event.public_id, "reason": reason}
    )

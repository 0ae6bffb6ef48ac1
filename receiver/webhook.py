"""`POST /webhooks/debitura`: verify, parse, record, answer (DESIGN §2).

Checks run cheapest first and before any parsing: size, content type, then the
HMAC over the raw bytes. Only a verified body is parsed.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from receiver import errors, events, metrics, signing, state, store

log = structlog.get_logger(__name__)

TEST_HEADER = "X-Debitura-Test"


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def _read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    try:
        # A sender that trickles its body must not hold a connection forever.
        async with asyncio.timeout(seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.BodyTooLarge(f"body is larger than {limit} bytes") from None
    except TimeoutError:
        raise errors.RequestTimeout("body was not received in time") from None


async def receive(request: web.Request) -> web.Response:
    """Receive one Debitura webhook delivery."""
    settings = request.app[state.SETTINGS]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise errors.BodyTooLarge(f"body is larger than {limit} bytes")
    if not _is_json(request.content_type):
        raise errors.UnsupportedMediaType("content type must be application/json")
    body = await _read_body(request, limit, settings.body_timeout_seconds)
    signing.verify(
        request.headers.get(signing.SIGNATURE_HEADER),
        body,
        [s.get_secret_value() for s in settings.webhook_secrets],
        settings.signature_tolerance,
    )
    event = events.parse(body)
    structlog.contextvars.bind_contextvars(
        event_id=event.key, event_type=event.type, client_id=event.client_id
    )
    row = store.prepare(
        request.app[state.SEALER],
        event,
        body,
        is_test=request.headers.get(TEST_HEADER, "").lower() == "true",
    )
    outcome = await request.app[state.COMMITTER].record(row)
    dispatcher = request.app.get(state.DISPATCHER)
    if dispatcher is not None and outcome == "processed" and event.data is not None:
        dispatcher.wake()  # a signal may have been queued: deliver it now, not at the poll
    structlog.contextvars.bind_contextvars(outcome=outcome)
    metrics.EVENTS.labels(type=metrics.event_type(event.type), outcome=outcome).inc()
    return web.json_response({"status": outcome, "event_id": event.key})

"""The one middleware: a request id, the JSON error body for every error, and the
canonical log line (one per request)."""

from __future__ import annotations

import os
import random
import re
import time

import structlog
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.typedefs import Handler, Middleware

from receiver import errors, metrics, redaction
from receiver.log import PerSource, Throttle
from receiver.service import forwarded

log = structlog.get_logger(__name__)

_ROUTINE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# Workers are started as new processes (`serve --workers`), never forked from this
# one: the id is read once, not with a system call per request.
_PID = os.getpid()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Forged or stale deliveries cost a stranger nothing to send: the first from a
# source in 10 s gets its request line, the rest a count in one summary line.
_REFUSED_SIGNATURES = PerSource("request_signature_refused")
_DISCONNECTED = Throttle("client_disconnected")
_HTTP_ERRORS: dict[int, type[errors.ReceiverError]] = {
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.BodyTooLarge,
}


def _error_response(exc: errors.ReceiverError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


def _from_http(exc: web.HTTPException) -> errors.ReceiverError:
    kind = _HTTP_ERRORS.get(exc.status)
    if kind is not None:
        return kind(exc.reason.lower())
    if exc.status >= 500:
        return errors.InternalError("internal error, retry later")
    return errors.InvalidRequest(exc.reason.lower())


async def _refuse_token_in_url(_: web.Request) -> web.StreamResponse:
    raise errors.InvalidRequest("tokens must never be sent in a URL")


@web.middleware
async def canonical_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind a request id, turn every error into the JSON error body, and write one
    log line per request (the canonical log line)."""
    structlog.contextvars.clear_contextvars()
    given = request.headers.get("X-Request-Id", "")
    # A request id only has to be unique among log lines, not unguessable: no
    # os.urandom system call per request (uuid4 showed in the profile: bench/README.md).
    request_id = given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    error_code = None
    # A token in a URL (path or query) ends up in proxies' logs: refuse it, and never
    # hand that path to our own logger either.
    # Judged as a proxy or a reader would read it: percent-decoded (`tok%5Flive%5F…`,
    # twice for a doubly encoded one) and with `+` as a space.
    token_in_url = any(
        redaction.TOKEN_PATTERN.search(form) is not None
        for form in redaction.url_readings(request.raw_path)
    )
    path = "[refused: token in URL]" if token_in_url else request.path
    response: web.StreamResponse
    quiet = False
    try:
        response = await (_refuse_token_in_url(request) if token_in_url else handler(request))
    except errors.ReceiverError as exc:
        error_code = exc.code
        if isinstance(exc, errors.InvalidSignature):
            metrics.child(metrics.SIGNATURE_FAILURES, exc.reason).inc()
            # Which check failed, from a fixed set: missing, malformed, stale, future,
            # mismatch (the answer's body stays as terse as before).
            structlog.contextvars.bind_contextvars(signature_failure=exc.reason)
            quiet = not _REFUSED_SIGNATURES.allow(forwarded.client_address(request))
        response = _error_response(exc)
    except web.HTTPException as exc:
        mapped = _from_http(exc)
        error_code = mapped.code
        response = _error_response(mapped)
        if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
    except ConnectionError:
        # The sender went away mid-body: nobody is left to answer, and it is no fault
        # of ours (aiohttp's payload raises ConnectionResetError).
        # Also what a connection cut for a trickled body looks like from here: a flood
        # of those gets ten lines, then a count.
        quiet = not _DISCONNECTED.allow()
        if not quiet:
            log.info("client_disconnected", remote=forwarded.client_address(request))
        error_code = "client_disconnected"
        response = _error_response(errors.InvalidRequest("client disconnected"))
    except Exception:
        # A fault of ours, never of the input: answered 503 so the sender retries
        # (after a fix) rather than counting a 500 towards switching us off.
        log.exception("request_failed")
        metrics.INTERNAL_ERRORS.inc()
        error_code = "internal_error"
        response = _error_response(errors.InternalError("internal error, retry later"))
    response.headers["X-Request-Id"] = request_id
    elapsed = time.perf_counter() - started
    route = _route_label(request)
    metrics.child(metrics.REQUESTS, route, str(response.status)).inc()
    metrics.child(metrics.REQUEST_SECONDS, route).observe(elapsed)
    # Probes and scrapes that went well are routine: at debug, so a crowd of them
    # neither floods the log nor takes the event loop from deliveries.
    routine = route in _ROUTINE_ROUTES and response.status < 400
    if quiet:
        return response
    (log.debug if routine else log.info)(
        "request",
        method=request.method,
        path=path,
        status=response.status,
        error=error_code,
        duration_ms=round(elapsed * 1000, 2),
        remote=forwarded.client_address(request),
        pid=_PID,  # which process answered (serve --workers)
    )
    return response


def _route_label(request: web.Request) -> str:
    # The route's template, never the raw path: a path is client input.
    resource = request.match_info.route.resource
    if resource is None or resource.name == UNMATCHED:
        return UNMATCHED
    return resource.canonical


UNMATCHED = "unmatched"


async def unrouted(request: web.Request) -> web.StreamResponse:
    """The catch-all route's handler (it exists so that an unmatched path has our
    expectation handler too): 404, or 405 naming the methods the path does have, as
    aiohttp's router answers."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.name != UNMATCHED:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


async def expect_continue(request: web.Request) -> None:
    """The expectation handler of every route: `100-continue` is answered as aiohttp
    answers it; any other expectation is ignored, as RFC 9110 (§10.1.1) allows.
    aiohttp's default answers it with a 417 that echoes the header's value, before any
    middleware runs: an authentic delivery refused, with whatever the header held (a
    token, say) in the answer."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.strip().lower() == "100-continue" and request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body has not begun (as aiohttp's own does)


ADMIN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/console"})
ADMIN_PREFIXES = ("/admin/", "/console/")


def on_admin_listener(request: web.Request, admin_port: int | None) -> bool:
    """Whether `request` came in on the admin listener (RECEIVER_ADMIN_PORT): the one
    test of it, for the admin split and the admin API alike."""
    if admin_port is None:
        return False
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return isinstance(sockname, tuple) and sockname[1] == admin_port


def admin_split(admin_port: int) -> Middleware:
    """With `RECEIVER_ADMIN_PORT`, the probes, /metrics, /openapi.json, the admin API
    (/admin/…) and the console (/console/…) answer only on that port, and everything
    else only on the public one (README: Deploying)."""

    @web.middleware
    async def split(request: web.Request, handler: Handler) -> web.StreamResponse:
        on_admin = on_admin_listener(request, admin_port)
        if (request.path in ADMIN_PATHS or request.path.startswith(ADMIN_PREFIXES)) != on_admin:
            raise errors.NotFound("not found")
        return await handler(request)

    return split


async def no_server_version(_: web.Request, response: web.StreamResponse) -> None:
    """No `Server` header naming Python's and aiohttp's versions (aiohttp's default)."""
    response.headers["Server"] = "receiver"

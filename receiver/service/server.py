"""The HTTP server around the app: aiohttp's, except for how it answers requests it
cannot parse (a NUL in a header, a header over the size limit, a broken request line),
and for what a stranger's connection may hold: a new connection has a short deadline
for its first request line and headers, and near the connection cap the oldest idle
connection is closed to make room rather than the newcomer refused (README "Security").

aiohttp answers those below the application, so no middleware sees them: its
default is a `text/plain` body that repeats the parser's message (which quotes the
offending header) and an ERROR log line with a traceback. Here they get the same
JSON error body as everything else and one warning line, truncated. aiohttp offers
no setting for this; its protocol class is chosen by `web_server.Server.__call__`,
so a server subclass picks ours.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import json
from typing import Any, cast

import structlog
from aiohttp import web, web_protocol, web_request, web_server

from receiver import errors, metrics
from receiver.log import Throttle

log = structlog.get_logger(__name__)

_DETAIL_CHARS = 80
# One line per refused connection, up to 10 in 10 s; then one summary line.
_PROTOCOL_ERRORS = Throttle("http_protocol_error")
# After a crowd of connections (this many at once) has thinned to a quarter of its
# peak, the memory their buffers held is handed back to the system (see _trim).
_TRIM_AFTER_PEAK = 256
_TRIM_CHECK_SECONDS = 2.0


_OVER_CAPACITY = errors.Overloaded("too many connections, retry later")
_OVER_CAPACITY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    + f"Retry-After: {_OVER_CAPACITY.retry_after_seconds}\r\n".encode()
    + b"Connection: close\r\nContent-Length: "
    + str(len(json.dumps(_OVER_CAPACITY.body()))).encode()
    + b"\r\n\r\n"
    + json.dumps(_OVER_CAPACITY.body()).encode()
)


class _Protocol(web_protocol.RequestHandler):
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if not isinstance(manager, _Server):
            return
        manager.note_connections()
        if manager.header_seconds is not None:
            # aiohttp's own guard for a connection that has sent no request yet is the
            # keep-alive timeout (75 s by default): a stranger opening connections and
            # trickling headers would hold each that long. Ours is short.
            self._header_deadline = self._loop.call_later(
                manager.header_seconds, self._headers_late
            )
        if manager.max_connections is None:
            return
        if len(manager.connections) > manager.max_connections and not manager.evict_idle(self):
            # Past the cap, with every other connection busy, a connection costs us
            # nothing more than this answer: nothing is read, and the sender is told
            # to come back.
            metrics.CONNECTIONS_REFUSED.inc()
            cast(asyncio.Transport, transport).write(_OVER_CAPACITY_ANSWER)
            self.force_close()
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._request_count == 0 and not self._force_close:
            log.debug("connection_headers_late")
            self.force_close()

    def idle_since(self) -> float | None:
        """When it became idle, if it is: waiting for a request (none begun, or
        between keep-alive requests) with no handler running, so closing it loses
        nobody's delivery."""
        waiter = self._waiter
        if (
            waiter is None
            or waiter.done()
            or self._request_in_progress
            or self._messages
            or self._force_close
        ):
            return None
        # aiohttp sets the keep-alive close time when the connection opens and after
        # each answer: both are when it became idle.
        return self._next_keepalive_close_time - self._keepalive_timeout

    def handle_error(
        self,
        request: web_request.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error: errors.ReceiverError
        if 400 <= status < 500:
            error = errors.InvalidRequest("malformed HTTP request")
        else:
            error = errors.InternalError("internal error, retry later")
        metrics.REQUESTS.labels(route="unparsed", status=str(error.status)).inc()
        if _PROTOCOL_ERRORS.allow():
            log.warning(
                "http_protocol_error",
                status=error.status,
                error=type(exc).__name__ if exc is not None else None,
                detail=(message or "")[:_DETAIL_CHARS],
                remote=request.remote,
            )
        response = web.json_response(error.body(), status=error.status, headers=error.headers())
        response.headers["Server"] = "receiver"  # not aiohttp's, which names versions
        response.force_close()
        return response


class _Server(web_server.Server):
    max_connections: int | None = None
    header_seconds: float | None = None
    _peak = 0
    _trim_check: asyncio.TimerHandle | None = None

    def __call__(self) -> web_protocol.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)

    def note_connections(self) -> None:
        """Called as each connection opens: keeps the peak, and once it is a crowd,
        checks every few seconds whether the crowd has gone."""
        self._peak = max(self._peak, len(self.connections))
        if self._peak >= _TRIM_AFTER_PEAK and self._trim_check is None:
            self._trim_check = self._loop.call_later(_TRIM_CHECK_SECONDS, self._after_crowd)

    def evict_idle(self, newcomer: _Protocol) -> bool:
        """Close the connection that has waited longest for a request, to make room
        for `newcomer`; whether there was one. A crowd of idle strangers cannot keep a
        sender out: each newcomer costs the longest-idle of them its connection."""
        oldest: _Protocol | None = None
        oldest_since = 0.0
        for handler in self._connections:
            if handler is newcomer or not isinstance(handler, _Protocol):
                continue
            since = handler.idle_since()
            if since is not None and (oldest is None or since < oldest_since):
                oldest, oldest_since = handler, since
        if oldest is None:
            return False
        metrics.CONNECTIONS_EVICTED.inc()
        oldest.force_close()
        return True

    def _after_crowd(self) -> None:
        self._trim_check = None
        now = len(self.connections)
        if now > self._peak // 4:
            self._trim_check = self._loop.call_later(_TRIM_CHECK_SECONDS, self._after_crowd)
            return
        released = _trim()
        log.info("connection_crowd_gone", peak=self._peak, now=now, memory_trimmed=released)
        self._peak = now


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _trim() -> bool:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`).

    Written by hand because nothing else does it: the request buffers of a thousand
    slow connections are freed to glibc's heap when they close, but glibc returns
    only the free space at the top of the heap, so the process would keep its peak
    RSS (tests/integration/test_capacity.py). `malloc_trim(0)` also releases the
    free pages in between. Elsewhere than glibc (musl, macOS) it is skipped.
    """
    # First the connections' objects themselves: a protocol, its transport and its
    # request reference each other, so they wait for a full collection.
    gc.collect()
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


class Runner(web.AppRunner):
    """An `AppRunner` whose connections answer unparsable requests in JSON, close a
    connection that has not sent its first request's headers within `header_seconds`,
    and past `max_connections` close the oldest idle connection (or, when none is
    idle, answer the newcomer 503 at once)."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int | None = None,
        header_seconds: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._header_seconds = header_seconds

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        kwargs: dict[str, Any] = server._kwargs
        ours = _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            **kwargs,
        )
        ours.max_connections = self._max_connections
        ours.header_seconds = self._header_seconds
        return ours

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
from collections.abc import Iterable
from typing import Any, cast

import structlog
from aiohttp import streams, web, web_protocol, web_request, web_server

from receiver import errors, metrics
from receiver.log import Throttle
from receiver.service import connections

log = structlog.get_logger(__name__)

_DETAIL_CHARS = 80
# One line per refused connection, up to 10 in 10 s; then one summary line.
_PROTOCOL_ERRORS = Throttle("http_protocol_error")
_CUTS = Throttle("connection_cut")
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
    _opened_at = 0.0
    _received = 0
    # The body being received (none: between requests, or it is all here), and since
    # when; the timer that checks its rate.
    _body: streams.StreamReader | None = None
    _body_started = 0.0
    _body_check: asyncio.TimerHandle | None = None
    # The address this connection is counted against until it authenticates.
    _source: str | None = None
    # The request that proved itself authentic: while it runs, never evicted.
    _verified: web_request.BaseRequest | None = None
    _leaving = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if not isinstance(manager, _Server):
            return
        self._opened_at = self._loop.time()
        manager.note_connections()
        if manager.header_seconds is not None:
            # aiohttp's own guard for a connection that has sent no request yet is the
            # keep-alive timeout (75 s by default): a stranger opening connections and
            # trickling headers would hold each that long. Ours is short.
            self._header_deadline = self._loop.call_later(
                manager.header_seconds, self._headers_late
            )
        if not manager.admit(self, transport):
            # Past a cap, with nobody to make room, a connection costs us nothing more
            # than this answer: nothing is read, and the sender is told to come back.
            metrics.CONNECTIONS_REFUSED.inc()
            cast(asyncio.Transport, transport).write(_OVER_CAPACITY_ANSWER)
            self.force_close()
            transport.close()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued and isinstance(self._manager, _Server):
            # Headers complete: a body, if one follows, is watched from now on.
            body = self._messages[-1][1]
            if not body.is_eof():
                self._watch_body(body, self._manager.body_floor, self._manager.body_grace)

    def connection_lost(self, exc: BaseException | None) -> None:
        for handle in (self._header_deadline, self._body_check):
            if handle is not None:
                handle.cancel()
        self._header_deadline = self._body_check = None
        self._body = None
        if isinstance(self._manager, _Server):
            self._manager.forget(self)
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._request_count == 0 and not self._force_close:
            self.cut("slow_headers")

    def _watch_body(self, body: streams.StreamReader, floor: float | None, grace: float) -> None:
        self._body, self._body_started = body, self._loop.time()
        if self._body_check is not None:
            self._body_check.cancel()
            self._body_check = None
        if floor is None:
            return
        self._body_check = self._loop.call_at(
            self._body_started + grace, self._check_body, floor, grace
        )

    def _check_body(self, floor: float, grace: float) -> None:
        self._body_check = None
        body = self._body
        if body is None or body.is_eof() or self._force_close:
            self._body = None
            return
        due = connections.body_cut_at(self._body_started, body.total_bytes, floor, grace)
        if due > self._loop.time():
            self._body_check = self._loop.call_at(due, self._check_body, floor, grace)
            return
        # Slower than the floor: a delivery (a few KB) comes at once, and Debitura
        # retries anything cut; a stranger trickling a body is holding a connection.
        self.cut("slow_body")

    def cut(self, reason: str) -> None:
        """Close the connection without an answer (nobody is waiting for one worth
        having), counted by `reason` and logged at most ten times in ten seconds."""
        metrics.child(metrics.CONNECTIONS_CUT, reason).inc()
        if _CUTS.allow():
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.info("connection_cut", reason=reason, remote=peer[0] if peer else None)
        self.close_now()

    def close_now(self) -> None:
        """Close the connection; a handler reading its body sees the sender gone (as
        when the sender hangs up), not a closed transport, which aiohttp reports as a
        RuntimeError if the handler reads before the close has been processed."""
        body = self._body
        if body is not None and not body.is_eof() and body.exception() is None:
            body.set_exception(ConnectionResetError("connection closed by the receiver"))
            # The exception's traceback will tie the body into a cycle that waits for a
            # full collection: what it buffered (up to a 64 KiB body) is let go now.
            body._buffer.clear()
        self.force_close()

    def verified(self, request: web_request.BaseRequest) -> None:
        """`request` carried an authentic delivery: the connection no longer counts
        against its source, and is not evicted while that request runs."""
        self._verified = request
        if self._source is not None and isinstance(self._manager, _Server):
            self._manager.authenticated(self)

    def evictable(self) -> bool:
        """Whether closing it loses nobody's authentic delivery: any connection except
        one running a request already verified (a delivery waiting for its commit),
        one whose request has arrived whole and waits for our answer (slow on our
        side, not the sender's: under load a burst's deliveries wait to be verified,
        and their rate since opening falls like a trickler's), and one closing."""
        if self._force_close or self.awaiting_answer():
            return False
        return self._verified is None or self._verified is not self._current_request

    def awaiting_answer(self) -> bool:
        """Whether a request of this connection has arrived whole (headers and body)
        and is not answered yet."""
        current = self._current_request
        if current is not None and current.content.is_eof():
            return True
        return any(body.is_eof() for _, body in self._messages)

    def rank(self, now: float) -> tuple[bool, float]:
        """Where it stands in making room (connections.rank)."""
        return connections.rank(self._received, now - self._opened_at)

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
    body_floor: float | None = None
    body_grace = 0.0
    sources: connections.Sources | None = None
    _leaving = 0  # evicted, not yet gone: they no longer count against the cap
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

    def admit(self, newcomer: _Protocol, transport: asyncio.BaseTransport) -> bool:
        """Make room for `newcomer` if a cap calls for it; whether it may stay. Its
        source's connections not yet authenticated make room first (the least
        progress of them goes), then past RECEIVER_MAX_CONNECTIONS everyone's
        connections do: a crowd of strangers, idle or trickling headers or a body,
        cannot keep a sender out, and one that authenticated loses nothing in flight."""
        sources = self.sources
        if sources is not None:
            peer = transport.get_extra_info("peername")
            address = peer[0] if isinstance(peer, tuple) and peer else None
            if sources.counted(address):
                assert address is not None
                if sources.full(address):
                    # Only a connection that is not making progress (older than a
                    # round trip, slower than the body floor since it opened) makes
                    # room; otherwise the newcomer is answered 503 + Retry-After. A
                    # sender's burst of deliveries is never cut mid-request for its
                    # number: at worst told to come back.
                    now = self._loop.time()
                    floor = self.body_floor or float(connections.NEW_CONNECTION_CREDIT_BYTES)
                    stalled = (
                        c
                        for c in sources.holding(address)
                        if c is not newcomer and connections.stalled(c.rank(now), floor)
                    )
                    if not self._evict(stalled, 1, "source_limit"):
                        return False
                sources.add(address, newcomer)
                newcomer._source = address
        cap = self.max_connections
        if cap is None or len(self.connections) - self._leaving <= cap:
            return True
        # A few at once (1/64 of the cap), so that in a flood the next newcomers find
        # room without another pass over every connection.
        others = (c for c in self._connections if c is not newcomer)
        return self._evict(others, max(1, cap // 64), None)

    def _evict(self, among: Iterable[Any], count: int, reason: str | None) -> bool:
        chosen = connections.least_progress(among, self._loop.time(), count)
        for connection in chosen:
            assert isinstance(connection, _Protocol)
            connection._leaving = True
            self._leaving += 1
            if reason is None:
                metrics.CONNECTIONS_EVICTED.inc()
                connection.close_now()
            else:
                connection.cut(reason)
        return bool(chosen)

    def authenticated(self, connection: _Protocol) -> None:
        """`connection` sent an authentic delivery: its source's count lets it go."""
        if self.sources is not None and connection._source is not None:
            self.sources.discard(connection._source, connection)
        connection._source = None

    def forget(self, connection: _Protocol) -> None:
        """`connection` is gone."""
        self.authenticated(connection)
        if connection._leaving:
            connection._leaving = False
            self._leaving -= 1

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
    close one whose body arrives slower than `body_floor` bytes per second once
    `body_grace` seconds have passed, let each source address hold at most
    `max_per_source` connections not yet authenticated (its least-progress one makes
    room; `trusted` addresses are not counted), and past `max_connections` close the
    connections with the least progress (or, when every other one carries an authentic
    delivery, answer the newcomer 503 at once)."""

    def __init__(
        self,
        app: web.Application,
        *,
        max_connections: int | None = None,
        header_seconds: float | None = None,
        body_floor: float | None = None,
        body_grace: float = 0.0,
        max_per_source: int | None = None,
        trusted: tuple[Any, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._header_seconds = header_seconds
        self._body_floor = body_floor
        self._body_grace = body_grace
        self._sources = (
            None if max_per_source is None else connections.Sources(max_per_source, trusted)
        )

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
        ours.body_floor = self._body_floor
        ours.body_grace = self._body_grace
        ours.sources = self._sources
        return ours


def note_authentic(request: web_request.BaseRequest) -> None:
    """The request carried a delivery whose signature verified: its connection is an
    authenticated sender's from now on (see `Runner`)."""
    protocol = request.protocol
    if isinstance(protocol, _Protocol):
        protocol.verified(request)

"""The HTTP server around the app: aiohttp's, except for how it answers requests it
cannot parse (a NUL in a header, a header over the size limit, a broken request line).

aiohttp answers those below the application, so no middleware sees them: its
default is a `text/plain` body that repeats the parser's message (which quotes the
offending header) and an ERROR log line with a traceback. Here they get the same
JSON error body as everything else and one warning line, truncated. aiohttp offers
no setting for this; its protocol class is chosen by `web_server.Server.__call__`,
so a server subclass picks ours.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import structlog
from aiohttp import web, web_protocol, web_request, web_server

from receiver import errors, metrics

log = structlog.get_logger(__name__)

_DETAIL_CHARS = 80


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
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if not isinstance(manager, _Server) or manager.max_connections is None:
            return
        if len(manager.connections) > manager.max_connections:
            # Past the cap a connection costs us nothing more than this answer:
            # nothing is read, and the sender is told to come back.
            metrics.CONNECTIONS_REFUSED.inc()
            cast(asyncio.Transport, transport).write(_OVER_CAPACITY_ANSWER)
            self.force_close()
            transport.close()

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
        log.warning(
            "http_protocol_error",
            status=error.status,
            error=type(exc).__name__ if exc is not None else None,
            detail=(message or "")[:_DETAIL_CHARS],
            remote=request.remote,
        )
        metrics.REQUESTS.labels(route="unparsed", status=str(error.status)).inc()
        response = web.json_response(error.body(), status=error.status, headers=error.headers())
        response.force_close()
        return response


class _Server(web_server.Server):
    max_connections: int | None = None

    def __call__(self) -> web_protocol.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An `AppRunner` whose connections answer unparsable requests in JSON, and that
    answers connections past `max_connections` with a 503 at once."""

    def __init__(
        self, app: web.Application, *, max_connections: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

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
        return ours

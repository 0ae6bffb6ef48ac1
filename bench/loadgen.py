"""A lean HTTP/1.1 load generator: prebuilt, pre-signed requests over keep-alive
connections, answers parsed only for their status and length.

Why by hand: the load generator shares the machine's two cores with the server and
Postgres, and every millisecond of CPU it spends is one the server does not get.
aiohttp's client costs roughly 0.2 ms of CPU per request, plus building and
signing each body inside the timed window; at 3,000 requests/s that is most of a
core. The C generators that avoid this (wrk, h2load) are not installable from the
project's own files, and cannot sign each body with Debitura's scheme without a
script of their own. Here all of that work happens before the clock starts, and
the timed loop only writes bytes and waits for an answer, which leaves more of the
machine to what is being measured, for the ceilings and the receiver alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator

from receiver import signing

HOST = "127.0.0.1"
PATH = "/webhooks/debitura"


def prebuilt(port: int, secret: bytes, bodies: Iterable[bytes]) -> Iterator[bytes]:
    """Complete, signed HTTP/1.1 keep-alive requests for each body, all built now,
    before any clock starts (signatures stay valid for Debitura's 300 s)."""
    head = f"POST {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
    built = [
        (
            f"{head}{signing.SIGNATURE_HEADER}: {signing.header_value(secret, body)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    return iter(built)


class ResponseError(RuntimeError):
    """The connection closed or sent something that is not an HTTP/1.1 answer."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end]).lower()
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0:
            self._fail(ResponseError("answer without Content-Length"))
            return
        stop = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : stop if stop > 0 else len(head)])
        if len(self._buffer) < end + 4 + length:
            return
        status = int(self._buffer[9:12])
        del self._buffer[: end + 4 + length]
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ResponseError(f"connection lost: {exc!r}"))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def send(self, request: bytes) -> int:
        """Write one request; return the answer's status."""
        if self.transport is None:
            raise ResponseError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(host: str, port: int) -> _Connection:
    _, protocol = await asyncio.get_running_loop().create_connection(_Connection, host, port)
    return protocol


class Answers:
    """Answers and their latencies (seconds) from one load."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.elapsed = 0.0
        self.exhausted = False  # the prebuilt requests ran out before the time did

    def note(self, status: int, latency: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latencies.append(latency)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def only(self, status: int) -> Answers:
        """Self, after checking every answer had `status`."""
        unexpected = {s: n for s, n in self.statuses.items() if s != status}
        if unexpected:
            raise RuntimeError(f"unexpected answers: {unexpected}")
        return self


async def closed_loop(
    port: int, requests: Iterator[bytes], concurrency: int, seconds: float
) -> Answers:
    """`concurrency` connections, each sending its next request as soon as the last
    answer arrived, until `seconds` pass or the requests run out."""
    result = Answers()
    connections = [await _connect(HOST, port) for _ in range(concurrency)]
    clock = time.monotonic
    deadline = clock() + seconds

    async def sender(connection: _Connection) -> None:
        while clock() < deadline:
            request = next(requests, None)
            if request is None:
                result.exhausted = True
                return
            started = clock()
            status = await connection.send(request)
            result.note(status, clock() - started)

    started = clock()
    try:
        await asyncio.gather(*(sender(c) for c in connections))
    finally:
        result.elapsed = clock() - started
        for connection in connections:
            connection.close()
    return result


async def open_loop(
    port: int,
    requests: Iterator[bytes],
    rate: float,
    until: Callable[[], bool],
) -> Answers:
    """Offer requests at a fixed `rate` (as Debitura's deliveries arrive, whether or not
    earlier ones were answered) until `until()` is true; waits for every answer. A new
    connection is opened whenever all open ones are busy."""
    result = Answers()
    idle: list[_Connection] = []
    in_flight: set[asyncio.Task[None]] = set()
    clock = time.monotonic

    async def one(request: bytes, due: float) -> None:
        connection = idle.pop() if idle else await _connect(HOST, port)
        status = await connection.send(request)
        # Latency counts from when the request was due, so a late send is not hidden.
        result.note(status, clock() - due)
        idle.append(connection)

    interval = 1 / rate
    started = next_at = clock()
    while not until():
        request = next(requests, None)
        if request is None:
            result.exhausted = True
            break
        task = asyncio.create_task(one(request, next_at))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - clock()))
    await asyncio.gather(*in_flight)
    result.elapsed = clock() - started
    for connection in idle:
        connection.close()
    return result

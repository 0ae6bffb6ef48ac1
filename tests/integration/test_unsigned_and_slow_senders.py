"""Strangers without the webhook secret against a real `receiver serve`: slow bodies,
idle connections and trickled headers must not cost an authentic delivery its slot.

Scaled to the suite's time budget (a few hundred connections on loopback, caps
lowered to match): while the strangers hold their connections, at least 99% of
concurrent signed deliveries are answered 200. Each test prints its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator

import aiohttp

from tests import helpers
from tests.integration import processes
from tests.integration.standins import eventually

DELIVERIES = 200
CONCURRENCY = 40


@contextlib.contextmanager
def _serve(database_url: str, **extra: str) -> Iterator[tuple[int, str]]:
    env, secret = processes.receiver_env(database_url, **extra)
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, _):
        asyncio.run(processes.wait_healthy(port, process))
        yield port, secret
        assert process.poll() is None


async def _deliver_all(port: int, secret: str) -> Counter[int]:
    """DELIVERIES signed deliveries, CONCURRENCY at a time; their statuses."""
    statuses: Counter[int] = Counter()
    gate = asyncio.Semaphore(CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            body = helpers.encode(helpers.onboarding())
            async with (
                gate,
                session.post(
                    f"http://127.0.0.1:{port}/webhooks/debitura",
                    data=body,
                    headers=helpers.signed_headers(secret, body),
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as answer,
            ):
                await answer.read()
                statuses[answer.status] += 1

        await asyncio.gather(*(one() for _ in range(DELIVERIES)))
    return statuses


def test_slow_bodies_do_not_take_the_slots_of_signed_deliveries(database_url: str) -> None:
    """100 strangers that send headers (Content-Length 1000) and then a body byte now
    and then, against RECEIVER_MAX_REQUESTS_IN_FLIGHT=50: >= 99% of 200 signed deliveries (40 at
    a time) are answered 200 while they hang."""
    strangers = 100
    head = (
        b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\nX-Debitura-Signature: t=1,v1=00\r\n\r\n{"
    )
    with _serve(
        database_url,
        RECEIVER_MAX_REQUESTS_IN_FLIGHT="50",
        RECEIVER_BODY_TIMEOUT_SECONDS="60",
    ) as (port, secret):
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(strangers)]
        try:
            for sock in held:
                sock.sendall(head)
            statuses = _deliveries_while(held, port, secret)
        finally:
            for sock in held:
                sock.close()
    ok = statuses[200] / DELIVERIES
    print(f"\n{strangers} slow-body strangers, in-flight cap 50: {dict(statuses)} ({ok:.1%} 200)")
    assert ok >= 0.99, statuses


def _deliveries_while(held: list[socket.socket], port: int, secret: str) -> Counter[int]:
    """The signed deliveries, with each stranger sending one more body byte between
    batches, so none of them is ever idle or finished."""

    async def run() -> Counter[int]:
        task = asyncio.create_task(_deliver_all(port, secret))
        while not task.done():
            for sock in held:
                with contextlib.suppress(OSError):
                    sock.send(b" ")
            await asyncio.wait({task}, timeout=0.5)
        return task.result()

    return asyncio.run(run())


def test_idle_connections_do_not_shut_out_signed_deliveries(database_url: str) -> None:
    """300 idle connections (no byte sent) against RECEIVER_MAX_CONNECTIONS=100, and
    more opened throughout: >= 99% of 200 concurrent signed deliveries get 200, the
    oldest idle connections being closed to make room."""
    with _serve(database_url, RECEIVER_MAX_CONNECTIONS="100", RECEIVER_KEEPALIVE_SECONDS="75") as (
        port,
        secret,
    ):

        async def run() -> Counter[int]:
            idle: list[asyncio.StreamWriter] = []
            for _ in range(300):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                idle.append(writer)
            deliveries = asyncio.create_task(_deliver_all(port, secret))
            try:
                while not deliveries.done():  # strangers keep coming
                    for _ in range(20):
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                        idle.append(writer)
                    await asyncio.wait({deliveries}, timeout=0.2)
                return deliveries.result()
            finally:
                for writer in idle:
                    writer.close()

        statuses = asyncio.run(run())
    ok = statuses[200] / DELIVERIES
    print(f"\nidle strangers, connection cap 100: {dict(statuses)} ({ok:.1%} 200)")
    assert ok >= 0.99, statuses


def test_the_oldest_idle_connection_makes_room_for_a_new_one(database_url: str) -> None:
    """With RECEIVER_MAX_CONNECTIONS=3 and three idle connections open, a newcomer is
    served and the oldest idle one is closed;
    the other two stay open."""
    with _serve(database_url, RECEIVER_MAX_CONNECTIONS="3") as (port, _):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:

            async def newcomer_served() -> bool:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := sock.recv(4096):
                        answer += chunk
                return answer.startswith(b"HTTP/1.1 200")

            asyncio.run(eventually(newcomer_served))
            idle[0].settimeout(10)
            assert idle[0].recv(1) == b""  # closed by the server
            for sock in idle[1:]:
                sock.settimeout(0)
                with contextlib.suppress(BlockingIOError):
                    assert sock.recv(1) != b"", "a younger idle connection was closed"
        finally:
            for sock in idle:
                sock.close()


def test_busy_connections_past_the_cap_get_503(database_url: str) -> None:
    """With RECEIVER_MAX_CONNECTIONS=3 and three connections each in the middle of a
    body, a fourth is answered 503 `overloaded` at once: none of the three is idle."""
    with _serve(database_url, RECEIVER_MAX_CONNECTIONS="3", RECEIVER_BODY_TIMEOUT_SECONDS="60") as (
        port,
        _,
    ):
        busy = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            for sock in busy:
                sock.sendall(
                    b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
                )
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                answer = b""
                while chunk := extra.recv(4096):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), head
            assert json.loads(body)["error"]["code"] == "overloaded"
        finally:
            for sock in busy:
                sock.close()


def test_a_connection_without_headers_is_closed_before_the_keepalive_timeout(
    database_url: str,
) -> None:
    """A new connection that trickles its request line gets as long as a body would
    (RECEIVER_BODY_TIMEOUT_SECONDS=1), not the 60 s keep-alive timeout: it is closed
    while it still sends."""
    with _serve(
        database_url, RECEIVER_BODY_TIMEOUT_SECONDS="1", RECEIVER_KEEPALIVE_SECONDS="60"
    ) as (port, _):
        line = b"POST /webhooks/debitura" + b"a" * 200
        sent = 0
        closed = False
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for byte in line:  # 0.05 s apart: 10 s if never cut off
                try:
                    sock.sendall(bytes([byte]))
                    sent += 1
                    sock.settimeout(0.05)
                    closed = sock.recv(4096) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                if closed:
                    break
        assert closed, f"still open after {time.monotonic() - started:.1f} s"
        assert sent < len(line)

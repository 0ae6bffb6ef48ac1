"""Senders without the webhook secret (forged, malformed, slow or idle) are refused
cheaply: a documented answer or a closed connection, never a held slot nor a flooded
log. Forged signatures and malformed HTTP are counted and logged once per window,
slow bodies and trickled headers are cut off, and slow bodies, idle connections and
trickled headers must not cost an authentic delivery its slot. Real `receiver serve`
processes, plain sockets on loopback.

Scaled to the suite's time budget (a few hundred connections on loopback, caps
lowered to match): while the strangers hold their connections, at least 99% of
concurrent signed deliveries are answered 200. Those tests print their figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests import helpers
from tests.integration import processes
from tests.integration.processes import Served
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
        # Strangers and deliveries share 127.0.0.1 here, so a per-source cap would
        # count them together; this test is about the in-flight slots (test_floods.py
        # has the per-source cap, deliveries from another address).
        RECEIVER_MAX_CONNECTIONS_PER_SOURCE="1000",
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


def test_a_trickled_body_makes_room_before_a_prompt_one(database_url: str) -> None:
    """With RECEIVER_MAX_CONNECTIONS=3, two connections trickling a body (one byte in
    5 s) and one that sent most of its body at once: a newcomer is served, and the one
    closed to make room is a trickler, not the prompt sender, not the newcomer."""
    head = (
        b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    )
    with _serve(
        database_url,
        RECEIVER_MAX_CONNECTIONS="3",
        RECEIVER_BODY_TIMEOUT_SECONDS="60",
        RECEIVER_MIN_BODY_RATE_GRACE_SECONDS="60",
    ) as (port, _):
        open_ = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            prompt, *tricklers = open_
            prompt.sendall(head + b"{" * 50_000)
            for sock in tricklers:
                sock.sendall(head + b"{")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as newcomer:
                newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert _read_answer(newcomer).startswith(b"HTTP/1.1 200")
            closed = []
            for sock in open_:
                sock.settimeout(0.5)
                try:
                    closed.append(sock.recv(1) == b"")
                except TimeoutError:
                    closed.append(False)
                except OSError:
                    closed.append(True)
            assert closed[0] is False, "the prompt sender was closed"
            assert any(closed[1:]), "no trickler was closed"
        finally:
            for sock in open_:
                sock.close()


def test_a_body_slower_than_the_floor_is_cut(database_url: str) -> None:
    """A body trickled at a byte every 0.1 s (10 B/s, floor 1 KiB/s, grace 1 s, body
    timeout 60 s): the connection is closed without an answer within a few seconds,
    and the cut is counted as `slow_body`."""
    with _serve(
        database_url,
        RECEIVER_BODY_TIMEOUT_SECONDS="60",
        RECEIVER_MIN_BODY_RATE_GRACE_SECONDS="1",
    ) as (port, _):
        started = time.monotonic()
        closed = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            )
            answer = b""
            for _ in range(100):  # 10 s if never cut
                try:
                    sock.sendall(b" ")
                    sock.settimeout(0.1)
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
                answer += chunk
                if not chunk:
                    closed = True
                    break
        elapsed = time.monotonic() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            exposition = page.read().decode()
    assert closed, "a 10 B/s body was never cut"
    assert elapsed < 5, elapsed
    assert b"HTTP/1.1 2" not in answer
    assert 'receiver_connections_cut_total{reason="slow_body"} 1.0' in exposition


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


def test_a_flood_of_oversized_headers_logs_ten_short_lines_and_a_summary(
    database_url: str,
) -> None:
    """Fifty requests with an 8 KB header: fifty 400s, and the log gets one short
    warning line for each of the first ten (the header never written out), then one
    summary line that counts the other forty when the 10 s window ends."""
    env, _ = processes.receiver_env(database_url)
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        asyncio.run(processes.wait_healthy(port, process))
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\nX-Flood: "
                    + b"y" * 8192
                    + b"\r\nContent-Length: 2\r\n\r\n{}"
                )
                assert _read_answer(sock).split(b" ", 2)[1] == b"400"

        def logged(event: str) -> list[dict[str, Any]]:
            return [
                record
                for record in map(json.loads, output.read_text().splitlines())
                if record.get("event") == event
            ]

        async def summarised() -> bool:
            return bool(logged("http_protocol_error_suppressed"))

        asyncio.run(eventually(summarised, seconds=30))
        lines = logged("http_protocol_error")
        (summary,) = logged("http_protocol_error_suppressed")
        text = output.read_text()
    assert len(lines) == 10
    assert summary["count"] == 40
    assert max(len(json.dumps(line)) for line in lines) < 600
    assert "y" * 100 not in text


def test_slow_sender_is_cut_off(served: Served) -> None:
    """A body trickled byte by byte is answered 408 once the body timeout passes; the
    connection is not held."""
    body = helpers.encode(helpers.onboarding())
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(
            b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + f"X-Debitura-Signature: {helpers.debitura_signature(served.secret, body)}".encode()
            + b"\r\n\r\n"
        )
        answer = b""
        for byte in body[:30]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            sock.settimeout(0.01)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                answer += sock.recv(4096)
            if answer:
                break
        sock.settimeout(5)
        answer += _read_answer(sock, answer)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b'"code": "request_timeout"' in answer
    assert time.monotonic() - started < 5


def _read_answer(sock: socket.socket, received: bytes = b"") -> bytes:
    """The rest of one HTTP answer: its headers, then Content-Length bytes of body."""
    answer = received
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            return answer[len(received) :]
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body)[len(received) :]


@pytest.mark.parametrize(
    ("case", "header"),
    [
        ("NUL in a header value", b"X-Debitura-Event: tok_live_" + b"n" * 30 + b"\x00evil"),
        ("header over the size limit", b"X-Filler: tok_live_" + b"h" * 20_000),
        ("header without a colon", b"tok_live_" + b"c" * 30),
    ],
)
def test_malformed_http_gets_a_json_400_and_one_quiet_log_line(
    served: Served, case: str, header: bytes
) -> None:
    """Requests the HTTP parser refuses are answered with the JSON error body, echo
    nothing of the request, and are logged once at warning, truncated."""
    marker = f"case-{time.monotonic_ns()}".encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(
            b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\nX-Request-Id: "
            + marker
            + b"\r\n"
            + header
            + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        answer = _read_answer(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    # aiohttp answers a request it could not parse as HTTP/1.0, then closes.
    assert head.split(b" ", 2)[1] == b"400", (case, head[:80])
    assert b"application/json" in head
    assert json.loads(body)["error"] == {
        "type": "invalid_request_error",
        "code": "invalid_request",
        "message": "malformed HTTP request",
    }
    assert b"tok_live_" not in answer
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line[:1] == "{"]
    errors = [line for line in lines if line["level"] in ("error", "critical")]
    assert errors == []
    protocol = [line for line in lines if line["event"] == "http_protocol_error"]
    assert protocol, "no http_protocol_error line"
    assert all(len(line["detail"]) <= 80 for line in protocol)


def test_headers_trickled_byte_by_byte_are_cut_off(served: Served) -> None:
    """A sender that never finishes its headers (slowloris) loses the connection once
    RECEIVER_KEEPALIVE_SECONDS pass, although it keeps sending; it does not hold it."""
    filler = b"X-Filler: " + b"a" * 200
    sent = 0
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(b"POST /webhooks/debitura HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for byte in filler:  # 200 bytes, 0.05 s apart: 10 s if never cut off
            try:
                sock.sendall(bytes([byte]))
                sent += 1
                sock.settimeout(0.05)
                closed = sock.recv(4096) == b""
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                closed = True
            if closed:
                break
    assert closed, "the connection was still open after 10 s of trickled headers"
    assert sent < len(filler)


def test_flood_of_bad_signatures_is_counted_with_its_source(served: Served) -> None:
    """Fifty forged deliveries: all 401, every one counted in /metrics; the log gets
    a request line from the source at most once per 10 s window and then a summary
    line per source with the count, not a line per request."""

    def failures() -> float:
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        line = next(
            (
                ln
                for ln in text.splitlines()
                if ln.startswith('receiver_signature_failures_total{reason="mismatch"}')
            ),
            None,
        )
        return float(line.split()[-1]) if line else 0.0

    before = failures()
    logged_before = len(served.log.read_text())
    body = helpers.encode(helpers.onboarding())
    for _ in range(50):
        status, _, _ = served.post(
            body,
            {
                "Content-Type": "application/json",
                "X-Debitura-Signature": helpers.debitura_signature(helpers.new_secret(), body),
            },
        )
        assert status == 401
    assert failures() - before == 50

    def new_lines() -> list[dict[str, Any]]:
        text = served.log.read_text()[logged_before:]
        return [json.loads(line) for line in text.splitlines() if line[:1] == "{"]

    async def summarised() -> bool:
        return any(line["event"] == "request_signature_refused_suppressed" for line in new_lines())

    asyncio.run(eventually(summarised, seconds=30))
    lines = new_lines()
    forged = [line for line in lines if line.get("error") == "invalid_signature"]
    summaries = [line for line in lines if line["event"] == "request_signature_refused_suppressed"]
    assert len(forged) <= 4, len(forged)  # one per source per window
    assert {line["remote"] for line in forged} <= {"127.0.0.1"}
    assert {line["source"] for line in summaries} == {"127.0.0.1"}
    assert len(forged) + sum(line["count"] for line in summaries) >= 50

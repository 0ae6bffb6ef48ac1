"""Hostile and malformed input against a real `receiver serve` process.

Black box: plain HTTP from the standard library on loopback. The fuzz run is
deterministic (derandomised) and bounded in count; it answers only documented
statuses, never echoes a token, and leaves the database consistent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver import config, vault
from receiver.lifecycle import events
from tests import conftest, helpers
from tests.integration import processes
from tests.integration.standins import eventually

FUZZ_EXAMPLES = 1000


class Served:
    """A receiver process on its own database, for a whole module."""

    def __init__(
        self, url: str, secret: str, database_url: str, keys: dict[str, str], log: Path
    ) -> None:
        self.url, self.secret, self.database_url, self.keys = url, secret, database_url, keys
        self.log = log
        self.port = int(url.rsplit(":", 1)[1])

    def get(self, path: str) -> str:
        """GET a path; the body as text."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            connection.request("GET", path)
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            connection.request("POST", "/webhooks/debitura", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            connection.close()


@pytest.fixture(scope="module")
def served(server_dsn: str, template_name: str) -> Iterator[Served]:
    """`receiver serve` on a fresh clone of the template, with a 1 s body timeout and
    a 2 s keep-alive (header) timeout."""
    with conftest.cloned_database(server_dsn, template_name, "receiver_hostile") as url:
        keys = config.generate_dev_secrets()
        env = processes.clean_env(
            **{f"RECEIVER_{k.upper()}": v for k, v in keys.items()},
            RECEIVER_DATABASE_URL=url,
            RECEIVER_BODY_TIMEOUT_SECONDS="1",
            RECEIVER_KEEPALIVE_SECONDS="2",
            RECEIVER_METRICS_REFRESH_SECONDS="0",  # tests compare scrapes a moment apart
        )
        port = processes.free_port()
        with processes.serving(["--port", str(port)], env) as (process, output):
            asyncio.run(processes.wait_healthy(port, process))
            yield Served(f"http://127.0.0.1:{port}", keys["webhook_secrets"], url, keys, output)


# --- strategies -----------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
data_keys = st.sampled_from(
    ["client_id", "bearer_token", "onboarding_completed_at", "token_prefix", "revoked_at", "reason"]
)


@dataclass(frozen=True)
class Deep:
    """A nesting depth (a type no JSON strategy produces, unlike int)."""

    depth: int


@st.composite
def tokenish(draw: st.DrawFn) -> str:
    """Valid canary tokens, near misses, and junk in the token field."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return helpers.canary_token(draw(st.sampled_from(["live", "test"])))
    if choice == 1:
        return helpers.canary_token() + draw(st.sampled_from(["!", " ", "\u00e9", "\x00", "_x"]))
    if choice == 2:
        return "tok_live_" + draw(st.text(max_size=20))
    return draw(st.text(max_size=40))


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """Envelopes from valid to absurd."""
    kind = draw(st.integers(0, 4))
    if kind == 0:  # a valid event, sometimes with unicode and extra fields
        document = helpers.onboarding(
            draw(st.from_regex(r"\Acli_[A-Za-z0-9]{1,20}\Z")), helpers.canary_token()
        )
        document["extra"] = draw(json_values)
        return document
    if kind == 1:  # the right shape, wrong values
        data = draw(st.dictionaries(data_keys, json_values | tokenish(), max_size=6))
        if draw(st.booleans()):
            data["bearer_token"] = draw(tokenish())
        return {
            "id": draw(st.text(max_size=40) | json_values),
            "event": draw(
                st.sampled_from([events.ONBOARDING_COMPLETED, events.TOKEN_REVOKED])
                | st.text(max_size=20)
            ),
            "timestamp": draw(st.text(max_size=30) | json_values),
            "data": data,
        }
    if kind == 2:
        return draw(json_values)
    if kind == 3:  # deep nesting, up to far past what a recursive parser survives
        return Deep(draw(st.integers(1, 20_000)))
    return {"event": draw(st.text(max_size=30)), "data": draw(json_values)}


@st.composite
def deliveries(draw: st.DrawFn) -> bytes:
    """A body, from a valid event to mangled bytes around the size limit."""
    document = draw(documents())
    if isinstance(document, Deep):  # built as text: json.dumps would recurse too
        body = ("[" * document.depth + "]" * document.depth).encode()
    else:
        body = json.dumps(document, ensure_ascii=draw(st.booleans())).encode()
    mangle = draw(st.integers(0, 9))
    if mangle == 0:
        body = draw(st.binary(max_size=300))
    elif mangle == 1:
        body = body.decode().encode("utf-16")
    elif mangle == 2:
        body += b" " * draw(st.integers(60_000, 70_000))  # around the 64 KiB limit
    return body


# --- tests ------------------------------------------------------------------------

# Signed, JSON-typed and within the size limit: authentic, so never refused.
AUTHENTIC = {200, 503}
# Anything else: refused with a documented 4xx (401 signature, 408 slow body, 413
# size, 415 content type). 400 is for malformed HTTP, which the fuzz does not send.
REFUSED = {401, 408, 413, 415}
OUTCOMES = {"processed", "duplicate", "ignored", "quarantined"}
LIMIT = 65_536


def _fuzz(served: Served, statuses: Counter[str]) -> None:
    """Run the deliveries; count statuses as "signed 200", "unsigned 401", …"""

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )
    @given(
        body=deliveries(),
        header_mode=st.integers(0, 7),
        content_type=st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "text/plain",
                "",
                "application/cloudevents+json",
            ]
        ),
    )
    def one(body: bytes, header_mode: int, content_type: str) -> None:
        headers = {"X-Debitura-Event": "fuzz"}
        if content_type:
            headers["Content-Type"] = content_type
        if header_mode < 5:
            headers["X-Debitura-Signature"] = helpers.debitura_signature(served.secret, body)
        elif header_mode == 5:
            headers["X-Debitura-Signature"] = "t=" + "9" * 40 + ",v1=" + "z" * 64
        elif header_mode == 6:
            headers["X-Debitura-Signature"] = helpers.debitura_signature(helpers.new_secret(), body)
        status, answer, _ = served.post(body, headers)
        authentic = (
            header_mode < 5 and content_type.startswith("application/") and len(body) <= LIMIT
        )
        statuses[f"{'signed' if authentic else 'refused'} {status}"] += 1
        parsed = json.loads(answer)
        if authentic:
            assert status in AUTHENTIC, (status, answer[:200])
            if status == 200:
                assert parsed["status"] in OUTCOMES
                assert ("reason" in parsed) == (parsed["status"] == "quarantined")
        else:
            assert status in REFUSED, (status, answer[:200])
            assert set(parsed["error"]) == {"type", "code", "message"}
        assert not helpers.find_canaries(answer.decode())

    one()


def test_fuzzed_deliveries_get_the_contract_and_leave_the_database_consistent(
    served: Served,
) -> None:
    """Random, mutated, deep and unicode bodies with good and bad signatures: a signed
    one is always answered 200 (never refused, never 500), an unsigned one a documented
    4xx, every answer is JSON, no token is echoed. Afterwards every stored event opens
    and is well-formed, every token row belongs to an event, no client has two active
    tokens in one environment, nothing failed inside the receiver, and a pg_dump holds
    no token."""
    statuses: Counter[str] = Counter()
    _fuzz(served, statuses)
    keyring = vault.Keyring(
        [
            (k, base64.b64decode(v))
            for k, v in (p.split(":", 1) for p in served.keys["token_keys"].split(","))
        ]
    )

    async def check() -> dict[str, int]:
        conn = await asyncpg.connect(served.database_url)
        try:
            rows = await conn.fetch(
                "SELECT key, status, body_hash, body_sealed, body_redacted FROM receiver.events"
            )
            for row in rows:
                assert row["status"] in ("processed", "ignored", "quarantined")
                sealed_for = "sha256:" + row["body_hash"].hex()
                keyring.open(row["body_sealed"], vault.event_associated_data(sealed_for))
                if row["status"] != "quarantined":
                    assert isinstance(json.loads(row["body_redacted"]), dict)
            orphans = await conn.fetchval(
                "SELECT count(*) FROM receiver.tokens t LEFT JOIN receiver.events e "
                "ON e.key = t.created_by_event WHERE e.key IS NULL"
            )
            assert orphans == 0
            active = await conn.fetchval(
                "SELECT count(*) FROM (SELECT client_id FROM receiver.tokens "
                "WHERE status = 'active' GROUP BY client_id, environment HAVING count(*) > 1) x"
            )
            assert active == 0
            return {
                "events": len(rows),
                "quarantined": sum(r["status"] == "quarantined" for r in rows),
                "tokens": await conn.fetchval("SELECT count(*) FROM receiver.tokens"),
            }
        finally:
            await conn.close()

    counts = asyncio.run(check())
    from tests.integration.test_leaks import pg_dump

    dump = pg_dump(served.database_url)
    assert not helpers.find_canaries(dump)
    assert "receiver_internal_errors_total 0.0" in served.get("/metrics")
    report = (
        f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, "
        f"{counts['events']} events ({counts['quarantined']} quarantined) and "
        f"{counts['tokens']} tokens stored, 0 leaks"
    )
    (conftest.LOG_DIR / "fuzz-report.txt").write_text(report)
    print("\n" + report)
    assert sum(statuses.values()) >= FUZZ_EXAMPLES
    # The run reached every kind of answer it is meant to exercise.
    for kind in ("signed 200", "refused 401", "refused 413", "refused 415"):
        assert statuses[kind] > 0, kind
    assert counts["quarantined"] > 0
    assert counts["tokens"] > 0


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


def test_stored_rows_hold_only_sealed_bytes(served: Served) -> None:
    """No column of any receiver table holds a plaintext canary, in any encoding."""

    async def scan() -> str:
        conn = await asyncpg.connect(served.database_url)
        try:
            parts = []
            for table in ("events", "tokens", "revocations", "signals"):
                for row in await conn.fetch(f"SELECT * FROM receiver.{table}"):  # noqa: S608
                    parts += [v.hex() if isinstance(v, bytes) else str(v) for v in row.values()]
                    parts += [v.decode("latin-1") for v in row.values() if isinstance(v, bytes)]
            return "\n".join(parts)
        finally:
            await conn.close()

    assert not helpers.find_canaries(asyncio.run(scan()))

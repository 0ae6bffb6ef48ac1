"""POST /webhooks/debitura end to end: real HTTP on loopback, a real Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import asyncpg
import pytest

from receiver import vault
from receiver.config import Settings
from tests import helpers
from tests.integration.conftest import Post


async def count(conn: asyncpg.Connection, table: str) -> int:
    """Rows in one of the receiver's tables."""
    value: int = await conn.fetchval(f"SELECT count(*) FROM receiver.{table}")  # noqa: S608
    return value


async def test_onboarding_is_stored_sealed(
    post: Post, conn: asyncpg.Connection, settings: Settings, sealer: vault.Sealer
) -> None:
    """A valid onboarding answers processed and leaves only sealed bytes in the row."""
    token = helpers.canary_token()
    document = helpers.onboarding("cli_abc123", token)
    response = await post(document)
    assert response.status == 200
    assert await response.json() == {"status": "processed", "event_id": document["id"]}

    row = await conn.fetchrow("SELECT * FROM receiver.tokens WHERE client_id = 'cli_abc123'")
    assert row is not None
    assert row["status"] == "active"
    assert row["prefix"] == token[:15]
    assert row["environment"] == "live"
    for column, value in row.items():
        if isinstance(value, bytes | str):
            raw = value if isinstance(value, bytes) else value.encode()
            assert token.encode() not in raw, column
    opened = sealer.keyring.open(row["token_sealed"], vault.token_associated_data(str(row["id"])))
    assert opened.decode() == token
    assert row["token_index"] == vault.blind_index(settings.index_key.get_secret_value(), token)


async def test_stored_event_keeps_the_exact_body_sealed(
    post: Post, conn: asyncpg.Connection, sealer: vault.Sealer
) -> None:
    """The raw body is kept sealed byte for byte; the operators' copy shows only the prefix."""
    token = helpers.canary_token()
    body = helpers.encode(helpers.onboarding(token=token))
    assert (await post(body)).status == 200
    row = await conn.fetchrow("SELECT * FROM receiver.events")
    assert row is not None
    sealed_for = "sha256:" + hashlib.sha256(body).hexdigest()
    assert sealer.keyring.open(row["body_sealed"], vault.event_associated_data(sealed_for)) == body
    redacted = json.loads(row["body_redacted"])
    assert token not in json.dumps(redacted)
    assert redacted["data"]["bearer_token"].startswith(token[:15])


async def test_duplicate_changes_nothing(post: Post, conn: asyncpg.Connection) -> None:
    """A redelivery of the same event answers duplicate and stores nothing new."""
    document = helpers.onboarding()
    assert (await (await post(document)).json())["status"] == "processed"
    before = [await count(conn, t) for t in ("events", "tokens", "signals")]
    response = await post(document)
    assert response.status == 200
    assert await response.json() == {"status": "duplicate", "event_id": document["id"]}
    assert [await count(conn, t) for t in ("events", "tokens", "signals")] == before


async def test_event_without_id_deduplicates_on_body(
    post: Post, conn: asyncpg.Connection, webhook_secret: str
) -> None:
    """Without an id, a re-signed resend of the same body is still a duplicate."""
    body = helpers.encode(helpers.onboarding(event_id=None))
    first = await (await post(body)).json()
    assert first == {
        "status": "processed",
        "event_id": "sha256:" + hashlib.sha256(body).hexdigest(),
    }
    # Re-signed a second later: another signature over the same body.
    later = helpers.debitura_signature(webhook_secret, body, int(time.time()) + 1)
    resent = await post(body, **{"X-Debitura-Signature": later})
    assert (await resent.json())["status"] == "duplicate"
    assert await count(conn, "events") == 1


async def test_concurrent_deliveries_store_once(post: Post, conn: asyncpg.Connection) -> None:
    """Twenty simultaneous deliveries of one event: one processed, the rest duplicates."""
    document = helpers.onboarding()
    responses = await asyncio.gather(*(post(document) for _ in range(20)))
    statuses = [(await r.json())["status"] for r in responses]
    assert all(r.status == 200 for r in responses)
    assert statuses.count("processed") == 1
    assert statuses.count("duplicate") == 19
    assert await count(conn, "events") == 1
    assert await count(conn, "tokens") == 1
    assert await count(conn, "signals") == 1


async def test_new_onboarding_supersedes_the_active_token(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A second onboarding for a client makes the new token active, the old superseded."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_1", old, completed_at="2024-01-15T10:00:00Z"))
    await post(helpers.onboarding("cli_1", new, completed_at="2024-02-15T10:00:00Z"))
    rows = await conn.fetch(
        "SELECT prefix, status FROM receiver.tokens ORDER BY onboarding_completed_at"
    )
    assert [(r["prefix"], r["status"]) for r in rows] == [
        (old[:15], "superseded"),
        (new[:15], "active"),
    ]


async def test_revocation_revokes_the_matching_token(post: Post, conn: asyncpg.Connection) -> None:
    """token.revoked with a prefix revokes that token and queues a signal."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_1", token))
    response = await post(helpers.revocation("cli_1", token[:15]))
    assert (await response.json())["status"] == "processed"
    row = await conn.fetchrow("SELECT status, revoke_reason FROM receiver.tokens")
    assert row is not None
    assert (row["status"], row["revoke_reason"]) == ("revoked", "client_request")
    reasons = await conn.fetch("SELECT reason FROM receiver.signals ORDER BY created_at")
    assert [r["reason"] for r in reasons] == ["token_issued", "token_revoked"]


async def test_revocation_before_onboarding_still_wins(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A revocation that arrives first leaves the later-arriving token revoked."""
    token = helpers.canary_token()
    assert (await post(helpers.revocation("cli_9", token[:15]))).status == 200
    assert (await post(helpers.onboarding("cli_9", token))).status == 200
    assert await conn.fetchval("SELECT status FROM receiver.tokens") == "revoked"


async def test_unknown_event_type_is_recorded_as_ignored(
    post: Post, conn: asyncpg.Connection
) -> None:
    """Any other event type is stored as ignored and answered 200."""
    document = {
        "id": "evt_other_1",
        "event": "case.updated",
        "data": {"anything": [1, {"x": None}]},
    }
    response = await post(document)
    assert await response.json() == {"status": "ignored", "event_id": "evt_other_1"}
    assert await conn.fetchval("SELECT status FROM receiver.events") == "ignored"


async def test_test_deliveries_are_marked(post: Post, conn: asyncpg.Connection) -> None:
    """X-Debitura-Test: true is recorded on the event."""
    await post(helpers.onboarding(), **{"X-Debitura-Test": "true"})
    assert await conn.fetchval("SELECT is_test FROM receiver.events") is True


def _stale(secret: str, body: bytes) -> dict[str, str]:
    return {
        "X-Debitura-Signature": helpers.debitura_signature(secret, body, int(time.time()) - 400)
    }


BAD_INPUTS: list[tuple[str, Any, dict[str, str], int, str]] = [
    (
        "no signature",
        helpers.onboarding(),
        {"X-Debitura-Signature": ""},
        401,
        "authentication_error",
    ),
    (
        "garbled signature",
        helpers.onboarding(),
        {"X-Debitura-Signature": "t=x,v1=zz"},
        401,
        "authentication_error",
    ),
    (
        "wrong content type",
        helpers.onboarding(),
        {"Content-Type": "text/plain"},
        415,
        "invalid_request_error",
    ),
]


@pytest.mark.parametrize(
    ("case", "document", "headers", "status", "error_type"),
    BAD_INPUTS,
    ids=[c[0] for c in BAD_INPUTS],
)
async def test_bad_input_gets_its_status_and_stores_nothing(
    post: Post,
    conn: asyncpg.Connection,
    case: str,
    document: Any,
    headers: dict[str, str],
    status: int,
    error_type: str,
) -> None:
    """Each refused delivery (unauthenticated, or not JSON by its content type) gets its
    documented status, a JSON error body, and no row. Authentic deliveries are never
    refused: see test_quarantine.py."""
    response = await post(document, **headers)
    assert response.status == status, case
    body = await response.json()
    assert body["error"]["type"] == error_type
    assert set(body["error"]) == {"type", "code", "message"}
    assert await count(conn, "events") == 0


async def test_wrong_secret_is_401(post: Post, conn: asyncpg.Connection) -> None:
    """A signature under another secret is refused."""
    response = await post(helpers.onboarding(), secret=helpers.new_secret())
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_signature"


async def test_stale_and_future_signatures_are_401(post: Post, webhook_secret: str) -> None:
    """Timestamps outside 300 s past / 30 s future are refused."""
    body = helpers.encode(helpers.onboarding())
    stale = await post(body, **_stale(webhook_secret, body))
    future = await post(
        body,
        **{
            "X-Debitura-Signature": helpers.debitura_signature(
                webhook_secret, body, int(time.time()) + 120
            )
        },
    )
    assert (stale.status, future.status) == (401, 401)


async def test_body_over_the_limit_is_413(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """A body larger than RECEIVER_MAX_BODY_BYTES is refused with 413 and a JSON body."""
    document = helpers.onboarding()
    document["padding"] = "x" * settings.max_body_bytes
    response = await post(document)
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"
    assert await count(conn, "events") == 0


async def test_chunked_body_over_the_limit_is_413(
    client: Any, webhook_secret: str, settings: Settings
) -> None:
    """Without a Content-Length, the limit still holds while reading."""

    async def chunks() -> Any:
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    response = await client.post(
        "/webhooks/debitura",
        data=chunks(),
        headers={"Content-Type": "application/json", "X-Debitura-Signature": "t=1,v1=" + "0" * 64},
    )
    assert response.status == 413


async def test_token_in_query_string_is_refused(client: Any, log_lines: Any) -> None:
    """A token in the URL is refused and the URL's query never reaches the log."""
    token = helpers.canary_token()
    response = await client.post(f"/webhooks/debitura?token={token}", data=b"{}")
    assert response.status == 400
    assert token not in json.dumps(log_lines())


async def test_token_in_the_path_is_refused(client: Any, log_lines: Any) -> None:
    """A token in the URL path is refused too, and never reaches the log."""
    token = helpers.canary_token()
    response = await client.post(f"/webhooks/{token}", data=b"{}")
    assert response.status == 400
    assert token not in json.dumps(log_lines())
    request = next(line for line in log_lines() if line["event"] == "request")
    assert request["path"] == "[refused: token in URL]"  # not even a masked copy


async def test_unknown_path_and_method_are_json_errors(client: Any) -> None:
    """404 and 405 come back in the same JSON error shape."""
    missing = await client.get("/nope")
    wrong = await client.get("/webhooks/debitura")
    assert (missing.status, wrong.status) == (404, 405)
    assert (await missing.json())["error"]["code"] == "not_found"
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"
    assert wrong.headers["Allow"] == "POST"


async def test_canonical_log_line_per_request(post: Post, log_lines: Any) -> None:
    """One request line carries request id, event id, type, client, outcome, status, duration."""
    token = helpers.canary_token()
    document = helpers.onboarding("cli_log", token)
    await post(document)
    requests = [line for line in log_lines() if line["event"] == "request"]
    assert len(requests) == 1
    line = requests[0]
    assert line["event_id"] == document["id"]
    assert line["event_type"] == "client.onboarding_completed"
    assert line["client_id"] == "cli_log"
    assert line["outcome"] == "processed"
    assert line["status"] == 200
    assert line["request_id"]
    assert isinstance(line["duration_ms"], float)
    assert token not in json.dumps(log_lines())


async def test_an_unknown_expectation_is_ignored_on_every_path_never_echoed(
    client: Any, webhook_secret: str, log_lines: Any
) -> None:
    """aiohttp would answer `Expect: <anything but 100-continue>` with a 417 echoing the
    value, before any middleware: an authentic delivery refused, and the header's
    content (a token, here) in the answer. The expectation is ignored on every route,
    an unmatched path and a wrong method included: each gets its usual answer, and the
    value appears in no answer and no log line."""
    canary = helpers.canary_token()
    body = helpers.encode(helpers.onboarding("cli_expect"))
    headers = {**helpers.signed_headers(webhook_secret, body), "Expect": canary}
    for path in ("/webhooks/debitura", "/webhooks/debitura?via=query"):
        response = await client.post(path, data=body, headers=headers)
        text = await response.text()
        assert response.status == 200, text
        assert json.loads(text)["status"] in ("processed", "duplicate")
        assert canary not in text
    elsewhere = {
        ("GET", "/healthz"): 200,
        ("POST", "/nowhere"): 404,
        ("GET", "/webhooks/debitura"): 405,
    }
    for (method, path), status in elsewhere.items():
        response = await client.request(method, path, headers={"Expect": canary})
        text = await response.text()
        assert response.status == status, (method, path, text)
        assert canary not in text
        assert canary not in str(response.headers)
    assert canary not in json.dumps(log_lines())


async def test_100_continue_is_still_answered_and_the_delivery_stored(
    client: Any, webhook_secret: str
) -> None:
    """A sender that waits for `100 Continue` before its body gets it and is answered."""
    body = helpers.encode(helpers.onboarding("cli_continue"))
    headers = {**helpers.signed_headers(webhook_secret, body), "Expect": "100-continue"}
    response = await client.post("/webhooks/debitura", data=body, headers=headers)
    assert response.status == 200
    assert (await response.json())["status"] == "processed"


async def test_unmatched_paths_answer_404_and_wrong_methods_405_with_allow(client: Any) -> None:
    """An unknown path is a JSON 404 and a known path with the wrong method a JSON 405
    naming the methods it has, both counted under the `unmatched` route label."""
    missing = await client.get("/no/such/path")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong = await client.delete("/webhooks/debitura")
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "POST"
    assert (await wrong.json())["error"]["type"] == "invalid_request_error"
    scraped = await (await client.get("/metrics")).text()
    assert 'receiver_http_requests_total{route="unmatched",status="404"}' in scraped
    assert 'receiver_http_requests_total{route="unmatched",status="405"}' in scraped

"""Authentic deliveries are never refused: whatever a verified delivery holds, it is
stored and answered 200, quarantined when it cannot be applied; the same bytes
unsigned are refused and store nothing. Real HTTP on loopback, a real Postgres."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from typing import Any

import asyncpg
import pytest

from receiver import config, vault
from receiver.config import Settings
from receiver.service import app
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import (
    Client,
    Post,
    cache_settings,
    operator_env,
    settings_values,
)
from tests.integration.processes import run


def _onboarding_with(**data: Any) -> dict[str, Any]:
    document = helpers.onboarding()
    document["data"].update(data)
    return document


def _revocation_with(**data: Any) -> dict[str, Any]:
    document = helpers.revocation("cli_hostile", None)
    document["data"].update(data)
    return document


def _raw(text: str) -> bytes:
    return text.encode()


# Each one came from a user's report or Debitura's documentation; each was a 4xx or
# a 500 once. (case, body, reason or None when it is simply processed)
HOSTILE: list[tuple[str, bytes, str | None]] = [
    (
        "debitura example token",
        helpers.encode(helpers.onboarding(token="tok_live_new_token_456")),
        None,
    ),
    # A prefix of another length than 15 revokes what starts with it (DESIGN §2,
    # "A revocation fails safe"); only one below tok_live_ + 3 characters cannot.
    (
        "prefix of 14",
        helpers.encode(_revocation_with(token_prefix="tok_live_abc12")),
        None,
    ),
    (
        "prefix of 16",
        helpers.encode(_revocation_with(token_prefix="tok_live_abc1234")),
        None,
    ),
    (
        "prefix below the minimum",
        helpers.encode(_revocation_with(token_prefix="tok_live_ab")),
        "invalid_data",
    ),
    ("data missing a field", helpers.encode(_onboarding_with(client_id=None)), "invalid_data"),
    (
        "no data at all",
        _raw('{"id": "evt_nodata", "event": "client.onboarding_completed"}'),
        "invalid_data",
    ),
    (
        "NaN",
        _raw('{"id": "evt_nan", "event": "token.revoked", "data": {"x": NaN}}'),
        "invalid_json",
    ),
    (
        "1e400",
        _raw('{"id": "evt_big", "event": "token.revoked", "data": {"x": 1e400}}'),
        "unstorable_value",
    ),
    (
        "lone surrogate",
        _raw('{"id": "evt_sur", "event": "x", "data": {"r": "\\ud800"}}'),
        "unstorable_value",
    ),
    ("NUL in reason", helpers.encode(_revocation_with(reason="a\u0000b")), "unstorable_value"),
    (
        "5,000 digits",
        _raw('{"id": "evt_digits", "event": "x", "n": ' + "7" * 5000 + "}"),
        "unstorable_value",
    ),
    (
        "year 0 in UTC",
        helpers.encode(helpers.onboarding(completed_at="0001-01-01T00:00:00+14:00")),
        "invalid_data",
    ),
    ("not JSON", b"{not json", "invalid_json"),
    ("not UTF-8", b'{"event": "\xff"}', "invalid_json"),
    ("a JSON array", b"[1, 2, 3]", "not_an_object"),
    ("a JSON string", b'"hello"', "not_an_object"),
    ("id is a number", _raw('{"id": 7, "event": "x", "data": {}}'), "invalid_data"),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, "invalid_json"),
]


@pytest.mark.parametrize(("case", "body", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_body_signed_is_stored_and_answered_200(
    post: Post,
    conn: asyncpg.Connection,
    sealer: vault.Sealer,
    case: str,
    body: bytes,
    reason: str | None,
) -> None:
    """Signed, each hostile body is answered 200 and stored (quarantined with its
    reason when it cannot be applied); its exact bytes stay sealed in the row."""
    response = await post(body)
    assert response.status == 200, case
    answer = await response.json()
    if reason is None:
        assert answer["status"] == "processed"
        return
    assert answer["status"] == "quarantined"
    assert answer["reason"] == reason
    row = await conn.fetchrow(
        "SELECT * FROM receiver.events WHERE key = $1 OR envelope_id = $1", answer["event_id"]
    )
    assert row is not None
    assert row["status"] == "quarantined"
    assert row["quarantine_reason"] == reason
    assert row["quarantine_detail"]
    sealed_for = "sha256:" + hashlib.sha256(body).hexdigest()
    assert sealer.keyring.open(row["body_sealed"], vault.event_associated_data(sealed_for)) == body
    assert await conn.fetchval("SELECT count(*) FROM receiver.signals") == 0
    assert await conn.fetchval("SELECT count(*) FROM receiver.tokens") == 0


@pytest.mark.parametrize(("case", "body", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_body_unsigned_is_refused_and_stores_nothing(
    client: Client,
    conn: asyncpg.Connection,
    case: str,
    body: bytes,
    reason: str | None,
) -> None:
    """Unsigned (or signed by someone else), the same bytes get a JSON 401 and no row."""
    for signature in ("", helpers.debitura_signature(helpers.new_secret(), body)):
        response = await client.post(
            app.WEBHOOK_PATH,
            data=body,
            headers={"Content-Type": "application/json", "X-Debitura-Signature": signature},
        )
        assert response.status == 401, case
        assert (await response.json())["error"]["type"] == "authentication_error"
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 0


async def test_signature_with_a_320_digit_timestamp_is_401(client: Client) -> None:
    """A t= too long to be a time is a malformed signature, not an overflow."""
    response = await client.post(
        app.WEBHOOK_PATH,
        data=b"{}",
        headers={
            "Content-Type": "application/json",
            "X-Debitura-Signature": "t=" + "9" * 320 + ",v1=" + "a" * 64,
        },
    )
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_signature"


async def test_gzip_that_is_not_gzip_is_a_json_400(
    client: Client,
    webhook_secret: str,
    conn: asyncpg.Connection,
) -> None:
    """Content-Encoding: gzip over bytes that are not gzip: a JSON 400, nothing stored;
    real gzip of a signed body is read like any other."""
    body = helpers.encode(helpers.onboarding())
    headers = helpers.signed_headers(webhook_secret, body, **{"Content-Encoding": "gzip"})
    response = await client.post(app.WEBHOOK_PATH, data=body, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_request"
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 0
    response = await client.post(app.WEBHOOK_PATH, data=gzip.compress(body), headers=headers)
    assert (await response.json())["status"] == "processed"


async def test_reused_id_with_the_same_content_is_a_duplicate(post: Post) -> None:
    """Same id, same bytes: duplicate, as Debitura's retries expect."""
    document = helpers.onboarding()
    assert (await (await post(document)).json())["status"] == "processed"
    assert (await (await post(document)).json())["status"] == "duplicate"


@pytest.mark.parametrize("second", ["another client's onboarding", "a revocation"])
async def test_reused_id_with_other_content_is_quarantined_and_both_kept(
    post: Post, conn: asyncpg.Connection, second: str
) -> None:
    """Same id, other content: quarantined id_conflict, the first effect stands, both
    deliveries are stored; the conflicting one sent again is a duplicate."""
    first = helpers.onboarding("cli_first")
    assert (await (await post(first)).json())["status"] == "processed"
    other = (
        helpers.onboarding("cli_second")
        if second.startswith("another")
        else helpers.revocation("cli_first", None)
    )
    other["id"] = first["id"]
    answer = await (await post(other)).json()
    assert answer == {"status": "quarantined", "event_id": first["id"], "reason": "id_conflict"}
    assert (await (await post(other)).json())["status"] == "duplicate"
    statuses = await conn.fetch(
        "SELECT status FROM receiver.events WHERE key = $1 OR envelope_id = $1 "
        "ORDER BY received_at",
        first["id"],
    )
    assert [r["status"] for r in statuses] == ["processed", "quarantined"]
    tokens = await conn.fetch("SELECT client_id, status FROM receiver.tokens")
    assert [(r["client_id"], r["status"]) for r in tokens] == [("cli_first", "active")]
    assert await conn.fetchval("SELECT count(*) FROM receiver.revocations") == 0


# --- live and test -------------------------------------------------------------------


async def _send(client: Client, secret: str, document: Any, **headers: str) -> dict[str, Any]:
    body = helpers.encode(document)
    signed = helpers.signed_headers(secret, body, **headers)
    response = await client.post(app.WEBHOOK_PATH, data=body, headers=signed)
    assert response.status == 200
    answer: dict[str, Any] = await response.json()
    return answer


async def _statuses(conn: asyncpg.Connection, client_id: str) -> dict[str, list[str]]:
    rows = await conn.fetch(
        "SELECT environment, status FROM receiver.token_inventory WHERE client_id = $1 "
        "ORDER BY onboarding_completed_at, stored_at",
        client_id,
    )
    found: dict[str, list[str]] = {"live": [], "test": []}
    for row in rows:
        found[row["environment"]].append(row["status"])
    return found


TEST_BY_HEADER = {"X-Debitura-Test": "true"}


@pytest.mark.parametrize("how", ["header", "test secret"])
async def test_test_onboarding_never_supersedes_the_live_token(
    two_worlds: Client,
    webhook_secret: str,
    test_secret: str,
    conn: asyncpg.Connection,
    how: str,
) -> None:
    """A client has one active token per environment: a test onboarding (by header or
    by test secret) leaves the live token active, and a live one leaves the test one."""
    secret, headers = (webhook_secret, TEST_BY_HEADER) if how == "header" else (test_secret, {})
    live = helpers.onboarding(
        "cli_env", helpers.canary_token("live"), completed_at="2024-01-01T00:00:00Z"
    )
    test = helpers.onboarding(
        "cli_env", helpers.canary_token("test"), completed_at="2024-02-01T00:00:00Z"
    )
    assert (await _send(two_worlds, webhook_secret, live))["status"] == "processed"
    assert (await _send(two_worlds, secret, test, **headers))["status"] == "processed"
    assert await _statuses(conn, "cli_env") == {"live": ["active"], "test": ["active"]}
    later = helpers.onboarding(
        "cli_env", helpers.canary_token("live"), completed_at="2024-03-01T00:00:00Z"
    )
    assert (await _send(two_worlds, webhook_secret, later))["status"] == "processed"
    assert await _statuses(conn, "cli_env") == {"live": ["expired", "active"], "test": ["active"]}
    # Stored in the test world's namespace (DESIGN §2: `id` is the key within its
    # environment).
    is_test = await conn.fetchval(
        "SELECT is_test FROM receiver.events WHERE key = $1", "test/" + test["id"]
    )
    assert is_test is True


@pytest.mark.parametrize("how", ["header", "test secret"])
async def test_test_delivery_naming_live_is_quarantined(
    two_worlds: Client,
    webhook_secret: str,
    test_secret: str,
    conn: asyncpg.Connection,
    how: str,
) -> None:
    """A test delivery carrying a live token, or revoking a live prefix, is quarantined
    and changes no live state."""
    secret, headers = (webhook_secret, TEST_BY_HEADER) if how == "header" else (test_secret, {})
    live_token = helpers.canary_token("live")
    await _send(two_worlds, webhook_secret, helpers.onboarding("cli_w", live_token))
    onboarding = helpers.onboarding(
        "cli_w", helpers.canary_token("live"), completed_at="2025-01-01T00:00:00Z"
    )
    revocation = helpers.revocation("cli_w", live_token[:15])
    for document in (onboarding, revocation):
        answer = await _send(two_worlds, secret, document, **headers)
        assert answer == {
            "status": "quarantined",
            "event_id": document["id"],
            "reason": "test_delivery_targets_live",
        }
    assert await _statuses(conn, "cli_w") == {"live": ["active"], "test": []}
    assert await conn.fetchval("SELECT count(*) FROM receiver.signals") == 1  # the first only


async def test_prefixless_revocation_acts_in_its_delivery_environment(
    two_worlds: Client,
    webhook_secret: str,
    test_secret: str,
    conn: asyncpg.Connection,
) -> None:
    """Without a prefix, a test revocation revokes test tokens only and a live one live
    tokens only; each signals its environment."""
    await _send(
        two_worlds, webhook_secret, helpers.onboarding("cli_r", helpers.canary_token("live"))
    )
    await _send(two_worlds, test_secret, helpers.onboarding("cli_r", helpers.canary_token("test")))
    await _send(two_worlds, test_secret, helpers.revocation("cli_r", None))
    assert await _statuses(conn, "cli_r") == {"live": ["active"], "test": ["revoked"]}
    await _send(
        two_worlds,
        webhook_secret,
        helpers.revocation("cli_r", None),
        **{"X-Debitura-Test": "false"},
    )
    assert await _statuses(conn, "cli_r") == {"live": ["revoked"], "test": ["revoked"]}
    signalled = await conn.fetch(
        "SELECT reason, environment FROM receiver.signals ORDER BY created_at, reason"
    )
    assert [(r["reason"], r["environment"]) for r in signalled] == [
        ("token_issued", "live"),
        ("token_issued", "test"),
        ("token_revoked", "test"),
        ("token_revoked", "live"),
    ]


async def test_prefixed_revocation_acts_in_its_prefix_environment(
    two_worlds: Client,
    webhook_secret: str,
    conn: asyncpg.Connection,
) -> None:
    """A live delivery revoking a test prefix revokes that test token and nothing live."""
    test_token = helpers.canary_token("test")
    await _send(
        two_worlds, webhook_secret, helpers.onboarding("cli_p", helpers.canary_token("live"))
    )
    await _send(two_worlds, webhook_secret, helpers.onboarding("cli_p", test_token))
    await _send(two_worlds, webhook_secret, helpers.revocation("cli_p", test_token[:15]))
    assert await _statuses(conn, "cli_p") == {"live": ["active"], "test": ["revoked"]}


async def test_tokens_list_and_cache_read_per_environment(
    two_worlds: Client,
    two_world_settings: Settings,
    webhook_secret: str,
    test_secret: str,
) -> None:
    """`tokens list` shows each token's environment; the cache hands out the live token
    unless asked for the test one."""
    from receiver.partner import cache

    live, test = helpers.canary_token("live"), helpers.canary_token("test")
    await _send(two_worlds, webhook_secret, helpers.onboarding("cli_c", live))
    await _send(two_worlds, test_secret, helpers.onboarding("cli_c", test))
    listed = run(["tokens", "list", "--json"], operator_env(two_world_settings))
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted((r["environment"], r["token_prefix"]) for r in rows) == [
        ("live", live[:15]),
        ("test", test[:15]),
    ]
    tokens = cache.TokenCache.from_settings(cache_settings(two_world_settings))
    await tokens.start()
    try:
        assert await tokens.get("cli_c") == live
        assert await tokens.get("cli_c", "test") == test
    finally:
        await tokens.close()


# --- operators -----------------------------------------------------------------------


async def test_reprocess_applies_a_delivery_after_a_config_fix(
    aiohttp_client: Any, settings: Settings, conn: asyncpg.Connection
) -> None:
    """A live onboarding signed with a secret misfiled under RECEIVER_TEST_WEBHOOK_SECRETS
    is quarantined; once the secret is moved, `events reprocess --quarantined` applies
    it (token active, signal queued), and running it again changes nothing."""
    misfiled = helpers.new_secret()
    values = settings_values(settings)
    wrong = config.load_settings(**values, test_webhook_secrets=misfiled)
    client = await aiohttp_client(app.create_app(wrong))
    token = helpers.canary_token("live")
    document = helpers.onboarding("cli_fix", token)
    answer = await _send(client, misfiled, document)
    assert answer["reason"] == "test_delivery_targets_live"

    listed = run(["events", "list", "--status", "quarantined", "--json"], operator_env(wrong))
    # A test delivery's key is in the test world's namespace (`test:` + id).
    assert [json.loads(line)["key"] for line in listed.stdout.splitlines()] == [
        "test/" + document["id"]
    ]

    fixed = operator_env(
        settings, RECEIVER_WEBHOOK_SECRETS=f"{values['webhook_secrets']},{misfiled}"
    )
    result = run(["events", "reprocess", "--quarantined"], fixed)
    assert result.returncode == 0, result.stderr
    assert f"{document['id']}: processed" in result.stdout
    row = await conn.fetchrow("SELECT * FROM receiver.events WHERE key = $1", document["id"])
    assert row is not None
    assert (row["status"], row["is_test"], row["quarantine_reason"]) == (
        "processed",
        False,
        "test_delivery_targets_live",
    )
    assert row["reprocessed_at"] is not None
    assert await _statuses(conn, "cli_fix") == {"live": ["active"], "test": []}
    assert await conn.fetchval("SELECT count(*) FROM receiver.signals") == 1

    again = run(["events", "reprocess", document["id"]], fixed)
    assert again.returncode == 0
    assert f"{document['id']}: not_quarantined" in again.stdout
    assert await conn.fetchval("SELECT count(*) FROM receiver.signals") == 1


async def test_reprocess_reports_what_stays_quarantined(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """A delivery that still cannot be applied stays quarantined: reprocess says why
    and exits 1; an unknown id is reported, not invented."""
    document = helpers.onboarding()
    del document["data"]["bearer_token"]
    assert (await (await post(document)).json())["reason"] == "invalid_data"
    result = run(["events", "reprocess", document["id"], "evt_nowhere"], operator_env(settings))
    assert result.returncode == 1
    assert (
        f"{document['id']}: quarantined (invalid_data: data.bearer_token: missing)" in result.stdout
    )
    assert "evt_nowhere: not_found" in result.stdout
    assert await conn.fetchval("SELECT status FROM receiver.events") == "quarantined"


async def test_events_show_reads_a_quarantined_body_redacted(
    post: Post, settings: Settings
) -> None:
    """`events show` prints the stored body with every token cut to its prefix, for
    JSON and non-JSON bodies alike."""
    token = helpers.canary_token()
    document = _revocation_with(reason=f"leaked {token}")
    assert (await (await post(document)).json())["reason"] == "token_outside_bearer_token"
    text_body = f"not json {token}".encode()
    text_answer = await (await post(text_body)).json()
    env = operator_env(settings)
    shown = run(["events", "show", document["id"], "--json"], env)
    assert shown.returncode == 0, shown.stderr
    entry = json.loads(shown.stdout)
    assert entry["reason"] == "token_outside_bearer_token"
    assert entry["detail"] == "data.reason: token-shaped value"
    assert token[:15] in entry["body"]["data"]["reason"]
    as_text = run(["events", "show", text_answer["event_id"], "--json"], env)
    assert json.loads(as_text.stdout)["body_text"].startswith("not json tok_live_")
    for output in (shown.stdout, as_text.stdout):
        assert not helpers.find_canaries(output)
    assert run(["events", "show", "evt_nowhere"], env).returncode == 1


async def test_quarantine_is_loud_in_logs_and_metrics(
    client: Client,
    post: Post,
    log_lines: Any,
) -> None:
    """Each quarantine writes one warning with event id and reason; /metrics counts it
    by reason and shows how many are still open."""
    document = helpers.onboarding()
    document["data"]["onboarding_completed_at"] = "yesterday"
    await post(document)
    warnings = [line for line in log_lines() if line["event"] == "event_quarantined"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["event_id"] == document["id"]
    assert warnings[0]["reason"] == "invalid_data"
    assert warnings[0]["detail"] == "data.onboarding_completed_at: datetime_from_date_parsing"
    text = await (await client.get("/metrics")).text()
    assert 'receiver_events_quarantined_total{reason="invalid_data"}' in text
    assert "receiver_events_quarantined_open 1.0" in text


async def test_a_delivery_whose_id_postgres_refuses_is_kept_under_its_body_hash(
    post: Post, conn: asyncpg.Connection
) -> None:
    """When Postgres refuses even the delivery's id (here: a check constraint the test
    adds, standing in for any value our checks let through), the delivery is stored
    all the same, quarantined under its body hash: 200, never a 4xx."""
    await conn.execute(
        "ALTER TABLE receiver.events ADD CONSTRAINT refuses_this_id "
        "CHECK (key <> 'evt_refused_by_postgres')"
    )
    document = helpers.onboarding("cli_refused", event_id="evt_refused_by_postgres")
    body = helpers.encode(document)
    answer = await post(body)
    assert answer.status == 200
    assert await answer.json() == {
        "status": "quarantined",
        "event_id": "sha256:" + hashlib.sha256(body).hexdigest(),
        "reason": "unstorable_value",
    }
    row = await conn.fetchrow("SELECT type, status, envelope_id FROM receiver.events")
    assert row is not None
    assert tuple(row) == ("unknown", "quarantined", None)
    again = await post(body)  # Debitura's retry: the same body, a duplicate
    assert (await again.json())["status"] == "duplicate"


async def test_event_quarantined_names_the_client_the_body_names(settings: Settings) -> None:
    """A quarantined delivery's log lines carry the client id its body names (not
    null)."""
    env = operator_env(settings)
    env["RECEIVER_SHUTDOWN_DELAY_SECONDS"] = "0"
    port = processes.free_port()
    document = helpers.onboarding("cli_named")
    document["data"]["onboarding_completed_at"] = "yesterday"  # invalid_data
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        _, answer = await processes.post_signed(port, _secret(settings), helpers.encode(document))
        assert answer["status"] == "quarantined"
    lines = [json.loads(x) for x in output.read_text().splitlines() if x[:1] == "{"]
    (line,) = [x for x in lines if x["event"] == "event_quarantined"]
    assert line["client_id"] == "cli_named"


def _secret(settings: Settings) -> str:
    return base64.b64encode(settings.webhook_secrets[0].get_secret_value()).decode()

"""The whole loop against `receiver sandbox`: the partner library's
`MintedTokens` minting JWTs at the sandbox's `POST /oauth/token`, and `WebhookTokens`
reading the tokens a real `receiver serve` stored from the sandbox's signed webhooks,
dropped by NOTIFY when the sandbox revokes one. Everything over real HTTP on loopback,
a real Postgres, the sandbox's clock moved forward instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from structlog import testing as structlog_testing

from receiver import config, partner
from receiver.partner import cache
from receiver.sandbox import Sandbox
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import cache_settings, operator_env
from tests.integration.partner_standins import Captured
from tests.integration.standins import eventually

JWT_TTL_SECONDS = 1800


class MovableClock:
    """The sandbox's wall clock, which the test moves forward instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class CaseCalls:
    """The application's own request function: `POST /v1/cases` with a bearer token,
    recording which token each call carried and what the sandbox answered."""

    session: aiohttp.ClientSession
    url: str
    sent: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, token: str) -> aiohttp.ClientResponse:
        """Create a case with `token`; the response, its body read."""
        response = await self.session.post(
            f"{self.url}/v1/cases",
            json={"debtor": "Loop ApS", "amount": 1250},
            headers={"Authorization": f"Bearer {token}"},
        )
        await response.read()
        self.sent.append((token, response.status))
        return response


@pytest.fixture
def captured() -> Iterator[tuple[Captured, list[MutableMapping[str, Any]]]]:
    """Every log line of the partner library (stdlib logging) and of the sandbox
    (structlog, the event dicts as handed to the logger, before any redaction)."""
    with Captured("receiver.partner") as partner_logs, structlog_testing.capture_logs() as events:
        yield partner_logs, events


def logged_text(captured: tuple[Captured, list[MutableMapping[str, Any]]]) -> str:
    """All captured log lines as one text to search for secrets."""
    partner_logs, events = captured
    return partner_logs.text + "\n" + "\n".join(json.dumps(e, default=str) for e in events)


def exception_text(error: BaseException) -> str:
    """What a crash reporter could keep of an exception: message, repr, its chain."""
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        parts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def leaked(text: str, **secrets_by_name: str) -> list[str]:
    """The names of the secrets found in `text` (names, so a failure prints no secret)."""
    return [name for name, value in secrets_by_name.items() if value in text]


def remember(*values: str) -> None:
    """Make secrets canaries: the session searches every log file for them too."""
    helpers.CANARIES.update(values)


# --- 1. MintedTokens against the sandbox ---------------------------------------------


async def test_a_minted_jwt_creates_a_case_and_one_past_its_life_is_minted_once_anew(
    session: aiohttp.ClientSession, captured: tuple[Captured, list[MutableMapping[str, Any]]]
) -> None:
    """A JWT minted at the sandbox creates a case (201); once the sandbox's clock is past
    its life the call gets a 401, the library mints exactly once more and the retried
    call succeeds; neither JWT nor the API key reaches a log line."""
    clock = MovableClock()
    api_key = "sk_sandbox_" + secrets.token_urlsafe(24)
    remember(api_key)
    sb = Sandbox(api_key=api_key, jwt_ttl_seconds=JWT_TTL_SECONDS, clock=clock)
    await sb.start()
    tokens = partner.MintedTokens(api_key, api_url=sb.url, session=session)
    cases = CaseCalls(session, sb.url)
    try:
        creditor = sb.add_tenant("tenant-loop")
        first = await tokens.call("tenant-loop", cases)
        assert first.status == 201
        assert sb.calls["oauth"] == 1
        assert tokens.creditor_id("tenant-loop") == creditor
        clock.offset += JWT_TTL_SECONDS + 1  # the JWT's exp is behind the sandbox now
        second = await tokens.call("tenant-loop", cases)
        assert second.status == 201
        assert sb.calls["oauth"] == 2  # one mint for the 401, not one per call
        [(jwt, s1), (expired, s2), (fresh, s3)] = cases.sent
        remember(jwt, fresh)
        assert (s1, s2, s3) == (201, 401, 201)
        assert expired == jwt
        assert fresh != jwt
        assert not sb.is_valid(jwt)
        assert sb.is_valid(fresh)
    finally:
        await tokens.close()
        await sb.stop()
    text = logged_text(captured)
    assert "sandbox_started" in text  # the sandbox's lines were captured...
    assert any(r.getMessage().startswith("minted") for r in captured[0].records)  # ...and ours
    text += repr(tokens) + repr(sb)
    assert leaked(text, first_jwt=jwt, second_jwt=fresh, api_key=api_key) == []


async def test_an_unknown_tenant_and_a_wrong_api_key_are_told_apart_without_secrets(
    session: aiohttp.ClientSession, captured: tuple[Captured, list[MutableMapping[str, Any]]]
) -> None:
    """At the sandbox's token endpoint an unknown tenant is `TenantNotLinked` and a
    wrong API key `ApiKeyRefused`; neither exception nor any log line holds a key."""
    api_key = "sk_sandbox_" + secrets.token_urlsafe(24)
    wrong = "sk_sandbox_" + secrets.token_urlsafe(24)
    remember(api_key, wrong)
    sb = Sandbox(api_key=api_key)
    await sb.start()
    right = partner.MintedTokens(api_key, api_url=sb.url, session=session)
    mistaken = partner.MintedTokens(wrong, api_url=sb.url, session=session)
    try:
        sb.add_tenant("tenant-known")
        with pytest.raises(partner.TenantNotLinked) as unlinked:
            await right.get("tenant-unknown")
        with pytest.raises(partner.ApiKeyRefused) as refused:
            await mistaken.get("tenant-known")
        assert sb.calls["oauth"] == 2  # neither refusal is retried
        assert unlinked.value.key == "tenant-unknown"
        assert not isinstance(refused.value, partner.LinkInvalid)  # configuration, not link
    finally:
        await right.close()
        await mistaken.close()
        await sb.stop()
    text = logged_text(captured) + exception_text(unlinked.value) + exception_text(refused.value)
    text += repr(right) + repr(mistaken)
    assert leaked(text, api_key=api_key, wrong_api_key=wrong) == []


# --- 2. WebhookTokens: sandbox -> receiver serve -> Postgres -> the partner's cache ---


async def status_of(conn: asyncpg.Connection, client_id: str, token: str) -> str | None:
    """The status the receiver stored for this test token of the client (by its
    15-character prefix), None when it stored none."""
    status: str | None = await conn.fetchval(
        "SELECT status FROM receiver.tokens"
        " WHERE client_id = $1 AND environment = 'test' AND prefix = $2",
        client_id,
        token[:15],
    )
    return status


@dataclass
class Loop:
    """Everything of the whole loop: the sandbox, the receiver it sends webhooks to,
    the partner's `WebhookTokens` on the receiver's database, and the case calls."""

    sb: Sandbox
    tokens: partner.WebhookTokens
    cases: CaseCalls
    output: Path  # what `receiver serve` wrote

    async def linked(self, conn: asyncpg.Connection, client_id: str) -> str:
        """Link a client at the sandbox and wait (bounded) until the receiver stored
        its token from the webhook; the token."""
        token = self.sb.link_client(client_id)
        remember(token)

        async def token_stored() -> bool:
            return await status_of(conn, client_id, token) == "active"

        await eventually(token_stored)
        return token


@contextlib.asynccontextmanager
async def whole_loop(
    settings: config.Settings, webhook_secret: str, session: aiohttp.ClientSession
) -> AsyncIterator[Loop]:
    """A real `receiver serve` on a free port, a test sandbox sending it signed
    webhooks, and a started `WebhookTokens` (test environment) whose cache LISTENs on
    the receiver's channel with an hour's TTL, so only a NOTIFY refreshes it."""
    port = processes.free_port()
    env = operator_env(settings, RECEIVER_LOG_FORMAT="json")
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        sb = Sandbox(
            webhook_url=f"http://127.0.0.1:{port}/webhooks/debitura",
            webhook_secret=webhook_secret,
        )
        await sb.start()
        remember(sb.api_key)
        token_cache = cache.TokenCache.from_settings(cache_settings(settings))
        tokens = partner.WebhookTokens(token_cache, environment="test")
        await tokens.start()
        try:
            assert token_cache.listening
            yield Loop(sb, tokens, CaseCalls(session, sb.url), output)
            await sb.drain(seconds=30)
        finally:
            await tokens.close()
            await sb.stop()


async def hands_out(tokens: partner.WebhookTokens, client_id: str, token: str) -> None:
    """Wait (bounded) until `tokens.get(client_id)` gives `token`."""

    async def current() -> bool:
        return await tokens.get(client_id) == token

    await eventually(current)


@pytest.mark.slow
async def test_a_linked_client_token_reaches_the_partner_and_its_revocation_too(
    settings: config.Settings,
    webhook_secret: str,
    conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    """The sandbox links a client; `receiver serve` stores the token from the signed
    webhook; the partner's `WebhookTokens` creates a case with it (201). The sandbox
    revokes it: its token.revoked reaches the receiver, whose NOTIFY drops the cache
    entry, and `get`/`call` raise `TokenRevoked` without calling Debitura."""
    async with whole_loop(settings, webhook_secret, session) as loop:
        token = await loop.linked(conn, "cli_loop")
        created = await loop.tokens.call("cli_loop", loop.cases)
        assert created.status == 201
        assert loop.cases.sent == [(token, 201)]

        loop.sb.revoke("cli_loop", reason="client_request")
        assert not loop.sb.is_valid(token)

        async def revoked_seen() -> bool:
            try:
                await loop.tokens.get("cli_loop")
            except partner.TokenRevoked:
                return True
            return False

        await eventually(revoked_seen)
        with pytest.raises(partner.TokenRevoked) as revoked:
            await loop.tokens.call("cli_loop", loop.cases)
        assert len(loop.cases.sent) == 1  # nothing was sent with a revoked token
        assert await status_of(conn, "cli_loop", token) == "revoked"
    assert [(d.event, d.outcome) for d in loop.sb.deliveries] == [
        ("client.onboarding_completed", "delivered"),
        ("token.revoked", "delivered"),
    ]
    served_log = loop.output.read_text()
    assert token[:15] in str(revoked.value)
    assert leaked(exception_text(revoked.value), token=token) == []
    assert "cli_loop" in served_log  # the receiver did log the deliveries...
    assert leaked(served_log, token=token) == []  # ...by prefix only


# --- 3. A grace rotation at Debitura, picked up by `receiver tokens fetch` -------------


@pytest.mark.slow
async def test_a_grace_rotation_fetched_by_the_cli_reaches_the_partner(
    settings: config.Settings,
    webhook_secret: str,
    conn: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    """A grace rotation at the sandbox sends no webhook; `receiver tokens fetch CLIENT
    --environment test` stores the new token and supersedes the old one with its 24 h
    grace expiry, and the NOTIFY makes `WebhookTokens` call with the new token."""
    async with whole_loop(settings, webhook_secret, session) as loop:
        old = await loop.linked(conn, "cli_grace")
        assert (await loop.tokens.call("cli_grace", loop.cases)).status == 201
        rotation = loop.sb.rotate("cli_grace", reason="scheduled_rotation")
        new = rotation.new.value
        remember(new)
        assert loop.sb.is_valid(old)  # in its grace period: no webhook, nothing changed
        env = operator_env(
            settings,
            RECEIVER_DEBITURA_TEST_API_URL=loop.sb.url,
            RECEIVER_DEBITURA_TEST_API_KEY=loop.sb.api_key,
        )
        before = datetime.now(UTC)
        fetched = await asyncio.to_thread(
            processes.run, ["tokens", "fetch", "cli_grace", "--environment", "test"], env
        )
        after = datetime.now(UTC)
        assert fetched.returncode == 0, fetched.stderr
        assert new[:15] in fetched.stdout
        assert leaked(fetched.stdout + fetched.stderr, new=new, old=old, key=loop.sb.api_key) == []
        assert loop.sb.calls["fetch"] == 1
        row = await conn.fetchrow(
            "SELECT status, expires_at FROM receiver.tokens"
            " WHERE client_id = $1 AND environment = 'test' AND prefix = $2",
            "cli_grace",
            old[:15],
        )
        assert row is not None
        assert row["status"] == "superseded"
        grace = timedelta(hours=24)
        slack = timedelta(seconds=1)  # timestamps are stored to the microsecond, compared here
        assert before + grace - slack <= row["expires_at"] <= after + grace + slack
        assert await status_of(conn, "cli_grace", new) == "active"
        await hands_out(loop.tokens, "cli_grace", new)
        assert (await loop.tokens.call("cli_grace", loop.cases)).status == 201
        assert loop.cases.sent == [(old, 201), (new, 201)]
        assert [d.event for d in loop.sb.deliveries] == ["client.onboarding_completed"]

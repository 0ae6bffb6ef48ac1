"""The partner side: one token API over both of Debitura's auth models, against a
stand-in Debitura on loopback, and the cache reader's least privilege."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from receiver import partner
from receiver.config import Settings
from receiver.partner import cache
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Client, Post, cache_settings, operator_env
from tests.integration.standins import eventually

API_KEY = "rp_key_" + secrets.token_hex(16)


class Captured(logging.Handler):
    """Records of the stdlib loggers the partner-side modules speak through."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(name) for name in names]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Captured:
        for logger in self.loggers:
            logger.addHandler(self)
            logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *_: object) -> None:
        for logger in self.loggers:
            logger.removeHandler(self)

    @property
    def text(self) -> str:
        return "\n".join(
            self.format(r) + " " + json.dumps(r.__dict__, default=str) for r in self.records
        )


class FakeClock:
    """Monotonic seconds the test moves by hand, shared by the client and the stand-in."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StandInDebitura:
    """Debitura's Referral Partner API (`POST /oauth/token`, XApiKey) and a Customer API
    endpoint (`POST /cases`) that refuses expired, revoked or unlinked JWTs."""

    clock: FakeClock
    expires_in: int = 1800
    mints: int = 0
    cases: int = 0
    unlinked: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    mint_answers: list[int] = field(default_factory=list)  # statuses to answer first
    case_answers: list[int] = field(default_factory=list)
    issued: dict[str, tuple[str, float]] = field(default_factory=dict)  # jwt -> tenant, exp
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def _jwt(self, tenant: str) -> str:
        def part(value: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

        head = (
            part({"alg": "HS256", "typ": "JWT"})
            + "."
            + part({"sub": tenant, "jti": uuid.uuid4().hex})
        )
        mac = hmac.new(b"stand-in", head.encode(), hashlib.sha256).digest()
        return head + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    async def mint(self, request: web.Request) -> web.Response:
        self.mints += 1
        if self.mint_answers:
            status = self.mint_answers.pop(0)
            return web.json_response({"error": status}, status=status, headers={"Retry-After": "7"})
        if request.headers.get("XApiKey") != API_KEY:
            return web.json_response({"error": "invalid api key"}, status=401)
        tenant = (await request.json())["externalTenantId"]
        token = self._jwt(tenant)
        self.issued[token] = (tenant, self.clock() + self.expires_in)
        return web.json_response(
            {
                "accessToken": token,
                "tokenType": "Bearer",
                "expiresIn": self.expires_in,
                "externalTenantId": tenant,
                "creditorId": str(uuid.uuid4()),
            }
        )

    async def create_case(self, request: web.Request) -> web.Response:
        self.cases += 1
        if self.case_answers:
            status = self.case_answers.pop(0)
            return web.json_response({}, status=status, headers={"Retry-After": "3"})
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        tenant, expires = self.issued.get(token, ("", 0.0))
        if (
            not tenant
            or self.clock() >= expires
            or token in self.revoked
            or tenant in self.unlinked
        ):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"caseId": uuid.uuid4().hex}, status=201)


@pytest.fixture
async def debitura() -> AsyncIterator[StandInDebitura]:
    stand_in = StandInDebitura(FakeClock())
    site = web.Application()
    site.router.add_post("/oauth/token", stand_in.mint)
    site.router.add_post("/cases", stand_in.create_case)
    stand_in.server = TestServer(site, host="127.0.0.1", port=processes.free_port())
    await stand_in.server.start_server()
    yield stand_in
    await stand_in.server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as opened:
        yield opened


def case_request(session: aiohttp.ClientSession, url: str) -> Any:
    """The application's own request function: create a case with a given token."""

    async def post(token: str) -> aiohttp.ClientResponse:
        response = await session.post(
            url + "/cases", json={"debtor": {}}, headers={"Authorization": f"Bearer {token}"}
        )
        await response.read()
        return response

    return post


# --- minted JWTs --------------------------------------------------------------------


async def test_minted_token_is_reused_until_near_expiry_and_renewed_ahead(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """A token is minted once and reused; within `refresh_ahead` of its expiry a
    renewal runs in the background while the valid token is still handed out; within
    `skew` of expiry it is never handed out."""
    tokens = partner.MintedTokens(
        API_KEY, api_url=debitura.url, session=session, clock=debitura.clock,
        skew=60, refresh_ahead=300,
    )  # fmt: skip
    first = await tokens.get("tenant-a")
    assert await tokens.get("tenant-a") == first
    assert debitura.mints == 1
    debitura.clock.now += 1800 - 299  # inside refresh_ahead, outside skew
    assert await tokens.get("tenant-a") == first

    async def renewed() -> bool:
        return debitura.mints == 2

    await eventually(renewed)
    second = await tokens.get("tenant-a")
    assert second != first
    debitura.clock.now += 1800 - 59  # the renewed one, inside skew: minted anew now
    third = await tokens.get("tenant-a")
    assert third not in (first, second)
    assert debitura.mints == 3
    await tokens.close()


async def test_a_hundred_concurrent_callers_share_one_mint(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """Single flight: 100 callers asking at once for a tenant cause one POST /oauth/token."""
    tokens = partner.MintedTokens(
        API_KEY, api_url=debitura.url, session=session, clock=debitura.clock
    )
    got = await asyncio.gather(*(tokens.get("tenant-b") for _ in range(100)))
    assert len(set(got)) == 1
    assert debitura.mints == 1
    await tokens.close()


async def test_a_refused_jwt_is_minted_anew_and_the_call_retried_exactly_once(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """Debitura refuses a token the client still thinks valid (401): one fresh mint,
    one more call, which succeeds."""
    tokens = partner.MintedTokens(
        API_KEY, api_url=debitura.url, session=session, clock=debitura.clock
    )
    request = case_request(session, debitura.url)
    assert (await tokens.call("tenant-c", request)).status == 201
    debitura.revoked.add(await tokens.get("tenant-c"))
    response = await tokens.call("tenant-c", request)
    assert response.status == 201
    assert (debitura.cases, debitura.mints) == (3, 2)
    await tokens.close()


async def test_a_second_401_means_the_link_is_invalid(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """A fresh JWT refused too: `LinkInvalid` after exactly two calls, and the hook is
    told; no third call, no loop."""
    seen: list[tuple[str, str]] = []
    tokens = partner.MintedTokens(
        API_KEY, api_url=debitura.url, session=session, clock=debitura.clock,
        on_invalidated=lambda key, reason: seen.append((key, reason)),
    )  # fmt: skip
    debitura.unlinked.add("tenant-d")
    with pytest.raises(partner.LinkInvalid):
        await tokens.call("tenant-d", case_request(session, debitura.url))
    assert debitura.cases == 2
    assert seen == [("tenant-d", "link_invalid")]
    await tokens.close()


async def test_a_wrong_api_key_is_refused_and_never_shown(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """401 from /oauth/token is `MintRefused`; the key is in no repr, message or log,
    and a minted token in no log either."""
    wrong = "rp_key_" + secrets.token_hex(16)
    with Captured("receiver.partner") as logs:
        tokens = partner.MintedTokens(
            wrong, api_url=debitura.url, session=session, clock=debitura.clock
        )
        with pytest.raises(partner.MintRefused) as refused:
            await tokens.get("tenant-e")
        good = partner.MintedTokens(
            API_KEY, api_url=debitura.url, session=session, clock=debitura.clock
        )
        minted = await good.get("tenant-e")
    assert logs.records  # the mint was logged...
    assert wrong not in repr(tokens) + str(refused.value) + logs.text
    assert API_KEY not in repr(good) + logs.text
    assert minted not in logs.text  # ...without the token
    await tokens.close()
    await good.close()


async def test_rate_limits_come_back_with_retry_after(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """A 429 from the mint or from the call is `RateLimited` with the server's
    Retry-After, never retried on the spot."""
    tokens = partner.MintedTokens(
        API_KEY, api_url=debitura.url, session=session, clock=debitura.clock
    )
    debitura.mint_answers.append(429)
    with pytest.raises(partner.RateLimited) as minting:
        await tokens.get("tenant-f")
    assert minting.value.retry_after == 7
    debitura.case_answers.append(429)
    with pytest.raises(partner.RateLimited) as calling:
        await tokens.call("tenant-f", case_request(session, debitura.url))
    assert calling.value.retry_after == 3
    assert debitura.cases == 1
    await tokens.close()


# --- webhook-delivered tokens -------------------------------------------------------


@dataclass
class _Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


async def test_webhook_tokens_typed_errors_and_retry_once(
    post: Post, settings: Settings, client: Client
) -> None:
    """`get` names why there is no token (`NoToken`, `TokenRevoked`); `call` re-reads
    once on a 401 (a newer token arrived, the cache had not heard yet); a second 401
    is `LinkInvalid`, reported for the client without revoking it: `tokens list`
    and `receiver_clients_link_invalid` show it."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_wh", old, completed_at="2024-01-01T00:00:00Z"))
    await post(helpers.onboarding("cli_gone_wh"))
    await post(helpers.revocation("cli_gone_wh", None))
    # A channel nobody notifies: the cache goes stale after the rotation below.
    stale = cache.TokenCache.from_settings(cache_settings(settings, notify_channel="unused"))
    await stale.start()
    tokens = partner.WebhookTokens(stale)
    used: list[str] = []

    async def debitura(token: str) -> _Answer:
        used.append(token)
        return _Answer(401 if token == old else 201)

    async def always_401(token: str) -> _Answer:
        used.append(token)
        return _Answer(401)

    try:
        with pytest.raises(partner.NoToken):
            await tokens.get("cli_never")
        with pytest.raises(partner.TokenRevoked, match="revoked"):
            await tokens.get("cli_gone_wh")
        assert await tokens.get("cli_wh") == old
        await post(helpers.onboarding("cli_wh", new, completed_at="2024-02-01T00:00:00Z"))
        assert (await tokens.call("cli_wh", debitura)).status == 201
        assert used == [old, new]
        used.clear()
        with pytest.raises(partner.LinkInvalid):
            await tokens.call("cli_wh", always_401)
        assert used == [new]  # re-reading found nothing newer: no second call
        assert await tokens.get("cli_wh") == new  # reported, not revoked
    finally:
        await stale.close()
    listed = await asyncio.to_thread(
        processes.run, ["tokens", "list", "--client", "cli_wh", "--json"], operator_env(settings)
    )
    rows = {json.loads(line)["prefix"]: json.loads(line) for line in listed.stdout.splitlines()}
    assert rows[new[:15]]["link_invalid_at"] is not None
    assert rows[old[:15]]["link_invalid_at"] is None
    metrics = await (await client.get("/metrics")).text()
    assert 'receiver_clients_link_invalid{environment="live"} 1.0' in metrics


# --- least privilege ----------------------------------------------------------------


def as_role(database_url: str, role: str, password: str) -> str:
    """The same database, logged in as another role."""
    parts = urlsplit(database_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}"))


async def test_the_cache_reader_role_reads_tokens_and_nothing_else(
    post: Post, settings: Settings, conn: asyncpg.Connection, database_url: str
) -> None:
    """A login role granted receiver_cache_reader runs the token cache (read, LISTEN,
    report a link) but cannot read events, the audit trail or the tokens table, and
    cannot write anything, directly or through the receiver's functions."""
    role, password = f"cache_{uuid.uuid4().hex[:10]}", secrets.token_hex(12)
    await conn.execute(
        f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE receiver_cache_reader"
    )
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_ro", token))
    logs = Captured("receiver.partner.cache")
    try:
        reader_url = as_role(database_url, role, password)
        reader = await asyncpg.connect(reader_url)
        try:
            for statement in (
                "SELECT * FROM receiver.events",
                "SELECT * FROM receiver.tokens",
                "SELECT * FROM receiver.audit",
                "SELECT * FROM receiver.signals",
                "UPDATE receiver.tokens SET status = 'revoked'",
                "DELETE FROM receiver.tokens",
                "INSERT INTO receiver.audit (actor, action) VALUES ('x', 'keys_rotate')",
                "SELECT receiver.enqueue_signal_v2"
                "('c', 'live', NULL, 'token_revoked', 'k', 'c', false)",
                "CREATE TABLE receiver.mine (x int)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await reader.execute(statement)
            assert await reader.fetchval("SELECT count(*) FROM receiver.cache_tokens") == 1
        finally:
            await reader.close()

        tokens = cache.TokenCache.from_settings(
            cache_settings(settings, database_url=None, cache_database_url=reader_url)
        )
        with logs:
            await tokens.start()
        try:
            assert tokens.listening
            assert await tokens.get("cli_ro") == token
            new = helpers.canary_token()
            await post(helpers.onboarding("cli_ro", new, completed_at="2025-01-01T00:00:00Z"))

            async def fresh() -> bool:
                return await tokens.get("cli_ro") == new

            await eventually(fresh)
            await tokens.report_link_invalid("cli_ro", "live", new[:15])
        finally:
            await tokens.close()
        assert await conn.fetchval("SELECT count(*) FROM receiver.link_reports") == 1
        # The cache speaks through the application's logging, not the receiver's.
        assert any(r.name == "receiver.partner.cache" for r in logs.records)
        assert not helpers.find_canaries(logs.text)
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


def test_cache_settings_need_only_a_database_url_and_the_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partner application sets RECEIVER_CACHE_DATABASE_URL and RECEIVER_TOKEN_KEYS;
    no webhook secret, no index key. Without a URL it says which variable to set."""
    for name in list(os.environ):
        if name.startswith("RECEIVER_"):
            monkeypatch.delenv(name)
    keys = "k1:" + base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("RECEIVER_TOKEN_KEYS", keys)
    monkeypatch.setenv("RECEIVER_CACHE_DATABASE_URL", "postgresql://reader@db/receiver")
    settings = cache.CacheSettings()  # type: ignore[call-arg]
    assert settings.dsn() == "postgresql://reader@db/receiver"
    monkeypatch.delenv("RECEIVER_CACHE_DATABASE_URL")
    with pytest.raises(Exception, match="RECEIVER_CACHE_DATABASE_URL"):
        cache.CacheSettings().dsn()  # type: ignore[call-arg]


async def test_the_service_runs_as_the_runtime_role_without_ddl(
    settings: Settings, conn: asyncpg.Connection, database_url: str
) -> None:
    """A login role in receiver_runtime serves on a database its owner migrated: a
    delivery is processed and a token listed; it cannot change the schema or the
    audit trail."""
    role, password = f"app_{uuid.uuid4().hex[:10]}", secrets.token_hex(12)
    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE receiver_runtime")
    try:
        runtime_url = as_role(database_url, role, password)
        env = operator_env(settings, RECEIVER_DATABASE_URL=runtime_url)
        port = processes.free_port()
        with processes.serving(["--port", str(port)], env) as (process, _):
            await processes.wait_healthy(port, process)
            body = helpers.encode(helpers.onboarding("cli_rt"))
            secret = base64.b64encode(settings.webhook_secrets[0].get_secret_value()).decode()
            assert await processes.post_signed(port, secret, body) == (
                200,
                {"status": "processed", "event_id": json.loads(body)["id"]},
            )
        listed = await asyncio.to_thread(processes.run, ["tokens", "list", "--json"], env)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["client_id"] == "cli_rt"
        runtime = await asyncpg.connect(runtime_url)
        try:
            await runtime.execute(
                "INSERT INTO receiver.audit (actor, action) VALUES ('app', 'keys_rotate')"
            )
            for statement in (
                "CREATE TABLE receiver.mine (x int)",
                "ALTER TABLE receiver.events ADD COLUMN x int",
                "DROP TRIGGER audit_append_only ON receiver.audit",
                "UPDATE receiver.audit SET actor = 'else'",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await runtime.execute(statement)
        finally:
            await runtime.close()
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")


PARTNER_APP = """
import asyncio, logging, sys
from receiver import partner
from receiver.partner import cache
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="APP %(name)s %(message)s")

async def main():
    token_cache = cache.TokenCache.from_settings()
    await token_cache.start()
    try:
        token = await partner.WebhookTokens(token_cache).get("cli_app")
        print("APP got", token[:15])
    finally:
        await token_cache.close()
    # A database that is not there: the shared database layer (structlog) reports it.
    away = cache.TokenCache(sys.argv[1], token_cache._keyring)
    await away.start(wait_listening=0.5)
    await away.close()

asyncio.run(main())
"""


async def test_a_partner_application_logs_through_its_own_logging(
    post: Post, settings: Settings
) -> None:
    """A partner application that configured only the standard library's logging gets
    the cache's lines in its own format, and nothing else on its output."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_app", token))
    values = operator_env(settings)
    env = processes.clean_env(
        RECEIVER_CACHE_DATABASE_URL=values["RECEIVER_DATABASE_URL"],
        RECEIVER_TOKEN_KEYS=values["RECEIVER_TOKEN_KEYS"],
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", PARTNER_APP, f"postgresql://x@127.0.0.1:{processes.free_port()}/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"APP got {token[:15]}" in lines
    assert any(line.startswith("APP receiver.partner.cache listening") for line in lines)
    # ...and the database layer's structlog lines too, routed to the app's logging.
    assert any(line.startswith("APP receiver.db") for line in lines), lines
    assert all(line.startswith("APP ") for line in lines), lines
    assert result.stderr == ""
    assert not helpers.find_canaries(result.stdout)


async def test_an_unreachable_api_is_a_token_error(session: aiohttp.ClientSession) -> None:
    """Nothing listening at the API URL: a `TokenError` naming the failure's class, not
    a raw client exception; the next call tries again."""
    tokens = partner.MintedTokens(
        API_KEY, api_url=f"http://127.0.0.1:{processes.free_port()}", session=session
    )
    for _ in range(2):
        with pytest.raises(partner.TokenError, match="ClientConnectorError"):
            await tokens.get("tenant-g")
    assert tokens.mints == 2
    await tokens.close()

"""The partner side: one token API over Debitura's token models, against a stand-in
Debitura on loopback; the token cache's single-flight reads, its signals, and the
cache reader's least privilege."""

from __future__ import annotations

import asyncio
import base64
import json
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
import standardwebhooks
from aiohttp import web

from receiver import config, db, errors, partner, signing, vault
from receiver.config import Settings
from receiver.partner import cache
from receiver.service import app
from tests import helpers
from tests.conftest import create_database, drop_database, unique_name, with_database
from tests.integration import processes
from tests.integration.conftest import (
    Client,
    Post,
    cache_settings,
    operator_env,
    settings_values,
)
from tests.integration.partner_standins import (
    API_KEY,
    Captured,
    RecordingSleep,
    StandInDebitura,
    debitura_on_loopback,
    fast_retries,
    poster,
    serve,
    url_of,
)
from tests.integration.standins import eventually


@pytest.fixture
async def debitura() -> AsyncIterator[StandInDebitura]:
    """A stand-in Debitura (token endpoint and Customer API) on loopback."""
    stand_in = await debitura_on_loopback()
    yield stand_in
    assert stand_in.server is not None
    await stand_in.server.close()


def minted(
    debitura: StandInDebitura, session: aiohttp.ClientSession, **options: Any
) -> partner.MintedTokens:
    """`MintedTokens` against the stand-in, on its clock, retries recorded not slept."""
    values: dict[str, Any] = {"api_url": debitura.url, "session": session, "clock": debitura.clock}
    values.setdefault("retry", fast_retries())
    return partner.MintedTokens(API_KEY, **(values | options))


def case_request(session: aiohttp.ClientSession, url: str) -> Any:
    """The application's own request function: create a case with a given token."""
    return poster(session, url + "/cases")


# --- minted JWTs --------------------------------------------------------------------


async def test_minted_token_is_reused_until_near_expiry_and_renewed_ahead(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """A token is minted once and reused; within `refresh_ahead` of its expiry a
    renewal runs in the background while the valid token is still handed out; within
    `skew` of expiry it is never handed out."""
    tokens = minted(debitura, session, skew=60, refresh_ahead=300)
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


async def test_a_short_expires_in_does_not_mint_on_every_call(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """An `expiresIn` under the 60 s skew (30 s): the token is still reused for three
    quarters of its life, not minted anew on every call; past that, minted again."""
    debitura.expires_in = 30
    tokens = minted(debitura, session)
    first = await tokens.get("tenant-short")
    for _ in range(10):
        assert await tokens.get("tenant-short") == first
    debitura.clock.now += 20  # past half its life: renewed in the background
    assert await tokens.get("tenant-short") == first

    async def renewed() -> bool:
        return debitura.mints == 2

    await eventually(renewed)
    assert await tokens.get("tenant-short") != first
    assert debitura.mints == 2
    await tokens.close()


async def test_a_hundred_concurrent_callers_share_one_mint(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """Single flight: 100 callers asking at once for a tenant cause one POST /oauth/token."""
    tokens = minted(debitura, session)
    got = await asyncio.gather(*(tokens.get("tenant-b") for _ in range(100)))
    assert len(set(got)) == 1
    assert debitura.mints == 1
    await tokens.close()


async def test_the_creditor_id_is_kept_and_readable(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """`creditorId` of the mint answer is readable per tenant (None before a mint)."""
    tokens = minted(debitura, session)
    assert tokens.creditor_id("tenant-cr") is None
    await tokens.get("tenant-cr")
    assert tokens.creditor_id("tenant-cr") == debitura.creditors["tenant-cr"]
    await tokens.close()


async def test_a_refused_jwt_is_minted_anew_and_the_call_retried_exactly_once(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """Debitura refuses a token the client still thinks valid (401): one fresh mint,
    one more call, which succeeds."""
    tokens = minted(debitura, session)
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
    tokens = minted(
        debitura, session, on_invalidated=lambda key, reason: seen.append((key, reason))
    )
    debitura.unlinked.add("tenant-d")
    with pytest.raises(partner.LinkInvalid):
        await tokens.call("tenant-d", case_request(session, debitura.url))
    assert debitura.cases == 2
    assert seen == [("tenant-d", "link_invalid")]
    await tokens.close()


async def test_a_refused_mint_during_the_retry_tells_an_unlinked_tenant_from_a_wrong_key(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """The 401 retry's mint refused for the tenant (404) is `TenantNotLinked`, a
    `LinkInvalid`, after one call; a wrong API key (401 at the mint) is
    `ApiKeyRefused`, which is not a `LinkInvalid`."""
    tokens = minted(debitura, session)
    request = case_request(session, debitura.url)
    assert (await tokens.call("tenant-u", request)).status == 201
    debitura.revoked.add(await tokens.get("tenant-u"))
    debitura.unknown.add("tenant-u")  # unlinked since: the mint refuses the tenant
    with pytest.raises(partner.TenantNotLinked) as unlinked:
        await tokens.call("tenant-u", request)
    assert isinstance(unlinked.value, partner.LinkInvalid)
    assert debitura.cases == 2
    wrong = partner.MintedTokens(
        "rp_key_wrong", api_url=debitura.url, session=session, retry=fast_retries()
    )
    with pytest.raises(partner.ApiKeyRefused) as refused:
        await wrong.call("tenant-v", request)
    assert not isinstance(refused.value, partner.LinkInvalid)
    await tokens.close()


async def test_a_403_is_permission_denied_with_the_scopes(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """Debitura's 403 `permission_error` is `PermissionDenied` carrying
    `required_scope` and `token_scopes`, after one call (no retry)."""
    tokens = minted(debitura, session)
    body = {
        "error": {
            "type": "permission_error",
            "message": "Token does not have permission for this action",
            "required_scope": "payments.read",
            "token_scopes": ["cases.create", "cases.read"],
        }
    }
    debitura.case_answers.append((403, body, {}))
    with pytest.raises(partner.PermissionDenied) as denied:
        await tokens.call("tenant-p", case_request(session, debitura.url))
    assert denied.value.required_scope == "payments.read"
    assert denied.value.token_scopes == ("cases.create", "cases.read")
    assert "payments.read" in str(denied.value)
    assert debitura.cases == 1
    await tokens.close()


async def test_a_wrong_api_key_is_refused_and_never_shown(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """401 from /oauth/token is `ApiKeyRefused` (a `MintRefused`), not retried; the key
    is in no repr, message or log, and a minted token in no log either."""
    wrong = "rp_key_" + secrets.token_hex(16)
    with Captured("receiver.partner") as logs:
        tokens = partner.MintedTokens(
            wrong, api_url=debitura.url, session=session, clock=debitura.clock
        )
        with pytest.raises(partner.MintRefused) as refused:
            await tokens.get("tenant-e")
        good = minted(debitura, session)
        token = await good.get("tenant-e")
    assert isinstance(refused.value, partner.ApiKeyRefused)
    assert debitura.mints == 2
    assert logs.records  # the mint was logged...
    assert wrong not in repr(tokens) + str(refused.value) + repr(refused.value) + logs.text
    assert API_KEY not in repr(good) + logs.text
    assert token not in logs.text  # ...without the token
    await tokens.close()
    await good.close()


async def test_the_token_endpoint_is_retried_with_backoff_honouring_retry_after(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """503, 502 and a 429 (Retry-After: 7) before a token: four POSTs, waits of
    exponential backoff with jitter (each within its ceiling) and the 7 s asked for."""
    sleep = RecordingSleep()
    tokens = minted(debitura, session, retry=fast_retries(sleep, base=0.5, max_retries=3))
    debitura.answer(503)
    debitura.answer(502)
    debitura.answer(429, {"error": "slow down"}, **{"Retry-After": "7"})
    assert await tokens.get("tenant-r")
    assert debitura.mints == 4
    assert len(sleep.waits) == 3
    assert 0 <= sleep.waits[0] <= 0.5
    assert 0 <= sleep.waits[1] <= 1.0
    assert sleep.waits[2] == 7
    await tokens.close()


async def test_retries_are_bounded_in_count_and_in_time(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """A token endpoint that keeps answering 503 is `Unavailable` after 1 + max_retries
    POSTs; a 429 whose Retry-After passes the time budget is `RateLimited` at once."""
    sleep = RecordingSleep()
    tokens = minted(debitura, session, retry=fast_retries(sleep, max_retries=2))
    for _ in range(5):
        debitura.answer(503)
    with pytest.raises(partner.Unavailable) as unavailable:
        await tokens.get("tenant-s")
    assert (unavailable.value.status, debitura.mints, len(sleep.waits)) == (503, 3, 2)
    debitura.scripted.clear()
    patient = minted(debitura, session, retry=fast_retries(sleep, max_elapsed=10))
    debitura.answer(429, **{"Retry-After": "20"})
    with pytest.raises(partner.RateLimited) as limited:
        await patient.get("tenant-s")
    assert limited.value.retry_after == 20
    assert (debitura.mints, len(sleep.waits)) == (4, 2)  # one more POST, no wait
    await tokens.close()
    await patient.close()


async def test_a_429_from_the_call_is_rate_limited_not_retried(
    debitura: StandInDebitura, session: aiohttp.ClientSession
) -> None:
    """A 429 from the application's call is `RateLimited` with the server's Retry-After
    (finite, capped: `inf` is not a wait), never retried on the spot."""
    tokens = minted(debitura, session)
    debitura.case_answers.append((429, {}, {"Retry-After": "3"}))
    with pytest.raises(partner.RateLimited) as calling:
        await tokens.call("tenant-f", case_request(session, debitura.url))
    assert calling.value.retry_after == 3
    debitura.case_answers.append((429, {}, {"Retry-After": "inf"}))
    with pytest.raises(partner.RateLimited) as endless:
        await tokens.call("tenant-f", case_request(session, debitura.url))
    assert endless.value.retry_after == 3600
    assert debitura.cases == 2
    await tokens.close()


async def test_an_unreachable_api_is_a_token_error(session: aiohttp.ClientSession) -> None:
    """Nothing listening at the API URL: `Unavailable` (a `TokenError`) naming the
    failure's class after every retry, not a raw client exception; the next call tries
    again."""
    sleep = RecordingSleep()
    tokens = partner.MintedTokens(
        API_KEY,
        api_url=f"http://127.0.0.1:{processes.free_port()}",
        session=session,
        retry=fast_retries(sleep, max_retries=1),
    )
    for _ in range(2):
        with pytest.raises(partner.Unavailable, match="ClientConnectorError"):
            await tokens.get("tenant-g")
    assert tokens.mints == 4
    assert len(sleep.waits) == 2
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
    rows = {
        json.loads(line)["token_prefix"]: json.loads(line) for line in listed.stdout.splitlines()
    }
    assert rows[new[:15]]["link_invalid_at"] is not None
    assert rows[old[:15]]["link_invalid_at"] is None
    metrics = await (await client.get("/metrics")).text()
    assert 'receiver_clients_link_invalid{environment="live"} 1.0' in metrics


async def test_a_401_while_a_revocation_is_stored_is_token_revoked(
    post: Post, settings: Settings
) -> None:
    """The cache has not heard of a revocation yet (no signal reaches it); Debitura
    refuses the token: re-reading finds the revocation, so the call ends in
    `TokenRevoked` after one call, not `LinkInvalid`, and nothing is reported."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_rv", token))
    stale = cache.TokenCache.from_settings(cache_settings(settings, notify_channel="unused"))
    tokens = partner.WebhookTokens(stale)
    await tokens.start()
    used: list[str] = []

    async def refused(given: str) -> _Answer:
        used.append(given)
        return _Answer(401)

    try:
        assert await tokens.get("cli_rv") == token
        await post(helpers.revocation("cli_rv", token[:15]))
        with pytest.raises(partner.TokenRevoked, match="revoked"):
            await tokens.call("cli_rv", refused)
        assert used == [token]
    finally:
        await tokens.close()


async def test_token_revoked_names_the_revoked_token_when_onboarding_times_tie(
    post: Post, settings: Settings
) -> None:
    """Two onboardings with the same completion time, the second revoked: the client's
    `TokenRevoked` names the revoked token, not the one it superseded."""
    first, second = helpers.canary_token(), helpers.canary_token()
    at = "2024-03-01T00:00:00Z"
    await post(helpers.onboarding("cli_tie", first, completed_at=at))
    await post(helpers.onboarding("cli_tie", second, completed_at=at))
    await post(helpers.revocation("cli_tie", second[:15], revoked_at="2024-03-02T00:00:00Z"))
    token_cache = cache.TokenCache.from_settings(cache_settings(settings))
    tokens = partner.WebhookTokens(token_cache)
    await tokens.start()
    try:
        with pytest.raises(partner.TokenRevoked) as revoked:
            await tokens.get("cli_tie")
    finally:
        await tokens.close()
    assert second[:15] in str(revoked.value)
    assert "is revoked" in str(revoked.value)


class CountingDatabase(db.Database):
    """The application's pool, shared with the cache, counting each named query run."""

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.runs: dict[str, int] = {}

    async def fetch(self, name: str, *args: Any) -> list[Any]:
        self.runs[name] = self.runs.get(name, 0) + 1
        return await super().fetch(name, *args)


async def test_fifty_callers_missing_one_client_cause_one_read(
    post: Post, settings: Settings, database_url: str
) -> None:
    """Single flight: 50 concurrent callers missing the same client share one SELECT;
    after an invalidation the next miss reads again, once."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_sf", token))
    opened = await db.Database.open(database_url, max_size=8)
    counting = CountingDatabase(opened.pool)
    token_cache = cache.TokenCache(
        database_url,
        vault.Sealer.from_settings(settings).keyring,
        channel="unused",
        database=counting,
    )
    await token_cache.start()
    try:
        got = await asyncio.gather(*(token_cache.get("cli_sf") for _ in range(50)))
        assert set(got) == {token}
        assert counting.runs["active_token"] == 1
        token_cache.invalidate("cli_sf")
        await asyncio.gather(*(token_cache.get("cli_sf") for _ in range(50)))
        assert counting.runs["active_token"] == 2
    finally:
        await token_cache.close()
        await opened.close()


async def test_signals_carry_every_secret_during_a_rotation_window(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, database_url: str
) -> None:
    """RECEIVER_CACHE_SECRET=whsec_new,old_base64: a real signal verifies with the
    `standardwebhooks` library under either secret (a cache that knows one of them),
    with `cache.verify_signal` given several, and the legacy header carries both."""
    new, old = os.urandom(32), os.urandom(32)
    whsec_new = "whsec_" + base64.b64encode(new).decode()
    received: list[tuple[dict[str, str], bytes]] = []

    async def signals(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.json_response({"ok": True})

    partner_app = await serve({"/signals": signals})
    try:
        rotating = config.load_settings(
            **settings_values(settings),
            cache_url=url_of(partner_app) + "/signals",
            cache_secret=f"{whsec_new}, {base64.b64encode(old).decode()}",
        )
        client = await aiohttp_client(app.create_app(rotating))
        body = helpers.encode(helpers.onboarding("cli_rot"))
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        assert response.status == 200

        async def arrived() -> bool:
            return bool(received)

        await eventually(arrived)
    finally:
        await partner_app.close()
    headers, signal = received[0]
    lowered = {k.lower(): v for k, v in headers.items()}
    assert len(lowered["webhook-signature"].split(" ")) == 2
    for secret in (whsec_new, base64.b64encode(old).decode()):
        assert standardwebhooks.Webhook(secret).verify(signal, lowered)["client_id"] == "cli_rot"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(os.urandom(32)).verify(signal, lowered)
    assert cache.verify_signal(headers, signal, [os.urandom(32), old])["client_id"] == "cli_rot"
    assert cache.verify_signal(headers, signal, whsec_new)["client_id"] == "cli_rot"
    legacy = headers[signing.SIGNAL_SIGNATURE_HEADER]
    assert legacy.count("v1=") == 2
    assert cache.verify_signal({signing.SIGNAL_SIGNATURE_HEADER: legacy}, signal, old)


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
    # An unencoded ? in the password: asyncpg's traceback (in the listener, which it
    # ended) quoted the rest of it. One line instead, naming no part of it.
    monkeypatch.setenv("RECEIVER_CACHE_DATABASE_URL", "postgresql://r:1?hunter2@h1,h2/receiver")
    with pytest.raises(errors.ConfigError) as caught:
        cache.CacheSettings().dsn()  # type: ignore[call-arg]
    assert "RECEIVER_CACHE_DATABASE_URL is invalid" in str(caught.value)
    assert "hunter2" not in str(caught.value)


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


async def test_the_listener_keeps_trying_through_a_refusal_at_connect(server_dsn: str) -> None:
    """A refusal at connect (here: the database is not there yet; after a failover, a
    new primary whose pg_hba or roles lag behind) is one the operator fixes while the
    partner's application runs: the listener logs and tries again, and listens once
    the database takes it, instead of ending for good (stale tokens until the TTL)."""
    name = unique_name("receiver_late")
    tokens = cache.TokenCache(
        with_database(server_dsn, name), vault.Keyring([("k1", secrets.token_bytes(32))])
    )
    await tokens.start(wait_listening=0.5)
    try:
        assert not tokens.listening
        await create_database(server_dsn, name)

        async def listening() -> bool:
            return tokens.listening

        await eventually(listening, seconds=30)
    finally:
        await tokens.close()
        await drop_database(server_dsn, name)

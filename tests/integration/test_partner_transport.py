"""The partner library's transport against hostile token endpoints over real HTTP:
no redirect followed with a credential, no clear-text API key, answers bounded and
shape-checked, every failure a `TokenError` that carries no secret; and the canary
check over every error path of the three token models."""

from __future__ import annotations

import asyncio
import json
import math
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from receiver import partner
from tests import helpers
from tests.integration import processes
from tests.integration.partner_standins import (
    API_KEY,
    Captured,
    canary,
    fast_retries,
    jwt,
    url_of,
)

GIB = 1024**3


class Scripted:
    """A token endpoint (and anything else) answering with the handlers a test queues;
    `seen` records every request's path and headers."""

    def __init__(self) -> None:
        self.handlers: list[Callable[[web.Request], Awaitable[web.StreamResponse]]] = []
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, dict(request.headers), await request.read()))
        if not self.handlers:
            return web.json_response({"error": "nothing scripted"}, status=500)
        return await self.handlers.pop(0)(request)

    def json(
        self,
        document: Any,
        status: int = 200,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Queue a JSON answer (`times` times)."""

        async def answer(_: web.Request) -> web.Response:
            return web.json_response(document, status=status, headers=headers)

        self.handlers += [answer] * times

    def raw(self, body: bytes, status: int = 200, **headers: str) -> None:
        """Queue an answer of exactly `body`, as application/json."""

        async def answer(_: web.Request) -> web.Response:
            return web.Response(
                body=body, status=status, content_type="application/json", headers=headers
            )

        self.handlers.append(answer)

    @property
    def url(self) -> str:
        assert self.server is not None
        return url_of(self.server)


@pytest.fixture
async def endpoint() -> AsyncIterator[Scripted]:
    """A scripted token endpoint on loopback (every POST path)."""
    scripted = Scripted()
    site = web.Application()
    site.router.add_route("*", "/{tail:.*}", scripted.handle)
    scripted.server = TestServer(site, host="127.0.0.1", port=processes.free_port())
    await scripted.server.start_server()
    yield scripted
    await scripted.server.close()


def good_mint(tenant: str = "t1", **changes: Any) -> dict[str, Any]:
    """A well-formed `POST /oauth/token` answer, with `changes` applied."""
    document = {
        "accessToken": jwt(tenant),
        "tokenType": "Bearer",
        "expiresIn": 1800,
        "externalTenantId": tenant,
        "creditorId": "0b6f4c1e-5d1a-4c59-9d55-6f1d7c1f2a10",
    }
    return document | changes


def minted(endpoint: Scripted, session: aiohttp.ClientSession) -> partner.MintedTokens:
    """`MintedTokens` against the scripted endpoint, retries recorded not slept."""
    return partner.MintedTokens(
        API_KEY, api_url=endpoint.url, session=session, retry=fast_retries(max_retries=1)
    )


def refreshing(endpoint: Scripted, session: aiohttp.ClientSession) -> partner.RefreshingTokens:
    """`RefreshingTokens` against the scripted endpoint, retries recorded not slept."""
    return partner.RefreshingTokens(
        API_KEY, api_url=endpoint.url, session=session, retry=fast_retries(max_retries=1)
    )


# --- transport ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_never_followed_with_the_api_key(
    endpoint: Scripted, session: aiohttp.ClientSession, status: int
) -> None:
    """A token endpoint answering a redirect to another server: `Redirected`, and the
    other server never sees a request (so never the XApiKey or the apiKey body), for
    both API-key models."""
    elsewhere: list[dict[str, str]] = []  # requests that reached the other server

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(dict(request.headers))
        return web.json_response(good_mint())

    site = web.Application()
    site.router.add_route("*", "/{tail:.*}", record)  # any method: 301/302 become GET
    other = TestServer(site, host="127.0.0.1", port=processes.free_port())
    await other.start_server()
    try:
        for path, tokens in (
            ("/oauth/token", minted(endpoint, session)),
            ("/auth/api-key", refreshing(endpoint, session)),
        ):

            async def redirect(_: web.Request, path: str = path) -> web.Response:
                return web.Response(status=status, headers={"Location": url_of(other) + path})

            endpoint.handlers.append(redirect)
            with pytest.raises(partner.Redirected):
                await tokens.get("t1")
            await tokens.close()
    finally:
        await other.close()
    assert elsewhere == []
    assert len(endpoint.seen) == 2


@pytest.mark.parametrize(
    "url",
    [
        "http://referral-api.debitura.com",
        "http://rp_user:SECRETPW@referral-api.debitura.com/v1?api_key=SECRETQ",
        "https://rp_user:SECRETPW@referral-api.debitura.com",
        "ftp://referral-api.debitura.com",
        "referral-api.debitura.com",
    ],
)
def test_a_clear_text_or_credentialed_api_url_is_refused_at_construction(url: str) -> None:
    """`http://` to a non-loopback host (or a URL with credentials) is `InsecureURL` at
    construction, for both API-key models; the message names the URL without its
    user, password or query."""
    for model in (partner.MintedTokens, partner.RefreshingTokens):
        with pytest.raises(partner.InsecureURL) as refused:
            model(API_KEY, api_url=url)
        text = str(refused.value) + repr(refused.value)
        assert "SECRET" not in text
        assert "referral-api.debitura.com" in text


def test_https_and_loopback_http_are_accepted() -> None:
    """https:// anywhere, http:// only to 127.0.0.1, ::1 or localhost."""
    for url in (
        "https://referral-api.debitura.com",
        "http://127.0.0.1:9",
        "http://[::1]:9",
        "http://localhost:9",
    ):
        assert "MintedTokens" in repr(partner.MintedTokens(API_KEY, api_url=url))


class Streamed:
    """A 200 that streams up to `size` bytes of JSON-looking filler (bounded: it stops
    when the client goes away), counting what it managed to send."""

    def __init__(self, size: int, *, declare_length: bool) -> None:
        self.size = size
        self.declare_length = declare_length
        self.sent = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if self.declare_length:
            response.content_length = self.size
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b'{"accessToken": "' + b"x" * (1024 * 1024 - 17)
        try:
            while self.sent < self.size:
                await response.write(chunk[: self.size - self.sent])
                self.sent += len(chunk[: self.size - self.sent])
        except (ConnectionError, RuntimeError):
            pass  # the client closed the connection: what a bounded reader does
        return response


@pytest.mark.parametrize("declare_length", [True, False])
async def test_a_huge_answer_is_not_read(
    endpoint: Scripted, session: aiohttp.ClientSession, declare_length: bool
) -> None:
    """A 1.5 GiB 200 (declared, or chunked without a length) is `AnswerTooLarge` after
    reading at most the cap: the stand-in could push only what the socket buffers
    hold before the client hung up."""
    streamed = Streamed(GIB + GIB // 2, declare_length=declare_length)
    endpoint.handlers.append(streamed)
    tokens = minted(endpoint, session)
    with pytest.raises(partner.AnswerTooLarge):
        await tokens.get("t1")
    await tokens.close()
    assert streamed.sent < 64 * 1024 * 1024, streamed.sent


async def test_garbage_json_is_a_malformed_answer_without_the_body(
    endpoint: Scripted, session: aiohttp.ClientSession
) -> None:
    """A 200 with `application/json` and garbage: `MalformedAnswer`, whose message,
    repr and exception chain hold nothing of the body."""
    secret = canary("tok_live_")
    endpoint.raw(f'{{"accessToken": "{secret}", oops'.encode())
    tokens = minted(endpoint, session)
    with pytest.raises(partner.MalformedAnswer) as malformed:
        await tokens.get("t1")
    assert secret not in everything_about(malformed.value)
    assert malformed.value.__context__ is None
    await tokens.close()


_FIELDS = b'"tokenType": "Bearer", "expiresIn": 1800'
HOSTILE_MINTS: dict[str, bytes] = {
    "expiresIn NaN": b'{"accessToken": "%s", "tokenType": "Bearer", "expiresIn": NaN}',
    "expiresIn Infinity": b'{"accessToken": "%s", "tokenType": "Bearer", "expiresIn": Infinity}',
    "expiresIn negative": b'{"accessToken": "%s", "tokenType": "Bearer", "expiresIn": -5}',
    "expiresIn zero": b'{"accessToken": "%s", "tokenType": "Bearer", "expiresIn": 0}',
    "expiresIn text": b'{"accessToken": "%s", "tokenType": "Bearer", "expiresIn": "soon"}',
    "accessToken object": b'{"accessToken": {"v": "%s"}, ' + _FIELDS + b"}",
    "accessToken number": b'{"accessToken": 12345, "x": "%s", ' + _FIELDS + b"}",
    "accessToken empty": b'{"accessToken": "", "x": "%s", ' + _FIELDS + b"}",
    "tokenType MAC": b'{"accessToken": "%s", "tokenType": "MAC", "expiresIn": 1800}',
    "tokenType missing": b'{"accessToken": "%s", "expiresIn": 1800}',
    "another tenant": b'{"accessToken": "%s", "externalTenantId": "t2", ' + _FIELDS + b"}",
    "a list": b'["%s"]',
    "empty body": b"",
}


@pytest.mark.parametrize("case", HOSTILE_MINTS)
async def test_a_hostile_mint_answer_is_refused(
    endpoint: Scripted, session: aiohttp.ClientSession, case: str
) -> None:
    """Each answer off the documented shape is `MalformedAnswer` (nothing is minted on
    every call, nothing stringified), naming the field, never the token."""
    secret = canary("tok_live_")
    endpoint.raw(HOSTILE_MINTS[case].replace(b"%s", secret.encode()))
    tokens = minted(endpoint, session)
    with pytest.raises(partner.MalformedAnswer) as malformed:
        await tokens.get("t1")
    assert secret not in everything_about(malformed.value)
    await tokens.close()


async def test_token_type_bearer_is_case_insensitive(
    endpoint: Scripted, session: aiohttp.ClientSession
) -> None:
    """`tokenType: "bearer"` is Bearer."""
    answer = good_mint(tokenType="bearer")
    endpoint.json(answer)
    tokens = minted(endpoint, session)
    assert await tokens.get("t1") == answer["accessToken"]
    await tokens.close()


@pytest.mark.parametrize(
    ("header", "expected"), [("inf", 60.0), ("1e400", 60.0), ("nan", None), ("-3", 0.0)]
)
async def test_retry_after_is_finite_and_capped(
    endpoint: Scripted, session: aiohttp.ClientSession, header: str, expected: float | None
) -> None:
    """A 429 whose Retry-After is inf, huge, NaN or negative: the mint's `RateLimited`
    carries a finite wait, capped at the policy's `retry_after_cap` (60 s)."""
    endpoint.json({"error": "slow"}, status=429, headers={"Retry-After": header})
    tokens = partner.MintedTokens(
        API_KEY, api_url=endpoint.url, session=session, retry=fast_retries(max_retries=0)
    )
    with pytest.raises(partner.RateLimited) as limited:
        await tokens.get("t1")
    wait = limited.value.retry_after
    assert math.isfinite(wait)
    if expected is not None:
        assert wait == expected
    await tokens.close()


# --- the canary check ---------------------------------------------------------------


def everything_about(exc: BaseException) -> str:
    """An exception as a crash reporter could see it: message, repr, attributes,
    traceback text, and the same for its whole cause/context chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [
            str(current),
            repr(current),
            repr(vars(current)) if hasattr(current, "__dict__") else "",
        ]
        parts += traceback.format_exception(current)
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


async def test_no_secret_in_any_log_line_exception_or_repr_under_every_error_path(
    endpoint: Scripted, session: aiohttp.ClientSession
) -> None:
    """Every error path of the three models (refused key, refused refresh, redirect,
    huge, garbage, hostile fields, 5xx and 429 through the retries, network failure,
    403, second 401) with canary API keys, tokens, refresh tokens and JWTs: none of
    them in the library's log lines, exceptions (whole chain) or reprs."""
    api_key = canary("rp_key_")
    refresh = canary("rt_")
    access = jwt("canary")
    errors: list[BaseException] = []
    objects: list[object] = []

    async def expect(coroutine: Awaitable[Any]) -> None:
        try:
            await coroutine
        except partner.TokenError as exc:
            errors.append(exc)
        else:
            raise AssertionError("no TokenError")

    with Captured("receiver.partner") as logs:
        tokens = partner.MintedTokens(
            api_key, api_url=endpoint.url, session=session, retry=fast_retries(max_retries=1)
        )
        objects.append(tokens)
        scripts: list[Callable[[], None]] = [
            lambda: endpoint.json({"error": api_key}, status=401),
            lambda: endpoint.json({"error": api_key}, status=404),
            lambda: endpoint.json(
                {}, status=307, headers={"Location": "http://127.0.0.1:9/" + api_key}
            ),
            lambda: endpoint.raw(b"{" + access.encode()),
            lambda: endpoint.raw(json.dumps({"accessToken": {"t": access}}).encode()),
            lambda: endpoint.raw(
                json.dumps(good_mint(tokenType="MAC", accessToken=access)).encode()
            ),
            lambda: endpoint.json({"e": access}, status=503, times=2),
            # Retry-After inf is capped at 60 s, past the 30 s budget: no retry.
            lambda: endpoint.json({"e": access}, status=429, headers={"Retry-After": "inf"}),
            lambda: endpoint.json({"e": access}, status=418),
        ]
        for script in scripts:
            script()
            await expect(tokens.get("t1"))

        endpoint.json(good_mint(accessToken=access))
        endpoint.json(
            {
                "error": {
                    "type": "permission_error",
                    "required_scope": access,
                    "token_scopes": [access],
                }
            },
            status=403,
        )
        await expect(tokens.call("t1", _calling(session, endpoint.url)))
        endpoint.json({"error": access}, status=401)
        endpoint.json(good_mint(accessToken=jwt("second")))
        endpoint.json({"error": access}, status=401)
        await expect(tokens.call("t1", _calling(session, endpoint.url)))
        await tokens.close()

        renewing = partner.RefreshingTokens(
            api_key, api_url=endpoint.url, session=session, retry=fast_retries(max_retries=0)
        )
        objects.append(renewing)
        grant = {
            "token_type": "Bearer",
            "expires_in": 3600,
            "access_token": access,
            "refresh_token": refresh,
        }
        endpoint.json(grant)
        assert await renewing.get("acct") == access
        endpoint.json({"error": refresh}, status=401)  # the app's call: refused
        endpoint.json({"error": refresh}, status=400)  # the refresh: refused
        endpoint.json({"error": api_key}, status=401)  # the new grant: refused
        await expect(renewing.call("acct", _calling(session, endpoint.url)))
        objects.append(renewing)
        await renewing.close()

        unreachable_url = f"http://127.0.0.1:{processes.free_port()}"
        unreachable = partner.MintedTokens(
            api_key, api_url=unreachable_url, session=session,
            retry=fast_retries(max_retries=1),
        )  # fmt: skip
        await expect(unreachable.get("t1"))
        objects.append(unreachable)
        on_its_own_loop = partner.MintedTokens(
            api_key, api_url=unreachable_url, retry=fast_retries(max_retries=0)
        )
        blocking = await asyncio.to_thread(partner.blocking, on_its_own_loop)
        try:
            await asyncio.to_thread(_expect_sync, blocking, errors)
            objects.append(blocking)
        finally:
            await asyncio.to_thread(blocking.close)

    assert len(errors) >= 14
    text = logs.text + "\n".join(map(everything_about, errors)) + "\n".join(map(repr, objects))
    for secret in (api_key, refresh, access):
        assert secret not in text
    assert not helpers.find_canaries(text)
    assert all(e.__context__ is None and e.__cause__ is None for e in errors)


def _calling(session: aiohttp.ClientSession, url: str) -> Callable[[str], Awaitable[Any]]:
    async def request(token: str) -> aiohttp.ClientResponse:
        response = await session.post(url + "/api", headers={"Authorization": f"Bearer {token}"})
        await response.read()
        return response

    return request


def _expect_sync(blocking: partner.BlockingTokens, errors: list[BaseException]) -> None:
    try:
        blocking.get("t1")
    except partner.TokenError as exc:
        errors.append(exc)
    else:
        raise AssertionError("no TokenError")


# --- hostile round 3: a lifetime floor, a deadline for the attempt in flight ----------


async def test_a_millisecond_lifetime_does_not_mint_per_call(
    endpoint: Scripted, session: aiohttp.ClientSession
) -> None:
    """`expiresIn: 0.001` (accepted) is held as if good for 10 s: 200 `get()` calls in a
    row mint once, not 200 times."""
    endpoint.json(good_mint(expiresIn=0.001), times=200)
    tokens = minted(endpoint, session)
    for _ in range(200):
        await tokens.get("t1")
    assert len(endpoint.seen) == 1
    assert tokens.mints == 1
    await tokens.close()


async def test_max_elapsed_bounds_the_attempt_in_flight(
    endpoint: Scripted, session: aiohttp.ClientSession
) -> None:
    """Against an endpoint that drips its answer a byte at a time, `max_elapsed=1.5`
    gives up after about 1.5 s (the attempt's timeout is what is left of it), not
    after the 10 s per-attempt timeout."""

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(300):
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    endpoint.handlers += [drip] * 4
    tokens = partner.MintedTokens(
        API_KEY,
        api_url=endpoint.url,
        session=session,
        retry=partner.RetryPolicy(max_retries=3, max_elapsed=1.5, base=0.01, cap=0.01),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(partner.Unavailable):
        await tokens.get("t1")
    assert loop.time() - started < 4.0
    await tokens.close()

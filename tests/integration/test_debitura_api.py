"""The Referral Partner API client against real HTTP servers on loopback: typed
errors, no redirect followed with the key, capped answers, and no token or API key
in any error text or repr."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from receiver import config, errors
from receiver.debitura import api
from receiver.sandbox import Sandbox
from tests import helpers
from tests.integration import processes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def debitura() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """A tiny Debitura that answers every request with the handler a test gives."""
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = processes.free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def settings_for(url: str, key: str) -> config.Settings:
    """Settings with Debitura's live API at `url`, retries fast."""
    return config.load_settings(
        webhook_secrets=helpers.new_secret(),
        token_keys="k1:" + helpers.new_secret(),
        index_key=helpers.new_secret(),
        debitura_api_url=url,
        debitura_api_key=key,
        debitura_retry_base_seconds=0.01,
    )


async def call(url: str, key: str, what: Callable[[api.Api, api.Endpoint], Awaitable[Any]]) -> Any:
    """Run one API call against `url`."""
    settings = settings_for(url, key)
    async with aiohttp.ClientSession() as session:
        return await what(api.Api(session, settings), api.endpoint(settings, "live"))


async def test_403_keeps_the_required_scope_and_the_token_scopes(
    debitura: Callable[[Handler], Awaitable[str]],
) -> None:
    """A 403 permission_error is DebituraPermission with Debitura's scope fields."""

    async def forbid(_: web.Request) -> web.Response:
        body = {
            "error": {
                "type": "permission_error",
                "message": "Token does not have permission for this action",
                "required_scope": "payments.read",
                "token_scopes": ["cases.create", "cases.read"],
            }
        }
        return web.json_response(body, status=403)

    url = await debitura(forbid)
    with pytest.raises(errors.DebituraPermission) as raised:
        await call(url, "sk_key", lambda a, e: a.fetch(e, "cli_1"))
    assert raised.value.required_scope == "payments.read"
    assert raised.value.token_scopes == ["cases.create", "cases.read"]


async def test_a_redirect_is_not_followed_with_the_key(
    debitura: Callable[[Handler], Awaitable[str]],
) -> None:
    """A 307 elsewhere is refused, and the key never reaches the redirect's target."""
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("XApiKey"))
        return web.json_response({})

    target = await debitura(elsewhere)

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target + "/steal")

    url = await debitura(redirect)
    with pytest.raises(errors.DebituraRefused, match="redirect"):
        await call(url, "sk_key", lambda a, e: a.fetch(e, "cli_1"))
    assert seen == []


async def test_an_oversized_answer_is_refused(
    debitura: Callable[[Handler], Awaitable[str]],
) -> None:
    """An answer over the cap is refused, not read whole."""

    async def huge(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * (api.MAX_ANSWER_BYTES + 10))

    url = await debitura(huge)
    with pytest.raises(errors.DebituraRefused, match="cap"):
        await call(url, "sk_key", lambda a, e: a.fetch(e, "cli_1"))


async def test_no_token_or_api_key_in_errors_or_reprs() -> None:
    """Every error the client raises, and the reprs of what it returns, hold neither
    a token nor the API key."""
    sb = Sandbox(environment="live")
    await sb.start()
    try:
        token = sb.link_client("cli_1")
        helpers.CANARIES.update({token, sb.api_key})
        texts: list[str] = []
        settings = settings_for(sb.url, sb.api_key)
        async with aiohttp.ClientSession() as session:
            client = api.Api(session, settings)
            where = api.endpoint(settings, "live")
            texts += [repr(where), repr(client), repr(settings)]
            fetched = await client.fetch(where, "cli_1")
            texts.append(repr(fetched))
            rotated = await client.rotate(where, "cli_1", "test", revoke_immediately=False)
            texts.append(repr(rotated))
            helpers.CANARIES.add(rotated.token.get_secret_value())
            texts.append(repr(await client.validate(where, rotated.token.get_secret_value())))
            for call_name, status in (("fetch", 500), ("rotate", 503), ("validate", 403)):
                sb.faults.fail_next(call_name, status, times=10)
            sb.faults.drop_after("rotate")
            failures: list[BaseException] = []
            for attempt in (
                client.fetch(where, "cli_1"),
                client.rotate(where, "cli_1", "x", revoke_immediately=False),
                client.validate(where, token),
                client.fetch(where, "cli_unknown"),
                client.fetch(api.Endpoint("live", sb.url, SecretStr("sk_wrong_" + token)), "cli_1"),
            ):
                try:
                    await attempt
                except errors.DebituraError as exc:
                    failures.append(exc)
            assert len(failures) == 5
            texts += [f"{exc!r} {exc}" for exc in failures]
        for text in texts:
            assert helpers.find_canaries(text) == [], text
    finally:
        await sb.stop()


async def test_an_answer_in_many_chunks_under_the_cap_is_read_whole(
    debitura: Callable[[Handler], Awaitable[str]],
) -> None:
    """An answer that arrives in pieces is read to its end (up to the cap)."""
    token = helpers.canary_token()

    async def chunked(request: web.Request) -> web.StreamResponse:
        body = json.dumps(
            {"bearer_token": token, "status": "active", "padding": "p" * 40_000}
        ).encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(body), 1000):
            await response.write(body[start : start + 1000])
        await response.write_eof()
        return response

    url = await debitura(chunked)
    fetched = await call(url, "sk_key", lambda a, e: a.fetch(e, "cli_1"))
    assert fetched.token.get_secret_value() == token

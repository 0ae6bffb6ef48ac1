"""The other ways in: api.video-style access + refresh tokens (`RefreshingTokens`)
against a stand-in provider, and `partner.blocking` for code without asyncio (many
threads, a synchronous request function, the README's plain script)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from receiver import partner
from receiver.config import Settings
from receiver.partner import cache
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, cache_settings
from tests.integration.partner_standins import (
    API_KEY,
    RecordingSleep,
    StandInDebitura,
    StandInVideo,
    canary,
    debitura_on_loopback,
    fast_retries,
    poster,
    video_on_loopback,
)
from tests.integration.standins import eventually

ROOT = Path(__file__).resolve().parents[2]
VIDEO_KEY = canary("video_key_")


@pytest.fixture
async def video() -> AsyncIterator[StandInVideo]:
    """A stand-in api.video-style provider on loopback."""
    stand_in = await video_on_loopback(VIDEO_KEY)
    yield stand_in
    assert stand_in.server is not None
    await stand_in.server.close()


@pytest.fixture
async def debitura() -> AsyncIterator[StandInDebitura]:
    """A stand-in Debitura (token endpoint and Customer API) on loopback."""
    stand_in = await debitura_on_loopback()
    yield stand_in
    assert stand_in.server is not None
    await stand_in.server.close()


def refreshing(
    video: StandInVideo, session: aiohttp.ClientSession, **options: Any
) -> partner.RefreshingTokens:
    """`RefreshingTokens` against the stand-in, on its clock, retries recorded."""
    values: dict[str, Any] = {
        "api_url": video.url,
        "session": session,
        "clock": video.clock,
        "retry": fast_retries(),
    }
    return partner.RefreshingTokens(options.pop("api_key", VIDEO_KEY), **(values | options))


# --- access + refresh tokens --------------------------------------------------------


async def test_one_grant_then_refreshes_ahead_of_expiry(
    video: StandInVideo, session: aiohttp.ClientSession
) -> None:
    """The API key is exchanged once; the access token is reused, then renewed with
    the refresh token (not a new grant) from `refresh_ahead` before its expiry while
    the still-valid one is handed out."""
    tokens = refreshing(video, session)
    first = await tokens.get("account")
    assert await tokens.get("another name, same key") == first
    assert (video.grants, video.refreshes) == (1, 0)
    video.clock.now += 3600 - 299
    assert await tokens.get("account") == first

    async def refreshed() -> bool:
        return video.refreshes == 1

    await eventually(refreshed)
    second = await tokens.get("account")
    assert second != first
    assert (video.grants, video.refreshes) == (1, 1)
    request = poster(session, video.url + "/videos")
    assert (await tokens.call("account", request)).status == 201
    await tokens.close()


async def test_a_401_refreshes_and_calls_exactly_once_more(
    video: StandInVideo, session: aiohttp.ClientSession
) -> None:
    """The provider refuses a live access token: one refresh, one more call."""
    tokens = refreshing(video, session)
    video.revoked.add(await tokens.get("account"))
    response = await tokens.call("account", poster(session, video.url + "/videos"))
    assert response.status == 201
    assert (video.calls, video.grants, video.refreshes) == (2, 1, 1)
    await tokens.close()


async def test_a_refused_refresh_falls_back_to_a_new_grant(
    video: StandInVideo, session: aiohttp.ClientSession
) -> None:
    """The refresh token is refused (400): a new grant with the API key, and the call
    succeeds; a refused access token after that is `LinkInvalid`, no loop."""
    tokens = refreshing(video, session)
    video.revoked.add(await tokens.get("account"))
    video.refresh_tokens.clear()  # every refresh token forgotten by the provider
    request = poster(session, video.url + "/videos")
    assert (await tokens.call("account", request)).status == 201
    assert (video.grants, video.refreshes) == (2, 1)
    video.refusing = True
    with pytest.raises(partner.LinkInvalid):
        await tokens.call("account", request)
    assert video.calls == 4
    await tokens.close()


async def test_refresh_failures_are_retried_with_backoff(
    video: StandInVideo, session: aiohttp.ClientSession
) -> None:
    """503 twice on the refresh: retried with exponential backoff (waits within each
    ceiling), then refreshed; a wrong API key is `ApiKeyRefused`."""
    sleep = RecordingSleep()
    tokens = refreshing(video, session, retry=fast_retries(sleep, base=0.5))
    token = await tokens.get("account")
    video.scripted_refresh += [503, 503]
    assert await tokens.renew("account", token) != token
    assert video.refreshes == 3
    assert len(sleep.waits) == 2
    assert 0 <= sleep.waits[0] <= 0.5
    assert 0 <= sleep.waits[1] <= 1.0
    wrong = refreshing(video, session, api_key="video_key_wrong")
    with pytest.raises(partner.ApiKeyRefused):
        await wrong.get("account")
    await tokens.close()
    await wrong.close()


# --- blocking -----------------------------------------------------------------------


def urllib_poster(url: str) -> Callable[[str], Any]:
    """A synchronous request function, as a script without extra dependencies has."""

    def post(token: str) -> Any:
        request = urllib.request.Request(  # noqa: S310 - the stand-in's loopback http://
            url,
            data=b'{"debtor": {}}',
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            return urllib.request.urlopen(request, timeout=10)  # noqa: S310 - as above
        except urllib.error.HTTPError as refused:
            return refused

    return post


async def test_blocking_tokens_are_safe_from_many_threads(debitura: StandInDebitura) -> None:
    """32 threads asking at once through `partner.blocking` share one mint and one
    token; the model runs on its own thread's loop."""
    tokens = await asyncio.to_thread(
        partner.blocking, partner.MintedTokens(API_KEY, api_url=debitura.url)
    )
    start = threading.Barrier(32)

    def ask(_: int) -> str:
        start.wait()
        return tokens.get("tenant-threads")

    def all_at_once() -> list[str]:
        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(ask, range(32)))

    try:
        got = await asyncio.to_thread(all_at_once)
    finally:
        await asyncio.to_thread(tokens.close)
    assert len(set(got)) == 1
    assert debitura.mints == 1


async def test_blocking_call_retries_a_401_once_and_types_403_and_429(
    debitura: StandInDebitura,
) -> None:
    """A synchronous request function (urllib): a 401 is one fresh mint and one more
    call; a 403 is `PermissionDenied` with the scopes, a 429 `RateLimited`; after
    `close()` the facade refuses with a `TokenError`."""
    request = urllib_poster(debitura.url + "/cases")
    denied = {"error": {"type": "permission_error", "required_scope": "cases.update"}}

    def script() -> list[Any]:
        outcomes: list[Any] = []
        with partner.blocking(partner.MintedTokens(API_KEY, api_url=debitura.url)) as tokens:
            debitura.case_answers.append((401, {}, {}))
            with contextlib.closing(tokens.call("tenant-sync", request)) as created:
                outcomes.append(created.status)
            debitura.case_answers.append((403, denied, {}))
            try:
                tokens.call("tenant-sync", request)
            except partner.PermissionDenied as exc:
                outcomes.append(exc.required_scope)
            debitura.case_answers.append((429, {}, {"Retry-After": "2"}))
            try:
                tokens.call("tenant-sync", request)
            except partner.RateLimited as exc:
                outcomes.append(exc.retry_after)
        try:
            tokens.get("tenant-sync")
        except partner.TokenError as exc:
            outcomes.append(type(exc).__name__)
        return outcomes

    assert await asyncio.to_thread(script) == [201, "cases.update", 2.0, "TokenError"]
    assert (debitura.mints, debitura.cases) == (2, 4)


async def test_blocking_webhook_tokens_start_their_cache_on_their_own_loop(
    post: Post, settings: Settings
) -> None:
    """`partner.blocking(WebhookTokens(cache))`: the cache starts (pool, LISTEN) on the
    facade's loop, and a synchronous caller gets the client's token."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_sync", token))
    webhook_tokens = partner.WebhookTokens(cache.TokenCache.from_settings(cache_settings(settings)))

    def script() -> str:
        with partner.blocking(webhook_tokens) as tokens:
            return tokens.get("cli_sync")

    assert await asyncio.to_thread(script) == token


def readme_example() -> str:
    """The README's plain-script example (the python block after its marker)."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- partner-example: blocking -->\n```python\n(.*?)```", text, re.S)
    assert found is not None, "README.md lost its blocking example"
    return found.group(1)


async def test_the_readme_blocking_example_runs_as_a_plain_script(
    debitura: StandInDebitura,
) -> None:
    """The README's script, run as is in a fresh interpreter against the stand-in:
    it creates a case through a 401 (one re-mint), prints the status, and no secret."""
    debitura.case_answers.append((401, {}, {}))
    env = processes.clean_env(
        DEBITURA_API_KEY=API_KEY,
        DEBITURA_API_URL=debitura.url,
        DEBITURA_CUSTOMER_API_URL=debitura.url,
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", readme_example()],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    status, _, body = result.stdout.partition(" ")
    assert status == "201"
    assert "caseId" in json.loads(body.replace("'", '"'))
    assert (debitura.mints, debitura.cases) == (2, 2)
    assert API_KEY not in result.stdout + result.stderr
    assert not helpers.find_canaries(result.stdout + result.stderr)

"""The sandbox's webhooks: signed as Debitura signs, retried on Debitura's schedule,
the subscription switched off after 8 failures or one 410, and delivered into a real
`receiver serve` that stores the token."""

from __future__ import annotations

import base64
import json
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from receiver import config, db, errors, signing, vault
from receiver.admin import tokens
from receiver.lifecycle.audit import Actor
from receiver.sandbox import SCHEDULE, Sandbox
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import operator_env

API_KEY = "sk_test_sandbox_webhooks_0123"


class StandInReceiver:
    """A receiver that verifies each delivery with `receiver.signing`, records it, and
    answers the statuses it is told (then 200)."""

    def __init__(self, secret_b64: str) -> None:
        self.secret = base64.b64decode(secret_b64)
        self.statuses: deque[int] = deque()
        self.received: list[dict[str, Any]] = []
        self.port = processes.free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where the sandbox sends webhooks."""
        return f"http://127.0.0.1:{self.port}/webhooks/debitura"

    async def start(self) -> None:
        """Open the port."""
        app = web.Application()
        app.router.add_post("/webhooks/debitura", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Close the port."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            signing.verify(request.headers.get(signing.SIGNATURE_HEADER), body, [self.secret], 300)
        except errors.InvalidSignature:
            return web.json_response({"error": "bad signature"}, status=401)
        self.received.append({"envelope": json.loads(body), "headers": dict(request.headers)})
        status = self.statuses.popleft() if self.statuses else 200
        return web.json_response({"status": "ok"}, status=status)


@pytest.fixture
async def standin() -> AsyncIterator[StandInReceiver]:
    """A stand-in receiver on a free port."""
    receiver = StandInReceiver(helpers.new_secret())
    await receiver.start()
    yield receiver
    await receiver.stop()


def secret_of(receiver: StandInReceiver) -> str:
    """The base64 form of the stand-in's secret, as the sandbox is given it."""
    return base64.b64encode(receiver.secret).decode()


async def started(sb: Sandbox) -> Sandbox:
    """`sb`, listening."""
    await sb.start()
    return sb


async def finish(sb: Sandbox) -> None:
    """Drain, make its tokens canaries (the session checks no log has one), stop."""
    await sb.drain(seconds=30)
    helpers.CANARIES.update(token.value for token in sb.ledger.issued())
    await sb.stop()


async def test_onboarding_is_signed_as_debitura_signs_with_the_test_header(
    standin: StandInReceiver,
) -> None:
    """Linking sends client.onboarding_completed with the token, signed, X-Debitura-* headers."""
    sb = await started(
        Sandbox(api_key=API_KEY, webhook_url=standin.url, webhook_secret=secret_of(standin))
    )
    token = sb.link_client("cli_hook")
    await sb.drain()
    await finish(sb)
    [got] = standin.received
    envelope, headers = got["envelope"], got["headers"]
    assert envelope["id"].startswith("evt_")
    assert envelope["specVersion"] == "1.0"
    assert envelope["event"] == "client.onboarding_completed"
    assert envelope["data"]["client_id"] == "cli_hook"
    assert envelope["data"]["bearer_token"] == token
    assert envelope["data"]["onboarding_completed_at"].endswith("Z")
    assert headers["X-Debitura-Test"] == "true"
    assert headers["X-Debitura-Event"] == "client.onboarding_completed"
    assert headers["X-Debitura-Signature"].startswith(f"t={headers['X-Debitura-Timestamp']},v1=")
    assert [d.outcome for d in sb.deliveries] == ["delivered"]


async def test_a_live_sandbox_sends_no_test_header(standin: StandInReceiver) -> None:
    """The live environment's deliveries carry no X-Debitura-Test and live tokens."""
    sb = await started(
        Sandbox(
            environment="live",
            api_key=API_KEY,
            webhook_url=standin.url,
            webhook_secret=secret_of(standin),
        )
    )
    token = sb.link_client("cli_live")
    await finish(sb)
    [got] = standin.received
    assert token.startswith("tok_live_")
    assert "X-Debitura-Test" not in got["headers"]


async def test_revocations_send_token_revoked_but_a_grace_rotation_does_not(
    standin: StandInReceiver,
) -> None:
    """revoke-token and an immediate rotation send token.revoked (15-char prefix); grace: none."""
    sb = await started(
        Sandbox(api_key=API_KEY, webhook_url=standin.url, webhook_secret=secret_of(standin))
    )
    first = sb.link_client("cli_r")
    async with aiohttp.ClientSession(headers={"XApiKey": API_KEY}) as http:
        base = f"{sb.url}/v1/referral-partners/clients/cli_r"
        grace = {"reason": "scheduled_rotation", "revoke_immediately": False}
        async with http.post(f"{base}/rotate-token", json=grace) as answer:
            assert answer.status == 200
        second = sb.current_token("cli_r")
        now = {"reason": "suspected_compromise", "revoke_immediately": True}
        async with http.post(f"{base}/rotate-token", json=now) as answer:
            assert answer.status == 200
        third = sb.current_token("cli_r")
        async with http.post(f"{base}/revoke-token", json={"reason": "client_request"}) as answer:
            assert answer.status == 200
    await finish(sb)
    events = [r["envelope"] for r in standin.received]
    assert [e["event"] for e in events] == [
        "client.onboarding_completed",
        "token.revoked",
        "token.revoked",
    ]
    assert [e["data"]["token_prefix"] for e in events[1:]] == [second[:15], third[:15]]
    assert [e["data"]["reason"] for e in events[1:]] == ["suspected_compromise", "client_request"]
    assert all(e["data"]["client_id"] == "cli_r" for e in events)
    assert all(e["data"]["revoked_at"].endswith("Z") for e in events[1:])
    assert first[:15] not in {e["data"].get("token_prefix") for e in events}


async def test_a_link_over_http_answers_the_token_and_sends_no_webhook(
    standin: StandInReceiver,
) -> None:
    """POST …/clients links with the token in its answer; no webhook, as Debitura does."""
    sb = await started(
        Sandbox(api_key=API_KEY, webhook_url=standin.url, webhook_secret=secret_of(standin))
    )
    async with aiohttp.ClientSession(headers={"XApiKey": API_KEY}) as http:
        url = f"{sb.url}/v1/referral-partners/clients"
        async with http.post(url, json={"client_id": "cli_api"}) as answer:
            assert answer.status == 201
            body = await answer.json()
    await finish(sb)
    assert body["bearer_token"] == sb.current_token("cli_api")
    assert sb.deliveries == []
    assert standin.received == []


async def test_changes_made_without_webhook_send_nothing(standin: StandInReceiver) -> None:
    """link_client, rotate and revoke with webhook=False take effect and send nothing;
    the subscription is live all along (a plain link after them is delivered)."""
    sb = await started(
        Sandbox(api_key=API_KEY, webhook_url=standin.url, webhook_secret=secret_of(standin))
    )
    missed = sb.link_client("cli_quiet", webhook=False)
    rotation = sb.rotate("cli_quiet", revoke_immediately=True, webhook=False)
    assert rotation.old.value == missed
    sb.rotate("cli_quiet", webhook=False)
    sb.revoke("cli_quiet", webhook=False)
    sb.link_client("cli_loud")
    await finish(sb)
    assert not sb.is_valid(missed)
    assert sb.clients() == [("cli_quiet", "revoked"), ("cli_loud", "active")]
    assert [(d.event, d.client_id, d.outcome) for d in sb.deliveries] == [
        ("client.onboarding_completed", "cli_loud", "delivered")
    ]
    assert [r["envelope"]["data"]["client_id"] for r in standin.received] == ["cli_loud"]


async def test_retries_follow_debitura_schedule_until_a_2xx(standin: StandInReceiver) -> None:
    """Three failures then 200: four tries of one event, waits 0/60/120/240 s ±10% / time_scale."""
    standin.statuses.extend([500, 503, 429])
    scale = 1000.0
    sb = await started(
        Sandbox(
            api_key=API_KEY,
            webhook_url=standin.url,
            webhook_secret=secret_of(standin),
            time_scale=scale,
        )
    )
    sb.link_client("cli_retry")
    await finish(sb)
    [delivery] = sb.deliveries
    assert delivery.outcome == "delivered"
    assert [a.status for a in delivery.attempts] == [500, 503, 429, 200]
    assert [a.nominal_delay for a in delivery.attempts] == list(SCHEDULE[:4])
    for attempt in delivery.attempts:
        assert 0.9 * attempt.nominal_delay <= attempt.planned_delay <= 1.1 * attempt.nominal_delay
    # Each try left no earlier than its wait allowed (a slow machine only lengthens gaps).
    for before, after in zip(delivery.attempts, delivery.attempts[1:], strict=False):
        assert after.sent_at - before.sent_at >= after.planned_delay / scale
    assert len({r["envelope"]["id"] for r in standin.received}) == 1
    assert sb.subscription is not None
    assert sb.subscription.active


async def test_eight_failures_switch_the_subscription_off(standin: StandInReceiver) -> None:
    """After 8 failed tries of one event nothing more is sent, and the state says why."""
    standin.statuses.extend([503] * 8)
    sb = await started(
        Sandbox(
            api_key=API_KEY,
            webhook_url=standin.url,
            webhook_secret=secret_of(standin),
            time_scale=50_000.0,
        )
    )
    sb.link_client("cli_down")
    await sb.drain()
    later = sb.link_client("cli_later")
    await finish(sb)
    first, second = sb.deliveries
    assert [a.nominal_delay for a in first.attempts] == list(SCHEDULE)
    assert first.outcome == "failed"
    assert second.outcome == "abandoned"
    assert second.attempts == []
    assert len(standin.received) == 8
    assert later not in json.dumps([r["envelope"] for r in standin.received])
    assert sb.subscription is not None
    assert not sb.subscription.active
    assert sb.subscription.disabled_reason == "8 failed tries"


async def test_one_410_switches_the_subscription_off(standin: StandInReceiver) -> None:
    """A single 410 ends the subscription: no retry, pending retries of other events dropped."""
    standin.statuses.extend([410])
    sb = await started(
        Sandbox(
            api_key=API_KEY,
            webhook_url=standin.url,
            webhook_secret=secret_of(standin),
            time_scale=50_000.0,
        )
    )
    sb.link_client("cli_gone")
    await sb.drain()
    sb.link_client("cli_after")
    await finish(sb)
    assert [d.outcome for d in sb.deliveries] == ["failed", "abandoned"]
    assert [a.status for a in sb.deliveries[0].attempts] == [410]
    assert len(standin.received) == 1
    assert sb.subscription is not None
    assert sb.subscription.disabled_reason == "410 gone"


@pytest.mark.slow
async def test_webhooks_into_a_real_receiver_store_the_token(
    settings: config.Settings, webhook_secret: str, database: db.Database, sealer: vault.Sealer
) -> None:
    """End to end: the sandbox links a client; `receiver serve` stores exactly that token."""
    port = processes.free_port()
    env = operator_env(settings, RECEIVER_LOG_FORMAT="json")
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)
        sb = await started(
            Sandbox(
                api_key=API_KEY,
                webhook_url=f"http://127.0.0.1:{port}/webhooks/debitura",
                webhook_secret=webhook_secret,
            )
        )
        token = sb.link_client("cli_e2e")
        await finish(sb)
    [delivery] = sb.deliveries
    assert delivery.outcome == "delivered"
    assert delivery.attempts[-1].answer is not None
    assert json.loads(delivery.attempts[-1].answer)["status"] == "processed"
    _, stored = await tokens.reveal(
        database, sealer, "cli_e2e", Actor("test-operator", "tests"), environment="test"
    )
    assert stored == token

"""What a rotation does with an answer it cannot trust: Debitura is an outside party,
stood in here by a small HTTP server that rotates for real and then answers badly."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from aiohttp import web

from receiver.config import Settings
from receiver.debitura import api
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import operator_env


@dataclass
class Debitura:
    """Debitura's token calls for one environment: fetch answers the current token;
    rotate really replaces it, then answers as `rotate_answer` says."""

    environment: str
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    current: dict[str, str] = field(default_factory=dict)
    status: str = "active"
    rotate_answer: str = "ok"  # ok | garbage | other_environment | unavailable
    calls: dict[str, int] = field(default_factory=dict)
    url: str = ""

    def link(self, client_id: str) -> str:
        """A client linked at Debitura; its token joins the canaries."""
        token = helpers.canary_token(self.environment)
        self.current[client_id] = token
        return token

    async def _fetch(self, request: web.Request) -> web.Response:
        self.calls["fetch"] = self.calls.get("fetch", 0) + 1
        token = self.current[request.match_info["client"]]
        return web.json_response(
            {"bearer_token": token, "issued_at": "2026-12-04T10:00:00Z", "status": self.status}
        )

    async def _rotate(self, request: web.Request) -> web.Response:
        self.calls["rotate"] = self.calls.get("rotate", 0) + 1
        client_id = request.match_info["client"]
        old, new = self.current[client_id], helpers.canary_token(self.environment)
        self.current[client_id] = new  # it happened, whatever the answer says
        if self.rotate_answer == "garbage":
            return web.Response(text="<html>upstream hiccup</html>", content_type="text/html")
        if self.rotate_answer == "unavailable":
            return web.json_response({"error": {"type": "api_error"}}, status=503)
        if self.rotate_answer == "other_environment":
            other = "live" if self.environment == "test" else "test"
            new = helpers.canary_token(other)
        return web.json_response(
            {
                "new_bearer_token": new,
                "old_bearer_token": old,
                "old_token_expires_at": "2026-12-05T10:00:00Z",
            }
        )

    async def _validate(self, request: web.Request) -> web.Response:
        self.calls["validate"] = self.calls.get("validate", 0) + 1
        echoed = helpers.canary_token(self.environment)  # a token where text belongs
        return web.json_response(
            {"valid": True, "client_id": "cli_echo", "scopes": ["cases.create", echoed]}
            | {"status": echoed, "issued_at": echoed}
        )

    async def _revoke(self, request: web.Request) -> web.Response:
        self.calls["revoke"] = self.calls.get("revoke", 0) + 1
        return web.json_response({"status": "revoked"})

    def app(self) -> web.Application:
        """The routes, under Debitura's paths."""
        app = web.Application()
        base = "/v1/referral-partners/clients/{client}"
        app.router.add_get(base + "/token", self._fetch)
        app.router.add_post(base + "/rotate-token", self._rotate)
        app.router.add_post(base + "/revoke-token", self._revoke)
        app.router.add_post("/v1/auth/validate-token", self._validate)
        return app


@pytest.fixture
async def debitura() -> AsyncIterator[Debitura]:
    """Debitura's test environment on a free loopback port."""
    standin = Debitura("test")
    runner = web.AppRunner(standin.app())
    await runner.setup()
    port = processes.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    standin.url = f"http://127.0.0.1:{port}"
    helpers.CANARIES.add(standin.api_key)
    yield standin
    await runner.cleanup()


def env_for(settings: Settings, standin: Debitura) -> dict[str, str]:
    """An operator's environment with the stand-in as Debitura's test API."""
    return operator_env(
        settings,
        RECEIVER_DEBITURA_TEST_API_URL=standin.url,
        RECEIVER_DEBITURA_TEST_API_KEY=standin.api_key,
        RECEIVER_DEBITURA_RETRY_BASE_SECONDS="0.01",
    )


async def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a receiver command; its output must hold no token and no API key."""
    result = await asyncio.to_thread(processes.run, args, env)
    assert helpers.find_canaries(result.stdout + result.stderr) == []
    return result


async def active(conn: asyncpg.Connection, client_id: str) -> list[tuple[str, str]]:
    """The client's active tokens: (environment, prefix)."""
    rows = await conn.fetch(
        "SELECT environment, prefix FROM receiver.tokens WHERE client_id = $1 "
        "AND status = 'active' ORDER BY environment",
        client_id,
    )
    return [(r["environment"], r["prefix"]) for r in rows]


async def fetched(standin: Debitura, env: dict[str, str], client_id: str) -> str:
    """A client linked at Debitura whose token the vault fetched; the token."""
    token = standin.link(client_id)
    result = await cli(["tokens", "fetch", client_id, "--environment", "test"], env)
    assert result.returncode == 0, result.stderr
    return token


@pytest.mark.parametrize(("answer", "exit_status"), [("garbage", 0), ("other_environment", 1)])
async def test_an_unusable_rotate_answer_is_settled_by_a_fetch(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection, answer: str, exit_status: int
) -> None:
    """A 2xx to rotate-token whose body cannot be used (not JSON; a token of the other
    environment) means Debitura rotated to something unknown: the rotation is settled by
    a fetch (the new token stored, no token of the other world), never closed as failed
    with the replaced token left active. A token of the other environment is no
    rotation: the command says so and exits 1, though the fetch settled it."""
    env = env_for(settings, debitura)
    await fetched(debitura, env, "cli_odd")
    debitura.rotate_answer = answer
    result = await cli(["tokens", "rotate", "cli_odd", "--environment", "test"], env)
    assert result.returncode == exit_status, result.stdout + result.stderr
    if answer == "other_environment":
        assert "other environment, which is not a rotation" in result.stderr
    assert debitura.calls["rotate"] == 1  # never re-sent
    now = debitura.current["cli_odd"]
    assert await active(conn, "cli_odd") == [("test", now[:15])]
    closed = await conn.fetchval("SELECT outcome FROM receiver.rotation_intents")
    assert closed == "resumed"


async def test_a_rotation_resumed_into_a_revoked_token_stores_nothing(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection
) -> None:
    """A rotation whose answer was lost, when Debitura now says the client's token is
    revoked, stores nothing as active: the intent closes as failed, saying why."""
    env = env_for(settings, debitura)
    old = await fetched(debitura, env, "cli_gone")
    debitura.rotate_answer = "unavailable"
    debitura.status = "revoked"
    result = await cli(["tokens", "rotate", "cli_gone", "--environment", "test"], env)
    assert result.returncode == 1
    assert "revoked" in result.stderr
    assert await active(conn, "cli_gone") == [("test", old[:15])]
    outcome = await conn.fetchval("SELECT outcome FROM receiver.rotation_intents")
    assert outcome == "failed"


async def test_a_token_in_the_rotation_reason_is_stored_and_sent_masked(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection
) -> None:
    """A token pasted into --reason reaches neither the rotation intent, nor the audit
    trail (also when the rotation is resumed), nor the CLI's output."""
    env = env_for(settings, debitura)
    await fetched(debitura, env, "cli_why")
    pasted = helpers.canary_token("test")
    debitura.rotate_answer = "unavailable"  # lost: finished by the resume path
    debitura.status = "active"
    result = await cli(
        ["tokens", "rotate", "cli_why", "--environment", "test", "--reason", f"leak {pasted}"],
        env,
    )
    assert result.returncode == 0, result.stderr
    stored = [
        *(r["reason"] for r in await conn.fetch("SELECT reason FROM receiver.rotation_intents")),
        *(str(dict(r)) for r in await conn.fetch("SELECT * FROM receiver.audit")),
    ]
    assert stored
    assert helpers.find_canaries("\n".join(stored)) == []


async def test_clients_revoke_refuses_an_unrecordable_client_before_calling_debitura(
    settings: Settings, debitura: Debitura
) -> None:
    """A client id the vault could not record (or a token typed as one) is refused with
    exit 2 before Debitura is asked to revoke anything (its revocation is final)."""
    env = env_for(settings, debitura)
    revoke = ["clients", "revoke", "--environment", "test", "--reason", "x", "--confirm"]
    for client_id in ("cli ü", "", helpers.canary_token("test")):
        result = await cli([*revoke, client_id], env)
        assert result.returncode == 2, result.stderr
    assert debitura.calls.get("revoke", 0) == 0


async def test_token_shaped_text_in_debituras_answers_is_neither_printed_nor_stored(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection
) -> None:
    """Debitura's free text (scopes, status) is masked before `tokens validate` prints
    or stores it: an answer echoing a token leaks it nowhere."""
    env = env_for(settings, debitura)
    await fetched(debitura, env, "cli_echo")
    result = await cli(["tokens", "validate", "cli_echo", "--environment", "test", "--json"], env)
    assert debitura.calls["validate"] == 1
    assert '"client_id": "cli_echo"' in result.stdout
    rows = await conn.fetch("SELECT scopes::text AS s FROM receiver.tokens")
    assert helpers.find_canaries(" ".join(str(r["s"]) for r in rows)) == []


@pytest.mark.parametrize("value", ["NaN", "nan", "inf", "-inf", "1e400", "-3", "soon"])
def test_a_retry_after_that_is_not_a_finite_number_is_bounded(value: str) -> None:
    """Retry-After is a finite pause within the cap whatever Debitura sends (NaN would
    slip past the retry budget: it compares false with everything)."""
    pause = api._retry_after(value)
    assert 0.0 <= pause <= api.RETRY_AFTER_CAP_SECONDS

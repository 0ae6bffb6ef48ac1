"""What a rotation does with an answer it cannot trust: Debitura is an outside party,
stood in here by a small HTTP server that rotates for real and then answers badly."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp import web

from receiver.config import Settings
from receiver.debitura import api
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, operator_env


@dataclass
class Debitura:
    """Debitura's token calls for one environment: fetch answers the current token;
    rotate really replaces it, then answers as `rotate_answer` says."""

    environment: str
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    current: dict[str, str] = field(default_factory=dict)
    status: str = "active"
    # ok | garbage | other_environment | unavailable | same (no rotation: the current
    # token answered as the new one) | far_future (old_token_expires_at in year 9999)
    rotate_answer: str = "ok"
    calls: dict[str, int] = field(default_factory=dict)
    url: str = ""
    issued_at: str = "2026-12-04T10:00:00Z"
    # The token the next rotation issues (a test may need to know it beforehand).
    next_token: str | None = None

    def link(self, client_id: str) -> str:
        """A client linked at Debitura; its token joins the canaries."""
        token = helpers.canary_token(self.environment)
        self.current[client_id] = token
        return token

    async def _fetch(self, request: web.Request) -> web.Response:
        self.calls["fetch"] = self.calls.get("fetch", 0) + 1
        token = self.current[request.match_info["client"]]
        return web.json_response(
            {"bearer_token": token, "issued_at": self.issued_at, "status": self.status}
        )

    async def _rotate(self, request: web.Request) -> web.Response:
        self.calls["rotate"] = self.calls.get("rotate", 0) + 1
        client_id = request.match_info["client"]
        old = self.current[client_id]
        if self.rotate_answer == "same":
            return web.json_response(
                {"new_bearer_token": old, "old_bearer_token": old, "old_token_expires_at": None}
            )
        new = self.next_token or helpers.canary_token(self.environment)
        self.next_token = None
        self.current[client_id] = new  # it happened, whatever the answer says
        if self.rotate_answer == "garbage":
            return web.Response(text="<html>upstream hiccup</html>", content_type="text/html")
        if self.rotate_answer == "unavailable":
            return web.json_response({"error": {"type": "api_error"}}, status=503)
        if self.rotate_answer == "other_environment":
            other = "live" if self.environment == "test" else "test"
            new = helpers.canary_token(other)
        expires = "9999-12-31T23:59:59Z" if self.rotate_answer == "far_future" else None
        return web.json_response(
            {
                "new_bearer_token": new,
                "old_bearer_token": old,
                "old_token_expires_at": expires
                or (datetime.now(UTC) + timedelta(hours=24)).isoformat(),
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


async def test_a_rotate_answer_holding_the_current_token_is_no_rotation(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection
) -> None:
    """rotate-token answering the token it was to replace is not a rotation: exit 1
    saying so, the intent closed failed (a new rotation may start at once), and the
    compromised token is not reported rotated."""
    env = env_for(settings, debitura)
    old = await fetched(debitura, env, "cli_same")
    debitura.rotate_answer = "same"
    result = await cli(["tokens", "rotate", "cli_same", "--environment", "test", "--json"], env)
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["ok"] is False
    assert "no rotation happened" in answer["detail"]
    assert await active(conn, "cli_same") == [("test", old[:15])]
    assert await conn.fetchval("SELECT outcome FROM receiver.rotation_intents") == "failed"


async def test_a_new_token_revoked_before_its_answer_is_stored_is_no_success(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection, post: Post
) -> None:
    """A `token.revoked` for the rotation's new token that arrives before the answer is
    stored: the new token is stored revoked, never active, and the command exits 1
    saying so instead of printing `rotated`."""
    env = env_for(settings, debitura)
    old = await fetched(debitura, env, "cli_race")
    new = helpers.canary_token("test")
    debitura.next_token = new
    revocation = helpers.revocation("cli_race", new[:15])
    assert (await post(revocation, **{"X-Debitura-Test": "true"})).status == 200
    result = await cli(["tokens", "rotate", "cli_race", "--environment", "test"], env)
    assert result.returncode == 1, result.stdout
    assert "stored revoked" in result.stderr
    stored = await conn.fetchval(
        "SELECT status FROM receiver.tokens WHERE client_id = 'cli_race' AND prefix = $1",
        new[:15],
    )
    assert stored == "revoked"
    # The old token stays what the vault knows as active (in its grace at Debitura; a
    # reconcile settles it once the grace ends); the intent says what happened.
    assert await active(conn, "cli_race") == [("test", old[:15])]
    assert await conn.fetchval("SELECT outcome FROM receiver.rotation_intents") == "revoked"


async def test_a_far_future_old_token_expiry_is_clamped_and_logged(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection
) -> None:
    """`old_token_expires_at: 9999-12-31` is clamped to the 24 h grace plus 7 days and
    logged: the old token does not stay readable and unpruned for ever."""
    env = env_for(settings, debitura)
    old = await fetched(debitura, env, "cli_far")
    debitura.rotate_answer = "far_future"
    result = await cli(["tokens", "rotate", "cli_far", "--environment", "test"], env)
    assert result.returncode == 0, result.stderr
    assert "rotation_expiry_clamped" in result.stdout + result.stderr
    expires = await conn.fetchval(
        "SELECT expires_at FROM receiver.tokens WHERE client_id = 'cli_far' AND prefix = $1",
        old[:15],
    )
    assert expires <= datetime.now(UTC) + timedelta(days=8, minutes=1)


async def test_a_fetched_token_is_aged_from_debituras_issued_at(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection
) -> None:
    """A token Debitura issued 100 days ago, fetched today, is due for rotation:
    `tokens rotate --due --dry-run` lists it, and `tokens list --json` shows issued_at."""
    env = env_for(settings, debitura)
    debitura.issued_at = (datetime.now(UTC) - timedelta(days=100)).isoformat()
    await fetched(debitura, env, "cli_aged")
    due = await cli(["tokens", "rotate", "--due", "--dry-run"], env)
    assert due.returncode == 0, due.stderr
    assert [line.split()[0] for line in due.stdout.splitlines()] == ["cli_aged"]
    listed = await cli(["tokens", "list", "--json"], env)
    row = json.loads(listed.stdout.splitlines()[0])
    assert row["issued_at"].startswith(debitura.issued_at[:10])
    assert debitura.calls.get("rotate", 0) == 0


async def test_a_percent_encoded_token_in_debituras_status_is_masked(
    settings: Settings, debitura: Debitura, conn: asyncpg.Connection
) -> None:
    """Debitura's free text holding a percent-encoded token (`tok%5Ftest%5F…`) is
    masked like a plain one before it is printed or stored."""
    env = env_for(settings, debitura)
    debitura.link("cli_pct")
    debitura.status = helpers.canary_token("test").replace("_", "%5F")
    result = await cli(["tokens", "fetch", "cli_pct", "--environment", "test"], env)
    assert result.returncode == 1
    assert "Debitura says the token is tok_test_" in result.stderr
    audit_rows = await conn.fetch("SELECT detail::text AS d FROM receiver.audit")
    assert helpers.find_canaries(" ".join(r["d"] for r in audit_rows)) == []

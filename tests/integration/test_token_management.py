"""Token management through Debitura's API (DESIGN §9): every command, as a real
`receiver` process, against `receiver sandbox` over real HTTP and a real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from receiver import config, db, vault
from receiver.config import Settings
from receiver.debitura import api, rotation, schedule
from receiver.lifecycle import adoption, audit
from receiver.sandbox import Sandbox
from tests import helpers
from tests.conftest import with_database
from tests.integration import processes
from tests.integration.conftest import Client, Post, operator_env, settings_values
from tests.integration.standins import eventually
from tests.integration.test_no_plaintext import pg_dump

GRACE = timedelta(hours=24)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A stand-in Debitura (live environment) on loopback; its API key is a canary."""
    sb = Sandbox(environment="live")
    await sb.start()
    helpers.CANARIES.add(sb.api_key)
    yield sb
    await sb.stop()


def api_env(settings: Settings, sb: Sandbox, **extra: str) -> dict[str, str]:
    """An operator's environment for `settings`, with the sandbox as Debitura's API."""
    values = {
        "RECEIVER_DEBITURA_API_URL": sb.url,
        "RECEIVER_DEBITURA_API_KEY": sb.api_key,
        "RECEIVER_DEBITURA_RETRY_BASE_SECONDS": "0.01",
    }
    return operator_env(settings, **(values | extra))


def link(sb: Sandbox, client_id: str) -> str:
    """Link a client at the sandbox; its token joins the canaries."""
    token = sb.link_client(client_id)
    helpers.CANARIES.add(token)
    return token


def current(sb: Sandbox, client_id: str) -> str:
    """The sandbox's current token for a client, as a canary."""
    token = sb.current_token(client_id)
    helpers.CANARIES.add(token)
    return token


async def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a receiver command; its output must hold no token and no API key."""
    result = await asyncio.to_thread(processes.run, args, env)
    assert helpers.find_canaries(result.stdout + result.stderr) == []
    return result


async def linked_and_fetched(sb: Sandbox, env: dict[str, str], client_id: str) -> str:
    """A client linked at Debitura whose token the vault fetched; the token."""
    token = link(sb, client_id)
    fetched = await cli(["tokens", "fetch", client_id], env)
    assert fetched.returncode == 0, fetched.stderr
    return token


async def tokens_of(conn: asyncpg.Connection, client_id: str) -> dict[str, asyncpg.Record]:
    """The client's stored tokens by prefix."""
    rows = await conn.fetch(
        "SELECT prefix, status, expires_at, revoked_at, token_index FROM receiver.tokens "
        "WHERE client_id = $1",
        client_id,
    )
    return {row["prefix"]: row for row in rows}


async def count(conn: asyncpg.Connection, sql: str, *args: Any) -> int:
    """A count query's answer."""
    value: int = await conn.fetchval(sql, *args)
    return value


SIGNALS = "SELECT count(*) FROM receiver.signals WHERE client_id = $1"
AUDITS = "SELECT count(*) FROM receiver.audit WHERE client_id = $1 AND action = $2"
OPEN_INTENTS = "SELECT count(*) FROM receiver.rotation_intents WHERE closed_at IS NULL"


async def test_fetch_stores_the_current_token_and_prints_only_its_prefix(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """`tokens fetch` stores a token the vault lacks (active, signalled, audited) and
    prints its prefix; a second fetch changes nothing."""
    env = api_env(settings, sandbox)
    token = link(sandbox, "cli_f")
    first = await cli(["tokens", "fetch", "cli_f"], env)
    assert first.returncode == 0, first.stderr
    assert f"fetched {token[:15]}…" in first.stdout
    stored = await tokens_of(conn, "cli_f")
    assert [row["status"] for row in stored.values()] == ["active"]
    assert token[:15] in stored
    again = await cli(["tokens", "fetch", "cli_f"], env)
    assert again.returncode == 0
    assert "unchanged" in again.stdout
    assert await count(conn, SIGNALS, "cli_f") == 1
    assert await count(conn, AUDITS, "cli_f", "token_fetch") == 1


async def test_rotate_supersedes_the_old_token_until_debituras_expiry(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """`tokens rotate` stores the new token as active and the old one superseded until
    Debitura's old_token_expires_at, with one signal and one audit row (actor, reason)."""
    env = api_env(settings, sandbox)
    old = await linked_and_fetched(sandbox, env, "cli_r")
    before = datetime.now(UTC)
    result = await cli(
        ["tokens", "rotate", "cli_r", "--reason", "suspected_compromise", "--actor", "ops-1"], env
    )
    assert result.returncode == 0, result.stderr
    new = current(sandbox, "cli_r")
    assert new != old
    assert f"rotated {new[:15]}…" in result.stdout
    stored = await tokens_of(conn, "cli_r")
    assert stored[new[:15]]["status"] == "active"
    assert stored[old[:15]]["status"] == "superseded"
    expires = stored[old[:15]]["expires_at"]
    assert before + GRACE - timedelta(seconds=5) <= expires <= datetime.now(UTC) + GRACE
    assert sandbox.calls["rotate"] == 1
    assert await count(conn, SIGNALS, "cli_r") == 2  # the fetch's, then the rotation's
    audit = await conn.fetch(
        "SELECT actor, reason FROM receiver.audit WHERE client_id = 'cli_r' "
        "AND action = 'token_rotate'"
    )
    assert [(a["actor"], a["reason"]) for a in audit] == [("ops-1", "suspected_compromise")]
    assert await count(conn, OPEN_INTENTS) == 0


async def test_rotate_revoke_immediately_revokes_the_old_token(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """With --revoke-immediately the old token is revoked here too, and signalled."""
    env = api_env(settings, sandbox)
    old = await linked_and_fetched(sandbox, env, "cli_ri")
    result = await cli(["tokens", "rotate", "cli_ri", "--revoke-immediately"], env)
    assert result.returncode == 0, result.stderr
    stored = await tokens_of(conn, "cli_ri")
    assert stored[old[:15]]["status"] == "revoked"
    assert stored[current(sandbox, "cli_ri")[:15]]["status"] == "active"
    assert not sandbox.is_valid(old)


async def assert_finished(
    conn: asyncpg.Connection,
    sb: Sandbox,
    client_id: str,
    old: str,
    started: datetime,
    *,
    rotate_calls: int = 1,
) -> None:
    """The rotation of `client_id` is finished: the new token stored and active, the
    old one superseded with the grace counted from when the rotation started, one
    audit row, one signal for it, no open intent."""
    new = current(sb, client_id)
    assert new != old
    stored = await tokens_of(conn, client_id)
    assert stored[new[:15]]["status"] == "active"
    assert stored[old[:15]]["status"] == "superseded"
    expires = stored[old[:15]]["expires_at"]
    assert started + GRACE - timedelta(seconds=5) <= expires <= datetime.now(UTC) + GRACE
    assert await count(conn, AUDITS, client_id, "token_rotate") == 1
    assert await count(conn, SIGNALS, client_id) == 2  # the fetch's and the rotation's
    assert await count(conn, OPEN_INTENTS) == 0
    assert sb.calls["rotate"] == rotate_calls  # never re-sent


async def test_lost_rotation_answer_is_finished_by_resume(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """Debitura rotates and the answer is lost, and the fetch that would resolve it
    fails too: the command exits 1 with the intent open; `--resume` fetches and
    stores the new token, never sending rotate-token again."""
    env = api_env(settings, sandbox)
    old = await linked_and_fetched(sandbox, env, "cli_lost")
    started = datetime.now(UTC)
    sandbox.faults.drop_after("rotate")
    sandbox.faults.fail_next("fetch", 503, times=100)
    lost = await cli(["tokens", "rotate", "cli_lost"], env)
    assert lost.returncode == 1
    assert "cli_lost live: pending" in lost.stderr
    assert await count(conn, OPEN_INTENTS) == 1
    assert current(sandbox, "cli_lost")[:15] not in await tokens_of(conn, "cli_lost")
    sandbox.faults.clear()
    resumed = await cli(["tokens", "rotate", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "cli_lost live: resumed" in resumed.stdout
    await assert_finished(conn, sandbox, "cli_lost", old, started)


async def test_lost_rotation_answer_is_resolved_by_a_fetch_at_once(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """An answer lost on the way back is resolved in the same command by a fetch."""
    env = api_env(settings, sandbox)
    old = await linked_and_fetched(sandbox, env, "cli_drop")
    started = datetime.now(UTC)
    sandbox.faults.drop_after("rotate")
    result = await cli(["tokens", "rotate", "cli_drop"], env)
    assert result.returncode == 0, result.stderr
    await assert_finished(conn, sandbox, "cli_drop", old, started)


async def test_rotate_503_is_not_resent_and_fetch_says_it_did_not_happen(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """A 503 to rotate-token is not retried (it may have taken effect); the fetch that
    follows finds the old token current, which is no proof: exit 1, "pending", nothing
    stored, and the rotation stays open to be checked again (Debitura may apply it
    late)."""
    env = api_env(settings, sandbox)
    old = await linked_and_fetched(sandbox, env, "cli_503")
    sandbox.faults.fail_next("rotate", 503)
    result = await cli(["tokens", "rotate", "cli_503"], env)
    assert result.returncode == 1
    assert "cli_503 live: pending" in result.stderr
    assert sandbox.calls["rotate"] == 1
    assert current(sandbox, "cli_503") == old
    assert await count(conn, OPEN_INTENTS) == 1


def paused_rotation_env(env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The test-only pause after rotate-token's answer: a FIFO pair in tmp_path."""
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    os.mkfifo(f"{fifo}.release")
    return {**env, "RECEIVER_TEST_PAUSE_AFTER_ROTATE": str(fifo)}, fifo


def wait_for_answer(fifo: Path) -> str:
    """Block until the paused process says rotate-token answered."""
    with fifo.open() as reader:
        return reader.readline()


def release(fifo: Path) -> None:
    """Let the paused process go on."""
    with Path(f"{fifo}.release").open("w"):
        pass


async def test_process_killed_between_answer_and_commit_is_finished_by_resume(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGKILL after Debitura answered and before the new token was stored: the intent
    stays open, and `--resume` stores the token Debitura now holds."""
    env = api_env(settings, sandbox)
    old = await linked_and_fetched(sandbox, env, "cli_kill")
    paused, fifo = paused_rotation_env(env, tmp_path)
    started = datetime.now(UTC)
    with processes.background(["tokens", "rotate", "cli_kill"], paused) as (process, _):
        assert await asyncio.to_thread(wait_for_answer, fifo) == "answered\n"
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert await count(conn, OPEN_INTENTS) == 1
    assert current(sandbox, "cli_kill")[:15] not in await tokens_of(conn, "cli_kill")
    resumed = await cli(["tokens", "rotate", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    await assert_finished(conn, sandbox, "cli_kill", old, started)


async def test_database_down_when_the_answer_arrives_is_finished_by_resume(
    own_postgres: Any, settings: Settings, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Postgres stops after rotate-token answered: the command exits 1 naming
    --resume, and once Postgres is back `--resume` stores the new token."""
    dsn, control = own_postgres
    admin = await asyncpg.connect(dsn)
    await admin.execute("CREATE DATABASE rotation")
    await admin.close()
    database_url = with_database(dsn, "rotation")
    env = api_env(settings, sandbox, RECEIVER_DATABASE_URL=database_url)
    assert (await cli(["migrate"], env)).returncode == 0
    old = await linked_and_fetched(sandbox, env, "cli_down")
    paused, fifo = paused_rotation_env(env, tmp_path)
    started = datetime.now(UTC)
    with processes.background(["tokens", "rotate", "cli_down"], paused) as (process, output):
        assert await asyncio.to_thread(wait_for_answer, fifo) == "answered\n"
        await asyncio.to_thread(control, "stop")
        await asyncio.to_thread(release, fifo)
        assert await asyncio.to_thread(process.wait, 60) == 1
        text = output.read_text()
    assert "cli_down live: pending" in text
    assert "--resume" in text
    assert helpers.find_canaries(text) == []
    await asyncio.to_thread(control, "start")
    resumed = await cli(["tokens", "rotate", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    conn = await asyncpg.connect(database_url)
    try:
        await assert_finished(conn, sandbox, "cli_down", old, started)
    finally:
        await conn.close()


async def test_429_then_success_and_a_503_storm_that_ends(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """429 (with Retry-After) and a run of 503s are retried until Debitura answers."""
    env = api_env(settings, sandbox)
    link(sandbox, "cli_retry")
    sandbox.faults.fail_next("fetch", 429, retry_after=0)
    sandbox.faults.fail_next("fetch", 503, times=3)
    result = await cli(["tokens", "fetch", "cli_retry"], env)
    assert result.returncode == 0, result.stderr
    assert sandbox.calls["fetch"] == 5
    sandbox.faults.fail_next("rotate", 429, retry_after=0)
    rotated = await cli(["tokens", "rotate", "cli_retry"], env)
    assert rotated.returncode == 0, rotated.stderr
    assert sandbox.calls["rotate"] == 2  # a 429 was refused before any effect
    assert len(await tokens_of(conn, "cli_retry")) == 2


async def test_a_503_storm_that_does_not_end_fails_bounded(
    settings: Settings, sandbox: Sandbox
) -> None:
    """Retries are bounded: a storm that outlasts them is exit 1, the client named."""
    env = api_env(settings, sandbox, RECEIVER_DEBITURA_MAX_ATTEMPTS="3")
    link(sandbox, "cli_storm")
    sandbox.faults.fail_next("fetch", 503, times=100)
    result = await cli(["tokens", "fetch", "cli_storm"], env)
    assert result.returncode == 1
    assert "cli_storm live: failed" in result.stderr
    assert "after 3 tries" in result.stderr
    assert sandbox.calls["fetch"] == 3


async def test_403_and_a_refused_api_key_are_failures_named_per_client(
    settings: Settings, sandbox: Sandbox
) -> None:
    """A 403 is a permission failure; a wrong API key an authentication one; both exit 1."""
    env = api_env(settings, sandbox)
    link(sandbox, "cli_403")
    sandbox.faults.fail_next("fetch", 403)
    forbidden = await cli(["tokens", "fetch", "cli_403"], env)
    assert forbidden.returncode == 1
    assert "cli_403 live: failed: fetch: Debitura refused permission (403" in forbidden.stderr
    wrong_key = {**env, "RECEIVER_DEBITURA_API_KEY": "sk_not_the_key"}
    refused = await cli(["tokens", "fetch", "cli_403"], wrong_key)
    assert refused.returncode == 1
    assert "refused the API key" in refused.stderr


async def test_configuration_errors_exit_2_naming_the_variable(
    settings: Settings, sandbox: Sandbox
) -> None:
    """An http:// URL to a host that is not loopback, or no API key: exit 2, the
    variable named, the value never echoed."""
    plain = api_env(settings, sandbox, RECEIVER_DEBITURA_API_URL="http://api.example.com")
    refused = await cli(["tokens", "fetch", "cli_x"], plain)
    assert refused.returncode == 2
    assert "RECEIVER_DEBITURA_API_URL must be https://" in refused.stderr
    assert "example.com" not in refused.stderr
    keyless = operator_env(settings, RECEIVER_DEBITURA_API_URL=sandbox.url)
    for args in (["tokens", "fetch", "cli_x"], ["tokens", "rotate", "--due"]):
        missing = await cli(args, keyless)
        assert missing.returncode == 2
        assert "RECEIVER_DEBITURA_API_KEY is required" in missing.stderr
    usage = await cli(["tokens", "rotate", "cli_x", "--due"], api_env(settings, sandbox))
    assert usage.returncode == 2


async def test_validate_stores_what_debitura_says_and_flags_invalid_tokens(
    settings: Settings, sandbox: Sandbox, client: Client
) -> None:
    """`tokens validate --json`: one row per token, exit 1 when one is invalid; `tokens
    list --json` shows valid, scopes, validated_at; a gauge counts invalid tokens."""
    env = api_env(settings, sandbox)
    good = await linked_and_fetched(sandbox, env, "cli_good")
    bad = await linked_and_fetched(sandbox, env, "cli_bad")
    sandbox.revoke("cli_bad", reason="client_request")  # at Debitura, no webhook here
    result = await cli(["tokens", "validate", "--json"], env)
    assert result.returncode == 1
    rows = {row["client_id"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert rows["cli_good"]["valid"] is True
    assert rows["cli_good"]["token_prefix"] == good[:15]
    assert rows["cli_good"]["environment"] == "live"
    assert rows["cli_bad"]["valid"] is False
    assert rows["cli_bad"]["token_prefix"] == bad[:15]
    only_good = await cli(["tokens", "validate", "cli_good"], env)
    assert only_good.returncode == 0, only_good.stderr
    listed = await cli(["tokens", "list", "--json"], env)
    inventory = {row["client_id"]: row for row in map(json.loads, listed.stdout.splitlines())}
    assert inventory["cli_good"]["valid"] is True
    assert inventory["cli_good"]["token_prefix"] == good[:15]  # DESIGN §9's name
    assert "cases.create" in inventory["cli_good"]["scopes"]
    assert inventory["cli_good"]["validated_at"] is not None
    assert inventory["cli_bad"]["valid"] is False
    assert "expires_at" in inventory["cli_bad"]
    metrics = await (await client.get("/metrics")).text()
    assert 'receiver_tokens_invalid{environment="live"} 1.0' in metrics
    sandbox.faults.fail_next("validate", 503, times=100)
    unknown = await cli(
        ["tokens", "validate", "cli_good", "--json"],
        {**env, "RECEIVER_DEBITURA_MAX_ATTEMPTS": "2"},
    )
    assert unknown.returncode == 1
    (row,) = map(json.loads, unknown.stdout.splitlines())
    assert (row["client_id"], row["token_prefix"], row["valid"]) == ("cli_good", good[:15], None)


async def test_clients_revoke_needs_confirm_then_revokes_there_and_here(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """Without --confirm nothing is sent; with it the token is revoked at Debitura, then
    locally (revoked, signalled, audited)."""
    env = api_env(settings, sandbox)
    token = await linked_and_fetched(sandbox, env, "cli_rv")
    args = ["clients", "revoke", "cli_rv", "--reason", "contract ended"]
    refused = await cli(args, env)
    assert refused.returncode == 2
    assert sandbox.calls["revoke"] == 0
    done = await cli([*args, "--confirm"], env)
    assert done.returncode == 0, done.stderr
    assert not sandbox.is_valid(token)
    assert [r["status"] for r in (await tokens_of(conn, "cli_rv")).values()] == ["revoked"]
    assert (
        await count(conn, "SELECT count(*) FROM receiver.signals WHERE reason = 'token_revoked'")
        == 1
    )
    assert await count(conn, AUDITS, "cli_rv", "client_revoke") == 1


async def test_rotate_due_rotates_only_old_tokens(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """`--due --dry-run` lists tokens past RECEIVER_TOKEN_ROTATE_AFTER_DAYS without a
    call; `--due --limit 1` rotates the oldest only; a fresh token is never due."""
    env = api_env(settings, sandbox)
    for client_id in ("cli_old1", "cli_old2", "cli_new"):
        await linked_and_fetched(sandbox, env, client_id)
    await conn.execute(
        "UPDATE receiver.tokens SET issued_at = now() - $2::interval WHERE client_id = $1",
        "cli_old1",
        timedelta(days=120),
    )
    await conn.execute(
        "UPDATE receiver.tokens SET issued_at = now() - $2::interval WHERE client_id = $1",
        "cli_old2",
        timedelta(days=91),
    )
    dry = await cli(["tokens", "rotate", "--due", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[0] for line in dry.stdout.splitlines()] == ["cli_old1", "cli_old2"]
    assert "no token is due" not in dry.stderr  # it listed some
    assert sandbox.calls["rotate"] == 0
    one = await cli(["tokens", "rotate", "--due", "--limit", "1"], env)
    assert one.returncode == 0, one.stderr
    assert "cli_old1 live: rotated" in one.stdout
    rest = await cli(["tokens", "rotate", "--due"], env)
    assert "cli_old2 live: rotated" in rest.stdout
    assert sandbox.calls["rotate"] == 2
    never = await cli(
        ["tokens", "rotate", "--due"], {**env, "RECEIVER_TOKEN_ROTATE_AFTER_DAYS": "0"}
    )
    assert never.stdout == ""


async def test_a_later_webhook_about_a_rotated_token_is_a_no_op(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection, post: Post
) -> None:
    """The onboarding webhook Debitura may send for the token a rotation stored
    changes nothing: no second row, no signal."""
    env = api_env(settings, sandbox)
    await linked_and_fetched(sandbox, env, "cli_hook")
    assert (await cli(["tokens", "rotate", "cli_hook"], env)).returncode == 0
    signals = await count(conn, SIGNALS, "cli_hook")
    answer = await post(helpers.onboarding("cli_hook", current(sandbox, "cli_hook")))
    assert answer.status == 200
    assert len(await tokens_of(conn, "cli_hook")) == 2
    assert await count(conn, SIGNALS, "cli_hook") == signals


@pytest.mark.slow
async def test_serve_resumes_open_rotations_rotates_due_ones_and_says_when_off(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """`serve` finishes an open rotation at start and rotates a token past
    RECEIVER_TOKEN_ROTATE_AFTER_DAYS (audited as its own actor); without an API key it
    says once that scheduled rotation is off."""
    env = api_env(settings, sandbox, RECEIVER_RECONCILE_INTERVAL_HOURS="0")
    old = await linked_and_fetched(sandbox, env, "cli_serve")
    due = await linked_and_fetched(sandbox, env, "cli_due")
    await conn.execute(
        "UPDATE receiver.tokens SET issued_at = now() - interval '100 days' "
        "WHERE client_id = 'cli_due'"
    )
    started = datetime.now(UTC)
    sandbox.faults.drop_after("rotate")
    sandbox.faults.fail_next("fetch", 503, times=100)
    assert (await cli(["tokens", "rotate", "cli_serve"], env)).returncode == 1
    sandbox.faults.clear()
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)

        async def done() -> bool:
            rotated = await count(conn, AUDITS, "cli_due", "token_rotate")
            return await count(conn, OPEN_INTENTS) == 0 and rotated == 1

        await eventually(done)
        assert "token_rotation_schedule_on" in output.read_text()
    await assert_finished(conn, sandbox, "cli_serve", old, started, rotate_calls=2)
    stored = await tokens_of(conn, "cli_due")
    assert stored[due[:15]]["status"] == "superseded"
    assert stored[current(sandbox, "cli_due")[:15]]["status"] == "active"
    actor = await conn.fetchval(
        "SELECT actor FROM receiver.audit WHERE client_id = 'cli_due' AND action = 'token_rotate'"
    )
    assert actor == "receiver-serve"
    keyless = operator_env(settings)
    port = processes.free_port()
    with processes.serving(["--port", str(port)], keyless) as (process, output):
        await processes.wait_healthy(port, process)
        text = output.read_text()
    assert text.count("token_rotation_schedule_off") == 1


async def test_pg_dump_and_signals_hold_no_token_or_api_key(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection, database_url: str
) -> None:
    """After fetch, rotate (one lost answer resumed), validate and revoke, neither a
    pg_dump nor any signal row holds a token or the API key, in any form."""
    env = api_env(settings, sandbox)
    seen = [await linked_and_fetched(sandbox, env, "cli_dump")]
    assert (await cli(["tokens", "rotate", "cli_dump"], env)).returncode == 0
    seen.append(current(sandbox, "cli_dump"))
    sandbox.faults.drop_after("rotate")
    assert (await cli(["tokens", "rotate", "cli_dump"], env)).returncode == 0
    seen.append(current(sandbox, "cli_dump"))
    assert (await cli(["tokens", "validate"], env)).returncode == 0
    revoke = ["clients", "revoke", "cli_dump", "--reason", "done", "--confirm"]
    assert (await cli(revoke, env)).returncode == 0
    dump = pg_dump(database_url)
    assert "rotation_intents" in dump  # the dump is real
    signals = json.dumps(
        [dict(r) for r in await conn.fetch("SELECT * FROM receiver.signals")], default=str
    )
    for secret in [*seen, sandbox.api_key]:
        for form in helpers.leak_forms(secret):
            assert form not in dump
            assert form not in signals


async def test_test_tokens_are_managed_only_through_the_test_environment(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """A tok_test_ token is fetched and validated through the test API; a live API that
    answers with a test token is refused; validating test tokens without the test
    API configured is exit 2 naming it, before any call."""
    sb = Sandbox(environment="test")
    await sb.start()
    try:
        helpers.CANARIES.add(sb.api_key)
        token = link(sb, "cli_t")
        test_env = operator_env(
            settings,
            RECEIVER_DEBITURA_TEST_API_URL=sb.url,
            RECEIVER_DEBITURA_TEST_API_KEY=sb.api_key,
        )
        fetched = await cli(["tokens", "fetch", "cli_t", "--environment", "test"], test_env)
        assert fetched.returncode == 0, fetched.stderr
        stored = await tokens_of(conn, "cli_t")
        assert list(stored) == [token[:15]]
        validated = await cli(["tokens", "validate", "--environment", "test"], test_env)
        assert validated.returncode == 0, validated.stderr
        crossed = operator_env(
            settings, RECEIVER_DEBITURA_API_URL=sb.url, RECEIVER_DEBITURA_API_KEY=sb.api_key
        )
        refused = await cli(["tokens", "fetch", "cli_t"], crossed)
        assert refused.returncode == 1
        assert "token of the other environment" in refused.stderr
        no_test_api = await cli(["tokens", "validate"], crossed)
        assert no_test_api.returncode == 2
        assert "RECEIVER_DEBITURA_TEST_API_URL" in no_test_api.stderr
        assert sb.calls["validate"] == 1
    finally:
        await sb.stop()


async def test_the_schedule_pauses_while_debitura_rate_limits(
    settings: Settings, sandbox: Sandbox, database: db.Database, conn: asyncpg.Connection
) -> None:
    """A scheduled run stops at the first rotation Debitura refuses with 429 after its
    retries: the other due token is not tried, and the run reports the pause."""
    configured = config.load_settings(
        **settings_values(settings),
        debitura_api_url=sandbox.url,
        debitura_api_key=sandbox.api_key,
        debitura_retry_base_seconds=0.01,
        debitura_max_attempts=2,
    )
    sealer = vault.Sealer.from_settings(configured)
    for client_id in ("cli_s1", "cli_s2"):
        token = link(sandbox, client_id)
        await adoption.import_token(
            database, configured, sealer, client_id, token, audit.Actor("test")
        )
    await conn.execute(
        "UPDATE receiver.tokens SET onboarding_completed_at = now() - interval '100 days'"
    )
    sandbox.faults.fail_next("rotate", 429, times=10, retry_after=0)
    async with aiohttp.ClientSession() as session:
        rotator = rotation.Rotator(database, configured, sealer, api.Api(session, configured))
        paused = await schedule.run_once(rotator, configured)
    assert paused is True
    assert sandbox.calls["rotate"] == 2  # the first client's two tries, no third
    assert await count(conn, OPEN_INTENTS) == 0  # refused: nothing happened at Debitura

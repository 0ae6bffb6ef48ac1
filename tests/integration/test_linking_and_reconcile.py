"""The vault owns the link and reconciles with Debitura (docs/design.md §9): clients
linked through `receiver clients link` and `POST /admin/v1/clients`, the vault brought
to Debitura's state by `receiver tokens reconcile` and by `serve`, and rotations whose
outcome is uncertain kept open until Debitura settles them. Real `receiver`
processes, `receiver sandbox` over real HTTP, a real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from receiver import partner
from receiver.config import Settings
from receiver.partner import cache as token_cache
from receiver.sandbox import Sandbox
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import cache_settings
from tests.integration.standins import eventually
from tests.integration.test_no_plaintext import pg_dump
from tests.integration.test_partner_models import readme_example
from tests.integration.test_token_management import (
    AUDITS,
    OPEN_INTENTS,
    SIGNALS,
    api_env,
    cli,
    count,
    current,
    linked_and_fetched,
    paused_rotation_env,
    release,
    tokens_of,
    wait_for_answer,
)

ADMIN_TOKEN = "adm_" + "k" * 40  # the admin API's bearer token (40+ characters)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A stand-in Debitura (live) on loopback, paging its client list by 2; its API
    key is a canary."""
    sb = Sandbox(environment="live", page_size=2)
    await sb.start()
    helpers.CANARIES.add(sb.api_key)
    yield sb
    await sb.stop()


async def active_tokens(conn: asyncpg.Connection) -> dict[str, str]:
    """Every client's active live token prefix, as the vault holds it."""
    rows = await conn.fetch(
        "SELECT client_id, prefix FROM receiver.tokens "
        "WHERE status = 'active' AND environment = 'live' ORDER BY client_id"
    )
    return {r["client_id"]: r["prefix"] for r in rows}


def debituras_state(sb: Sandbox) -> dict[str, str]:
    """Every active client's current token prefix, as Debitura holds it."""
    return {c: current(sb, c)[:15] for c, status in sb.clients() if status == "active"}


async def test_clients_link_stores_the_token_sealed_and_prints_only_its_prefix(
    settings: Settings,
    sandbox: Sandbox,
    conn: asyncpg.Connection,
    tmp_path: Path,
    database_url: str,
) -> None:
    """`clients link --body FILE` sends the partner's link request, stores the answer's
    token sealed through the lifecycle (active, one signal, one `client_link` audit
    row) and prints the client id, prefix and status; the token is in no output, no
    audit row and no pg_dump, and Debitura sends no webhook for an API link."""
    env = api_env(settings, sandbox)
    body = tmp_path / "link.json"
    body.write_text(json.dumps({"client_id": "cli_api", "company": "Acme ApS"}))
    result = await cli(["clients", "link", "--body", str(body), "--json"], env)
    assert result.returncode == 0, result.stderr
    token = current(sandbox, "cli_api")
    answer = json.loads(result.stdout)
    assert (answer["client_id"], answer["status"], answer["token_prefix"]) == (
        "cli_api",
        "linked",
        token[:15],
    )
    assert await active_tokens(conn) == {"cli_api": token[:15]}
    assert await count(conn, SIGNALS, "cli_api") == 1
    assert await count(conn, AUDITS, "cli_api", "client_link") == 1
    audit_rows = await conn.fetch("SELECT * FROM receiver.audit")
    assert helpers.find_canaries(str([dict(r) for r in audit_rows])) == []
    assert sandbox.deliveries == []
    assert token not in await asyncio.to_thread(pg_dump, database_url)
    again = await asyncio.to_thread(
        processes.run, ["clients", "link", "--body", "-"], env, stdin="[]"
    )
    assert again.returncode == 2  # no JSON object on stdin: refused, nothing sent
    assert sandbox.calls.get("link", 0) == 1


async def test_clients_link_refuses_a_body_that_is_not_a_json_object(
    settings: Settings, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A link request that is not a JSON object is exit 2 with a clear line; Debitura
    is not called."""
    env = api_env(settings, sandbox)
    for text in ("[1, 2]", "not json", '"x"'):
        body = tmp_path / "bad.json"
        body.write_text(text)
        result = await cli(["clients", "link", "--body", str(body)], env)
        assert result.returncode == 2, result.stderr
        assert "link request" in result.stderr
    assert sandbox.calls.get("link", 0) == 0


async def test_the_admin_api_links_a_client_on_the_admin_listener_only(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection, database_url: str
) -> None:
    """`POST /admin/v1/clients` with an admin token links the client and answers its id,
    prefix and status, never the token; without or with a wrong token it is 401 and
    changes nothing; on the public port it does not exist (404); the audit row names
    the admin token's fingerprint, not the token."""
    helpers.CANARIES.add(ADMIN_TOKEN)
    public, admin = processes.free_port(), processes.free_port()
    env = api_env(
        settings,
        sandbox,
        RECEIVER_ADMIN_PORT=str(admin),
        RECEIVER_ADMIN_TOKENS=f"{'z' * 32},{ADMIN_TOKEN}",
    )
    url = f"http://127.0.0.1:{admin}/admin/v1/clients"
    request = {"client_id": "cli_admin"}
    with processes.serving(["--port", str(public)], env) as (process, output):
        await processes.wait_healthy(admin, process)  # the probes are on the admin port
        async with aiohttp.ClientSession() as session:
            for headers in (
                {},
                {"Authorization": "Bearer " + "x" * 44},
                {"Authorization": ADMIN_TOKEN},
            ):
                async with session.post(url, json=request, headers=headers) as refused:
                    assert refused.status == 401
                    assert (await refused.json())["error"]["code"] == "invalid_admin_token"
            assert sandbox.calls.get("link", 0) == 0
            assert await active_tokens(conn) == {}
            on_public = f"http://127.0.0.1:{public}/admin/v1/clients"
            bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with session.post(on_public, json=request, headers=bearer) as hidden:
                assert hidden.status == 404
            async with session.post(url, json=request, headers=bearer) as linked:
                text = await linked.text()
                assert linked.status == 201, text
        log = output.read_text()
    token = current(sandbox, "cli_admin")
    assert json.loads(text) == {
        "client_id": "cli_admin",
        "environment": "live",
        "token_prefix": token[:15],
        "status": "active",
    }
    assert await active_tokens(conn) == {"cli_admin": token[:15]}
    actor = await conn.fetchval(
        "SELECT actor FROM receiver.audit WHERE action = 'client_link' AND client_id = 'cli_admin'"
    )
    assert actor.startswith("admin:")
    assert ADMIN_TOKEN[:8] not in actor
    assert helpers.find_canaries(log + text) == []
    assert helpers.find_canaries(await asyncio.to_thread(pg_dump, database_url)) == []


async def test_reconcile_brings_the_vault_to_debituras_state(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """After a missed onboarding webhook, a rotation made elsewhere and a revocation
    without a webhook, `tokens reconcile` leaves one active token per client, each
    Debitura's current one, with one signal and one audit row per change; a second
    run changes nothing. `--dry-run` before it says what would change and changes
    nothing."""
    env = api_env(settings, sandbox, RECEIVER_TOKEN_ROTATE_RATE="1000")
    for client_id in ("cli_kept", "cli_rotated", "cli_revoked"):
        await linked_and_fetched(sandbox, env, client_id)
    helpers.CANARIES.add(sandbox.link_client("cli_missed", webhook=False))
    sandbox.rotate("cli_rotated", reason="elsewhere", webhook=False)
    sandbox.revoke("cli_revoked", reason="elsewhere", webhook=False)
    before = await active_tokens(conn)
    dry = await cli(["tokens", "reconcile", "--dry-run", "--json"], env)
    assert dry.returncode == 0, dry.stderr
    assert {json.loads(line)["client_id"] for line in dry.stdout.splitlines()} == {
        "cli_missed",
        "cli_rotated",
        "cli_revoked",
    }
    assert await active_tokens(conn) == before
    run = await cli(["tokens", "reconcile", "--json"], env)
    assert run.returncode == 0, run.stderr
    changed = {
        json.loads(line)["client_id"]: json.loads(line)["status"]
        for line in run.stdout.splitlines()
    }
    assert changed == {"cli_missed": "fetched", "cli_rotated": "replaced", "cli_revoked": "revoked"}
    assert "reconciled live: 4 listed" in run.stderr
    assert await active_tokens(conn) == debituras_state(sandbox)
    for client_id in changed:
        assert await count(conn, AUDITS, client_id, "token_reconcile") == 1
    assert await count(conn, SIGNALS, "cli_kept") == 1  # its fetch, nothing since
    assert await count(conn, SIGNALS, "cli_missed") == 1
    assert await count(conn, SIGNALS, "cli_rotated") == 2
    assert await count(conn, SIGNALS, "cli_revoked") == 2
    again = await cli(["tokens", "reconcile", "--json"], env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert "0 changed, 0 failed" in again.stderr
    assert await conn.fetchval("SELECT count(*) FROM receiver.reconcile_runs WHERE complete") == 2


async def test_reconcile_stops_when_debitura_is_unavailable_and_says_so(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """A list call that fails after its retries ends the run incomplete (exit 1, the
    reason on the summary line), changes nothing, and is not recorded as complete."""
    env = api_env(settings, sandbox, RECEIVER_DEBITURA_MAX_ATTEMPTS="2")
    helpers.CANARIES.add(sandbox.link_client("cli_later", webhook=False))
    sandbox.faults.fail_next("list", 503, times=5)
    result = await cli(["tokens", "reconcile"], env)
    assert result.returncode == 1
    assert "incomplete" in result.stdout
    assert await active_tokens(conn) == {}
    assert await conn.fetchval("SELECT count(*) FROM receiver.reconcile_runs WHERE complete") == 0


async def test_serve_reconciles_a_client_the_partner_library_reports_missing(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection, database_url: str
) -> None:
    """A client linked at Debitura whose webhook was missed: the partner application's
    `WebhookTokens.get` raises `NoToken` and reports it, and `serve` fetches that
    client's token soon after (here within its poll of 0.2 s), so the next `get`
    returns it."""
    helpers.CANARIES.add(sandbox.link_client("cli_asked", webhook=False))
    port = processes.free_port()
    env = api_env(
        settings,
        sandbox,
        RECEIVER_RECONCILE_POLL_SECONDS="0.2",
        RECEIVER_RECONCILE_INTERVAL_HOURS="0",
    )
    tokens = partner.WebhookTokens(
        token_cache.TokenCache.from_settings(cache_settings(settings, cache_ttl_seconds=0.01))
    )
    await tokens.start()
    try:
        with pytest.raises(partner.NoToken):
            await tokens.get("cli_asked")
        with processes.serving(["--port", str(port)], env) as (process, _):
            await processes.wait_healthy(port, process)

            async def stored() -> bool:
                return "cli_asked" in await active_tokens(conn)

            await eventually(stored)
        assert await tokens.get("cli_asked") == current(sandbox, "cli_asked")
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM receiver.link_reports WHERE reconciled_at IS NULL"
            )
            == 0
        )
    finally:
        await tokens.close()


async def test_a_held_rotation_stays_open_and_converges_to_debituras_token(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """Debitura holds rotate-token longer than the client waits, then applies it: the
    command's fetch still sees the old token, so it exits 1 with the rotation open
    (not closed `not_rotated`); once Debitura has rotated, `--resume` stores its new
    token as the active one, the old one superseded."""
    env = api_env(settings, sandbox, RECEIVER_DEBITURA_TIMEOUT_SECONDS="0.5")
    old = await linked_and_fetched(sandbox, env, "cli_held")
    # Held for 4 s, given up on after 0.5 s: the command's fetch comes well before
    # Debitura applies the rotation, even on a loaded machine.
    sandbox.faults.hold("rotate", 4.0)
    held = await cli(["tokens", "rotate", "cli_held"], env)
    assert held.returncode == 1
    assert "cli_held live: pending" in held.stderr
    assert await count(conn, OPEN_INTENTS) == 1

    async def applied() -> bool:
        return sandbox.current_token("cli_held") != old

    await eventually(applied, seconds=30)
    resumed = await cli(["tokens", "rotate", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    new = current(sandbox, "cli_held")
    stored = await tokens_of(conn, "cli_held")
    assert stored[new[:15]]["status"] == "active"
    assert stored[old[:15]]["status"] == "superseded"
    assert await count(conn, OPEN_INTENTS) == 0
    assert sandbox.calls["rotate"] == 1


async def test_a_rotation_killed_while_held_is_settled_by_resume_once_applied(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """SIGKILL while Debitura holds the rotate call: `--resume` before Debitura applies
    it leaves the rotation open (exit 1); after, it stores Debitura's new token."""
    env = api_env(settings, sandbox)
    old = await linked_and_fetched(sandbox, env, "cli_killed")
    sandbox.faults.hold("rotate", 8.0)  # long enough for a resume to start and fetch
    with processes.background(["tokens", "rotate", "cli_killed"], env) as (process, _):

        async def sent() -> bool:
            return sandbox.calls.get("rotate", 0) == 1

        await eventually(sent)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    early = await cli(["tokens", "rotate", "--resume"], env)
    assert early.returncode == 1
    assert "pending" in early.stderr
    assert await count(conn, OPEN_INTENTS) == 1

    async def applied() -> bool:
        return sandbox.current_token("cli_killed") != old

    await eventually(applied, seconds=30)
    late = await cli(["tokens", "rotate", "--resume"], env)
    assert late.returncode == 0, late.stderr
    assert (await tokens_of(conn, "cli_killed"))[current(sandbox, "cli_killed")[:15]][
        "status"
    ] == "active"
    assert await count(conn, OPEN_INTENTS) == 0


async def test_serve_settles_a_held_rotation_within_seconds_of_debitura_applying_it(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """The rotation left open by a held call is checked again by `serve` with backoff
    (seconds at first, not the hourly schedule), and settled once Debitura applied it."""
    env = api_env(
        settings,
        sandbox,
        RECEIVER_DEBITURA_TIMEOUT_SECONDS="0.5",
        RECEIVER_RECONCILE_INTERVAL_HOURS="0",  # the rotation's own recheck settles it
    )
    old = await linked_and_fetched(sandbox, env, "cli_wait")
    sandbox.faults.hold("rotate", 4.0)
    assert (await cli(["tokens", "rotate", "cli_wait"], env)).returncode == 1
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)

        async def settled() -> bool:
            return await count(conn, OPEN_INTENTS) == 0

        await eventually(settled, seconds=30)
    new = current(sandbox, "cli_wait")
    assert new != old
    assert (await tokens_of(conn, "cli_wait"))[new[:15]]["status"] == "active"


async def test_due_rotation_beside_serve_rotates_each_token_once(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """`tokens rotate --due` started beside a `serve` whose schedule rotates the same
    due tokens: each token is claimed once (re-checked as due when taken), so exactly
    one rotate call per client."""
    env = api_env(
        settings,
        sandbox,
        RECEIVER_TOKEN_ROTATE_RATE="1000",
        RECEIVER_RECONCILE_INTERVAL_HOURS="0",  # rotation alone
    )
    clients = [f"cli_due{n}" for n in range(6)]
    for client_id in clients:
        await linked_and_fetched(sandbox, env, client_id)
    await conn.execute(
        "UPDATE receiver.tokens SET issued_at = now() - $1::interval", timedelta(days=100)
    )
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, _):
        due = await cli(["tokens", "rotate", "--due"], env)
        assert due.returncode == 0, due.stderr
        await processes.wait_healthy(port, process)

        async def all_rotated() -> bool:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM receiver.rotation_intents WHERE outcome = 'rotated'"
            )
            return n >= len(clients)

        await eventually(all_rotated)
    # A second rotation of a token (a claim on its stale view) is a seventh call.
    assert sandbox.calls["rotate"] == len(clients)
    for client_id in clients:
        assert await count(conn, AUDITS, client_id, "token_rotate") == 1


async def test_a_revocation_here_during_a_rotation_wins_over_its_answer(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """`clients revoke --confirm` while a rotation's answer is in flight: the rotation
    then stores its new token revoked, never active, and exits 1 saying so; the client
    has no active token."""
    env = api_env(settings, sandbox)
    await linked_and_fetched(sandbox, env, "cli_both")
    paused, fifo = paused_rotation_env(env, tmp_path)
    with processes.background(["tokens", "rotate", "cli_both"], paused) as (process, output):
        assert await asyncio.to_thread(wait_for_answer, fifo) == "answered\n"
        revoked = await cli(
            ["clients", "revoke", "cli_both", "--reason", "ended", "--confirm"], env
        )
        assert revoked.returncode == 0, revoked.stderr
        await asyncio.to_thread(release, fifo)
        assert await asyncio.to_thread(process.wait, 60) == 1
        text = output.read_text()
    assert "stored revoked" in text
    assert helpers.find_canaries(text) == []
    assert await active_tokens(conn) == {}
    statuses = {row["status"] for row in (await tokens_of(conn, "cli_both")).values()}
    assert statuses == {"revoked"}


async def test_reconcile_leaves_a_client_with_an_open_rotation_to_it(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """A rotation whose answer was lost is the rotation's to settle: a reconcile run
    meanwhile leaves that client alone (no `token_reconcile` change), and `--resume`
    then settles it as a rotation."""
    env = api_env(settings, sandbox, RECEIVER_TOKEN_ROTATE_RATE="1000")
    await linked_and_fetched(sandbox, env, "cli_open")
    sandbox.faults.drop_after("rotate")
    sandbox.faults.fail_next("fetch", 503, times=100)
    assert (await cli(["tokens", "rotate", "cli_open"], env)).returncode == 1
    sandbox.faults.clear()
    run = await cli(["tokens", "reconcile", "--json"], env)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    assert await count(conn, AUDITS, "cli_open", "token_reconcile") == 0
    resumed = await cli(["tokens", "rotate", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert await active_tokens(conn) == {"cli_open": current(sandbox, "cli_open")[:15]}
    assert await count(conn, AUDITS, "cli_open", "token_rotate") == 1


async def test_reconcile_never_revokes_a_token_debitura_validates(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """A fetch answering 404 (a wrong path, a proxy) while validate calls the stored
    token valid revokes nothing: the run reports the disagreement and exits 1."""
    env = api_env(settings, sandbox, RECEIVER_TOKEN_ROTATE_RATE="1000")
    token = await linked_and_fetched(sandbox, env, "cli_safe")
    sandbox.faults.fail_next("fetch", 404, times=5)
    run = await cli(["tokens", "reconcile"], env)
    assert run.returncode == 1
    assert "validate calls ours valid" in run.stderr
    assert await active_tokens(conn) == {"cli_safe": token[:15]}
    assert await count(conn, AUDITS, "cli_safe", "token_reconcile") == 0


async def test_the_admin_api_reads_a_link_request_that_arrives_in_pieces(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection
) -> None:
    """A link request whose body arrives in two writes (as any client's may over a real
    network) is read whole and linked, not refused as not JSON."""
    admin = processes.free_port()
    public = processes.free_port()
    env = api_env(
        settings, sandbox, RECEIVER_ADMIN_PORT=str(admin), RECEIVER_ADMIN_TOKENS=ADMIN_TOKEN
    )
    body = json.dumps({"client_id": "cli_pieces", "note": "x" * 3000}).encode()
    head = (
        f"POST /admin/v1/clients HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with processes.serving(["--port", str(public)], env) as (process, _):
        await processes.wait_healthy(admin, process)
        reader, writer = await asyncio.open_connection("127.0.0.1", admin)
        writer.write(head + body[:1000])
        await writer.drain()
        await asyncio.sleep(0.3)  # the rest of the body comes later, as it may
        writer.write(body[1000:])
        await writer.drain()
        answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    assert "cli_pieces" in await active_tokens(conn)


async def test_the_readme_jwt_example_runs_against_the_sandbox_for_a_client_linked_there(
    sandbox: Sandbox,
) -> None:
    """The README's plain-script example, unchanged, against `receiver sandbox`: a client
    linked through the link call with `{"client_id": "your-tenant-id"}` is the tenant
    the script mints a JWT for, and its case is created (201)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sandbox.url}/v1/referral-partners/clients",
            json={"client_id": "your-tenant-id"},
            headers={"XApiKey": sandbox.api_key},
        ) as linked,
    ):
        assert linked.status == 201
        helpers.CANARIES.add((await linked.json())["bearer_token"])
    env = processes.clean_env(
        DEBITURA_API_KEY=sandbox.api_key,
        DEBITURA_API_URL=sandbox.url,
        DEBITURA_CUSTOMER_API_URL=sandbox.url,
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
    assert result.stdout.startswith("201 "), result.stdout
    assert sandbox.api_key not in result.stdout + result.stderr
    assert helpers.find_canaries(result.stdout + result.stderr) == []


async def test_a_reloaded_api_key_reaches_serves_reconcile(
    settings: Settings, sandbox: Sandbox, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Debitura's API key given as RECEIVER_DEBITURA_API_KEY_FILE: after the key is
    changed at Debitura, `serve`'s reconcile runs fail (and pause) until the new key is
    written to the file and `kill -HUP` reloads it; then a run completes, with no
    restart."""
    key_file = tmp_path / "api-key"
    key_file.write_text(sandbox.api_key + "\n")
    env = api_env(
        settings,
        sandbox,
        RECEIVER_RECONCILE_POLL_SECONDS="0.2",
        RECEIVER_RECONCILE_INTERVAL_HOURS="0.0001",
    )
    env.pop("RECEIVER_DEBITURA_API_KEY")
    env["RECEIVER_DEBITURA_API_KEY_FILE"] = str(key_file)
    new_key = "sk_sandbox_" + "n" * 32
    helpers.CANARIES.add(new_key)
    sandbox.api_key = new_key  # rotated at Debitura: the configured key is refused
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)

        async def refused() -> bool:
            return "reconcile_stopped" in output.read_text()

        await eventually(refused)
        key_file.write_text(new_key + "\n")
        process.send_signal(signal.SIGHUP)

        async def completed() -> bool:
            return bool(
                await conn.fetchval("SELECT count(*) FROM receiver.reconcile_runs WHERE complete")
            )

        await eventually(completed, seconds=30)
        assert process.poll() is None
        text = output.read_text()
    assert '"changed": ["RECEIVER_DEBITURA_API_KEY"]' in text
    assert helpers.find_canaries(text) == []

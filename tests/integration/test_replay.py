"""`receiver replay` driving a real receiver over loopback, as testers use it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestServer

from receiver.config import Settings
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Client, Post, operator_env

ROOT = Path(__file__).resolve().parents[2]


def webhook_url(client: Client) -> str:
    """The receiver's webhook URL on loopback."""
    return str(client.make_url("/webhooks/debitura"))


async def replay(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    """Run `receiver replay …` as a process."""
    return await asyncio.to_thread(
        processes.run, ["replay", *args], env or processes.clean_env(), 60, stdin
    )


async def test_trigger_many_with_overrides(
    client: Client, webhook_secret: str, conn: asyncpg.Connection
) -> None:
    """`trigger --count 5 --set` sends five distinct test events with the override applied."""
    result = await replay(
        "trigger",
        "client.onboarding_completed",
        "--count",
        "5",
        "--client",
        "cli_many",
        "--set",
        "data.onboarding_completed_at=2024-05-01T00:00:00Z",
        "--set",
        'extra={"a": 1}',
        "--to",
        webhook_url(client),
        "--secret",
        webhook_secret,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 acknowledged, 0 failed" in result.stdout
    assert "processed: 5" in result.stdout
    rows = await conn.fetch("SELECT is_test, body_redacted FROM receiver.events")
    assert len(rows) == 5
    assert all(r["is_test"] for r in rows)
    assert {json.loads(r["body_redacted"])["extra"]["a"] for r in rows} == {1}
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.tokens WHERE client_id = 'cli_many'")
        == 5
    )
    overridden = await conn.fetchval(
        "SELECT count(*) FROM receiver.token_inventory "
        "WHERE onboarding_completed_at = '2024-05-01T00:00:00Z'"
    )
    assert overridden == 5


def onboarding_with_test_token() -> dict[str, Any]:
    """An onboarding with a test token, as a test delivery must carry."""
    return helpers.onboarding(token=helpers.canary_token("test"))


async def test_send_reads_json_lists_ndjson_and_stdin(
    client: Client,
    webhook_secret: str,
    conn: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """`send` takes a JSON list file, an NDJSON file and stdin in one run."""
    listed = tmp_path / "events.json"
    # Test deliveries (replay's default) carry test tokens: a live one would be quarantined.
    listed.write_text(json.dumps([onboarding_with_test_token(), onboarding_with_test_token()]))
    lines = tmp_path / "events.ndjson"
    lines.write_text("\n".join(json.dumps(onboarding_with_test_token()) for _ in range(3)) + "\n\n")
    piped = json.dumps(helpers.revocation("cli_stdin", None))
    result = await replay(
        "send",
        str(listed),
        str(lines),
        "-",
        "--to",
        webhook_url(client),
        "--secret",
        webhook_secret,
        "--json",
        stdin=piped,
    )
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    summary = outputs[-1]["summary"]
    assert summary["sent"] == 6
    assert summary["by_status"] == {"processed": 6}
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 6
    for token in helpers.CANARIES:
        assert token not in result.stdout


async def test_resend_exercises_deduplication(
    client: Client,
    webhook_secret: str,
    conn: asyncpg.Connection,
    database_url: str,
    settings: Settings,
) -> None:
    """`resend` sends the stored bytes with the same id: the receiver answers duplicate
    and stores nothing new; `--dry-run` lists without sending."""
    document = helpers.onboarding("cli_again")
    body = helpers.encode(document)
    await client.post(
        "/webhooks/debitura", data=body, headers=helpers.signed_headers(webhook_secret, body)
    )
    env = operator_env(settings)
    dry = await replay("resend", "--event-id", document["id"], "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert document["id"] in dry.stdout
    assert document["data"]["bearer_token"][:15] in dry.stdout
    assert document["data"]["bearer_token"] not in dry.stdout
    sent = await replay(
        "resend",
        "--since",
        "2000-01-01",
        "--type",
        "client.onboarding_completed",
        "--live",  # as it came: a test resend would be another world's event
        "--confirm-live",  # the stored onboarding carries a live token
        "--to",
        webhook_url(client),
        env=env,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "status=duplicate" in sent.stdout
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 1
    assert await conn.fetchval("SELECT count(*) FROM receiver.tokens") == 1


async def test_resend_of_quarantined_deliveries_sends_their_bytes(
    client: Client,
    post: Post,
    conn: asyncpg.Connection,
    settings: Settings,
) -> None:
    """Quarantined deliveries (not JSON; a token where none belongs) are re-sent as
    they came, listed by their stored key and type, never with a token in the output;
    the receiver answers each a duplicate."""
    token = helpers.canary_token()
    assert (await (await post(b"not json")).json())["status"] == "quarantined"
    misplaced = helpers.revocation("cli_q", None)
    misplaced["data"]["reason"] = token
    assert (await (await post(misplaced)).json())["reason"] == "token_outside_bearer_token"
    sent = await replay(
        "resend",
        "--status",
        "quarantined",
        "--since",
        "2000-01-01",
        "--live",
        "--confirm-live",
        "--to",
        webhook_url(client),
        env=operator_env(settings),
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.count("status=duplicate") == 2
    assert misplaced["id"] in sent.stdout
    assert token not in sent.stdout + sent.stderr
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 2


async def test_signature_verifies_under_an_independent_implementation(webhook_secret: str) -> None:
    """What the tool signs verifies with the scheme written from Debitura's documentation,
    and carries Debitura's other headers."""
    seen: list[dict[str, Any]] = []

    async def check(request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers["X-Debitura-Signature"]
        t = int(header.split(",")[0].removeprefix("t="))
        seen.append(
            {
                "valid": header == helpers.debitura_signature(webhook_secret, body, t),
                "timestamp": request.headers["X-Debitura-Timestamp"] == str(t),
                "event": request.headers["X-Debitura-Event"],
                "test": request.headers.get("X-Debitura-Test"),
            }
        )
        return web.json_response({"status": "processed", "event_id": "x"})

    partner = web.Application()
    partner.router.add_post("/hook", check)
    async with TestServer(partner, host="127.0.0.1") as server:
        result = await replay(
            "trigger",
            "token.revoked",
            "--token-prefix",
            "tok_live_abc123",
            "--to",
            str(server.make_url("/hook")),
            "--secret",
            webhook_secret,
        )
        live = await replay(
            "trigger",
            "token.revoked",
            "--live",
            "--to",
            str(server.make_url("/hook")),
            "--secret",
            webhook_secret,
        )
    assert result.returncode == 0
    assert live.returncode == 0
    assert seen[0] == {"valid": True, "timestamp": True, "event": "token.revoked", "test": "true"}
    assert seen[1]["valid"]
    assert seen[1]["test"] is None


async def test_debitura_retries_until_accepted(webhook_secret: str) -> None:
    """`--retry debitura` retries failures on the (compressed) schedule until a 200."""
    answers = [503, 500, 200]

    async def flaky(request: web.Request) -> web.Response:
        await request.read()
        status = answers.pop(0)
        return web.json_response(
            {"status": "processed"} if status == 200 else {"error": {"message": "busy"}},
            status=status,
        )

    partner = web.Application()
    partner.router.add_post("/hook", flaky)
    async with TestServer(partner, host="127.0.0.1") as server:
        result = await replay(
            "trigger",
            "client.onboarding_completed",
            "--retry",
            "debitura",
            "--retry-scale",
            "0.0005",
            "--to",
            str(server.make_url("/hook")),
            "--secret",
            webhook_secret,
        )
    assert result.returncode == 0, result.stdout
    assert "attempts=3" in result.stdout


async def test_bad_input_is_one_clear_line(tmp_path: Path, webhook_secret: str) -> None:
    """Unreadable file, invalid JSON, an event without its type: one line saying what to
    fix, exit 2, nothing sent."""
    broken = tmp_path / "broken.ndjson"
    broken.write_text('{"event": "x"}\n{not json\n')
    untyped = tmp_path / "untyped.json"
    untyped.write_text(json.dumps({"data": {}}))
    cases = {
        str(tmp_path / "missing.json"): "missing.json: cannot read",
        str(broken): "broken.ndjson:2: invalid JSON",
        str(untyped): "untyped.json: the event has no 'event' field",
    }
    for path, expected in cases.items():
        result = await replay(
            "send", path, "--secret", webhook_secret, "--to", "http://127.0.0.1:9/x"
        )
        assert result.returncode == 2
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr


async def test_unreachable_receiver_summarises_and_fails(webhook_secret: str) -> None:
    """No receiver at the URL: every event is reported failed with the reason; exit 1."""
    port = processes.free_port()
    result = await replay(
        "trigger",
        "client.onboarding_completed",
        "--count",
        "3",
        "--to",
        f"http://127.0.0.1:{port}/webhooks/debitura",
        "--secret",
        webhook_secret,
    )
    assert result.returncode == 1
    assert "0 acknowledged, 3 failed" in result.stdout
    assert "cannot connect" in result.stdout


async def test_wrong_secret_is_reported(client: Client) -> None:
    """Signed with another secret: the receiver's 401 shows in the summary; exit 1."""
    result = await replay(
        "trigger",
        "client.onboarding_completed",
        "--to",
        webhook_url(client),
        "--secret",
        helpers.new_secret(),
    )
    assert result.returncode == 1
    assert "http   401: 1" in result.stdout
    assert "signature does not match" in result.stdout


async def test_rate_limits_the_sending(client: Client, webhook_secret: str) -> None:
    """`--rate 20` spreads 10 events over about half a second or more."""
    result = await replay(
        "trigger",
        "case.created",
        "--allow-unknown",  # an event type the receiver ignores, on purpose
        "--count",
        "10",
        "--rate",
        "20",
        "--json",
        "--to",
        webhook_url(client),
        "--secret",
        webhook_secret,
    )
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    assert summary["by_status"] == {"ignored": 10}
    assert summary["seconds"] >= 0.45


async def test_trigger_refuses_an_unknown_event_with_the_list(settings: Settings) -> None:
    """A typo in the event type is refused (exit 2, nothing sent) with the supported
    types; --allow-unknown sends it on purpose."""
    refused = await replay(
        "trigger", "client.onboarding_complete", "--to", "http://127.0.0.1:9/x",
        env=operator_env(settings),
    )  # fmt: skip
    assert refused.returncode == 2
    assert "client.onboarding_completed, token.revoked" in refused.stderr


async def test_the_shipped_examples_are_processed(
    client: Client, settings: Settings, conn: asyncpg.Connection
) -> None:
    """`examples/` holds one payload per event, which the receiver processes."""
    files = sorted(str(p) for p in (ROOT / "examples").glob("*.json"))
    assert len(files) == 2
    sent = await replay("send", *files, "--to", webhook_url(client), env=operator_env(settings))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.count("status=processed") == 2
    assert await conn.fetchval("SELECT status FROM receiver.tokens") == "revoked"


async def test_output_into_a_closed_pipe_ends_quietly(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """`receiver tokens list | head -1` with far more output than a pipe holds: the
    reader leaves early, the command ends without a BrokenPipeError traceback."""
    await conn.execute(
        "INSERT INTO receiver.events (key, type, status, is_test, body_dropped_at) "
        "VALUES ('evt_seed', 'client.onboarding_completed', 'processed', false, now())"
    )
    await conn.execute(
        "INSERT INTO receiver.tokens (id, client_id, environment, prefix, token_sealed, "
        "status, onboarding_completed_at, created_by_event) "
        "SELECT gen_random_uuid(), 'cli_' || g, 'live', 'tok_live_' || lpad(g::text, 6, '0'), "
        "'\\x01026b31'::bytea, 'active', now(), 'evt_seed' FROM generate_series(1, 3000) g"
    )
    command = f"{sys.executable} -m receiver tokens list --limit 5000 | head -1"
    shell = await asyncio.to_thread(
        subprocess.run,
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        env=operator_env(settings),
        timeout=60,
        check=False,
    )
    assert shell.stdout.startswith("client_id")  # the header line, then the pipe closed
    assert "Traceback" not in shell.stderr
    assert "BrokenPipeError" not in shell.stderr


async def test_on_a_terminal_event_lines_and_the_progress_bar_do_not_tear(
    client: Client, webhook_secret: str
) -> None:
    """Five events on a terminal (a pty): each event's line stands on its own line,
    above the bar, and the bar ends at 5/5 with a rate."""
    primary, secondary = os.openpty()
    os.set_blocking(primary, False)
    command = [
        sys.executable, "-m", "receiver", "replay", "trigger", "client.onboarding_completed",
        "--count", "5", "--concurrency", "1", "--to", webhook_url(client),
        "--secret", webhook_secret,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdin=secondary, stdout=secondary, stderr=secondary, env=processes.clean_env()
    )
    os.close(secondary)
    seen = b""
    while True:  # until the child has exited and the pty is drained (bounded: 30 s)
        try:
            chunk = os.read(primary, 65536)
        except BlockingIOError:
            if process.poll() is not None:
                break
            await asyncio.sleep(0.02)
            continue
        except OSError:  # EIO: the child's side is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert await asyncio.to_thread(process.wait, 30) == 0
    text = seen.decode(errors="replace")
    # What a terminal shows: each \r returns to the line's start, so a line's visible
    # text is what follows its last \r.
    shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    events = [line for line in shown if "http=200" in line]
    assert len(events) == 5
    assert all(line.startswith("client.onboarding_completed evt_") for line in events)
    assert any("5/5" in line and "event/s" in line for line in shown), shown


async def test_a_revocation_that_matched_no_token_says_so(
    client: Client, post: Post, webhook_secret: str
) -> None:
    """The answer says how many tokens a revocation revoked (a header: the body is the
    contract's); the replay tool shows "no token matched" rather than a bare
    processed, which would hide a wrong client id or prefix."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_match", token))
    matched = await post(helpers.revocation("cli_match", token[:15]))
    assert matched.headers["X-Receiver-Tokens-Revoked"] == "1"
    assert (await matched.json())["status"] == "processed"
    ignored = await post(helpers.onboarding("cli_other"))
    assert "X-Receiver-Tokens-Revoked" not in ignored.headers
    result = await replay(
        "trigger", "token.revoked", "--client", "cli_nobody", "--live",
        "--to", webhook_url(client), "--secret", webhook_secret,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "status=processed tokens_revoked=0 (no unrevoked token matched)" in result.stdout

"""Issue 26's smaller findings, each through the real command or a real receiver:
keys rotate after an erasure (2), a wrong key said at start and in a gauge (8), the
metrics exposition (11), and the commands' messages (6, 11)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets

import aiohttp

from receiver.config import Settings
from receiver.lifecycle import events
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Client, Post, operator_env


async def test_keys_rotate_after_an_erasure_reports_no_key_called_none(
    post: Post, settings: Settings
) -> None:
    """Values emptied by an erasure are under no key: `keys rotate` exits 0 and never
    reports a key called None (finding 2)."""
    assert (await (await post(helpers.onboarding("cli_erased"))).json())["status"] == "processed"
    env = operator_env(settings)
    erased = processes.run(["clients", "erase", "cli_erased", "--confirm"], env)
    assert erased.returncode == 0, erased.stderr
    rotated = processes.run(["keys", "rotate"], env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "None" not in rotated.stdout
    assert "cannot open" not in rotated.stdout


async def test_values_under_an_unconfigured_key_are_said_at_start_and_counted(
    post: Post, settings: Settings
) -> None:
    """A receiver started with a key id that did not seal the stored values names them
    at start (`sealed_under_unconfigured_key`) and counts them in
    receiver_sealed_values_unopenable (finding 8)."""
    assert (await (await post(helpers.onboarding())).json())["status"] == "processed"
    env = operator_env(settings)
    env["RECEIVER_TOKEN_KEYS"] = "k9:" + base64.b64encode(secrets.token_bytes(32)).decode()
    env["RECEIVER_SHUTDOWN_DELAY_SECONDS"] = "0"
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as answer,
        ):
            scrape = await answer.text()
    lines = [json.loads(x) for x in output.read_text().splitlines() if x[:1] == "{"]
    (warning,) = [x for x in lines if x["event"] == "sealed_under_unconfigured_key"]
    assert warning["key_ids"] == ["k1"]
    assert 'receiver_sealed_values_unopenable{kind="tokens"} 1.0' in scrape


async def test_the_exposition_has_no_created_series_and_every_label_set(client: Client) -> None:
    """No `_created` series; labelled counters have a series for every label value
    they can take before any event of theirs (finding 11; counters are process-wide,
    so other tests' events may have moved the values, never removed a series)."""
    text = await (await client.get("/metrics")).text()
    assert "_created" not in text
    series = {line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    for reason in events.QUARANTINE_REASONS:
        assert f'receiver_events_quarantined_total{{reason="{reason}"}}' in series
    for failure in ("missing", "malformed", "stale", "future", "mismatch"):
        assert f'receiver_signature_failures_total{{reason="{failure}"}}' in series
    for kind in ("unavailable", "refused", "schema_missing", "retried", "unstorable"):
        assert f'receiver_database_errors_total{{kind="{kind}"}}' in series
    for outcome in ("processed", "duplicate", "ignored", "quarantined"):
        assert f'receiver_events_total{{outcome="{outcome}",type="other"}}' in series
    assert 'receiver_signals_failed_total{retried="true"}' in series


async def test_event_quarantined_names_the_client_the_body_names(settings: Settings) -> None:
    """A quarantined delivery's log lines carry the client id its body names (finding
    11: it was null)."""
    env = operator_env(settings)
    env["RECEIVER_SHUTDOWN_DELAY_SECONDS"] = "0"
    port = processes.free_port()
    document = helpers.onboarding("cli_named")
    document["data"]["onboarding_completed_at"] = "yesterday"  # invalid_data
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        _, answer = await processes.post_signed(port, _secret(settings), helpers.encode(document))
        assert answer["status"] == "quarantined"
    lines = [json.loads(x) for x in output.read_text().splitlines() if x[:1] == "{"]
    (line,) = [x for x in lines if x["event"] == "event_quarantined"]
    assert line["client_id"] == "cli_named"


def _secret(settings: Settings) -> str:
    return base64.b64encode(settings.webhook_secrets[0].get_secret_value()).decode()


async def test_a_token_import_logs_the_public_prefix(settings: Settings) -> None:
    """`token_imported` logs the 15-character prefix as it is (not secret), never the
    token (finding 11)."""
    token = helpers.canary_token("test")
    result = await asyncio.to_thread(
        processes.run, ["tokens", "import", "cli_imp"], operator_env(settings), 60, token
    )
    assert result.returncode == 0, result.stderr
    assert f'"token_prefix": "{token[:15]}"' in result.stderr


async def test_commands_say_clearly_what_is_wrong(post: Post, settings: Settings) -> None:
    """`signals retry --id nonexistent`, `audit list --limit abc`, `tokens import --file
    /nonexistent`: one clear line each, no SQLSTATE, no traceback; `clients erase` of a
    client never stored says nothing matched; `events list` says when it stopped at its
    limit (findings 6 and 11)."""
    env = operator_env(settings)
    retry = processes.run(["signals", "retry", "--id", "nonexistent"], env)
    assert retry.returncode == 2
    assert "is not a signal id" in retry.stderr
    assert "SQLSTATE" not in retry.stderr
    limit = processes.run(["audit", "list", "--limit", "abc"], env)
    assert limit.returncode == 2
    assert "'abc' is not a whole number" in limit.stderr
    missing = processes.run(["tokens", "import", "cli_x", "--file", "/nonexistent"], env)
    assert missing.returncode in (1, 2)
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    erased = processes.run(["clients", "erase", "cli_never_existed", "--confirm"], env)
    assert "nothing matched" in erased.stdout
    for _ in range(2):
        assert (await (await post(helpers.onboarding())).json())["status"] == "processed"
    listed = processes.run(["events", "list", "--limit", "1"], env)
    assert listed.returncode == 0
    assert "stopped at --limit 1" in listed.stderr
    everything = processes.run(["events", "list", "--limit", "5"], env)
    assert "stopped at" not in everything.stderr

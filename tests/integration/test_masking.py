"""What stands in `bearer_token` is a secret whatever its shape, and every sink masks a
secret through the one masking function: a new shape of secret added in one place
(`redaction.SHAPES`) is masked by the request line, the stored copy, `events show`
and every log line. Real HTTP on loopback, a real Postgres, the CLI as a process."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys

import asyncpg
import pytest

from receiver import redaction
from receiver.config import Settings
from tests import helpers
from tests.integration.conftest import Client, Post, operator_env

SHORT_TOKEN = "tok_live_5f7a9c"  # the length of a public prefix: too short to be valid


async def test_a_short_token_in_bearer_token_is_masked_in_the_stored_copy(
    post: Post, conn: asyncpg.Connection, settings: Settings, log_lines: object
) -> None:
    """An onboarding whose `bearer_token` is too short to be valid is quarantined
    `invalid_data`, and neither its stored redacted copy nor `events show` nor a log
    line holds that value: only a valid token's prefix is ever shown in clear."""
    document = helpers.onboarding("cli_short", SHORT_TOKEN)
    answer = await (await post(document)).json()
    assert answer["reason"] == "invalid_data"
    stored = await conn.fetchval("SELECT body_redacted::text FROM receiver.events")
    assert SHORT_TOKEN not in stored
    assert json.loads(stored)["data"]["bearer_token"] == redaction.MASK
    shown = subprocess.run(
        [sys.executable, "-m", "receiver", "events", "show", document["id"], "--json"],
        env=operator_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert SHORT_TOKEN not in shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["body"]["data"]["bearer_token"] == redaction.MASK
    assert SHORT_TOKEN not in json.dumps(log_lines())  # type: ignore[operator]


@pytest.mark.parametrize("odd", [12345, ["tok_live_abc"], {"v": "x"}, "", "Bearer x"])
async def test_whatever_stands_in_bearer_token_is_masked_whole(
    post: Post, conn: asyncpg.Connection, odd: object
) -> None:
    """A number, a list, an object, an empty string, free text: all masked whole."""
    document = helpers.onboarding("cli_odd")
    document["data"]["bearer_token"] = odd
    await post(document)
    stored = await conn.fetchval("SELECT body_redacted FROM receiver.events")
    assert json.loads(stored)["data"]["bearer_token"] == redaction.MASK


async def test_a_valid_token_keeps_only_its_public_prefix(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A valid token in `bearer_token` is stored as its 15-character prefix and a mask."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_valid", token))
    stored = await conn.fetchval("SELECT body_redacted FROM receiver.events")
    shown = json.loads(stored)["data"]["bearer_token"]
    assert shown.startswith(token[:15])
    assert shown.endswith(redaction.MASK)
    assert token not in stored


async def test_a_tiny_number_beside_the_token_is_processed_and_the_token_stored(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A valid onboarding with an extra field `1e-20000` (0.0 to Python, past what
    Postgres' numeric holds as text) is processed and its token stored, not
    quarantined `unstorable_value`."""
    token = helpers.canary_token()
    body = helpers.encode(helpers.onboarding("cli_tiny", token))
    body = body[:-1] + b', "n": 1e-20000}'
    answer = await (await post(body)).json()
    assert answer["status"] == "processed", answer
    assert (
        await conn.fetchval("SELECT status FROM receiver.tokens WHERE client_id = 'cli_tiny'")
        == "active"
    )


def _stripe_shape() -> redaction.Shape:
    """A secret shape the product does not know: a Stripe-style live key."""
    return redaction.Shape(
        "sk_live_", re.compile(r"sk_live_[A-Za-z0-9]{8,}"), lambda _: redaction.MASK
    )


async def test_a_new_secret_shape_added_in_one_place_is_masked_by_every_sink(
    client: Client,
    post: Post,
    conn: asyncpg.Connection,
    settings: Settings,
    log_lines: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One entry in `redaction.SHAPES` and nothing else: the canonical request line of a
    path holding such a key, the stored copy of a delivery holding one, `events show`
    of it (a CLI process with the same one entry), and every log line mask it."""
    key = "sk_live_" + secrets.token_hex(16)
    monkeypatch.setattr(redaction, "SHAPES", [*redaction.SHAPES, _stripe_shape()])
    refused = await client.get(f"/nowhere/{key}")
    assert refused.status == 404
    assert key not in await refused.text()
    document = helpers.onboarding("cli_shape")
    document["data"]["note"] = f"partner key {key}"
    answer = await (await post(document)).json()
    assert answer["status"] == "processed"
    stored = await conn.fetchval("SELECT body_redacted::text FROM receiver.events")
    assert key not in stored
    assert redaction.MASK in stored
    program = (
        "import re, sys\n"
        "from receiver import cli, redaction\n"
        "redaction.SHAPES.append(redaction.Shape('sk_live_', "
        "re.compile(r'sk_live_[A-Za-z0-9]{8,}'), lambda _: redaction.MASK))\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", program, "events", "show", document["id"], "--json"],
        env=operator_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert key not in shown.stdout + shown.stderr
    assert "partner key " + redaction.MASK in shown.stdout
    lines = log_lines()  # type: ignore[operator]
    assert any(line.get("path", "").startswith("/nowhere/") for line in lines)
    assert key not in json.dumps(lines)

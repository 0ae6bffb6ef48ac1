"""Tokens re-encoded past the redaction: escaped, UTF-16, percent-encoded, as a JSON
key, malformed. Redaction and the live-token guards judge what a reader will see."""

from __future__ import annotations

import asyncio
import json
import secrets
import string
from typing import Any

import asyncpg

from receiver.config import Settings
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Client, Post, operator_env

_ALPHABET = string.ascii_letters + string.digits


def short_canary(environment: str = "live", length: int = 20) -> str:
    """A canary token short enough to pass for a plain JSON key (40 characters at most)."""
    token = f"tok_{environment}_" + "".join(secrets.choice(_ALPHABET) for _ in range(length))
    helpers.CANARIES.add(token)
    return token


def canary_tail(length: int = 30) -> str:
    """The part of a malformed token after its odd character, itself a canary."""
    tail = "".join(secrets.choice(_ALPHABET) for _ in range(length))
    helpers.CANARIES.add(tail)
    return tail


def escaped(token: str) -> str:
    """The token with its underscores written as JSON escapes."""
    return token.replace("_", "\\u005f")


async def test_a_token_in_a_percent_encoded_url_is_refused(client: Client) -> None:
    """`?x=tok%5Flive%5F…` (and a doubly encoded one) is answered 400, as a plain one is."""
    token = helpers.canary_token()
    once = token.replace("_", "%5F")
    for query in (once, once.replace("%", "%25")):
        response = await client.post(f"/webhooks/debitura?x={query}", data=b"{}")
        assert response.status == 400, query
        assert token not in await response.text()


async def test_a_token_as_a_json_key_leaves_no_trace_in_the_quarantine_detail(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """`{"data": {"tok_live_…": 1}}` is quarantined with the detail `data.[REDACTED]:
    token-shaped value`; `events list` and `events show` print no part of the token."""
    token = short_canary()
    document = {"id": "evt_key_token", "event": "x.y", "data": {token: 1}}
    answer = await (await post(document)).json()
    assert answer["reason"] == "token_outside_bearer_token"
    detail = await conn.fetchval(
        "SELECT quarantine_detail FROM receiver.events WHERE key = 'evt_key_token'"
    )
    assert detail == "data.[REDACTED]: token-shaped value"
    env = operator_env(settings)
    printed = [
        await asyncio.to_thread(processes.run, ["events", "list"], env),
        await asyncio.to_thread(processes.run, ["events", "show", "evt_key_token"], env),
    ]
    for result in printed:
        assert result.returncode == 0, result.stderr
        assert token[9:] not in result.stdout + result.stderr


async def test_events_show_masks_escaped_utf16_and_malformed_tokens(
    post: Post, settings: Settings
) -> None:
    """A body that is not JSON, with an escaped token (`tok\\u005flive_…`), a UTF-16
    body, and malformed tokens broken by `+`, `/` or a space: `events show` prints
    none of them, nor the part after the odd character."""
    plain, utf16 = short_canary(), helpers.canary_token()
    tails = {odd: canary_tail() for odd in "+/ "}
    malformed = {odd: f"tok_live_ab{odd}{tail}" for odd, tail in tails.items()}
    bodies = {
        "escaped": f'{{"id": "evt_esc", "n": "{escaped(plain)}", "x": NaN}}'.encode(),
        "utf16": json.dumps({"id": "evt_u16", "data": {"t": utf16}}).encode("utf-16"),
        **{
            f"malformed {odd!r}": json.dumps({"id": f"evt_m{i}", "note": token}).encode()
            for i, (odd, token) in enumerate(malformed.items())
        },
    }
    keys = []
    for body in bodies.values():
        keys.append((await (await post(body)).json())["event_id"])
    env = operator_env(settings)
    for name, key in zip(bodies, keys, strict=True):
        shown = await asyncio.to_thread(processes.run, ["events", "show", key], env)
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout
        readable = text.replace("\\u005f", "_").replace("\ufffd", "").replace("\x00", "")
        for secret in [plain, utf16, *tails.values()]:
            assert secret[9:] not in readable, name
            assert secret[9:] not in text, name
        if name == "utf16":
            assert "tok_live_" in readable  # shown as the reader reads it, masked


async def test_a_token_shaped_event_id_is_refused_before_any_sql(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """`events reprocess <token>` and `events show <token>` exit 2 without a query:
    no audit row is written, and the token is not echoed."""
    token = helpers.canary_token()
    env = operator_env(settings)
    for args in (["events", "reprocess", token], ["events", "show", escaped(token)]):
        result = await asyncio.to_thread(processes.run, args, env)
        assert result.returncode == 2, result.stderr
        assert token[9:] not in result.stdout + result.stderr
    assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 0


async def test_resend_guard_sees_an_escaped_live_token(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """A stored body whose live token is JSON-escaped (`tok\\u005flive_…`) counts as
    carrying a live token: `replay resend` to a plain-HTTP address refuses without
    --confirm-live and sends nothing."""
    token = helpers.canary_token()
    document = helpers.onboarding("cli_esc", "TOKEN")
    body = json.dumps(document).replace("TOKEN", escaped(token)).encode()
    answer: dict[str, Any] = await (await post(body)).json()
    assert answer["status"] == "processed"
    port = processes.free_port()
    result = await asyncio.to_thread(
        processes.run,
        [
            *("replay", "resend", "--event-id", answer["event_id"], "--live"),
            *("--to", f"http://127.0.0.1:{port}/webhooks/debitura"),
        ],
        operator_env(settings),
    )
    assert result.returncode != 0, result.stdout
    assert "--confirm-live" in result.stderr
    assert token not in result.stdout + result.stderr

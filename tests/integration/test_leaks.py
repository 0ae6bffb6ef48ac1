"""Canary tokens planted on every path must surface only as sealed bytes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

from receiver import config, vault
from receiver.config import Settings
from receiver.db import embedded, migrations
from receiver.service import app
from tests import helpers
from tests.conftest import with_database
from tests.integration.conftest import Post, operator_env, with_cache
from tests.integration.processes import run
from tests.integration.standins import StandInCache, eventually


def pg_dump(database_url: str) -> str:
    """A plain-text dump of one database."""
    # The embedded package's pg_dump is as new as any server the suite runs on.
    result = subprocess.run(
        [str(embedded.bin_dir() / "pg_dump"), "--dbname", database_url],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


async def test_pg_dump_holds_no_plaintext_token(post: Post, database_url: str) -> None:
    """After onboardings, revocations, duplicates and ignored events carrying tokens,
    a pg_dump contains none of them, as text, hex or base64."""
    planted = [helpers.canary_token(), helpers.canary_token("test"), helpers.canary_token()]
    await post(helpers.onboarding("cli_dump", planted[0]))
    await post(helpers.onboarding("cli_dump", planted[1]))
    await post(helpers.revocation("cli_dump", planted[1][:15]))
    await post({"id": "evt_other", "event": "case.created", "data": {"leak": planted[2]}})
    dump = pg_dump(database_url)
    assert "receiver.tokens" in dump  # the dump is real, not empty
    for token in planted:
        for form in helpers.leak_forms(token):
            assert form not in dump


async def test_stdlib_loggers_pass_through_redaction(log_lines: Any) -> None:
    """aiohttp, asyncpg and any other stdlib logger are masked like our own."""
    token = helpers.canary_token()
    for name in ("aiohttp.server", "aiohttp.access", "asyncpg.pool", "some.library"):
        logging.getLogger(name).error("saw header Authorization: Bearer %s and %s", token, token)
    text = json.dumps(log_lines())
    assert token not in text
    assert text.count("Bearer [REDACTED]") == 4


async def test_exceptions_render_without_locals_or_tokens(log_lines: Any) -> None:
    """A traceback logged with a token in a local and in its message shows neither."""
    token = helpers.canary_token()

    def fail(secret_value: str) -> None:
        raise ValueError(f"could not use {secret_value}")

    try:
        fail(token)
    except ValueError:
        structlog.get_logger().exception("failed")
    lines = log_lines()
    assert token not in json.dumps(lines)
    assert "secret_value" not in json.dumps(lines[-1].get("exception", ""))  # no locals
    assert "could not use tok_live_" in json.dumps(lines)


async def test_secret_keys_and_configured_secrets_are_masked(
    log_lines: Any, settings: Settings, webhook_secret: str
) -> None:
    """Values under secret-sounding keys, and the configured secrets anywhere, are masked."""
    structlog.get_logger().info(
        "debug", webhook_secret="abc", nested={"password": "pw1"}, note=f"x {webhook_secret} y"
    )
    line = log_lines()[-1]
    assert line["webhook_secret"] == "[REDACTED]"
    assert line["nested"]["password"] == "[REDACTED]"
    assert webhook_secret not in line["note"]


def test_reprs_hold_no_secret(settings: Settings) -> None:
    """Settings, sealer and keyring reprs show no key material."""
    sealer = vault.Sealer.from_settings(settings)
    text = repr(settings) + repr(sealer) + str(settings)
    for secret in settings.secret_values():
        assert secret not in text
    assert "index_key" not in repr(sealer)


async def test_postgres_never_sees_a_plaintext_token(
    own_postgres: Any, aiohttp_client: Any, webhook_secret: str
) -> None:
    """With Postgres logging every statement and its bind parameters, and failing
    statements too, its server log holds no token: only sealed bytes and the blind
    index are ever bound."""
    dsn, _control = own_postgres
    admin = await asyncpg.connect(dsn)
    await admin.execute("CREATE DATABASE watched")
    await admin.execute("ALTER SYSTEM SET log_statement = 'all'")
    await admin.execute("ALTER SYSTEM SET log_parameter_max_length = -1")
    await admin.execute("ALTER SYSTEM SET log_parameter_max_length_on_error = -1")
    await admin.execute("SELECT pg_reload_conf()")
    await admin.close()
    for _ in range(100):  # the reload is asynchronous: wait until new sessions see it
        probe = await asyncpg.connect(dsn)
        logging_all = await probe.fetchval("SHOW log_statement") == "all"
        await probe.close()
        if logging_all:
            break
        await asyncio.sleep(0.05)
    database_url = with_database(dsn, "watched")
    await migrations.apply(database_url)
    settings = config.load_settings(
        database_url=database_url,
        webhook_secrets=webhook_secret,
        token_keys="k1:" + base64.b64encode(os.urandom(32)).decode(),
        index_key=base64.b64encode(os.urandom(32)).decode(),
    )
    client = await aiohttp_client(app.create_app(settings))
    planted = [helpers.canary_token() for _ in range(3)]
    documents = [
        helpers.onboarding("cli_pg", planted[0]),
        helpers.onboarding("cli_pg", planted[1]),
        helpers.revocation("cli_pg", planted[1][:15]),
        {"id": "evt_x", "event": "case.created", "data": {"note": planted[2]}},
    ]
    for document in [*documents, documents[0]]:  # the last one is a duplicate
        body = helpers.encode(document)
        response = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        assert response.status == 200
    # A statement that fails makes Postgres log it with its parameters as well.
    conn = await asyncpg.connect(database_url)
    with contextlib.suppress(asyncpg.PostgresError):
        await conn.execute("SELECT receiver.sealed_key_id($1::bytea) / 0", b"\x01\x02k1")
    await conn.close()
    log_text = (Path(urlsplit(dsn).query.split("host=")[1]) / "log").read_text(errors="replace")
    # The group's own statement really was logged (the migration's DDL names the
    # function too, but never calls it with parameters).
    assert "FROM receiver.record_events_v5($1" in log_text
    assert "Parameters: $1 = " in log_text
    for token in planted:
        for form in helpers.leak_forms(token):
            assert form not in log_text


def _nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def _planted_everywhere(
    token: str, live: str
) -> list[tuple[dict[str, Any] | bytes, dict[str, str]]]:
    """Deliveries with `token` in every field a sender controls (and in headers), plus
    a legitimate onboarding of `live` and its revocation, so signals flow too."""
    onboarding = helpers.onboarding("cli_canary", live)
    deliveries: list[tuple[dict[str, Any] | bytes, dict[str, str]]] = [
        (onboarding, {}),
        (helpers.revocation("cli_canary", live[:15]), {}),
        (helpers.revocation("cli_canary", None, reason=f"leaked {token}"), {}),
        (helpers.revocation(token, None), {}),
        (helpers.revocation("cli_canary", token), {}),
        ({**helpers.onboarding(), "id": token}, {}),
        ({**helpers.onboarding(), "event": token}, {}),
        ({**helpers.onboarding(), "specVersion": token, "timestamp": token}, {}),
        ({**helpers.onboarding(), token: "a key", "extra": {token: [token]}}, {}),
        ({"event": "token.revoked", "data": {"client_id": "c", "bearer_token": token}}, {}),
        ({"event": "x", "data": {"deep": _nested(token, 40)}}, {}),
        (f"not json at all {token}".encode(), {}),
        (helpers.onboarding(), {"X-Debitura-Event": token, "X-Request-Id": token}),
        (helpers.onboarding(token=token + "!"), {}),
    ]
    return deliveries


async def test_canary_in_every_field_never_surfaces(
    aiohttp_client: Any,
    settings: Settings,
    standin_cache: StandInCache,
    database_url: str,
    webhook_secret: str,
    log_lines: Any,
) -> None:
    """A canary token planted in every field of signed deliveries (and in headers)
    appears in no answer, log line, NOTIFY payload, cache POST, pg_dump, nor in the
    output of `events list`, `events show`, `tokens list` and `signals list`."""
    cached = with_cache(settings, standin_cache)
    client = await aiohttp_client(app.create_app(cached))
    listener = await asyncpg.connect(database_url)
    notified: list[str] = []
    await listener.add_listener(cached.notify_channel, lambda *args: notified.append(args[3]))
    token, live = helpers.canary_token(), helpers.canary_token()
    answers = []
    try:
        for document, extra in _planted_everywhere(token, live):
            body = document if isinstance(document, bytes) else helpers.encode(document)
            headers = helpers.signed_headers(webhook_secret, body, **extra)
            response = await client.post(app.WEBHOOK_PATH, data=body, headers=headers)
            assert response.status == 200
            answers.append(await response.text())
        await eventually(lambda: _true(len(standin_cache.received) >= 2))
        await eventually(lambda: _true(len(notified) >= 2))
    finally:
        await listener.close()
    statuses = [json.loads(a)["status"] for a in answers]
    # The legitimate pair, and the delivery with the token only in its headers, apply.
    assert statuses == ["processed"] * 2 + ["quarantined"] * 10 + ["processed", "quarantined"]

    env = operator_env(settings)
    outputs = [
        run(["events", "list", "--json", "--limit", "1000"], env).stdout,
        run(["events", "list"], env).stdout,
        run(["tokens", "list"], env).stdout,
        run(["signals", "list"], env).stdout,
    ]
    for line in outputs[0].splitlines():
        shown = run(["events", "show", json.loads(line)["key"]], env)
        assert shown.returncode == 0, shown.stderr
        outputs.append(shown.stdout)
    assert len(outputs) == 4 + len(answers)
    surfaces = {
        "answers": "\n".join(answers),
        "logs": json.dumps(log_lines()),
        "notify": "\n".join(notified),
        "cache posts": json.dumps([r["body"] for r in standin_cache.received]),
        "pg_dump": pg_dump(database_url),
        "cli": "\n".join(outputs),
    }
    for where, text in surfaces.items():
        for secret in (token, live):
            for form in helpers.leak_forms(secret):
                assert form not in text, where
    assert live[:15] in surfaces["cli"]  # the prefix is public, and shown


async def _true(value: bool) -> bool:
    return value

"""No plaintext token, at rest or anywhere a reader looks: canary tokens planted on
every path, and re-encoded past the redaction (JSON-escaped, UTF-16, percent-encoded,
as a JSON key, malformed), surface only as sealed bytes. Not in a pg_dump, the
Postgres statement log, log lines, reprs, answers, NOTIFY payloads, cache posts or
what operator commands print; redaction and the live-token guards judge what a
reader will see."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import string
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import structlog

from receiver import config, redaction, vault
from receiver.config import Settings
from receiver.db import embedded, migrations
from receiver.service import app
from tests import helpers
from tests.conftest import with_database
from tests.integration import processes
from tests.integration.conftest import Client, Post, operator_env, with_cache
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
    index are ever bound, also for every encoding of `hostile_encodings` (escaped,
    UTF-16, a JSON key, malformed, `v9=` in the signature header, a percent-encoded
    URL) and for the operator commands that read them back: `events list`, `show`,
    `reprocess` (with a token-shaped id too), `tokens list`, `signals list`."""
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
    planted = [helpers.canary_token() for _ in range(5)]
    in_header = helpers.canary_token()
    planted.append(in_header)
    escaped = planted[3].replace("_", "\\u005f").encode()
    documents: list[Any] = [
        helpers.onboarding("cli_pg", planted[0]),
        helpers.onboarding("cli_pg", planted[1]),
        helpers.revocation("cli_pg", planted[1][:15]),
        {"id": "evt_x", "event": "case.created", "data": {"note": planted[2]}},
        b'{"id": "evt_esc", "n": "ESCAPED", "x": NaN}'.replace(b"ESCAPED", escaped),
        json.dumps({"id": "evt_u16", "data": {"t": planted[4]}}).encode("utf-16"),
    ]
    for document in [*documents, documents[0]]:  # the last one is a duplicate
        body = document if isinstance(document, bytes) else helpers.encode(document)
        headers = helpers.signed_headers(webhook_secret, body)
        headers["X-Debitura-Signature"] += f",v9={in_header}"
        response = await client.post(app.WEBHOOK_PATH, data=body, headers=headers)
        assert response.status == 200
    hostile, hidden, percent = hostile_encodings()
    answers = await post_hostile(client, webhook_secret, hostile, percent)
    outputs = await asyncio.to_thread(cli_surfaces, operator_env(settings), hidden)
    # A statement that fails makes Postgres log it with its parameters as well.
    conn = await asyncpg.connect(database_url)
    with contextlib.suppress(asyncpg.PostgresError):
        await conn.execute("SELECT receiver.sealed_key_id($1::bytea) / 0", b"\x01\x02k1")
    await conn.close()
    log_text = (Path(urlsplit(dsn).query.split("host=")[1]) / "log").read_text(errors="replace")
    # The group's own statement really was logged (the migration's DDL names the
    # function too, but never calls it with parameters).
    assert "FROM receiver.record_events_v7($1" in log_text
    assert "Parameters: $1 = " in log_text
    # The deliveries' and the operator commands' own statements (not the migrations'):
    assert "receiver.record_events_v7($1::" in log_text
    assert "INSERT INTO receiver.audit" in log_text  # events reprocess's audit rows
    for token in planted:
        for form in helpers.leak_forms(token):
            assert form not in log_text
    assert_hidden(
        {"statement log": log_text, "answers": "\n".join(answers), "cli": "\n".join(outputs)},
        hidden,
    )


# --- every encoding a token can hide in -----------------------------------------------

# The public part of a token: "tok_live_" and six characters (its 15-character prefix).
_PUBLIC = 15


def reader_forms(secret: str) -> list[str]:
    """How `secret` could show in a sink: as text, hex, base64, and spelled out as
    UTF-16 read as UTF-8 (NULs or replacement characters between its letters)."""
    spelled = [sep.join(secret) for sep in ("\x00", "\ufffd", "\\u0000", "\\ufffd")]
    return [*helpers.leak_forms(secret), *spelled]


def hostile_encodings() -> tuple[list[tuple[bytes, dict[str, str]]], list[str], str]:
    """Signed deliveries carrying canary tokens in every encoding that hides them:
    JSON-escaped (valid JSON, and in a NaN body), UTF-16, as a JSON key, malformed
    with `+`, `/` or a space inside, and an extra `v9=` in the signature header; the
    secret parts no sink may show (each token past its public prefix, or past its
    odd character); and a URL path with a percent-encoded token (refused 400)."""
    esc, esc_nan, u16, key, plus, slash, space, header, url = (
        helpers.canary_token() for _ in range(9)
    )

    def escaped(token: str) -> str:
        return token.replace("_", "\\u005f")

    def broken(token: str, odd: str) -> str:
        return token[:24] + odd + token[24:]

    deliveries: list[tuple[bytes, dict[str, str]]] = [
        (
            b'{"id": "evt_esc", "event": "x", "data": {"n": "%s"}}' % escaped(esc).encode(),
            {},
        ),
        (b'{"id": "evt_nan", "n": "%s", "x": NaN}' % escaped(esc_nan).encode(), {}),
        (json.dumps(helpers.onboarding("cli_u16", u16)).encode("utf-16"), {}),
        (helpers.encode({"id": "evt_key", "event": "x", "data": {key: 1}}), {}),
        (helpers.encode({"id": "evt_plus", "event": "x", "data": {"n": broken(plus, "+")}}), {}),
        (helpers.encode({"id": "evt_slash", "event": "x", "data": {"n": broken(slash, "/")}}), {}),
        (helpers.encode({"id": "evt_space", "event": "x", "data": {"n": broken(space, " ")}}), {}),
        (helpers.encode(helpers.onboarding()), {"v9": header}),
    ]
    hidden = [t[_PUBLIC:] for t in (esc, esc_nan, u16, key, header, url)]
    hidden += [t[24:] for t in (plus, slash, space)]
    percent = app.WEBHOOK_PATH + "?x=" + url.replace("_", "%5F")
    return deliveries, hidden, percent


async def post_hostile(
    client: Any, webhook_secret: str, deliveries: list[tuple[bytes, dict[str, str]]], percent: str
) -> list[str]:
    """Send `hostile_encodings()`'s deliveries signed (an extra `v9=` appended to the
    signature header where asked) and the percent-encoded URL; every answer's text."""
    answers = []
    for body, extra in deliveries:
        headers = helpers.signed_headers(webhook_secret, body)
        if "v9" in extra:
            headers["X-Debitura-Signature"] += f",v9={extra['v9']}"
        response = await client.post(app.WEBHOOK_PATH, data=body, headers=headers)
        assert response.status == 200
        answers.append(await response.text())
    body = helpers.encode(helpers.onboarding())
    response = await client.post(
        percent, data=body, headers=helpers.signed_headers(webhook_secret, body)
    )
    assert response.status == 400
    answers.append(await response.text())
    return answers


def cli_surfaces(env: dict[str, str], hidden: list[str]) -> list[str]:
    """What operators see: `events list` (table and JSON), `events show` of every
    stored event, `events reprocess --quarantined`, `tokens list`, `signals list`,
    and `events show`/`reprocess` given a token-shaped id, escaped or not."""
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
    reprocessed = run(["events", "reprocess", "--quarantined"], env)
    assert "out of quarantine" in reprocessed.stdout, reprocessed.stderr
    outputs += [reprocessed.stdout, reprocessed.stderr]
    as_id = "tok_live_abcdef" + hidden[0]
    for given in (as_id, as_id.replace("_", "\\u005f")):
        for command in (["events", "show", given], ["events", "reprocess", given]):
            refused = run(command, env)
            assert refused.returncode == 2, refused.stderr
            outputs += [refused.stdout, refused.stderr]
    return outputs


def assert_hidden(surfaces: dict[str, str], hidden: list[str]) -> None:
    """No surface shows any hidden part in any reader form."""
    for where, text in surfaces.items():
        for secret in hidden:
            for form in reader_forms(secret):
                assert form not in text, where


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
    """A canary token planted in every field of signed deliveries (and in headers),
    and in every encoding of `hostile_encodings` (escaped, UTF-16, a JSON key, a
    percent-encoded URL, malformed with `+`, `/` or a space, `v9=` in the signature
    header), appears in no answer, log line, NOTIFY payload, cache POST, pg_dump, nor
    in the output of `events list/show/reprocess`, `tokens list` and `signals list`."""
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
        hostile, hidden, percent = hostile_encodings()
        hostile_answers = await post_hostile(client, webhook_secret, hostile, percent)
        await eventually(lambda: _true(len(standin_cache.received) >= 2))
        await eventually(lambda: _true(len(notified) >= 2))
    finally:
        await listener.close()
    statuses = [json.loads(a)["status"] for a in answers]
    # The legitimate pair, the revocation with the whole token as its prefix (applied as
    # its public 15 characters: DESIGN §2), and the delivery with the token only in its
    # headers, apply.
    assert statuses == (
        ["processed"] * 2
        + ["quarantined"] * 2
        + ["processed"]
        + ["quarantined"] * 7
        + ["processed", "quarantined"]
    )

    outputs = cli_surfaces(operator_env(settings), hidden)
    assert len(outputs) == 4 + len(answers) + len(hostile) + 2 + 8
    surfaces = {
        "answers": "\n".join(answers + hostile_answers),
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
    assert_hidden(surfaces, hidden)
    assert live[:15] in surfaces["cli"]  # the prefix is public, and shown


async def _true(value: bool) -> bool:
    return value


# --- each encoding through one sink ----------------------------------------------

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
    # …and one whose underscores are JSON escapes, percent-encoded (`tok%5Cu005flive…`):
    # a token to whoever decodes the URL and reads the escape.
    escaped_then_encoded = token.replace("_", "%5Cu005f")
    for query in (once, once.replace("%", "%25"), escaped_then_encoded):
        response = await client.post(f"/webhooks/debitura?x={query}", data=b"{}")
        assert response.status == 400, query
        assert token not in await response.text()


def test_a_percent_encoded_json_escaped_token_is_masked_in_text() -> None:
    """The one masking function reads `tok%5Cu005flive_…` (percent-encoded JSON
    escapes, once or twice) as the token it is: a log line keeps only its prefix."""
    token = helpers.canary_token()
    masker = redaction.Redactor()
    for form in (token.replace("_", "%5Cu005f"), token.replace("_", "%255Cu005f")):
        shown = masker.text(f"GET /x?q={form}")
        assert helpers.find_canaries(shown) == [], shown
        assert token[:15] in shown


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

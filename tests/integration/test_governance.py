"""Data governance on a real Postgres: retention (prune), erasure, the audit trail,
token import, the resend guard, and token health."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from receiver import db, vault
from receiver.config import Settings
from receiver.lifecycle import audit
from receiver.service import app
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Client, Post, operator_env
from tests.integration.standins import eventually
from tests.integration.test_no_plaintext import pg_dump


async def cli(settings: Settings, *args: str, stdin: str | None = None) -> Any:
    """Run one `receiver` command as an operator would, against the test database."""
    return await asyncio.to_thread(processes.run, list(args), operator_env(settings), 60, stdin)


async def age(conn: asyncpg.Connection, client_id: str, days: int) -> None:
    """Make everything of `client_id` look `days` old: its events, tokens, signals."""
    back = timedelta(days=days)
    await conn.execute(
        "UPDATE receiver.events SET received_at = received_at - $2::interval WHERE client_id = $1",
        client_id,
        back,
    )
    await conn.execute(
        "UPDATE receiver.tokens SET onboarding_completed_at = onboarding_completed_at - "
        "$2::interval, revoked_at = revoked_at - $2::interval, "
        "expires_at = expires_at - $2::interval WHERE client_id = $1",
        client_id,
        back,
    )
    await conn.execute(
        "UPDATE receiver.signals SET created_at = created_at - $2::interval WHERE client_id = $1",
        client_id,
        back,
    )


async def values_of(conn: asyncpg.Connection, client_id: str) -> dict[str, int]:
    """How many stored values of a client are still there, by kind."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM receiver.events WHERE client_id = $1 "
        "        AND body_sealed IS NOT NULL) AS bodies, "
        "       (SELECT count(*) FROM receiver.tokens WHERE client_id = $1 "
        "        AND token_sealed IS NOT NULL) AS tokens, "
        "       (SELECT count(*) FROM receiver.signals WHERE client_id = $1) AS signals",
        client_id,
    )
    assert row is not None
    return dict(row)


async def names_of(conn: asyncpg.Connection, client_id: str) -> int:
    """How many of the client's events keep the names of their body."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM receiver.events WHERE client_id = $1 AND body_names IS NOT NULL",
            client_id,
        )
    )


# --- retention ----------------------------------------------------------------------


async def test_prune_drops_old_values_and_deduplication_still_works(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """Past the retention (30 days by default) a revoked token's value, its events'
    bodies and its settled signals go; the inventory rows and event keys stay, so a
    late retry of an old delivery is still a duplicate. Newer ones are untouched;
    --dry-run counts the same and changes nothing."""
    old = helpers.onboarding("cli_old")
    await post(old)
    await post(helpers.revocation("cli_old", None))
    await post(helpers.onboarding("cli_new"))
    await age(conn, "cli_old", 40)
    assert await values_of(conn, "cli_old") == {"bodies": 2, "tokens": 1, "signals": 2}

    dry = await cli(settings, "prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "event_bodies": 2,
        "token_values": 1,
        "signals": 2,
        "dry_run": True,
    }
    assert await values_of(conn, "cli_old") == {"bodies": 2, "tokens": 1, "signals": 2}
    assert await names_of(conn, "cli_old") == 2

    done = await cli(settings, "prune")
    assert done.returncode == 0, done.stderr
    assert "dropped: 2 event bod(ies)" in done.stdout
    assert await values_of(conn, "cli_old") == {"bodies": 0, "tokens": 0, "signals": 0}
    assert await names_of(conn, "cli_old") == 0  # a dropped body's names go with it
    assert await values_of(conn, "cli_new") == {"bodies": 1, "tokens": 1, "signals": 1}
    inventory = await cli(settings, "tokens", "list", "--client", "cli_old", "--json")
    assert [json.loads(line)["status"] for line in inventory.stdout.splitlines()] == ["revoked"]

    again = await post(old)
    assert (await again.json())["status"] == "duplicate"
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 3


async def test_prune_never_drops_an_open_quarantine(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """A quarantined delivery keeps its body past the retention until an operator has
    dealt with it: the body is what reprocessing needs."""
    await post(b"not json at all")
    await conn.execute("UPDATE receiver.events SET received_at = now() - interval '400 days'")
    done = await cli(settings, "prune", "--json")
    assert json.loads(done.stdout)["event_bodies"] == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE body_sealed IS NULL") == 0
    )


async def test_serve_prunes_on_its_schedule_one_replica_at_a_time(
    aiohttp_client: Any, post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """With RECEIVER_PRUNE_INTERVAL_SECONDS set, serve prunes by itself; while another
    process holds the prune's lease, a prune does nothing and says so."""
    await post(helpers.onboarding("cli_sched"))
    await age(conn, "cli_sched", 40)
    await conn.execute(
        "UPDATE receiver.leases SET holder = 'other', until = now() + interval '1 hour'"
        " WHERE name = 'receiver.prune'"
    )
    blocked = await cli(settings, "prune")
    assert blocked.returncode == 1
    assert "another process is pruning" in blocked.stderr
    await conn.execute(
        "UPDATE receiver.leases SET holder = NULL, until = '-infinity'"
        " WHERE name = 'receiver.prune'"
    )
    assert await values_of(conn, "cli_sched") == {"bodies": 1, "tokens": 1, "signals": 1}

    scheduled = settings.model_copy(update={"prune_interval_seconds": 0.5})
    await aiohttp_client(app.create_app(scheduled))

    async def pruned() -> bool:
        return (await values_of(conn, "cli_sched"))["bodies"] == 0

    await eventually(pruned)


# --- erasure ------------------------------------------------------------------------


async def stored_forms(conn: asyncpg.Connection, client_id: str) -> list[str]:
    """Every stored form of a client's tokens, as a dump would show it: ciphertexts,
    blind indexes and the sealed bodies that carry them (hex)."""
    forms = []
    for row in await conn.fetch(
        "SELECT token_sealed, token_index FROM receiver.tokens WHERE client_id = $1", client_id
    ):
        forms += [bytes(row["token_sealed"]).hex(), bytes(row["token_index"]).hex()]
    for row in await conn.fetch(
        "SELECT body_sealed FROM receiver.events WHERE client_id = $1 "
        "OR body_redacted #>> '{data,client_id}' = $1",
        client_id,
    ):
        forms.append(bytes(row["body_sealed"]).hex())
    return forms


async def test_erase_leaves_no_trace_of_the_clients_tokens(
    post: Post, conn: asyncpg.Connection, settings: Settings, database_url: str
) -> None:
    """`clients erase` removes every token value, blind index and stored body of the
    client (live and test, quarantined ones included, even one that is not JSON), so a
    pg_dump holds none of them; other clients keep theirs. It queues an invalidation
    signal per environment, writes a tombstone, and a second run changes nothing."""
    live, test = helpers.canary_token(), helpers.canary_token("test")
    await post(helpers.onboarding("cli_gone", live))
    await post(helpers.onboarding("cli_gone", test))
    misplaced = helpers.revocation("cli_gone", None)
    misplaced["data"]["reason"] = helpers.canary_token()  # quarantined: token outside its field
    assert (await (await post(misplaced)).json())["status"] == "quarantined"
    broken = b'{"event": "token.revoked", "data": {"client_id": "cli_gone", "x": '
    assert (await (await post(broken)).json())["reason"] == "invalid_json"
    kept = helpers.canary_token()
    await post(helpers.onboarding("cli_stays", kept))
    gone_forms = await stored_forms(conn, "cli_gone")
    broken_form = bytes(
        await conn.fetchval(
            "SELECT body_sealed FROM receiver.events WHERE quarantine_reason = 'invalid_json'"
        )
    ).hex()
    kept_forms = await stored_forms(conn, "cli_stays")
    before = pg_dump(database_url)
    assert all(form in before for form in [*gone_forms, broken_form, *kept_forms])

    refused = await cli(settings, "clients", "erase", "cli_gone")
    assert refused.returncode == 2
    assert "--confirm" in refused.stderr
    assert await stored_forms(conn, "cli_gone") == gone_forms

    erased = await cli(
        settings,
        "clients", "erase", "cli_gone", "--confirm",
        "--actor", "dpo@partner", "--reason", "GDPR #42",
    )  # fmt: skip
    assert erased.returncode == 0, erased.stderr
    assert "erased client 'cli_gone': 2 token value(s), 4 stored bod(ies)" in erased.stdout
    after = pg_dump(database_url)
    assert not [form for form in [*gone_forms, broken_form] if form in after]
    assert all(form in after for form in kept_forms)
    assert not helpers.find_canaries(after)

    statuses = await conn.fetch(
        "SELECT environment, status, revoke_reason FROM receiver.tokens "
        "WHERE client_id = 'cli_gone' ORDER BY environment"
    )
    assert [tuple(r) for r in statuses] == [
        ("live", "revoked", "erased"),
        ("test", "revoked", "erased"),
    ]
    signals = await conn.fetch(
        "SELECT s.environment, s.reason, s.token_prefix FROM receiver.signals s "
        "JOIN receiver.events e ON e.key = s.event_key "
        "WHERE s.client_id = 'cli_gone' AND e.type = 'receiver.client_erased' ORDER BY 1"
    )
    assert [tuple(r) for r in signals] == [
        ("live", "token_revoked", None),
        ("test", "token_revoked", None),
    ]

    trail = await cli(settings, "audit", "list", "--client", "cli_gone", "--json")
    (tombstone,) = [json.loads(line) for line in trail.stdout.splitlines()]
    assert tombstone["action"] == "client_erase"
    assert tombstone["actor"] == "dpo@partner"
    assert tombstone["reason"] == "GDPR #42"
    assert tombstone["client_id"].startswith("erased:")  # the hash, not the id
    assert "cli_gone" not in json.dumps(tombstone)

    twice = await cli(settings, "clients", "erase", "cli_gone", "--confirm")
    assert twice.returncode == 0, twice.stderr
    assert "nothing left to erase" in twice.stdout
    assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 1

    # A token delivered for the client afterwards is stored as usual: it was re-linked.
    await post(helpers.onboarding("cli_gone"))
    # Signals: the two onboardings, the erasure's two, the new onboarding.
    assert await values_of(conn, "cli_gone") == {"bodies": 1, "tokens": 1, "signals": 5}


# --- the audit trail ----------------------------------------------------------------


async def test_audit_rows_cannot_be_changed_or_removed(
    database: db.Database, conn: asyncpg.Connection
) -> None:
    """The service's own connections can append to receiver.audit, never update,
    delete or truncate it."""
    await audit.audit_each(database, audit.Actor("ops", "check"), "keys_rotate", [{}])
    async with database.connection() as runtime:
        for statement in (
            "UPDATE receiver.audit SET actor = 'someone else'",
            "DELETE FROM receiver.audit",
            "TRUNCATE receiver.audit",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await runtime.execute(statement)
    assert await conn.fetchval("SELECT actor FROM receiver.audit") == "ops"


async def test_reveal_is_audited_in_the_database_with_the_prefix(
    post: Post, settings: Settings
) -> None:
    """`tokens reveal --confirm` records who, why, which client and which token (its
    public prefix) in the audit table before printing the token."""
    token = "tok_live_" + os.urandom(16).hex()  # printed on purpose: not a canary
    await post(helpers.onboarding("cli_rev", token))
    shown = await cli(
        settings,
        "tokens",
        "reveal",
        "cli_rev",
        "--confirm",
        "--actor",
        "alice",
        "--reason",
        "INC-7",
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == token
    trail = await cli(settings, "audit", "list", "--action", "token_reveal", "--json")
    (row,) = [json.loads(line) for line in trail.stdout.splitlines()]
    assert (row["actor"], row["reason"], row["client_id"], row["token_prefix"]) == (
        "alice",
        "INC-7",
        "cli_rev",
        token[:15],
    )
    assert row["detail"] == {"status": "active"}  # an object, not its JSON text
    assert token not in trail.stdout
    table = await cli(settings, "audit", "list")
    assert token[:15] in table.stdout


async def test_free_text_in_the_audit_trail_cannot_carry_a_token(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """A token pasted into --reason by mistake is masked before it is stored."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_txt"))
    rotated = await cli(settings, "keys", "rotate", "--reason", f"see {token}")
    assert rotated.returncode == 0, rotated.stderr
    reason = await conn.fetchval("SELECT reason FROM receiver.audit")
    assert token not in reason
    assert reason.startswith("see tok_live_")


# --- import -------------------------------------------------------------------------


async def test_tokens_import_from_stdin_is_stored_like_a_webhook_and_audited(
    settings: Settings, conn: asyncpg.Connection, sealer: vault.Sealer
) -> None:
    """`tokens import` reads the token from stdin (never argv), stores it sealed as an
    onboarding would, with its signal and an audit row; a second token for the same
    client is refused without --supersede and replaces the first with it."""
    first, second = helpers.canary_token(), helpers.canary_token()
    imported = await cli(
        settings, "tokens", "import", "cli_api", "--reason", "POST /clients", stdin=first + "\n"
    )
    assert imported.returncode == 0, imported.stderr
    assert f"token {first[:15]}… (live) active" in imported.stdout
    row = await conn.fetchrow(
        "SELECT id::text AS id, token_sealed, created_by_event FROM receiver.tokens "
        "WHERE client_id = 'cli_api'"
    )
    assert row is not None
    assert sealer.open_token(row["id"], row["token_sealed"]) == first
    assert row["created_by_event"].startswith("import_")
    assert (
        await conn.fetchval(
            "SELECT reason FROM receiver.signals WHERE event_key = $1", row["created_by_event"]
        )
        == "token_issued"
    )

    refused = await cli(settings, "tokens", "import", "cli_api", stdin=second)
    assert refused.returncode == 2
    assert "already has an active live token" in refused.stderr
    replaced = await cli(
        settings,
        "tokens", "import", "cli_api", "--supersede", "--expires-at", "2030-01-01T00:00:00Z",
        stdin=second,
    )  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    statuses = await conn.fetch(
        "SELECT prefix, status, expires_at FROM receiver.tokens WHERE client_id = 'cli_api' "
        "ORDER BY stored_at"
    )
    assert [(r["prefix"], r["status"]) for r in statuses] == [
        (first[:15], "superseded"),
        (second[:15], "active"),
    ]
    assert statuses[0]["expires_at"].year == 2030
    actions = await conn.fetch("SELECT action, token_prefix FROM receiver.audit ORDER BY id")
    assert [tuple(r) for r in actions] == [
        ("token_import", first[:15]),
        ("token_import", second[:15]),
    ]
    for result in (imported, refused, replaced):
        assert not helpers.find_canaries(result.stdout + result.stderr)


async def test_tokens_import_refuses_a_malformed_token_and_stores_nothing(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """Not a Debitura token: exit 2 with the rule, nothing stored, nothing audited."""
    result = await cli(settings, "tokens", "import", "cli_bad", stdin="Bearer abc\n")
    assert result.returncode == 2
    assert "must be tok_live_ or tok_test_" in result.stderr
    assert await conn.fetchval("SELECT count(*) FROM receiver.tokens") == 0
    assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 0


# --- the resend guard ---------------------------------------------------------------


async def test_resend_of_a_live_token_needs_confirmation_and_a_safe_target(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """A stored onboarding with a live token is not re-sent without --confirm-live,
    never over plain HTTP to another host, and when sent to loopback it is audited
    first. A test token needs none of that."""
    received: list[bytes] = []

    async def record(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({"status": "processed"})

    target = web.Application()
    target.router.add_post("/webhooks/debitura", record)
    server = TestServer(target, host="127.0.0.1", port=processes.free_port())
    await server.start_server()
    try:
        url = str(server.make_url("/webhooks/debitura"))
        live = helpers.onboarding("cli_resend", helpers.canary_token())
        await post(live)
        base = ("replay", "resend", "--event-id", live["id"], "--live")

        unconfirmed = await cli(settings, *base, "--to", url)
        assert unconfirmed.returncode == 2
        assert "--confirm-live" in unconfirmed.stderr
        elsewhere = await cli(
            settings, *base, "--confirm-live", "--to", "http://partner.example/webhooks/debitura"
        )
        assert elsewhere.returncode == 2
        assert "https://" in elsewhere.stderr
        assert received == []
        assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 0

        sent = await cli(settings, *base, "--confirm-live", "--actor", "qa", "--to", url)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert len(received) == 1
        row = await conn.fetchrow("SELECT action, actor, event_key FROM receiver.audit")
        assert row is not None
        assert tuple(row) == ("event_resend", "qa", live["id"])

        test = helpers.onboarding("cli_resend_test", helpers.canary_token("test"))
        await post(test)
        plain = await cli(settings, "replay", "resend", "--event-id", test["id"], "--to", url)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        assert len(received) == 2
    finally:
        await server.close()


# --- token health -------------------------------------------------------------------


async def test_token_health_metrics_and_the_rotation_reminder(
    post: Post, client: Client, conn: asyncpg.Connection, settings: Settings
) -> None:
    """/metrics counts active tokens by age and clients left without one; `tokens list
    --older-than 90d` lists the tokens due for rotation."""
    await post(helpers.onboarding("cli_fresh"))
    await post(helpers.onboarding("cli_stale"))
    await post(helpers.onboarding("cli_cut"))
    await post(helpers.revocation("cli_cut", None))
    await conn.execute(
        "UPDATE receiver.tokens SET onboarding_completed_at = now() - interval '120 days' "
        "WHERE client_id = 'cli_stale'"
    )
    await conn.execute(
        "UPDATE receiver.tokens SET onboarding_completed_at = now() - interval '1 day' "
        "WHERE client_id = 'cli_fresh'"
    )
    text = await (await client.get("/metrics")).text()
    assert 'receiver_tokens_active{age="over_90d",environment="live"} 1.0' in text
    assert 'receiver_tokens_active{age="under_30d",environment="live"} 1.0' in text
    assert 'receiver_tokens_active{age="30d_to_90d",environment="live"} 0.0' in text
    assert 'receiver_clients_without_active_token{environment="live"} 1.0' in text
    assert 'receiver_clients_without_active_token{environment="test"} 0.0' in text

    due = await cli(
        settings, "tokens", "list", "--status", "active", "--older-than", "90d", "--json"
    )
    assert [json.loads(line)["client_id"] for line in due.stdout.splitlines()] == ["cli_stale"]
    wrong = await cli(settings, "tokens", "list", "--older-than", "ninety")
    assert wrong.returncode == 2
    assert "e.g. 90d" in wrong.stderr


async def test_a_token_import_logs_the_public_prefix(settings: Settings) -> None:
    """`token_imported` logs the 15-character prefix as it is (not secret), never the
    token."""
    token = helpers.canary_token("test")
    result = await asyncio.to_thread(
        processes.run, ["tokens", "import", "cli_imp"], operator_env(settings), 60, token
    )
    assert result.returncode == 0, result.stderr
    assert f'"token_prefix": "{token[:15]}"' in result.stderr

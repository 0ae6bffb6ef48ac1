"""Key rotation online, and the operator commands around tokens and keys."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import asyncpg
import pytest
from pydantic import SecretBytes

from receiver import db, vault
from receiver.admin import rekey
from receiver.config import Settings
from receiver.lifecycle import audit
from receiver.service import app
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, operator_env

K2 = ("k2", os.urandom(32))
OPS = audit.Actor("ops", "rotation test")


def with_new_primary(settings: Settings) -> Settings:
    """The settings after an operator put a new key first in RECEIVER_TOKEN_KEYS."""
    keys = ((K2[0], SecretBytes(K2[1])), *settings.token_keys)
    return settings.model_copy(update={"token_keys": keys})


async def key_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Sealed values per key id, tokens and events together."""
    rows = await conn.fetch(
        "SELECT receiver.sealed_key_id(token_sealed) AS k FROM receiver.tokens "
        "UNION ALL SELECT receiver.sealed_key_id(body_sealed) FROM receiver.events"
    )
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["k"]] = counts.get(row["k"], 0) + 1
    return counts


async def every_value_opens(conn: asyncpg.Connection, keyring: vault.Keyring) -> int:
    """Open every stored token and event body; return how many were opened."""
    opened = 0
    for row in await conn.fetch("SELECT id::text AS id, token_sealed FROM receiver.tokens"):
        keyring.open(row["token_sealed"], vault.token_associated_data(row["id"]))
        opened += 1
    for row in await conn.fetch("SELECT body_hash, body_sealed FROM receiver.events"):
        keyring.open(
            row["body_sealed"], vault.event_associated_data("sha256:" + row["body_hash"].hex())
        )
        opened += 1
    return opened


async def test_rotation_under_concurrent_writes(
    post: Post,
    aiohttp_client: Any,
    settings: Settings,
    webhook_secret: str,
    database: db.Database,
    conn: asyncpg.Connection,
) -> None:
    """While the service keeps writing under the new key, rotation moves every old value;
    afterwards all of them open with the new key alone."""
    for _ in range(40):
        await post(helpers.onboarding())
    assert await key_counts(conn) == {"k1": 80}

    rotated_settings = with_new_primary(settings)
    writer = await aiohttp_client(app.create_app(rotated_settings))

    async def keep_writing() -> int:
        sent = 0
        for _ in range(30):
            body = helpers.encode(helpers.onboarding())
            response = await writer.post(
                app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
            )
            assert response.status == 200
            sent += 1
        return sent

    ring = vault.Sealer.from_settings(rotated_settings).keyring
    report, written = await asyncio.gather(
        rekey.rotate(database, ring, actor=OPS, batch_size=7), keep_writing()
    )
    assert report.rotated == {"tokens": 40, "events": 40}
    assert await key_counts(conn) == {"k2": 80 + 2 * written}
    assert report.count_under("k1") == 0
    assert await every_value_opens(conn, vault.Keyring([K2])) == 80 + 2 * written


async def test_interrupted_rotation_resumes(
    post: Post, settings: Settings, database: db.Database, conn: asyncpg.Connection
) -> None:
    """A rotation that dies after its first batch loses nothing; the next run finishes.
    (A batch takes one row per page: ten tokens on one page, one row.)"""
    for _ in range(10):
        await post(helpers.onboarding())
    ring = vault.Sealer.from_settings(with_new_primary(settings)).keyring

    class Crash(Exception):
        """Stands in for a kill after the first committed batch."""

    def crash(kind: str, total: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        await rekey.rotate(database, ring, actor=OPS, batch_size=4, progress=crash)
    assert await key_counts(conn) == {"k1": 19, "k2": 1}
    report = await rekey.rotate(database, ring, actor=OPS, batch_size=4)
    assert report.rotated == {"tokens": 9, "events": 10}
    assert await key_counts(conn) == {"k2": 20}
    assert await every_value_opens(conn, ring) == 20


async def test_rotation_reports_values_under_a_missing_key(
    post: Post, settings: Settings, database: db.Database
) -> None:
    """Values sealed under a key not in the ring are counted and named, not lost."""
    await post(helpers.onboarding())
    ring = vault.Keyring([K2])  # k1 removed too early
    report = await rekey.rotate(database, ring, actor=OPS)
    assert report.missing_keys == {"k1": 2}
    assert sum(report.rotated.values()) == 0


async def test_keys_rotate_command_tells_when_the_old_key_may_go(
    post: Post, database_url: str, settings: Settings
) -> None:
    """`receiver keys rotate` re-encrypts, shows progress, and says the old key may be removed."""
    for _ in range(3):
        await post(helpers.onboarding())
    result = await asyncio.to_thread(
        processes.run,
        ["keys", "rotate", "--batch-size", "2"],
        operator_env(with_new_primary(settings)),
    )
    assert result.returncode == 0, result.stderr
    assert "re-encrypted 3 token(s) and 3 event(s) under primary key 'k2'" in result.stdout
    assert "k1: 0 token(s), 0 event(s) -> may be removed from RECEIVER_TOKEN_KEYS" in result.stdout
    assert "tokens: 2 re-encrypted" in result.stderr


async def test_keys_rotate_dry_run_says_what_would_move_and_changes_nothing(
    post: Post, database_url: str, settings: Settings, conn: asyncpg.Connection
) -> None:
    """`keys rotate --dry-run` names the counts, the keys they move from and to, and
    that every replica must hold the new primary first; nothing is re-sealed. The real
    run prints the same plan on stderr before it starts."""
    for _ in range(2):
        await post(helpers.onboarding())
    env = operator_env(with_new_primary(settings))
    before = await conn.fetch("SELECT token_sealed FROM receiver.tokens ORDER BY id")
    dry = await asyncio.to_thread(processes.run, ["keys", "rotate", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert "would re-seal 2 token(s) and 2 event(s) under primary key 'k2' (from 'k1')" in (
        dry.stdout
    )
    assert "must hold key 'k2' in RECEIVER_TOKEN_KEYS first" in dry.stdout
    as_json = await asyncio.to_thread(processes.run, ["keys", "rotate", "--dry-run", "--json"], env)
    assert json.loads(as_json.stdout) == {
        "primary": "k2",
        "would_reseal": {"tokens": 2, "events": 2},
        "from_keys": ["k1"],
        "unopenable": {},
    }
    assert await conn.fetch("SELECT token_sealed FROM receiver.tokens ORDER BY id") == before
    done = await asyncio.to_thread(processes.run, ["keys", "rotate", "--json"], env)
    assert done.returncode == 0, done.stderr
    assert "would re-seal 2 token(s) and 2 event(s)" in done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["rotated"] == {"tokens": 2, "events": 2}
    assert outcome["remaining"]["k1"] == {"tokens": 0, "events": 0}
    again = await asyncio.to_thread(processes.run, ["keys", "rotate", "--dry-run"], env)
    assert "would re-seal 0 token(s) and 0 event(s) under primary key 'k2'" in again.stdout


async def test_tokens_list_command_shows_no_secret(
    post: Post, database_url: str, settings: Settings
) -> None:
    """`receiver tokens list` prints the inventory as a table or JSON, prefixes only."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_list", token))
    env = operator_env(settings)
    table = await asyncio.to_thread(processes.run, ["tokens", "list"], env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:4] == [
        "client_id",
        "token_prefix",
        "environment",
        "status",
    ]
    assert f"cli_list   {token[:15]}  live" in table.stdout
    as_json = await asyncio.to_thread(
        processes.run, ["tokens", "list", "--json", "--status", "active"], env
    )
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["token_prefix"] for r in rows] == [token[:15]]
    assert "prefix" not in rows[0]  # one name for one thing (DESIGN §9's)
    assert token not in table.stdout + as_json.stdout


async def test_tokens_reveal_needs_confirm_and_is_audited(
    post: Post, database_url: str, settings: Settings
) -> None:
    """Revealing is refused without --confirm; with it, the token goes to stdout only and
    an audit line without the token goes to the log."""
    token = (
        "tok_live_" + "R" * 10 + os.urandom(12).hex()
    )  # deliberately not a canary: it is printed
    await post(helpers.onboarding("cli_reveal", token))
    env = operator_env(settings)
    refused = await asyncio.to_thread(processes.run, ["tokens", "reveal", "cli_reveal"], env)
    assert refused.returncode == 2
    assert token not in refused.stdout + refused.stderr
    shown = await asyncio.to_thread(
        processes.run, ["tokens", "reveal", "cli_reveal", "--confirm"], env
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == token
    assert '"event": "token_revealed"' in shown.stderr
    assert token not in shown.stderr


def to_rotate(exposition: str) -> dict[str, float]:
    """The receiver_sealed_values_to_rotate samples of an exposition, by their labels."""
    prefix = "receiver_sealed_values_to_rotate{"
    return {
        line[len(prefix) : line.index("}")]: float(line.split()[-1])
        for line in exposition.splitlines()
        if line.startswith(prefix)
    }


async def test_metrics_count_the_values_a_rotation_still_has_to_move(
    post: Post, aiohttp_client: Any, settings: Settings, database: db.Database
) -> None:
    """Once a new key is primary, /metrics counts what is still sealed under the old one
    (from the tallies, read at scrape time), and nothing once the rotation is done."""
    for _ in range(3):
        await post(helpers.onboarding())
    rotated_settings = with_new_primary(settings)
    before = await aiohttp_client(app.create_app(settings))
    assert to_rotate(await (await before.get("/metrics")).text()) == {}

    scraper = await aiohttp_client(app.create_app(rotated_settings))
    assert to_rotate(await (await scraper.get("/metrics")).text()) == {
        'key_id="k1",kind="events"': 3.0,
        'key_id="k1",kind="tokens"': 3.0,
    }
    await rekey.rotate(database, vault.Sealer.from_settings(rotated_settings).keyring, actor=OPS)
    assert to_rotate(await (await scraper.get("/metrics")).text()) == {}


async def test_the_gauge_names_every_key_id_with_the_count_of_its_values(
    post: Post, settings: Settings, database: db.Database, conn: asyncpg.Connection
) -> None:
    """The refresh's count of values left to rotate (sealed_to_rotate_counts, read from
    the tallies) names every key id other than the primary, one no keyring holds
    included (the unopenable gauge rests on it), each with the exact count of its
    values, before and after a fold."""
    for _ in range(5):
        await post(helpers.onboarding())
    other = vault.Keyring([("k0", os.urandom(32))])
    token_id = await conn.fetchval("SELECT id::text FROM receiver.tokens ORDER BY id LIMIT 1")
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
        token_id,
        other.seal(b"tok_live_unopenable0000000", vault.token_associated_data(token_id)),
    )
    expected = [("events", "k1", 5), ("tokens", "k0", 1), ("tokens", "k1", 4)]
    got = await database.fetch("sealed_to_rotate_counts", "k2")
    assert [(r["kind"], r["key_id"], r["n"]) for r in got] == expected
    await database.fetchval("sealed_tallies_fold", db.TALLY_FOLD_CHUNK)
    assert await conn.fetchval("SELECT count(*) FROM receiver.sealed_tallies") == 3
    got = await database.fetch("sealed_to_rotate_counts", "k2")
    assert [(r["kind"], r["key_id"], r["n"]) for r in got] == expected


async def test_a_value_held_locked_is_left_reported_and_taken_by_the_next_run(
    post: Post,
    settings: Settings,
    database: db.Database,
    database_url: str,
    conn: asyncpg.Connection,
) -> None:
    """A token a delivery holds locked through the whole rotation is skipped by every
    sweep (SKIP LOCKED) and reported as still under the old key; the next run, once it
    is free, re-seals it."""
    for _ in range(6):
        await post(helpers.onboarding())
    ring = vault.Sealer.from_settings(with_new_primary(settings)).keyring
    holder = await asyncpg.connect(database_url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT 1 FROM receiver.tokens ORDER BY id LIMIT 1 FOR UPDATE")
        first = await rekey.rotate(database, ring, actor=OPS, batch_size=4)
        await held.rollback()
    finally:
        await holder.close()
    assert first.rotated == {"tokens": 5, "events": 6}
    assert first.remaining[("tokens", "k1")] == 1
    second = await rekey.rotate(database, ring, actor=OPS, batch_size=4)
    assert second.rotated == {"tokens": 1}
    assert await key_counts(conn) == {"k2": 12}


async def test_keys_rotate_exits_1_while_an_old_key_still_holds_values(
    post: Post, settings: Settings, database_url: str, conn: asyncpg.Connection
) -> None:
    """A value the service holds locked through every sweep stays under the old key:
    `keys rotate` says so, names the key and exits 1 (so `keys rotate && remove the
    key` cannot strand it); once it is free, the next run exits 0."""
    for _ in range(3):
        await post(helpers.onboarding())
    env = operator_env(with_new_primary(settings))
    holder = await asyncpg.connect(database_url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT 1 FROM receiver.tokens ORDER BY id LIMIT 1 FOR UPDATE")
        first = await asyncio.to_thread(processes.run, ["keys", "rotate"], env)
        await held.rollback()
    finally:
        await holder.close()
    assert first.returncode == 1, first.stdout + first.stderr
    assert "k1: 1 token(s), 0 event(s) -> still in use" in first.stdout
    assert "values still under k1 (1)" in first.stderr
    assert "Traceback" not in first.stderr
    second = await asyncio.to_thread(processes.run, ["keys", "rotate"], env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert await key_counts(conn) == {"k2": 6}

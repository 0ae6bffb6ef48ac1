"""keys rotate's page-order walk under moving rows, two rotators and foreign keys."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import asyncpg

from receiver import db, vault
from receiver.admin import rekey
from receiver.config import Settings
from receiver.service import scrape
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, operator_env
from tests.integration.test_rotation import (
    K2,
    OPS,
    every_value_opens,
    key_counts,
    with_new_primary,
)

K0 = vault.Keyring([("k0", os.urandom(32))])


async def test_two_rotators_and_rows_moving_during_the_walk_all_end_under_the_primary(
    post: Post, settings: Settings, database: db.Database, conn: asyncpg.Connection
) -> None:
    """Rows a concurrent UPDATE moves (to a later page, or into room behind the walk)
    while two rotators walk with batches of one and two are all re-sealed; a value
    under a key no ring holds is left and reported by both."""
    for _ in range(30):
        await post(helpers.onboarding())
    row = await conn.fetchrow("SELECT id::text AS id FROM receiver.tokens ORDER BY ctid LIMIT 1")
    assert row is not None
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
        row["id"],
        K0.seal(b"tok_live_foreign0000000000", vault.token_associated_data(row["id"])),
    )
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM receiver.tokens ORDER BY ctid DESC")]
    ring = vault.Sealer.from_settings(with_new_primary(settings)).keyring

    async def keep_moving() -> None:
        for token_id in ids:
            await conn.execute(
                "UPDATE receiver.tokens SET updated_at = now() WHERE id = $1", token_id
            )
            await asyncio.sleep(0)

    one, two, _ = await asyncio.gather(
        rekey.rotate(database, ring, actor=OPS, batch_size=1),
        rekey.rotate(database, ring, actor=OPS, batch_size=2),
        keep_moving(),
    )
    assert one.missing_keys == two.missing_keys == {"k0": 1}
    assert one.rotated["tokens"] + two.rotated["tokens"] == 29
    assert one.rotated["events"] + two.rotated["events"] == 30
    assert await key_counts(conn) == {"k2": 59, "k0": 1}


async def test_the_gauges_name_unknown_key_ids_first_last_and_between(
    post: Post, settings: Settings, database: db.Database, conn: asyncpg.Connection
) -> None:
    """Unknown key ids sorting before, between and after the configured ones are each
    named; emptied values count under no key; only the primary left: no sample."""
    for _ in range(6):
        await post(helpers.onboarding())
    rows = await conn.fetch("SELECT id::text AS id FROM receiver.tokens ORDER BY id")
    for row, kid in zip(rows, ["a0", "k1x", "zz"], strict=False):
        ring = vault.Keyring([(kid, os.urandom(32))])
        await conn.execute(
            "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
            row["id"],
            ring.seal(b"tok_live_foreign0000000000", vault.token_associated_data(row["id"])),
        )
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = NULL, status = 'revoked', "
        "value_dropped_at = now() WHERE id = $1::uuid",
        rows[3]["id"],
    )
    await conn.execute(
        "UPDATE receiver.events SET body_sealed = NULL, body_redacted = NULL, "
        "body_dropped_at = now() WHERE key IN "
        "(SELECT key FROM receiver.events ORDER BY key LIMIT 2)"
    )
    got = await database.fetch("sealed_to_rotate_counts", "k2")
    triples = [(r["kind"], r["key_id"], r["n"]) for r in got]
    assert triples == [
        ("events", "k1", 4),
        ("tokens", "a0", 1),
        ("tokens", "k1", 2),
        ("tokens", "k1x", 1),
        ("tokens", "zz", 1),
    ]
    assert scrape.unopenable_counts(triples, frozenset({"k2", "k1"})) == {"tokens": 3, "events": 0}
    ring = vault.Sealer.from_settings(with_new_primary(settings)).keyring
    await rekey.rotate(database, ring, actor=OPS, batch_size=1)
    got = await database.fetch("sealed_to_rotate_counts", "k2")
    assert [(r["kind"], r["key_id"]) for r in got] == [
        ("tokens", "a0"),
        ("tokens", "k1x"),
        ("tokens", "zz"),
    ]
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = NULL, status = 'revoked', "
        "value_dropped_at = now() "
        "WHERE receiver.sealed_key_id(token_sealed) <> 'k2'"
    )
    assert await database.fetch("sealed_to_rotate_counts", "k2") == []


async def test_keys_rotate_command_with_batches_of_one_leaves_a_foreign_value_and_fails(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """`keys rotate --batch-size 1` re-seals everything it can, names the value under
    a key it does not hold, exits non-zero, and prints no traceback."""
    for _ in range(3):
        await post(helpers.onboarding())
    row = await conn.fetchrow(
        "SELECT id::text AS id FROM receiver.tokens ORDER BY ctid DESC LIMIT 1"
    )
    assert row is not None
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
        row["id"],
        K0.seal(b"tok_live_foreign0000000000", vault.token_associated_data(row["id"])),
    )
    result = await asyncio.to_thread(
        processes.run,
        ["keys", "rotate", "--batch-size", "1"],
        operator_env(with_new_primary(settings)),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "k0: 1 value(s) under a key not in RECEIVER_TOKEN_KEYS: cannot open" in result.stdout
    assert "re-encrypted 2 token(s) and 3 event(s)" in result.stdout
    assert await key_counts(conn) == {"k2": 5, "k0": 1}


async def test_keys_rotate_killed_mid_walk_keeps_its_committed_batches_and_a_rerun_finishes(
    post: Post, settings: Settings, conn: asyncpg.Connection, database_url: str
) -> None:
    """SIGKILL while the walk's third batch waits to commit: the two committed batches
    stay re-sealed and audited, the third leaves nothing; the next run re-seals the
    rest, and every value opens under the new primary."""
    for _ in range(8):
        await post(helpers.onboarding())
    # The outside fault: a third rotation audit row waits on a lock the test holds.
    await conn.execute(
        """
        CREATE FUNCTION public.hold_third_batch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT count(*) FROM receiver.audit WHERE action = 'keys_rotate') >= 2 THEN
                PERFORM pg_advisory_xact_lock(4242);
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER hold_third_batch BEFORE INSERT ON receiver.audit
            FOR EACH ROW EXECUTE FUNCTION public.hold_third_batch();
        """
    )
    holder = await asyncpg.connect(database_url)
    await holder.execute("SELECT pg_advisory_lock(4242)")
    env = operator_env(with_new_primary(settings))
    with processes.background(["keys", "rotate", "--batch-size", "3"], env) as (process, _):
        deadline = time.monotonic() + 30
        while not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
            "AND objid = 4242 AND NOT granted)"
        ):
            assert process.poll() is None
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    await holder.close()
    await conn.execute("DROP TRIGGER hold_third_batch ON receiver.audit")
    audited = "SELECT count(*) FROM receiver.audit WHERE action = 'keys_rotate'"
    assert await conn.fetchval(audited) == 2
    assert await key_counts(conn) == {"k1": 14, "k2": 2}  # one row per page per batch
    result = await asyncio.to_thread(processes.run, ["keys", "rotate", "--batch-size", "3"], env)
    assert result.returncode == 0, result.stderr
    assert "re-encrypted 6 token(s) and 8 event(s)" in result.stdout
    assert await key_counts(conn) == {"k2": 16}
    assert await every_value_opens(conn, vault.Keyring([K2])) == 16

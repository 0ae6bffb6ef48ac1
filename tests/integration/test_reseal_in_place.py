"""Re-sealing in place (migration 0024): no index names a sealed value, so `keys rotate`
re-seals with heap-only updates; what each key id seals is tallied by triggers, and
the tallies stay equal to a count of the values after every kind of write."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

import asyncpg
import pytest

from receiver import config, db, vault
from receiver.admin import rekey
from receiver.config import Settings
from receiver.db import migrations
from receiver.lifecycle import audit, erasure, retention
from receiver.service import app
from tests import helpers
from tests.conftest import with_database
from tests.integration import processes, standins
from tests.integration.conftest import Post, operator_env
from tests.integration.test_rotation import OPS, with_new_primary

# Every sealed value per kind and key id, counted from the tables (what the tallies
# stand for).
_COUNTED = """
SELECT 'tokens' AS kind, receiver.sealed_key_id(token_sealed) AS key_id, count(*) AS n
  FROM receiver.tokens WHERE token_sealed IS NOT NULL GROUP BY 2
UNION ALL
SELECT 'events', receiver.sealed_key_id(body_sealed), count(*)
  FROM receiver.events WHERE body_sealed IS NOT NULL GROUP BY 2
"""


async def _tallied(database: db.Database) -> dict[tuple[str, str], int]:
    return await rekey.sealed_key_counts(database)


async def _counted(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    return {(r["kind"], r["key_id"]): r["n"] for r in await conn.fetch(_COUNTED)}


async def test_no_index_on_tokens_or_events_names_a_sealed_value(conn: asyncpg.Connection) -> None:
    """A re-seal is a heap-only update only while no index reads the sealed column (as
    a key, in an expression or in a predicate): an index that does would make every
    re-seal write an entry in every index of its table again."""
    naming = await conn.fetch(
        """
        SELECT indexrelid::regclass::text AS name FROM pg_index
         WHERE indrelid IN ('receiver.tokens'::regclass, 'receiver.events'::regclass)
           AND pg_get_indexdef(indexrelid) ~ '(token_sealed|body_sealed)'
        """
    )
    assert [r["name"] for r in naming] == []
    # Still checked by the statements that need it: the drop time stands for it.
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'receiver.events'::regclass "
            "AND pg_get_indexdef(indexrelid) ~ 'body_dropped_at IS NULL'"
        )
        == 5
    )


async def _updates(conn: asyncpg.Connection, table: str) -> tuple[int, int]:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
        "WHERE schemaname = 'receiver' AND relname = $1",
        table,
    )
    assert row is not None
    return row["n_tup_upd"], row["n_tup_hot_upd"]


async def test_keys_rotate_rewrites_the_heap_page_and_no_index(
    own_postgres: Any, aiohttp_client: Any, webhook_secret: str
) -> None:
    """`keys rotate` over tokens and bodies spread on several pages: every re-seal is a
    heap-only (HOT) update, by Postgres's own count (the command's backends report
    their counts when they exit), and each row stays on the page it was on. On a
    Postgres of its own: a transaction open anywhere on the server (another test's,
    in another database) may keep a backend from pruning what a batch left, and the
    next batch's rows would then move, as they would on a busy production server."""
    dsn, _control = own_postgres
    admin = await asyncpg.connect(dsn)
    await admin.execute("CREATE DATABASE hot")
    await admin.close()
    database_url = with_database(dsn, "hot")
    await migrations.apply(database_url)
    settings = config.load_settings(
        database_url=database_url,
        webhook_secrets=webhook_secret,
        token_keys="k1:" + base64.b64encode(os.urandom(32)).decode(),
        index_key=base64.b64encode(os.urandom(32)).decode(),
        prune_interval_seconds=0,
    )
    client = await aiohttp_client(app.create_app(settings))
    for _ in range(80):
        body = helpers.encode(helpers.onboarding())
        answer = await client.post(
            app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(webhook_secret, body)
        )
        assert answer.status == 200
    conn = await asyncpg.connect(database_url)
    try:

        async def settled() -> bool:  # the service's dispatcher done with their signals
            return not await conn.fetchval(
                "SELECT count(*) FROM receiver.signals WHERE status IN ('pending', 'in_flight')"
            )

        # A transaction open beside the rotation (the dispatcher's) keeps Postgres
        # from pruning the versions a batch leaves, and the next batch's rows move.
        await standins.eventually(settled, seconds=30)
        pages = "SELECT id::text, (ctid::text::point)[0] AS page FROM receiver.tokens"
        before = {r["id"]: r["page"] for r in await conn.fetch(pages)}
        assert len(set(before.values())) >= 2
        tokens_before = await _updates(conn, "tokens")
        events_before = await _updates(conn, "events")
        result = await asyncio.to_thread(
            processes.run, ["keys", "rotate"], operator_env(with_new_primary(settings))
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "re-encrypted 80 token(s) and 80 event(s)" in result.stdout

        async def reported() -> bool:
            tokens, events = await _updates(conn, "tokens"), await _updates(conn, "events")
            return tokens[0] - tokens_before[0] == 80 and events[0] - events_before[0] == 80

        await standins.eventually(reported, seconds=30)
        for table, (updated, hot) in (("tokens", tokens_before), ("events", events_before)):
            now_updated, now_hot = await _updates(conn, table)
            assert (table, now_hot - hot) == (table, now_updated - updated)
        assert {r["id"]: r["page"] for r in await conn.fetch(pages)} == before
    finally:
        await conn.close()


async def test_the_tallies_equal_a_count_of_the_values_after_every_kind_of_write(
    post: Post,
    settings: Settings,
    database: db.Database,
    conn: asyncpg.Connection,
) -> None:
    """Onboardings (one superseding another), a revocation, a quarantined delivery, a
    prune, an erasure, a rotation stopped after its first batch and one run to the
    end, hand-made UPDATE, DELETE and TRUNCATE: after each, the tallies say what a
    count of the values says, and a fold changes nothing."""

    async def agree() -> None:
        counted = await _counted(conn)
        assert await _tallied(database) == counted
        await database.fetchval("sealed_tallies_fold", db.TALLY_FOLD_CHUNK)
        assert await _tallied(database) == counted

    for client_id in ("cli_t1", "cli_t2", "cli_t3", "cli_t1"):
        assert (await post(helpers.onboarding(client_id))).status == 200
    await agree()
    assert (await post(helpers.revocation("cli_t2", None))).status == 200
    bad = helpers.onboarding("cli_t4")
    bad["data"]["bearer_token"] = 42  # invalid data: stored, quarantined
    assert (await post(bad)).status == 200
    await agree()
    key = await conn.fetchval("SELECT key FROM receiver.events WHERE status = 'quarantined'")
    await conn.execute(
        "UPDATE receiver.events SET received_at = now() - interval '90 days' "
        "WHERE client_id = 'cli_t3'"
    )
    await retention.prune(database, settings)
    await agree()
    sealer = vault.Sealer.from_settings(settings)
    await erasure.erase_client(database, settings, sealer, "cli_t1", audit.Actor("test"))
    await agree()

    class Stop(Exception):
        """A rotation killed after its first batch."""

    def stop(kind: str, total: int) -> None:
        raise Stop

    ring = vault.Sealer.from_settings(with_new_primary(settings)).keyring
    with pytest.raises(Stop):
        await rekey.rotate(database, ring, actor=OPS, progress=stop)
    await agree()
    await rekey.rotate(database, ring, actor=OPS)
    counted = await _counted(conn)
    assert {kid for (_, kid) in counted} == {"k2"}
    await agree()
    foreign = vault.Keyring([("k0", os.urandom(32))])
    token_id = await conn.fetchval("SELECT id::text FROM receiver.tokens WHERE status = 'active'")
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
        token_id,
        foreign.seal(b"tok_live_foreign0000000000", vault.token_associated_data(token_id)),
    )
    await agree()
    assert key is not None
    await conn.execute("DELETE FROM receiver.events WHERE key = $1", key)
    await agree()
    await conn.execute("TRUNCATE receiver.events, receiver.tokens CASCADE")
    assert await _tallied(database) == {}
    assert (await post(helpers.onboarding("cli_t5"))).status == 200
    await agree()


async def test_migration_0024_tallies_what_is_stored_and_mends_rows_from_before_the_checks(
    empty_database_url: str,
) -> None:
    """A database at 0023 with values under two keys and rows the baseline's NOT VALID
    checks let through (no value and no drop time; a value with a drop time): 0024
    counts every value into the tallies, gives the first its drop time, takes the drop
    time from the second (its value is there: retention and erasure must find it), and
    validates the checks."""
    await migrations.apply(empty_database_url, until="0023_sealed_key_id_only_where_sealed")
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute(
            """
            ALTER TABLE receiver.events DROP CONSTRAINT events_body_or_dropped;
            INSERT INTO receiver.events (key, type, status, is_test, body_sealed, body_dropped_at)
            VALUES ('evt_a', 'ping', 'ignored', false, '\\x01026b31aa', NULL),
                   ('evt_b', 'ping', 'ignored', false, '\\x01026b32bb', NULL),
                   ('evt_c', 'ping', 'ignored', false, '\\x01026b31cc', now()),
                   ('evt_d', 'ping', 'ignored', false, NULL, NULL);
            ALTER TABLE receiver.events ADD CONSTRAINT events_body_or_dropped
                CHECK (body_sealed IS NOT NULL OR body_dropped_at IS NOT NULL) NOT VALID;
            """
        )
        names = [m.name for m in migrations.available()]
        after = names[names.index("0023_sealed_key_id_only_where_sealed") + 1 :]
        assert await migrations.apply(empty_database_url) == after
        tallies = await conn.fetch(
            "SELECT kind, key_id, n FROM receiver.sealed_tallies ORDER BY 1, 2"
        )
        assert [tuple(r) for r in tallies] == [("events", "k1", 2), ("events", "k2", 1)]
        dropped = await conn.fetch(
            "SELECT key, body_dropped_at IS NOT NULL AS dropped FROM receiver.events ORDER BY key"
        )
        assert [tuple(r) for r in dropped] == [
            ("evt_a", False),
            ("evt_b", False),
            ("evt_c", False),
            ("evt_d", True),
        ]
        assert not await conn.fetchval(
            "SELECT bool_or(NOT convalidated) FROM pg_constraint "
            "WHERE conrelid IN ('receiver.events'::regclass, 'receiver.tokens'::regclass) "
            "AND conname ~ '(or|xor)_dropped'"
        )
    finally:
        await conn.close()


async def test_a_paced_rotation_waits_until_it_is_back_on_schedule() -> None:
    """`--rate`: after 50 values at 100 a second the run is 0.5 s in, whatever the
    machine (a lower bound: a slow machine only waits less); rate 0 never waits."""
    pace = rekey.Pace(100)
    started = time.monotonic()
    await pace.after(50)
    assert time.monotonic() - started >= 0.49
    unlimited = rekey.Pace(0)
    await unlimited.after(10**9)
    assert unlimited.done == 0


@pytest.mark.parametrize("rate", ["-1", "nan", "fast"])
def test_keys_rotate_refuses_a_rate_that_is_not_a_number_of_values(
    settings: Settings, rate: str
) -> None:
    """A rate below 0, NaN or a word: one line naming --rate and its rule, exit 2,
    nothing done; 0 (no limit) is a rate."""
    result = processes.run(["keys", "rotate", "--rate", rate], operator_env(settings))
    assert result.returncode == 2
    assert "--rate" in result.stderr
    assert "Traceback" not in result.stderr
    # The option's own check, not argparse's "unrecognized arguments".
    assert "argument --rate:" in result.stderr
    accepted = processes.run(["keys", "rotate", "--rate", "0", "--dry-run"], operator_env(settings))
    assert accepted.returncode == 0, accepted.stderr


async def test_a_value_that_fails_to_open_is_named_and_the_rest_is_rotated(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """One token's sealed bytes tampered with: `keys rotate` re-seals every other value,
    those after it on its page too, names the token (its id, never a value), says the
    old key must stay, and exits 1; the tampered value is left as it was."""
    for _ in range(6):
        assert (await post(helpers.onboarding())).status == 200
    row = await conn.fetchrow(
        "SELECT id::text AS id, token_sealed FROM receiver.tokens ORDER BY ctid LIMIT 1"
    )
    assert row is not None
    tampered = row["token_sealed"][:-1] + bytes([row["token_sealed"][-1] ^ 1])
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid", row["id"], tampered
    )
    result = await asyncio.to_thread(
        processes.run,
        ["keys", "rotate", "--batch-size", "1"],
        operator_env(with_new_primary(settings)),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "re-encrypted 5 token(s) and 6 event(s)" in result.stdout
    assert "1 token(s) failed to open (tampered, or not sealed for their row)" in result.stdout
    assert row["id"] in result.stdout
    assert "failed to open and were left under their old key" in result.stderr
    assert "held locked" not in result.stderr
    counted = await _counted(conn)
    assert counted == {("tokens", "k2"): 5, ("tokens", "k1"): 1, ("events", "k2"): 6}
    assert (
        await conn.fetchval(
            "SELECT token_sealed FROM receiver.tokens WHERE id = $1::uuid", row["id"]
        )
        == tampered
    )


async def test_a_rotation_stops_when_more_values_fail_to_open_than_tampering_explains(
    settings: Settings, conn: asyncpg.Connection
) -> None:
    """1,001 tokens whose sealed bytes name k1 but are not k1's: a key-material mistake,
    not tampering. `keys rotate` stops with one line that says so (no traceback, no
    sealed bytes), exit 1, and leaves those values as they were."""
    await conn.execute(
        """
        INSERT INTO receiver.events (key, type, status, is_test, body_dropped_at)
        VALUES ('evt_wrong_key', 'ping', 'processed', false, now());
        INSERT INTO receiver.tokens (id, client_id, environment, prefix, token_index,
                                     token_sealed, status, onboarding_completed_at,
                                     created_by_event)
        SELECT gen_random_uuid(), 'cli_w' || g, 'live', 'tok_live_w' || g,
               sha256(('w' || g)::bytea),
               '\\x01026b31'::bytea || sha256(('n' || g)::bytea) || sha256(g::text::bytea),
               'active', now(), 'evt_wrong_key'
          FROM generate_series(1, 1001) g;
        """
    )
    before = await _counted(conn)
    result = await asyncio.to_thread(
        processes.run, ["keys", "rotate"], operator_env(with_new_primary(settings))
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "more than 1,000 tokens failed to open" in result.stderr
    assert "Traceback" not in result.stderr
    assert await _counted(conn) == before == {("tokens", "k1"): 1001}

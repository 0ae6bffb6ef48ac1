"""Flat at scale (design §12, issue 33), pinned on small data: the hot statements read
their indexes (as a reused, generic plan too), the due listing comes in pages, and
erasure lets the client's deliveries through between its batches."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from receiver import config, db, vault
from receiver.config import Settings
from receiver.debitura import api, rotation
from receiver.lifecycle import audit, erasure
from tests import helpers
from tests.integration import standins
from tests.integration.conftest import Post, settings_values

CLIENTS = 5000

# Rows in the shapes the service writes, enough that a scan costs more than an index:
# 3 events per client over 120 days (a quarter holding a body, named but for one in
# ten), one active token per client, 10% with a revoked or superseded older one whose
# value is past retention.
_FILL = r"""
INSERT INTO receiver.events (key, type, status, client_id, is_test, received_at,
                             body_sealed, body_dropped_at, body_names)
SELECT 'evt_' || g,
       CASE WHEN g % 500 = 0 THEN 'client.merged'
            WHEN g % 3 = 0 THEN 'client.onboarding_completed' ELSE 'referral.created' END,
       'processed', 'cli_' || (g % $1), g % 2 = 1, now() - (g % 120) * interval '1 day',
       CASE WHEN g % 4 = 0 THEN '\x01026b31'::bytea || sha256(g::text::bytea) END,
       CASE WHEN g % 4 <> 0 THEN now() END,
       CASE WHEN g % 4 = 0 AND g % 40 <> 0
            THEN ARRAY[-7, 11, 13, g % $1, g]::bigint[] END
  FROM generate_series(1, 3 * $1) g;

INSERT INTO receiver.tokens (id, client_id, environment, prefix, token_index, token_sealed,
                             status, onboarding_completed_at, created_by_event,
                             revoked_at, superseded_at, expires_at)
SELECT gen_random_uuid(), 'cli_' || g, CASE WHEN g % 2 = 0 THEN 'live' ELSE 'test' END,
       'tok_live_' || lpad(g::text, 6, '0'), sha256(('index' || g)::bytea),
       '\x01026b31'::bytea || sha256(('token' || g)::bytea), 'active',
       now() - (g % 120) * interval '1 day', 'evt_' || (3 * g), NULL, NULL, NULL
  FROM generate_series(1, $1) g
UNION ALL
SELECT gen_random_uuid(), 'cli_' || g, CASE WHEN g % 2 = 0 THEN 'live' ELSE 'test' END,
       'tok_live_' || lpad(g::text, 6, '0'), sha256(('old' || g)::bytea),
       '\x01026b31'::bytea || sha256(('old' || g)::bytea),
       CASE WHEN g % 2 = 0 THEN 'revoked' ELSE 'superseded' END,
       now() - interval '150 days', 'evt_' || (3 * g),
       CASE WHEN g % 2 = 0 THEN now() - interval '40 days' END,
       CASE WHEN g % 2 = 1 THEN now() - interval '41 days' END,
       CASE WHEN g % 2 = 1 THEN now() - interval '40 days' END
  FROM generate_series(1, $1 / 10) g;
"""

_DAY = 86_400.0
# name -> (arguments, the index its plan must read)
HOT: dict[str, tuple[tuple[Any, ...], str]] = {
    "token_health": ((), "tokens_active_onboarded"),
    "tokens_due_rotation": (
        (timedelta(days=90), ["live", "test"], 500, datetime(1, 1, 1, tzinfo=UTC), "", ""),
        "tokens_due",
    ),
    "prune_counts": ((30 * _DAY, 30 * _DAY, 7 * _DAY), "events_body_"),
    "prune_event_bodies": ((30 * _DAY, 500), "events_body_"),
    "prune_token_values": ((30 * _DAY, 500), "tokens_revoked_value"),
    "erase_client_bodies": (("cli_42", 500), "events_client_body"),
    "erase_pending": (("cli_42", ["evt_x"]), "events_client_body"),
    "erase_bodies": (("cli_42", ["evt_x"]), "events_client_body"),
    "erase_named_bodies": ((4242, "cli_42"), "events_body_names"),
    "erase_unnamed_bodies": (("", "cli_42", 500), "events_body_unnamed"),
    "fill_body_names": ((["evt_40", "evt_80"], ["{1,2}", "{3}"]), "events_"),
    "token_inventory_of_client": (("cli_42", None, None, None, 100), "tokens_client_prefix"),
    "list_events_of_type": ((None, None, "client.merged", 50), "events_type_received"),
}
_WRITES = (
    "prune_event_bodies",
    "prune_token_values",
    "erase_client_bodies",
    "erase_bodies",
    "fill_body_names",
)


async def _filled(conn: asyncpg.Connection) -> None:
    await conn.execute(_FILL.replace("$1", str(CLIENTS)))
    await conn.execute("ANALYZE receiver.tokens")
    await conn.execute("ANALYZE receiver.events")


def _nodes(plan: Any) -> list[dict[str, Any]]:
    stack, found = [plan[0]["Plan"]], []
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.get("Plans", []))
    return found


@pytest.mark.parametrize("mode", ["auto", "force_generic_plan"])
async def test_hot_statements_read_their_indexes(conn: asyncpg.Connection, mode: str) -> None:
    """Each statement an operator path or the gauge refresh runs reads its index, with
    enable_seqscan untouched, after ANALYZE, as a fresh plan and as the generic plan a
    prepared statement may switch to: no sequential scan of tokens or events."""
    await _filled(conn)
    await conn.execute(f"SET plan_cache_mode = {mode}")
    wrong = {}
    for name, (args, index) in HOT.items():
        statement = await conn.prepare(db.QUERIES[name])
        if name not in _WRITES:
            for _ in range(6):  # past the five custom plans, where a generic one may stay
                await statement.fetch(*args)
        nodes = _nodes(await statement.explain(*args))
        scanned = {n.get("Relation Name") for n in nodes if "Seq Scan" in n["Node Type"]}
        used = {str(n.get("Index Name")) for n in nodes if "Index Name" in n}
        if scanned & {"tokens", "events"} or not any(u.startswith(index) for u in used):
            wrong[name] = (sorted(str(s) for s in scanned), sorted(used))
    assert not wrong


# keys rotate's statements -> the scan each must make of tokens or events (None: it
# reads neither table).
_ROTATION: dict[str, tuple[tuple[Any, ...], str | None]] = {
    "rotation_tokens_sweep": ((["k0", "k1"], list(range(8)), ["x"]), "Tid Range Scan"),
    "rotation_events_sweep": ((["k0", "k1"], list(range(8)), ["x"]), "Tid Range Scan"),
    "rotation_store_tokens": (([(0, 1), (3, 2)], [b"a", b"b"], [b"c", b"d"]), "Tid Scan"),
    "rotation_store_events": (([(0, 1), (3, 2)], [b"a", b"b"], [b"c", b"d"]), "Tid Scan"),
    "sealed_to_rotate_counts": (("k1",), None),
    "sealed_key_counts": ((), None),
}


@pytest.mark.parametrize("mode", ["auto", "force_generic_plan"])
async def test_rotation_reads_pages_and_counts_read_the_tallies(
    conn: asyncpg.Connection, mode: str
) -> None:
    """keys rotate claims row by row in the pages it is given (a TID range scan per
    page) and writes each back where it found it (a TID scan), never reading an index
    or scanning the table; what is left to rotate is read from the tallies, never from
    tokens or events. As a fresh plan and as a generic one."""
    await _filled(conn)
    await conn.execute(f"SET plan_cache_mode = {mode}")
    for name, (args, scan) in _ROTATION.items():
        statement = await conn.prepare(db.QUERIES[name])
        if not name.startswith("rotation_store"):
            for _ in range(6):
                await statement.fetch(*args)
        nodes = _nodes(await statement.explain(*args))
        kinds = {n["Node Type"] for n in nodes}
        tables = {n.get("Relation Name") for n in nodes} & {"tokens", "events"}
        if scan is None:
            assert not tables, (name, tables)
            continue
        assert scan in kinds, (name, kinds)
        assert "Seq Scan" not in kinds, (name, kinds)
        assert not any("Index" in k for k in kinds), (name, kinds)


def _due_settings(settings: Settings, base: str) -> Settings:
    return config.load_settings(
        **settings_values(settings),
        debitura_api_url=base,
        debitura_api_key="sk_live_due_listing_00000000",
        debitura_test_api_url=base,
        debitura_test_api_key="sk_test_due_listing_00000000",
        token_rotate_after_days=90,
    )


async def test_due_listing_comes_in_pages_and_reaches_every_due_token(
    settings: Settings, post: Post, database: db.Database
) -> None:
    """`tokens rotate --due` reads due tokens a page at a time: with pages of 3 and 8
    due tokens (of 10), every due one comes exactly once, oldest first, never more
    than a page at once; a limit stops it mid-page."""
    for n in range(10):
        age = timedelta(days=200 + n if n < 8 else 10)
        completed = (datetime.now(UTC) - age).isoformat().replace("+00:00", "Z")
        assert (
            await post(helpers.onboarding(f"cli_due_{n}", completed_at=completed))
        ).status == 200
    async with aiohttp.ClientSession() as session:
        due_settings = _due_settings(settings, "https://127.0.0.1:9")
        rotator = rotation.Rotator(
            database, due_settings, vault.Sealer.from_settings(due_settings),
            api.Api(session, due_settings),
        )  # fmt: skip
        pages = [page async for page in rotator.due_pages(page_size=3)]
        limited = [page async for page in rotator.due_pages(limit=4, page_size=3)]
    assert [len(p) for p in pages] == [3, 3, 2]
    listed = [row["client_id"] for page in pages for row in page]
    assert listed == [f"cli_due_{n}" for n in range(7, -1, -1)]
    assert [len(p) for p in limited] == [3, 1]


async def test_erasure_lets_the_clients_deliveries_through_between_batches(
    settings: Settings, post: Post, database: db.Database, conn: asyncpg.Connection
) -> None:
    """While a client with many stored bodies is erased, a delivery for that client is
    answered before the erasure ends (the lock is released between batches), and once
    it ends neither the delivered token nor any body of the client is left."""
    bodies = 20_000  # 40 batches of 500
    await conn.execute(
        r"""
        INSERT INTO receiver.events (key, type, status, client_id, is_test, body_sealed)
        SELECT 'evt_many_' || g, 'referral.created', 'ignored', 'cli_many', false,
               '\x01026b31'::bytea || sha256(g::text::bytea)
          FROM generate_series(1, $1) g
        """,
        bodies,
    )
    sealer = vault.Sealer.from_settings(settings)
    erasing = asyncio.create_task(
        erasure.erase_client(database, settings, sealer, "cli_many", audit.Actor("test"))
    )
    dropped = """
        SELECT count(*) FROM receiver.events
         WHERE key LIKE 'evt_many_%' AND body_sealed IS NULL
    """

    async def started() -> bool:
        return bool(await conn.fetchval(dropped))

    await standins.eventually(started, seconds=30)
    answer = await asyncio.wait_for(post(helpers.onboarding("cli_many")), timeout=30)
    assert answer.status == 200
    # Answered while bodies of the client were still waiting for their batch.
    assert await conn.fetchval(dropped) < bodies
    done = await erasing
    assert done.bodies >= bodies
    left = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM receiver.tokens
                 WHERE client_id = 'cli_many' AND token_sealed IS NOT NULL) AS tokens,
               (SELECT count(*) FROM receiver.events
                 WHERE client_id = 'cli_many' AND body_sealed IS NOT NULL) AS bodies
        """
    )
    assert left is not None
    assert dict(left) == {"tokens": 0, "bodies": 0}


# What the token gauges mean, counted from every token (the scan the tallies replace).
_COUNTED = """
SELECT environment, 'active' AS kind,
       CASE WHEN onboarding_completed_at > now() - interval '30 days' THEN 'under_30d'
            WHEN onboarding_completed_at > now() - interval '90 days' THEN '30d_to_90d'
            ELSE 'over_90d' END AS age,
       count(*) AS n
  FROM receiver.tokens WHERE status = 'active'
 GROUP BY 1, 2, 3
UNION ALL
SELECT t.environment, 'no_active', '', count(DISTINCT t.client_id)
  FROM receiver.tokens t
 WHERE NOT EXISTS (SELECT 1 FROM receiver.tokens a
                    WHERE a.client_id = t.client_id AND a.environment = t.environment
                      AND a.status = 'active')
 GROUP BY 1
"""


async def _gauged(conn: asyncpg.Connection) -> set[tuple[Any, ...]]:
    await conn.execute(db.QUERIES["token_tallies_fold"], db.TALLY_FOLD_CHUNK)
    rows = await conn.fetch(db.QUERIES["token_health"])
    return {tuple(r) for r in rows if r["kind"] in ("active", "no_active") and r["n"]}


async def test_token_gauges_agree_with_a_count_of_the_tokens(
    settings: Settings, post: Post, database: db.Database, conn: asyncpg.Connection
) -> None:
    """The token gauges, read from tallies the triggers keep, equal a count of every
    token after onboardings (a few days ago and months ago), a rotation, a
    revocation, an erasure and a hand-made DELETE; and a fold changes nothing."""
    now = datetime.now(UTC)
    for client_id, days in (("cli_g1", 100), ("cli_g2", 10), ("cli_g3", 40), ("cli_g4", 31)):
        completed = (now - timedelta(days=days)).isoformat().replace("+00:00", "Z")
        assert (await post(helpers.onboarding(client_id, completed_at=completed))).status == 200
    assert (await post(helpers.onboarding("cli_g1"))).status == 200  # the old one superseded
    revoked = helpers.revocation("cli_g2", None, revoked_at=now.isoformat())
    assert (await post(revoked)).status == 200
    sealer = vault.Sealer.from_settings(settings)
    await erasure.erase_client(database, settings, sealer, "cli_g3", audit.Actor("test"))
    counted = {tuple(r) for r in await conn.fetch(_COUNTED)}
    assert ("live", "no_active", "", 2) in counted  # cli_g2 and cli_g3
    assert await _gauged(conn) == counted
    assert await _gauged(conn) == counted  # folded twice: the same
    await conn.execute("DELETE FROM receiver.tokens WHERE client_id = 'cli_g2'")
    assert await _gauged(conn) == {tuple(r) for r in await conn.fetch(_COUNTED)}

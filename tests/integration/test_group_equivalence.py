"""The set-based group (record_events_v5) against its own row-by-row fallback.

Random scripts of deliveries over a few clients, both environments and a small pool
of tokens (so tokens come twice, revocations arrive before their onboardings, older
onboardings arrive late), with exact resends, id conflicts, ignored and quarantined
deliveries, revocations by prefixes of several lengths, cut into random groups.
Database A records each group as the receiver does (set-based when the group is
independent), database B row by row (`receiver.row_by_row = on`: each row a group of
one, seeing the one before it, as the lifecycle tests describe one delivery at a
time); the outcomes and everything stored must be the same.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from receiver import config, redaction, vault
from receiver.lifecycle import events, rows, store
from tests import conftest, helpers

CLIENTS = ("cli_a", "cli_b")
ENVIRONMENTS = ("live", "test")
TIMES = [datetime(2024, 1, 15, 10) + timedelta(hours=h) for h in range(0, 36, 6)]
# Both databases compare these columns (now() and generated ids differ between them).
_STATE = {
    "events": "SELECT key, envelope_id, type, status, client_id, is_test, body_hash,"
    " quarantine_reason, quarantine_detail, test_header, signature FROM receiver.events"
    " ORDER BY key",
    "tokens": "SELECT id, client_id, environment, prefix, token_index, status,"
    " onboarding_completed_at, superseded_at IS NULL AS never_superseded, expires_at,"
    " revoked_at, revoke_reason, created_by_event, changed_by_event FROM receiver.tokens"
    " ORDER BY id",
    "revocations": "SELECT * FROM receiver.revocations ORDER BY event_key",
    "signals": "SELECT client_id, environment, token_prefix, reason, event_key, status"
    " FROM receiver.signals ORDER BY event_key, reason",
}
_CLEAR = "TRUNCATE receiver.events, receiver.tokens, receiver.revocations, receiver.signals"


class Pair:
    """Two clones of the migrated schema and one event loop to drive them."""

    def __init__(self, runner: asyncio.Runner, a: asyncpg.Connection, b: asyncpg.Connection):
        self.runner, self.a, self.b = runner, a, b


@pytest.fixture(scope="module")
def pair(server_dsn: str, template_name: str) -> Iterator[Pair]:
    with (
        conftest.cloned_database(server_dsn, template_name, "receiver_group") as url_a,
        conftest.cloned_database(server_dsn, template_name, "receiver_rows") as url_b,
        asyncio.Runner() as runner,
    ):
        a = runner.run(asyncpg.connect(url_a))
        b = runner.run(asyncpg.connect(url_b, server_settings={"receiver.row_by_row": "on"}))
        try:
            yield Pair(runner, a, b)
        finally:
            runner.run(a.close())
            runner.run(b.close())


@pytest.fixture(scope="module")
def sealer() -> vault.Sealer:
    return vault.Sealer.from_settings(
        config.load_settings(
            database_url="postgresql://unused/unused",
            webhook_secrets=helpers.new_secret(),
            token_keys="k1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
            index_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        )
    )


@pytest.fixture(scope="module")
def tokens() -> dict[tuple[str, int], str]:
    """Three canary tokens per environment, the pool every script draws from: the
    second shares its first 13 characters with the first, the third its first 16, so
    revocation prefixes of 12 to 17 characters match one, two or three of them."""
    pool = {}
    for env in ENVIRONMENTS:
        first = helpers.canary_token(env)
        pool[(env, 0)] = first
        for i, shared in ((1, 13), (2, 16)):
            token = first[:shared] + helpers.canary_token(env)[shared:]
            helpers.CANARIES.add(token)
            pool[(env, i)] = token
    return pool


_env = st.sampled_from(ENVIRONMENTS)
_client = st.sampled_from(CLIENTS)
_time = st.integers(0, len(TIMES) - 1)
_prefix_length = st.sampled_from([12, 14, 15, 16, 17])
_step = st.one_of(
    st.tuples(st.just("onboard"), _client, _env, st.integers(0, 2), _time, st.booleans()),
    st.tuples(
        st.just("revoke"), _client, _env, st.none() | st.integers(0, 2), _time, _prefix_length
    ),
    st.tuples(st.just("resend"), st.integers(0, 100)),
    st.tuples(st.just("conflict"), st.integers(0, 100)),
    st.tuples(st.just("ignored")),
    st.tuples(st.just("invalid"), _client),
)


def _bodies(script: list[tuple[Any, ...]], tokens: dict[tuple[str, int], str]) -> list[bytes]:
    bodies: list[bytes] = []
    for n, step in enumerate(script):
        kind = step[0]
        if kind == "onboard":
            _, client, env, token, at, explicit_expiry = step
            document = helpers.onboarding(
                client, tokens[(env, token)], event_id=f"evt_{n}",
                completed_at=TIMES[at].isoformat(),
            )  # fmt: skip
            if explicit_expiry:
                expiry = TIMES[at] + timedelta(hours=2)
                document["data"]["old_token_expires_at"] = expiry.isoformat()
        elif kind == "revoke":
            _, client, env, token, at, *length = step
            # Without a length: the stored prefix's, as Debitura's example.
            cut = length[0] if length else redaction.PREFIX_LENGTH
            prefix = None if token is None else tokens[(env, token)][:cut]
            document = helpers.revocation(client, prefix, revoked_at=TIMES[at].isoformat())
            document["id"] = f"evt_{n}"
            document["data"]["environment_hint"] = env  # read as the delivery's, below
        elif kind in ("resend", "conflict") and bodies:
            earlier = bodies[step[1] % len(bodies)]
            if kind == "resend":
                bodies.append(earlier)
                continue
            document = json.loads(earlier)
            document["timestamp"] = "2030-01-01T00:00:00Z"  # same id, other content
        elif kind == "invalid":
            document = helpers.onboarding(step[1], "tok_live_short", event_id=f"evt_{n}")
        else:
            document = {"id": f"evt_{n}", "event": "client.profile_updated", "data": {}}
        bodies.append(helpers.encode(document))
    return bodies


def _rows(sealer: vault.Sealer, bodies: list[bytes]) -> list[rows.Row]:
    prepared = []
    for body in bodies:
        document = json.loads(body)
        is_test = document.get("data", {}).get("environment_hint") == "test" or (
            "tok_test_" in document.get("data", {}).get("bearer_token", "")
        )
        delivery = rows.Arrival(body=body, is_test=is_test, test_header=is_test, signature=None)
        prepared.append(rows.prepare(sealer, events.read(body, is_test=is_test), delivery))
    return prepared


async def _record(
    conn: asyncpg.Connection, sealer: vault.Sealer, group: list[rows.Row]
) -> list[Any]:
    # Through the lifecycle's entry point: a long prefix is checked in memory there.
    recorded = await store.record_rows(
        conn, sealer, group, channel="token_invalidation", http_delivery=True
    )
    return [tuple(r) for r in recorded]


async def _state(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in _STATE.items()}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    script=st.lists(_step, min_size=2, max_size=24),
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=24),
)
# The lifecycle's corner cases, every run, beside what hypothesis draws: an older
# onboarding arriving after a newer one; an id reused with other content; a
# revocation (by prefix, and without) before the onboarding it names; two of them,
# where the earlier one wins; a rotation with an explicit expiry; the same token
# delivered by two events.
@example(
    script=[
        ("revoke", "cli_a", "live", None, 5),
        ("revoke", "cli_a", "live", None, 3),
        ("onboard", "cli_a", "live", 0, 1, False),
    ],
    cuts=[1],
)
@example(
    script=[("onboard", "cli_a", "live", 0, 4, False), ("onboard", "cli_a", "live", 1, 1, False)],
    cuts=[1],
)
@example(script=[("onboard", "cli_a", "live", 0, 1, False), ("conflict", 0)], cuts=[1])
@example(
    script=[
        ("revoke", "cli_a", "live", 0, 2),
        ("onboard", "cli_a", "live", 0, 1, False),
        ("revoke", "cli_b", "test", None, 3),
        ("onboard", "cli_b", "test", 1, 2, False),
    ],
    cuts=[2],
)
@example(
    script=[
        ("onboard", "cli_a", "live", 0, 1, False),
        ("onboard", "cli_a", "live", 1, 2, True),
        ("onboard", "cli_b", "live", 1, 3, False),
    ],
    cuts=[1],
)
# Two supersessions in one group, each with its own expiry; revocations by prefixes
# shorter and longer than the stored one, before and after the tokens they name.
@example(
    script=[
        ("onboard", "cli_a", "live", 0, 0, False),
        ("onboard", "cli_a", "test", 0, 0, False),
        ("onboard", "cli_a", "live", 1, 2, False),
        ("onboard", "cli_a", "test", 1, 4, True),
    ],
    cuts=[2],
)
@example(
    script=[
        ("revoke", "cli_a", "live", 0, 1, 12),
        ("revoke", "cli_b", "live", 2, 1, 17),
        ("onboard", "cli_a", "live", 1, 0, False),
        ("onboard", "cli_b", "live", 0, 0, False),
        ("onboard", "cli_b", "test", 2, 0, False),
        ("onboard", "cli_a", "test", 2, 0, False),
        ("revoke", "cli_b", "test", 0, 3, 16),
        ("revoke", "cli_a", "test", 1, 3, 14),
    ],
    cuts=[2],
)
def test_set_based_groups_end_as_row_by_row_ones(
    pair: Pair,
    sealer: vault.Sealer,
    tokens: dict[tuple[str, int], str],
    script: list[tuple[Any, ...]],
    cuts: list[int],
) -> None:
    rows = _rows(sealer, _bodies(script, tokens))
    groups, start = [], 0
    for size in cuts * len(rows):
        if start >= len(rows):
            break
        groups.append(rows[start : start + size])
        start += size

    async def run() -> None:
        await pair.a.execute(_CLEAR)
        await pair.b.execute(_CLEAR)
        for group in groups:
            outcomes_a = await _record(pair.a, sealer, group)
            outcomes_b = await _record(pair.b, sealer, group)
            assert outcomes_a == outcomes_b, group
        state_a, state_b = await _state(pair.a), await _state(pair.b)
        for table in _STATE:
            assert state_a[table] == state_b[table], table

    pair.runner.run(run())


async def _group_calls(
    conn: asyncpg.Connection, sealer: vault.Sealer, group: list[rows.Row]
) -> int:
    """How many times recording `group` called apply_group_v2 (counted in the
    recording's own transaction, which is rolled back)."""
    # Counts not yet flushed to the shared statistics: read before and after.
    count = (
        "SELECT coalesce(sum(calls), 0)::integer FROM pg_stat_xact_user_functions"
        " WHERE funcname = 'apply_group_v2'"
    )
    async with conn.transaction():
        await conn.execute("SET LOCAL track_functions = 'pl'")
        before = await conn.fetchval(count)
        await _record(conn, sealer, group)
        raise _RollBack(await conn.fetchval(count) - before)


class _RollBack(Exception):
    def __init__(self, calls: int) -> None:
        self.calls = calls


def test_independent_groups_take_the_set_based_path(
    pair: Pair, sealer: vault.Sealer, tokens: dict[tuple[str, int], str]
) -> None:
    """The comparison above is worth something only if the two paths differ: as the
    receiver runs, a group with effects on different clients is applied in one call,
    while two onboardings of one client, or one key twice, go row by row (the attempt,
    then one call per row); with the fallback forced, every row is a call."""
    independent = [
        ("onboard", "cli_a", "live", 0, 1, False),
        ("onboard", "cli_a", "test", 1, 2, True),
        ("revoke", "cli_b", "live", None, 3),
        ("ignored",),
        ("invalid", "cli_b"),
    ]
    dependent = [
        ("onboard", "cli_a", "live", 0, 1, False),
        ("onboard", "cli_a", "live", 1, 2, False),
    ]
    resent = [("onboard", "cli_a", "live", 0, 1, False), ("resend", 0)]

    async def calls(conn: asyncpg.Connection, script: list[tuple[Any, ...]]) -> int:
        await conn.execute(_CLEAR)
        try:
            await _group_calls(conn, sealer, _rows(sealer, _bodies(script, tokens)))
        except _RollBack as done:
            return done.calls
        raise AssertionError("unreachable")

    assert pair.runner.run(calls(pair.a, independent)) == 1
    assert pair.runner.run(calls(pair.a, dependent)) == 3
    assert pair.runner.run(calls(pair.a, resent)) == 3
    assert pair.runner.run(calls(pair.b, independent)) == 5

"""A token's life, whatever order Debitura's webhooks arrive in (docs/design.md §3, 2 and 5)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from receiver import db, errors, vault
from receiver.admin import tokens
from receiver.lifecycle.audit import Actor
from tests import helpers
from tests.integration.conftest import Post

OPERATOR = Actor("test-operator", "tests")


async def states(conn: asyncpg.Connection, client_id: str) -> dict[str, str]:
    """prefix -> status as operators see it now (expired derived)."""
    rows = await conn.fetch(
        "SELECT prefix, status FROM receiver.token_inventory WHERE client_id = $1", client_id
    )
    return {r["prefix"]: r["status"] for r in rows}


def iso(moment: datetime) -> str:
    """An ISO timestamp as Debitura writes it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


NOW = datetime.now(UTC).replace(microsecond=0)


async def test_supersede_keeps_the_old_token_usable_for_the_grace_period(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A rotation makes the new token active; the old one is superseded until 24 h after."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_r", old, completed_at=iso(NOW - timedelta(days=2))))
    await post(helpers.onboarding("cli_r", new, completed_at=iso(NOW - timedelta(hours=1))))
    assert await states(conn, "cli_r") == {old[:15]: "superseded", new[:15]: "active"}
    expires = await conn.fetchval(
        "SELECT expires_at FROM receiver.tokens WHERE prefix = $1", old[:15]
    )
    assert expires == NOW - timedelta(hours=1) + timedelta(hours=24)


async def test_grace_period_ends_in_expired(post: Post, conn: asyncpg.Connection) -> None:
    """Once the grace period has passed, the superseded token reads as expired."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_e", old, completed_at=iso(NOW - timedelta(days=5))))
    await post(helpers.onboarding("cli_e", new, completed_at=iso(NOW - timedelta(days=2))))
    assert await states(conn, "cli_e") == {old[:15]: "expired", new[:15]: "active"}


async def test_explicit_old_token_expiry_is_honoured(post: Post, conn: asyncpg.Connection) -> None:
    """old_token_expires_at from the rotation flow sets the old token's end of grace."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_x", old, completed_at=iso(NOW - timedelta(days=1))))
    rotated = helpers.onboarding("cli_x", new, completed_at=iso(NOW - timedelta(minutes=5)))
    rotated["data"]["old_token_expires_at"] = iso(NOW - timedelta(minutes=1))
    await post(rotated)
    assert await states(conn, "cli_x") == {old[:15]: "expired", new[:15]: "active"}


async def test_same_token_from_another_event_changes_nothing(
    post: Post, conn: asyncpg.Connection
) -> None:
    """The same token delivered again under a new event id stays one row, still active."""
    token = helpers.canary_token()
    await post(helpers.onboarding("cli_d", token))
    again = await post(helpers.onboarding("cli_d", token))
    assert (await again.json())["status"] == "processed"
    assert await states(conn, "cli_d") == {token[:15]: "active"}
    assert await conn.fetchval("SELECT count(*) FROM receiver.signals") == 1


async def test_revoke_by_prefix_touches_only_that_token(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A revocation with a prefix revokes that token and leaves the client's others alone."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_p", old, completed_at="2024-01-01T00:00:00Z"))
    await post(helpers.onboarding("cli_p", new, completed_at="2024-02-01T00:00:00Z"))
    await post(helpers.revocation("cli_p", old[:15], revoked_at="2024-03-01T00:00:00Z"))
    result = await states(conn, "cli_p")
    assert result == {old[:15]: "revoked", new[:15]: "active"}


async def test_revoke_without_prefix_revokes_everything_issued_before(
    post: Post, conn: asyncpg.Connection
) -> None:
    """Without a prefix, every token issued before revoked_at is revoked."""
    a, b = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_n", a, completed_at="2024-01-01T00:00:00Z"))
    await post(helpers.onboarding("cli_n", b, completed_at="2024-02-01T00:00:00Z"))
    await post(helpers.revocation("cli_n", None, revoked_at="2024-03-01T00:00:00Z"))
    assert await states(conn, "cli_n") == {a[:15]: "revoked", b[:15]: "revoked"}


async def test_old_revocation_never_revokes_a_newer_token(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A prefix-less revocation from before a newer token's onboarding leaves it active."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_o", old, completed_at="2024-01-01T00:00:00Z"))
    await post(helpers.onboarding("cli_o", new, completed_at="2024-03-01T00:00:00Z"))
    await post(helpers.revocation("cli_o", None, revoked_at="2024-02-01T00:00:00Z"))
    assert await states(conn, "cli_o") == {old[:15]: "revoked", new[:15]: "active"}


async def test_revocation_before_onboarding_by_prefix(post: Post, conn: asyncpg.Connection) -> None:
    """Revoked first, onboarded second: the token is stored revoked and never active."""
    token = helpers.canary_token()
    await post(helpers.revocation("cli_b", token[:15], revoked_at="2024-01-01T00:00:00Z"))
    await post(helpers.onboarding("cli_b", token, completed_at="2024-02-01T00:00:00Z"))
    assert await states(conn, "cli_b") == {token[:15]: "revoked"}
    row = await conn.fetchrow("SELECT revoked_at, revoke_reason FROM receiver.tokens")
    assert row is not None
    assert row["revoke_reason"] == "client_request"


async def test_prefixless_revocation_before_onboarding_of_an_older_token(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A prefix-less revocation received first revokes a late token issued before it,
    and spares one issued after it."""
    before, after = helpers.canary_token(), helpers.canary_token()
    await post(helpers.revocation("cli_q", None, revoked_at="2024-02-01T00:00:00Z"))
    await post(helpers.onboarding("cli_q", before, completed_at="2024-01-01T00:00:00Z"))
    await post(helpers.onboarding("cli_q", after, completed_at="2024-03-01T00:00:00Z"))
    assert await states(conn, "cli_q") == {before[:15]: "revoked", after[:15]: "active"}


async def test_late_older_onboarding_does_not_displace_the_newer(
    post: Post, conn: asyncpg.Connection
) -> None:
    """Onboardings out of order: the newest token is active whichever arrived last."""
    old, new = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_l", new, completed_at="2024-03-01T00:00:00Z"))
    await post(helpers.onboarding("cli_l", old, completed_at="2024-01-01T00:00:00Z"))
    assert await states(conn, "cli_l") == {old[:15]: "expired", new[:15]: "active"}


async def test_revocation_for_an_unknown_client_is_recorded(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A revocation naming a client we never saw answers 200 and is kept."""
    response = await post(helpers.revocation("cli_never_seen", "tok_live_abc123"))
    assert (await response.json())["status"] == "processed"
    assert await conn.fetchval("SELECT count(*) FROM receiver.revocations") == 1


async def test_concurrent_onboardings_leave_exactly_one_active(
    post: Post, conn: asyncpg.Connection
) -> None:
    """Ten different tokens for one client at once: exactly one ends active."""
    moments = [iso(NOW - timedelta(minutes=m)) for m in range(10)]
    documents = [helpers.onboarding("cli_c", completed_at=m) for m in moments]
    responses = await asyncio.gather(*(post(d) for d in documents))
    assert [r.status for r in responses] == [200] * 10
    result = await states(conn, "cli_c")
    assert list(result.values()).count("active") == 1
    newest = documents[0]["data"]["bearer_token"][:15]
    assert result[newest] == "active"


async def test_inventory_lists_metadata_only(post: Post, database: db.Database) -> None:
    """The inventory has client, prefix, environment, status and dates, never the token."""
    token = helpers.canary_token("test")
    await post(helpers.onboarding("cli_inv", token))
    rows = await tokens.inventory(database, client_id="cli_inv")
    assert len(rows) == 1
    assert rows[0]["token_prefix"] == token[:15]
    assert rows[0]["environment"] == "test"
    assert rows[0]["status"] == "active"
    assert rows[0]["key_id"] == "k1"
    assert token not in repr(rows)
    assert await tokens.inventory(database, status="revoked") == []


async def test_tampered_or_moved_ciphertext_fails_to_open(
    post: Post, conn: asyncpg.Connection, database: db.Database, sealer: vault.Sealer
) -> None:
    """A ciphertext copied into another row, or altered in place, does not open."""
    a, b = helpers.canary_token(), helpers.canary_token()
    await post(helpers.onboarding("cli_m1", a))
    await post(helpers.onboarding("cli_m2", b))
    assert (await tokens.reveal(database, sealer, "cli_m1", OPERATOR))[1] == a
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = "
        "(SELECT token_sealed FROM receiver.tokens WHERE client_id = 'cli_m1') "
        "WHERE client_id = 'cli_m2'"
    )
    with pytest.raises(errors.SealBroken):
        await tokens.reveal(database, sealer, "cli_m2", OPERATOR)
    # One bit of the ciphertext flipped: always a change, whatever the byte was.
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = "
        "overlay(token_sealed placing set_byte(substring(token_sealed from 30 for 1), 0, "
        "get_byte(token_sealed, 29) # 1) from 30 for 1) WHERE client_id = 'cli_m1'"
    )
    with pytest.raises(errors.SealBroken):
        await tokens.reveal(database, sealer, "cli_m1", OPERATOR)


async def test_value_under_a_removed_key_names_the_key(post: Post, database: db.Database) -> None:
    """Opening a token whose key left RECEIVER_TOKEN_KEYS fails naming that key id."""
    await post(helpers.onboarding("cli_k"))
    other = vault.Sealer(keyring=vault.Keyring([("k9", os.urandom(32))]), index_key=os.urandom(32))
    with pytest.raises(errors.KeyNotFound, match="'k1'"):
        await tokens.reveal(database, other, "cli_k", OPERATOR)

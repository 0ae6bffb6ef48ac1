"""A revocation fails safe for any prefix length (DESIGN §2): signed deliveries over
HTTP, in both orders, against two tokens of one client that share their first 15
characters (the stored prefix) and differ at the 16th."""

from __future__ import annotations

import asyncpg
import pytest

from tests import helpers
from tests.integration.conftest import Post

EARLIER = "2024-01-10T10:00:00Z"
LATER = "2024-01-12T10:00:00Z"


def _twins() -> tuple[str, str]:
    """Two live canary tokens, the same for 15 characters, different at the 16th."""
    target = helpers.canary_token()
    twin = target[:15] + ("A" if target[15] != "A" else "B") + helpers.canary_token()[16:]
    helpers.CANARIES.add(twin)
    return target, twin


async def _status(conn: asyncpg.Connection, event_key: str) -> str:
    status: str = await conn.fetchval(
        "SELECT status FROM receiver.tokens WHERE created_by_event = $1", event_key
    )
    return status


async def _onboard(post: Post, client: str, token: str, completed_at: str) -> str:
    document = helpers.onboarding(client, token, completed_at=completed_at)
    response = await post(document)
    assert response.status == 200
    assert (await response.json())["status"] == "processed"
    key: str = document["id"]
    return key


async def _revoke(post: Post, client: str, prefix: str) -> str:
    response = await post(helpers.revocation(client, prefix))
    assert response.status == 200
    assert (await response.json())["status"] == "processed"
    return response.headers["X-Receiver-Tokens-Revoked"]


# (prefix length, whether the twin, which shares 15 characters, is revoked too)
LENGTHS = [(14, True), (15, True), (16, False), (17, False)]


@pytest.mark.parametrize(("length", "twin_revoked"), LENGTHS)
async def test_a_prefix_of_any_length_revokes_what_starts_with_it(
    post: Post, conn: asyncpg.Connection, length: int, twin_revoked: bool
) -> None:
    """Onboarded first, revoked second: a prefix of 14 or 15 characters revokes both
    tokens it names (unsure means revoke), one of 16 or 17 only the token it starts
    (checked against the token itself); the answer counts them and the cache is
    signalled."""
    target, twin = _twins()
    twin_key = await _onboard(post, "cli_len", twin, EARLIER)
    target_key = await _onboard(post, "cli_len", target, LATER)
    revoked = await _revoke(post, "cli_len", target[:length])
    assert revoked == ("2" if twin_revoked else "1")
    assert await _status(conn, target_key) == "revoked"
    assert await _status(conn, twin_key) == ("revoked" if twin_revoked else "superseded")
    signals = await conn.fetch(
        "SELECT token_prefix FROM receiver.signals WHERE reason = 'token_revoked'"
    )
    assert [s["token_prefix"] for s in signals] == [target[:length]]


@pytest.mark.parametrize(("length", "twin_revoked"), LENGTHS)
async def test_a_remembered_prefix_of_any_length_revokes_a_later_onboarding(
    post: Post, conn: asyncpg.Connection, length: int, twin_revoked: bool
) -> None:
    """Revoked first, onboarded second (order does not matter, guarantee 5): the
    revocation matches nothing yet, is remembered and still signals; the onboardings
    that follow end as if they had come first."""
    target, twin = _twins()
    assert await _revoke(post, "cli_mem", target[:length]) == "0"
    assert await conn.fetchval("SELECT count(*) FROM receiver.signals") == 1
    twin_key = await _onboard(post, "cli_mem", twin, EARLIER)
    target_key = await _onboard(post, "cli_mem", target, LATER)
    assert await _status(conn, target_key) == "revoked"
    # Not revoked, the twin stays the active token: the revoked one never displaced it.
    assert await _status(conn, twin_key) == ("revoked" if twin_revoked else "active")


async def test_a_short_prefix_revokes_every_token_that_starts_with_it_in_its_environment(
    post: Post, conn: asyncpg.Connection
) -> None:
    """A 12-character prefix (the shortest accepted) revokes each of the client's live
    tokens that start with it, and neither a live token that does not nor a test token
    (its environment is the prefix's)."""
    first = helpers.canary_token()
    second = first[:12] + helpers.canary_token()[12:]
    other = first[:9] + ("A" if first[9] != "A" else "B") + helpers.canary_token()[10:]
    test = "tok_test_" + first[9:]
    helpers.CANARIES.update({second, other, test})
    keys = [
        await _onboard(post, "cli_short", token, at)
        for token, at in ((first, EARLIER), (second, LATER), (other, "2024-01-13T10:00:00Z"))
    ]
    test_key = await _onboard(post, "cli_short", test, LATER)
    assert await _revoke(post, "cli_short", first[:12]) == "2"
    assert [await _status(conn, key) for key in keys] == ["revoked", "revoked", "active"]
    assert await _status(conn, test_key) == "active"


# Up to the whole token (a canary token is 49 characters): design §2, "a prefix as long
# as a whole token is a prefix like any other: it is applied, never quarantined".
LONG_LENGTHS = [12, 15, 20, 21, 30, 40, 49]


@pytest.mark.parametrize("order", ["onboarding first", "revocation first"])
@pytest.mark.parametrize("length", LONG_LENGTHS)
async def test_a_prefix_up_to_the_whole_token_is_applied_and_never_shown(
    post: Post, conn: asyncpg.Connection, length: int, order: str
) -> None:
    """A token.revoked whose prefix has 12 to all 49 characters of the token revokes it
    in either order, is never quarantined, and neither the answer nor any stored copy
    (redacted body, revocation, signal) holds more than the public 15 characters."""
    token = helpers.canary_token()
    client = f"cli_long_{length}"
    revocation = helpers.revocation(client, token[:length])
    answers = []
    if order == "revocation first":
        answers.append(await post(revocation))
    onboarding_key = await _onboard(post, client, token, EARLIER)
    if order == "onboarding first":
        answers.append(await post(revocation))
    (answer,) = answers
    text = await answer.text()
    assert answer.status == 200
    assert (await answer.json())["status"] == "processed", text
    assert await _status(conn, onboarding_key) == "revoked"
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE status <> 'processed'") == 0
    )
    hidden = token[:16]  # what follows the public prefix
    stored = await conn.fetchval(
        "SELECT string_agg(coalesce(body_redacted::text, ''), ' ') FROM receiver.events"
    )
    copies = await conn.fetchval(
        "SELECT concat((SELECT string_agg(token_prefix, ' ') FROM receiver.revocations),"
        " ' ', (SELECT string_agg(coalesce(token_prefix, ''), ' ') FROM receiver.signals))"
    )
    for where in (text, stored):
        assert hidden not in where
    # Up to 20 characters a prefix is no whole token and is kept as given, beyond that
    # only its public 15 characters are.
    if length >= 21:
        assert hidden not in copies

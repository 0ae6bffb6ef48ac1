"""`id` is the idempotency key within its environment (DESIGN §2): a test delivery and
a live delivery with the same `id` (or, without one, the same body) are two events,
and neither shadows, blocks or quarantines the other; duplicates within one
environment still deduplicate; operators find a test delivery by what they type.
Signed deliveries over real HTTP, a real Postgres."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import asyncpg
import pytest

from receiver import db, vault
from receiver.admin import inbox
from receiver.config import Settings
from receiver.lifecycle import audit
from receiver.service import app
from tests import helpers
from tests.integration.conftest import Client


async def _send(client: Client, secret: str, document: Any, **headers: str) -> dict[str, Any]:
    body = document if isinstance(document, bytes) else helpers.encode(document)
    response = await client.post(
        app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(secret, body, **headers)
    )
    assert response.status == 200
    answer: dict[str, Any] = await response.json()
    return answer


async def _status(conn: asyncpg.Connection, token_prefix: str, environment: str) -> str:
    status: str = await conn.fetchval(
        "SELECT status FROM receiver.tokens WHERE prefix = $1 AND environment = $2",
        token_prefix,
        environment,
    )
    return status


def _other_event(event_id: str | None) -> dict[str, Any]:
    document: dict[str, Any] = {"specVersion": "1.0", "event": "something.else", "data": {}}
    if event_id is not None:
        document["id"] = event_id
    return document


@pytest.mark.parametrize("how", ["test secret", "header"])
async def test_a_test_delivery_cannot_block_a_live_revocation_with_its_id(
    two_worlds: Client, webhook_secret: str, test_secret: str, conn: asyncpg.Connection, how: str
) -> None:
    """A test delivery (by test secret or X-Debitura-Test) that takes a live event's id
    first is ignored in the test world; Debitura's live token.revoked with that id is
    then applied (processed, the live token revoked), not quarantined id_conflict."""
    secret, headers = (test_secret, {}) if how == "test secret" else (webhook_secret, {})
    if how == "header":
        headers = {"X-Debitura-Test": "true"}
    token = helpers.canary_token("live")
    onboarding = helpers.onboarding("cli_ns", token)
    assert (await _send(two_worlds, webhook_secret, onboarding))["status"] == "processed"
    revocation = helpers.revocation("cli_ns", token[:15])
    squatter = _other_event(revocation["id"])
    assert (await _send(two_worlds, secret, squatter, **headers))["status"] == "ignored"
    answer = await _send(two_worlds, webhook_secret, revocation)
    assert answer == {"status": "processed", "event_id": revocation["id"]}
    assert await _status(conn, token[:15], "live") == "revoked"
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE status = 'quarantined'")
        == 0
    )


async def test_a_test_delivery_cannot_block_a_live_onboarding_with_its_id(
    two_worlds: Client, webhook_secret: str, test_secret: str, conn: asyncpg.Connection
) -> None:
    """A live onboarding whose id a test delivery used first stores its token active."""
    token = helpers.canary_token("live")
    onboarding = helpers.onboarding("cli_ns", token)
    assert (await _send(two_worlds, test_secret, _other_event(onboarding["id"])))[
        "status"
    ] == "ignored"
    assert (await _send(two_worlds, webhook_secret, onboarding))["status"] == "processed"
    assert await _status(conn, token[:15], "live") == "active"


async def test_a_live_delivery_does_not_shadow_a_test_one_with_its_id(
    two_worlds: Client, webhook_secret: str, test_secret: str, conn: asyncpg.Connection
) -> None:
    """The other way round: a test onboarding with the id of a stored live event is its
    own event (processed, its test token active), and the live event is untouched."""
    live = helpers.canary_token("live")
    document = helpers.onboarding("cli_ns", live)
    assert (await _send(two_worlds, webhook_secret, document))["status"] == "processed"
    test = helpers.canary_token("test")
    test_document = helpers.onboarding("cli_ns", test)
    test_document["id"] = document["id"]
    answer = await _send(two_worlds, test_secret, test_document)
    assert answer == {"status": "processed", "event_id": document["id"]}
    assert await _status(conn, test[:15], "test") == "active"
    assert await _status(conn, live[:15], "live") == "active"
    # Each world deduplicates on its own.
    assert (await _send(two_worlds, test_secret, test_document))["status"] == "duplicate"
    assert (await _send(two_worlds, webhook_secret, document))["status"] == "duplicate"


async def test_an_id_less_body_is_keyed_on_its_hash_per_environment(
    two_worlds: Client, webhook_secret: str, test_secret: str
) -> None:
    """Without an id the key is the body's SHA-256, per environment: the same bytes
    test-signed twice are one event, and live-signed they are another (not a
    duplicate of the test one)."""
    body = helpers.encode(_other_event(None) | {"nonce": uuid.uuid4().hex})
    assert (await _send(two_worlds, test_secret, body))["status"] == "ignored"
    assert (await _send(two_worlds, test_secret, body))["status"] == "duplicate"
    assert (await _send(two_worlds, webhook_secret, body))["status"] == "ignored"
    assert (await _send(two_worlds, webhook_secret, body))["status"] == "duplicate"


async def test_operators_find_a_test_delivery_by_the_id_they_type(
    two_worlds: Client,
    two_world_settings: Settings,
    test_secret: str,
    database: db.Database,
) -> None:
    """`events show`, `reprocess` and `dismiss` find a quarantined test delivery by its
    id, or without one by its body key (`sha256:…`), as an operator types them."""
    keyring = vault.Sealer.from_settings(two_world_settings).keyring
    broken = helpers.revocation("cli_ns", None)
    broken["data"]["revoked_at"] = "not a date"
    assert (await _send(two_worlds, test_secret, broken))["status"] == "quarantined"
    shown = await inbox.show(database, keyring, broken["id"])
    assert [(row["test"], row["status"]) for row in shown] == [(True, "quarantined")]
    actor = audit.Actor.of("tester", "namespaces")
    (dismissed,) = await inbox.dismiss(database, actor, [broken["id"]])
    assert (dismissed.outcome, dismissed.quarantine_reason) == ("dismissed", "invalid_data")

    idless = helpers.revocation("cli_ns", None)
    del idless["id"]
    idless["data"]["revoked_at"] = "not a date"
    body = helpers.encode(idless)
    assert (await _send(two_worlds, test_secret, body))["status"] == "quarantined"
    body_key = "sha256:" + hashlib.sha256(body).hexdigest()
    assert len(await inbox.show(database, keyring, body_key)) == 1
    (result,) = await inbox.reprocess(database, two_world_settings, [body_key], actor)
    assert result.outcome == "quarantined"  # still invalid: found, applied again, kept


async def test_a_live_id_that_looks_like_a_test_key_shadows_no_test_delivery(
    two_worlds: Client, webhook_secret: str, test_secret: str, conn: asyncpg.Connection
) -> None:
    """A live delivery whose id reads like a test delivery's stored key (`test:evt_x`,
    `test/evt_x` is no valid id) and a test delivery `evt_x`, in either order: two
    events, neither a duplicate nor an id conflict of the other."""
    for first, second in (("live", "test"), ("test", "live")):
        name = f"evt_{uuid.uuid4().hex[:8]}"
        live = _other_event(f"test:{name}")
        test = _other_event(name)
        sends = {"live": (webhook_secret, live), "test": (test_secret, test)}
        for world in (first, second):
            secret, document = sends[world]
            assert (await _send(two_worlds, secret, document))["status"] == "ignored", world
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE status = 'quarantined'")
        == 0
    )

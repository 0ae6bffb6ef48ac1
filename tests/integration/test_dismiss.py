"""`receiver events dismiss` (README: Quarantined deliveries): a quarantined delivery that will
never apply is closed, audited, leaves the open-quarantine gauge, and is settled for
retention. Real HTTP on loopback, a real Postgres, the real command."""

from __future__ import annotations

import json

import asyncpg

from receiver.config import Settings
from tests import helpers
from tests.integration.conftest import Client, Post, operator_env
from tests.integration.processes import run


async def _quarantine_one(post: Post) -> str:
    document = helpers.onboarding("cli_dismiss")
    document["data"]["onboarding_completed_at"] = "yesterday"  # invalid_data
    answer = await (await post(document)).json()
    assert answer["status"] == "quarantined"
    return str(answer["event_id"])


async def _open_gauge(client: Client) -> float:
    text = await (await client.get("/metrics")).text()
    (line,) = [x for x in text.splitlines() if x.startswith("receiver_events_quarantined_open ")]
    return float(line.split()[1])


async def test_dismiss_closes_audits_and_leaves_the_gauge(
    client: Client, post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """`events dismiss KEY --reason`: status dismissed, one audit row with the reason,
    the open-quarantine gauge back to 0."""
    key = await _quarantine_one(post)
    assert await _open_gauge(client) == 1
    result = run(["events", "dismiss", key, "--reason", "sender bug #42"], operator_env(settings))
    assert result.returncode == 0, result.stderr
    assert await conn.fetchval("SELECT status FROM receiver.events WHERE key = $1", key) == (
        "dismissed"
    )
    rows = await conn.fetch("SELECT action, reason, event_key FROM receiver.audit")
    assert [dict(r) for r in rows] == [
        {"action": "events_dismiss", "reason": "sender bug #42", "event_key": key}
    ]
    assert await _open_gauge(client) == 0
    listed = run(["events", "list", "--status", "dismissed", "--json"], operator_env(settings))
    assert key in listed.stdout


async def test_dismissing_what_is_not_quarantined_exits_1(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """A key that is unknown or not quarantined is said and exits 1; nothing audited."""
    processed = helpers.onboarding()
    assert (await (await post(processed)).json())["status"] == "processed"
    said = {
        processed["id"]: "not quarantined (status processed): left as it is",
        "evt_never_received": "unknown: no stored delivery has this key",
    }
    for key, line in said.items():
        result = run(["events", "dismiss", key, "--reason", "x"], operator_env(settings))
        assert result.returncode == 1
        assert f"{key}: {line}" in result.stdout
    assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 0


async def test_dismissing_twice_is_not_an_error(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """A second `events dismiss` of the same key (a retried script) says "already
    dismissed" and exits 0, with no second audit row; `--json` says each outcome."""
    key = await _quarantine_one(post)
    env = operator_env(settings)
    assert run(["events", "dismiss", key, "--reason", "first"], env).returncode == 0
    again = run(["events", "dismiss", key, "--reason", "again", "--json"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {
        "key": key,
        "outcome": "already_dismissed",
        "quarantine_reason": None,
        "status": "dismissed",
        "ok": True,
    }
    assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 1


async def test_retention_treats_a_dismissed_delivery_as_settled(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """`prune` drops an old dismissed delivery's body, while an old open quarantine's
    body stays for the operator."""
    dismissed = await _quarantine_one(post)
    still_open = await _quarantine_one(post)
    env = operator_env(settings)
    assert run(["events", "dismiss", dismissed, "--reason", "won't fix"], env).returncode == 0
    await conn.execute("UPDATE receiver.events SET received_at = now() - interval '400 days'")
    assert run(["prune"], env).returncode == 0
    kept = await conn.fetch("SELECT key, body_sealed IS NOT NULL AS kept FROM receiver.events")
    assert {r["key"]: r["kept"] for r in kept} == {dismissed: False, still_open: True}

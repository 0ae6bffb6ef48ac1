"""Hostile review of `keys rotate` and values that fail to open (5dbec39)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from receiver import db, vault
from receiver.admin import rekey
from receiver.config import Settings
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, operator_env
from tests.integration.test_reseal_in_place import _counted
from tests.integration.test_rotation import OPS, with_new_primary


async def test_a_healthy_value_at_the_place_a_broken_one_left_is_rotated(
    post: Post,
    settings: Settings,
    database: db.Database,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken token updated after the rotation named it (the service validating it)
    moves; the place it left is free for the next version written on the page, here a
    healthy token sealed under the old key by a replica that lacks the new primary key.
    The run must take that token (the next sweep is for values sealed meanwhile), and
    name the broken token once."""
    for _ in range(4):
        assert (await post(helpers.onboarding())).status == 200
    rows = await conn.fetch(
        "SELECT id::text AS id, token_sealed FROM receiver.tokens ORDER BY ctid"
    )
    broken_id, healthy_id = rows[0]["id"], rows[1]["id"]
    sealed = rows[0]["token_sealed"]
    # Tampered: a heap-only version (no index names it), last on the page.
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
        broken_id,
        sealed[:-1] + bytes([sealed[-1] ^ 1]),
    )
    broken_at = await conn.fetchval(
        "SELECT ctid FROM receiver.tokens WHERE id = $1::uuid", broken_id
    )
    old_ring = vault.Sealer.from_settings(settings).keyring
    ring = vault.Sealer.from_settings(with_new_primary(settings)).keyring
    plaintext = old_ring.open(rows[1]["token_sealed"], vault.token_associated_data(healthy_id))
    real_batch = rekey._batch
    done = False
    places: list[Any] = []

    async def batch(*args: Any, **kwargs: Any) -> Any:
        nonlocal done
        result = await real_batch(*args, **kwargs)
        report = args[6]
        if not done and report.broken["tokens"]:
            done = True
            places.append(broken_at)
            # The service validates the broken token (a heap-only update: it moves) ...
            await conn.execute(
                "UPDATE receiver.tokens SET validated_at = now() WHERE id = $1::uuid", broken_id
            )
            await conn.execute("VACUUM receiver.tokens")
            # ... and a replica without the new primary key seals a value under k1.
            await conn.execute(
                "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
                healthy_id,
                old_ring.seal(plaintext, vault.token_associated_data(healthy_id)),
            )
            at = await conn.fetchval(
                "SELECT ctid FROM receiver.tokens WHERE id = $1::uuid", healthy_id
            )
            places.append(at)
        return result

    monkeypatch.setattr(rekey, "_batch", batch)
    report = await rekey.rotate(database, ring, actor=OPS)
    assert done
    # The healthy token's new version took the place the broken one left.
    assert places[0] == places[1], places
    assert await _counted(conn) == {("tokens", "k2"): 3, ("tokens", "k1"): 1, ("events", "k2"): 4}
    assert report.broken_names() == {"tokens": [broken_id]}


async def test_many_kinds_of_broken_values_on_one_page(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """Two tokens' values swapped, one of an unknown version, one truncated, one event
    body tampered: the rest is re-sealed, each broken one named, --json stays JSON,
    exit 1, and no sealed bytes (nor any part of one) reach stdout or stderr."""
    for _ in range(8):
        assert (await post(helpers.onboarding())).status == 200
    rows = await conn.fetch(
        "SELECT id::text AS id, token_sealed FROM receiver.tokens ORDER BY ctid"
    )
    a, b, c, d = (rows[i] for i in range(4))
    await conn.execute(
        "UPDATE receiver.tokens t SET token_sealed = v.s FROM (VALUES ($1::uuid, $2::bytea), "
        "($3::uuid, $4::bytea), ($5::uuid, $6::bytea), ($7::uuid, $8::bytea)) AS v (id, s) "
        "WHERE t.id = v.id",
        a["id"],
        b["token_sealed"],
        b["id"],
        a["token_sealed"],
        c["id"],
        b"\x02" + c["token_sealed"][1:],
        d["id"],
        d["token_sealed"][:-17],
    )
    ev = await conn.fetchrow("SELECT key, body_sealed FROM receiver.events ORDER BY ctid LIMIT 1")
    assert ev is not None
    await conn.execute(
        "UPDATE receiver.events SET body_sealed = $2 WHERE key = $1",
        ev["key"],
        ev["body_sealed"][:-1] + bytes([ev["body_sealed"][-1] ^ 1]),
    )
    result = await asyncio.to_thread(
        processes.run,
        ["keys", "rotate", "--json", "--batch-size", "3"],
        operator_env(with_new_primary(settings)),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    out = json.loads(result.stdout)
    assert out["rotated"] == {"tokens": 4, "events": 7}
    assert out["broken"] == {
        "tokens": sorted(r["id"] for r in (a, b, c, d)),
        "events": [ev["key"]],
    }
    everything = result.stdout + result.stderr
    for r in rows:
        s = r["token_sealed"]
        for piece in (s.hex(), s[-16:].hex(), str(s)):
            assert piece not in everything


async def test_a_malformed_key_id_length_puts_no_sealed_bytes_in_the_output(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """A token whose key id length byte was tampered with (k1's two bytes become 14):
    the key id its bytes name runs into the nonce (made recognisable here). Neither the
    dry run, nor the run, nor its --json may print the nonce (sealed bytes) as a key id."""
    for _ in range(2):
        assert (await post(helpers.onboarding())).status == 200
    row = await conn.fetchrow("SELECT id::text AS id, token_sealed FROM receiver.tokens LIMIT 1")
    assert row is not None
    sealed = row["token_sealed"]
    await conn.execute(
        "UPDATE receiver.tokens SET token_sealed = $2 WHERE id = $1::uuid",
        row["id"],
        sealed[:1] + bytes([14]) + sealed[2:4] + b"\xffNONCEBYTE1" + sealed[16:],
    )
    named = await conn.fetchval(
        "SELECT receiver.sealed_key_id(token_sealed) FROM receiver.tokens WHERE id = $1::uuid",
        row["id"],
    )
    assert named.startswith("k1\\377NONCE")
    outputs = []
    for extra in (["--dry-run"], ["--dry-run", "--json"], [], ["--json"]):
        result = await asyncio.to_thread(
            processes.run, ["keys", "rotate", *extra], operator_env(with_new_primary(settings))
        )
        assert result.returncode == 1, result.stdout + result.stderr
        outputs.append(result.stdout + result.stderr)
    for everything in outputs:
        assert "NONCEBYTE1" not in everything, everything

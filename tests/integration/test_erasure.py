"""Erasure against odd encodings and lost keys, on a real Postgres and the real CLI:
a body that names the client is found by what it says, not by its bytes, and what an
erasure empties is under no key afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pydantic import SecretBytes

from receiver import db, vault
from receiver.config import Settings
from receiver.lifecycle import erasure, naming
from receiver.service import app
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import ROW_LOCK_WAITS, Post, client_lock, operator_env
from tests.integration.standins import eventually

UNNAMED = (
    "SELECT count(*) FROM receiver.events WHERE body_sealed IS NOT NULL AND body_names IS NULL"
)


async def cli(settings: Settings, *args: str) -> Any:
    """Run one `receiver` command as an operator would, against the test database."""
    return await asyncio.to_thread(processes.run, list(args), operator_env(settings), 60)


def hostile_bodies(client_id: str, tokens: list[str]) -> list[bytes]:
    """Four bodies that name `client_id` and carry one of `tokens` each, as a hostile
    sender stores them: UTF-16, the id escaped in a NaN body, the id at the top level, and
    the id nested away from `data.client_id`."""
    escaped = client_id.replace("_", "\\u005f")
    return [
        json.dumps(helpers.onboarding(client_id, tokens[0])).encode("utf-16"),
        (
            '{"event": "client.onboarding_completed", "data": {"client_id": "'
            + escaped
            + '", "bearer_token": "'
            + tokens[1]
            + '", "score": NaN}}'
        ).encode(),
        helpers.encode(
            {"event": "client.onboarding_completed", "client_id": client_id, "token": tokens[2]}
        ),
        helpers.encode(
            {
                "id": f"evt_{os.urandom(6).hex()}",
                "event": "partner.note",
                "data": {"client": {"ids": [client_id]}, "copy": {"bearer": tokens[3]}},
            }
        ),
    ]


async def bodies_holding(
    conn: asyncpg.Connection, keyring: vault.Keyring, tokens: list[str]
) -> int:
    """How many stored bodies still hold one of `tokens`, read as UTF-8 or UTF-16."""
    held = 0
    for row in await conn.fetch(
        "SELECT body_hash, body_sealed FROM receiver.events WHERE body_sealed IS NOT NULL"
    ):
        raw = keyring.open(
            row["body_sealed"], vault.event_associated_data("sha256:" + row["body_hash"].hex())
        )
        text = raw.decode("utf-8", "replace") + raw.decode("utf-16", "replace")
        held += any(token in text for token in tokens)
    return held


@pytest.mark.parametrize("names", ["kept at intake", "not known yet"])
async def test_erase_finds_the_client_however_its_bodies_are_encoded(
    post: Post, conn: asyncpg.Connection, settings: Settings, names: str
) -> None:
    """`clients erase` drops every stored body that names the client: UTF-16, an
    escaped id in a NaN body, the id at the top level or nested, as well as its own
    processed delivery; a body naming `cli_gdpr0` and another client's stay. Found
    through the names intake keeps of each body, or, for bodies stored before names
    were kept, by opening them, whose names the erasure then fills in."""
    tokens = [helpers.canary_token() for _ in range(5)]
    await post(helpers.onboarding("cli_gdpr", tokens[4]))
    for body in hostile_bodies("cli_gdpr", tokens):
        assert (await (await post(body)).json())["status"] == "quarantined"
    await post(helpers.onboarding("cli_gdpr0"))
    await post(helpers.onboarding("cli_other"))
    keyring = vault.Sealer.from_settings(settings).keyring
    assert await bodies_holding(conn, keyring, tokens) == 5
    assert await conn.fetchval(UNNAMED) == 0
    if names == "not known yet":
        await conn.execute("UPDATE receiver.events SET body_names = NULL")

    erased = await cli(settings, "clients", "erase", "cli_gdpr", "--confirm", "--json")
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["bodies"] == 5
    assert await bodies_holding(conn, keyring, tokens) == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE body_sealed IS NOT NULL")
        == 2
    )
    assert await conn.fetchval(UNNAMED) == 0  # the two left are named now
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM receiver.events WHERE body_sealed IS NULL"
            " AND body_names IS NOT NULL"
        )
        == 0
    )
    again = await cli(settings, "clients", "erase", "cli_gdpr", "--confirm")
    assert again.returncode == 0, again.stderr
    assert "nothing left to erase" in again.stdout


@contextlib.asynccontextmanager
async def erasing_behind(
    conn: asyncpg.Connection, database_url: str, settings: Settings, client: str, key: str
) -> AsyncIterator[tuple[asyncpg.Connection, asyncio.Task[Any]]]:
    """`clients erase CLIENT` started while another connection holds the event row
    `key` locked in an open transaction: yields that connection (commit it to let the
    erasure on) and the running command, once the erasure waits on the row."""
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM receiver.events WHERE key = $1 FOR UPDATE", key)
        erasing = asyncio.create_task(
            cli(settings, "clients", "erase", client, "--confirm", "--json")
        )

        async def waiting_on_the_row() -> bool:
            return bool(await conn.fetchval(ROW_LOCK_WAITS) == 1)

        await eventually(waiting_on_the_row)
        yield holder, erasing
    finally:
        await holder.close()


async def test_erase_finds_other_bodies_through_their_names_not_by_opening_each(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """With names kept, an erasure opens only the bodies whose names hold the client:
    a body naming the client whose stored names say otherwise (as no intake would
    store them) is not read, and stays; once its names are unknown, it is read and
    erased."""
    token = helpers.canary_token()
    body = hostile_bodies("cli_indexed", [token] * 4)[3]
    assert (await (await post(body)).json())["status"] == "quarantined"
    await post(helpers.onboarding("cli_indexed"))
    await conn.execute("UPDATE receiver.events SET body_names = '{}' WHERE client_id IS NULL")
    keyring = vault.Sealer.from_settings(settings).keyring
    first = await cli(settings, "clients", "erase", "cli_indexed", "--confirm", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["bodies"] == 1  # its own onboarding only
    assert await bodies_holding(conn, keyring, [token]) == 1

    await conn.execute("UPDATE receiver.events SET body_names = NULL WHERE client_id IS NULL")
    second = await cli(settings, "clients", "erase", "cli_indexed", "--confirm", "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["bodies"] == 1
    assert await bodies_holding(conn, keyring, [token]) == 0


async def test_a_client_id_no_stored_name_can_hold_is_searched_in_every_body(
    post: Post, conn: asyncpg.Connection, settings: Settings
) -> None:
    """A client id stored names never hold (shaped like a timestamp, or a word every
    delivery holds) is looked for the long way, in every stored body: the bodies
    naming it as a string are erased, the others stay."""
    token = helpers.canary_token()
    odd = "2031-02-03T04:05:06Z"
    body = helpers.encode(
        {"id": "evt_odd", "event": "partner.note", "data": {"who": odd, "t": token}}
    )
    assert (await (await post(body)).json())["status"] == "quarantined"
    await post(helpers.onboarding("cli_keep"))
    keyring = vault.Sealer.from_settings(settings).keyring
    erased = await cli(settings, "clients", "erase", odd, "--confirm", "--json")
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["bodies"] == 1
    assert await bodies_holding(conn, keyring, [token]) == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.events WHERE body_sealed IS NOT NULL")
        == 1
    )


async def test_erase_with_a_key_gone_erases_what_it_can_and_says_what_it_could_not(
    post: Post,
    aiohttp_client: Any,
    conn: asyncpg.Connection,
    settings: Settings,
    webhook_secret: str,
) -> None:
    """With the key that sealed some old bodies no longer configured (the README's
    key-loss recovery), `clients erase` erases what it can open, says how many bodies
    it could not, and exits 1 without a traceback; once the key is back, a second run
    erases the rest."""
    old = helpers.canary_token()
    assert (await (await post(hostile_bodies("cli_gdpr", [old] * 4)[1])).json())[
        "status"
    ] == "quarantined"
    fresh = helpers.canary_token()
    new_key = ("k2", SecretBytes(os.urandom(32)))
    only_new = settings.model_copy(update={"token_keys": (new_key,)})
    client = await aiohttp_client(app.create_app(only_new))
    body = hostile_bodies("cli_gdpr", [fresh] * 4)[2]
    response = await client.post(
        app.WEBHOOK_PATH,
        data=body,
        headers=helpers.signed_headers(webhook_secret, body),
    )
    assert (await response.json())["status"] == "quarantined"

    partial = await cli(only_new, "clients", "erase", "cli_gdpr", "--confirm")
    assert partial.returncode == 1, partial.stderr
    assert "1 stored bod(ies) could not be opened" in partial.stderr
    assert "Traceback" not in partial.stderr
    assert "1 stored bod(ies)" in partial.stdout  # the one under k2
    both = settings.model_copy(update={"token_keys": (new_key, *settings.token_keys)})
    keyring = vault.Sealer.from_settings(both).keyring
    assert await bodies_holding(conn, keyring, [fresh]) == 0
    assert await bodies_holding(conn, keyring, [old]) == 1

    rest = await cli(both, "clients", "erase", "cli_gdpr", "--confirm")
    assert rest.returncode == 0, rest.stderr
    assert "1 stored bod(ies)" in rest.stdout
    assert await bodies_holding(conn, keyring, [old, fresh]) == 0


async def test_keys_rotate_after_an_erasure_reports_no_key_called_none(
    post: Post, settings: Settings
) -> None:
    """Values emptied by an erasure are under no key: `keys rotate` exits 0 and never
    reports a key called None."""
    assert (await (await post(helpers.onboarding("cli_erased"))).json())["status"] == "processed"
    env = operator_env(settings)
    erased = processes.run(["clients", "erase", "cli_erased", "--confirm"], env)
    assert erased.returncode == 0, erased.stderr
    rotated = processes.run(["keys", "rotate"], env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "None" not in rotated.stdout
    assert "cannot open" not in rotated.stdout


async def test_erase_finds_a_body_another_erasure_named_while_it_ran(
    post: Post, conn: asyncpg.Connection, settings: Settings, database_url: str
) -> None:
    """Two erasures at once (an operator's batch of requests): while one reads the
    bodies whose names are not known yet, the other fills in the names of a body
    naming the first's client (`fill_body_names`, as every erasure does). That body
    is no longer among the unnamed ones when the first reaches it: the first must
    find it through its names, so it looks at them after reading the unnamed ones,
    never only before."""
    token = helpers.canary_token()
    body = hostile_bodies("cli_race", [token] * 4)[3]
    assert (await (await post(body)).json())["status"] == "quarantined"
    await post(helpers.onboarding("cli_race"))
    await post(helpers.onboarding("cli_bystander"))
    sealer = vault.Sealer.from_settings(settings)
    named = await conn.fetchval(
        "SELECT key FROM receiver.events WHERE client_id IS NULL AND body_sealed IS NOT NULL"
    )
    # Stored before names were kept: a first batch of bodies (naming someone else)
    # ahead of it in key order, then the body naming cli_race.
    await conn.execute(
        "INSERT INTO receiver.events (key, type, status, is_test, body_hash, body_sealed)"
        " SELECT '0_before_' || lpad(g::text, 4, '0'), type, 'ignored', is_test,"
        "        body_hash, body_sealed"
        "   FROM receiver.events, generate_series(1, $1) AS g"
        "  WHERE client_id = 'cli_bystander'",
        erasure._SCAN_BATCH,
    )
    await conn.execute("UPDATE receiver.events SET body_names = NULL")
    assert named > "0_before_9999"

    # The first batch's names cannot be filled in until the holder's transaction ends.
    async with erasing_behind(conn, database_url, settings, "cli_race", "0_before_0001") as (
        holder,
        first,
    ):
        # Meanwhile another erasure opens the body naming cli_race and names it.
        stored = await conn.fetchrow(
            "SELECT body_hash, body_sealed FROM receiver.events WHERE key = $1", named
        )
        assert stored is not None
        raw = sealer.keyring.open(
            stored["body_sealed"],
            vault.event_associated_data("sha256:" + stored["body_hash"].hex()),
        )
        assert raw == body
        names = naming.body_names(sealer.names_key, raw)
        assert names is not None
        await conn.execute(
            db.QUERIES["fill_body_names"], [named], ["{" + ",".join(map(str, names)) + "}"]
        )
        await holder.execute("COMMIT")
        erased = await asyncio.wait_for(first, timeout=60)
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["bodies"] == 2  # its own onboarding and the note
    assert await bodies_holding(conn, sealer.keyring, [token]) == 0


async def test_erase_finds_a_body_naming_the_client_stored_while_it_waited_for_the_lock(
    post: Post, conn: asyncpg.Connection, settings: Settings, database_url: str
) -> None:
    """A delivery for another client that names the client being erased takes that
    other client's lock, not this one's: stored while the erasure waits for this
    client's lock to finish (behind a slow delivery for the client), after it looked
    up the names, it is still erased, since the erasure looks them up again once it
    holds the lock."""
    await post(helpers.onboarding("cli_waited"))
    await post(helpers.onboarding("cli_bystander"))
    await conn.execute(
        "INSERT INTO receiver.events (key, type, status, is_test, body_hash, body_sealed)"
        " SELECT '0_before_0001', type, 'ignored', is_test, body_hash, body_sealed"
        "   FROM receiver.events WHERE client_id = 'cli_bystander'"
    )
    await conn.execute("UPDATE receiver.events SET body_names = NULL WHERE key = '0_before_0001'")
    waits_for_the_client = ROW_LOCK_WAITS + " AND query LIKE '%lock_clients_v1%'"
    # Holds the erasure in its read of the unnamed bodies, after its first step.
    async with erasing_behind(conn, database_url, settings, "cli_waited", "0_before_0001") as (
        holder,
        erasing,
    ):
        async with client_lock(database_url, "cli_waited") as release:
            await holder.execute("COMMIT")

            async def waiting_for_the_client() -> bool:
                return bool(await conn.fetchval(waits_for_the_client) == 1)

            await eventually(waiting_for_the_client)
            token = helpers.canary_token()
            late = helpers.onboarding("cli_late", token) | {"see_also": ["cli_waited"]}
            assert (await (await post(late)).json())["status"] == "processed"
            await release()
        erased = await asyncio.wait_for(erasing, timeout=60)
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["bodies"] == 2  # its own onboarding and the late one
    keyring = vault.Sealer.from_settings(settings).keyring
    assert await bodies_holding(conn, keyring, [token]) == 0

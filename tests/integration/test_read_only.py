"""A read-only database (docs/design.md §9, Failover): a standby reached by mistake, or a
primary with `default_transaction_read_only`, answers deliveries 503 with Retry-After
and a log line naming the host, never a 500, and the service writes again by itself
once the database does."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import asyncpg

from receiver import config, endpoints
from receiver.config import Settings
from receiver.service import app
from tests import helpers
from tests.integration.conftest import settings_values


async def _deliver(client: Any, secret: str, body: bytes) -> Any:
    """`body` signed with `secret`, to the webhook; the answer."""
    return await client.post(
        app.WEBHOOK_PATH, data=body, headers=helpers.signed_headers(secret, body)
    )


def _database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


async def test_a_read_only_database_is_a_503_naming_the_host_and_passes_when_it_writes_again(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, database_url: str, log_lines: Any
) -> None:
    """With `default_transaction_read_only` on, a delivery gets 503 with Retry-After and
    a `database_read_only` line names the host; once writes are allowed again the next
    delivery is stored, without a restart (the read-only session was dropped)."""
    name = _database_name(database_url)
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        client = await aiohttp_client(app.create_app(settings))
        body = helpers.encode(helpers.onboarding())
        answer = await _deliver(client, webhook_secret, body)
        assert answer.status == 503
        assert answer.headers["Retry-After"].isdigit()
        named = {line["host"] for line in log_lines() if line["event"] == "database_read_only"}
        # The server the URL names: host:port, or (over a Unix socket) the socket's path.
        (host,) = endpoints.database_hosts(database_url)
        assert named in ({host}, {f"{host.rsplit(':', 1)[0]}/.s.PGSQL.{host.rsplit(':', 1)[1]}"})

        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
        again = await _deliver(client, webhook_secret, body)
        assert again.status == 200
        stored = await admin.fetchval("SELECT count(*) FROM receiver.events")
        assert stored == 1
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await admin.close()


async def test_a_read_write_url_refuses_a_read_only_database_with_a_503(
    aiohttp_client: Any, settings: Settings, webhook_secret: str, database_url: str
) -> None:
    """With `target_session_attrs=read-write` in the URL, a read-only database is never
    connected to for writes: deliveries get 503 with Retry-After, never 500."""
    name = _database_name(database_url)
    joiner = "&" if "?" in database_url else "?"
    read_write = config.load_settings(
        **{
            **settings_values(settings),
            "database_url": f"{database_url}{joiner}target_session_attrs=read-write",
        }
    )
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        client = await aiohttp_client(app.create_app(read_write))
        body = helpers.encode(helpers.onboarding())
        answer = await _deliver(client, webhook_secret, body)
        assert answer.status == 503
        assert answer.headers["Retry-After"].isdigit()
        ready = await client.get("/readyz")
        assert ready.status == 503
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await admin.close()

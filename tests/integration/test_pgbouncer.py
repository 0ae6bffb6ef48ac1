"""Behind PgBouncer in transaction mode (as many managed Postgres deployments are):
ingest and signals work through a real pooler the test starts."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from receiver.config import Settings
from receiver.db import migrations
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import cache_settings, operator_env
from tests.integration.standins import StandInCache, eventually

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def pgbouncer(database_url: str) -> Iterator[str]:
    """PgBouncer (Debian's package) in transaction mode in front of the test database;
    yields the database's URL through it."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("PgBouncer is not installed (apt-get install pgbouncer; .ci/run does)")
    parts = urlsplit(database_url)
    if parts.hostname != "127.0.0.1":
        pytest.skip("needs the Postgres at 127.0.0.1:5432 (the embedded one has no TCP port)")
    port = processes.free_port()
    # PgBouncer will not run as root: it runs as postgres, which must reach its files
    # (pytest's own temporary folders are private to root).
    home = Path(tempfile.mkdtemp(prefix="receiver-pgbouncer-"))
    home.chmod(0o777)
    (home / "users.txt").write_text(f'"{parts.username}" ""\n')
    (home / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={parts.hostname} port={parts.port or 5432}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home}/users.txt
pool_mode = transaction
default_pool_size = 8
max_client_conn = 500
logfile = {home}/pgbouncer.log
pidfile = {home}/pgbouncer.pid
"""
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (home / name).chmod(0o644)
    server = subprocess.Popen([PGBOUNCER, "-u", "postgres", str(home / "pgbouncer.ini")])
    try:
        deadline = time.monotonic() + 15
        url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))

        async def up() -> bool:
            try:
                conn = await asyncpg.connect(url, statement_cache_size=0)
            except (OSError, asyncpg.PostgresError):
                return False
            await conn.close()
            return True

        while not asyncio.run(up()):
            assert server.poll() is None, (home / "pgbouncer.log").read_text()
            assert time.monotonic() < deadline, "PgBouncer did not come up"
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


async def test_ingest_and_signals_through_pgbouncer_in_transaction_mode(
    pgbouncer: str,
    settings: Settings,
    webhook_secret: str,
    standin_cache: StandInCache,
    conn: asyncpg.Connection,
) -> None:
    """`serve` with RECEIVER_DATABASE_POOLED=true through PgBouncer (transaction mode):
    concurrent onboardings and revocations are all stored and answered 200, every
    signal reaches the cache, the CLI works through the pooler too; the token cache
    LISTENs on a direct connection."""
    env = operator_env(
        settings,
        RECEIVER_DATABASE_URL=pgbouncer,
        RECEIVER_DATABASE_POOLED="true",
        RECEIVER_CACHE_URL=standin_cache.url,
        RECEIVER_CACHE_SECRET=standin_cache.secret_b64,
    )
    port = processes.free_port()
    documents = [helpers.onboarding(f"cli_pgb_{n}") for n in range(40)]
    documents += [helpers.revocation(f"cli_pgb_{n}", None) for n in range(10)]
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)

        async def send(document: dict[str, object]) -> str:
            status, answer = await processes.post_signed(
                port, webhook_secret, helpers.encode(document)
            )
            assert status == 200
            return str(answer["status"])

        assert await asyncio.gather(*(send(d) for d in documents[:40])) == ["processed"] * 40
        assert await asyncio.gather(*(send(d) for d in documents[40:])) == ["processed"] * 10

        async def all_signalled() -> bool:
            return len(set(standin_cache.ids())) == 50

        await eventually(all_signalled, seconds=30)
        listed = await asyncio.to_thread(processes.run, ["tokens", "list", "--json"], env)
        assert listed.returncode == 0, listed.stderr
        assert len(listed.stdout.splitlines()) == 40
    assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 50
    assert (
        await conn.fetchval("SELECT count(*) FROM receiver.signals WHERE status <> 'delivered'")
        == 0
    )

    from receiver.partner import cache

    tokens = cache.TokenCache.from_settings(cache_settings(settings))  # direct: LISTEN
    await tokens.start()
    try:
        assert tokens.listening
        assert await tokens.get("cli_pgb_39") == documents[39]["data"]["bearer_token"]
    finally:
        await tokens.close()


async def test_serve_through_the_pooler_refuses_a_database_with_pending_migrations(
    pgbouncer: str, settings: Settings, conn: asyncpg.Connection
) -> None:
    """Through a pooler `serve` never migrates (the lock is a session lock): with a
    migration pending it stops with one line saying to migrate directly."""
    await conn.execute(
        "DELETE FROM receiver.schema_migrations WHERE name = $1", migrations.available()[-1].name
    )
    env = operator_env(settings, RECEIVER_DATABASE_URL=pgbouncer, RECEIVER_DATABASE_POOLED="true")
    result = await asyncio.to_thread(
        processes.run, ["serve", "--port", str(processes.free_port())], env
    )
    assert result.returncode == 2
    assert "run `receiver migrate` against the database itself" in result.stderr

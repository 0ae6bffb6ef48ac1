"""A least-privilege install as README "Roles" walks it, and every wrong-role mistake
as one line and exit 2 (issue 34).

The walk runs on a Postgres of its own (the group roles are cluster-wide: on the
shared one they exist already), with README's SQL block run as written. The wrong
roles are tried on the shared Postgres with login roles made for the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from receiver import config
from receiver.db import migrations
from tests import helpers
from tests.integration import processes
from tests.integration.standins import eventually

ROOT = Path(__file__).resolve().parents[2]
_SQL_BLOCK = re.compile(r"<!-- least-privilege-sql -->\n```sql\n(.*?)```", re.S)


def readme_sql() -> list[str]:
    """README's least-privilege SQL block, one statement at a time (CREATE DATABASE
    cannot share a transaction with the others)."""
    found = _SQL_BLOCK.search((ROOT / "README.md").read_text())
    assert found is not None, "README.md lost its least-privilege SQL block"
    text = "\n".join(
        line for line in found.group(1).splitlines() if not line.lstrip().startswith("--")
    )
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def as_login(dsn: str, role: str, password: str | None, database: str | None = None) -> str:
    """The same server as `dsn`, logged in as `role` (into `database`, else the same)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    login = role if password is None else f"{role}:{password}"
    path = f"/{database}" if database else parts.path
    return urlunsplit(parts._replace(netloc=f"{login}@{host}", path=path))


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's own message: its one `receiver:` line on stderr (anything else
    there is a JSON log line, as a non-terminal gets; never a traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("receiver:")]
    assert len(lines) == 1, result.stderr
    others = [line for line in result.stderr.splitlines() if line and line not in lines]
    for line in others:
        json.loads(line)  # a log line, nothing free-form
    return lines[0]


def service_env(database_url: str, **extra: str) -> dict[str, str]:
    """A receiver's environment with fresh secrets, for `database_url`."""
    values = {f"RECEIVER_{k.upper()}": v for k, v in config.generate_dev_secrets().items()}
    values["RECEIVER_SHUTDOWN_DELAY_SECONDS"] = "0"
    return processes.clean_env(**{**values, "RECEIVER_DATABASE_URL": database_url, **extra})


async def test_a_least_privilege_install_as_the_readme_walks_it(
    own_postgres: Any, tmp_path: Path
) -> None:
    """On a cluster without the group roles: an owner without CREATEROLE is told, in one
    line and exit 2, which role is missing and how to create it; README's SQL (the
    `--print-roles` part first) makes the roles; the owner migrates with no warning;
    `serve` runs as the runtime login with every secret from a file; SIGHUP takes a new
    webhook secret without a restart; `status` answers; the cache's login is refused
    by every command in one line."""
    superuser, _ = own_postgres
    statements = readme_sql()
    printed = processes.run(["migrate", "--print-roles"], processes.clean_env())
    assert printed.returncode == 0, printed.stderr
    group_roles = [s for s in statements if s.endswith("NOLOGIN")]
    # What --print-roles prints is what README's first step runs.
    assert [f"{s};" for s in group_roles] == [
        line for line in printed.stdout.splitlines() if not line.startswith("--")
    ]

    admin = await asyncpg.connect(superuser)
    try:
        # An owner (no CREATEROLE) tries before the roles exist.
        await admin.execute("CREATE ROLE early_owner LOGIN")
        await admin.execute("CREATE DATABASE early OWNER early_owner")
        early = processes.run(
            ["migrate"],
            processes.clean_env(
                RECEIVER_DATABASE_URL=as_login(superuser, "early_owner", None, "early")
            ),
        )
        assert early.returncode == 2
        message = one_line(early)
        assert "receiver_runtime does not exist" in message
        assert "CREATEROLE" in message
        assert "early_owner" in message
        assert "receiver migrate --print-roles" in message
        assert not await admin.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'receiver_runtime')"
        )

        for statement in statements:
            await admin.execute(statement)
    finally:
        await admin.close()

    owner = as_login(superuser, "receiver_owner", "owner-secret", "receiver")
    migrated = processes.run(["migrate"], processes.clean_env(RECEIVER_DATABASE_URL=owner))
    assert migrated.returncode == 0, migrated.stderr
    assert "applied" in migrated.stdout
    # A normal first run says nothing alarming (no schema_missing, no warning).
    assert '"warning"' not in migrated.stderr
    assert "schema_missing" not in migrated.stderr

    # serve as the runtime login, every secret from a file.
    env = service_env(as_login(superuser, "receiver_app", "app-secret", "receiver"))
    secret_files = tmp_path / "secrets"
    secret_files.mkdir(mode=0o700)
    for name in ("DATABASE_URL", "WEBHOOK_SECRETS", "TOKEN_KEYS", "INDEX_KEY"):
        path = secret_files / name.lower()
        path.write_text(env.pop(f"RECEIVER_{name}") + "\n")
        path.chmod(0o600)
        env[f"RECEIVER_{name}_FILE"] = str(path)
    old_secret = (secret_files / "webhook_secrets").read_text().strip()
    new_secret = helpers.new_secret()
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        async with aiohttp.ClientSession() as session:
            assert await deliver(session, port, old_secret) == 200
            assert await deliver(session, port, new_secret) == 401
            (secret_files / "webhook_secrets").write_text(f"{new_secret},{old_secret}\n")
            process.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return '"configuration_reloaded"' in output.read_text()

            await eventually(reloaded)
            assert process.poll() is None  # still serving
            assert await deliver(session, port, new_secret) == 200
            assert await deliver(session, port, old_secret) == 200
        reload_line = next(
            json.loads(line)
            for line in output.read_text().splitlines()
            if '"configuration_reloaded"' in line
        )
        assert reload_line["changed"] == ["RECEIVER_WEBHOOK_SECRETS"]
        assert new_secret not in output.read_text()

        status = processes.run(["status", "--json"], env)
        assert status.returncode in (0, 1), status.stderr
        assert json.loads(status.stdout.splitlines()[-1])["database"]

    # The cache's login, by mistake, in each command: one line naming it, exit 2.
    reader = as_login(superuser, "cache_app", "cache-secret", "receiver")
    for args in (["tokens", "list"], ["migrate", "--check"]):
        result = processes.run(args, service_env(reader))
        assert result.returncode == 2, (args, result.stderr)
        line = one_line(result)
        assert "'cache_app'" in line, line
        assert "receiver_runtime" in line, line
        assert "cache-secret" not in result.stderr


async def deliver(session: aiohttp.ClientSession, port: int, secret: str) -> int:
    """One signed onboarding delivery; its status."""
    body = helpers.encode(helpers.onboarding())
    async with session.post(
        f"http://127.0.0.1:{port}/webhooks/debitura",
        data=body,
        headers=helpers.signed_headers(secret, body),
    ) as answer:
        return answer.status


@pytest.fixture
async def logins(conn: asyncpg.Connection) -> AsyncIterator[dict[str, tuple[str, str]]]:
    """A runtime login and a cache-reader login on the shared Postgres (cluster-wide:
    unique names, dropped afterwards)."""
    made = {}
    for kind, group in (("app", "receiver_runtime"), ("cache", "receiver_cache_reader")):
        role, password = f"{kind}_{uuid.uuid4().hex[:10]}", secrets.token_hex(12)
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE {group}")
        made[kind] = (role, password)
    try:
        yield made
    finally:
        for role, _ in made.values():
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")


async def test_serve_as_the_runtime_login_on_an_unmigrated_database_is_one_line(
    logins: dict[str, tuple[str, str]], empty_database_url: str
) -> None:
    """The migrate Job forgotten: `serve` as the runtime login says to run `receiver
    migrate` as the owner, at once (no waiting loop), exit 2."""
    role, password = logins["app"]
    env = service_env(as_login(empty_database_url, role, password))
    result = await asyncio.to_thread(
        processes.run, ["serve", "--port", str(processes.free_port())], env, 30
    )
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert f"'{role}'" in line
    assert "not migrated" in line
    assert "receiver migrate" in line
    assert "database_waiting" not in result.stdout + result.stderr


async def test_serve_as_the_runtime_login_with_a_migration_pending_says_migrate_first(
    logins: dict[str, tuple[str, str]], database_url: str, conn: asyncpg.Connection
) -> None:
    """A release rolled out before its migrate Job ran: `serve` and `migrate` as the
    runtime login name the pending migration and the owner's `receiver migrate`, exit
    2 (before: "lacks a privilege … need a login granted receiver_runtime … is this the
    cache reader's URL?", about a login that is granted receiver_runtime)."""
    last = migrations.available()[-1].name
    await conn.execute("DELETE FROM receiver.schema_migrations WHERE name = $1", last)
    role, password = logins["app"]
    env = service_env(as_login(database_url, role, password))
    for args in (["serve", "--port", str(processes.free_port())], ["migrate"]):
        result = await asyncio.to_thread(processes.run, args, env, 30)
        assert result.returncode == 2, (args, result.stderr)
        line = one_line(result)
        assert f"migration {last} is pending" in line, line
        assert f"'{role}'" in line, line
        assert "cache reader" not in line, line


async def test_serve_dev_with_a_least_privilege_url_serves_and_prints_no_password(
    logins: dict[str, tuple[str, str]], database_url: str, tmp_path: Path
) -> None:
    """`serve --dev` with RECEIVER_DATABASE_URL set to a login that may not create roles:
    it serves, says it made no cache login, and prints no password (before: a
    traceback, "permission denied to create role"; and with a role that could, the
    help line echoed the URL with its password)."""
    role, password = logins["app"]
    env = service_env(as_login(database_url, role, password), RECEIVER_DATA_DIR=str(tmp_path))
    port = processes.free_port()
    with processes.serving(["--dev", "--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        text = output.read_text()
    assert "No login for a partner application's token cache" in text
    assert password not in text
    assert "Traceback" not in text


async def test_the_cache_readers_url_in_serve_is_one_line(
    logins: dict[str, tuple[str, str]], database_url: str
) -> None:
    """The wrong Secret mounted: `serve` with the cache reader's URL names the role and
    what the service needs, exit 2, no traceback."""
    role, password = logins["cache"]
    env = service_env(as_login(database_url, role, password))
    result = await asyncio.to_thread(
        processes.run, ["serve", "--port", str(processes.free_port())], env, 30
    )
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert f"'{role}'" in line
    assert "receiver_runtime" in line
    assert password not in result.stdout + result.stderr


async def test_a_role_that_does_not_exist_is_the_same_line_everywhere(database_url: str) -> None:
    """`serve` and a command given a role that does not exist: exit 2, one line naming
    the role (before: serve 2, `tokens list` 1 "database refused the connection")."""
    role = f"ghost_{uuid.uuid4().hex[:8]}"
    env = service_env(as_login(database_url, role, "never-shown"))
    for args in (["serve", "--port", str(processes.free_port())], ["tokens", "list"], ["status"]):
        result = await asyncio.to_thread(processes.run, args, env, 30)
        assert result.returncode == 2, (args, result.stderr)
        line = one_line(result)
        assert role in line, line
        assert "never-shown" not in result.stdout + result.stderr


async def test_a_login_without_connect_on_the_database_is_one_line_naming_it(
    logins: dict[str, tuple[str, str]], database_url: str, conn: asyncpg.Connection
) -> None:
    """A login the database's owner never granted CONNECT (REVOKE … FROM PUBLIC, the
    usual hardening): every command and `serve` say it in one line naming the role
    and CONNECT, exit 2 (before: "database refused the connection", exit 1, `status`
    "UNREACHABLE", and serve's line split by Postgres's DETAIL)."""
    role, password = logins["app"]
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
    env = service_env(
        as_login(database_url, role, password),
        RECEIVER_CACHE_URL="http://127.0.0.1:9/signals",
        RECEIVER_CACHE_SECRET=helpers.new_secret(),
    )
    for args in (
        ["serve", "--port", str(processes.free_port())],
        ["migrate", "--check"],
        ["status", "--json"],
        ["tokens", "list"],
        ["dispatch"],
    ):
        result = await asyncio.to_thread(processes.run, args, env, 30)
        assert result.returncode == 2, (args, result.stderr)
        line = one_line(result)
        assert f"'{role}'" in line, line
        assert "CONNECT" in line, line
        assert password not in result.stdout + result.stderr


async def test_dispatch_with_the_wrong_role_exits_2_instead_of_looping(
    logins: dict[str, tuple[str, str]], database_url: str
) -> None:
    """`receiver dispatch` with the cache reader's URL, or a role that does not exist:
    one line naming the role, exit 2 (before: it logged a refusal every poll,
    forever)."""
    reader, password = logins["cache"]
    ghost = f"ghost_{uuid.uuid4().hex[:8]}"
    for role, secret in ((reader, password), (ghost, "never-shown")):
        env = service_env(
            as_login(database_url, role, secret),
            RECEIVER_CACHE_URL="http://127.0.0.1:9/signals",
            RECEIVER_CACHE_SECRET=helpers.new_secret(),
        )
        result = await asyncio.to_thread(processes.run, ["dispatch"], env, 30)
        assert result.returncode == 2, result.stderr
        assert role in one_line(result)
        assert secret not in result.stdout + result.stderr


async def test_a_database_migrated_by_the_earlier_baseline_text_stays_current(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """0001_baseline's role creation changed (it skips existing roles): a database that
    recorded the earlier text's checksum is at the baseline, not "edited"."""
    earlier = next(iter(migrations.EQUIVALENT["0001_baseline"]))
    await conn.execute(
        "UPDATE receiver.schema_migrations SET checksum = $1 WHERE name = '0001_baseline'", earlier
    )
    env = processes.clean_env(RECEIVER_DATABASE_URL=database_url)
    applied = await asyncio.to_thread(processes.run, ["migrate"], env)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.strip() == "applied 0 migration(s)"
    edited = "UPDATE receiver.schema_migrations SET checksum = 'f00' WHERE name = '0001_baseline'"
    await conn.execute(edited)
    refused = await asyncio.to_thread(processes.run, ["migrate"], env)
    assert refused.returncode == 1
    assert "was edited" in refused.stderr


async def test_the_earlier_baseline_text_does_not_vouch_for_an_edited_baseline(
    database_url: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """A database that recorded the earlier baseline text, and a release whose baseline
    file was edited: `migrate` refuses it as edited (before: any text of the file was
    taken as equivalent to the earlier one). The release is a copy of the package with
    its own `sql/`, as a wheel ships it."""
    earlier = next(iter(migrations.EQUIVALENT["0001_baseline"]))
    await conn.execute(
        "UPDATE receiver.schema_migrations SET checksum = $1 WHERE name = '0001_baseline'", earlier
    )
    release = tmp_path / "receiver"
    await asyncio.to_thread(shutil.copytree, ROOT / "receiver", release)
    await asyncio.to_thread(shutil.copytree, ROOT / "sql", release / "sql")
    baseline = release / "sql" / "0001_baseline.sql"
    baseline.write_text(baseline.read_text() + "\nGRANT ALL ON SCHEMA receiver TO PUBLIC;\n")
    env = processes.clean_env(RECEIVER_DATABASE_URL=database_url)
    edited = await asyncio.to_thread(processes.run, ["migrate"], env, 60, None, tmp_path)
    assert edited.returncode == 1, edited.stderr
    assert "0001_baseline was edited" in edited.stderr


def test_print_roles_needs_no_setting() -> None:
    """`migrate --print-roles` prints the group roles' SQL with no variable set."""
    result = processes.run(["migrate", "--print-roles"], {"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert "CREATE ROLE receiver_runtime NOLOGIN;" in result.stdout
    assert "CREATE ROLE receiver_cache_reader NOLOGIN;" in result.stdout

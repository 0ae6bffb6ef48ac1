"""Operations through real `receiver` processes (docs/design.md §5; README: Deploying): start-up,
signals, supervised workers, ports, the admin listener, and migrate --status/--check."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from receiver import config, metrics
from receiver.config import Settings
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, operator_env
from tests.integration.standins import StandInCache, eventually
from tests.integration.test_operability import listening_pids


def _lines(output: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.read_text().splitlines() if line[:1] == "{"]


async def _gone(pid: int, seconds: float = 15) -> bool:
    """Whether the process `pid` has exited (a zombie counts) within `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        try:
            stat = await asyncio.to_thread(Path(f"/proc/{pid}/stat").read_text)
            state = stat.rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        await asyncio.sleep(0.1)
    return False


async def _status(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        return answer.status, answer.headers.get("Server", "")


def test_serve_without_a_database_url_or_dev_exits_2_naming_it(tmp_path: Path) -> None:
    """Plain `serve` with production secrets and no RECEIVER_DATABASE_URL: exit 2, one
    line naming the variable, and no embedded Postgres created."""
    env = processes.clean_env(
        **{f"RECEIVER_{k.upper()}": v for k, v in config.generate_dev_secrets().items()}
    )
    result = processes.run(["serve", "--port", str(processes.free_port())], env, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "RECEIVER_DATABASE_URL is required" in line
    assert list(tmp_path.iterdir()) == []


def test_migrate_and_tokens_list_ask_only_for_what_they_use(database_url: str) -> None:
    """`migrate` runs with the database URL alone (no keys, no webhook secrets); `tokens
    list` without the webhook secrets or keys."""
    env = processes.clean_env(RECEIVER_DATABASE_URL=database_url)
    migrated = processes.run(["migrate"], env)
    assert migrated.returncode == 0, migrated.stderr
    listed = processes.run(["tokens", "list"], env)
    assert listed.returncode == 0, listed.stderr
    revealed = processes.run(["tokens", "reveal", "cli_x", "--confirm"], env)
    assert revealed.returncode == 2
    assert "RECEIVER_TOKEN_KEYS is required" in revealed.stderr


def test_an_unknown_receiver_variable_is_named_in_a_warning(database_url: str) -> None:
    """A typo such as RECEIVER_LOG_LEVL is named at start, with the likely intended name."""
    env = processes.clean_env(RECEIVER_DATABASE_URL=database_url, RECEIVER_LOG_LEVL="debug")
    result = processes.run(["migrate"], env)
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if "RECEIVER_LOG_LEVL" in line]
    assert len(warnings) == 1
    assert "RECEIVER_LOG_LEVEL" in warnings[0]


async def test_migrate_status_lists_and_check_exits_1_when_pending(database_url: str) -> None:
    """`migrate --status` lists applied and pending migrations; `--check` exits 1 while
    one is pending and 0 once `migrate` applied it."""
    conn = await asyncpg.connect(database_url)
    try:
        last = await conn.fetchval("SELECT max(name) FROM receiver.schema_migrations")
        await conn.execute("DELETE FROM receiver.schema_migrations WHERE name = $1", last)
    finally:
        await conn.close()
    env = processes.clean_env(RECEIVER_DATABASE_URL=database_url)
    status = processes.run(["migrate", "--status"], env)
    assert status.returncode == 0
    assert f"{last}  pending" in status.stdout
    assert "0001_baseline  applied" in status.stdout
    assert processes.run(["migrate", "--check"], env).returncode == 1
    # The deleted row's migration is idempotent DDL only where it says so; record it back.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO receiver.schema_migrations (name, checksum) VALUES ($1, 'x')", last
        )
    finally:
        await conn.close()
    assert processes.run(["migrate", "--check"], env).returncode == 0


async def test_start_line_names_version_database_and_address(database_url: str) -> None:
    """One start line with the version, the database as host:port/name (never the
    password) and the listen address."""
    parts = urlsplit(database_url)
    user = parts.netloc.rsplit("@", 1)
    with_password = urlunsplit(parts._replace(netloc=f"postgres:pw-not-to-print@{user[-1]}"))
    env, _ = processes.receiver_env(with_password)
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
    text = output.read_text()
    assert "pw-not-to-print" not in text
    (line,) = [line for line in _lines(output) if line["event"] == "listening"]
    assert line["version"] == metrics.version()
    assert line["url"] == f"http://127.0.0.1:{port}"
    assert str(line["database"]).endswith("/" + parts.path.lstrip("/"))


def test_a_port_in_use_is_one_line_and_exit_1(database_url: str) -> None:
    """Something listens on the port already: one line, exit 1, no traceback,
    before migrating or printing a banner."""
    env, _ = processes.receiver_env(database_url)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = processes.run(["serve", "--port", str(port)], env)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line
    assert "in use" in line


async def _logged(output: Path, event: str, count: int = 1) -> list[dict[str, object]]:
    """Wait (bounded) until `event` has been logged `count` times; those lines."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        found = [line for line in _lines(output) if line.get("event") == event]
        if len(found) >= count:
            return found
        assert asyncio.get_running_loop().time() < deadline, f"{event} never logged"
        await asyncio.sleep(0.05)


async def test_sighup_reloads_secrets_from_their_files_and_keeps_serving(
    database_url: str, tmp_path: Path
) -> None:
    """Webhook secrets given as RECEIVER_WEBHOOK_SECRETS_FILE: after `kill -HUP` a new
    secret written to the file verifies deliveries, the old one still does (a
    rotation), the service never stopped, and one line names what changed, never a
    value. A reload to an invalid file is refused with one line; the old secrets stay
    in force."""
    env, old = processes.receiver_env(database_url)
    secrets_file = tmp_path / "webhook-secrets"
    secrets_file.write_text(old + "\n")
    env.pop("RECEIVER_WEBHOOK_SECRETS")
    env["RECEIVER_WEBHOOK_SECRETS_FILE"] = str(secrets_file)
    new = helpers.new_secret()
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        body = helpers.encode(helpers.onboarding("cli_before"))
        assert (await processes.post_signed(port, new, body))[0] == 401
        secrets_file.write_text(f"{new},{old}\n")
        process.send_signal(signal.SIGHUP)
        (line,) = await _logged(output, "configuration_reloaded")
        assert line["changed"] == ["RECEIVER_WEBHOOK_SECRETS"]
        for secret in (new, old):
            body = helpers.encode(helpers.onboarding())
            assert (await processes.post_signed(port, secret, body))[0] == 200
        secrets_file.write_text("not base64 at all!\n")
        process.send_signal(signal.SIGHUP)
        (refused,) = await _logged(output, "reload_refused")
        assert "RECEIVER_WEBHOOK_SECRETS" in str(refused["reason"])
        body = helpers.encode(helpers.onboarding())
        assert (await processes.post_signed(port, new, body))[0] == 200
        assert process.poll() is None
        text = output.read_text()
    assert new not in text
    assert old not in text
    assert "shutting_down" not in text


async def test_sighup_reloads_the_log_level_from_its_file(
    database_url: str, tmp_path: Path
) -> None:
    """RECEIVER_LOG_LEVEL_FILE: a SIGHUP after the file says `debug` brings debug lines
    (a routine probe's request line) that `info` kept out; a process's environment
    never changes, so the file is how the log level reloads."""
    env, _ = processes.receiver_env(database_url)
    level_file = tmp_path / "log-level"
    level_file.write_text("info\n")
    env["RECEIVER_LOG_LEVEL_FILE"] = str(level_file)
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        assert '"level": "debug"' not in output.read_text()
        level_file.write_text("debug\n")
        process.send_signal(signal.SIGHUP)
        (line,) = await _logged(output, "configuration_reloaded")
        assert line["changed"] == ["RECEIVER_LOG_LEVEL"]
        await processes.wait_healthy(port, process)

        async def debug_lines() -> bool:
            return '"level": "debug"' in output.read_text()

        await eventually(debug_lines)


async def test_sighup_to_the_supervisor_reloads_every_worker(database_url: str) -> None:
    """kill -HUP of the `serve --workers 2` supervisor: each worker reloads, none
    stops, and the service keeps answering."""
    env, secret = processes.receiver_env(database_url)
    port = processes.free_port()
    with processes.serving(["--port", str(port), "--workers", "2"], env) as (process, output):
        await processes.wait_healthy(port, process)
        workers = await listening_pids(output, 2)
        process.send_signal(signal.SIGHUP)
        reloaded = await _logged(output, "configuration_reloaded", count=2)
        assert {line["pid"] for line in reloaded} == set(workers)
        assert process.poll() is None
        for pid in workers:
            assert not await _gone(pid, seconds=0.5), f"worker {pid} stopped on SIGHUP"
        body = helpers.encode(helpers.onboarding())
        assert (await processes.post_signed(port, secret, body))[0] == 200


async def test_workers_read_the_database_url_from_its_file_and_reload(
    database_url: str, tmp_path: Path
) -> None:
    """`serve --workers 2` with RECEIVER_DATABASE_URL_FILE (README's least-privilege
    install): the workers start and answer (before, each refused to start, "set
    RECEIVER_DATABASE_URL or RECEIVER_DATABASE_URL_FILE, not both", a crash loop),
    the password is in no worker's environment, and a HUP reloads both."""
    password = f"pw-{secrets.token_hex(8)}"  # the shared test Postgres trusts loopback
    parts = urlsplit(database_url)
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    url_file = tmp_path / "database_url"
    url_file.write_text(urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}")) + "\n")
    env, old = processes.receiver_env(database_url)
    env.pop("RECEIVER_DATABASE_URL")
    env["RECEIVER_DATABASE_URL_FILE"] = str(url_file)
    secrets_file = tmp_path / "webhook_secrets"
    secrets_file.write_text(old)
    env.pop("RECEIVER_WEBHOOK_SECRETS")
    env["RECEIVER_WEBHOOK_SECRETS_FILE"] = str(secrets_file)
    port = processes.free_port()
    with processes.serving(["--port", str(port), "--workers", "2"], env) as (process, output):
        await processes.wait_healthy(port, process)
        workers = await listening_pids(output, 2)
        for pid in workers:
            environ = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)
            assert password.encode() not in environ
        new = helpers.new_secret()
        secrets_file.write_text(f"{new},{old}")
        process.send_signal(signal.SIGHUP)
        reloaded = await _logged(output, "configuration_reloaded", count=2)
        assert {line["pid"] for line in reloaded} == set(workers)
        for _ in range(4):  # the kernel spreads connections over both workers
            body = helpers.encode(helpers.onboarding())
            assert (await processes.post_signed(port, new, body))[0] == 200
        assert process.poll() is None
        text = output.read_text()
    assert "worker_exited" not in text
    assert password not in text


async def test_sighup_reloads_a_lone_dispatchers_cache_secret(
    database_url: str, tmp_path: Path, standin_cache: StandInCache
) -> None:
    """`receiver dispatch` on SIGHUP reads RECEIVER_CACHE_SECRET_FILE again and signs
    with the new secret, still running (before, SIGHUP killed it, exit 129, its
    leases held until they expired); a bad file is refused, the old secret kept."""
    env, _ = processes.receiver_env(database_url, RECEIVER_CACHE_URL=standin_cache.url)
    secret_file = tmp_path / "cache_secret"
    secret_file.write_text(standin_cache.secret_b64 + "\n")
    env["RECEIVER_CACHE_SECRET_FILE"] = str(secret_file)
    with processes.background(["dispatch"], env) as (process, output):
        await _logged(output, "dispatcher_started")
        new = helpers.new_secret()
        secret_file.write_text(new + "\n")
        process.send_signal(signal.SIGHUP)
        (line,) = await _logged(output, "configuration_reloaded")
        assert line["changed"] == ["RECEIVER_CACHE_SECRET"]
        secret_file.write_text("not base64!\n")
        process.send_signal(signal.SIGHUP)
        await _logged(output, "reload_refused")
        secret_file.write_text(new + "\n")  # for `tokens import`, which signs nothing
        standin_cache.secret_b64 = new  # the cache now verifies with the new secret only
        imported = await asyncio.to_thread(
            processes.run,
            ["tokens", "import", "cli_hup", "--reason", "test"],
            env,
            60,
            helpers.canary_token() + "\n",
        )
        assert imported.returncode == 0, imported.stderr

        async def delivered() -> bool:
            return len(standin_cache.received) == 1

        await eventually(delivered)
        assert process.poll() is None
    assert new not in output.read_text()


async def test_sighup_while_serve_migrates_is_a_reload_once_it_serves(
    empty_database_url: str, tmp_path: Path
) -> None:
    """A reload (systemd's ExecReload) while `serve` still waits to migrate: it keeps
    starting, then serves with the secrets written before the HUP (before, SIGHUP's
    default action killed it, exit 129, without a line)."""
    env, old = processes.receiver_env(empty_database_url)
    secrets_file = tmp_path / "webhook_secrets"
    secrets_file.write_text(old)
    env.pop("RECEIVER_WEBHOOK_SECRETS")
    env["RECEIVER_WEBHOOK_SECRETS_FILE"] = str(secrets_file)
    holder = await asyncpg.connect(empty_database_url)
    try:
        # Another replica bootstrapping this database: serve waits for its lock.
        await holder.fetchval("SELECT pg_advisory_lock(hashtextextended('receiver.migrate', 0))")
        port = processes.free_port()
        with processes.serving(["--port", str(port)], env) as (process, output):
            await _logged(output, "migration_lock_waiting")
            new = helpers.new_secret()
            secrets_file.write_text(f"{new},{old}")
            process.send_signal(signal.SIGHUP)
            await holder.fetchval(
                "SELECT pg_advisory_unlock(hashtextextended('receiver.migrate', 0))"
            )
            await processes.wait_healthy(port, process)
            (line,) = await _logged(output, "configuration_reloaded")
            assert line["changed"] == ["RECEIVER_WEBHOOK_SECRETS"]
            body = helpers.encode(helpers.onboarding())
            assert (await processes.post_signed(port, new, body))[0] == 200
    finally:
        await holder.close()


async def test_reloads_while_workers_start_kill_none(database_url: str) -> None:
    """SIGHUPs sent to the `serve --workers 2` supervisor as fast as a script can while
    its workers start: none dies, the service serves (before, each worker forwarded a
    HUP before its handler existed died of it, and five made a crash loop)."""
    env, secret = processes.receiver_env(database_url)
    port = processes.free_port()
    with processes.serving(["--port", str(port), "--workers", "2"], env) as (process, output):
        status = Path(f"/proc/{process.pid}/status")

        async def catches_hangups() -> bool:
            text = await asyncio.to_thread(status.read_text)
            caught = next(line for line in text.splitlines() if line.startswith("SigCgt:"))
            return bool(int(caught.split()[1], 16) & (1 << (signal.SIGHUP - 1)))

        await eventually(catches_hangups)  # before that, the supervisor's own start
        listening: list[dict[str, object]] = []
        sent = 0
        while len(listening) < 2 or sent < 50:
            process.send_signal(signal.SIGHUP)
            sent += 1
            assert sent < 3000, "the workers never listened"
            await asyncio.sleep(0.01)
            listening = [line for line in _lines(output) if line.get("event") == "listening"]
        await processes.wait_healthy(port, process)
        body = helpers.encode(helpers.onboarding())
        assert (await processes.post_signed(port, secret, body))[0] == 200
        assert process.poll() is None
        events = {line.get("event") for line in _lines(output)}
    assert "worker_exited" not in events
    assert "worker_crash_loop" not in events


async def test_readiness_fails_first_while_deliveries_are_answered(database_url: str) -> None:
    """After SIGTERM, with a shutdown delay, /readyz answers 503 while a signed delivery
    is still stored and answered 200; a second signal ends the delay."""
    env, secret = processes.receiver_env(database_url, RECEIVER_SHUTDOWN_DELAY_SECONDS="120")
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)
        assert (await _status(f"http://127.0.0.1:{port}/readyz"))[0] == 200
        process.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + 30
        while (await _status(f"http://127.0.0.1:{port}/readyz"))[0] != 503:
            assert asyncio.get_running_loop().time() < deadline, "/readyz never failed"
            await asyncio.sleep(0.05)
        body = helpers.encode(helpers.onboarding())
        status, _ = await processes.post_signed(port, secret, body)
        assert status == 200
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0


async def _supervisor_death_leaves_no_worker(database_url: str, signum: int) -> None:
    env, _ = processes.receiver_env(database_url)
    port = processes.free_port()
    with processes.serving(["--port", str(port), "--workers", "2"], env) as (process, output):
        await processes.wait_healthy(port, process)
        workers = await listening_pids(output, 2)
        process.send_signal(signum)
        await asyncio.to_thread(process.wait, 30)
        for pid in workers:
            assert await _gone(pid), f"worker {pid} outlived its supervisor"
    # Nobody listens any more: the port can be bound without SO_REUSEPORT.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


async def test_workers_exit_when_their_supervisor_is_killed(database_url: str) -> None:
    """kill -KILL of the `serve --workers 2` supervisor: both workers exit within
    seconds, no orphan keeps the port."""
    await _supervisor_death_leaves_no_worker(database_url, signal.SIGKILL)


async def test_the_admin_port_serves_probes_and_metrics_and_nothing_else(
    database_url: str,
) -> None:
    """With RECEIVER_ADMIN_PORT, /metrics, /openapi.json, /healthz, /readyz answer there
    and 404 on the public port; the webhook is not on the admin port; no answer has a
    Server header naming versions."""
    admin = processes.free_port()
    env, _ = processes.receiver_env(database_url, RECEIVER_ADMIN_PORT=str(admin))
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(admin, process)
        for path in ("/metrics", "/openapi.json", "/healthz", "/readyz"):
            status, server = await _status(f"http://127.0.0.1:{admin}{path}")
            assert status == 200, path
            assert server == "receiver"
            status, server = await _status(f"http://127.0.0.1:{port}{path}")
            assert status == 404, path
            assert server == "receiver"
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{admin}/webhooks/debitura", data=b"{}") as answer,
        ):
            assert answer.status == 404


async def test_values_under_an_unconfigured_key_are_said_at_start_and_counted(
    post: Post, settings: Settings
) -> None:
    """A receiver started with a key id that did not seal the stored values names them
    at start (`sealed_under_unconfigured_key`) and counts them in
    receiver_sealed_values_unopenable."""
    assert (await (await post(helpers.onboarding())).json())["status"] == "processed"
    env = operator_env(settings)
    env["RECEIVER_TOKEN_KEYS"] = "k9:" + base64.b64encode(secrets.token_bytes(32)).decode()
    env["RECEIVER_SHUTDOWN_DELAY_SECONDS"] = "0"
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, output):
        await processes.wait_healthy(port, process)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as answer,
        ):
            scrape = await answer.text()
    lines = [json.loads(x) for x in output.read_text().splitlines() if x[:1] == "{"]
    (warning,) = [x for x in lines if x["event"] == "sealed_under_unconfigured_key"]
    assert warning["key_ids"] == ["k1"]
    assert 'receiver_sealed_values_unopenable{kind="tokens"} 1.0' in scrape

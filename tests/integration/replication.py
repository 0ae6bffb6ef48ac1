"""A Postgres primary and a streaming standby, started for one test from the Postgres
server programs, which the test may fail over: stop the primary (`pg_ctl stop -m
immediate`, a crash) and promote the standby (docs/design.md §9, Failover).

The programs are those of the Postgres the suite runs against: the system's
(`pg_config --bindir`) when RECEIVER_TEST_DATABASE_URL names one, else the embedded
package's. They run as the unprivileged `postgres` user when the tests run as root
(Postgres refuses root), with data directories and sockets in one mkdtemp directory,
listening on loopback ports found free.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg

from receiver.db import embedded, migrations
from tests.integration import processes, standins

PROGRAMS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
STANDBY_NAME = "standby1"
DATABASE = "receiver"
# Small and quick: a test cluster, not a tuned one. fsync off costs nothing the test
# can see: `-m immediate` kills the server, not the machine, and what it wrote is in
# the operating system's cache either way.
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c wal_level=replica -c max_wal_senders=4"
    " -c hot_standby=on -c fsync=off -c shared_buffers=16MB -c max_connections=60"
)


def server_programs() -> tuple[Path | None, str]:
    """Where the server programs are, or None and why not."""
    if os.environ.get("RECEIVER_TEST_DATABASE_URL"):
        pg_config = shutil.which("pg_config")
        if pg_config is None:
            return None, "pg_config is not installed (the Postgres server programs)"
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        bindir = Path(found.stdout.strip())
    else:
        bindir = embedded.bin_dir()
    missing = [name for name in PROGRAMS if not (bindir / name).exists()]
    if missing:
        return None, f"no {', '.join(missing)} in {bindir}"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return None, "running as root without runuser (Postgres refuses to run as root)"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None, "running as root with no `postgres` user to run Postgres as"
    return bindir, ""


class Replicated:
    """A primary and its standby; `dsn` names both (the primary first), as a partner
    configures RECEIVER_DATABASE_URL."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.root = bindir, root
        self.primary_dir, self.standby_dir = root / "primary", root / "standby"
        self.primary_port, self.standby_port = processes.free_port(), processes.free_port()
        self._as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def dsn(self, attrs: str = "read-write") -> str:
        """The multi-host URL (libpq syntax) naming the primary, then the standby."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
            f"/{DATABASE}?target_session_attrs={attrs}"
        )

    def single(self, port: int, database: str = DATABASE) -> str:
        """The URL of one of the two servers."""
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    def run(self, program: str, *args: str) -> None:
        """Run a server program as the unprivileged user; fail with its output."""
        done = subprocess.run(
            [*self._as_postgres, str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            logs = "".join(
                f"\n{log.name} (tail):\n{log.read_text()[-2000:]}"
                for log in (self.root / "primary.log", self.root / "standby.log")
                if log.exists()
            )
            raise AssertionError(
                f"{program} {' '.join(args)} exited {done.returncode}: "
                f"{done.stdout}{done.stderr}{logs}"
            )

    def start_server(self, data: Path, port: int, extra: str = "") -> None:
        """Start one server (waits until it accepts connections)."""
        options = f"-p {port} -k {self.root} {SERVER_OPTIONS} {extra}"
        log = self.root / f"{data.name}.log"
        self.run(
            "pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"
        )

    async def start(self, *, synchronous: bool) -> None:
        """Primary up with the schema migrated, standby streaming from it; with
        `synchronous`, a commit waits for the standby (synchronous_standby_names)."""
        self.run("initdb", "-D", str(self.primary_dir), "-U", "postgres", "--auth=trust")
        self.start_server(self.primary_dir, self.primary_port)
        admin = await asyncpg.connect(self.single(self.primary_port, "postgres"))
        try:
            await admin.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await admin.close()
        await migrations.apply(self.single(self.primary_port))
        self.run(
            "pg_basebackup",
            *("-D", str(self.standby_dir), "-R", "-X", "stream", "--checkpoint=fast"),
            *("-h", str(self.root), "-p", str(self.primary_port), "-U", "postgres"),
        )
        # The walreceiver names itself after cluster_name: synchronous_standby_names
        # refers to it. Set on the primary only after the base backup, so the standby,
        # once promoted, waits for no standby of its own.
        self.start_server(self.standby_dir, self.standby_port, f"-c cluster_name={STANDBY_NAME}")
        primary = await asyncpg.connect(self.single(self.primary_port, "postgres"))
        try:
            if synchronous:
                await primary.execute(
                    f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'"
                )
                await primary.execute("SELECT pg_reload_conf()")
            wanted = "sync" if synchronous else "async"

            async def streaming() -> bool:
                state = await primary.fetchval(
                    "SELECT sync_state FROM pg_stat_replication"
                    " WHERE application_name = $1 AND state = 'streaming'",
                    STANDBY_NAME,
                )
                return bool(state == wanted)

            await standins.eventually(streaming, seconds=60)
        finally:
            await primary.close()

    async def pause_replication(self) -> None:
        """Stop the primary's WAL sender (SIGSTOP): a standby falling behind, as a slow
        network or a busy standby makes it. With asynchronous replication, commits go
        on without it; an immediate stop then kills it (SIGKILL, after Postgres's
        5 s grace), and what it had not sent never reaches the standby."""
        conn = await asyncpg.connect(self.single(self.primary_port, "postgres"))
        try:
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_replication WHERE application_name = $1", STANDBY_NAME
            )
        finally:
            await conn.close()
        assert pid is not None, "no WAL sender for the standby"
        os.kill(pid, signal.SIGSTOP)

    def crash_primary(self) -> None:
        """Stop the primary as a crash does: no checkpoint, sessions cut."""
        self.run("pg_ctl", "-D", str(self.primary_dir), "-m", "immediate", "-w", "stop")

    def promote_standby(self) -> None:
        """Promote the standby; returns once it takes writes."""
        self.run("pg_ctl", "-D", str(self.standby_dir), "-w", "-t", "60", "promote")

    def stop(self) -> None:
        """Stop whatever still runs."""
        for data in (self.primary_dir, self.standby_dir):
            if (data / "postmaster.pid").exists():
                self.run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")


@contextmanager
def replicated(bindir: Path) -> Iterator[Replicated]:
    """A primary and a standby (started by the caller with `start`), stopped and
    removed on exit whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="receiver-failover-"))
    if os.geteuid() == 0:
        postgres = pwd.getpwnam("postgres")
        os.chown(root, postgres.pw_uid, postgres.pw_gid)
    os.chmod(root, 0o700)
    pair = Replicated(bindir, root)
    try:
        yield pair
    finally:
        try:
            pair.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)

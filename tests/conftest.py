"""Session-wide fixtures: a real Postgres, a migrated template, logs under watch.

Postgres is the one `RECEIVER_TEST_DATABASE_URL` names, else an embedded Postgres
started for the session. The schema is migrated once into a template database and
each test gets its own clone.

Under pytest-xdist (`make test` runs several workers) each worker is a session of its
own: its own embedded Postgres or template, its own database names (the pid is in
them). The log directory is the one thing they share: the controller makes it before
the workers start (they inherit its path through the environment), every worker
leaves its canaries there when it finishes, and the controller searches every log in
it once all of them have.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from receiver import log
from receiver.db import embedded, migrations
from tests import helpers

_SHARED_LOG_DIR = "PYTEST_RECEIVER_LOG_DIR"
LOG_DIR = Path(os.environ.get(_SHARED_LOG_DIR) or tempfile.mkdtemp(prefix="receiver-test-logs-"))
os.environ[_SHARED_LOG_DIR] = str(LOG_DIR)  # for the xdist workers this process starts
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
SESSION_LOG = LOG_DIR / f"session-{_WORKER or 'main'}.log"
_counter = itertools.count()


def with_database(dsn: str, name: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


_session_stream: list[TextIO] = []


def log_to_session_file() -> None:
    """Send every log record through the product's redaction into the session log,
    which pytest_sessionfinish searches for canary tokens."""
    if not _session_stream:
        _session_stream.append(SESSION_LOG.open("a", buffering=1))
    log.configure(fmt="json", level="debug", stream=_session_stream[0])


def pytest_configure(config: pytest.Config) -> None:
    log_to_session_file()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for stream in _session_stream:
        stream.flush()
    if _WORKER is not None:
        # A worker leaves its canaries for the controller, which searches the logs of
        # every worker once all have finished (a .txt: it is not searched itself).
        (LOG_DIR / f"canaries-{_WORKER}.txt").write_text("\n".join(sorted(helpers.CANARIES)))
        return
    for left in LOG_DIR.glob("canaries-*.txt"):
        helpers.CANARIES.update(line for line in left.read_text().splitlines() if line)
    texts = [p.read_text(errors="replace") for p in LOG_DIR.rglob("*.log")]
    combined = "\n".join(texts)
    leaks = helpers.find_canaries(combined)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    summary = (
        f"canary check: {len(helpers.CANARIES)} test tokens searched in "
        f"{len(texts)} log file(s), {len(combined.splitlines())} lines: {len(leaks)} leaked"
    )
    if reporter is not None:
        reporter.write_line(summary)
    if leaks:
        if reporter is not None:
            reporter.write_line(f"LEAK: test tokens found in logs under {LOG_DIR}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        shutil.rmtree(LOG_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def server_dsn() -> str:
    """A DSN to a maintenance database on the test Postgres server."""
    given = os.environ.get("RECEIVER_TEST_DATABASE_URL")
    if given:
        return given
    # A directory of its own, not under pytest's basetemp: other pytest runs on the
    # machine prune and re-chmod old basetemps, and took the data directory from under
    # a running server (168 errors in one full run).
    root = Path(tempfile.mkdtemp(prefix="receiver-test-pg-"))
    # atexit runs the last registered first: this removal runs after the server's own
    # stop, which embedded.start registers, at the end of the session's process.
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return embedded.start(root)


@pytest.fixture(scope="session")
def template_name(server_dsn: str) -> Iterator[str]:
    """A database migrated once for the session, cloned by every test."""
    name = f"receiver_tpl_{os.getpid()}"

    async def create() -> None:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        await migrations.apply(with_database(server_dsn, name))

    asyncio.run(create())
    yield name
    asyncio.run(drop_database(server_dsn, name))


async def drop_database(server_dsn: str, name: str) -> None:
    """Drop a database the suite created, closing any session still on it."""
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def unique_name(prefix: str) -> str:
    """A database name no other test of this run (or a parallel run) uses."""
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


async def create_database(server_dsn: str, name: str, template: str | None = None) -> None:
    """Create database `name`, a clone of `template` if given."""
    conn = await asyncpg.connect(server_dsn)
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()


@contextmanager
def cloned_database(server_dsn: str, template: str, prefix: str) -> Iterator[str]:
    """A clone of the migrated template for a block (module fixtures): its URL."""
    name = unique_name(prefix)
    asyncio.run(create_database(server_dsn, name, template))
    try:
        yield with_database(server_dsn, name)
    finally:
        asyncio.run(drop_database(server_dsn, name))


@pytest.fixture
async def database_url(server_dsn: str, template_name: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = unique_name("receiver_t")
    await create_database(server_dsn, name, template_name)
    yield with_database(server_dsn, name)
    await drop_database(server_dsn, name)


@pytest.fixture
async def empty_database_url(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all."""
    name = unique_name("receiver_e")
    await create_database(server_dsn, name)
    yield with_database(server_dsn, name)
    await drop_database(server_dsn, name)

"""Forward-only schema migrations from `sql/NNNN_name.sql`.

Applied by `receiver migrate` and at `serve` start. A session advisory lock makes
replicas that start together take turns; each migration runs in its own
transaction and is recorded with a checksum, so an edited, already-applied file is
refused rather than silently ignored.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from receiver import db, errors

log = structlog.get_logger(__name__)

_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
BASELINE = "0001_baseline"
# The four files 0001_baseline squashed, with their checksums as last shipped: a
# database they built has exactly the baseline's schema, so it is recorded as at
# the baseline and keeps its data (sql/README.md).
SQUASHED = {
    "0001_initial": "523316080615115d45704afddff5ce2eb2cfa7dec62ddee3f4fd1c5661db9834",
    "0002_token_lifecycle": "5b53e68cf95eca8a58c4ed23b77a5eac5706f3ef61b1a50de98bba5cdbf5b7da",
    "0003_signal_delivery": "a4f96cf114152f652d63ca4fd81b18425dd337d1900c98b58bd921b4ecbe600e",
    "0004_group_commit": "636eaede7f774d505b52e047cb53d5d55cf16e8691aa2cc644cd6a666894f1ca",
}


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_dir() -> Path:
    """Where the migrations are: inside the database package, in a checkout and in an
    installed wheel alike."""
    return Path(__file__).with_name("sql")


@functools.cache
def available() -> tuple[Migration, ...]:
    """Every migration file, in order. Read once: they ship with the code, and the
    readiness probe asks on every call."""
    files = sorted(p for p in sql_dir().iterdir() if _FILE_NAME.match(p.name))
    return tuple(Migration(name=p.stem, sql=p.read_text()) for p in files)


async def apply(dsn: str, *, until: str | None = None) -> list[str]:
    """Bring the schema up to date (or up to and including `until`, for tests of a
    migration's data changes); return the names applied now."""
    conn = await db.connect(dsn)
    try:
        async with db.translated_errors():
            await conn.execute(db.QUERIES["migration_lock"])
            try:
                return await _apply_locked(conn, until)
            finally:
                await conn.execute(db.QUERIES["migration_unlock"])
    finally:
        await conn.close()


async def _apply_locked(conn: db.Connection, until: str | None) -> list[str]:
    # Only a new database needs DDL here: a role without it (receiver_runtime) can
    # start a service on a database its owner has migrated.
    if not await conn.fetchval(db.QUERIES["migration_table_exists"]):
        await conn.execute(db.QUERIES["migration_bootstrap"])
    done = {r["name"]: r["checksum"] for r in await conn.fetch(db.QUERIES["migration_checksums"])}
    if set(SQUASHED) & set(done):
        done = await _adopt_squashed(conn, done)
    applied = []
    for migration in available():
        if until is not None and migration.name > until:
            break
        if migration.name in done:
            if done[migration.name] != migration.checksum:
                raise errors.MigrationError(
                    f"migration {migration.name} was edited after it was applied; "
                    "migrations are forward-only: add a new file instead"
                )
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(db.QUERIES["migration_record"], migration.name, migration.checksum)
        log.info("migration_applied", migration=migration.name)
        applied.append(migration.name)
    return applied


async def _adopt_squashed(conn: db.Connection, done: dict[str, str]) -> dict[str, str]:
    if {name: done.get(name) for name in SQUASHED} != SQUASHED:
        raise errors.MigrationError(
            "this database was migrated by pre-release files that differ from the last "
            "shipped ones; recreate it (see sql/README.md)"
        )
    baseline = next(m for m in available() if m.name == BASELINE)
    async with conn.transaction():
        await conn.execute(db.QUERIES["migration_forget"], list(SQUASHED))
        await conn.execute(db.QUERIES["migration_record"], baseline.name, baseline.checksum)
    log.info("migration_baseline_adopted", replaced=sorted(SQUASHED))
    remaining = {k: v for k, v in done.items() if k not in SQUASHED}
    return remaining | {baseline.name: baseline.checksum}


async def pending(database: db.Database) -> list[str]:
    """Migrations not yet applied to the database behind the pool."""
    try:
        rows = await database.fetch("applied_migrations")
    except errors.SchemaNotReady:
        return [m.name for m in available()]
    applied = {r["name"] for r in rows}
    return [m.name for m in available() if m.name not in applied]


async def status(database: db.Database) -> list[tuple[str, datetime | None]]:
    """Every known migration with when it was applied (None: pending), in order."""
    try:
        rows = await database.fetch("migration_status")
    except errors.SchemaNotReady:
        rows = []
    applied = {r["name"]: r["applied_at"] for r in rows}
    return [(m.name, applied.get(m.name)) for m in available()]

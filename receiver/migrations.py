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
from pathlib import Path

import structlog

from receiver import db, errors

log = structlog.get_logger(__name__)

_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


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
    """Where the migrations are: inside an installed wheel, or beside the package in
    a checkout (DESIGN §8 keeps them at the top level)."""
    packaged = Path(__file__).with_name("sql")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "sql"


@functools.cache
def available() -> tuple[Migration, ...]:
    """Every migration file, in order. Read once: they ship with the code, and the
    readiness probe asks on every call."""
    files = sorted(p for p in sql_dir().iterdir() if _FILE_NAME.match(p.name))
    return tuple(Migration(name=p.stem, sql=p.read_text()) for p in files)


async def apply(dsn: str) -> list[str]:
    """Bring the schema up to date; return the names applied now."""
    conn = await db.connect(dsn)
    try:
        async with db.translated_errors():
            await conn.execute(db.QUERIES["migration_lock"])
            try:
                return await _apply_locked(conn)
            finally:
                await conn.execute(db.QUERIES["migration_unlock"])
    finally:
        await conn.close()


async def _apply_locked(conn: db.Connection) -> list[str]:
    await conn.execute(db.QUERIES["migration_bootstrap"])
    done = {r["name"]: r["checksum"] for r in await conn.fetch(db.QUERIES["migration_checksums"])}
    applied = []
    for migration in available():
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


async def pending(database: db.Database) -> list[str]:
    """Migrations not yet applied to the database behind the pool."""
    try:
        rows = await database.fetch("applied_migrations")
    except errors.SchemaNotReady:
        return [m.name for m in available()]
    applied = {r["name"] for r in rows}
    return [m.name for m in available() if m.name not in applied]

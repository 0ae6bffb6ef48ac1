"""Forward-only schema migrations from `sql/NNNN_name.sql`.

Applied by `receiver migrate` and at `serve` start. Each migration runs in its own
transaction, which first locks the migrations table (replicas that start together
take turns; a role with no privilege on it, the cache reader, cannot take that lock:
an advisory lock, which any role can take, guards only the bootstrap of a database
with no schema yet), and is recorded with a checksum, so an edited, already-applied
file is refused rather than silently ignored.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import structlog

from receiver import db, errors

log = structlog.get_logger(__name__)

_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
BASELINE = "0001_baseline"
# The ten files 0001_baseline squashed, with their checksums as last shipped: a
# database they built has exactly the baseline's schema, so it is recorded as at
# the baseline and keeps its data (sql/README.md, "The baseline"). The first of them
# bears the baseline's own name, with another checksum.
SQUASHED = {
    "0001_baseline": "b1a5ef0edd21a23c02c7ecf5b401c9be1a93c82263157c5666af83ae814dd102",
    "0002_quarantine_and_environments": (
        "883ad553da933b0cbc4f9e7aef29e51bd8b07f4a1bacda3fcf1df9982c03fdc1"
    ),
    "0003_sealed_key_indexes": "0cde412ad0f847b884336c1bae39e8c667150173767ffffef29b5a5a18801321",
    "0004_retention_erasure_audit": (
        "81e9a4cf8fe90f123b60c14c5f9a9e23f798dadfeb4bfb7831ed5e0f33df4cdb"
    ),
    "0005_roles_and_cache_view": "fdafc592c046c1cac12ce7c51c416257a99b9a19ae51a0c08502a42c58ec14fd",
    "0006_revocation_counts": "c4b6520eee167e5c29d33b96204c55b52eb986e9d05852a9de7849cf3b956a69",
    "0007_set_based_group": "ebc0578f7d8ed4d7d4e2f4470603c6aba9500673e60dec8e0fcc833cf80a7bc4",
    "0008_post_drop_dead_functions": (
        "b9dbdbf2e8326224df164efa32e745959d17f3c9f9fc107ae4645edd89eb8ebd"
    ),
    "0009_pre_one_lifecycle": "8e103b43cc7e554c1a4c22f8640c427873741b154433ad931ac28393f807b7d3",
    "0010_post_drop_replaced_lifecycle": (
        "60bc62b78405b8305bab13afae0394dea5a9f83515485d4d96493688d14788b1"
    ),
}
# Earlier texts of a shipped file whose effect on a database is the same as the
# current text's: a database that recorded one is at that migration. Each maps to the
# checksum of the one text it is equivalent to, so an edit of the current file is
# still refused on such a database. 0001_baseline's role creation first skipped roles
# that already exist (a migration owner without CREATEROLE could not migrate even
# once an administrator had created them). 0024_reseal_in_place's first two texts
# failed on rows the baseline's NOT VALID checks let through (a redacted body with
# neither a value nor a drop time; an active token with neither); where they
# succeeded, the current text does the same.
EQUIVALENT = {
    "0001_baseline": {
        "a2cdbaf6375a78ff12ce3113268d00a33c9bf42f92496b01cb46d81e34c1c69d": (
            "b9746f4a8682e9b9b62c073dde5a38e30a7ba97bd0680e7acf9201650b20731c"
        ),
    },
    "0024_reseal_in_place": {
        "571e6caff741fdac54ef15d5e00b5297ef12680cf8b00d40f629b36b10041795": (
            "cdd086837300a311e0e66413822f50e233728536ac19f2b9753a0f8d0d7dab4f"
        ),
        "9da0c7c44d14b38338d5ae0c85b2aa2266c5ba983bc81233b55cc2371f9ce366": (
            "cdd086837300a311e0e66413822f50e233728536ac19f2b9753a0f8d0d7dab4f"
        ),
    },
}
# The group roles the baseline creates when missing (README "Roles"); creating them
# needs CREATEROLE, so `receiver migrate --print-roles` prints the SQL for a superuser.
GROUP_ROLES = ("receiver_runtime", "receiver_cache_reader")

# The files of the first squash (into the first 0001_baseline): a database only they
# built lacks what 0002-0010 added, and those files no longer ship, so it is refused.
RETIRED = frozenset(
    {"0001_initial", "0002_token_lifecycle", "0003_signal_delivery", "0004_group_commit"}
)


# The migration lock (the migrations table, locked by each migration's transaction;
# the bootstrap's advisory lock before that table exists) is waited for in slices,
# each ending in a log line naming who holds it, and given up after this long.
LOCK_WAIT_SECONDS = 300.0
LOCK_SLICE_SECONDS = 10.0


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
    """Where the migrations are: `receiver/sql/` in an installed wheel (the wheel ships
    the top-level `sql/` there as package data), else the checkout's top-level `sql/`."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "sql"
    return packaged if packaged.is_dir() else package.parent / "sql"


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
        async with db.translated_errors(conn):
            if not await conn.fetchval(db.QUERIES["migration_table_exists"]):
                await _roles_creatable(conn)
                await _bootstrap(conn)
            return await _apply_pending(conn, until)
    finally:
        await conn.close()


async def _roles_creatable(conn: db.Connection) -> None:
    """Before the first migration: a group role that is missing must be creatable by
    this role, else one line says which and how (not a traceback midway)."""
    row = await conn.fetchrow(db.QUERIES["roles_missing"], list(GROUP_ROLES))
    assert row is not None
    if row["missing"] and not row["may_create"]:
        raise errors.ConfigError(
            f"role {row['missing'][0]} does not exist, and creating it needs CREATEROLE, "
            f"which {row['role']} lacks: run the SQL `receiver migrate --print-roles` "
            f"prints once as a superuser (or grant {row['role']} CREATEROLE), then "
            "`receiver migrate` again"
        )


def roles_sql() -> str:
    """The SQL a superuser runs once per Postgres cluster before a least-privilege
    `receiver migrate` (README "Roles"), with example login roles."""
    lines = [
        "-- Once per Postgres cluster, as a superuser (or a role with CREATEROLE):",
        *(f"CREATE ROLE {role} NOLOGIN;" for role in GROUP_ROLES),
        "-- Login roles of your own (names and passwords are yours), for example:",
        "-- CREATE ROLE receiver_owner LOGIN PASSWORD '...';   -- runs `receiver migrate`",
        "-- CREATE DATABASE receiver OWNER receiver_owner;",
        "-- CREATE ROLE receiver_app LOGIN PASSWORD '...' IN ROLE receiver_runtime;",
        "-- CREATE ROLE cache_app LOGIN PASSWORD '...' IN ROLE receiver_cache_reader;",
    ]
    return "\n".join(lines) + "\n"


async def _bootstrap(conn: db.Connection) -> None:
    """Create the schema and the migrations table. Before they exist there is no table
    to lock, so only this step takes the advisory lock (any role can take it; on a
    database with no schema yet, no partner application runs)."""
    await _wait_for(conn, "migration_try_lock", "migration_lock")
    try:
        if not await conn.fetchval(db.QUERIES["migration_table_exists"]):
            await conn.execute(db.QUERIES["migration_bootstrap"])
    finally:
        await conn.execute(db.QUERIES["migration_unlock"])


async def _apply_pending(conn: db.Connection, until: str | None) -> list[str]:
    """Each pending migration in its own transaction, which first locks the
    migrations table (only roles with a privilege on it can: never the cache
    reader) and looks again: a replica migrating at the same time waits, then finds
    it applied. Nothing pending, nothing locked: `serve` starts without waiting."""
    done = {r["name"]: r["checksum"] for r in await conn.fetch(db.QUERIES["migration_checksums"])}
    if _built_by_squashed_files(done):
        async with conn.transaction():
            await _lock_table(conn)
            done = {
                r["name"]: r["checksum"]
                for r in await conn.fetch(db.QUERIES["migration_checksums"])
            }
            if _built_by_squashed_files(done):
                done = await _adopt_squashed(conn, done)
    applied = []
    for migration in available():
        if until is not None and migration.name > until:
            break
        if migration.name not in done:
            async with conn.transaction():
                try:
                    await _lock_table(conn)
                except asyncpg.InsufficientPrivilegeError:
                    # It reads the migrations (the runtime role) but may not apply one.
                    raise errors.ConfigError(
                        f"migration {migration.name} is pending, and role "
                        f"{db.role_of(conn)!r} may not apply it: run `receiver migrate` "
                        "first, as the role that owns the database (the migrate Job)"
                    ) from None
                now = await conn.fetchval(db.QUERIES["migration_checksum"], migration.name)
                if now is None:
                    await conn.execute(migration.sql)
                    await conn.execute(
                        db.QUERIES["migration_record"], migration.name, migration.checksum
                    )
                    log.info("migration_applied", migration=migration.name)
                    applied.append(migration.name)
                done[migration.name] = now or migration.checksum
        if EQUIVALENT.get(migration.name, {}).get(done[migration.name]) == migration.checksum:
            done[migration.name] = migration.checksum
        if done[migration.name] != migration.checksum:
            raise errors.MigrationError(
                f"migration {migration.name} was edited after it was applied; "
                "migrations are forward-only: add a new file instead"
            )
    return applied


async def _lock_table(conn: db.Connection) -> None:
    """Lock the migrations table for this transaction (in a savepoint per try, so a
    lock timeout leaves the transaction usable)."""

    async def attempt(query: str) -> bool:
        try:
            async with conn.transaction():
                await conn.execute(db.QUERIES[query])
        except asyncpg.LockNotAvailableError:
            return False
        return True

    started = time.monotonic()
    while not await attempt("migration_table_try_lock"):
        await _say_who(conn, started)
        await conn.execute(db.QUERIES["lock_timeout"], f"{round(LOCK_SLICE_SECONDS * 1000)}ms")
        try:
            if await attempt("migration_table_lock"):
                return
        finally:
            await conn.execute(db.QUERIES["lock_timeout"], "0")


async def _wait_for(conn: db.Connection, try_query: str, wait_query: str) -> None:
    """Take the bootstrap's advisory lock; while another session holds it, say who,
    every slice."""
    started = time.monotonic()
    while not await conn.fetchval(db.QUERIES[try_query]):
        await _say_who(conn, started)
        await conn.execute(db.QUERIES["lock_timeout"], f"{round(LOCK_SLICE_SECONDS * 1000)}ms")
        try:
            await conn.execute(db.QUERIES[wait_query])
        except asyncpg.LockNotAvailableError:
            continue
        else:
            return
        finally:
            await conn.execute(db.QUERIES["lock_timeout"], "0")


async def _say_who(conn: db.Connection, started: float) -> None:
    """Log who holds the migration lock; give up once it has been held too long."""
    waited = time.monotonic() - started
    holder = await conn.fetchrow(db.QUERIES["migration_lock_holder"])
    who = dict(holder) if holder is not None else {}
    log.warning("migration_lock_waiting", waited_seconds=round(waited, 1), **who)
    if waited >= LOCK_WAIT_SECONDS:
        raise errors.MigrationError(
            f"the migration lock has been held for over {LOCK_WAIT_SECONDS:g} s by "
            f"pid {who.get('holder_pid')} (role {who.get('holder_role')!r}, address "
            f"{who.get('holder_address')}); if that is not a migration in progress, "
            "end that session (pg_terminate_backend) and start again"
        )


def _built_by_squashed_files(done: dict[str, str]) -> bool:
    # The baseline's name alone says nothing: its checksum tells the squashed
    # 0001_baseline from the current one.
    names = set(done) - {BASELINE}
    return bool(names & (set(SQUASHED) | RETIRED)) or done.get(BASELINE) == SQUASHED[BASELINE]


async def _adopt_squashed(conn: db.Connection, done: dict[str, str]) -> dict[str, str]:
    if {name: done.get(name) for name in SQUASHED} != SQUASHED:
        raise errors.MigrationError(
            "this database was migrated by pre-release files that no longer ship, or by "
            "other versions of them; recreate it (see sql/README.md)"
        )
    baseline = next(m for m in available() if m.name == BASELINE)
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

"""The schema as one readable file: `sql/schema.sql`, and how it is compared.

`sql/schema.sql` is what the migrations build, written out by `pg_dump` and stripped
of its noise. The suite builds one database from it and one from the migrations and
compares their dumps (tests/integration/test_schema.py), so a migration without its
schema change, or the reverse, fails. Regenerate after adding a migration:

    make schema
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import asyncpg

from receiver.db import embedded, migrations

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "sql" / "schema.sql"
HEADER = """\
-- The receiver's current schema, as the migrations in this folder build it: read
-- this file, not the migrations, to know what is there. Written by `make schema`
-- (pg_dump, noise stripped); tests/integration/test_schema.py checks that a
-- database built from it and one built from the migrations are the same.
-- Never apply it to a database: `receiver migrate` is how schemas change.

"""
_NOISE = re.compile(
    r"^(SET (?!check_function_bodies)|SELECT pg_catalog\.set_config|\\(un)?restrict "
    r"|-- Dumped |-- PostgreSQL database dump|-- Name: |--$"
    # Column options some servers stamp on every column themselves (seen on this
    # machine's Postgres 15: pg_attver=<n>); not part of what the migrations say.
    r"|ALTER TABLE ONLY \S+ ALTER COLUMN \S+ SET \(pg_attver=)"
)


def dump(database_url: str) -> str:
    """The `receiver` schema of a database as comparable text: pg_dump's plain
    output without settings, comments or ownership, its blank lines collapsed."""
    result = subprocess.run(
        [
            str(embedded.bin_dir() / "pg_dump"),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--schema=receiver",
            "--exclude-table=receiver.schema_migrations",
            "--dbname",
            database_url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    lines = [line for line in result.stdout.splitlines() if not _NOISE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


async def _write(server_dsn: str) -> None:
    from tests.conftest import with_database

    name = "receiver_schema_snapshot"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = with_database(server_dsn, name)
            await migrations.apply(url)
            SCHEMA_FILE.write_text(HEADER + dump(url))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


if __name__ == "__main__":
    # The server: the first argument, else an embedded Postgres under .receiver/.
    dsn = sys.argv[1] if len(sys.argv) > 1 else embedded.start(Path(".receiver"))
    asyncio.run(_write(dsn))
    print(f"wrote {SCHEMA_FILE}")

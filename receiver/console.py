"""What every `receiver` command shares: its start-up (logging, settings, the
database it runs against), its exit statuses, and plain tables for its output."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from receiver import config, db, errors, log
from receiver.db import embedded

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def start(args: argparse.Namespace, *, service: bool = False) -> config.Settings:
    """The start-up of every command that needs settings: log until the settings are
    read, read them (`--dev`: the dev secrets), log as they say with their secrets
    masked, and resolve the database (the embedded Postgres when none is set).

    The service logs to stdout (docs/design.md §1); one-shot commands keep stdout for
    their output, which scripts parse, and log to stderr.
    """
    stream = sys.stdout if service else sys.stderr
    log.configure(stream=stream)
    settings = config.load_settings(dev=args.dev)
    log.configure(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=settings.secret_values(),
        stream=stream,
    )
    return resolve_database(settings)


def resolve_database(settings: config.Settings) -> config.Settings:
    """The settings with a DSN: the configured one, else the embedded Postgres's."""
    if settings.database_url is not None:
        return settings
    dsn = embedded.start(settings.data_dir)
    return settings.model_copy(update={"database_url": SecretStr(dsn)})


def dsn(settings: config.Settings) -> str:
    """The resolved database URL (after `start`)."""
    assert settings.database_url is not None, "start() resolves the database"
    return settings.database_url.get_secret_value()


def with_database(
    args: argparse.Namespace,
    work: Callable[[config.Settings, db.Database], Awaitable[int]],
) -> int:
    """Run a one-shot command against the configured (or embedded) database."""
    settings = start(args)

    async def run() -> int:
        database = await db.Database.open(
            dsn(settings), max_size=2, pooled=settings.database_pooled
        )
        try:
            return await work(settings, database)
        finally:
            await database.close()

    return asyncio.run(run())


def timestamp(text: str | None, flag: str) -> datetime | None:
    """An ISO date or time given to `flag` (UTC when it names no zone)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise errors.UsageError(f"{flag} {text!r}: expected an ISO date or time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def print_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool, noun: str = "token"
) -> None:
    """Rows on stdout: one JSON object per line, or a table for people."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows, columns, noun))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], noun: str = "token") -> str:
    """Rows as a plain fixed-width table with a count line."""
    # Hand-written: fixed, unwrapped columns that grep and cut read reliably, which
    # terminal table libraries do not promise off a terminal.
    cells = [[str(row.get(c) if row.get(c) is not None else "-") for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.append(f"({len(rows)} {noun}{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)

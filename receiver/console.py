"""What every `receiver` command shares: its start-up (logging, settings, the
database it runs against), its exit statuses, and plain tables for its output."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

import structlog
from pydantic import SecretStr

from receiver import config, db, endpoints, errors, log
from receiver.db import embedded

logger = structlog.get_logger(__name__)

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def start(
    args: argparse.Namespace,
    *,
    service: bool = False,
    needs: frozenset[str] = config.NEEDS_SERVICE,
) -> config.Settings:
    """The start-up of every command that needs settings: log until the settings are
    read, read them (`--dev`: the dev secrets; only the ones in `needs` must be set),
    log as they say with their secrets masked, name unknown `RECEIVER_*` variables,
    and resolve the database (the embedded Postgres only with `--dev`).

    The service logs to stdout (docs/design.md §1); one-shot commands keep stdout for
    their output, which scripts parse, and log to stderr.
    """
    stream = sys.stdout if service else sys.stderr
    log.configure(stream=stream)
    dev = bool(getattr(args, "dev", False))
    settings = config.load_settings(
        dev=dev, needs=needs, first_use=getattr(args, "command", None) == "serve"
    )
    log.configure(
        level=_level(args, settings, stream, service=service),
        fmt=settings.log_format,
        secrets=settings.secret_values(),
        stream=stream,
    )
    unknown = config.unknown_variables()
    if unknown:
        logger.warning("unknown_settings_ignored", variables=unknown)
    return resolve_database(settings, dev=dev)


def _level(
    args: argparse.Namespace, settings: config.Settings, stream: TextIO, *, service: bool
) -> str:
    """The log level: RECEIVER_LOG_LEVEL's; but a one-shot command on a terminal, unless
    `-v` or the variable is set, logs only errors: its results and its own one-line
    error are what a person reads there, not info lines between them."""
    if service or getattr(args, "verbose", False) or "log_level" in settings.model_fields_set:
        return settings.log_level
    return "error" if stream.isatty() else settings.log_level


def resolve_database(settings: config.Settings, *, dev: bool) -> config.Settings:
    """The settings with a DSN: the configured one, else (only with `--dev`) the
    embedded Postgres's. Production tokens never land in a throwaway database."""
    if settings.database_url is not None:
        return settings
    if not dev:
        raise errors.ConfigError(
            "RECEIVER_DATABASE_URL is required but not set (the embedded Postgres runs "
            "only with --dev)"
        )
    dsn = embedded.start(settings.data_dir)
    return settings.model_copy(update={"database_url": SecretStr(dsn)})


def dsn(settings: config.Settings) -> str:
    """The resolved database URL (after `start`)."""
    assert settings.database_url is not None, "start() resolves the database"
    return settings.database_url.get_secret_value()


def database_label(url: str) -> str:
    """host:port/name of a database URL, never its user or password (the start line);
    every host, comma-separated, when it names a primary and its standbys."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    name = parts.path.lstrip("/") or (query.get("dbname") or ["?"])[0]
    return f"{','.join(endpoints.database_hosts(url))}/{name}"


def with_database(
    args: argparse.Namespace,
    work: Callable[[config.Settings, db.Database], Awaitable[int]],
    *,
    needs: frozenset[str] = config.NEEDS_VAULT,
) -> int:
    """Run a one-shot command against the configured (or, with `--dev`, embedded)
    database; the settings in `needs` must be set."""
    settings = start(args, needs=needs)

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
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    *,
    as_json: bool,
    noun: str = "token",
    limit: int | None = None,
) -> None:
    """Rows on stdout: one JSON object per line, or a table for people; a listing
    that stopped at its `limit` says so on stderr (stdout stays parseable)."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows, columns, noun))
    if limit is not None and len(rows) >= limit:
        print(f"receiver: stopped at --limit {limit}: there may be more", file=sys.stderr)


def _cell(value: Any) -> str:
    """One table cell: `-` for nothing, compact JSON for an object or a list."""
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], noun: str = "token") -> str:
    """Rows as a plain fixed-width table with a count line."""
    # Hand-written: fixed, unwrapped columns that grep and cut read reliably, which
    # terminal table libraries do not promise off a terminal.
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.append(f"({len(rows)} {noun}{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)

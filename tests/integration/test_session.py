"""The test session's own footing: where its Postgres keeps its data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest


async def _data_directory(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW data_directory"))
    finally:
        await conn.close()


def test_the_session_postgres_lives_outside_pytests_basetemp(
    server_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The session's Postgres keeps its data outside pytest's temporary directories,
    which other pytest runs on the machine prune while this one still runs."""
    data_directory = Path(asyncio.run(_data_directory(server_dsn))).resolve()
    basetemp = tmp_path_factory.getbasetemp().resolve()
    # The parent holds every run's basetemp (pytest-of-USER/): all of it is pruned.
    assert not data_directory.is_relative_to(basetemp.parent), data_directory

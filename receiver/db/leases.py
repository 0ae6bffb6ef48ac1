"""Named leases: one replica at a time runs each of `serve`'s schedules.

A lease is a row of `receiver.leases` (sql/0018_1_pre_reader_proof_locks.sql) taken
by an UPDATE for `ttl` seconds and renewed every third of it while the run lasts.
Not an advisory lock: any role that can connect, the partner application's cache
reader included, can take any advisory lock, and holding a schedule's name stopped
every scheduled run. The reader has no privilege on the leases table. Not a
transaction holding a row lock for the run either: a run lasts minutes, and an open
transaction that long holds back vacuum on every table.

A replica that dies holding a lease leaves it to expire (`ttl`); one whose renewal
fails (Postgres unreachable) logs it and goes on: the run's own writes then fail too,
and another replica may take the lease once it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator

import structlog

from receiver import db, errors

log = structlog.get_logger(__name__)

TTL_SECONDS = 60.0


def new_holder() -> str:
    """Who holds a lease, as an operator reads it: host, pid, and a per-hold tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def held(
    database: db.Database, name: str, *, ttl: float = TTL_SECONDS
) -> AsyncIterator[bool]:
    """Take lease `name` for the block (yields True), renewing it while the block runs,
    and let it go after; yields False, holding nothing, when another holder has it."""
    holder = new_holder()
    if await database.fetchval("lease_take", name, holder, ttl) is None:
        yield False
        return
    renewal = asyncio.create_task(_renew(database, name, holder, ttl))
    try:
        yield True
    finally:
        renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewal
        try:
            await database.fetchval("lease_release", name, holder)
        except errors.ReceiverError as exc:  # it expires on its own
            log.warning("lease_release_failed", lease=name, error=type(exc).__name__)


async def _renew(database: db.Database, name: str, holder: str, ttl: float) -> None:
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            until = await database.fetchval("lease_take", name, holder, ttl)
        except errors.ReceiverError as exc:
            log.warning("lease_renewal_failed", lease=name, error=type(exc).__name__)
            continue
        if until is None:
            log.warning("lease_lost", lease=name)

"""Retention: what is kept and for how long (prune).

Retention drops values, never the rows that deduplication and the inventory need:
an event's key stays after its body goes, a token's inventory row after its
ciphertext goes.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import structlog

from receiver import config, db, errors
from receiver.db import leases

log = structlog.get_logger(__name__)

# Rows per prune transaction: small enough that a batch holds its row locks for
# milliseconds, so ingest never waits on it.
PRUNE_BATCH = 500
PRUNE_PAUSE_RATIO = 1.0
PRUNE_LEASE = "receiver.prune"
DAY_SECONDS = 86_400.0


@dataclass(slots=True)
class PruneReport:
    """What a prune dropped (or, dry, would drop)."""

    event_bodies: int = 0
    token_values: int = 0
    signals: int = 0
    ran: bool = True  # False: another process held the prune lock

    def as_dict(self) -> dict[str, int]:
        """The counts, for log lines and JSON output."""
        return {
            "event_bodies": self.event_bodies,
            "token_values": self.token_values,
            "signals": self.signals,
        }


def _ages(settings: config.Settings) -> tuple[float, float, float]:
    return (
        settings.retain_event_bodies_days * DAY_SECONDS,
        settings.retain_token_values_days * DAY_SECONDS,
        settings.retain_signals_days * DAY_SECONDS,
    )


async def prune(
    database: db.Database, settings: config.Settings, *, dry_run: bool = False
) -> PruneReport:
    """Drop what has outlived its retention, in batches of `PRUNE_BATCH` rows, each in
    its own short transaction, under the prune's lease (receiver.db.leases): replicas
    never prune at the same time, and one that finds the lease taken stops
    (`ran=False`), leaving the work to the one that has it."""
    bodies_age, tokens_age, signals_age = _ages(settings)
    if dry_run:
        rows = await database.fetch_count("prune_counts", bodies_age, tokens_age, signals_age)
        return PruneReport(rows[0]["event_bodies"], rows[0]["token_values"], rows[0]["signals"])
    report = PruneReport()
    async with leases.held(database, PRUNE_LEASE) as mine:
        if not mine:
            report.ran = False
        else:
            for name, query, age in (
                ("event_bodies", "prune_event_bodies", bodies_age),
                ("token_values", "prune_token_values", tokens_age),
                ("signals", "prune_signals", signals_age),
            ):
                setattr(report, name, await _batches(database, query, age))
            await fold_tallies(database)
    log.info("prune_done" if report.ran else "prune_skipped", **report.as_dict())
    return report


async def prune_every(database: db.Database, settings: config.Settings) -> None:
    """`serve`'s schedule: a prune every `RECEIVER_PRUNE_INTERVAL_SECONDS` (the first
    after a tenth of it, at most a minute), jittered so replicas spread out; the
    lease lets one of them at a time do the work. A failed run is logged and
    tried again at the next interval: retention is never urgent, ingest is."""
    interval = settings.prune_interval_seconds
    delay = min(interval / 10, 60.0)
    while True:
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 (jitter only)
        delay = interval
        try:
            await prune(database, settings)
        except errors.ReceiverError as exc:
            log.warning("prune_failed", error=type(exc).__name__)
        except Exception:  # a bug must not end the schedule silently
            log.exception("prune_failed")


async def fold_tallies(database: db.Database) -> None:
    """Fold every delta of the sealed and token tallies, a chunk at a time: the
    /metrics refresh folds one chunk per scrape, and where nobody scrapes, the prune
    keeps what the counts' readers sum from growing without end."""
    for query in ("sealed_tallies_fold", "token_tallies_fold"):
        while await database.fetchval(query, db.TALLY_FOLD_CHUNK) >= db.TALLY_FOLD_CHUNK:
            pass


async def _batches(database: db.Database, query: str, age_seconds: float) -> int:
    """Run one prune query batch after batch until a short one."""
    total = 0
    while True:
        started = time.monotonic()
        done: int = await database.fetchval(query, age_seconds, PRUNE_BATCH)
        total += done
        if done < PRUNE_BATCH:
            return total
        # Retention is never urgent, ingest always is: after each batch, a pause as
        # long as the batch took, so a prune takes at most half of one Postgres
        # backend's time and the WAL it writes comes in bursts ingest can absorb.
        await asyncio.sleep((time.monotonic() - started) * PRUNE_PAUSE_RATIO)

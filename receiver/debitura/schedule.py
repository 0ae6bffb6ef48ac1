"""What `serve` does with Debitura on its own schedule (docs/design.md §9).

Rotation (the bearer-token guide's "Pattern 2"): tokens older than
RECEIVER_TOKEN_ROTATE_AFTER_DAYS are rotated with the 24 h grace at start and every
RECEIVER_TOKEN_ROTATE_INTERVAL_SECONDS; unfinished rotations are checked again as
their backoff comes due (seconds at first), so a rotation Debitura applied late is
settled within seconds of it.

Reconciliation: every RECEIVER_RECONCILE_INTERVAL_HOURS each environment is
reconciled with Debitura (`reconcile`), and a client a partner application reported
(a second 401, no token) within a minute.

One replica at a time for each (a lease, receiver.db.leases, held for the run); calls
spread out at RECEIVER_TOKEN_ROTATE_RATE per second; paused, with a doubling pause,
while Debitura answers 5xx or 429; every outcome logged and counted. Off, said once
at start, when no API key is configured.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
import structlog

from receiver import config, db, errors, vault
from receiver.db import leases
from receiver.debitura import api, management, reconcile, rotation
from receiver.lifecycle import audit

log = structlog.get_logger(__name__)

LOCK = "receiver.token_rotation"
RECONCILE_LOCK = "receiver.reconcile"
REPORTS_LOCK = "receiver.reconcile_reports"
ACTOR = audit.Actor("receiver-serve", rotation.DEFAULT_REASON)
RECONCILE_ACTOR = audit.Actor("receiver-serve", "reconcile")
BATCH = 1000
FIRST_PAUSE_SECONDS = 30.0
# The shortest wait between two runs, however soon a rotation's next check is due.
MIN_WAIT_SECONDS = 1.0


Live = Callable[[], config.Settings]


async def run(
    database: db.Database,
    settings: config.Settings,
    sealer: vault.Sealer,
    live: Live | None = None,
) -> None:
    """Run the schedule until cancelled. `live` gives the settings in force now (a
    SIGHUP may have changed the API keys since the start); by default `settings`."""
    current = live or (lambda: settings)
    environments = api.configured(settings)
    if not environments:
        log.info("token_rotation_schedule_off", reason="no Debitura API key configured")
        return
    if settings.token_rotate_after_days <= 0:
        log.info("token_rotation_due_off", reason="RECEIVER_TOKEN_ROTATE_AFTER_DAYS=0")
    log.info(
        "token_rotation_schedule_on",
        environments=environments,
        after_days=settings.token_rotate_after_days,
        interval_seconds=settings.token_rotate_interval_seconds,
    )
    interval = settings.token_rotate_interval_seconds
    pause = FIRST_PAUSE_SECONDS
    async with aiohttp.ClientSession() as session:
        client = api.Api(session, settings)
        while True:
            # Made for each run: the API keys it calls with are the ones in force.
            rotator = rotation.Rotator(database, current(), sealer, client)
            try:
                unavailable = await run_once(rotator, rotator.settings)
            except errors.ReceiverError as exc:
                log.warning("token_rotation_run_failed", error=type(exc).__name__)
                unavailable = True
            except Exception:  # a bug must not end the schedule silently
                log.exception("token_rotation_run_failed")
                unavailable = True
            if unavailable:
                # Debitura (or Postgres) is struggling: come back sooner than the
                # interval, but each time later, never hammering it.
                delay = min(pause, interval)
                pause = min(pause * 2, interval)
                log.info("token_rotation_paused", retry_in_seconds=round(delay))
            else:
                delay, pause = interval, FIRST_PAUSE_SECONDS
            delay = min(delay * random.uniform(0.9, 1.1), await _until_next_check(database))  # noqa: S311 (jitter)
            await asyncio.sleep(max(delay, MIN_WAIT_SECONDS))


async def _until_next_check(database: db.Database) -> float:
    """Seconds until the earliest open rotation is due another check (inf: none)."""
    try:
        at = await database.fetchval("rotation_next_check")
    except errors.ReceiverError:
        return float("inf")
    if at is None:
        return float("inf")
    return float((at - datetime.now(UTC)).total_seconds())


async def run_once(rotator: rotation.Rotator, settings: config.Settings) -> bool:
    """One run under the lease: resume open rotations, then rotate the due tokens.
    True when it stopped because Debitura was unavailable or rate limiting."""
    async with leases.held(rotator.database, LOCK) as mine:
        if not mine:
            log.info("token_rotation_skipped", reason="another replica holds the lease")
            return False
        resumed = await rotator.resume(ACTOR, due_only=True)
        unavailable = any(o.unavailable for o in resumed)
        rotated = []
        if not unavailable and settings.token_rotate_after_days > 0:
            rotated = await rotator.rotate_due(
                ACTOR, limit=BATCH, rate=settings.token_rotate_rate, trigger="schedule"
            )
            unavailable = any(o.unavailable for o in rotated)
    log.info(
        "token_rotation_run",
        resumed=len(resumed),
        rotated=sum(o.ok for o in rotated),
        failed=sum(not o.ok for o in rotated + resumed),
        paused=unavailable,
    )
    return unavailable


async def reconcile_forever(
    database: db.Database,
    settings: config.Settings,
    sealer: vault.Sealer,
    live: Live | None = None,
) -> None:
    """Reconcile on schedule and on partner applications' reports, until cancelled:
    two loops, each under its own lease, so that a long run (a listing of many pages)
    never holds up the clients a partner application reported. After a run that could
    not finish (Debitura unavailable), the next waits twice as long as the last, from
    the poll up to the interval. `live`: as for `run`."""
    current = live or (lambda: settings)
    environments = api.configured(settings)
    if not environments:
        log.info("reconcile_schedule_off", reason="no Debitura API key configured")
        return
    interval = settings.reconcile_interval_hours * 3600
    log.info(
        "reconcile_schedule_on",
        environments=environments,
        interval_hours=settings.reconcile_interval_hours,
    )
    async with aiohttp.ClientSession() as session:
        client = api.Api(session, settings)

        def reconciler() -> reconcile.Reconciler:
            # Made for each run: the API keys it calls with are the ones in force.
            return reconcile.Reconciler(management.Manager(database, current(), sealer, client))

        async def reported() -> None:
            await reconcile_reported(reconciler(), environments)

        paused = Backoff(settings.reconcile_poll_seconds, interval)

        async def due() -> None:
            await reconcile_due(reconciler(), environments, interval, paused)

        loops = [_every(settings.reconcile_poll_seconds, reported)]
        if interval > 0:
            loops.append(_every(settings.reconcile_poll_seconds, due))
        await asyncio.gather(*loops)


class Backoff:
    """When each environment's full run may be tried again after one that could not
    finish: the pause doubles from `first` up to `longest`, and a complete run ends it."""

    def __init__(self, first: float, longest: float) -> None:
        self._first = first
        self._longest = max(longest, first)
        self._until: dict[str, tuple[float, float]] = {}  # environment -> (at, pause)

    def waiting(self, environment: str, now: float) -> bool:
        """Whether `environment` is still paused at `now` (monotonic seconds)."""
        at, _ = self._until.get(environment, (0.0, 0.0))
        return now < at

    def ran(self, environment: str, *, complete: bool, now: float) -> None:
        """Record a run: complete ends the pause; incomplete doubles it."""
        if complete:
            self._until.pop(environment, None)
            return
        _, pause = self._until.get(environment, (0.0, self._first / 2))
        pause = min(pause * 2, self._longest)
        self._until[environment] = (now + pause, pause)
        log.info("reconcile_paused", environment=environment, retry_in_seconds=round(pause))


async def _every(period: float, work: Callable[..., Awaitable[None]], *args: object) -> None:
    """`work(*args)` every `period` (jittered) until cancelled; a failure is logged,
    never the end of the loop."""
    while True:
        try:
            await work(*args)
        except errors.ReceiverError as exc:
            log.warning("reconcile_failed", error=type(exc).__name__)
        except Exception:  # a bug must not end the schedule silently
            log.exception("reconcile_failed")
        await asyncio.sleep(period * random.uniform(0.9, 1.1))  # noqa: S311 (jitter)


async def reconcile_reported(reconciler: reconcile.Reconciler, environments: list[str]) -> None:
    """Under its lease: the clients partner applications reported (a second 401, a
    NoToken), each reconciled and its reports marked done."""
    database = reconciler.manager.database
    async with leases.held(database, REPORTS_LOCK) as mine:
        if not mine:
            return
        for report in await database.fetch("link_reports_to_reconcile", BATCH):
            if report["environment"] in environments:
                outcome = await reconciler.client(
                    report["client_id"], report["environment"], RECONCILE_ACTOR
                )
                if outcome is not None and outcome.unavailable:
                    break  # Debitura is struggling: the reports wait for the next poll
            await database.fetchval("link_reports_reconciled", report["ids"])


async def reconcile_due(
    reconciler: reconcile.Reconciler,
    environments: list[str],
    interval: float,
    paused: Backoff | None = None,
) -> None:
    """Under its lease: a full run of each environment whose last complete run is
    older than `interval` and that is not paused after a run that could not finish."""
    database = reconciler.manager.database
    async with leases.held(database, RECONCILE_LOCK) as mine:
        if not mine:
            return
        last = {r["environment"]: r["at"] for r in await database.fetch("reconcile_last_runs")}
        now = datetime.now(UTC).timestamp()
        for environment in environments:
            if now - last.get(environment, 0.0) < interval:
                continue
            if paused is not None and paused.waiting(environment, time.monotonic()):
                continue
            summary = await reconciler.run(environment, RECONCILE_ACTOR, trigger="schedule")
            if paused is not None:
                paused.ran(environment, complete=summary.complete, now=time.monotonic())

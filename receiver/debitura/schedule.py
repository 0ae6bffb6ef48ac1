"""Scheduled rotation inside `serve` (the bearer-token guide's "Pattern 2"): tokens
older than RECEIVER_TOKEN_ROTATE_AFTER_DAYS are rotated with the 24 h grace, and
unfinished rotations resumed, at start and every RECEIVER_TOKEN_ROTATE_INTERVAL_SECONDS.

One replica at a time (a session advisory lock held for the run); calls spread out at
RECEIVER_TOKEN_ROTATE_RATE per second; paused, with a doubling pause, while Debitura
answers 5xx or 429; every outcome logged and counted (receiver_token_rotations_total).
Off, said once at start, when no API key is configured.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp
import structlog

from receiver import config, db, errors, vault
from receiver.debitura import api, rotation
from receiver.lifecycle import audit

log = structlog.get_logger(__name__)

LOCK = "receiver.token_rotation"
ACTOR = audit.Actor("receiver-serve", rotation.DEFAULT_REASON)
BATCH = 1000
FIRST_PAUSE_SECONDS = 30.0


async def run(database: db.Database, settings: config.Settings, sealer: vault.Sealer) -> None:
    """Run the schedule until cancelled."""
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
        rotator = rotation.Rotator(database, settings, sealer, api.Api(session, settings))
        while True:
            try:
                unavailable = await run_once(rotator, settings)
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
            await asyncio.sleep(delay * random.uniform(0.9, 1.1))  # noqa: S311 (jitter)


async def run_once(rotator: rotation.Rotator, settings: config.Settings) -> bool:
    """One run under the lock: resume open rotations, then rotate the due tokens.
    True when it stopped because Debitura was unavailable or rate limiting."""
    async with rotator.database.connection() as conn:
        if not await conn.fetchval(db.QUERIES["try_session_lock"], LOCK):
            log.info("token_rotation_skipped", reason="another replica holds the lock")
            return False
        try:
            resumed = await rotator.resume(ACTOR)
            unavailable = any(o.unavailable for o in resumed)
            rotated = []
            if not unavailable and settings.token_rotate_after_days > 0:
                rotated = await rotator.rotate_due(
                    ACTOR, limit=BATCH, rate=settings.token_rotate_rate, trigger="schedule"
                )
                unavailable = any(o.unavailable for o in rotated)
        finally:
            await conn.fetchval(db.QUERIES["session_unlock"], LOCK)
    log.info(
        "token_rotation_run",
        resumed=len(resumed),
        rotated=sum(o.ok for o in rotated),
        failed=sum(not o.ok for o in rotated + resumed),
        paused=unavailable,
    )
    return unavailable

"""The dispatcher: delivers invalidation signals from the outbox to the token cache.

Signals are written by the same transaction as the token change they announce
(see the SQL functions). Delivery is at least once:

- claim due signals with `FOR UPDATE SKIP LOCKED` in one statement, under a lease
  measured by the database clock, so any number of dispatchers share the work;
- POST each one outside any transaction, signed, with an `Idempotency-Key`;
- record the result with an update fenced on the lease, so a dispatcher whose lease
  expired cannot overwrite a newer result;
- on failure, retry after an exponential backoff with full jitter; dead-letter after
  the delay capped at `RECEIVER_SIGNAL_RETRY_CAP_SECONDS`, for as long as the signal
  is younger than `RECEIVER_SIGNAL_MAX_AGE` (a cache that is merely down is waited
  out, however long that takes); dead-letter at once only on a 4xx other than
  408/429 (a permanent refusal);
- after a failure, the first success pulls every waiting signal forward: a cache
  that is back gets its backlog at once, not at each signal's next backoff step;
- a reaper returns expired leases (a dispatcher that died mid-delivery) to pending.

A duplicate delivery is possible only after a lease expired; the cache treats a
signal as "drop and re-read", so duplicates are harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import standardwebhooks
import structlog

from receiver import config, db, errors, metrics, signing

log = structlog.get_logger(__name__)

DELIVERY_TIMEOUT_SECONDS = 5.0
# On stop, deliveries in flight get this long to finish and be recorded.
STOP_GRACE_SECONDS = DELIVERY_TIMEOUT_SECONDS + 2.0
POLL_INTERVAL_SECONDS = 1.0
REAP_INTERVAL_SECONDS = 5.0
# Signals claimed and sent together. Small, because what is claimed next waits for
# the whole batch: at 1,000 issued tokens a second, 50 made a revocation wait tens of
# ms (bench.signal_latency); the claim and the marking are one statement each.
BATCH_SIZE = 10
_RETRYABLE_4XX = frozenset({408, 429})
STATUSES = ("pending", "in_flight", "delivered", "dead", "notified")


@dataclass(frozen=True, slots=True)
class Signal:
    """One claimed invalidation signal. Carries no secret and no token."""

    id: str
    client_id: str
    environment: str | None  # None: queued before signals carried it
    token_prefix: str | None
    reason: str
    event_id: str
    created_at: datetime
    attempts: int

    def payload(self) -> bytes:
        """The JSON body the cache receives."""
        return json.dumps(
            {
                "signal_id": self.id,
                "client_id": self.client_id,
                "environment": self.environment,
                "token_prefix": self.token_prefix,
                "reason": self.reason,
                "event_id": self.event_id,
                "created_at": self.created_at.isoformat(),
            }
        ).encode()


class DeliveryFailed(Exception):
    """One delivery attempt failed; `permanent` failures are not retried."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, base·2^(attempts-1)], the ceiling capped at `cap`."""
    ceiling = min(cap, base * 2 ** min(max(attempts - 1, 0), 64))
    return random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography


class Dispatcher:
    """Delivers due signals until stopped; wake it after a local commit."""

    def __init__(
        self,
        database: db.Database,
        settings: config.Settings,
        session: aiohttp.ClientSession,
        *,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        if settings.cache_url is None or not settings.cache_secret:
            raise errors.ConfigError("RECEIVER_CACHE_URL and RECEIVER_CACHE_SECRET are required")
        self._database = database
        self._url = str(settings.cache_url)
        # The first secret signs; during a rotation window every configured one signs
        # too, so a cache that knows only the old or only the new one verifies.
        self.use_secrets(settings)
        self._wakeup = asyncio.Event()
        self._revocation_wakeup = asyncio.Event()
        self._held: set[uuid.UUID] = set()
        self._stopping = asyncio.Event()
        self._next_reap = 0.0
        self.worker_id = uuid.uuid4().hex[:12]
        self._legacy_signature = settings.signal_legacy_signature
        self._session = session
        self._max_age = settings.signal_max_age
        self._retry_cap = settings.signal_retry_cap_seconds
        # Set by a failed delivery: the next success pulls the waiting signals forward.
        self._backlog_waiting = False
        self._lease_seconds = settings.signal_lease_seconds
        self._retry_base = settings.signal_retry_base_seconds
        self._poll_interval = poll_interval
        self._batch_size = batch_size

    def use_secrets(self, settings: config.Settings) -> None:
        """Sign with `settings.cache_secret` from now on (at start, and on a reload):
        the first secret signs; every one is listed during a rotation window."""
        self._secrets = [s.get_secret_value() for s in settings.cache_secret]
        self._signers = [standardwebhooks.Webhook(s) for s in self._secrets]

    def __repr__(self) -> str:
        return f"Dispatcher(worker_id={self.worker_id!r}, url={self._url!r})"

    def wake(self, *, revocation: bool = False) -> None:
        """Look for due signals now rather than at the next poll; a revocation's, at
        once, beside a batch already being sent (the revocation lane, below: waking
        the main loop too would only add a claim that finds it taken)."""
        if revocation:
            self._revocation_wakeup.set()
        else:
            self._wakeup.set()

    def stop(self) -> None:
        """Stop after the batch in flight: its deliveries finish and are recorded, so a
        graceful stop never makes another dispatcher send a signal again."""
        self._stopping.set()
        self._wakeup.set()
        self._revocation_wakeup.set()

    async def run_until_stopped(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Run until `stop()`; then give the batch in flight `grace` seconds to finish
        before cancelling it (its unfinished leases are handed back)."""
        task = asyncio.create_task(self.run(), name="dispatcher")
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self.stop()
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            raise

    async def run(self) -> None:
        """Deliver until stopped (or cancelled); hand back unfinished leases at the end."""
        log.info("dispatcher_started", worker_id=self.worker_id, url=self._url)
        lane = asyncio.create_task(self._run_revocation_lane(), name="dispatcher-revocations")
        try:
            while not self._stopping.is_set():
                try:
                    delivered = await self.run_once()
                except errors.DatabaseUnavailable:
                    delivered = 0  # logged by db; try again at the next poll
                if delivered < self._batch_size:
                    await self._sleep()
        finally:
            # Stopped: the lane finishes its batch in flight, as this loop did.
            # Cancelled: the lane's batch is cut short too (its leases handed back).
            self.stop()
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                lane.cancel()
            await asyncio.shield(asyncio.gather(lane, return_exceptions=True))
            await asyncio.shield(self._release())
            log.info("dispatcher_stopped", worker_id=self.worker_id)

    async def _run_revocation_lane(self) -> None:
        """Revocations as they are committed, without waiting for the batch the main
        loop is sending: a revoked token must leave the cache first. The main loop
        claims revocations first too, so nothing depends on this lane."""
        while True:
            await self._revocation_wakeup.wait()
            self._revocation_wakeup.clear()
            if self._stopping.is_set():
                return
            try:
                while await self._claim_and_send("claim_due_revocations") >= self._batch_size:
                    if self._stopping.is_set():
                        return
            except errors.DatabaseUnavailable:
                pass  # logged by db; the main loop's poll covers it
            except Exception as exc:  # noqa: BLE001 - the lane must outlive one bad batch
                # The main loop still sends these (revocations first); say why this
                # lane did not, without the message (it could quote a value).
                log.warning("signal_lane_failed", error=type(exc).__name__)

    async def _sleep(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation that lands as its timeout fires, and the loop would never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll_interval):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def run_once(self) -> int:
        """Reap expired leases (now and then), claim one batch, deliver it; return how
        many were claimed."""
        if time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + REAP_INTERVAL_SECONDS
            reaped = await self._database.fetch("reap_expired_leases", self._max_age)
            if reaped:
                log.warning("signal_leases_reaped", count=len(reaped), worker_id=self.worker_id)
            for row in reaped:
                if row["status"] == "dead":
                    metrics.SIGNALS_DEAD.inc()
                    log.error(
                        "signal_dead", signal_id=row["id"], error="lease expired past max age"
                    )
        return await self._claim_and_send("claim_due_signals")

    async def _claim_and_send(self, claim: str) -> int:
        """Claim one batch with the named query, deliver it, record the outcomes;
        return how many were claimed."""
        lease = uuid.uuid4()
        rows = await self._database.fetch(claim, lease, self._lease_seconds, self._batch_size)
        if not rows:
            return 0
        # Until the batch is settled the lease is ours to hand back if we are stopped.
        self._held.add(lease)
        signals = [
            Signal(
                id=r["id"],
                client_id=r["client_id"],
                environment=r["environment"],
                token_prefix=r["token_prefix"],
                reason=r["reason"],
                event_id=r["event_key"],
                created_at=r["created_at"],
                attempts=r["attempts"],
            )
            for r in rows
        ]
        outcomes = await asyncio.gather(*(self._send(s, lease) for s in signals))
        delivered = [s for s, ok in zip(signals, outcomes, strict=True) if ok]
        if delivered:
            await self._mark_delivered(delivered, lease)
        self._held.discard(lease)
        return len(rows)

    async def _send(self, signal: Signal, lease: uuid.UUID) -> bool:
        try:
            await self._post(signal)
        except DeliveryFailed as exc:
            await self._failed(signal, lease, exc)
            return False
        return True

    async def _mark_delivered(self, delivered: list[Signal], lease: uuid.UUID) -> None:
        rows = await self._database.fetch(
            "mark_signals_delivered", [s.id for s in delivered], lease
        )
        if rows and self._backlog_waiting:
            # The cache answers again: what waits for a backoff step goes now.
            self._backlog_waiting = False
            pulled = await self._database.fetch("pull_forward_signals")
            if pulled:
                log.info("signal_backlog_released", count=len(pulled), worker_id=self.worker_id)
                self.wake()
        ages = {r["id"]: r["age"] for r in rows}
        metrics.SIGNALS_DELIVERED.inc(len(ages))
        for age in ages.values():
            metrics.SIGNAL_DELIVERY_SECONDS.observe(age.total_seconds())
        for signal in delivered:
            if signal.id not in ages:
                log.warning("signal_result_fenced", signal_id=signal.id, worker_id=self.worker_id)
                continue
            log.info(
                "signal_delivered",
                signal_id=signal.id,
                client_id=signal.client_id,
                reason=signal.reason,
                attempts=signal.attempts,
                age_ms=round(ages[signal.id].total_seconds() * 1000, 2),
            )

    async def _post(self, signal: Signal) -> None:
        body = signal.payload()
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": signal.id,
            # Standard Webhooks (standardwebhooks.com): the signal id is the message id.
            "webhook-id": signal.id,
            "webhook-timestamp": str(int(now.timestamp())),
            # Several signatures are space-delimited (the Standard Webhooks spec).
            "webhook-signature": " ".join(
                signer.sign(signal.id, now, body.decode()) for signer in self._signers
            ),
        }
        if self._legacy_signature:
            t = int(now.timestamp())
            headers[signing.SIGNAL_SIGNATURE_HEADER] = f"t={t}," + ",".join(
                f"v1={signing.compute(secret, t, body)}" for secret in self._secrets
            )
        timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_SECONDS)
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, timeout=timeout
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            raise DeliveryFailed("cache did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise DeliveryFailed(f"cache unreachable: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return
        permanent = 400 <= status < 500 and status not in _RETRYABLE_4XX
        raise DeliveryFailed(f"cache answered {status}", permanent=permanent)

    async def _failed(self, signal: Signal, lease: uuid.UUID, exc: DeliveryFailed) -> None:
        self._backlog_waiting = True
        delay = backoff_seconds(signal.attempts, self._retry_base, self._retry_cap)
        rows = await self._database.fetch(
            "mark_signal_failed",
            signal.id,
            lease,
            delay,
            exc.permanent,
            self._max_age,
            str(exc),
        )
        metrics.SIGNAL_FAILURES.labels(
            retried=str(bool(rows) and rows[0]["status"] == "pending").lower()
        ).inc()
        if not rows:
            log.warning("signal_result_fenced", signal_id=signal.id, worker_id=self.worker_id)
        elif rows[0]["status"] == "dead":
            metrics.SIGNALS_DEAD.inc()
            log.error(
                "signal_dead",
                signal_id=signal.id,
                client_id=signal.client_id,
                reason=signal.reason,
                attempts=signal.attempts,
                error=str(exc),
                action="fix the cache, then run `receiver signals retry`",
            )
        else:
            log.warning(
                "signal_retry",
                signal_id=signal.id,
                client_id=signal.client_id,
                attempts=signal.attempts,
                error=str(exc),
                retry_in_seconds=round(delay, 3),
            )

    async def _release(self) -> None:
        if not self._held:
            return
        # If Postgres is away, the reaper returns them once the leases expire.
        with contextlib.suppress(errors.DatabaseUnavailable):
            await self._database.fetch("release_signal_leases", list(self._held))


async def counts(database: db.Database) -> dict[str, int]:
    """Signals per status."""
    return {r["status"]: r["n"] for r in await database.fetch("signal_counts")}


async def listing(
    database: db.Database, *, status: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The newest signals, optionally of one status."""
    rows = await database.fetch("list_signals", status, limit)
    return [db.plain(r) for r in rows]

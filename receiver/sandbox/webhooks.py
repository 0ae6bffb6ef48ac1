"""Signed webhook deliveries from the sandbox to a receiver, on Debitura's schedule.

Each event is tried up to 8 times, waiting 0/60/120/240/480/960/1800/1800 s (±10%
jitter, divided by `time_scale`) before the tries: about 1.5 h in all, as
docs/design.md §1 says. A 2xx ends it. Eight failures of one event, or a single
410, switch the whole subscription off: nothing more is sent (pending retries
included), and the moment is logged and kept in `disabled_reason`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from receiver import signing

log = structlog.get_logger(__name__)

SCHEDULE = (0, 60, 120, 240, 480, 960, 1800, 1800)
JITTER = 0.10
# Debitura waits at most 10 s for an answer (docs/design.md §1); not scaled.
ANSWER_TIMEOUT_SECONDS = 10.0
_ANSWER_KEPT = 2000  # bytes of each answer kept for tests to read
PENDING, DELIVERED, FAILED, ABANDONED = "pending", "delivered", "failed", "abandoned"


@dataclass(slots=True)
class Attempt:
    """One try: the delay planned before it (nominal and jittered, seconds before
    scaling), when it left (monotonic), and the answer (status and the start of its
    body, or the error's name)."""

    nominal_delay: float
    planned_delay: float
    sent_at: float = 0.0
    status: int | None = None
    answer: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Delivery:
    """One event and its tries. `body` holds a token: kept out of the repr."""

    event_id: str
    event: str
    client_id: str
    body: bytes = field(repr=False)
    attempts: list[Attempt] = field(default_factory=list)
    outcome: str = PENDING

    @property
    def envelope(self) -> dict[str, Any]:
        """The JSON envelope that was (or will be) sent."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Subscription:
    """The receiver's webhook subscription: where, under which secret, and whether
    Debitura still sends to it."""

    def __init__(self, url: str, secret: bytes, environment: str, time_scale: float = 1.0) -> None:
        self.url = url
        self._secret = secret
        self.environment = environment
        self.time_scale = time_scale
        self.active = True
        self.disabled_reason: str | None = None
        self.deliveries: list[Delivery] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._backlog: list[Delivery] = []

    def __repr__(self) -> str:
        return f"Subscription(url={self.url!r}, active={self.active})"

    async def start(self) -> None:
        """Open the HTTP client and send what was queued before."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_SECONDS)
        )
        backlog, self._backlog = self._backlog, []
        for delivery in backlog:
            self._spawn(delivery)

    async def stop(self) -> None:
        """Abandon pending tries and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def send(self, event: str, client_id: str, data: dict[str, Any]) -> Delivery:
        """Queue one event for delivery (at once when started)."""
        event_id = f"evt_{uuid.uuid4().hex}"
        envelope = {
            "id": event_id,
            "specVersion": "1.0",
            "event": event,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data": data,
        }
        body = json.dumps(envelope, separators=(",", ":")).encode()
        delivery = Delivery(event_id, event, client_id, body)
        self.deliveries.append(delivery)
        if not self.active:
            delivery.outcome = ABANDONED
        elif self._session is None:
            self._backlog.append(delivery)
        else:
            self._spawn(delivery)
        return delivery

    async def drain(self, seconds: float) -> None:
        """Wait until no delivery is pending (TimeoutError after `seconds`)."""
        async with asyncio.timeout(seconds):
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _delay(self, nominal: float) -> float:
        # Jitter spreads retries out; it protects nothing, so `random` is the right tool.
        return nominal * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311

    async def _deliver(self, delivery: Delivery) -> None:
        for nominal in SCHEDULE:
            planned = self._delay(nominal)
            attempt = Attempt(nominal_delay=nominal, planned_delay=planned)
            await asyncio.sleep(planned / self.time_scale)
            if not self.active:
                delivery.outcome = ABANDONED
                return
            delivery.attempts.append(attempt)
            await self._try(delivery, attempt)
            if attempt.status is not None and 200 <= attempt.status < 300:
                delivery.outcome = DELIVERED
                return
            if attempt.status == 410:
                delivery.outcome = FAILED
                self._disable("410 gone", delivery)
                return
        delivery.outcome = FAILED
        self._disable(f"{len(SCHEDULE)} failed tries", delivery)

    async def _try(self, delivery: Delivery, attempt: Attempt) -> None:
        assert self._session is not None, "started"
        t = int(time.time())  # the receiver checks it against the real clock
        headers = {
            "Content-Type": "application/json",
            signing.SIGNATURE_HEADER: signing.header_value(self._secret, delivery.body, t),
            "X-Debitura-Timestamp": str(t),
            "X-Debitura-Event": delivery.event,
        }
        if self.environment == "test":
            headers["X-Debitura-Test"] = "true"
        attempt.sent_at = time.monotonic()
        try:
            async with self._session.post(self.url, data=delivery.body, headers=headers) as r:
                attempt.answer = (await r.read())[:_ANSWER_KEPT].decode(errors="replace")
                attempt.status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            attempt.error = type(exc).__name__
        log.info(
            "sandbox_webhook_attempt",
            event_id=delivery.event_id,
            webhook_event=delivery.event,
            client_id=delivery.client_id,
            attempt=len(delivery.attempts),
            status=attempt.status,
            error=attempt.error,
        )

    def _disable(self, reason: str, delivery: Delivery) -> None:
        if not self.active:
            return
        self.active = False
        self.disabled_reason = reason
        log.warning(
            "sandbox_webhook_subscription_disabled",
            reason=reason,
            event_id=delivery.event_id,
            url=self.url,
        )

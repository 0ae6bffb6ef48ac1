"""Sending signed events the way Debitura does: concurrency, a rate, retries, a summary.

Used by `receiver replay`. Every attempt is signed afresh (a new `t`), so a retry or
a resend hours later still verifies. Nothing here ever holds a token in a form that
is printed: an outgoing event carries only its token's prefix for display.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
from tqdm import tqdm

from receiver import redaction, signing

REQUEST_TIMEOUT_SECONDS = 10  # what Debitura itself waits
# Debitura's delivery schedule: 8 tries at these offsets (seconds), each ±10%.
DEBITURA_SCHEDULE = (0, 60, 120, 240, 480, 960, 1800, 1800)
JITTER = 0.10


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One event to send: its exact bytes, and what may be shown about it."""

    body: bytes
    event_type: str
    event_id: str | None
    token_prefix: str | None = None

    def __repr__(self) -> str:
        return f"Outgoing({self.event_type!r}, id={self.event_id!r}, prefix={self.token_prefix!r})"


@dataclass(frozen=True, slots=True)
class Delivery:
    """What sending one event produced (after any retries)."""

    event_type: str
    event_id: str | None
    token_prefix: str | None
    http_status: int | None
    outcome: str | None
    error: str | None
    latency_ms: float
    attempts: int
    tokens_revoked: int | None = None  # a processed revocation: how many it revoked

    @property
    def ok(self) -> bool:
        """Whether the receiver acknowledged the event."""
        return self.http_status is not None and 200 <= self.http_status < 300

    def as_dict(self) -> dict[str, Any]:
        """For `--json` output."""
        return {
            "event_type": self.event_type,
            "event_id": self.event_id,
            "token_prefix": self.token_prefix,
            "http_status": self.http_status,
            "status": self.outcome,
            "error": self.error,
            "latency_ms": self.latency_ms,
            "attempts": self.attempts,
            "tokens_revoked": self.tokens_revoked,
        }


@dataclass
class Summary:
    """Counts and latencies of a run."""

    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def failed(self) -> int:
        """Events not acknowledged."""
        return sum(not d.ok for d in self.deliveries)

    def as_dict(self) -> dict[str, Any]:
        """The summary as data (for `--json`)."""
        elapsed = (self.finished or time.monotonic()) - self.started
        latencies = sorted(d.latency_ms for d in self.deliveries if d.http_status is not None)
        return {
            "to": self.url,
            "sent": len(self.deliveries),
            "acknowledged": len(self.deliveries) - self.failed,
            "failed": self.failed,
            "by_http_status": dict(
                sorted(Counter(str(d.http_status or "error") for d in self.deliveries).items())
            ),
            "by_status": dict(
                sorted(Counter(d.outcome for d in self.deliveries if d.outcome).items())
            ),
            "errors": dict(Counter(d.error for d in self.deliveries if d.error)),
            "latency_ms": {f"p{p}": _percentile(latencies, p) for p in (50, 95, 99)},
            "seconds": round(elapsed, 3),
            "rate_per_second": round(len(self.deliveries) / elapsed, 1) if elapsed > 0 else None,
        }

    def render(self) -> str:
        """The summary as a table for people."""
        data = self.as_dict()
        lines = [
            f"sent {data['sent']} event(s) to {data['to']} in {data['seconds']:.2f} s"
            f" ({data['rate_per_second'] or 0:.1f}/s): {data['acknowledged']} acknowledged,"
            f" {data['failed']} failed",
        ]
        for status, count in data["by_http_status"].items():
            lines.append(f"  http {status:>5}: {count}")
        for status, count in data["by_status"].items():
            lines.append(f"  {status:>10}: {count}")
        for error, count in data["errors"].items():
            lines.append(f"  error: {error} ({count})")
        latency = data["latency_ms"]
        if latency["p50"] is not None:
            lines.append(
                f"  latency p50 {latency['p50']:.1f} ms  p95 {latency['p95']:.1f} ms"
                f"  p99 {latency['p99']:.1f} ms"
            )
        return "\n".join(lines)


def _percentile(ordered: Sequence[float], p: int) -> float | None:
    if not ordered:
        return None
    if len(ordered) == 1:
        return ordered[0]
    return round(statistics.quantiles(ordered, n=100, method="inclusive")[p - 1], 2)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Debitura's schedule, optionally compressed (`scale` 0.001 turns 1800 s into 1.8 s)."""

    scale: float = 1.0
    schedule: tuple[float, ...] = DEBITURA_SCHEDULE

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before try number `attempt` (1-based), jittered ±10%.

        The schedule lists the waits before each try, not offsets from the first: they
        add up to 5,460 s, the "8 tries over about 1.5 h" of docs/design.md §1 (as
        offsets, the last two tries would coincide and all would end after 30 min)."""
        base = self.schedule[attempt - 1]
        return max(0.0, base * self.scale * random.uniform(1 - JITTER, 1 + JITTER))  # noqa: S311


class _Pace:
    """At most `rate` starts per second across all workers. Hand-written because it is
    a few lines; a limiter library would add a dependency for this alone."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._next = time.monotonic()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self._interval:
            return
        async with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now)
            delay = self._next - now
            self._next += self._interval
        if delay > 0:
            await asyncio.sleep(delay)


class Progress:
    """A progress bar on stderr with rate and ETA (tqdm), only when stderr is a
    terminal; `write` prints a line above it without tearing it."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._failed = 0
        # The terminal's size, or 80x24 where it reports none: tqdm hides a bar on a
        # screen it measures as 0 rows high (a bare pty says 0x0).
        width, height = shutil.get_terminal_size()
        self._bar = tqdm(
            total=total,
            file=self._stream,
            unit="event",
            ncols=width,
            nrows=height,
            disable=not (total > 1 and self._stream.isatty()),
            leave=True,
        )

    def advance(self, delivery: Delivery) -> None:
        """One more event done."""
        if not delivery.ok:
            self._failed += 1
            self._bar.set_postfix_str(f"{self._failed} failed", refresh=False)
        self._bar.update(1)
        if self._bar.n == self._bar.total:
            self._bar.close()

    def write(self, line: str, stream: TextIO | None = None) -> None:
        """A line of output (stdout unless told), printed above the bar."""
        tqdm.write(line, file=stream or sys.stdout)


async def send_all(
    url: str,
    secret: bytes,
    events: Sequence[Outgoing],
    *,
    concurrency: int = 8,
    rate: float | None = None,
    test: bool = True,
    retry: RetryPolicy | None = None,
    on_delivery: Callable[[Delivery], None] | None = None,
) -> Summary:
    """Send every event signed, `concurrency` at a time, at most `rate` per second."""
    summary = Summary(url=url)
    queue: asyncio.Queue[Outgoing] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    pace = _Pace(rate)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                event = queue.get_nowait()
                delivery = await _send_with_retries(session, url, secret, event, test, retry, pace)
                summary.deliveries.append(delivery)
                if on_delivery is not None:
                    on_delivery(delivery)

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(events))))))
    summary.finished = time.monotonic()
    return summary


async def _send_with_retries(
    session: aiohttp.ClientSession,
    url: str,
    secret: bytes,
    event: Outgoing,
    test: bool,
    retry: RetryPolicy | None,
    pace: _Pace,
) -> Delivery:
    tries = len(retry.schedule) if retry else 1
    delivery: Delivery | None = None
    for attempt in range(1, tries + 1):
        if retry is not None and attempt > 1:
            await asyncio.sleep(retry.delay_before(attempt))
        await pace.wait()
        delivery = await send_one(session, url, secret, event, test=test, attempt=attempt)
        # Like Debitura: any failure is retried, except a 410, which ends the subscription.
        if delivery.ok or delivery.http_status == 410:
            break
    assert delivery is not None
    return delivery


async def send_one(
    session: aiohttp.ClientSession,
    url: str,
    secret: bytes,
    event: Outgoing,
    *,
    test: bool = True,
    attempt: int = 1,
) -> Delivery:
    """Sign `event` now and POST it with Debitura's headers."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        signing.SIGNATURE_HEADER: signing.header_value(secret, event.body, timestamp),
        "X-Debitura-Timestamp": str(timestamp),
        "X-Debitura-Event": event.event_type,
    }
    if test:
        headers["X-Debitura-Test"] = "true"
    started = time.perf_counter()
    status: int | None = None
    outcome: str | None = None
    error: str | None
    revoked: int | None = None
    try:
        async with session.post(url, data=event.body, headers=headers) as response:
            answer = await response.read()
            status = response.status
            header = response.headers.get("X-Receiver-Tokens-Revoked", "")
            revoked = int(header) if header.isdigit() else None
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = _describe(exc)
    else:
        outcome, error = _read_answer(answer)
    latency = round((time.perf_counter() - started) * 1000, 2)
    return Delivery(
        event.event_type,
        event.event_id,
        event.token_prefix,
        status,
        outcome,
        error,
        latency,
        attempt,
        revoked,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within 10 s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "cannot connect: is the receiver running at that URL?"
    return f"request failed: {type(exc).__name__}"


_REDACTOR = redaction.Redactor()


def _read_answer(answer: bytes) -> tuple[str | None, str | None]:
    try:
        document = json.loads(answer)
    except ValueError:
        return None, "answer is not JSON"
    if not isinstance(document, dict):
        return None, "answer is not a JSON object"
    if isinstance(document.get("error"), dict):
        return None, _REDACTOR.text(str(document["error"].get("message", "error")))
    status = document.get("status")
    return (str(status) if status is not None else None), None

"""Group commit: concurrent deliveries share one transaction, one round trip, one WAL
flush and one NOTIFY-queue lock (Postgres serialises committing transactions that
NOTIFY, so this is where throughput under load comes from).

There is no batching timer: a delivery that finds no group committing is committed
at once, alone. Deliveries arriving while a group commits wait for it to finish and
form the next group. Each delivery's 200 still waits for the durable commit of its
own group.

One group commits at a time while groups are quick: bigger groups cost less per
event on both sides (bench/README.md, measured against two at a time). A second
group starts beside it only when the one committing has taken SLOW_GROUP_SECONDS
(it waits on a client's lock, say): the deliveries behind it are not held up by it.

The SQL function takes every client lock a group needs first, in one order, so two
groups never deadlock (record_events_v7, sql/0022_1_pre_body_names.sql: rows
of a table the cache reader cannot lock). A group that fails for any reason
but an unavailable database is retried one event at a time, so one bad event cannot
fail the others; a delivery Postgres refuses a value of is then kept quarantined
(`deliver`, store.record_delivery).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from dataclasses import dataclass, field

import structlog

from receiver import db, errors, metrics, vault
from receiver.lifecycle import events, rows, store

log = structlog.get_logger(__name__)

MAX_GROUP = 128
MAX_IN_FLIGHT = 2
# A group committing longer than this is stuck behind something: the next one starts
# beside it. Far above a group's usual time under load (a few ms).
SLOW_GROUP_SECONDS = 0.05
WRITE_FAILURE_SECONDS = 10.0


@dataclass(eq=False)  # compared by identity: the queue removes a waiting row by it
class _Waiting:
    row: rows.Row
    outcome: asyncio.Future[store.Recorded] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GroupCommit:
    """Records events, committing concurrent ones together."""

    def __init__(
        self,
        database: db.Database,
        *,
        sealer: vault.Sealer,
        channel: str,
        http_delivery: bool,
        max_group: int = MAX_GROUP,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._database = database
        self._sealer = sealer
        self._channel = channel
        self._http = http_delivery
        self._max_group = max_group
        self._max_in_flight = max_in_flight
        self._queue: list[_Waiting] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # When each group now committing started (event-loop time), by its drain.
        self._committing: dict[object, float] = {}
        self._slow_check: asyncio.TimerHandle | None = None
        # When the last commit failed for want of the database (None: it succeeded).
        self._failed_at: float | None = None

    async def record_delivery(
        self, event: events.Event, arrival: rows.Arrival, *, deadline: float | None = None
    ) -> tuple[store.Recorded, events.Event]:
        """Seal and record one verified delivery (`record`), keeping it quarantined when
        Postgres refuses one of its values; what it did, and the event as stored."""
        return await store.record_delivery(
            lambda row: self.record(row, deadline=deadline), self._sealer, event, arrival
        )

    async def record(self, row: rows.Row, *, deadline: float | None = None) -> store.Recorded:
        """Record one event; returns after the transaction that holds it committed.

        `deadline` (event-loop time): past it, a row still waiting for a group is taken
        out of the queue and the caller gets `DatabaseUnavailable` (a 503: the sender
        retries). A row already in a committing group cannot be taken back; that
        group is bounded by the sessions' statement timeout, and a retry of a row
        it did commit is a duplicate.
        """
        waiting = _Waiting(row)
        self._queue.append(waiting)
        self._schedule()
        if deadline is None:
            return await waiting.outcome
        # One timer, not an asyncio.timeout context per delivery (its bookkeeping showed
        # in the request path's profile, bench/README.md): at the deadline the outcome is
        # settled as a 503, and the group that holds the row (if any) finds it done and
        # leaves it be.
        timer = asyncio.get_running_loop().call_at(deadline, self._expire, waiting)
        try:
            return await waiting.outcome
        finally:
            timer.cancel()

    def _expire(self, waiting: _Waiting) -> None:
        if waiting.outcome.done():
            return
        if waiting in self._queue:
            self._queue.remove(waiting)
        metrics.DATABASE_ERRORS.labels(kind="deadline").inc()
        log.warning("commit_deadline_passed", queued=len(self._queue))
        waiting.outcome.set_exception(
            errors.DatabaseUnavailable("could not commit in time, retry later")
        )

    @property
    def writes_failing(self) -> bool:
        """Whether the last commit failed for want of the database, within the last
        WRITE_FAILURE_SECONDS. Readiness uses it (a ping can succeed while every write
        fails); it expires on its own, because a replica taken out of rotation gets no
        delivery whose success could clear it."""
        failed_at = self._failed_at
        return failed_at is not None and time.monotonic() - failed_at < WRITE_FAILURE_SECONDS

    def _schedule(self) -> None:
        """Start committing what is queued: at once when nothing commits, beside the
        group committing now when that one is slow, else (queued rows wait for it)
        check again when it would become slow."""
        if self._in_flight >= self._max_in_flight:
            return
        if self._in_flight == 0 or self._a_group_is_slow():
            self._in_flight += 1
            # A fresh context: the drain outlives this request and commits others,
            # so it must not log under this request's id.
            task = asyncio.create_task(self._drain(), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self._slow_check is None and self._committing:
            loop = asyncio.get_running_loop()
            slow_at = min(self._committing.values()) + SLOW_GROUP_SECONDS
            self._slow_check = loop.call_at(slow_at, self._check_slow)

    def _check_slow(self) -> None:
        self._slow_check = None
        if self._queue:
            self._schedule()

    def _a_group_is_slow(self) -> bool:
        now = asyncio.get_running_loop().time()
        return any(now - started >= SLOW_GROUP_SECONDS for started in self._committing.values())

    async def _drain(self) -> None:
        me = object()
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                group = self._queue[: self._max_group]
                del self._queue[: self._max_group]
                self._committing[me] = loop.time()
                try:
                    await self._commit(group)
                finally:
                    del self._committing[me]
                if self._in_flight > 1 and not self._a_group_is_slow():
                    break  # the other drain commits at its usual pace: it takes the queue
        finally:
            self._in_flight -= 1
            if self._queue:
                self._schedule()

    async def _commit(self, group: list[_Waiting]) -> None:
        metrics.COMMIT_GROUP_SIZE.observe(len(group))
        try:
            outcomes = await self._record([w.row for w in group])
        except errors.LockBusy as exc:
            # One client's rows are held too long (the group waited on its lock):
            # Postgres is fine, so readiness stays as it is (a lock wait of one client
            # must not take the replica out of every client's rotation).
            for waiting in group:
                _fail(waiting, exc)
            return
        except errors.DatabaseUnavailable as exc:
            self._failed_at = time.monotonic()
            for waiting in group:
                _fail(waiting, exc)
            return
        except Exception as exc:  # noqa: BLE001 - isolate the event that caused it, below
            if len(group) == 1:
                _fail(group[0], exc)
                return
            log.info("group_commit_split", size=len(group), error=type(exc).__name__)
            for waiting in group:
                await self._commit([waiting])
            return
        self._failed_at = None
        for waiting, outcome in zip(group, outcomes, strict=True):
            if not waiting.outcome.done():
                waiting.outcome.set_result(outcome)

    async def _record(self, batch: list[rows.Row]) -> list[store.Recorded]:
        return await store.record_rows(
            self._database, self._sealer, batch, channel=self._channel, http_delivery=self._http
        )


def _fail(waiting: _Waiting, exc: BaseException) -> None:
    if not waiting.outcome.done():
        waiting.outcome.set_exception(exc)

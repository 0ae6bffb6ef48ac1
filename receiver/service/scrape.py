"""`GET /metrics`: this process's counters (every worker's, in multiprocess mode),
then the gauges read from Postgres at scrape time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from receiver import db, errors, vault

log = structlog.get_logger(__name__)

REFRESH_SECONDS = 5.0
QUERY_TIMEOUT_SECONDS = 1.0
# A whole exposition is reused for this long (or the refresh interval, if shorter):
# a crowd of scrapers then costs one render a second, not one each, and leaves the
# event loop to the webhook (bench/scrapes.py).
RENDER_REUSE_SECONDS = 1.0
_AGES = ("under_30d", "30d_to_90d", "over_90d")


class _Snapshot(Collector):
    """A collector that reports metric families computed once, for one scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


class DatabaseGauges:
    """The gauges read from Postgres, best-effort and shared by concurrent scrapes.

    They are read at most once per `RECEIVER_METRICS_REFRESH_SECONDS`, by one scrape
    while the others wait for it, each query bounded by `QUERY_TIMEOUT_SECONDS`, and
    each index-backed: partial indexes for the open signals and quarantined events,
    the sealed-key-id indexes for the values still to re-seal under `primary_key_id`. When Postgres
    cannot answer, the last values are served with `receiver_database_gauges_up 0`
    and their age, so the process's own counters are always scrapable, exactly when
    an outage makes them matter.
    """

    def __init__(
        self,
        primary_key_id: str,
        refresh_seconds: float = REFRESH_SECONDS,
        key_ids: Iterable[str] = (),
        reconcile_interval_seconds: float = 0.0,
        reconciled_environments: Iterable[str] = (),
    ) -> None:
        self._primary_key_id = primary_key_id
        self._key_ids = frozenset(key_ids) | {primary_key_id}
        self._refresh_seconds = refresh_seconds
        self._lock = asyncio.Lock()
        self._read_at: float | None = None
        self._tried_at = -refresh_seconds
        self._up = False
        self._signals = {"pending": 0, "in_flight": 0, "dead": 0}
        self._quarantined = 0
        self._oldest_pending = 0.0
        self._to_rotate: list[tuple[str, str, int]] = []
        self._active: dict[tuple[str, str], int] = {}
        self._without_active: dict[str, int] = {}
        self._link_invalid: dict[str, int] = {}
        self._invalid: dict[str, int] = {}
        self._unsettled: dict[str, tuple[int, float]] = {}
        self._reconciled: dict[str, float] = {}
        # Only the environments `serve` reconciles (their API configured): an alert on
        # "never reconciled" must not fire for a world this service does not manage.
        self._reconciled_environments = tuple(reconciled_environments)
        self._reconcile_interval = (
            reconcile_interval_seconds if self._reconciled_environments else 0.0
        )
        self._rendered = b""
        self._rendered_at = -RENDER_REUSE_SECONDS

    async def families(self, database: db.Database) -> list[Metric]:
        """The gauge families for one scrape, refreshed first when due."""
        async with self._lock:
            if time.monotonic() - self._tried_at >= self._refresh_seconds:
                await self._refresh(database)
        return self._render()

    async def _refresh(self, database: db.Database) -> None:
        self._tried_at = time.monotonic()
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_SECONDS):
                rows = await database.fetch("open_signal_counts")
                oldest = await database.fetchval("oldest_pending_signal_age")
                quarantined = await database.fetchval("open_quarantine_count")
                await database.fetchval("sealed_tallies_fold", db.TALLY_FOLD_CHUNK)
                to_rotate = await database.fetch("sealed_to_rotate_counts", self._primary_key_id)
                await database.fetchval("token_tallies_fold", db.TALLY_FOLD_CHUNK)
                health = await database.fetch("token_health")
                unsettled = await database.fetch("rotations_unsettled")
                reconciled = await database.fetch("reconcile_last_runs")
        except (errors.ReceiverError, TimeoutError) as exc:
            self._up = False
            log.info("database_gauges_stale", error=type(exc).__name__)
            return
        self._signals.update({row["status"]: row["n"] for row in rows})
        self._oldest_pending = float(oldest)
        self._quarantined = quarantined
        self._to_rotate = [
            (kind, key_id, n) for (kind, key_id), n in vault.shown_key_counts(to_rotate).items()
        ]
        # Every combination is reported, 0 included, so an alert can be written on it.
        self._active = {(env, age): 0 for env in vault.ENVIRONMENTS for age in _AGES}
        self._without_active = dict.fromkeys(vault.ENVIRONMENTS, 0)
        self._link_invalid = dict.fromkeys(vault.ENVIRONMENTS, 0)
        self._invalid = dict.fromkeys(vault.ENVIRONMENTS, 0)
        self._unsettled = dict.fromkeys(vault.ENVIRONMENTS, (0, 0.0))
        self._unsettled |= {r["environment"]: (r["n"], r["oldest_seconds"]) for r in unsettled}
        # -1: never reconciled (completely) in that environment.
        self._reconciled = dict.fromkeys(self._reconciled_environments, -1.0)
        self._reconciled |= {
            r["environment"]: r["at"]
            for r in reconciled
            if r["environment"] in self._reconciled_environments
        }
        for row in health:
            if row["kind"] == "active":
                self._active[(row["environment"], row["age"])] = row["n"]
            elif row["kind"] == "link_invalid":
                self._link_invalid[row["environment"]] = row["n"]
            elif row["kind"] == "invalid":
                self._invalid[row["environment"]] = row["n"]
            else:
                self._without_active[row["environment"]] = row["n"]
        self._read_at = time.monotonic()
        self._up = True

    def _render(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "receiver_database_gauges_up",
            "1 when the gauges above were just read from Postgres, 0 when it did not answer",
            value=int(self._up),
        )
        age = GaugeMetricFamily(
            "receiver_database_gauges_age_seconds",
            "Seconds since the gauges above were last read from Postgres (-1: never)",
            value=-1 if self._read_at is None else time.monotonic() - self._read_at,
        )
        if self._read_at is None:
            # Never read: no value at all rather than a false 0 an alert would trust.
            return [up, age]
        signals = GaugeMetricFamily(
            "receiver_signals", "Outbox signals by status, read from Postgres", labels=["status"]
        )
        for status, n in self._signals.items():
            signals.add_metric([status], n)
        quarantined = GaugeMetricFamily(
            "receiver_events_quarantined_open",
            "Quarantined deliveries not yet reprocessed, read from Postgres (alert when > 0)",
            value=self._quarantined,
        )
        to_rotate = GaugeMetricFamily(
            "receiver_sealed_values_to_rotate",
            "Tokens and events sealed under a key id other than the primary, per kind and "
            "key id (key rotation progress: none left when done)",
            labels=["kind", "key_id"],
        )
        for kind, key_id, n in self._to_rotate:
            to_rotate.add_metric([kind, key_id], n)
        active = GaugeMetricFamily(
            "receiver_tokens_active",
            "Active tokens by environment and age since issue (rotate after 90 days)",
            labels=["environment", "age"],
        )
        for (environment, bucket), n in self._active.items():
            active.add_metric([environment, bucket], n)
        without = GaugeMetricFamily(
            "receiver_clients_without_active_token",
            "Clients with tokens stored but none active, by environment",
            labels=["environment"],
        )
        for environment, n in self._without_active.items():
            without.add_metric([environment], n)
        link_invalid = GaugeMetricFamily(
            "receiver_clients_link_invalid",
            "Clients whose active token a partner application reported as refused twice "
            "(the link needs attention), by environment",
            labels=["environment"],
        )
        for environment, n in self._link_invalid.items():
            link_invalid.add_metric([environment], n)
        invalid = GaugeMetricFamily(
            "receiver_tokens_invalid",
            "Active tokens Debitura's validate-token last called invalid, by environment",
            labels=["environment"],
        )
        for environment, n in self._invalid.items():
            invalid.add_metric([environment], n)
        unopenable = GaugeMetricFamily(
            "receiver_sealed_values_unopenable",
            "Tokens and events sealed under a key id not in RECEIVER_TOKEN_KEYS, per kind "
            "(a wrong or missing key: alert when > 0)",
            labels=["kind"],
        )
        for kind, n in unopenable_counts(self._to_rotate, self._key_ids).items():
            unopenable.add_metric([kind], n)
        oldest = GaugeMetricFamily(
            "receiver_signals_oldest_pending_age_seconds",
            "Seconds since the oldest pending signal was queued, read from Postgres (0: none)",
            value=self._oldest_pending,
        )
        unsettled = GaugeMetricFamily(
            "receiver_rotations_unsettled",
            "Rotations whose outcome is not yet known (answer lost, or Debitura still shows "
            "the old token), by environment",
            labels=["environment"],
        )
        unsettled_age = GaugeMetricFamily(
            "receiver_rotations_unsettled_oldest_age_seconds",
            "Age of the oldest unsettled rotation, by environment (0: none)",
            labels=["environment"],
        )
        for environment, (n, oldest_age) in self._unsettled.items():
            unsettled.add_metric([environment], n)
            unsettled_age.add_metric([environment], oldest_age)
        reconciled = GaugeMetricFamily(
            "receiver_reconcile_last_run_timestamp_seconds",
            "When the last complete reconcile run of each environment ended (unix seconds; "
            "-1: never)",
            labels=["environment"],
        )
        for environment, at in self._reconciled.items():
            reconciled.add_metric([environment], at)
        interval = GaugeMetricFamily(
            "receiver_reconcile_interval_seconds",
            "RECEIVER_RECONCILE_INTERVAL_HOURS in seconds (0: serve does not reconcile)",
            value=self._reconcile_interval,
        )
        families = [
            unsettled,
            unsettled_age,
            reconciled,
            interval,
            signals,
            oldest,
            quarantined,
            to_rotate,
            unopenable,
            active,
            without,
            link_invalid,
            invalid,
        ]
        return [*families, up, age]

    async def exposition(self, database: db.Database) -> bytes:
        """The exposition text: this process's metrics (every worker's, in
        multiprocess mode), then the gauges read from Postgres (best-effort). Scrapes
        within `RENDER_REUSE_SECONDS` of each other share one rendering."""
        reuse = min(RENDER_REUSE_SECONDS, self._refresh_seconds)
        if time.monotonic() - self._rendered_at < reuse:
            return self._rendered
        from_database = CollectorRegistry(auto_describe=False)
        from_database.register(_Snapshot(await self.families(database)))
        self._rendered = generate_latest(_process_registry()) + generate_latest(from_database)
        self._rendered_at = time.monotonic()
        return self._rendered


def unopenable_counts(
    to_rotate: Iterable[tuple[str, str, int]], key_ids: frozenset[str]
) -> dict[str, int]:
    """Per kind, the values sealed under a key id that is not configured."""
    counts = {"tokens": 0, "events": 0}
    for kind, key_id, n in to_rotate:
        if key_id not in key_ids:
            counts[kind] = counts.get(kind, 0) + n
    return counts


async def check_keys(database: db.Database, keyring: vault.Keyring) -> None:
    """At start: say when stored values are sealed under a key id that is not
    configured (a wrong RECEIVER_TOKEN_KEYS), before anyone needs to open one. From
    receiver.sealed_tallies, as the gauge: a few rows at any size."""
    try:
        rows = await database.fetch("sealed_to_rotate_counts", keyring.primary_id)
    except errors.ReceiverError:
        return  # not migrated yet, or unavailable: /readyz says so
    unknown: dict[str, int] = {}
    for (_, key_id), n in vault.shown_key_counts(rows).items():
        if key_id not in keyring.key_ids:
            unknown[key_id] = unknown.get(key_id, 0) + n
    if unknown:
        log.warning(
            "sealed_under_unconfigured_key",
            key_ids=sorted(unknown),
            values=sum(unknown.values()),
            advice="these cannot be opened: add the key back to RECEIVER_TOKEN_KEYS",
        )


async def render(database: db.Database, gauges: DatabaseGauges) -> bytes:
    """What `GET /metrics` answers (see `DatabaseGauges.exposition`)."""
    return await gauges.exposition(database)


def _process_registry() -> CollectorRegistry:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry

"""`GET /metrics`: this process's counters (every worker's, in multiprocess mode),
then the gauges read from Postgres at scrape time."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from receiver import db

SEALED_REFRESH_SECONDS = 60.0
_sealed_rows: list[tuple[str, str, int]] = []
_sealed_refreshed = -SEALED_REFRESH_SECONDS


class _Snapshot(Collector):
    """A collector that reports metric families computed once, for one scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


async def render(database: db.Database) -> bytes:
    """The exposition text: this process's metrics (every worker's, in multiprocess
    mode), then the gauges read from the database now."""
    global _sealed_rows, _sealed_refreshed
    signals = GaugeMetricFamily(
        "receiver_signals", "Outbox signals by status, read at scrape time", labels=["status"]
    )
    counts = {"pending": 0, "in_flight": 0, "dead": 0}
    counts.update({row["status"]: row["n"] for row in await database.fetch("open_signal_counts")})
    for status, n in counts.items():
        signals.add_metric([status], n)
    quarantined = GaugeMetricFamily(
        "receiver_events_quarantined_open",
        "Quarantined deliveries not yet reprocessed, read at scrape time (alert when > 0)",
        value=await database.fetchval("open_quarantine_count"),
    )
    if time.monotonic() - _sealed_refreshed > SEALED_REFRESH_SECONDS:
        rows = await database.fetch("sealed_key_counts")
        _sealed_rows = [(row["kind"], row["key_id"], row["n"]) for row in rows]
        _sealed_refreshed = time.monotonic()
    sealed = GaugeMetricFamily(
        "receiver_sealed_values",
        "Sealed values per kind and key id (key rotation progress); "
        "refreshed at most once a minute",
        labels=["kind", "key_id"],
    )
    for kind, key_id, n in _sealed_rows:
        sealed.add_metric([kind, key_id], n)
    from_database = CollectorRegistry(auto_describe=False)
    from_database.register(_Snapshot([signals, quarantined, sealed]))
    return generate_latest(_process_registry()) + generate_latest(from_database)


def _process_registry() -> CollectorRegistry:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry

"""Prometheus metrics (prometheus-client), served at `GET /metrics`.

Every label value comes from a fixed set chosen by the code: event types outside
the known ones read `other`, routes are the matched route's template, reasons are
codes. No token, secret or raw client input ever becomes a label.

With `serve --workers N`, each process keeps its own counters and a scrape sees the
worker that answered it; run one process per container (scale with replicas) when
complete counters matter.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, generate_latest

from receiver import events

if TYPE_CHECKING:  # db reports its faults here: a runtime import would be circular
    from receiver import db

EVENTS = Counter(
    "receiver_events_total", "Webhook events answered 200, by type and outcome", ["type", "outcome"]
)
SIGNATURE_FAILURES = Counter(
    "receiver_signature_failures_total", "Deliveries refused with 401, by reason", ["reason"]
)
REQUESTS = Counter(
    "receiver_http_requests_total",
    "HTTP requests answered, by route and status",
    ["route", "status"],
)
REQUEST_SECONDS = Histogram(
    "receiver_request_duration_seconds",
    "Time to answer an HTTP request, by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DATABASE_ERRORS = Counter(
    "receiver_database_errors_total",
    "Database faults, by kind (unavailable, refused, schema_missing, retried)",
    ["kind"],
)
COMMIT_GROUP_SIZE = Histogram(
    "receiver_commit_group_size",
    "Events committed together in one transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
SIGNALS_DELIVERED = Counter(
    "receiver_signals_delivered_total", "Invalidation signals the cache acknowledged"
)
SIGNAL_FAILURES = Counter(
    "receiver_signal_failures_total",
    "Failed signal delivery attempts, by whether they are retried",
    ["retried"],
)
SIGNALS_DEAD = Counter("receiver_signals_dead_total", "Signals dead-lettered")
SIGNAL_DELIVERY_SECONDS = Histogram(
    "receiver_signal_delivery_seconds",
    "From the token change's commit to the cache acknowledging its signal",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600),
)
SIGNALS = Gauge("receiver_signals", "Outbox signals by status, read at scrape time", ["status"])
SEALED_VALUES = Gauge(
    "receiver_sealed_values",
    "Sealed values per kind and key id (key rotation progress); refreshed at most once a minute",
    ["kind", "key_id"],
)

_KNOWN_TYPES = frozenset({events.ONBOARDING_COMPLETED, events.TOKEN_REVOKED})
SEALED_REFRESH_SECONDS = 60.0
_sealed_refreshed = 0.0


def event_type(name: str) -> str:
    """The label for an event type: known types by name, anything else `other`."""
    return name if name in _KNOWN_TYPES else "other"


async def render(database: db.Database) -> bytes:
    """The exposition text, with the database-backed gauges refreshed first."""
    global _sealed_refreshed
    for status in ("pending", "in_flight", "dead"):
        SIGNALS.labels(status=status).set(0)
    for row in await database.fetch("open_signal_counts"):
        SIGNALS.labels(status=row["status"]).set(row["n"])
    if time.monotonic() - _sealed_refreshed > SEALED_REFRESH_SECONDS:
        _sealed_refreshed = time.monotonic()
        SEALED_VALUES.clear()
        for row in await database.fetch("sealed_key_counts"):
            SEALED_VALUES.labels(kind=row["kind"], key_id=row["key_id"]).set(row["n"])
    return generate_latest()

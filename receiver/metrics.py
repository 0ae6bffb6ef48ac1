"""Prometheus metrics (prometheus-client), served at `GET /metrics`.

Every label value comes from a fixed set chosen by the code: event types outside
the known ones read `other`, routes are the matched route's template, reasons are
codes. No token, secret or raw client input ever becomes a label.

With `serve --workers N`, the workers run in prometheus-client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by the parent before they start): each keeps its
counters in files there, and whichever worker answers a scrape reports the sum of
all of them. The gauges read from the database are computed at scrape time by
`receiver.service.scrape`, and are the same whichever worker answers.
"""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import Any

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from receiver import db

# No `_created` series beside each counter: they double the exposition, and every
# dashboard and alert here uses rates, which need no creation time.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


def version() -> str:
    """The installed receiver's version (`unknown` when run from a bare checkout)."""
    try:
        return metadata.version("receiver")
    except metadata.PackageNotFoundError:
        return "unknown"


# Gauges in multiprocess mode: the highest value of any live worker is reported.
BUILD_INFO = Gauge(
    "receiver_build_info",
    "Always 1; the labels say which release and Python serve",
    ["version", "python"],
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(version=version(), python=platform.python_version()).set(1)
_LAST_EVENT = Gauge(
    "receiver_last_event_received_timestamp_seconds",
    "When the last authentic delivery was stored, by environment (alert: no webhook for "
    "6 h: time() - this > 21600)",
    ["environment"],
    multiprocess_mode="max",
)
# Bound once: set on every delivery, keyed by whether it is a test delivery.
LAST_EVENT = {
    False: _LAST_EVENT.labels(environment="live"),
    True: _LAST_EVENT.labels(environment="test"),
}

EVENTS = Counter(
    "receiver_events_total", "Webhook events answered 200, by type and outcome", ["type", "outcome"]
)
QUARANTINED = Counter(
    "receiver_events_quarantined_total",
    "Authentic deliveries stored quarantined (answered 200), by reason",
    ["reason"],
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
    "receiver_http_request_duration_seconds",
    "Time to answer an HTTP request, by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONNECTIONS_REFUSED = Counter(
    "receiver_connections_refused_total",
    "Connections answered 503 at once: RECEIVER_MAX_CONNECTIONS were open",
)
CONNECTIONS_EVICTED = Counter(
    "receiver_connections_evicted_total",
    "Connections with the least progress closed to make room for a new one: "
    "RECEIVER_MAX_CONNECTIONS were open",
)
CONNECTION_CUT_REASONS = ("slow_body", "slow_headers", "source_limit")
CONNECTIONS_CUT = Counter(
    "receiver_connections_cut_total",
    "Connections closed without an answer, by reason (slow_body, slow_headers, source_limit)",
    ["reason"],
)
REQUESTS_REFUSED = Counter(
    "receiver_requests_refused_total",
    "Deliveries answered 503 at once: RECEIVER_MAX_REQUESTS_IN_FLIGHT were in flight",
)
INTERNAL_ERRORS = Counter(
    "receiver_internal_errors_total", "Requests that failed on a fault of the receiver's own"
)
DATABASE_ERRORS = Counter(
    "receiver_database_errors_total",
    "Database faults, by kind (unavailable, read_only, refused, schema_missing, retried,"
    " unstorable)",
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
    "receiver_signals_failed_total",
    "Failed signal delivery attempts, by whether they are retried",
    ["retried"],
)
SIGNALS_DEAD = Counter("receiver_signals_dead_total", "Signals dead-lettered")
SIGNAL_DELIVERY_SECONDS = Histogram(
    "receiver_signals_delivery_seconds",
    "From the token change's commit to the cache acknowledging its signal",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600),
)
DEBITURA_CALLS = Counter(
    "receiver_debitura_calls_total",
    "Calls to Debitura's Referral Partner API, by call and outcome (ok, retried, "
    "gave_up, lost, refused or the HTTP status)",
    ["call", "outcome"],
)
TOKEN_ROTATIONS = Counter(
    "receiver_token_rotations_total",
    "Token rotations through Debitura's API, by trigger (manual, due, resume) and outcome",
    ["trigger", "outcome"],
)
# The database layer imports no metrics (the partner library uses it in the partner's
# process); it reports its faults to whoever listens, and the service counts them.
db.FAULT_OBSERVERS.append(lambda kind: DATABASE_ERRORS.labels(kind=kind).inc())


SIGNATURE_FAILURE_REASONS = ("missing", "malformed", "stale", "future", "mismatch")
DATABASE_ERROR_KINDS = (
    "unavailable",
    "read_only",
    "lock_busy",
    "refused",
    "schema_missing",
    "retried",
    "unstorable",
)


def initialise_labels(
    *, event_types: tuple[str, ...], outcomes: tuple[str, ...], quarantine_reasons: tuple[str, ...]
) -> None:
    """Give each labelled counter a 0 series for every label set it can take, so a
    rate() or an alert sees the counter before its first event (the sets not known
    here come from the lifecycle layer, which the caller imports)."""
    for event_type in (*event_types, "other"):
        for outcome in outcomes:
            child(EVENTS, event_type, outcome)
    for reason in quarantine_reasons:
        child(QUARANTINED, reason)
    for reason in SIGNATURE_FAILURE_REASONS:
        child(SIGNATURE_FAILURES, reason)
    for kind in DATABASE_ERROR_KINDS:
        DATABASE_ERRORS.labels(kind=kind)
    for reason in CONNECTION_CUT_REASONS:
        child(CONNECTIONS_CUT, reason)
    for retried in ("true", "false"):
        SIGNAL_FAILURES.labels(retried=retried)


@functools.lru_cache(maxsize=4096)
def child(metric: Counter | Histogram, *values: str) -> Any:
    """`metric.labels(*values)`, bound once per label set: `labels()` validates and
    takes a lock on every call, which showed in the request path's profile
    (bench/README.md, `bench.profile`). The
    cache is bounded, and every label set on the request path comes from a fixed
    set (route templates, status codes, known event types and outcomes)."""
    return metric.labels(*values)

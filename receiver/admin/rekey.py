"""`receiver keys rotate`: re-encrypt every sealed value under the primary key, online.

Each batch is its own transaction: rows are claimed with `FOR UPDATE SKIP LOCKED`
(several rotators share the work), opened with whichever key sealed them, sealed
again under the primary key with the same associated data, and written back fenced
on the old bytes. A rotation sweeps each table's heap pages in the order they lie on
disk, one row per page per batch: no index names the sealed value (migration 0024),
so a re-seal whose page has room is a heap-only (HOT) update, writing that page
alone; the batch after it, once this one commits, finds the room the old version
left. (Rows taken in key order through an index each rewrote an entry in every
index: 3,900 bytes of WAL per token at 1M clients against about 790 per value now,
mostly each page's image after a checkpoint: bench/README.md.) Pages whose batch
found a row are claimed again until they have none; where values are left is read
from receiver.sealed_tallies, so a sweep runs only while a configured old key still
seals something: rows the service held locked, or values sealed meanwhile under an
old key, are taken by the next sweep.
An interrupted run loses nothing: committed batches stay done and the next run
picks up what is left. Each batch writes its audit row in its own transaction, so a
run killed halfway leaves exactly its committed batches on record. The service may
keep writing meanwhile, since it seals new values under the primary key already.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from receiver import db, errors, vault
from receiver.lifecycle import audit

log = structlog.get_logger(__name__)

# kind -> (claim query, store query, associated data for a row)
_KINDS: dict[str, tuple[str, str, Callable[[str], bytes]]] = {
    "tokens": ("rotation_tokens_sweep", "rotation_store_tokens", vault.token_associated_data),
    "events": ("rotation_events_sweep", "rotation_store_events", vault.event_associated_data),
}
_TABLES = {"tokens": "receiver.tokens", "events": "receiver.events"}
# Sweeps per kind at most: a row the service held locked is skipped by one and taken
# by the next.
MAX_SWEEPS = 6
# Values that fail to open, per kind, before a run stops: tampering touches a few
# rows; thousands failing say the key material under their key id is not the one
# that sealed them (a wrong RECEIVER_TOKEN_KEYS entry), and each claim carries the
# list of those already named.
MAX_BROKEN = 1000
# `keys rotate`'s defaults: values per second at most, and rows (pages) per batch. A
# batch is a burst of work in one transaction; at 1M clients, batches of 200 paced to
# 10,000 values a second kept a 500/s intake's p99 within 2x of idle in five of six
# measurements (1.5x typically), where unpaced batches of 500 (37,000 values a
# second) took it to 2.6-10x (bench/README.md).
DEFAULT_RATE = 10_000
DEFAULT_BATCH = 200

Progress = Callable[[str, int], None]


@dataclass
class RotationReport:
    """What a rotation did and what it left."""

    primary: str
    key_ids: list[str]
    rotated: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0  # re-sealing time, the final count not included
    # (kind, key id) -> values sealed under that key after the run
    remaining: dict[tuple[str, str], int] = field(default_factory=dict)
    # kind -> token ids or event keys of values that failed to open (tampered, or not
    # sealed for their row): left as they are, and named. By row, never by place: a
    # row updated meanwhile moves, and another version may take the place it left.
    broken: dict[str, set[str]] = field(default_factory=lambda: {kind: set() for kind in _KINDS})

    def broken_names(self) -> dict[str, list[str]]:
        """Per kind, the rows whose value failed to open, sorted."""
        return {kind: sorted(rows) for kind, rows in self.broken.items() if rows}

    @property
    def missing_keys(self) -> dict[str, int]:
        """Key ids that still seal values but are not in the keyring: those values
        cannot be opened until the key is configured again."""
        return _unconfigured(self.remaining, self.key_ids)

    @property
    def rows_per_second(self) -> float:
        """Values re-sealed per second (0 when none were)."""
        total = sum(self.rotated.values())
        return total / self.seconds if total and self.seconds > 0 else 0.0

    def count_under(self, kid: str) -> int:
        """Values of every kind still sealed under `kid`."""
        return sum(n for (_, key), n in self.remaining.items() if key == kid)


@dataclass(frozen=True)
class RotationPlan:
    """What `keys rotate` would re-seal: values per kind under each key id other than
    the primary (from receiver.sealed_tallies: `sealed_to_rotate_counts`)."""

    primary: str
    key_ids: list[str]
    # (kind, key id) -> values sealed under that key, the primary excepted
    under: dict[tuple[str, str], int]

    def counts(self) -> dict[str, int]:
        """Values per kind a rotation would re-seal (those under a configured key)."""
        return {
            kind: sum(n for (k, kid), n in self.under.items() if k == kind and kid in self.key_ids)
            for kind in _KINDS
        }

    def from_keys(self) -> list[str]:
        """The configured key ids those values are sealed under now."""
        return sorted({kid for (_, kid) in self.under if kid in self.key_ids})

    def unopenable(self) -> dict[str, int]:
        """Values under a key id not configured: no rotation can open them."""
        return _unconfigured(self.under, self.key_ids)

    def as_dict(self) -> dict[str, object]:
        """The plan as `--dry-run --json` prints it."""
        return {
            "primary": self.primary,
            "would_reseal": self.counts(),
            "from_keys": self.from_keys(),
            "unopenable": self.unopenable(),
        }

    def describe(self) -> str:
        """What moves to which key, and what must hold the key first."""
        counts, sources = self.counts(), self.from_keys()
        line = (
            f"would re-seal {counts['tokens']} token(s) and {counts['events']} event(s) "
            f"under primary key {self.primary!r}"
        )
        if sources:
            line += f" (from {', '.join(map(repr, sources))})"
        lines = [line]
        for kid, n in sorted(self.unopenable().items()):
            lines.append(
                f"  {kid}: {n} value(s) under a key not in RECEIVER_TOKEN_KEYS: left as they are"
            )
        if any(counts.values()):
            lines.append(
                f"  every replica and partner cache must hold key {self.primary!r} in "
                "RECEIVER_TOKEN_KEYS first: a re-sealed value opens only where it is configured"
            )
        return "\n".join(lines)


def _unconfigured(counts: dict[tuple[str, str], int], key_ids: list[str]) -> dict[str, int]:
    """Of values per (kind, key id), how many each unconfigured key id seals."""
    missing: Counter[str] = Counter()
    for (_, kid), n in counts.items():
        if kid not in key_ids:
            missing[kid] += n
    return dict(missing)


async def plan(database: db.Database, keyring: vault.Keyring) -> RotationPlan:
    """What a rotation under `keyring`'s primary key would re-seal now."""
    rows = await database.fetch("sealed_to_rotate_counts", keyring.primary_id)
    under = vault.shown_key_counts(rows)
    return RotationPlan(primary=keyring.primary_id, key_ids=keyring.key_ids, under=under)


async def rotate(
    database: db.Database,
    keyring: vault.Keyring,
    *,
    actor: audit.Actor,
    batch_size: int = DEFAULT_BATCH,
    rate: float = 0,
    progress: Progress | None = None,
) -> RotationReport:
    """Re-encrypt everything not under the primary key; report what remains per key.
    `rate`: values per second at most (0: as fast as the database takes them)."""
    report = RotationReport(primary=keyring.primary_id, key_ids=keyring.key_ids)
    started = time.monotonic()
    pace = Pace(rate)
    old_keys = [kid for kid in keyring.key_ids if kid != keyring.primary_id]
    for kind in _KINDS:
        for _ in range(MAX_SWEEPS):
            if not old_keys or not await _left(database, keyring, kind):
                break
            if not await _sweep(
                database, keyring, actor, kind, old_keys, batch_size, pace, report, progress
            ):
                break  # what is left was held locked throughout
    report.seconds = time.monotonic() - started
    report.remaining = await sealed_key_counts(database)
    return report


class Pace:
    """At most `rate` values a second over the whole run (0: no limit): after each
    batch, a wait until the run is back on schedule."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.started = time.monotonic()
        self.done = 0

    async def after(self, values: int) -> None:
        if self.rate <= 0:
            return
        self.done += values
        ahead = self.started + self.done / self.rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


async def _left(database: db.Database, keyring: vault.Keyring, kind: str) -> int:
    """Values of `kind` sealed under a configured key other than the primary."""
    return (await plan(database, keyring)).counts()[kind]


async def _sweep(
    database: db.Database,
    keyring: vault.Keyring,
    actor: audit.Actor,
    kind: str,
    old_keys: list[str],
    batch_size: int,
    pace: Pace,
    report: RotationReport,
    progress: Progress | None,
) -> int:
    """One walk over the table's pages as they were when it began, in disk order: each
    batch claims one row in each of up to `batch_size` pages, the pages where the batch
    before found a row first (they may hold more), then the next unseen pages. Rows
    written after it began are sealed under the primary already, or left for the next
    sweep. Returns how many values it re-sealed."""
    end = await database.fetchval("relation_pages", _TABLES[kind])
    pending: list[int] = []
    page, rotated = 0, 0
    while True:
        upto = min(end, page + batch_size - len(pending))
        pages, page = pending + list(range(page, upto)), upto
        if not pages:
            return rotated
        found, pending = await _batch(
            database, keyring, actor, kind, old_keys, pages, report, progress
        )
        rotated += found
        await pace.after(found)


async def _batch(
    database: db.Database,
    keyring: vault.Keyring,
    actor: audit.Actor,
    kind: str,
    old_keys: list[str],
    pages: list[int],
    report: RotationReport,
    progress: Progress | None,
) -> tuple[int, list[int]]:
    """One batch in one transaction: claim a row sealed under one of `old_keys` in
    each of `pages`, re-seal, store fenced on the old bytes, audit. Returns how many it
    re-sealed and the pages where it found a row."""
    claim, write, associated_data = _KINDS[kind]
    broken = report.broken[kind]
    async with database.connection() as conn, conn.transaction():
        rows = await conn.fetch(db.QUERIES[claim], old_keys, pages, list(broken))
        updates = []
        for row in rows:
            ad = associated_data(row["sealed_for"])
            try:
                opened = keyring.open(row["sealed"], ad)
            except errors.SealBroken:
                # Not this rotation's to mend: named in the report, never claimed again
                # by this run, and the rest of the table goes on.
                broken.add(row["name"])
                log.warning("rotation_value_broken", kind=kind, row=row["name"])
                if len(broken) > MAX_BROKEN:
                    raise errors.SealBroken(
                        f"more than {MAX_BROKEN:,} {kind} failed to open: is the key "
                        "material under their key id in RECEIVER_TOKEN_KEYS the one that "
                        "sealed them? (re-sealed batches stay done)"
                    ) from None
                continue
            updates.append((row["at"], row["sealed"], keyring.seal(opened, ad)))
        stored = 0
        if updates:
            # One statement for the batch: 500 single-row UPDATEs spent most of a
            # batch's time on their round trips and per-statement work.
            places, old, new = (list(column) for column in zip(*updates, strict=True))
            stored = int((await conn.execute(db.QUERIES[write], places, old, new)).split()[-1])
            await audit.audit(
                conn,
                actor,
                "keys_rotate",
                detail={"primary": keyring.primary_id, "kind": kind, "rotated": stored},
            )
    if stored:
        report.rotated[kind] += stored
        log.debug("rotation_batch", kind=kind, rotated=stored, total=report.rotated[kind])
        if progress is not None:
            progress(kind, report.rotated[kind])
    # A page stays in the sweep while its batch stored what it claimed there: a row
    # held under lock cannot change, so a shortfall is unexpected, and claiming the
    # same row again would never end (the next sweep looks again).
    pages = [row["page"] for row in rows] if stored == len(updates) else []
    return stored, pages


async def sealed_key_counts(database: db.Database) -> dict[tuple[str, str], int]:
    """How many sealed values each key id holds, per kind."""
    rows = await database.fetch("sealed_key_counts")
    return vault.shown_key_counts(rows)

"""`receiver keys rotate`: re-encrypt every sealed value under the primary key, online.

Each batch is its own transaction: rows are claimed with `FOR UPDATE SKIP LOCKED`
(several rotators share the work), opened with whichever key sealed them, sealed
again under the primary key with the same associated data, and written back fenced
on the old bytes. The first pass over a table takes its rows in the order they lie
on disk (a TID range of pages per batch): a batch rewrites neighbouring rows, so the
WAL carries one image of a page for many rows, where rows taken in key order each
dirtied a page of their own (11 KB of WAL per row at 1M clients, 4.5 KB in page
order: bench/README.md). Later passes take what it left (rows the service held
locked, values sealed meanwhile under an old key) through the (key id, row) index:
what they cost is what is left. An interrupted run loses nothing: committed batches stay done and
the next run picks up what is left. Each batch writes its audit row in its own
transaction, so a run killed halfway leaves exactly its committed batches on record.
The service may keep writing meanwhile, since it seals new values under the primary
key already.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from receiver import db, vault
from receiver.lifecycle import audit

log = structlog.get_logger(__name__)

# kind -> (claim query prefix, store query, associated data for a row, first row key)
_KINDS: dict[str, tuple[str, str, Callable[[str], bytes], str]] = {
    "tokens": (
        "rotation_tokens",
        "rotation_store_tokens",
        vault.token_associated_data,
        "00000000-0000-0000-0000-000000000000",
    ),
    "events": ("rotation_events", "rotation_store_events", vault.event_associated_data, ""),
}
_TABLES = {"tokens": "receiver.tokens", "events": "receiver.events"}
# Pages per batch of the first pass: adapted batch by batch towards `batch_size` rows.
_FIRST_PAGES = 8
_MAX_PAGES = 8192
# The key ids sorting before the primary's, then those after: two ranges of the
# (key id, row) index, each walked once in its order; the primary's own range, where
# every re-sealed value lands, is never walked.
_RANGES = ("below", "above")
MAX_PASSES = 5

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
    the primary (index range scans: `sealed_to_rotate_counts`)."""

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
    rows = await database.fetch_count("sealed_to_rotate_counts", keyring.primary_id)
    under = {(row["kind"], row["key_id"]): row["n"] for row in rows}
    return RotationPlan(primary=keyring.primary_id, key_ids=keyring.key_ids, under=under)


async def rotate(
    database: db.Database,
    keyring: vault.Keyring,
    *,
    actor: audit.Actor,
    batch_size: int = 500,
    progress: Progress | None = None,
) -> RotationReport:
    """Re-encrypt everything not under the primary key; report what remains per key."""
    report = RotationReport(primary=keyring.primary_id, key_ids=keyring.key_ids)
    started = time.monotonic()
    for kind in _KINDS:
        await _walk(database, keyring, actor, kind, batch_size, report, progress)
        for _ in range(MAX_PASSES):
            # A row the service held locked is skipped by one pass and taken by the next.
            done = await _pass(database, keyring, actor, kind, batch_size, report, progress)
            if done == 0:
                break
    report.seconds = time.monotonic() - started
    report.remaining = await sealed_key_counts(database)
    return report


async def _pass(
    database: db.Database,
    keyring: vault.Keyring,
    actor: audit.Actor,
    kind: str,
    batch_size: int,
    report: RotationReport,
    progress: Progress | None,
) -> int:
    claim, _, _, first = _KINDS[kind]
    rotated = 0
    for side in _RANGES:
        rotated += await _range(
            database, keyring, actor, kind, f"{claim}_{side}", first, batch_size, report, progress
        )
    return rotated


async def _walk(
    database: db.Database,
    keyring: vault.Keyring,
    actor: audit.Actor,
    kind: str,
    batch_size: int,
    report: RotationReport,
    progress: Progress | None,
) -> None:
    """The first pass: the table's pages as they were when it began, in order, a range
    of pages per batch (rows written after it began are sealed under the primary key
    already, or left for the later passes)."""
    claim = f"{_KINDS[kind][0]}_pages"
    end = await database.fetchval("relation_pages", _TABLES[kind])
    at, pages = (0, 0), _FIRST_PAGES
    while at[0] < end:
        upto = min(at[0] + pages, end)
        found, last = await _batch(
            database, keyring, actor, kind, claim, (at, (upto, 0), batch_size), report, progress
        )
        if found == batch_size:  # more in this range: on from the row after the last,
            # over as many pages as this batch needed (a rerun's window, grown wide over
            # the half already done, shrinks at once where the work starts)
            pages = max(1, last[0] - at[0] + 1)
            at = (last[0], last[1] + 1)
            continue
        # Towards `batch_size` rows a batch: wider where few rows need re-sealing.
        pages = min(_MAX_PAGES, pages * 4 if not found else max(1, pages * batch_size // found))
        at = (upto, 0)


async def _range(
    database: db.Database,
    keyring: vault.Keyring,
    actor: audit.Actor,
    kind: str,
    claim: str,
    first: str,
    batch_size: int,
    report: RotationReport,
    progress: Progress | None,
) -> int:
    rotated = 0
    after: tuple[str, str] = ("", first)
    while True:
        found = await _batch(
            database, keyring, actor, kind, claim, (*after, batch_size), report, progress
        )
        if found is None:
            return rotated
        rotated += found[0]
        after = found[1]


async def _batch(
    database: db.Database,
    keyring: vault.Keyring,
    actor: audit.Actor,
    kind: str,
    claim: str,
    args: tuple[object, ...],
    report: RotationReport,
    progress: Progress | None,
) -> Any:
    """One batch in one transaction: claim (`claim` with the primary key id and
    `args`), re-seal, store fenced on the old bytes, audit. For a page range: how many
    rows it claimed and the tid of the last; for a keyset range: None when nothing was
    left, else how many it re-sealed and where the next batch starts."""
    _, write, associated_data, _ = _KINDS[kind]
    async with database.connection() as conn, conn.transaction():
        rows = await conn.fetch(db.QUERIES[claim], keyring.primary_id, *args)
        if not rows and not claim.endswith("_pages"):
            return None
        updates = []
        for row in rows:
            if vault.key_id_of(row["sealed"]) not in keyring.key_ids:
                continue  # reported from the final counts
            ad = associated_data(row["sealed_for"])
            resealed = keyring.seal(keyring.open(row["sealed"], ad), ad)
            updates.append((row["key"], row["sealed"], resealed))
        if updates:
            # One statement for the batch: 500 single-row UPDATEs spent most of a
            # batch's time on their round trips and per-statement work.
            keys, old, new = (list(column) for column in zip(*updates, strict=True))
            await conn.execute(db.QUERIES[write], keys, old, new)
            await audit.audit(
                conn,
                actor,
                "keys_rotate",
                detail={"primary": keyring.primary_id, "kind": kind, "rotated": len(updates)},
            )
    if updates:
        report.rotated[kind] += len(updates)
        log.debug("rotation_batch", kind=kind, rotated=len(updates), total=report.rotated[kind])
        if progress is not None:
            progress(kind, report.rotated[kind])
    if claim.endswith("_pages"):
        return len(rows), (rows[-1]["at"] if rows else None)
    return len(updates), (rows[-1]["key_id"], rows[-1]["key"])


async def sealed_key_counts(database: db.Database) -> dict[tuple[str, str], int]:
    """How many sealed values each key id holds, per kind."""
    rows = await database.fetch_count("sealed_key_counts")
    return {(row["kind"], row["key_id"]): row["n"] for row in rows}

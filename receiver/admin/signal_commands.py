"""`receiver signals list|retry`: the invalidation outbox from the command line
(docs/design.md §6)."""

from __future__ import annotations

import argparse
import json
import sys

from receiver import config, console, db
from receiver.admin import dead_letters
from receiver.lifecycle import audit
from receiver.signals import outbox


def list_signals(args: argparse.Namespace) -> int:
    """`receiver signals list`."""

    async def work(_: config.Settings, database: db.Database) -> int:
        rows = await outbox.listing(database, status=args.status, limit=args.limit)
        if not args.json:
            # A summary for people, on stderr: stdout holds only the listing.
            by_status = await outbox.counts(database)
            summary = "  ".join(f"{status}={n}" for status, n in sorted(by_status.items()))
            print(summary or "no signals", file=sys.stderr)
        console.print_rows(rows, SIGNAL_COLUMNS, as_json=args.json, noun="signal", limit=args.limit)
        return 0

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)


SIGNAL_COLUMNS = (
    "id",
    "client_id",
    "environment",
    "reason",
    "status",
    "attempts",
    "created_at",
    "next_attempt_at",
    "last_error",
)


def retry(args: argparse.Namespace) -> int:
    """`receiver signals retry`: dead letters back to pending (audited)."""

    async def work(settings: config.Settings, database: db.Database) -> int:
        actor = audit.Actor.of(args.actor, args.audit_reason, settings.secret_values())
        retried = await dead_letters.retry(database, actor, args.id or None)
        missed = sorted(set(args.id or ()) - {str(r) for r in retried})
        if args.json:
            print(json.dumps({"retried": [str(r) for r in retried], "not_dead": missed}))
        else:
            print(f"{len(retried)} dead signal(s) back to pending")
        for signal_id in missed:
            print(f"receiver: no dead signal {signal_id} (unknown, or not dead)", file=sys.stderr)
        return console.EXIT_FAILURE if missed else 0

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)

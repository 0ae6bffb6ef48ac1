"""`receiver prune`, `receiver clients erase` and `receiver audit list`: retention,
erasure and the audit trail from the command line (docs/design.md §6)."""

from __future__ import annotations

import argparse
import json
import sys

from receiver import config, console, db, vault
from receiver.lifecycle import audit, erasure, retention


def prune(args: argparse.Namespace) -> int:
    """`receiver prune`: drop what has outlived its retention (or, --dry-run, count it)."""

    async def work(settings: config.Settings, database: db.Database) -> int:
        report = await retention.prune(database, settings, dry_run=args.dry_run)
        if not report.ran:
            print("receiver: another process is pruning now; nothing done", file=sys.stderr)
            return console.EXIT_FAILURE
        if args.json:
            print(json.dumps(report.as_dict() | {"dry_run": args.dry_run}))
            return 0
        verb = "would drop" if args.dry_run else "dropped"
        print(
            f"{verb}: {report.event_bodies} event bod(ies) older than "
            f"{settings.retain_event_bodies_days:g} days, {report.token_values} revoked or "
            f"expired token value(s) older than {settings.retain_token_values_days:g} days, "
            f"{report.signals} settled signal(s) older than {settings.retain_signals_days:g} days"
        )
        return 0

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)


def erase_client(args: argparse.Namespace) -> int:
    """`receiver clients erase CLIENT_ID --confirm`."""
    if not args.confirm:
        print(
            "receiver: refusing to erase without --confirm: every token value and stored "
            f"body of client {args.client!r} will be gone for good (the erasure is audited)",
            file=sys.stderr,
        )
        return console.EXIT_CONFIG

    async def work(settings: config.Settings, database: db.Database) -> int:
        sealer = vault.Sealer.from_settings(settings)
        erased = await erasure.erase_client(
            database,
            settings,
            sealer,
            args.client,
            audit.Actor.of(args.actor, args.audit_reason, settings.secret_values()),
        )
        if args.json:
            print(json.dumps(erased.as_dict()))
        elif erased.event_key is None:
            # Exit 0 all the same: an erasure is idempotent, and a second run (or a
            # request for a client never stored) has nothing left to do.
            print(
                f"nothing left to erase for client {args.client!r}: nothing matched "
                "(never stored, or erased already)"
            )
        else:
            print(
                f"erased client {args.client!r}: {erased.tokens} token value(s), "
                f"{erased.bodies} stored bod(ies); invalidation signalled "
                f"({', '.join(erased.environments)}); tombstone {erased.client_hash[:16]}"
            )
        if erased.unopened:
            # Whether those bodies name the client is unknown: the erasure is not done.
            print(
                f"receiver: {erased.unopened} stored bod(ies) could not be opened (sealed "
                "under a key not in RECEIVER_TOKEN_KEYS) and may name the client: configure "
                "that key and run the erasure again",
                file=sys.stderr,
            )
            return console.EXIT_FAILURE
        return 0

    return console.with_database(args, work, needs=config.NEEDS_VAULT)


def list_audit(args: argparse.Namespace) -> int:
    """`receiver audit list`."""

    async def work(settings: config.Settings, database: db.Database) -> int:
        rows = await audit.audit_listing(
            database,
            vault.Sealer.from_settings(settings),
            client_id=args.client,
            action=args.action,
            limit=args.limit,
        )
        console.print_rows(
            rows, audit.AUDIT_COLUMNS, as_json=args.json, noun="audit row", limit=args.limit
        )
        return 0

    return console.with_database(args, work, needs=config.NEEDS_VAULT)

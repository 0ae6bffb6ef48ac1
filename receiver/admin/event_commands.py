"""`receiver events list|show|reprocess|dismiss`: stored deliveries and the quarantine from
the command line (docs/design.md §6)."""

from __future__ import annotations

import argparse
import json
import sys

from receiver import config, console, db, vault
from receiver.admin import inbox
from receiver.lifecycle import audit


def list_events(args: argparse.Namespace) -> int:
    """`receiver events list`."""

    async def work(_: config.Settings, database: db.Database) -> int:
        rows = await inbox.listing(
            database,
            status=args.status,
            reason=args.reason,
            event_type=args.type,
            limit=args.limit,
        )
        console.print_rows(rows, inbox.LIST_COLUMNS, as_json=args.json, noun="event")
        if len(rows) == args.limit:
            print(
                f"receiver: stopped at --limit {args.limit}: there may be more",
                file=sys.stderr,
            )
        return 0

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)


def show(args: argparse.Namespace) -> int:
    """`receiver events show`: the stored delivery, redacted."""

    async def work(settings: config.Settings, database: db.Database) -> int:
        keyring = vault.Sealer.from_settings(settings).keyring
        shown = await inbox.show(database, keyring, args.event_id)
        if not shown:
            print(f"receiver: no stored event {args.event_id!r}", file=sys.stderr)
            return console.EXIT_FAILURE
        for entry in shown:
            print(json.dumps(entry, indent=None if args.json else 2, ensure_ascii=False))
        return 0

    return console.with_database(args, work, needs=config.NEEDS_VAULT)


def reprocess(args: argparse.Namespace) -> int:
    """`receiver events reprocess`: exit 0 when every named delivery left quarantine."""
    if bool(args.event_ids) == bool(args.quarantined):
        print(
            "receiver: error: give EVENT_ID... or --quarantined (not both)",
            file=sys.stderr,
        )
        return console.EXIT_CONFIG

    async def work(settings: config.Settings, database: db.Database) -> int:
        keys = args.event_ids or await inbox.quarantined_keys(database, reason=args.reason)
        results = await inbox.reprocess(database, settings, keys)
        await audit.audit_each(
            database,
            audit.Actor.of(args.actor, args.audit_reason),
            "events_reprocess",
            [
                {"event_key": r.key, "detail": {"outcome": r.outcome, "reason": r.reason}}
                for r in results
            ],
        )
        for result in results:
            if args.json:
                print(json.dumps({k: getattr(result, k) for k in result.__slots__}))
            else:
                line = f"{result.key}: {result.outcome}"
                if result.reason:
                    line += f" ({result.reason}: {result.detail})"
                print(line)
        left = [r for r in results if r.outcome in {"quarantined", "not_found", "body_dropped"}]
        if not args.json:
            done = len(results) - len(left)
            print(f"{done} of {len(results)} event(s) out of quarantine")
        return console.EXIT_FAILURE if left else 0

    return console.with_database(args, work, needs=config.NEEDS_SERVICE)


def dismiss(args: argparse.Namespace) -> int:
    """`receiver events dismiss KEY… --reason TEXT`: close quarantined deliveries that
    will never apply (audited); exit 1 when a named key was not quarantined."""

    async def work(_: config.Settings, database: db.Database) -> int:
        actor = audit.Actor.of(args.actor, args.audit_reason)
        dismissed = await inbox.dismiss(database, actor, args.event_ids)
        for key in args.event_ids:
            if key in dismissed:
                print(f"{key}: dismissed (was quarantined: {dismissed[key]})")
            else:
                print(f"{key}: not an open quarantine (unknown, or not quarantined)")
        print(f"{len(dismissed)} of {len(args.event_ids)} event(s) dismissed")
        return 0 if len(dismissed) == len(args.event_ids) else console.EXIT_FAILURE

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)

"""Operator commands against the database: tokens, keys, signals, events
(docs/design.md §6).

Each runs once and exits; output that scripts read goes to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from receiver import config, console, db, vault
from receiver.admin import inbox, rekey, tokens
from receiver.lifecycle import adoption, audit, erasure, retention
from receiver.signals import outbox


def tokens_list(args: argparse.Namespace) -> int:
    """`receiver tokens list`."""

    async def work(_: config.Settings, database: db.Database) -> int:
        rows = await tokens.inventory(
            database,
            client_id=args.client,
            status=args.status,
            environment=args.environment,
            older_than=args.older_than,
            limit=args.limit,
        )
        console.print_rows(rows, tokens.INVENTORY_COLUMNS, as_json=args.json)
        if len(rows) == args.limit:
            print(
                f"receiver: showing the first {args.limit} tokens: --limit N for more",
                file=sys.stderr,
            )
        return 0

    return console.with_database(args, work)


def tokens_reveal(args: argparse.Namespace) -> int:
    """`receiver tokens reveal`."""
    if not args.confirm:
        print(
            "receiver: refusing to print a token without --confirm (the reveal is audited)",
            file=sys.stderr,
        )
        return console.EXIT_CONFIG

    async def work(settings: config.Settings, database: db.Database) -> int:
        sealer = vault.Sealer.from_settings(settings)
        meta, token = await tokens.reveal(
            database,
            sealer,
            args.client,
            audit.Actor.of(args.actor, args.audit_reason),
            prefix=args.prefix,
            environment=args.environment,
        )
        print(
            f"# client {meta['client_id']}, token {meta['prefix']}…, status {meta['status']}",
            file=sys.stderr,
        )
        print(token)
        return 0

    return console.with_database(args, work)


def keys_rotate(args: argparse.Namespace) -> int:
    """`receiver keys rotate`."""

    async def work(settings: config.Settings, database: db.Database) -> int:
        sealer = vault.Sealer.from_settings(settings)

        def progress(kind: str, total: int) -> None:
            print(f"{kind}: {total} re-encrypted", file=sys.stderr, flush=True)

        report = await rekey.rotate(
            database, sealer.keyring, batch_size=args.batch_size, progress=progress
        )
        print(
            f"re-encrypted {report.rotated['tokens']} token(s) and {report.rotated['events']} "
            f"event(s) under primary key {report.primary!r}"
        )
        print("values under each key:")
        for kid in sealer.keyring.key_ids:
            counts = {kind: report.remaining.get((kind, kid), 0) for kind in ("tokens", "events")}
            line = f"  {kid}: {counts['tokens']} token(s), {counts['events']} event(s)"
            if kid == report.primary:
                line += " (primary)"
            elif report.count_under(kid) == 0:
                line += " -> may be removed from RECEIVER_TOKEN_KEYS"
            else:
                line += " -> still in use: run keys rotate again"
            print(line)
        for kid, count in report.missing_keys.items():
            print(f"  {kid}: {count} value(s) under a key not in RECEIVER_TOKEN_KEYS: cannot open")
        detail = {"primary": report.primary, "rotated": report.rotated}
        await audit.audit_each(
            database,
            audit.Actor.of(args.actor, args.audit_reason),
            "keys_rotate",
            [{"detail": detail | {"missing_keys": report.missing_keys}}],
        )
        return console.EXIT_FAILURE if report.missing_keys else 0

    return console.with_database(args, work)


def keys_generate(_: argparse.Namespace) -> int:
    """`receiver keys generate`."""
    values = config.generate_dev_secrets()
    values["token_keys"] = values["token_keys"].replace("dev1:", "k1:", 1)
    for name, value in values.items():
        print(f"RECEIVER_{name.upper()}={value}")
    return 0


def signals_list(args: argparse.Namespace) -> int:
    """`receiver signals list`."""

    async def work(_: config.Settings, database: db.Database) -> int:
        rows = await outbox.listing(database, status=args.status, limit=args.limit)
        if args.json:
            for row in rows:
                print(json.dumps(row))
            return 0
        by_status = await outbox.counts(database)
        print("  ".join(f"{status}={n}" for status, n in sorted(by_status.items())) or "no signals")
        print(console.table(rows, SIGNAL_COLUMNS, noun="signal"))
        return 0

    return console.with_database(args, work)


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


def signals_retry(args: argparse.Namespace) -> int:
    """`receiver signals retry`: dead letters back to pending."""

    async def work(_: config.Settings, database: db.Database) -> int:
        retried = await outbox.retry_dead(database, args.id or None)
        print(f"{len(retried)} dead signal(s) back to pending")
        return 0

    return console.with_database(args, work)


def events_list(args: argparse.Namespace) -> int:
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
        return 0

    return console.with_database(args, work)


def events_show(args: argparse.Namespace) -> int:
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

    return console.with_database(args, work)


def events_reprocess(args: argparse.Namespace) -> int:
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

    return console.with_database(args, work)


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

    return console.with_database(args, work)


def clients_erase(args: argparse.Namespace) -> int:
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
            audit.Actor.of(args.actor, args.audit_reason),
        )
        if args.json:
            print(json.dumps(erased.as_dict()))
        elif erased.event_key is None:
            print(f"nothing left to erase for client {args.client!r}")
        else:
            print(
                f"erased client {args.client!r}: {erased.tokens} token value(s), "
                f"{erased.bodies} stored bod(ies); invalidation signalled "
                f"({', '.join(erased.environments)}); tombstone {erased.client_hash[:16]}"
            )
        return 0

    return console.with_database(args, work)


def tokens_import(args: argparse.Namespace) -> int:
    """`receiver tokens import CLIENT_ID`: the token from stdin or --file, never argv."""
    if args.file:
        with open(args.file, encoding="utf-8") as source:
            token = adoption.read_token(source)
    else:
        if sys.stdin.isatty():
            print("paste the token, then Enter:", file=sys.stderr)
        token = adoption.read_token([sys.stdin.readline()])
    expires_at = console.timestamp(args.expires_at, "--expires-at")

    async def work(settings: config.Settings, database: db.Database) -> int:
        imported = await adoption.import_token(
            database,
            settings,
            vault.Sealer.from_settings(settings),
            args.client,
            token,
            audit.Actor.of(args.actor, args.audit_reason),
            supersede=args.supersede,
            old_expires_at=expires_at,
        )
        print(
            f"client {imported.client_id}: token {imported.prefix}… ({imported.environment}) "
            f"{imported.status}, event {imported.event_key}"
        )
        return 0

    return console.with_database(args, work)


def audit_list(args: argparse.Namespace) -> int:
    """`receiver audit list`."""

    async def work(settings: config.Settings, database: db.Database) -> int:
        rows = await audit.audit_listing(
            database,
            vault.Sealer.from_settings(settings),
            client_id=args.client,
            action=args.action,
            limit=args.limit,
        )
        console.print_rows(rows, audit.AUDIT_COLUMNS, as_json=args.json, noun="audit row")
        return 0

    return console.with_database(args, work)

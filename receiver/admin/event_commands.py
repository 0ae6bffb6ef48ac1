"""`receiver events list|show|reprocess|dismiss`: stored deliveries and the quarantine from
the command line (docs/design.md §6)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from receiver import config, console, db, errors, redaction, vault
from receiver.admin import inbox
from receiver.lifecycle import audit, events


def list_events(args: argparse.Namespace) -> int:
    """`receiver events list`."""

    async def work(_: config.Settings, database: db.Database) -> int:
        rows = await inbox.listing(
            database,
            status=args.status,
            reason=args.quarantine_reason,
            event_type=args.type,
            limit=args.limit,
        )
        console.print_rows(
            rows, inbox.LIST_COLUMNS, as_json=args.json, noun="event", limit=args.limit
        )
        return 0

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)


def _token_shaped(event_ids: list[str]) -> bool:
    """Whether an id given on the command line looks like a token: it is refused
    before any SQL, so that it reaches neither the statement log nor the audit."""
    shaped = [i for i in event_ids if redaction.TOKEN_PATTERN.search(redaction.unescape(i))]
    if shaped:
        print(
            f"receiver: error: {len(shaped)} event id(s) look like a bearer token, not an "
            "event id; nothing was looked up",
            file=sys.stderr,
        )
    return bool(shaped)


def show(args: argparse.Namespace) -> int:
    """`receiver events show`: the stored delivery, redacted."""
    if _token_shaped([args.event_id]):
        return console.EXIT_CONFIG

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
    if _token_shaped(args.event_ids or []):
        return console.EXIT_CONFIG
    # The filter's old spelling would now reprocess every quarantined delivery,
    # however the reason is written (capitals, a dash, spaces).
    written = (args.audit_reason or "").strip().lower().replace("-", "_")
    if args.quarantined and args.quarantine_reason is None and written in events.QUARANTINE_REASONS:
        raise errors.UsageError(
            f"--reason is the audit reason now; to reprocess only {written!r} "
            f"deliveries, give --quarantine-reason {written}"
        )

    async def work(settings: config.Settings, database: db.Database) -> int:
        keys = args.event_ids or await inbox.quarantined_keys(
            database, reason=args.quarantine_reason
        )
        actor = audit.Actor.of(args.actor, args.audit_reason, settings.secret_values())
        results = await inbox.reprocess(database, settings, keys, actor)
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

    async def work(settings: config.Settings, database: db.Database) -> int:
        actor = audit.Actor.of(args.actor, args.audit_reason, settings.secret_values())
        done = await inbox.dismiss(database, actor, args.event_ids)
        for one in done:
            if args.json:
                print(json.dumps({**dataclasses.asdict(one), "ok": one.ok}))
            elif one.outcome == "dismissed":
                print(f"{one.key}: dismissed (was quarantined: {one.quarantine_reason})")
            elif one.outcome == "already_dismissed":
                print(f"{one.key}: already dismissed")
            elif one.outcome == "not_quarantined":
                print(f"{one.key}: not quarantined (status {one.status}): left as it is")
            else:
                print(f"{one.key}: unknown: no stored delivery has this key")
        if not args.json:
            dismissed = sum(one.outcome == "dismissed" for one in done)
            print(f"{dismissed} of {len(done)} event(s) dismissed", file=sys.stderr)
        return 0 if all(one.ok for one in done) else console.EXIT_FAILURE

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)

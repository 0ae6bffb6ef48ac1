"""`receiver tokens list|reveal|import`: the token inventory from the command line
(docs/design.md §6).

Each runs once and exits; output that scripts read goes to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from receiver import config, console, db, errors, vault
from receiver.admin import tokens
from receiver.lifecycle import adoption, audit


def list_tokens(args: argparse.Namespace) -> int:
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
        console.print_rows(rows, tokens.INVENTORY_COLUMNS, as_json=args.json, limit=args.limit)
        return 0

    return console.with_database(args, work, needs=config.NEEDS_DATABASE)


def reveal(args: argparse.Namespace) -> int:
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
            audit.Actor.of(args.actor, args.audit_reason, settings.secret_values()),
            prefix=args.prefix,
            environment=args.environment,
        )
        print(
            f"# client {meta['client_id']}, token {meta['prefix']}…, status {meta['status']}",
            file=sys.stderr,
        )
        print(token)
        return 0

    return console.with_database(args, work, needs=config.NEEDS_VAULT)


def import_token(args: argparse.Namespace) -> int:
    """`receiver tokens import CLIENT_ID`: the token from stdin or --file, never argv."""
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as source:
                token = adoption.read_token(source)
        except OSError as exc:
            raise errors.UsageError(f"--file {args.file}: {exc.strerror or exc}") from None
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
            audit.Actor.of(args.actor, args.audit_reason, settings.secret_values()),
            supersede=args.supersede,
            old_expires_at=expires_at,
        )
        if args.json:
            print(
                json.dumps(
                    {
                        "client_id": imported.client_id,
                        "environment": imported.environment,
                        "token_prefix": imported.prefix,
                        "status": imported.status,
                        "event_key": imported.event_key,
                    }
                )
            )
        else:
            print(
                f"client {imported.client_id}: token {imported.prefix}… "
                f"({imported.environment}) {imported.status}, event {imported.event_key}"
            )
        return 0

    return console.with_database(args, work, needs=config.NEEDS_VAULT)

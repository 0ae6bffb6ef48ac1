"""`receiver keys generate|rotate`: key material from the command line
(docs/design.md §6)."""

from __future__ import annotations

import argparse
import sys

from receiver import config, console, db, vault
from receiver.admin import rekey
from receiver.lifecycle import audit


def generate(_: argparse.Namespace) -> int:
    """`receiver keys generate`."""
    values = config.generate_dev_secrets()
    values["token_keys"] = values["token_keys"].replace("dev1:", "k1:", 1)
    for name, value in values.items():
        print(f"RECEIVER_{name.upper()}={value}")
    return 0


def rotate(args: argparse.Namespace) -> int:
    """`receiver keys rotate`."""

    async def work(settings: config.Settings, database: db.Database) -> int:
        sealer = vault.Sealer.from_settings(settings)

        def progress(kind: str, total: int) -> None:
            print(f"{kind}: {total} re-encrypted", file=sys.stderr, flush=True)

        actor = audit.Actor.of(args.actor, args.audit_reason)
        report = await rekey.rotate(
            database, sealer.keyring, actor=actor, batch_size=args.batch_size, progress=progress
        )
        print(
            f"re-encrypted {report.rotated['tokens']} token(s) and {report.rotated['events']} "
            f"event(s) under primary key {report.primary!r} "
            f"in {report.seconds:.1f} s ({report.rows_per_second:,.0f} rows/s)"
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
        # Each batch is audited as it commits; this row closes the run with its totals.
        detail = {"primary": report.primary, "rotated": report.rotated, "summary": True}
        await audit.audit_each(
            database,
            actor,
            "keys_rotate",
            [{"detail": detail | {"missing_keys": report.missing_keys}}],
        )
        return console.EXIT_FAILURE if report.missing_keys else 0

    return console.with_database(args, work, needs=config.NEEDS_VAULT)

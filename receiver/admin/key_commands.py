"""`receiver keys generate|rotate`: key material from the command line
(docs/design.md §6)."""

from __future__ import annotations

import argparse
import json
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
        plan = await rekey.plan(database, sealer.keyring)
        if args.dry_run:
            if args.json:
                print(json.dumps(plan.as_dict()))
            else:
                print(plan.describe())
            # As the real run would: values no configured key opens need attention.
            return console.EXIT_FAILURE if plan.unopenable() else 0
        # Said before anything changes: once re-sealed, a value opens only where the
        # new primary key is configured (every replica, every partner cache).
        print(plan.describe(), file=sys.stderr, flush=True)

        def progress(kind: str, total: int) -> None:
            print(f"{kind}: {total} re-encrypted", file=sys.stderr, flush=True)

        actor = audit.Actor.of(args.actor, args.audit_reason, settings.secret_values())
        report = await rekey.rotate(
            database,
            sealer.keyring,
            actor=actor,
            batch_size=args.batch_size,
            rate=args.rate,
            progress=progress,
        )
        if args.json:
            print(json.dumps(_outcome(report, sealer.keyring.key_ids)))
        else:
            _print_report(report, sealer.keyring.key_ids)
        # Each batch is audited as it commits; this row closes the run with its totals.
        detail = {"primary": report.primary, "rotated": report.rotated, "summary": True}
        await audit.audit_each(
            database,
            actor,
            "keys_rotate",
            [{"detail": detail | {"missing_keys": report.missing_keys}}],
        )
        left = {
            kid: report.count_under(kid)
            for kid in sealer.keyring.key_ids
            if kid != report.primary and report.count_under(kid)
        }
        broken = sum(len(rows) for rows in report.broken.values())
        if broken:
            print(
                f"receiver: {broken} value(s) failed to open and were left under their "
                "old key (named above): keep that key until they are restored or erased",
                file=sys.stderr,
            )
        if sum(left.values()) > broken:
            # Not done: `keys rotate && <remove the old key>` must not strand them.
            named = ", ".join(f"{kid} ({n})" for kid, n in left.items())
            print(
                f"receiver: values still under {named}: held locked by the service through "
                "every sweep, or sealed meanwhile by a replica without the new primary key; "
                "run keys rotate again before removing a key",
                file=sys.stderr,
            )
        return console.EXIT_FAILURE if report.missing_keys or left else 0

    return console.with_database(args, work, needs=config.NEEDS_VAULT)


def _outcome(report: rekey.RotationReport, key_ids: list[str]) -> dict[str, object]:
    """`keys rotate --json`: what was re-sealed, and what each key still holds."""
    return {
        "primary": report.primary,
        "rotated": dict(report.rotated),
        "seconds": round(report.seconds, 3),
        "rows_per_second": round(report.rows_per_second),
        "remaining": {
            kid: {kind: report.remaining.get((kind, kid), 0) for kind in ("tokens", "events")}
            for kid in key_ids
        },
        "unopenable": report.missing_keys,
        "broken": report.broken_names(),
    }


# Rows named when their value failed to open (the JSON outcome names them all).
_NAMED = 20


def _print_report(report: rekey.RotationReport, key_ids: list[str]) -> None:
    print(
        f"re-encrypted {report.rotated['tokens']} token(s) and {report.rotated['events']} "
        f"event(s) under primary key {report.primary!r} "
        f"in {report.seconds:.1f} s ({report.rows_per_second:,.0f} rows/s)"
    )
    print("values under each key:")
    for kid in key_ids:
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
    for kind, names in report.broken_names().items():
        shown = ", ".join(names[:_NAMED])
        more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
        print(
            f"  {len(names)} {kind[:-1]}(s) failed to open (tampered, or not sealed for "
            f"their row), left as they are: {shown}{more}"
        )

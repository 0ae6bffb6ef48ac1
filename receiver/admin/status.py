"""`receiver status`: one look at the whole installation (docs/design.md §6), the
first command of the runbook.

It reads only what the gauges and the other commands already read (named queries,
each index-backed or bounded), opens no token, and calls nothing outside Postgres.
Exit 1 when something needs attention: the database unreachable, a migration
pending, values sealed under a key not configured, an open quarantine, a dead
signal, a rotation unsettled for over an hour, an environment not reconciled for two
intervals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from receiver import config, console, db, errors, vault
from receiver.db import migrations
from receiver.debitura import api

UNSETTLED_AFTER_SECONDS = 3600.0


async def gather(settings: config.Settings, database: db.Database) -> dict[str, Any]:
    """Every part of the report, as plain data (no secret, no token)."""
    applied = [name for name, at in await migrations.status(database) if at is not None]
    pending = await migrations.pending(database)
    keyring = vault.Sealer.from_settings(settings).keyring
    rotate = await database.fetch("sealed_to_rotate_counts", keyring.primary_id)
    in_use = sorted({row["key_id"] for row in rotate} | {keyring.primary_id})
    signals = {row["status"]: row["n"] for row in await database.fetch("open_signal_counts")}
    unsettled = {
        row["environment"]: {"open": row["n"], "oldest_seconds": round(row["oldest_seconds"])}
        for row in await database.fetch("rotations_unsettled")
    }
    reconciled = {r["environment"]: r["at"] for r in await database.fetch("reconcile_last_runs")}
    deliveries = {}
    for environment in vault.ENVIRONMENTS:
        at = await database.fetchval("last_delivery", environment)
        deliveries[environment] = None if at is None else db.iso(at)
    return {
        "database": {"reachable": True, "at": console.database_label(console.dsn(settings))},
        "migrations": {"applied": len(applied), "pending": pending},
        "keys": {
            "configured": list(keyring.key_ids),
            "primary": keyring.primary_id,
            "in_use": in_use,
            "not_configured": [k for k in in_use if k not in keyring.key_ids],
            "values_to_reseal": {f"{r['kind']}:{r['key_id']}": r["n"] for r in rotate},
        },
        "quarantine_open": await database.fetchval("open_quarantine_count"),
        "signals": {"pending": signals.get("pending", 0), "dead": signals.get("dead", 0)},
        "rotations_unsettled": unsettled,
        "reconcile": {
            "interval_hours": settings.reconcile_interval_hours,
            "environments": {env: reconciled.get(env) for env in api.configured(settings)},
        },
        "last_delivery_within_7_days": deliveries,
    }


def attention(report: dict[str, Any], settings: config.Settings) -> list[str]:
    """What needs an operator, one short line each (empty: all well)."""
    found = []
    if not report["database"]["reachable"]:
        return ["the database is unreachable"]
    if report["migrations"]["pending"]:
        found.append(f"migrations pending: {', '.join(report['migrations']['pending'])}")
    if "keys" not in report:  # the schema is missing or behind: nothing else was read
        return found or ["the database schema is incomplete: run `receiver migrate`"]
    if report["keys"]["not_configured"]:
        found.append(f"values sealed under keys not configured: {report['keys']['not_configured']}")
    if report["quarantine_open"]:
        found.append(f"{report['quarantine_open']} quarantined delivery(ies) open")
    if report["signals"]["dead"]:
        found.append(f"{report['signals']['dead']} dead signal(s)")
    for env, rot in report["rotations_unsettled"].items():
        if rot["oldest_seconds"] > UNSETTLED_AFTER_SECONDS:
            found.append(f"{rot['open']} {env} rotation(s) unsettled for over an hour")
    interval = settings.reconcile_interval_hours * 3600
    if interval > 0:
        now = time.time()
        for env, at in report["reconcile"]["environments"].items():
            if at is None or now - at > 2 * interval:
                found.append(f"{env} not reconciled for two intervals")
    return found


def status(args: argparse.Namespace) -> int:
    """`receiver status [--json]`."""
    settings = console.start(args, needs=config.NEEDS_VAULT)

    async def run() -> dict[str, Any]:
        database = await db.Database.open(
            console.dsn(settings), max_size=1, pooled=settings.database_pooled
        )
        try:
            return await gather(settings, database)
        except (errors.DatabasePermission, errors.DatabaseRefused):
            raise  # the wrong role or database: a setting to fix (one line, exit 2)
        except errors.SchemaNotReady:
            # Reachable, but not migrated (or behind this release): say that, not
            # "unreachable"; nothing else can be read before `receiver migrate`.
            known = await migrations.status(database)
            return {
                "database": {
                    "reachable": True,
                    "at": console.database_label(console.dsn(settings)),
                },
                "migrations": {
                    "applied": sum(at is not None for _, at in known),
                    "pending": await migrations.pending(database),
                },
            }
        except errors.DatabaseUnavailable:
            label = console.database_label(console.dsn(settings))
            return {"database": {"reachable": False, "at": label}}
        finally:
            await database.close()

    report = asyncio.run(run())
    needs = attention(report, settings)
    report["attention"] = needs
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return console.EXIT_FAILURE if needs else 0


def _print(report: dict[str, Any]) -> None:
    database = report["database"]
    reachable = "reachable" if database["reachable"] else "UNREACHABLE"
    print(f"database       {reachable} ({database['at']})")
    if "migrations" in report:
        m = report["migrations"]
        print(f"migrations     {m['applied']} applied, {len(m['pending'])} pending")
    if "keys" in report:
        k = report["keys"]
        print(
            f"keys           primary {k['primary']}; configured {', '.join(k['configured'])}; "
            f"in use {', '.join(k['in_use'])}"
        )
        print(f"quarantine     {report['quarantine_open']} open")
        s = report["signals"]
        print(f"signals        {s['pending']} pending, {s['dead']} dead")
        rotations = report["rotations_unsettled"]
        print(
            "rotations      "
            + (
                ", ".join(f"{e}: {r['open']} unsettled" for e, r in rotations.items())
                or "none unsettled"
            )
        )
        rec = report["reconcile"]["environments"]
        print(
            "reconciled     "
            + (
                ", ".join(f"{e}: {_when(at)}" for e, at in rec.items())
                or "no Debitura API configured"
            )
        )
        last = report["last_delivery_within_7_days"]
        print(
            "last delivery  "
            + ", ".join(f"{e}: {at or 'none in 7 days'}" for e, at in last.items())
        )
    needs = report["attention"]
    print("attention      " + ("; ".join(needs) if needs else "none"))


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))

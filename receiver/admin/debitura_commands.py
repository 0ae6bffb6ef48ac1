"""`tokens fetch`, `tokens rotate`, `tokens validate` and `clients revoke`: token
management through Debitura's API (docs/design.md §9).

Output names clients and token prefixes, never a token. Exit 0 when every client's
action succeeded, 1 when any failed (each failure on its own line on stderr), 2 for
usage or configuration (an API key not set, a URL that is not https://).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from receiver import config, console, db, errors, redaction, vault
from receiver.debitura import api, management, outcomes, reconcile, rotation
from receiver.lifecycle import audit, events

_REDACTOR = redaction.Redactor()


def _run(
    args: argparse.Namespace,
    work: Callable[[management.Manager, rotation.Rotator], Awaitable[list[outcomes.Outcome]]],
    *,
    nothing: str | None = None,
) -> int:
    """Open the database and an HTTP session, do `work`, print its outcomes (`nothing`:
    what to say, on stderr, when there were none: never a silent no-op)."""
    # Client ids are checked before any call: Debitura must never act (a revocation
    # cannot be undone) on a client the vault would then refuse to record.
    named = list(getattr(args, "clients", None) or [])
    if getattr(args, "client", None) is not None:
        named.append(args.client)
    for client_id in named:
        if not events.is_identifier(client_id) or _REDACTOR.changes(client_id):
            raise errors.UsageError(
                "a client id is 1-128 characters of A-Z a-z 0-9 _ . : - (and not a token)"
            )

    async def with_api(settings: config.Settings, database: db.Database) -> int:
        sealer = vault.Sealer.from_settings(settings)
        async with aiohttp.ClientSession() as session:
            client = api.Api(session, settings)
            done = await work(
                management.Manager(database, settings, sealer, client),
                rotation.Rotator(database, settings, sealer, client),
            )
        if not done and nothing is not None:
            print(f"receiver: {nothing}", file=sys.stderr)
        return report(done, as_json=getattr(args, "json", False))

    return console.with_database(args, with_api)


def report(done: Sequence[outcomes.Outcome], *, as_json: bool) -> int:
    """Print each outcome (failures on stderr, one line each); the exit status."""
    for outcome in done:
        if as_json:
            print(json.dumps(outcome.as_dict()))
        elif outcome.ok:
            print(outcome.line())
        if not outcome.ok:
            print(f"receiver: {outcome.line()}", file=sys.stderr)
    return console.EXIT_FAILURE if any(not o.ok for o in done) else 0


def _actor(args: argparse.Namespace, reason: str | None, settings: config.Settings) -> audit.Actor:
    # The configured secrets masked too: a pasted API key must not enter the audit trail.
    return audit.Actor.of(args.actor, reason, settings.secret_values())


def tokens_fetch(args: argparse.Namespace) -> int:
    """`receiver tokens fetch CLIENT`."""

    async def work(manager: management.Manager, _: rotation.Rotator) -> list[outcomes.Outcome]:
        api.endpoint(manager.settings, args.environment)
        return [
            await manager.fetch(
                args.client, args.environment, _actor(args, args.audit_reason, manager.settings)
            )
        ]

    return _run(args, work)


def tokens_rotate(args: argparse.Namespace) -> int:
    """`receiver tokens rotate CLIENT…`, `--due`, or `--resume`."""
    modes = sum([bool(args.clients), args.due, args.resume])
    if modes != 1:
        raise errors.UsageError("give client ids, or --due, or --resume (one of them)")
    if (args.dry_run or args.limit is not None) and not args.due:
        raise errors.UsageError("--dry-run and --limit go with --due")
    if args.revoke_immediately and not args.clients:
        raise errors.UsageError("--revoke-immediately goes with client ids (a compromise)")

    async def work(_: management.Manager, rotator: rotation.Rotator) -> list[outcomes.Outcome]:
        settings = rotator.settings
        actor = _actor(args, args.reason, settings)
        if args.resume:
            return await rotator.resume(actor)
        if args.due:
            if not api.configured(settings):
                api.endpoint(settings, "live")  # raises, naming the variable
            if args.dry_run:
                # Printed page by page: never every due token in memory at once.
                as_json = getattr(args, "json", False)
                shown = 0
                async for page in rotator.due_pages(limit=args.limit):
                    shown += len(page)
                    report(
                        [
                            outcomes.Outcome(
                                r["client_id"], r["environment"], "due", prefix=r["prefix"]
                            )
                            for r in page
                        ],
                        as_json=as_json,
                    )
                if not shown:
                    print("receiver: no token is due (nothing would be rotated)", file=sys.stderr)
                return []
            return await rotator.rotate_due(
                actor, limit=args.limit or 1_000_000, rate=settings.token_rotate_rate
            )
        api.endpoint(settings, args.environment)
        return [
            await rotator.rotate(
                client_id,
                args.environment,
                actor,
                # Masked and bounded like every audited text: the intent row stores
                # it, and Debitura receives it (a pasted token must go nowhere).
                reason=actor.reason or args.reason,
                revoke_immediately=args.revoke_immediately,
            )
            for client_id in args.clients
        ]

    nothing: str | None
    if args.due:
        # The dry run prints as it reads, and says so itself when nothing is due.
        nothing = None if args.dry_run else "no token is due for rotation"
    else:
        nothing = "no rotation is open: nothing to resume" if args.resume else None
    return _run(args, work, nothing=nothing)


def tokens_validate(args: argparse.Namespace) -> int:
    """`receiver tokens validate [CLIENT…]`: exit 1 when any token is invalid."""

    async def work(manager: management.Manager, _: rotation.Rotator) -> list[outcomes.Outcome]:
        return await manager.validate(args.clients or None, args.environment)

    return _run(args, work)


def clients_revoke(args: argparse.Namespace) -> int:
    """`receiver clients revoke CLIENT --reason TEXT --confirm`."""
    if not args.confirm:
        print(
            "receiver: refusing to revoke without --confirm (Debitura's revocation cannot be "
            "undone: the client must link again)",
            file=sys.stderr,
        )
        return console.EXIT_CONFIG

    async def work(manager: management.Manager, _: rotation.Rotator) -> list[outcomes.Outcome]:
        api.endpoint(manager.settings, args.environment)
        actor = _actor(args, args.reason, manager.settings)
        return [await manager.revoke(args.client, args.environment, actor, actor.reason or "")]

    return _run(args, work)


LINK_BODY_MAX_BYTES = 64 * 1024


def read_link_request(text: str) -> dict[str, Any]:
    """The partner's link request: a JSON object, passed to Debitura as it is."""
    if len(text.encode()) > LINK_BODY_MAX_BYTES:
        raise errors.UsageError(f"the link request is over {LINK_BODY_MAX_BYTES} bytes")
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise errors.UsageError(f"the link request is not JSON ({type(exc).__name__})") from None
    if not isinstance(request, dict):
        raise errors.UsageError("the link request must be a JSON object")
    return request


def clients_link(args: argparse.Namespace) -> int:
    """`receiver clients link (--body FILE | -)`: link through Debitura, store the
    token sealed; print the client id, the prefix and the status, never the token."""
    if args.body == "-":
        text = sys.stdin.read(LINK_BODY_MAX_BYTES + 1)
    else:
        try:
            text = Path(args.body).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise errors.UsageError(f"cannot read --body: {type(exc).__name__}") from None
    request = read_link_request(text)

    async def work(manager: management.Manager, _: rotation.Rotator) -> list[outcomes.Outcome]:
        api.endpoint(manager.settings, args.environment)
        return [
            await manager.link(
                args.environment, request, _actor(args, args.audit_reason, manager.settings)
            )
        ]

    return _run(args, work)


def tokens_reconcile(args: argparse.Namespace) -> int:
    """`receiver tokens reconcile`: bring the vault to Debitura's state; one line (or
    JSON object) per client changed, one summary line per environment; exit 1 when a
    run could not see everything or a change failed."""
    summaries: list[reconcile.Summary] = []

    async def work(manager: management.Manager, _: rotation.Rotator) -> list[outcomes.Outcome]:
        actor = _actor(args, "reconcile", manager.settings)
        environments = [args.environment] if args.environment else api.configured(manager.settings)
        if not environments:
            api.endpoint(manager.settings, "live")  # raises, naming the variable
        for environment in environments:
            api.endpoint(manager.settings, environment)
        reconciler = reconcile.Reconciler(manager)
        done: list[outcomes.Outcome] = []
        for environment in environments:
            summary = await reconciler.run(environment, actor, dry_run=args.dry_run)
            summaries.append(summary)
            done += summary.changed + summary.failed
        return done

    status = _run(args, work)
    for summary in summaries:
        counts = summary.counts()
        line = (
            f"{'would change' if args.dry_run else 'reconciled'} {summary.environment}: "
            f"{counts['listed']} listed, {counts['validated']} validated, "
            f"{counts['changed']} changed, {counts['failed']} failed"
            + ("" if summary.complete else f", incomplete ({summary.stopped or 'see failures'})")
        )
        print(line, file=sys.stderr if args.json else sys.stdout)
    if any(not s.complete for s in summaries):
        return console.EXIT_FAILURE
    return status

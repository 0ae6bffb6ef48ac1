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

import aiohttp

from receiver import config, console, db, errors, redaction, vault
from receiver.debitura import api, management, outcomes, rotation
from receiver.lifecycle import audit, events

_REDACTOR = redaction.Redactor()


def _run(
    args: argparse.Namespace,
    work: Callable[[management.Manager, rotation.Rotator], Awaitable[list[outcomes.Outcome]]],
) -> int:
    """Open the database and an HTTP session, do `work`, print its outcomes."""
    # Client ids are checked before any call: Debitura must never act (a revocation
    # cannot be undone) on a client the vault would then refuse to record.
    named = list(getattr(args, "clients", None) or [])
    if getattr(args, "client", None) is not None:
        named.append(args.client)
    for client_id in named:
        if not events.is_identifier(client_id) or _REDACTOR.text(client_id) != client_id:
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


def _actor(args: argparse.Namespace, reason: str | None) -> audit.Actor:
    return audit.Actor.of(args.actor, reason)


def tokens_fetch(args: argparse.Namespace) -> int:
    """`receiver tokens fetch CLIENT`."""

    async def work(manager: management.Manager, _: rotation.Rotator) -> list[outcomes.Outcome]:
        api.endpoint(manager.settings, args.environment)
        return [await manager.fetch(args.client, args.environment, _actor(args, args.audit_reason))]

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
    actor = _actor(args, args.reason)

    async def work(_: management.Manager, rotator: rotation.Rotator) -> list[outcomes.Outcome]:
        settings = rotator.settings
        if args.resume:
            return await rotator.resume(actor)
        if args.due:
            if not api.configured(settings):
                api.endpoint(settings, "live")  # raises, naming the variable
            if args.dry_run:
                rows = await rotator.due(limit=args.limit or 1_000_000)
                return [
                    outcomes.Outcome(r["client_id"], r["environment"], "due", prefix=r["prefix"])
                    for r in rows
                ]
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

    return _run(args, work)


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
        actor = _actor(args, args.reason)
        return [await manager.revoke(args.client, args.environment, actor, actor.reason or "")]

    return _run(args, work)


def add_parsers(
    tokens: argparse._SubParsersAction[argparse.ArgumentParser],
    clients: argparse._SubParsersAction[argparse.ArgumentParser],
    add_dev_flag: Callable[[argparse.ArgumentParser], None],
    positive: Callable[[str], int],
) -> None:
    """The parser entries of these commands, under `tokens` and `clients`."""
    environment = {
        "choices": vault.ENVIRONMENTS,
        "default": "live",
        "help": "which Debitura environment (default live; test manages tok_test_ tokens)",
    }
    fetch = tokens.add_parser(
        "fetch",
        help="fetch a client's current token from Debitura and store it if new",
        description="Prints the prefix, never the token. Example: receiver tokens fetch cli_1",
    )
    fetch.add_argument("client", help="client id")
    fetch.add_argument("--environment", **environment)  # type: ignore[arg-type]
    fetch.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    fetch.add_argument("--reason", dest="audit_reason", help="why, for the audit trail")
    add_dev_flag(fetch)
    fetch.set_defaults(run=tokens_fetch)

    rotate = tokens.add_parser(
        "rotate",
        help="rotate tokens through Debitura (now, the due ones, or finish interrupted ones)",
        description=(
            "Examples: receiver tokens rotate cli_1 --reason suspected_compromise "
            "--revoke-immediately; receiver tokens rotate --due --dry-run; "
            "receiver tokens rotate --resume"
        ),
    )
    rotate.add_argument("clients", nargs="*", metavar="CLIENT", help="client ids")
    rotate.add_argument("--environment", **environment)  # type: ignore[arg-type]
    rotate.add_argument(
        "--reason",
        default=rotation.DEFAULT_REASON,
        help="sent to Debitura and kept in the audit trail",
    )
    rotate.add_argument(
        "--revoke-immediately",
        action="store_true",
        help="revoke the old token now, no 24 h grace (confirmed compromise only)",
    )
    rotate.add_argument(
        "--due",
        action="store_true",
        help="every active token older than RECEIVER_TOKEN_ROTATE_AFTER_DAYS",
    )
    rotate.add_argument("--dry-run", action="store_true", help="with --due: list, change nothing")
    rotate.add_argument("--limit", type=positive, help="with --due: at most N tokens")
    rotate.add_argument("--resume", action="store_true", help="finish interrupted rotations")
    rotate.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    rotate.add_argument("--json", action="store_true", help="one JSON object per client")
    add_dev_flag(rotate)
    rotate.set_defaults(run=tokens_rotate)

    validate = tokens.add_parser(
        "validate",
        help="ask Debitura whether active tokens are valid; exit 1 when any is not",
    )
    validate.add_argument("clients", nargs="*", metavar="CLIENT", help="client ids (default all)")
    validate.add_argument("--environment", choices=vault.ENVIRONMENTS, help="only this one")
    validate.add_argument("--json", action="store_true", help="one JSON object per token")
    add_dev_flag(validate)
    validate.set_defaults(run=tokens_validate)

    revoke = clients.add_parser(
        "revoke",
        help="revoke a client's token at Debitura, then here (audited; --confirm)",
        description="Example: receiver clients revoke cli_1 --reason 'contract ended' --confirm",
    )
    revoke.add_argument("client", help="client id")
    revoke.add_argument("--environment", **environment)  # type: ignore[arg-type]
    revoke.add_argument("--reason", required=True, help="sent to Debitura and audited")
    revoke.add_argument("--confirm", action="store_true", help="yes, revoke for good")
    revoke.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    revoke.add_argument("--json", action="store_true", help="the outcome as one JSON object")
    add_dev_flag(revoke)
    revoke.set_defaults(run=clients_revoke)

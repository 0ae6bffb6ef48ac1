"""`receiver replay`: fire signed test events at any receiver (docs/design.md §7): the
command handlers; admin.outgoing builds what they send, admin.sender sends it.

Like `stripe trigger` and `stripe events resend`: `trigger` builds realistic
events, `send` signs and sends events from files, `resend` re-drives stored events
with their exact original bytes and id (so the receiver's deduplication is
exercised). Tokens never appear in the output: prefixes only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
from typing import Any

from receiver import config, console, db, endpoints, errors, vault
from receiver.admin import outgoing, sender
from receiver.lifecycle import audit

DEFAULT_URL = "http://127.0.0.1:8080/webhooks/debitura"


def guard_live(
    found: list[tuple[dict[str, Any], sender.Outgoing]], to: str, confirmed: bool
) -> None:
    """Refuse to send stored live tokens unless confirmed, and then only over HTTPS or
    to this machine: a resend puts the token on the wire in clear inside the body."""
    live = [meta["event_id"] for meta, _ in found if meta["live_token"]]
    if not live:
        return
    if not confirmed:
        raise errors.UsageError(
            f"{len(live)} stored event(s) carry a live token ({', '.join(live[:3])}"
            f"{', …' if len(live) > 3 else ''}): a resend sends it in the body; "
            "add --confirm-live to do so (it is audited)"
        )
    problem = endpoints.credential_problem(to)
    if problem is not None:
        raise errors.UsageError(
            f"refusing to send live tokens to {endpoints.shown(to)!r}: the URL {problem}"
        )


def _secret(args: argparse.Namespace) -> bytes:
    if args.secret:
        try:
            return base64.b64decode(args.secret, validate=True)
        except (binascii.Error, ValueError):
            raise errors.UsageError("--secret is not valid base64") from None
    secret = config.webhook_secret_for_replay(dev=args.dev)
    if secret is None:
        raise errors.UsageError(
            "no webhook secret: pass --secret, set RECEIVER_WEBHOOK_SECRETS, or use --dev"
        )
    return secret


def _send(args: argparse.Namespace, secret: bytes, outgoing_events: list[sender.Outgoing]) -> int:
    progress = sender.Progress(len(outgoing_events))

    def show(delivery: sender.Delivery) -> None:
        if args.json:
            progress.write(json.dumps(delivery.as_dict()))
        elif len(outgoing_events) <= 20:
            progress.write(_line(delivery))
        progress.advance(delivery)

    summary = asyncio.run(
        sender.send_all(
            args.to,
            secret,
            outgoing_events,
            concurrency=args.concurrency,
            rate=args.rate,
            test=not args.live,
            retry=sender.RetryPolicy(scale=args.retry_scale) if args.retry == "debitura" else None,
            on_delivery=show,
        )
    )
    if args.json:
        print(json.dumps({"summary": summary.as_dict()}))
    else:
        print(summary.render())
    return console.EXIT_FAILURE if summary.failed else 0


def _line(delivery: sender.Delivery) -> str:
    parts = [
        f"{delivery.event_type} {delivery.event_id or '(no id)'}",
        f"http={delivery.http_status if delivery.http_status is not None else '-'}",
    ]
    if delivery.outcome:
        parts.append(f"status={delivery.outcome}")
    if delivery.tokens_revoked is not None:
        matched = " (no unrevoked token matched)" if delivery.tokens_revoked == 0 else ""
        parts.append(f"tokens_revoked={delivery.tokens_revoked}{matched}")
    if delivery.token_prefix:
        parts.append(f"token_prefix={delivery.token_prefix}")
    parts.append(f"latency_ms={delivery.latency_ms}")
    if delivery.attempts > 1:
        parts.append(f"attempts={delivery.attempts}")
    if delivery.error:
        parts.append(f"error={delivery.error!r}")
    return " ".join(parts)


def run_trigger(args: argparse.Namespace) -> int:
    """`receiver replay trigger EVENT`."""
    secret = _secret(args)
    documents = [
        outgoing.build_event(
            args.event,
            client_id=args.client,
            token_prefix=args.token_prefix,
            overrides=args.set,
            allow_unknown=args.allow_unknown,
        )
        for _ in range(args.count)
    ]
    return _send(args, secret, [outgoing.from_document(d) for d in documents])


def run_send(args: argparse.Namespace) -> int:
    """`receiver replay send FILE|- ...`."""
    secret = _secret(args)
    return _send(args, secret, outgoing.read_events(args.files))


def run_resend(args: argparse.Namespace) -> int:
    """`receiver replay resend`: stored events, exact bytes, same id, fresh signature."""
    if not args.event_id and not args.since:
        raise errors.UsageError("say which events: --event-id ID (repeatable) or --since TIME")
    since = console.timestamp(args.since, "--since")
    until = console.timestamp(args.until, "--until")
    secret = None if args.dry_run else _secret(args)
    found: list[tuple[dict[str, Any], sender.Outgoing]] = []

    async def load(settings: config.Settings, database: db.Database) -> int:
        found.extend(
            await outgoing.stored_events(
                database,
                vault.Sealer.from_settings(settings).keyring,
                event_ids=args.event_id,
                since=since,
                until=until,
                event_type=args.type,
                status=args.status,
                limit=args.limit,
            )
        )
        if args.dry_run:
            return 0
        guard_live(found, args.to, args.confirm_live)
        # Recorded before anything is sent: no live token leaves unaudited.
        await audit.audit_each(
            database,
            audit.Actor.of(args.actor, args.audit_reason, settings.secret_values()),
            "event_resend",
            [
                {
                    "event_key": meta["event_id"],
                    "token_prefix": out.token_prefix,
                    "detail": {"to": args.to},
                }
                for meta, out in found
                if meta["live_token"]
            ],
        )
        return 0

    console.with_database(args, load, needs=config.NEEDS_VAULT)
    if args.dry_run:
        rows = [meta | {"token_prefix": out.token_prefix} for meta, out in found]
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(console.table(rows, RESEND_COLUMNS, noun="event"))
        return 0
    if not found:
        raise errors.UsageError("no stored event matches")
    assert secret is not None
    return _send(args, secret, [out for _, out in found])


RESEND_COLUMNS = ("event_id", "type", "status", "received_at", "token_prefix", "live_token")

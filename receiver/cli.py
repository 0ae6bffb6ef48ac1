"""The `receiver` command line (docs/design.md §6): the parser, and the mapping of errors
to exit statuses. The commands themselves live in service.daemon (serve, dispatch,
migrate), the admin.*_commands modules (one per noun) and admin.replay."""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from receiver import console, errors, metrics, vault
from receiver.admin import (
    debitura_commands,
    event_commands,
    governance_commands,
    inbox,
    key_commands,
    outgoing,
    rekey,
    replay,
    signal_commands,
    token_commands,
    tokens,
)
from receiver.admin import health as health_command
from receiver.admin import status as status_command
from receiver.debitura import rotation
from receiver.lifecycle import audit, events
from receiver.sandbox import command as sandbox_command
from receiver.service import daemon
from receiver.signals import outbox

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `receiver` command; return the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return console.EXIT_CONFIG
    if getattr(args, "dev", False) and not getattr(args, "takes_dev", False):
        parser.error(f"--dev does not apply to `{args.command}`")
    args.dev = getattr(args, "dev", False)
    try:
        status: int = args.run(args)
        sys.stdout.flush()  # here, where a closed pipe can still be answered quietly
    except (errors.DatabasePermission, errors.DatabaseRefused) as exc:
        # The wrong role, database or password: a setting to fix, not an outage.
        print(f"receiver: configuration error: {exc}", file=sys.stderr)
        return console.EXIT_CONFIG
    except (errors.ConfigError, errors.UsageError) as exc:
        kind = "configuration error" if isinstance(exc, errors.ConfigError) else "error"
        print(f"receiver: {kind}: {exc}", file=sys.stderr)
        return console.EXIT_CONFIG
    except errors.SchemaNotReady:
        print(
            "receiver: the database schema is not migrated (or is older than this "
            "release): run `receiver migrate`",
            file=sys.stderr,
        )
        return console.EXIT_FAILURE
    except errors.ReceiverError as exc:
        print(f"receiver: {exc}", file=sys.stderr)
        return console.EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`| head`): stop quietly, as cat does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return status


class _Help(argparse.HelpFormatter):
    """argparse's help, with each option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS, [])
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def _with_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The formatter above, and `-v`, for a parser and all its subcommands (before or
    after the subcommand: a default of SUPPRESS leaves one given earlier in place)."""
    parser.formatter_class = _Help
    if not any("--verbose" in action.option_strings for action in parser._actions):
        parser.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="log at RECEIVER_LOG_LEVEL on a terminal too (default there: errors only)",
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_help(sub)
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="receiver", description="Debitura webhook receiver and bearer-token vault."
    )
    parser.add_argument("--version", action="version", version=f"receiver {metrics.version()}")
    parser.add_argument(
        "--dev",
        action="store_true",
        default=argparse.SUPPRESS,
        help="use the dev secrets and embedded Postgres (commands that take it)",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = subcommands.add_parser(
        "serve",
        help="run the webhook service (and its dispatcher)",
        description="Example: receiver serve --host 0.0.0.0 --port 8080 --workers 2",
    )
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    serve.add_argument(
        "--workers", type=_positive, default=1, help="processes sharing the port (default 1)"
    )
    # Set by `serve --workers N` on the processes it starts: serve, without migrating.
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    # …with the read end of a pipe whose write end only the supervisor holds: end of
    # file there means the supervisor is gone, and the worker stops (no orphans).
    serve.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    _add_dev_flag(serve)
    serve.set_defaults(run=daemon.serve)

    migrate = subcommands.add_parser(
        "migrate",
        help="apply database migrations (idempotent; needs only RECEIVER_DATABASE_URL)",
    )
    shown = migrate.add_mutually_exclusive_group()
    shown.add_argument("--status", action="store_true", help="list applied and pending ones")
    shown.add_argument("--check", action="store_true", help="exit 1 when any is pending")
    migrate.add_argument("--json", action="store_true", help="the outcome as one JSON object")
    shown.add_argument(
        "--print-roles",
        action="store_true",
        help="print the SQL a superuser runs once so that an owner without CREATEROLE can "
        "migrate (connects to nothing)",
    )
    _add_dev_flag(migrate)
    migrate.set_defaults(run=daemon.migrate)

    status = subcommands.add_parser(
        "status",
        help="one look at the installation; exit 1 when something needs attention",
        description="Example: receiver status --json",
    )
    status.add_argument("--json", action="store_true", help="the report as one JSON object")
    _add_dev_flag(status)
    status.set_defaults(run=status_command.status)

    health = subcommands.add_parser(
        "health",
        help="does the local serve answer /healthz? exit 0 or 1, one line (reads no secret)",
        description=(
            "GETs /healthz on the admin listener when RECEIVER_ADMIN_PORT is set, else on "
            "the public port (127.0.0.1:--port). For HEALTHCHECK and ExecStartPost. "
            "Example: receiver health --timeout 2"
        ),
    )
    health.add_argument("--port", type=_port, default=DEFAULT_PORT, help="serve's --port")
    health.add_argument(
        "--timeout", type=_positive_float, default=2.0, help="seconds to wait for the answer"
    )
    health.add_argument(
        "--wait",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="retry until healthy for this long (start-up)",
    )
    health.set_defaults(run=health_command.health)

    dispatch = subcommands.add_parser("dispatch", help="run only the signal dispatcher")
    _add_dev_flag(dispatch)
    dispatch.set_defaults(run=daemon.dispatch)

    _add_events(subcommands)
    _add_signals(subcommands)
    _add_keys(subcommands)
    tokens_sub = _add_tokens(subcommands)
    clients_sub = _add_governance(subcommands)
    _add_debitura(tokens_sub, clients_sub)
    _add_replay(subcommands)
    _add_sandbox(subcommands)
    completion = subcommands.add_parser(
        "completion",
        help="print a shell completion script",
        description="Example: receiver completion bash > /etc/bash_completion.d/receiver; "
        'receiver completion zsh > "${fpath[1]}/_receiver"',
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(run=lambda args: _completion(parser, args.shell))
    return _with_help(parser)


def _completion(parser: argparse.ArgumentParser, shell: str) -> int:
    """`receiver completion bash|zsh`: shtab writes the script from the parser itself,
    so it never lags behind a new command or flag."""
    import shtab  # only this command needs it

    print(shtab.complete(parser, shell=shell))
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("must be a port number, 1 to 65535")
    return value


def _signal_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a signal id (a UUID, as `signals list` shows)"
        ) from None


_AGE = re.compile(r"^(\d+)([dhm])$")
_AGE_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def _age(text: str) -> timedelta:
    match = _AGE.match(text)
    if not match:
        raise argparse.ArgumentTypeError("expected a number and d, h or m, e.g. 90d")
    return timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="the outcome as one JSON object")


class _Renamed(argparse.Action):
    """A flag that was renamed: refused, with the new spelling (nothing runs)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        self.hint = kwargs.pop("hint")
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        parser.error(self.hint)


def _renamed(parser: argparse.ArgumentParser, old: str, new: str, why: str) -> None:
    parser.add_argument(
        old, action=_Renamed, dest=argparse.SUPPRESS, hint=f"{old} is now {new}: {why}"
    )


def _add_actor(parser: argparse.ArgumentParser, why: str = "--reason") -> None:
    """--actor and --reason (`why`: where --reason means something else already), for
    the commands the audit trail records."""
    parser.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    parser.add_argument(
        why, dest="audit_reason", help="why, for the audit trail (e.g. a ticket number)"
    )


def _add_dev_flag(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a `--dev` given before the subcommand (`receiver --dev tokens list`)
    # is not reset by the subcommand's default.
    parser.add_argument(
        "--dev",
        action="store_true",
        default=argparse.SUPPRESS,
        help="use the dev secrets and embedded Postgres (also before the command)",
    )
    parser.set_defaults(takes_dev=True)


def _add_debitura(
    tokens: argparse._SubParsersAction[argparse.ArgumentParser],
    clients: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """The commands that act through Debitura's API, under `tokens` and `clients`."""
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
    _add_json(fetch)
    _add_dev_flag(fetch)
    fetch.set_defaults(run=debitura_commands.tokens_fetch)

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
    rotate.add_argument("--limit", type=_positive, help="with --due: at most N tokens")
    rotate.add_argument("--resume", action="store_true", help="finish interrupted rotations")
    rotate.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    rotate.add_argument("--json", action="store_true", help="one JSON object per client")
    _add_dev_flag(rotate)
    rotate.set_defaults(run=debitura_commands.tokens_rotate)

    validate = tokens.add_parser(
        "validate",
        help="ask Debitura whether active tokens are valid; exit 1 when any is not",
    )
    validate.add_argument("clients", nargs="*", metavar="CLIENT", help="client ids (default all)")
    validate.add_argument("--environment", choices=vault.ENVIRONMENTS, help="only this one")
    validate.add_argument("--json", action="store_true", help="one JSON object per token")
    _add_dev_flag(validate)
    validate.set_defaults(run=debitura_commands.tokens_validate)

    reconciling = tokens.add_parser(
        "reconcile",
        help="bring the vault to Debitura's state: fetch missed tokens, settle stale ones",
        description=(
            "Lists Debitura's clients and fetches any without an active token here; "
            "validates every active token and settles one Debitura calls invalid. "
            "Examples: receiver tokens reconcile --dry-run; receiver tokens reconcile --json"
        ),
    )
    reconciling.add_argument(
        "--environment",
        choices=vault.ENVIRONMENTS,
        help="only this one (default: every configured)",
    )
    reconciling.add_argument("--dry-run", action="store_true", help="say what would change")
    reconciling.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    reconciling.add_argument(
        "--json", action="store_true", help="one JSON object per client changed"
    )
    _add_dev_flag(reconciling)
    reconciling.set_defaults(run=debitura_commands.tokens_reconcile)

    link = clients.add_parser(
        "link",
        help="link a client through Debitura and store its token sealed (never printed)",
        description=(
            "Sends the partner's link request (a JSON object, passed through) to Debitura "
            "and stores the answer's token. Prints the client id, token prefix and status. "
            "Example: receiver clients link --body request.json"
        ),
    )
    link.add_argument(
        "--body", required=True, metavar="FILE", help="the link request as JSON (- for stdin)"
    )
    link.add_argument("--environment", **environment)  # type: ignore[arg-type]
    link.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    link.add_argument("--reason", dest="audit_reason", help="why, for the audit trail")
    link.add_argument("--json", action="store_true", help="the outcome as one JSON object")
    _add_dev_flag(link)
    link.set_defaults(run=debitura_commands.clients_link)

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
    _add_dev_flag(revoke)
    revoke.set_defaults(run=debitura_commands.clients_revoke)


def _add_events(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subcommands.add_parser("events", help="stored deliveries, and the quarantine")
    sub = parser.add_subparsers(dest="events_command", metavar="EVENTS_COMMAND", required=True)
    listing = sub.add_parser(
        "list",
        help="stored deliveries, newest first (no bodies)",
        description="Example: receiver events list --status quarantined",
    )
    listing.add_argument("--status", choices=inbox.STATUSES)
    listing.add_argument(
        "--quarantine-reason", choices=events.QUARANTINE_REASONS, help="only this quarantine reason"
    )
    _renamed(listing, "--reason", "--quarantine-reason", "--reason is an audit reason everywhere")
    listing.add_argument("--type", help="only this event type")
    listing.add_argument("--limit", type=_positive, default=100, help="at most (default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_dev_flag(listing)
    listing.set_defaults(run=event_commands.list_events)
    show = sub.add_parser(
        "show", help="one stored delivery, its body redacted (tokens cut to their prefix)"
    )
    show.add_argument("event_id", metavar="EVENT_ID", help="its key or envelope id")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_dev_flag(show)
    show.set_defaults(run=event_commands.show)
    reprocess = sub.add_parser(
        "reprocess",
        help="re-apply quarantined deliveries under the current code and configuration",
        description="Example: receiver events reprocess --quarantined --reason invalid_data",
    )
    reprocess.add_argument("event_ids", nargs="*", metavar="EVENT_ID", help="stored keys")
    reprocess.add_argument("--quarantined", action="store_true", help="every quarantined one")
    reprocess.add_argument(
        "--quarantine-reason",
        choices=events.QUARANTINE_REASONS,
        help="with --quarantined: only this quarantine reason",
    )
    reprocess.add_argument("--json", action="store_true", help="one JSON object per event")
    _add_actor(reprocess)
    _renamed(reprocess, "--why", "--reason", "the audit reason is --reason in every command")
    _add_dev_flag(reprocess)
    reprocess.set_defaults(run=event_commands.reprocess)
    dismiss = sub.add_parser(
        "dismiss",
        help="close quarantined deliveries that will never apply (audited)",
        description="Example: receiver events dismiss evt_123 --reason 'sender bug, ticket 42'",
    )
    dismiss.add_argument("event_ids", nargs="+", metavar="EVENT_ID", help="stored keys")
    dismiss.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")
    dismiss.add_argument(
        "--reason", dest="audit_reason", required=True, help="why, for the audit trail"
    )
    dismiss.add_argument("--json", action="store_true", help="one JSON object per key")
    _add_dev_flag(dismiss)
    dismiss.set_defaults(run=event_commands.dismiss)


def _add_signals(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    signals = subcommands.add_parser("signals", help="the invalidation outbox")
    sub = signals.add_subparsers(dest="signals_command", metavar="SIGNALS_COMMAND", required=True)
    listing = sub.add_parser("list", help="signals by status, with last errors")
    listing.add_argument("--status", choices=outbox.STATUSES)
    listing.add_argument("--limit", type=_positive, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_dev_flag(listing)
    listing.set_defaults(run=signal_commands.list_signals)
    retry = sub.add_parser("retry", help="put dead letters back to pending")
    retry.add_argument(
        "--id", action="append", type=_signal_id, help="only this signal (repeatable)"
    )
    _add_json(retry)
    _add_actor(retry)
    _add_dev_flag(retry)
    retry.set_defaults(run=signal_commands.retry)


def _add_keys(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subcommands.add_parser("keys", help="key material")
    sub = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    generate = sub.add_parser("generate", help="print fresh key material as env lines")
    generate.set_defaults(run=key_commands.generate)
    rotate = sub.add_parser("rotate", help="re-encrypt every sealed value under the primary key")
    rotate.add_argument(
        "--batch-size", type=_positive, default=rekey.DEFAULT_BATCH, help="rows per transaction"
    )
    rotate.add_argument(
        "--rate",
        type=_non_negative_float,
        default=rekey.DEFAULT_RATE,
        help=f"values re-sealed per second at most (default {rekey.DEFAULT_RATE:,}; 0: no limit)",
    )
    rotate.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be re-sealed, under which key ids; change nothing",
    )
    rotate.add_argument("--json", action="store_true", help="the outcome as one JSON object")
    _add_actor(rotate)
    _add_dev_flag(rotate)
    rotate.set_defaults(run=key_commands.rotate)


def _add_tokens(
    subcommands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    parser = subcommands.add_parser("tokens", help="the token inventory")
    sub = parser.add_subparsers(dest="tokens_command", metavar="TOKENS_COMMAND", required=True)
    listing = sub.add_parser(
        "list",
        help="stored tokens without secrets",
        description="Example: receiver tokens list --status active --older-than 90d",
    )
    listing.add_argument("--client", help="only this client")
    listing.add_argument("--status", choices=tokens.STATUSES)
    listing.add_argument("--environment", choices=vault.ENVIRONMENTS)
    listing.add_argument(
        "--older-than",
        type=_age,
        metavar="AGE",
        help="only tokens issued longer ago, e.g. 90d (rotation is due after 90 days)",
    )
    listing.add_argument("--limit", type=_positive, default=1000)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_dev_flag(listing)
    listing.set_defaults(run=token_commands.list_tokens)
    reveal = sub.add_parser("reveal", help="print one token in plain text (audited; --confirm)")
    reveal.add_argument("client", help="client id")
    reveal.add_argument("--prefix", help="the token with this prefix (default: the active one)")
    reveal.add_argument(
        "--environment",
        choices=vault.ENVIRONMENTS,
        default="live",
        help="whose active token (default live)",
    )
    reveal.add_argument("--confirm", action="store_true", help="yes, print the secret token")
    _add_actor(reveal)
    _add_dev_flag(reveal)
    reveal.set_defaults(run=token_commands.reveal)
    imports = sub.add_parser(
        "import",
        help="store a token that came from Debitura's API (read from stdin or --file)",
        description=(
            "Stores the token as an onboarding webhook would (sealed, signalled, audited). "
            "Example: pbpaste | receiver tokens import cli_abc123 --reason 'API rotate'"
        ),
    )
    imports.add_argument("client", help="client id")
    imports.add_argument("--file", help="read the token from this file (default: stdin)")
    imports.add_argument(
        "--supersede", action="store_true", help="replace the client's active token"
    )
    imports.add_argument(
        "--expires-at",
        metavar="TIME",
        help="when the replaced token stops working (old_token_expires_at; default: 24 h grace)",
    )
    _add_json(imports)
    _add_actor(imports)
    _add_dev_flag(imports)
    imports.set_defaults(run=token_commands.import_token)
    return sub


def _add_governance(
    subcommands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    prune = subcommands.add_parser(
        "prune",
        help="drop event bodies, token values and signals past their retention",
        description="Runs inside serve every RECEIVER_PRUNE_INTERVAL_SECONDS as well.",
    )
    prune.add_argument("--dry-run", action="store_true", help="count only, change nothing")
    prune.add_argument("--json", action="store_true", help="the counts as one JSON object")
    _add_dev_flag(prune)
    prune.set_defaults(run=governance_commands.prune)

    clients = subcommands.add_parser("clients", help="linked clients")
    sub = clients.add_subparsers(dest="clients_command", metavar="CLIENTS_COMMAND", required=True)
    erase = sub.add_parser(
        "erase",
        help="remove every token value and stored body of one client (audited; --confirm)",
        description="Example: receiver clients erase cli_abc123 --confirm --reason 'GDPR #42'",
    )
    erase.add_argument("client", help="client id")
    erase.add_argument("--confirm", action="store_true", help="yes, erase for good")
    erase.add_argument("--json", action="store_true", help="the outcome as one JSON object")
    _add_actor(erase)
    _add_dev_flag(erase)
    erase.set_defaults(run=governance_commands.erase_client)
    clients_sub = sub

    audit_parser = subcommands.add_parser("audit", help="the audit trail of operator actions")
    audit_sub = audit_parser.add_subparsers(
        dest="audit_command", metavar="AUDIT_COMMAND", required=True
    )
    listing = audit_sub.add_parser("list", help="audit rows, newest first")
    listing.add_argument("--client", help="only this client (finds its erasure too)")
    listing.add_argument("--action", choices=audit.ACTIONS)
    listing.add_argument("--limit", type=_positive, default=100, help="at most (default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_dev_flag(listing)
    listing.set_defaults(run=governance_commands.list_audit)
    return clients_sub


def _add_replay(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subcommands.add_parser("replay", help="fire signed test events at a receiver")
    sub = parser.add_subparsers(dest="replay_command", metavar="REPLAY_COMMAND", required=True)

    trigger = sub.add_parser(
        "trigger",
        help="build realistic test events and send them",
        description="Example: receiver replay trigger client.onboarding_completed --count 5 --dev",
    )
    trigger.add_argument("event", help=f"event type: {' or '.join(outgoing.SUPPORTED)}")
    trigger.add_argument(
        "--allow-unknown", action="store_true", help="send an event type the receiver does not know"
    )
    trigger.add_argument("--client", help="client id (default: a new one per event)")
    trigger.add_argument("--token-prefix", help="token prefix, for token.revoked")
    trigger.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field, e.g. data.reason=fraud (repeatable; JSON values allowed)",
    )
    trigger.add_argument("--count", type=_positive, default=1, help="how many distinct events")
    _add_sender_options(trigger)
    trigger.set_defaults(run=replay.run_trigger)

    send = sub.add_parser(
        "send",
        help="sign and send events from JSON or NDJSON files",
        description="Example: receiver replay send examples/*.json --dev",
    )
    send.add_argument("files", nargs="+", metavar="FILE", help="a file, or - for stdin")
    _add_sender_options(send)
    send.set_defaults(run=replay.run_send)

    resend = sub.add_parser(
        "resend",
        help="re-send stored events: exact bytes, same id",
        description="Example: receiver replay resend --since 2026-11-01 --type token.revoked "
        "--dry-run",
    )
    resend.add_argument("--event-id", action="append", help="a stored event id (repeatable)")
    resend.add_argument("--since", help="received at or after (ISO time)")
    resend.add_argument("--until", help="received before (ISO time)")
    resend.add_argument("--type", help="only this event type")
    resend.add_argument("--status", choices=inbox.STATUSES)
    resend.add_argument("--limit", type=_positive, default=10_000)
    resend.add_argument("--dry-run", action="store_true", help="list what would be sent")
    resend.add_argument(
        "--confirm-live",
        action="store_true",
        help="yes, send stored events that carry a live token (HTTPS or loopback only; audited)",
    )
    _add_actor(resend)
    _add_sender_options(resend)
    resend.set_defaults(run=replay.run_resend)


def _add_sender_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to", default=replay.DEFAULT_URL, help=f"receiver URL (default {replay.DEFAULT_URL})"
    )
    parser.add_argument(
        "--secret", help="base64 webhook secret (default: RECEIVER_WEBHOOK_SECRETS)"
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        default=argparse.SUPPRESS,
        help="sign with the dev secret (and, for resend, read the dev database)",
    )
    parser.set_defaults(takes_dev=True)
    parser.add_argument("--live", action="store_true", help="omit the X-Debitura-Test: true header")
    parser.add_argument(
        "--concurrency", type=_positive, default=8, help="requests in flight (default 8)"
    )
    parser.add_argument(
        "--rate", type=_positive_float, help="at most this many requests per second"
    )
    parser.add_argument(
        "--retry",
        choices=("debitura",),
        help="retry failures on Debitura's schedule (8 tries over ~1.5 h)",
    )
    parser.add_argument(
        "--retry-scale",
        type=_positive_float,
        default=1.0,
        help="multiply the retry delays (e.g. 0.001 in tests)",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON line per event, then a summary line"
    )


def _add_sandbox(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subcommands.add_parser(
        "sandbox",
        help="run a stand-in Debitura (token, link and list calls, OAuth, /cases, webhooks)",
        description="Example: receiver sandbox --dev --link cli_demo --time-scale 60",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address")
    parser.add_argument("--port", type=int, default=sandbox_command.DEFAULT_PORT, help="port")
    parser.add_argument("--environment", choices=vault.ENVIRONMENTS, default="test")
    parser.add_argument(
        "--api-key", help="the XApiKey it expects (default: generated and printed once)"
    )
    parser.add_argument(
        "--webhook-url", help="the receiver's webhook URL (no default, except with --dev)"
    )
    parser.add_argument(
        "--webhook-secret",
        metavar="B64",
        help="base64 webhook secret to sign with (never read from RECEIVER_WEBHOOK_SECRETS)",
    )
    parser.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        help="divide Debitura's webhook retry delays by this (60: 1.5 h in 1.5 min)",
    )
    parser.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="CLIENT_ID",
        help="link this client at start (repeatable; sends its onboarding webhook)",
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        default=argparse.SUPPRESS,
        help="send webhooks to `make run`'s receiver (unless --webhook-url), signed with "
        "the dev secret it generated into RECEIVER_DATA_DIR (unless --webhook-secret)",
    )
    parser.set_defaults(run=sandbox_command.run, takes_dev=True)

"""`receiver sandbox`: run a stand-in Debitura until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import sys
from dataclasses import dataclass, field

from receiver import config, errors, log
from receiver.sandbox import server

DEFAULT_PORT = 8099
# Where `make run` (`receiver serve --dev`) listens.
DEV_WEBHOOK_URL = "http://127.0.0.1:8080/webhooks/debitura"


def run(args: argparse.Namespace) -> int:
    """Start the sandbox the arguments describe, print how to use it, serve until stopped."""
    log.configure(stream=sys.stderr, secrets=[args.api_key] if args.api_key else [])
    webhooks = _webhooks(args)
    sandbox = server.Sandbox(
        environment=args.environment,
        api_key=args.api_key,
        webhook_url=webhooks.url,
        webhook_secret=webhooks.secret,
        time_scale=args.time_scale,
    )
    # A generated key is masked in the logs as well; it is printed once, below, on purpose.
    log.configure(stream=sys.stderr, secrets=[sandbox.api_key])
    asyncio.run(_serve(sandbox, args, webhooks.signed_with))
    return 0


@dataclass(frozen=True, slots=True)
class _Webhooks:
    """Where the sandbox's webhooks go, the base64 secret that signs them, and which
    secret that is in words (never its value)."""

    url: str | None
    secret: str | None = field(default=None, repr=False)
    signed_with: str | None = None


def _webhooks(args: argparse.Namespace) -> _Webhooks:
    """Where webhooks go and what signs them: `--webhook-secret` when given, else with
    `--dev` the dev secret `make run` generated into the dev data directory; never
    RECEIVER_WEBHOOK_SECRETS or RECEIVER_TEST_WEBHOOK_SECRETS (design §9: the sandbox
    never signs with a production secret, so a production receiver refuses its
    deliveries). Only `--dev` has a default URL: `make run`'s."""
    url, secret = args.webhook_url, args.webhook_secret
    signed_with = "the secret given with --webhook-secret" if secret is not None else None
    if args.dev:
        url = url or DEV_WEBHOOK_URL
        if secret is None:
            dev_secret, path = config.dev_webhook_secret()
            secret = base64.b64encode(dev_secret).decode()
            signed_with = f"the dev secret in {path}"
    if (url is None) != (secret is None):
        raise errors.UsageError("--webhook-url and --webhook-secret go together (or --dev)")
    return _Webhooks(url, secret, signed_with)


async def _serve(
    sandbox: server.Sandbox, args: argparse.Namespace, signed_with: str | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    await sandbox.start(args.host, args.port)
    try:
        _banner(sandbox, args, signed_with)
        for client_id in args.link:
            sandbox.link_client(client_id)
            prefix = sandbox.current_token(client_id)[:15]
            print(f"linked {client_id}: token {prefix}… (fetch it with `receiver tokens fetch`)")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await sandbox.stop()


def _banner(sandbox: server.Sandbox, args: argparse.Namespace, signed_with: str | None) -> None:
    variable = (
        "RECEIVER_DEBITURA_TEST_API" if sandbox.environment == "test" else ("RECEIVER_DEBITURA_API")
    )
    print(f"Debitura sandbox ({sandbox.environment}) listening on {sandbox.url}")
    if args.api_key is None:
        print(f"API key (generated for this sandbox, shown once): {sandbox.api_key}")
    print("Point the receiver at it:")
    print(f"  export {variable}_URL={sandbox.url}")
    print(f"  export {variable}_KEY=<the API key above>")
    if sandbox.subscription is None:
        print("Webhooks: off (give --webhook-url and --webhook-secret to send them)")
    else:
        print(
            f"Webhooks: to {sandbox.subscription.url}, signed with {signed_with}, "
            f"time scale {args.time_scale:g}"
            + (", with X-Debitura-Test: true" if sandbox.environment == "test" else "")
        )
    print("Stop with Ctrl-C.")

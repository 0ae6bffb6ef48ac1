"""The admin API (docs/design.md §9): `POST /admin/v1/clients`, the partner
application's way to link a client without ever holding its token.

Served on the admin listener only (RECEIVER_ADMIN_PORT, bound to RECEIVER_ADMIN_HOST)
and only with RECEIVER_ADMIN_TOKENS set; elsewhere the path does not exist (404).
Every call presents `Authorization: Bearer` one of those tokens, compared in constant
time against each; the audit trail names the caller by the token's fingerprint,
never the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from receiver import config, errors, vault
from receiver.debitura import api, management
from receiver.lifecycle import audit
from receiver.service import middleware, state

CLIENTS_PATH = "/admin/v1/clients"
BODY_MAX_BYTES = 64 * 1024


def fingerprint(token: str) -> str:
    """The name an admin token goes by in the audit trail and logs: the first 12 hex
    digits of its SHA-256 (enough to tell the configured tokens apart)."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def admin_settings(request: web.Request) -> config.Settings:
    """The settings in force (admin tokens reload on SIGHUP), or `errors.NotFound`:
    the admin API and the console exist only on the admin listener with admin tokens
    configured."""
    settings = request.app[state.LIVE].settings
    if not settings.admin_tokens or not middleware.on_admin_listener(request, settings.admin_port):
        raise errors.NotFound("not found")
    return settings


def matching_token(settings: config.Settings, presented: str) -> str | None:
    """The configured admin token `presented` is, or None: the one comparison of an
    admin token, in constant time against every configured token whatever matched
    first (the admin API's bearer token, the console's sign-in)."""
    given = presented.strip().encode()
    matched: str | None = None
    for token in settings.admin_tokens:
        value = token.get_secret_value()
        if hmac.compare_digest(given, value.encode()):
            matched = value
    return matched


def actor(token_fingerprint: str, reason: str, secrets: Sequence[str] = ()) -> audit.Actor:
    """An admin token's holder as the audit trail names them: by the token's
    fingerprint (the admin API, the console), with why they acted (the configured
    `secrets` masked in it: an operator may paste the admin token they just used)."""
    return audit.Actor.of(f"admin:{token_fingerprint}", reason, secrets)


def _caller(request: web.Request) -> audit.Actor:
    """The admin token's holder, or `errors.AdminUnauthorized`; the admin API's
    absence (404) anywhere but the admin listener with admin tokens configured."""
    settings = admin_settings(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    matched = matching_token(settings, given)
    if matched is None or scheme.lower() != "bearer":
        raise errors.AdminUnauthorized("a valid admin token is required (Authorization: Bearer)")
    return actor(fingerprint(matched), "admin API")


async def _link_request(request: web.Request) -> dict[str, Any]:
    """The whole body (however it arrives: in pieces, chunked), within the size cap
    and the body timeout, as a JSON object with nothing JSON does not allow (NaN)."""
    if request.content_length is not None and request.content_length > BODY_MAX_BYTES:
        raise errors.BodyTooLarge(f"the link request is over {BODY_MAX_BYTES} bytes")
    settings = request.app[state.SETTINGS]
    try:
        async with asyncio.timeout(settings.body_timeout_seconds):
            raw = await request.read()
    except TimeoutError:
        raise errors.InvalidRequest("the link request did not arrive in time") from None
    if len(raw) > BODY_MAX_BYTES:
        raise errors.BodyTooLarge(f"the link request is over {BODY_MAX_BYTES} bytes")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except ValueError:
        raise errors.InvalidRequest("the link request must be JSON") from None
    if not isinstance(body, dict):
        raise errors.InvalidRequest("the link request must be a JSON object")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def link_client(request: web.Request) -> web.Response:
    """Link a client through Debitura; answer its id, token prefix and status, never
    the token (which is stored sealed, signalled and audited)."""
    actor = _caller(request)
    environment = request.query.get("environment", "live")
    if environment not in vault.ENVIRONMENTS:
        raise errors.InvalidRequest("environment must be live or test")
    body = await _link_request(request)
    app = request.app
    settings = app[state.LIVE].settings  # the API keys reload on SIGHUP
    try:
        api.endpoint(settings, environment)
    except errors.ConfigError as exc:
        raise errors.UpstreamFailed(
            f"linking {environment} clients is not configured: {exc}"
        ) from None
    manager = management.Manager(
        app[state.DATABASE], settings, app[state.SEALER], app[state.DEBITURA]
    )
    try:
        outcome = await manager.link(environment, body, actor)
    except errors.UsageError as exc:
        # Debitura's answer could not be stored as a token (its message names the
        # rule, never a value): not the caller's fault, and never a 500.
        raise errors.UpstreamFailed(str(exc)) from None
    if outcome.status not in ("linked", "revoked", "superseded"):
        raise errors.UpstreamFailed(outcome.detail or "Debitura did not link the client")
    return web.json_response(
        {
            "client_id": outcome.client_id,
            "environment": environment,
            "token_prefix": outcome.prefix,
            "status": "active" if outcome.ok else outcome.status,
        },
        status=201,
    )


async def debitura_session(app: web.Application) -> AsyncIterator[None]:
    """The Debitura API client the admin API links through (one HTTP session)."""
    async with aiohttp.ClientSession() as session:
        app[state.DEBITURA] = api.Api(session, app[state.SETTINGS])
        yield

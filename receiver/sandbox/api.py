"""The sandbox's HTTP face: Debitura's Referral Partner API (the four token calls, the
link and list calls, `POST /oauth/token`) and the Customer API's `POST /v1/cases` /
`POST /cases`.

Every request is counted per call, then meets the injected faults (see faults.py),
then authentication. Error bodies take Debitura's shape
`{"error": {"type", "code", "message"}}`. No token is ever logged: log lines carry
the client id and the 15-character prefix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from receiver.sandbox import hs256, ledger

if TYPE_CHECKING:
    from receiver.sandbox.server import Sandbox

log = structlog.get_logger(__name__)

SANDBOX: web.AppKey[Sandbox] = web.AppKey("sandbox")
Handler = Callable[[web.Request, "Sandbox"], Awaitable[web.StreamResponse]]


def create_app(sandbox: Sandbox) -> web.Application:
    """The aiohttp application serving `sandbox` (no I/O here)."""
    app = web.Application()
    app[SANDBOX] = sandbox
    clients = "/v1/referral-partners/clients"
    client = f"{clients}/{{client_id}}"
    routes = [
        ("POST", clients, "link", _link),
        ("GET", clients, "list", _list),
        ("GET", f"{client}/token", "fetch", _fetch),
        ("POST", f"{client}/rotate-token", "rotate", _rotate),
        ("POST", f"{client}/revoke-token", "revoke", _revoke),
        ("POST", "/v1/auth/validate-token", "validate", _validate),
        ("POST", "/oauth/token", "oauth", _oauth),
        ("POST", "/v1/cases", "cases", _cases),
        ("POST", "/cases", "cases", _cases),
    ]
    for method, path, call, handler in routes:
        app.router.add_route(method, path, _guarded(call, handler))
    return app


def error(status: int, type_: str, code: str, message: str, **extra: Any) -> web.Response:
    """A Debitura-shaped error answer."""
    body = {"error": {"type": type_, "code": code, "message": message, **extra}}
    return web.json_response(body, status=status)


def _guarded(call: str, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Count the request, apply the injected faults, check the API key (not on the
    Customer API, which takes a bearer token), hold it if told to, then run the
    handler."""

    async def handle(request: web.Request) -> web.StreamResponse:
        sandbox = request.app[SANDBOX]
        sandbox.calls[call] += 1
        failure = sandbox.faults.take_failure(call)
        if failure is not None:
            log.info("sandbox_fault_injected", call=call, status=failure.status)
            response = _failure(failure.status)
            if failure.retry_after is not None:
                response.headers["Retry-After"] = f"{failure.retry_after:g}"
            return response
        if call != "cases" and not _api_key_ok(request, sandbox.api_key):
            return error(401, "authentication_error", "invalid_api_key", "Invalid API key")
        held = sandbox.faults.take_hold(call)
        if held > 0:
            # The body is read first: a client that gives up during the hold loses the
            # answer, not the request. aiohttp does not cancel a handler whose client
            # left, so the effect still lands when the hold ends.
            await request.read()
            log.info("sandbox_request_held", call=call, seconds=held)
            await asyncio.sleep(held)
        answer = await handler(request, sandbox)
        if sandbox.faults.take_drop(call):
            # The effect is applied; the caller never hears of it ("answer lost").
            log.info("sandbox_answer_dropped", call=call)
            if request.transport is not None:
                request.transport.abort()
            return answer
        seconds = sandbox.faults.delay_for(call)
        if seconds > 0:
            await asyncio.sleep(seconds)
        return answer

    return handle


# The scope an injected 403 says the API key lacks (Debitura documents none for the
# partner API; the shape is the Customer API's permission_error).
FAULT_REQUIRED_SCOPE = "referral_partner.tokens"


def _failure(status: int) -> web.Response:
    """An injected answer in the shape Debitura gives that status."""
    if status == 401:
        return error(401, "authentication_error", "invalid_api_key", "Invalid API key")
    if status == 403:
        return error(
            403,
            "permission_error",
            "insufficient_scope",
            "Token does not have permission for this action",
            required_scope=FAULT_REQUIRED_SCOPE,
            token_scopes=[],
        )
    if status == 404:
        return error(404, "not_found_error", "not_found", "Not found")
    if status == 429:
        return error(429, "rate_limit_error", "rate_limited", "Too many requests")
    if status >= 500:
        return error(status, "api_error", "sandbox_fault", "Injected server error")
    return error(status, "invalid_request_error", "sandbox_fault", "Injected error")


def _api_key_ok(request: web.Request, api_key: str) -> bool:
    given = request.headers.get("XApiKey", "")
    return hmac.compare_digest(given.encode(), api_key.encode())


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _bad_request(message: str) -> web.Response:
    return error(400, "invalid_request_error", "invalid_request", message)


def _unknown_client(client_id: str) -> web.Response:
    return error(404, "not_found_error", "client_not_found", f"No client {client_id}")


# Debitura's reference does not say what a client id may hold; the receiver takes
# these (its identifiers), so a link request naming another shape gets a made-up id.
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


async def _link(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    """Link a client as `POST /v1/referral-partners/clients` does: the token is in the
    answer and no webhook is sent. The body's `client_id` (an identifier) and
    `scopes` (strings) are used when given."""
    body = await _json_object(request)
    if body is None:
        return _bad_request("expected a JSON object")
    given = body.get("client_id")
    if isinstance(given, str) and _CLIENT_ID.fullmatch(given):
        client_id = given
    else:
        client_id = f"cli_{uuid.uuid4().hex[:16]}"
    scopes = body.get("scopes")
    if not (isinstance(scopes, list) and scopes and all(isinstance(s, str) for s in scopes)):
        scopes = list(ledger.DEFAULT_SCOPES)
    existing = sandbox.ledger.clients.get(client_id)
    if existing is not None and existing.status == ledger.ACTIVE:
        return error(
            409, "invalid_request_error", "client_exists", f"Client {client_id} is already linked"
        )
    sandbox.link_client(client_id, scopes, webhook=False)
    token = sandbox.ledger.client(client_id).current
    return web.json_response(
        {
            "client_id": client_id,
            "bearer_token": token.value,
            "status": ledger.ACTIVE,
            "issued_at": ledger.iso(token.issued_at),
        },
        status=201,
    )


async def _list(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    """The linked clients: a bare array (`list_shape="array"`), or pages of
    `page_size` as `{"data": [...], "next_cursor"}`, continued with `?cursor=`."""
    key = sandbox.list_id_key
    if sandbox.list_shape == "array":
        return web.json_response([{key: c, "status": s} for c, s in sandbox.clients()])
    cursor = request.query.get("cursor")
    try:
        after = None if cursor is None else _after(cursor)
        page, last = sandbox.ledger.page(after, sandbox.page_size)
    except ledger.UnknownClient:
        return error(400, "invalid_request_error", "invalid_cursor", "Unknown cursor")
    return web.json_response(
        {
            "data": [{key: c.client_id, "status": c.status} for c in page],
            "next_cursor": None if last is None else _cursor(last),
        }
    )


def _cursor(after: str) -> str:
    """An opaque cursor: the last client id of the page, base64url without padding."""
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def _after(cursor: str) -> str:
    """The client id a cursor continues after (UnknownClient when it is not one)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        raise ledger.UnknownClient("not a cursor") from None


async def _fetch(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    client_id = request.match_info["client_id"]
    client = sandbox.ledger.clients.get(client_id)
    if client is None:
        return _unknown_client(client_id)
    token = client.current
    log.info("sandbox_token_fetched", client_id=client_id, token_prefix=token.prefix)
    status = ledger.REVOKED if token.status == ledger.REVOKED else ledger.ACTIVE
    return web.json_response(
        {"bearer_token": token.value, "issued_at": ledger.iso(token.issued_at), "status": status}
    )


async def _rotate(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    client_id = request.match_info["client_id"]
    body = await _json_object(request)
    if body is None:
        return _bad_request("expected a JSON object")
    reason = str(body.get("reason") or "unspecified")
    immediately = body.get("revoke_immediately", False)
    if not isinstance(immediately, bool):
        return _bad_request("revoke_immediately must be a boolean")
    try:
        rotation = sandbox.rotate(client_id, reason=reason, revoke_immediately=immediately)
    except ledger.UnknownClient:
        return _unknown_client(client_id)
    except ledger.ClientRevoked:
        return error(
            409, "invalid_request_error", "token_revoked", "Revoked: the client must link again"
        )
    assert rotation.old.expires_at is not None
    return web.json_response(
        {
            "new_bearer_token": rotation.new.value,
            "old_bearer_token": rotation.old.value,
            "old_token_expires_at": ledger.iso(rotation.old.expires_at),
        }
    )


async def _revoke(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    client_id = request.match_info["client_id"]
    body = await _json_object(request)
    if body is None:
        return _bad_request("expected a JSON object")
    try:
        sandbox.revoke(client_id, reason=str(body.get("reason") or "unspecified"))
    except ledger.UnknownClient:
        return _unknown_client(client_id)
    return web.json_response({"status": "revoked"})


async def _validate(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    body = await _json_object(request)
    if body is None or not isinstance(body.get("token"), str):
        return _bad_request('expected {"token": ...}')
    token = sandbox.ledger.usable(body["token"])
    if token is None:
        return error(401, "authentication_error", "invalid_token", "Invalid bearer token")
    scopes = sandbox.ledger.client(token.client_id).scopes
    return web.json_response(
        {
            "valid": True,
            "client_id": token.client_id,
            "partner_id": ledger.PARTNER_ID,
            "scopes": list(scopes),
            "status": "active",
            "issued_at": ledger.iso(token.issued_at),
            # Not in Debitura's example; set while a rotated token is in its grace period.
            "expires_at": None if token.expires_at is None else ledger.iso(token.expires_at),
        }
    )


async def _oauth(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    body = await _json_object(request)
    tenant_id = None if body is None else body.get("externalTenantId")
    if not isinstance(tenant_id, str):
        return _bad_request('expected {"externalTenantId": ...}')
    tenant = sandbox.ledger.tenants.get(tenant_id)
    if tenant is None:
        return error(404, "not_found_error", "tenant_not_found", "Unknown externalTenantId")
    access = sandbox.mint_jwt(tenant)
    return web.json_response(
        {
            "accessToken": access,
            "tokenType": "Bearer",
            "expiresIn": sandbox.jwt_ttl_seconds,
            "externalTenantId": tenant.external_tenant_id,
            "creditorId": tenant.creditor_id,
        }
    )


async def _cases(request: web.Request, sandbox: Sandbox) -> web.StreamResponse:
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    scopes: tuple[str, ...] | None = None
    if scheme.lower() == "bearer" and credential:
        scopes = _scopes_of(credential.strip(), sandbox)
    if scopes is None:
        response = error(401, "authentication_error", "invalid_token", "Invalid bearer token")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    if "cases.create" not in scopes:
        return error(
            403,
            "permission_error",
            "insufficient_scope",
            "Token does not have permission for this action",
            required_scope="cases.create",
            token_scopes=list(scopes),
        )
    return web.json_response(
        {"id": f"case_{uuid.uuid4().hex[:12]}", "status": "created"}, status=201
    )


def _scopes_of(credential: str, sandbox: Sandbox) -> tuple[str, ...] | None:
    """The scopes of a credential the Customer API accepts now, else None."""
    token = sandbox.ledger.usable(credential)
    if token is not None:
        return sandbox.ledger.client(token.client_id).scopes
    claims = hs256.decode(credential, sandbox.jwt_key, sandbox.clock())
    if claims is None:
        return None
    return tuple(str(s) for s in str(claims.get("scope", "")).split())

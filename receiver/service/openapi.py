"""The OpenAPI 3.1 description of the receiver's endpoints, served at /openapi.json.

Schemas come from the same pydantic models that parse requests, at run time, so the
description cannot drift from the code; a test checks every route is described and
real answers match the response schemas.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from receiver import signing
from receiver.lifecycle import events

VERSION = "0.1.0"


class WebhookAnswer(BaseModel):
    """A 200 answer: the delivery is committed: applied, a duplicate, an ignored type,
    or quarantined (stored, not applied: `reason` says why)."""

    status: Literal["processed", "duplicate", "ignored", "quarantined"]
    event_id: str
    reason: events.QuarantineReason | None = None


class ErrorDetail(BaseModel):
    """What went wrong, in Debitura's own error shape."""

    type: str
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorDetail


class Status(BaseModel):
    """A probe's answer."""

    status: str


class LinkAnswer(BaseModel):
    """The admin API's answer to a link: the client, its token's public prefix, and
    the token's status here (`active`; `revoked` when the client was revoked here
    while the link was under way). Never the token."""

    client_id: str
    environment: Literal["live", "test"]
    token_prefix: str
    status: str


_MODELS: list[type[BaseModel]] = [
    events.Envelope,
    events.OnboardingCompleted,
    events.TokenRevocation,
    WebhookAnswer,
    ErrorBody,
    Status,
    LinkAnswer,
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*statuses: tuple[int, str]) -> dict[str, Any]:
    return {str(status): _json(ErrorBody, text) for status, text in statuses}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    _, definitions = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}"
    )
    header = {"in": "header", "schema": {"type": "string"}}
    webhook = {
        "summary": "Receive one Debitura webhook delivery",
        "description": (
            "Verified on the raw bytes before parsing: HMAC-SHA256 of `<t>.<body>` under any "
            "configured base64-decoded secret; `t` at most 300 s old and 30 s ahead. A delivery "
            "whose signature verifies is never refused: `data` is validated as "
            "OnboardingCompleted or TokenRevocation for those event types, other types are "
            "recorded as ignored, and one that cannot be applied is stored quarantined and "
            "answered 200 with a reason. 200 is sent only after the commit."
        ),
        "parameters": [
            {
                **header,
                "name": signing.SIGNATURE_HEADER,
                "required": True,
                "description": "t=<unix seconds>,v1=<lowercase hex HMAC-SHA256>[,v1=…]",
            },
            {**header, "name": "X-Debitura-Event", "required": False},
            {**header, "name": "X-Debitura-Timestamp", "required": False},
            {
                **header,
                "name": "X-Debitura-Test",
                "required": False,
                "description": "true on test deliveries",
            },
            {
                **header,
                "name": "X-Request-Id",
                "required": False,
                "description": "echoed back; generated when absent",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(events.Envelope)}},
        },
        "responses": {
            "200": _json(WebhookAnswer, "committed: processed, duplicate, ignored or quarantined"),
            **_errors(
                (400, "malformed HTTP, a token in the URL, or a body its encoding cannot read"),
                (401, "signature missing, malformed, wrong, or outside the tolerance"),
                (408, "the body did not arrive in time"),
                (413, "body larger than RECEIVER_MAX_BODY_BYTES"),
                (415, "content type is not JSON"),
                (503, "Postgres unavailable, a fault of ours, or shutting down: retry later"),
            ),
        },
    }
    probe = {"200": _json(Status, "ok"), **_errors((503, "not ready"))}
    link = {
        "summary": "Link a client through Debitura; its token is stored sealed, never answered",
        "description": (
            "Admin listener only (RECEIVER_ADMIN_PORT), with `Authorization: Bearer` one of "
            "RECEIVER_ADMIN_TOKENS. The body is the partner's link request, passed to "
            "Debitura's `POST /v1/referral-partners/clients` as it is; the answer's token is "
            "sealed, signalled and audited (the caller named by the admin token's fingerprint)."
        ),
        "parameters": [
            {
                "in": "query",
                "name": "environment",
                "required": False,
                "schema": {"type": "string", "enum": ["live", "test"], "default": "live"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            "201": _json(LinkAnswer, "linked; the token is stored"),
            **_errors(
                (400, "the link request is not a JSON object"),
                (401, "no admin token, or not one of RECEIVER_ADMIN_TOKENS"),
                (404, "not the admin listener, or RECEIVER_ADMIN_TOKENS not set"),
                (413, "link request over 64 KiB"),
                (502, "Debitura refused or lost the link (the message says what to do)"),
                (503, "Postgres unavailable: retry later"),
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "receiver",
            "version": VERSION,
            "description": "Debitura webhook receiver and bearer-token vault",
        },
        "paths": {
            "/webhooks/debitura": {"post": webhook},
            "/admin/v1/clients": {"post": link},
            "/healthz": {"get": {"summary": "The process answers", "responses": probe}},
            "/readyz": {
                "get": {
                    "summary": "Postgres answers, schema current, not draining",
                    "responses": probe,
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "exposition text",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": definitions["$defs"]},
    }


async def serve_document(_: web.Request) -> web.Response:
    """The OpenAPI description of the endpoints."""
    return web.json_response(document())

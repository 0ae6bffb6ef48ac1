"""Outside parties of the partner library, stood in by small real HTTP servers on
loopback: Debitura's token endpoint and Customer API, an api.video-style provider
(access + refresh tokens), and a token endpoint that answers whatever a test scripts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from receiver import partner
from tests import helpers
from tests.integration import processes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def canary(prefix: str) -> str:
    """A fresh secret-shaped string the session searches every log for."""
    value = prefix + secrets.token_urlsafe(24)
    helpers.CANARIES.add(value)
    return value


API_KEY = canary("rp_key_")


class Captured(logging.Handler):
    """Records of the stdlib loggers the partner-side modules speak through."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.loggers = [logging.getLogger(name) for name in names]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Captured:
        for logger in self.loggers:
            logger.addHandler(self)
            logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *_: object) -> None:
        for logger in self.loggers:
            logger.removeHandler(self)

    @property
    def text(self) -> str:
        return "\n".join(
            self.format(r) + " " + json.dumps(r.__dict__, default=str) for r in self.records
        )


class FakeClock:
    """Monotonic seconds the test moves by hand, shared by the client and the stand-in."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class RecordingSleep:
    """The retry policy's `sleep`: records each wait without spending it, so a test
    sees the backoff the library chose."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def fast_retries(sleep: RecordingSleep | None = None, **options: Any) -> partner.RetryPolicy:
    """A retry policy whose waits are recorded, not slept."""
    return partner.RetryPolicy(sleep=sleep or RecordingSleep(), **options)


def jwt(subject: str) -> str:
    """An HS256 JWT as Debitura mints them (a stand-in key), registered as a canary."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    head = (
        part({"alg": "HS256", "typ": "JWT"}) + "." + part({"sub": subject, "jti": uuid.uuid4().hex})
    )
    mac = hmac.new(b"stand-in", head.encode(), hashlib.sha256).digest()
    token = head + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    helpers.CANARIES.add(token)
    return token


async def serve(routes: dict[str, Handler]) -> TestServer:
    """A started server on a free loopback port with `routes` (POST path -> handler)."""
    site = web.Application()
    for path, handler in routes.items():
        site.router.add_post(path, handler)
    server = TestServer(site, host="127.0.0.1", port=processes.free_port())
    await server.start_server()
    return server


def url_of(server: TestServer) -> str:
    """The server's base URL, no trailing slash."""
    return str(server.make_url("")).rstrip("/")


@dataclass
class StandInDebitura:
    """Debitura's Referral Partner API (`POST /oauth/token`, XApiKey) and a Customer
    API endpoint (`POST /cases`) that refuses expired, revoked or unlinked JWTs.
    `scripted` answers the next token requests first (handlers), `case_answers` the
    next case requests (status, JSON body)."""

    clock: FakeClock
    expires_in: float = 1800
    mints: int = 0
    cases: int = 0
    unlinked: set[str] = field(default_factory=set)  # refused by the Customer API
    unknown: set[str] = field(default_factory=set)  # refused by /oauth/token (404)
    revoked: set[str] = field(default_factory=set)
    scripted: list[Handler] = field(default_factory=list)
    case_answers: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)
    issued: dict[str, tuple[str, float]] = field(default_factory=dict)  # jwt -> tenant, exp
    creditors: dict[str, str] = field(default_factory=dict)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return url_of(self.server)

    def answer(self, status: int, body: Any = None, **headers: str) -> None:
        """Script the next token request's answer."""

        async def scripted(_: web.Request) -> web.Response:
            return web.json_response(
                body if body is not None else {}, status=status, headers=headers
            )

        self.scripted.append(scripted)

    async def mint(self, request: web.Request) -> web.StreamResponse:
        self.mints += 1
        if self.scripted:
            return await self.scripted.pop(0)(request)
        if request.headers.get("XApiKey") != API_KEY:
            return web.json_response({"error": "invalid api key"}, status=401)
        tenant = (await request.json())["externalTenantId"]
        if tenant in self.unknown:
            return web.json_response({"error": "tenant not linked"}, status=404)
        token = jwt(tenant)
        self.issued[token] = (tenant, self.clock() + self.expires_in)
        creditor = self.creditors.setdefault(tenant, str(uuid.uuid4()))
        return web.json_response(
            {
                "accessToken": token,
                "tokenType": "Bearer",
                "expiresIn": self.expires_in,
                "externalTenantId": tenant,
                "creditorId": creditor,
            }
        )

    async def create_case(self, request: web.Request) -> web.Response:
        self.cases += 1
        if self.case_answers:
            status, body, headers = self.case_answers.pop(0)
            return web.json_response(body, status=status, headers=headers)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        tenant, expires = self.issued.get(token, ("", 0.0))
        if (
            not tenant
            or self.clock() >= expires
            or token in self.revoked
            or tenant in self.unlinked
        ):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"caseId": uuid.uuid4().hex}, status=201)


async def debitura_on_loopback() -> StandInDebitura:
    """A started `StandInDebitura`."""
    stand_in = StandInDebitura(FakeClock())
    stand_in.server = await serve({"/oauth/token": stand_in.mint, "/cases": stand_in.create_case})
    return stand_in


@dataclass
class StandInVideo:
    """An api.video-style provider: `POST /auth/api-key {"apiKey"}` and `POST
    /auth/refresh {"refreshToken"}` answer an access token with a refresh token;
    `POST /videos` accepts a live access token. A used refresh token is spent."""

    clock: FakeClock
    api_key: str
    expires_in: float = 3600
    grants: int = 0
    refreshes: int = 0
    calls: int = 0
    access: dict[str, float] = field(default_factory=dict)  # token -> expiry
    refresh_tokens: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    scripted_refresh: list[int] = field(default_factory=list)
    refusing: bool = False  # every call refused (an account that lost access)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return url_of(self.server)

    def _issue(self) -> web.Response:
        access, refresh = jwt("access"), jwt("refresh")
        self.access[access] = self.clock() + self.expires_in
        self.refresh_tokens.add(refresh)
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "access_token": access,
                "refresh_token": refresh,
            }
        )

    async def grant(self, request: web.Request) -> web.Response:
        self.grants += 1
        if (await request.json()).get("apiKey") != self.api_key:
            return web.json_response({"title": "invalid api key"}, status=401)
        return self._issue()

    async def refresh(self, request: web.Request) -> web.Response:
        self.refreshes += 1
        if self.scripted_refresh:
            return web.json_response({}, status=self.scripted_refresh.pop(0))
        given = (await request.json()).get("refreshToken")
        if given not in self.refresh_tokens:
            return web.json_response({"title": "invalid refresh token"}, status=400)
        self.refresh_tokens.discard(given)
        return self._issue()

    async def videos(self, request: web.Request) -> web.Response:
        self.calls += 1
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.refusing or self.access.get(token, 0.0) <= self.clock() or token in self.revoked:
            return web.json_response({"title": "unauthorized"}, status=401)
        return web.json_response({"videoId": uuid.uuid4().hex}, status=201)


async def video_on_loopback(api_key: str) -> StandInVideo:
    """A started `StandInVideo`."""
    stand_in = StandInVideo(FakeClock(), api_key)
    stand_in.server = await serve(
        {
            "/auth/api-key": stand_in.grant,
            "/auth/refresh": stand_in.refresh,
            "/videos": stand_in.videos,
        }
    )
    return stand_in


def poster(
    session: aiohttp.ClientSession, url: str
) -> Callable[[str], Awaitable[aiohttp.ClientResponse]]:
    """The application's own request function: POST to `url` with a given token."""

    async def post(token: str) -> aiohttp.ClientResponse:
        response = await session.post(url, json={}, headers={"Authorization": f"Bearer {token}"})
        await response.read()
        return response

    return post

"""One token API for a partner application, over every token model of the source
documents:

    token = await tokens.get(client_or_tenant)
    response = await tokens.call(client_or_tenant, lambda token: session.post(...))

- `WebhookTokens`: bearer tokens Debitura delivered by webhook, read from the
  receiver's Postgres through `receiver.partner.cache.TokenCache`;
- `MintedTokens`: 30-minute HS256 JWTs minted per `externalTenantId` with
  `POST /oauth/token` and the partner's `XApiKey` (Debitura's referral-partner
  authentication guide), renewed ahead of expiry, one mint for any number of
  concurrent callers;
- `RefreshingTokens`: an access token with a refresh token (api.video's model).

All follow the guide's rule for a 401: a fresh token and exactly one more call; a
second 401 means the link is invalid (`LinkInvalid`), never a loop. A 403 is
`PermissionDenied(required_scope, token_scopes)`, a 429 `RateLimited(retry_after)`.
`blocking(tokens)` gives the same `get`/`call` to code without asyncio. Every failure
is a `TokenError`; tokens, refresh tokens and the API key appear in no log line,
exception or repr. Logging goes through the standard library (`receiver.partner`).
This package imports nothing of the service and registers no metric.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from receiver import errors
from receiver.partner import cache as token_cache
from receiver.partner import calling
from receiver.partner.blocking import BlockingTokens, blocking
from receiver.partner.failures import (
    AnswerTooLarge,
    ApiKeyRefused,
    InsecureURL,
    LinkInvalid,
    MalformedAnswer,
    MintRefused,
    NoToken,
    PermissionDenied,
    RateLimited,
    Redirected,
    TenantNotLinked,
    TokenError,
    TokenRevoked,
    Unavailable,
    UnexpectedStatus,
)
from receiver.partner.minted import DEFAULT_API_URL, MintedTokens
from receiver.partner.refreshing import RefreshingTokens
from receiver.partner.transport import RetryPolicy

# A client the vault holds no token for is reported at most this often (per client).
NO_TOKEN_REPORT_SECONDS = 60.0

__all__ = [
    "DEFAULT_API_URL",
    "AnswerTooLarge",
    "ApiKeyRefused",
    "BlockingTokens",
    "InsecureURL",
    "LinkInvalid",
    "MalformedAnswer",
    "MintRefused",
    "MintedTokens",
    "NoToken",
    "PermissionDenied",
    "RateLimited",
    "Redirected",
    "RefreshingTokens",
    "RetryPolicy",
    "TenantNotLinked",
    "TokenError",
    "TokenRevoked",
    "Unavailable",
    "UnexpectedStatus",
    "WebhookTokens",
    "blocking",
]

R = TypeVar("R")


class WebhookTokens:
    """Tokens Debitura delivered by webhook, for one environment, over a `TokenCache`
    (started here by `start()` unless the application started it)."""

    def __init__(self, cache: token_cache.TokenCache, *, environment: str = "live") -> None:
        self._cache = cache
        self._environment = environment
        self._missing_reported: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"WebhookTokens(environment={self._environment!r})"

    async def start(self) -> None:
        """Start the cache (a no-op when it is already running)."""
        if not self._cache.started:
            await self._cache.start()

    async def close(self) -> None:
        """Close the cache."""
        await self._cache.close()

    async def get(self, client_id: str) -> str:
        """The client's active token; `NoToken` or `TokenRevoked` when there is none.
        A `NoToken` is reported (at most once a minute per client) so that `serve`
        asks Debitura about that client: its onboarding webhook may have been missed."""
        state = await self._cache.lookup(client_id, self._environment)
        if state.token is not None:
            return state.token.get_secret_value()
        if state.status is None:
            await self._report_missing(client_id)
        raise self._no_token(client_id, state)

    async def _report_missing(self, client_id: str) -> None:
        now = time.monotonic()
        if (
            now - self._missing_reported.get(client_id, -NO_TOKEN_REPORT_SECONDS)
            < NO_TOKEN_REPORT_SECONDS
        ):
            return
        if len(self._missing_reported) >= 10_000:  # bounded, whatever callers ask for
            self._missing_reported.clear()
        self._missing_reported[client_id] = now
        # Best effort: the caller gets its NoToken either way.
        with contextlib.suppress(errors.ReceiverError):
            await self._cache.report_no_token(client_id, self._environment)

    def _no_token(self, client_id: str, state: token_cache.TokenState) -> TokenError:
        if state.status is None:
            return NoToken(f"client {client_id!r} has no {self._environment} token", client_id)
        return TokenRevoked(
            f"client {client_id!r}: its {self._environment} token {state.prefix}… is "
            f"{state.status}",
            client_id,
        )

    async def call(self, client_id: str, request: Callable[[str], Awaitable[R]]) -> R:
        """`request(token)`, retried exactly once with a re-read token on a 401; a
        revocation found on re-reading is `TokenRevoked`, a second 401 `LinkInvalid`."""
        return await calling.call(self, client_id, request)

    async def renew(self, client_id: str, refused: str) -> str:
        """Drop the cached entry and read again: a newer token may have arrived, or a
        revocation (`TokenRevoked`)."""
        self._cache.invalidate(client_id, reason="refused")
        return await self.get(client_id)

    async def refused_twice(self, client_id: str, token: str) -> TokenError:
        """A revocation stored meanwhile is `TokenRevoked`; otherwise report the token
        refused twice (not a revocation) and return `LinkInvalid`."""
        self._cache.invalidate(client_id, reason="refused")
        state = await self._cache.lookup(client_id, self._environment)
        if state.token is None:
            return self._no_token(client_id, state)
        if state.prefix is not None and state.token.get_secret_value() == token:
            await self._cache.report_link_invalid(client_id, self._environment, state.prefix)
        return LinkInvalid(
            f"{client_id!r}: a fresh token was refused too: re-link the client", client_id
        )

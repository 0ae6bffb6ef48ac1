"""One token API for a partner application, over both of Debitura's auth models:

    token = await tokens.get(client_or_tenant)
    response = await tokens.call(client_or_tenant, lambda token: session.post(...))

- `WebhookTokens`: bearer tokens Debitura delivered by webhook, read from the
  receiver's Postgres through `receiver.partner.cache.TokenCache`;
- `MintedTokens`: 30-minute HS256 JWTs minted per `externalTenantId` with
  `POST /oauth/token` and the partner's `XApiKey` (Debitura's referral-partner
  authentication guide), cached until `expiresIn` minus a skew, renewed ahead of
  expiry, minted once for any number of concurrent callers.

Both follow the guide's rule for a 401: get a fresh token and retry exactly once; a
second 401 means the client link is invalid (`LinkInvalid`), never a loop. A 429 is
`RateLimited` with the server's `Retry-After`. Tokens and the API key never appear in
a log line or a repr. Logging goes through the standard library (`receiver.partner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
from pydantic import SecretStr

from receiver.partner import cache as token_cache

log = logging.getLogger("receiver.partner")

DEFAULT_API_URL = "https://referral-api.debitura.com"
DEFAULT_SKEW_SECONDS = 60.0  # a token this close to its expiry is not handed out
DEFAULT_REFRESH_AHEAD_SECONDS = 300.0  # minted anew in the background this early
MINT_TIMEOUT_SECONDS = 10.0


# --- errors -------------------------------------------------------------------------


class TokenError(Exception):
    """Why no usable token could be given for a client or tenant."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class NoToken(TokenError):
    """The client never had a token in this environment (not linked, or not yet)."""


class TokenRevoked(TokenError):
    """The client's newest token was revoked or has expired; none replaced it."""


class LinkInvalid(TokenError):
    """A fresh token was refused too: the client link itself is invalid (re-link it)."""


class MintRefused(TokenError):
    """`POST /oauth/token` refused the API key (or the tenant): a configuration error."""


class RateLimited(TokenError):
    """Debitura answered 429; try again after `retry_after` seconds."""

    def __init__(self, message: str, key: str, retry_after: float) -> None:
        super().__init__(message, key)
        self.retry_after = retry_after


# --- what `call` needs of a response ---------------------------------------------------


class Response(Protocol):
    """What `call` reads of the application's response object (aiohttp's, httpx's...)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


R = TypeVar("R", bound=Response)


def _retry_after(response: Response, default: float = 1.0) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", default)))
    except (TypeError, ValueError):
        return default  # an HTTP date, or garbage: wait the default


async def _call_once_more(
    source: _Source,
    key: str,
    request: Callable[[str], Awaitable[R]],
) -> R:
    """The guide's pattern, for both models: call; on 401 a fresh token and exactly one
    more call; a second 401 (or no fresher token) is `LinkInvalid`; a 429 is
    `RateLimited`."""
    token = await source.get(key)
    response = await request(token)
    if response.status == 429:
        raise RateLimited("rate limited by Debitura", key, _retry_after(response))
    if response.status != 401:
        return response
    fresh = await source.renew(key, token)
    if fresh is None or fresh == token:
        await source.link_invalid(key)
        raise LinkInvalid(f"{key!r}: token refused and no fresher one exists", key)
    response = await request(fresh)
    if response.status == 429:
        raise RateLimited("rate limited by Debitura", key, _retry_after(response))
    if response.status == 401:
        await source.link_invalid(key)
        raise LinkInvalid(f"{key!r}: a fresh token was refused too: re-link the client", key)
    return response


class _Source(Protocol):
    async def get(self, key: str) -> str: ...

    async def renew(self, key: str, refused: str) -> str | None: ...

    async def link_invalid(self, key: str) -> None: ...


# --- webhook-delivered tokens ---------------------------------------------------------


class WebhookTokens:
    """Tokens Debitura delivered by webhook, for one environment, over a started
    `TokenCache`."""

    def __init__(self, cache: token_cache.TokenCache, *, environment: str = "live") -> None:
        self._cache = cache
        self._environment = environment

    def __repr__(self) -> str:
        return f"WebhookTokens(environment={self._environment!r})"

    async def get(self, client_id: str) -> str:
        """The client's active token; `NoToken` or `TokenRevoked` when there is none."""
        state = await self._cache.lookup(client_id, self._environment)
        if state.token is not None:
            return state.token.get_secret_value()
        if state.status is None:
            raise NoToken(f"client {client_id!r} has no {self._environment} token", client_id)
        raise TokenRevoked(
            f"client {client_id!r}: its {self._environment} token {state.prefix}… is "
            f"{state.status}",
            client_id,
        )

    async def call(self, client_id: str, request: Callable[[str], Awaitable[R]]) -> R:
        """`request(token)`, retried exactly once with a re-read token on a 401."""
        return await _call_once_more(self, client_id, request)

    async def renew(self, client_id: str, refused: str) -> str | None:
        """Drop the cached entry and read again: a newer token may have arrived."""
        self._cache.invalidate(client_id, reason="refused")
        try:
            return await self.get(client_id)
        except TokenError:
            return None

    async def link_invalid(self, client_id: str) -> None:
        """Report the client's current token as refused twice (not a revocation)."""
        state = await self._cache.lookup(client_id, self._environment)
        if state.token is not None and state.prefix is not None:
            await self._cache.report_link_invalid(client_id, self._environment, state.prefix)


# --- minted JWTs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Minted:
    token: SecretStr
    expires: float  # on the clock the source was given


class MintedTokens:
    """JWTs minted per `externalTenantId` with the partner's API key.

    `api_url` is the Referral Partner API of the environment in use (live, or
    Debitura's sandbox); `clock` is monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        api_key: str | SecretStr,
        *,
        api_url: str = DEFAULT_API_URL,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        skew: float = DEFAULT_SKEW_SECONDS,
        refresh_ahead: float = DEFAULT_REFRESH_AHEAD_SECONDS,
        on_invalidated: token_cache.Invalidated | None = None,
    ) -> None:
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._url = api_url.rstrip("/") + "/oauth/token"
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._skew = skew
        self._refresh_ahead = max(refresh_ahead, skew)
        self._on_invalidated = on_invalidated
        self._tokens: dict[str, _Minted] = {}
        # One mint in flight per tenant: concurrent callers await the same one.
        self._minting: dict[str, asyncio.Task[_Minted]] = {}
        self._renewals: set[asyncio.Task[Any]] = set()
        self.mints = 0  # how many times POST /oauth/token was called (observability)

    def __repr__(self) -> str:
        return f"MintedTokens(api_url={self._url!r}, tenants={len(self._tokens)})"

    async def close(self) -> None:
        """Stop background renewals and close the HTTP session this object opened."""
        for task in [*self._renewals, *self._minting.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TokenError):
                await task
        if self._own_session and self._session is not None:
            await self._session.close()

    async def get(self, tenant: str) -> str:
        """A token for the tenant that stays valid for at least `skew` seconds: the
        cached one, or a fresh mint. Within `refresh_ahead` of expiry, a renewal
        starts in the background while the still-valid token is returned."""
        minted = self._tokens.get(tenant)
        now = self._clock()
        if minted is not None and minted.expires - now > self._skew:
            if minted.expires - now <= self._refresh_ahead and tenant not in self._minting:
                renewal = asyncio.create_task(self._mint_shared(tenant))
                self._renewals.add(renewal)
                renewal.add_done_callback(self._renewal_done)
            return minted.token.get_secret_value()
        return (await self._mint_shared(tenant)).token.get_secret_value()

    async def call(self, tenant: str, request: Callable[[str], Awaitable[R]]) -> R:
        """`request(token)`, retried exactly once with a freshly minted token on a 401."""
        return await _call_once_more(self, tenant, request)

    async def renew(self, tenant: str, refused: str) -> str | None:
        """Mint anew (unless a concurrent caller already replaced the refused token)."""
        current = self._tokens.get(tenant)
        if current is not None and current.token.get_secret_value() != refused:
            return current.token.get_secret_value()
        self._tokens.pop(tenant, None)
        return (await self._mint_shared(tenant)).token.get_secret_value()

    async def link_invalid(self, tenant: str) -> None:
        """Forget the tenant's token and tell the application's hook."""
        self._tokens.pop(tenant, None)
        log.warning("tenant link invalid: a freshly minted token was refused")
        if self._on_invalidated is not None:
            self._on_invalidated(tenant, "link_invalid")

    def _renewal_done(self, task: asyncio.Task[Any]) -> None:
        self._renewals.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The current token is still valid; the next get() tries again.
            log.warning("background token renewal failed: %s", type(task.exception()).__name__)

    async def _mint_shared(self, tenant: str) -> _Minted:
        task = self._minting.get(tenant)
        if task is None or task.done():  # a finished mint's task may linger a moment
            task = asyncio.create_task(self._mint(tenant))
            self._minting[tenant] = task
            task.add_done_callback(lambda done: self._forget_mint(tenant, done))
        # shield: one caller giving up must not cancel the mint the others await.
        return await asyncio.shield(task)

    def _forget_mint(self, tenant: str, done: asyncio.Task[_Minted]) -> None:
        # Only this mint's own entry: a newer one may already stand in its place.
        if self._minting.get(tenant) is done:
            del self._minting[tenant]

    async def _mint(self, tenant: str) -> _Minted:
        try:
            return await self._mint_once(tenant)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Typed like every other failure to get a token; the cause's class only.
            raise TokenError(f"POST /oauth/token failed: {type(exc).__name__}", tenant) from None

    async def _mint_once(self, tenant: str) -> _Minted:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self.mints += 1
        started = self._clock()
        async with self._session.post(
            self._url,
            json={"externalTenantId": tenant},
            headers={"XApiKey": self._api_key.get_secret_value()},
            timeout=aiohttp.ClientTimeout(total=MINT_TIMEOUT_SECONDS),
        ) as response:
            if response.status == 429:
                raise RateLimited("token minting rate limited", tenant, _retry_after(response))
            if response.status in (401, 403):
                raise MintRefused(
                    f"POST /oauth/token refused ({response.status}): check the API key "
                    "and that the tenant is linked",
                    tenant,
                )
            if response.status != 200:
                raise TokenError(f"POST /oauth/token answered {response.status}", tenant)
            document = await response.json()
        try:
            token = str(document["accessToken"])
            lifetime = float(document["expiresIn"])
        except (KeyError, TypeError, ValueError):
            raise TokenError(
                "POST /oauth/token answered without accessToken/expiresIn", tenant
            ) from None
        minted = _Minted(SecretStr(token), started + lifetime)
        self._tokens[tenant] = minted
        log.info("minted a token for a tenant, valid %.0f s", lifetime)
        return minted

"""What the two expiring-token models share (Debitura's minted JWTs, api.video-style
access + refresh tokens): a token per key held in memory until shortly before its
expiry, renewed in the background ahead of it, obtained once for any number of
concurrent callers, and the `get`/`call` interface.

The renewal points have a floor, so a short `expiresIn` cannot make every call
obtain a token: a token is handed out for at least three quarters of its lifetime
and renewed in the background from half of it, whatever `skew` and `refresh_ahead`
say (with 1800 s and the defaults: handed out until 60 s before expiry, renewed
from 300 s before). And the lifetime itself has a floor: a token that says it is
good for less than `MIN_LIFETIME_SECONDS` (`expiresIn: 0.001`) is held as if it were
good for that long, so `get` obtains one at most every few seconds per key, never
once per call (if the API refuses it sooner, `call`'s 401 path gets a fresh one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import SecretStr

from receiver.partner import calling, failures, transport

log = logging.getLogger("receiver.partner")

DEFAULT_SKEW_SECONDS = 60.0  # a token this close to its expiry is not handed out
DEFAULT_REFRESH_AHEAD_SECONDS = 300.0  # renewed in the background this early
HAND_OUT_FLOOR = 0.75  # share of the lifetime a token is always handed out for
RENEW_FLOOR = 0.5  # share of the lifetime before which no background renewal starts
# A shorter lifetime is held as this long: renewal from 5 s, a blocking obtain from 7.5 s.
MIN_LIFETIME_SECONDS = 10.0

R = TypeVar("R")
Invalidated = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Held:
    """A token and when to renew it, on the clock the model was given."""

    token: SecretStr
    renew_at: float  # from here a background renewal starts
    stale_at: float  # from here the token is not handed out
    refresh_token: SecretStr | None = None
    creditor_id: str | None = None

    def __repr__(self) -> str:
        return f"Held(renew_at={self.renew_at:.0f}, stale_at={self.stale_at:.0f})"


def held(
    token: str,
    lifetime: float,
    *,
    issued: float,
    skew: float,
    refresh_ahead: float,
    refresh_token: str | None = None,
    creditor_id: str | None = None,
) -> Held:
    """A `Held` for a token issued at `issued` valid `lifetime` seconds, with floors."""
    lifetime = max(lifetime, MIN_LIFETIME_SECONDS)
    stale = issued + max(lifetime - skew, lifetime * HAND_OUT_FLOOR)
    renew = min(stale, issued + max(lifetime - refresh_ahead, lifetime * RENEW_FLOOR))
    return Held(
        SecretStr(token),
        renew,
        stale,
        SecretStr(refresh_token) if refresh_token is not None else None,
        creditor_id,
    )


class ExpiringTokens:
    """Base of `MintedTokens` and `RefreshingTokens`: subclasses say how a token is
    obtained (`_obtain`)."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None,
        clock: Callable[[], float],
        skew: float,
        refresh_ahead: float,
        retry: transport.RetryPolicy,
        on_invalidated: Invalidated | None,
    ) -> None:
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._skew = skew
        self._refresh_ahead = max(refresh_ahead, skew)
        self._retry = retry
        self._on_invalidated = on_invalidated
        self._held: dict[str, Held] = {}
        # One request in flight per slot: concurrent callers await the same one.
        self._obtaining: dict[str, asyncio.Task[Held]] = {}
        self._renewals: set[asyncio.Task[Any]] = set()

    def _slot(self, key: str) -> str:
        """Where `key`'s token is held (one per key unless a model says otherwise)."""
        return key

    async def _obtain(self, key: str, previous: Held | None) -> Held:
        raise NotImplementedError

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def start(self) -> None:
        """Nothing to start (the session opens on first use); for a uniform interface."""

    async def close(self) -> None:
        """Stop background renewals and close the HTTP session this object opened."""
        for task in [*self._renewals, *self._obtaining.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, failures.TokenError):
                await task
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, key: str) -> str:
        """A token for `key` that stays valid for a while: the held one, or a fresh
        one. Past its renewal point a renewal starts in the background while the
        still-valid token is returned."""
        slot = self._slot(key)
        current = self._held.get(slot)
        now = self._clock()
        if current is not None and now < current.stale_at:
            if now >= current.renew_at and slot not in self._obtaining:
                renewal = asyncio.create_task(self._obtain_shared(key))
                self._renewals.add(renewal)
                renewal.add_done_callback(self._renewal_done)
            return current.token.get_secret_value()
        return (await self._obtain_shared(key)).token.get_secret_value()

    async def call(self, key: str, request: Callable[[str], Awaitable[R]]) -> R:
        """`request(token)`, retried exactly once with a fresh token on a 401; a second
        401 is `LinkInvalid`, a 403 `PermissionDenied`, a 429 `RateLimited`."""
        return await calling.call(self, key, request)

    async def renew(self, key: str, refused: str) -> str:
        """A fresh token (unless a concurrent caller already replaced the refused one)."""
        slot = self._slot(key)
        current = self._held.get(slot)
        if current is not None and current.token.get_secret_value() != refused:
            return current.token.get_secret_value()
        if current is not None and slot not in self._obtaining:
            # Keep the refresh token (a refresh is what a 401 asks for); the access
            # token is not handed out again.
            self._held[slot] = Held(
                current.token, -1.0, -1.0, current.refresh_token, current.creditor_id
            )
        return (await self._obtain_shared(key)).token.get_secret_value()

    async def refused_twice(self, key: str, token: str) -> failures.TokenError:
        """Forget the key's token and tell the application's hook."""
        self._held.pop(self._slot(key), None)
        log.warning("link invalid: a fresh token was refused too")
        if self._on_invalidated is not None:
            self._on_invalidated(key, "link_invalid")
        return failures.LinkInvalid("a fresh token was refused too: re-link the client", key)

    def _renewal_done(self, task: asyncio.Task[Any]) -> None:
        self._renewals.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The current token is still valid; the next get() tries again.
            log.warning("background token renewal failed: %s", type(task.exception()).__name__)

    async def _obtain_shared(self, key: str) -> Held:
        slot = self._slot(key)
        task = self._obtaining.get(slot)
        if task is None or task.done():  # a finished task may linger a moment
            task = asyncio.create_task(self._obtain_and_hold(key, slot))
            self._obtaining[slot] = task
            task.add_done_callback(lambda done: self._forget(slot, done))
        # shield: one caller giving up must not cancel what the others await.
        return await asyncio.shield(task)

    async def _obtain_and_hold(self, key: str, slot: str) -> Held:
        fresh = await self._obtain(key, self._held.get(slot))
        self._held[slot] = fresh
        return fresh

    def _forget(self, slot: str, done: asyncio.Task[Held]) -> None:
        # Only this task's own entry: a newer one may already stand in its place.
        if self._obtaining.get(slot) is done:
            del self._obtaining[slot]
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody awaited is not "never retrieved"

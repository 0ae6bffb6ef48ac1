"""A token cache for partner applications: `await cache.get(client_id)`.

The cache pattern of Debitura's bearer-token guide (tokens kept in memory with a
TTL, `invalidate(client_id)`), wired to the receiver's invalidation signals:

- tokens are read from Postgres and opened in memory, never stored elsewhere;
- a dedicated connection LISTENs on the notify channel and drops a client's entry
  when its token changes; it reconnects with backoff and flushes everything on
  reconnect, because notifications sent while it was away are lost;
- `signal_handler` is an aiohttp handler for the receiver's signed HTTP signals;
- `call_with_token` is the "retry once on 401" helper of Debitura's authentication
  guide: on a 401, invalidate, re-read, and retry exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from pydantic import SecretStr

from receiver import config, db, errors, signing, tokens, vault

log = structlog.get_logger(__name__)

DEFAULT_TTL_SECONDS = 3600.0
HEALTH_CHECK_SECONDS = 5.0
MAX_RECONNECT_DELAY_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    token: SecretStr | None  # None: the client has no active token (cached too)


class TokenCache:
    """Clients' active tokens in memory, dropped when the receiver signals a change."""

    def __init__(
        self,
        database_url: str,
        sealer: vault.Sealer,
        *,
        channel: str = "token_invalidation",
        ttl: float = DEFAULT_TTL_SECONDS,
        signal_secret: bytes | None = None,
    ) -> None:
        self._dsn = database_url
        self._sealer = sealer
        self._channel = channel
        self._ttl = ttl
        self._signal_secret = signal_secret
        self._entries: dict[tuple[str, str], _Entry] = {}  # (client id, environment)
        # Bumped by every invalidation: a read that started before one is not cached.
        self._generations: dict[str, int] = {}
        self._epoch = 0
        self._database: db.Database | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    @classmethod
    def from_settings(
        cls, settings: config.Settings, *, ttl: float = DEFAULT_TTL_SECONDS
    ) -> TokenCache:
        """A cache reading the database, keys and channel the receiver's settings name."""
        if settings.database_url is None:
            raise errors.ConfigError("RECEIVER_DATABASE_URL is required for the token cache")
        secret = settings.cache_secret.get_secret_value() if settings.cache_secret else None
        return cls(
            settings.database_url.get_secret_value(),
            vault.Sealer.from_settings(settings),
            channel=settings.notify_channel,
            ttl=ttl,
            signal_secret=secret,
        )

    def __repr__(self) -> str:
        return f"TokenCache(channel={self._channel!r}, entries={len(self._entries)})"

    async def start(self, *, wait_listening: float = 10.0) -> None:
        """Open the pool and start listening; waits (bounded) for the first LISTEN."""
        self._database = await db.Database.open(self._dsn, max_size=4)
        self._listener = asyncio.create_task(self._listen_forever(), name="token-cache-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_listening):
                await self._listening.wait()

    async def close(self) -> None:
        """Stop listening and close the pool."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._database is not None:
            await self._database.close()
        self.flush()

    @property
    def listening(self) -> bool:
        """Whether the LISTEN connection is up right now."""
        return self._listening.is_set()

    async def get(self, client_id: str, environment: str = "live") -> str | None:
        """The client's active token in `environment` (live unless told otherwise: a
        test token never stands in for a live one), or None when it has none."""
        if environment not in tokens.ENVIRONMENTS:
            raise errors.UsageError("environment must be 'live' or 'test'")
        entry = self._entries.get((client_id, environment))
        if entry is not None and entry.expires > time.monotonic():
            return entry.token.get_secret_value() if entry.token is not None else None
        if self._database is None:
            raise errors.ReceiverError("TokenCache.start() has not been awaited")
        before = (self._epoch, self._generations.get(client_id, 0))
        rows = await self._database.fetch("active_token", client_id, environment)
        token = self._sealer.open_token(rows[0]["id"], rows[0]["token_sealed"]) if rows else None
        if (self._epoch, self._generations.get(client_id, 0)) == before:
            secret = SecretStr(token) if token is not None else None
            self._entries[(client_id, environment)] = _Entry(time.monotonic() + self._ttl, secret)
        return token

    def invalidate(self, client_id: str) -> None:
        """Drop what is cached for one client, in both environments."""
        for environment in tokens.ENVIRONMENTS:
            self._entries.pop((client_id, environment), None)
        self._generations[client_id] = self._generations.get(client_id, 0) + 1

    def flush(self) -> None:
        """Drop everything."""
        self._entries.clear()
        self._epoch += 1

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            client_id = json.loads(str(payload))["client_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("cache_signal_unreadable")
            self.flush()  # unsure what changed: drop everything rather than serve stale
            return
        self.invalidate(str(client_id))
        log.info("cache_invalidated", client_id=client_id, via="notify")

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await db.connect(self._dsn)
            except errors.DatabaseUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY_SECONDS)
                continue
            try:
                await self._listen_on(conn)
                delay = 0.1
            except errors.DatabaseUnavailable:
                pass
            finally:
                self._listening.clear()
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
            log.warning("cache_listener_lost", reconnect_in_seconds=delay)
            await asyncio.sleep(delay)

    async def _listen_on(self, conn: db.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        async with db.translated_errors():
            await conn.add_listener(self._channel, self._on_notify)
        # Anything announced while we were not listening is lost: start clean.
        self.flush()
        self._listening.set()
        log.info("cache_listening", channel=self._channel)
        while not lost.is_set():
            # asyncio.timeout, not wait_for, which can swallow a cancellation on 3.11.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEALTH_CHECK_SECONDS):
                    await lost.wait()
            if not lost.is_set():
                # A half-open TCP connection raises no event; a ping finds it.
                async with db.translated_errors():
                    await conn.fetchval("SELECT 1", timeout=HEALTH_CHECK_SECONDS)

    async def signal_handler(self, request: web.Request) -> web.Response:
        """aiohttp handler for the receiver's signed invalidation POSTs."""
        if self._signal_secret is None:
            raise errors.ConfigError("RECEIVER_CACHE_SECRET is required to accept HTTP signals")
        body = await request.read()
        try:
            signing.verify(
                request.headers.get(signing.SIGNAL_SIGNATURE_HEADER),
                body,
                [self._signal_secret],
                300,
            )
            client_id = json.loads(body)["client_id"]
        except errors.ReceiverError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except (ValueError, KeyError, TypeError):
            error = errors.InvalidRequest("signal body must be JSON with a client_id")
            return web.json_response(error.body(), status=error.status)
        self.invalidate(str(client_id))
        log.info("cache_invalidated", client_id=client_id, via="http")
        return web.json_response({"status": "invalidated"})


class _HasStatus(Protocol):
    status: int


R = TypeVar("R", bound=_HasStatus)


async def call_with_token(
    cache: TokenCache,
    client_id: str,
    call: Callable[[str], Awaitable[R]],
    *,
    environment: str = "live",
) -> R:
    """Call Debitura with the client's token; on a 401, invalidate, re-read and retry
    exactly once. A second 401, or no newer token, means the link itself is invalid:
    the 401 is returned rather than retried again."""
    token = await cache.get(client_id, environment)
    if token is None:
        raise errors.ReceiverError(f"client {client_id!r} has no active token")
    response = await call(token)
    if response.status != 401:
        return response
    cache.invalidate(client_id)
    fresh = await cache.get(client_id, environment)
    if fresh is None or fresh == token:
        return response
    return await call(fresh)

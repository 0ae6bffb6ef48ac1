"""A token cache for partner applications: `await cache.get(client_id)`.

The cache pattern of Debitura's bearer-token guide (tokens kept in memory with a
TTL, `invalidate(client_id)`), wired to the receiver's invalidation signals:

- tokens are read from Postgres (the `receiver.cache_tokens` view, all the
  `receiver_cache_reader` role may read) and opened in memory, never stored elsewhere;
- a dedicated connection LISTENs on the notify channel and drops a client's entry
  when its token changes; it reconnects with backoff and flushes everything on
  reconnect, because notifications sent while it was away are lost. Anyone who can
  connect can NOTIFY: a payload only ever drops the one client it names; an
  unreadable one, or `*`, is ignored (logged, throttled);
- `verify_signal` checks the receiver's HTTP signals (Standard Webhooks) in any web
  framework; `signal_handler` is the aiohttp handler built on it.

It logs through the standard library's `logging` (logger `receiver.partner.cache`), so the
application's own logging configuration decides where its lines go.
`receiver.partner` builds the typed, retry-once API on top of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import standardwebhooks
import structlog
from aiohttp import web
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from receiver import config, db, endpoints, errors, signing, vault

log = logging.getLogger("receiver.partner.cache")

DEFAULT_TTL_SECONDS = 600.0
HEALTH_CHECK_SECONDS = 5.0
MAX_RECONNECT_DELAY_SECONDS = 30.0
SIGNAL_TOLERANCE_SECONDS = 300
# Unreadable NOTIFY payloads are counted and logged at most once this often.
UNREADABLE_LOG_SECONDS = 60.0
MAX_CLIENT_ID = 200

Invalidated = Callable[[str, str], None]
"""`on_invalidated(client_id, reason)`: reason is `signal` (NOTIFY or HTTP),
`reconnect` (client_id `*`: everything was dropped), or `link_invalid`."""


def _notified_client(payload: object) -> str | None:
    """The one client a NOTIFY payload names, or None when it names none readably (not
    JSON, no `client_id`, not a string, `*`, longer than any client id)."""
    try:
        client_id = json.loads(str(payload))["client_id"]
    except (ValueError, KeyError, TypeError):
        return None
    if (
        not isinstance(client_id, str)
        or not 0 < len(client_id) <= MAX_CLIENT_ID
        or client_id == "*"
    ):
        return None
    return client_id


class CacheSettings(BaseSettings):
    """What a partner application's cache needs, and nothing more: a database URL
    (for the `receiver_cache_reader` role), the keys that open tokens, and the
    channel; the signal secret only to accept HTTP signals."""

    model_config = SettingsConfigDict(env_prefix="RECEIVER_", frozen=True, extra="ignore")

    cache_database_url: SecretStr | None = None
    database_url: SecretStr | None = None  # used when cache_database_url is not set
    token_keys: config.TokenKeys
    notify_channel: config.Channel = "token_invalidation"
    # One or several (comma-separated, base64 or `whsec_…`): any of them verifies.
    cache_secret: config.CacheSecrets = ()
    cache_ttl_seconds: float = Field(default=DEFAULT_TTL_SECONDS, gt=0)

    def dsn(self) -> str:
        """The database URL the cache connects with."""
        url = self.cache_database_url or self.database_url
        if url is None:
            raise errors.ConfigError(
                "RECEIVER_CACHE_DATABASE_URL is required for the token cache "
                "(`make run` prints the one for its embedded Postgres)"
            )
        name = "RECEIVER_CACHE_DATABASE_URL" if self.cache_database_url else "RECEIVER_DATABASE_URL"
        problem = endpoints.database_url_problem(url.get_secret_value())
        if problem is not None:  # the driver would misread it (never a value of it)
            raise errors.ConfigError(f"{name} is invalid: {problem}")
        return url.get_secret_value()


def _route_structlog_to_logging() -> None:
    """The receiver's shared modules (the database layer) speak structlog. In an
    application that has not configured structlog, send their lines to the standard
    library's logging too, as the cache's own; an application that configured
    structlog keeps its configuration."""
    if not structlog.is_configured():
        structlog.configure(
            processors=[structlog.stdlib.render_to_log_kwargs],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
        )


@dataclass(frozen=True, slots=True)
class TokenState:
    """What the cache knows of a client's token in one environment."""

    token: SecretStr | None  # the active token, or None
    prefix: str | None  # the newest token's prefix (active or not), None: never had one
    status: str | None  # active, superseded, expired, revoked; None: never had one


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    state: TokenState


Secrets = bytes | str | Sequence[bytes | str]
"""One secret or several (a rotation window): raw bytes, or text in base64 or `whsec_…`."""


def _secret_list(secrets: Secrets) -> list[bytes]:
    items = [secrets] if isinstance(secrets, bytes | str) else list(secrets)
    return [s if isinstance(s, bytes) else config.decode_signal_secret(s) for s in items]


_REFUSED = object()


def _verifies(secret: bytes, body: bytes, headers: dict[str, str]) -> Any:
    try:
        return standardwebhooks.Webhook(secret).verify(body, headers)
    except (standardwebhooks.WebhookVerificationError, ValueError, TypeError):
        return _REFUSED


def verify_signal(
    headers: Mapping[str, str], body: bytes, secret: Secrets, *, legacy: bool = True
) -> dict[str, Any]:
    """Check a signal POST from the receiver and return its payload; framework-agnostic.

    `secret` is one secret or several (during a rotation, the new and the old): any
    of them verifies. Standard Webhooks headers (`webhook-id`, `webhook-timestamp`,
    `webhook-signature`) are verified by the `standardwebhooks` library. The first
    release's `X-Receiver-Signature` is accepted instead when `legacy` and no standard
    header came. Raises `errors.InvalidSignature` (401) or `errors.InvalidRequest` (400).
    """
    secrets = _secret_list(secret)
    lowered = {k.lower(): v for k, v in headers.items()}
    if "webhook-signature" in lowered or not legacy:
        payload = _REFUSED
        for candidate in secrets:
            payload = _verifies(candidate, body, lowered)
            if payload is not _REFUSED:
                break
        if payload is _REFUSED:
            raise errors.InvalidSignature("signal signature does not verify", "mismatch")
    else:
        signing.verify(
            lowered.get(signing.SIGNAL_SIGNATURE_HEADER.lower()),
            body,
            secrets,
            SIGNAL_TOLERANCE_SECONDS,
        )
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("client_id"), str):
        raise errors.InvalidRequest("signal body must be a JSON object with a client_id")
    return payload


class TokenCache:
    """Clients' active tokens in memory, dropped when the receiver signals a change."""

    def __init__(
        self,
        database_url: str,
        keyring: vault.Keyring,
        *,
        channel: str = "token_invalidation",
        ttl: float = DEFAULT_TTL_SECONDS,
        signal_secret: Secrets | None = None,
        on_invalidated: Invalidated | None = None,
        database: db.Database | None = None,
    ) -> None:
        self._dsn = database_url
        self._keyring = keyring
        self._channel = channel
        self._ttl = ttl
        self._signal_secrets = _secret_list(signal_secret) if signal_secret else []
        self._on_invalidated = on_invalidated
        self._entries: dict[tuple[str, str], _Entry] = {}  # (client id, environment)
        # Bumped by every invalidation: a read that started before one is not cached.
        self._generations: dict[str, int] = {}
        self._epoch = 0
        self._unreadable = 0
        self._unreadable_logged_at = -UNREADABLE_LOG_SECONDS
        # An application's own pool may be shared (it stays the application's to close).
        self._database: db.Database | None = database
        self._own_database = database is None
        # One read per miss: callers missing the same entry await the same read.
        self._reading: dict[tuple[str, str], asyncio.Task[TokenState]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    @classmethod
    def from_settings(
        cls,
        settings: CacheSettings | None = None,
        *,
        on_invalidated: Invalidated | None = None,
    ) -> TokenCache:
        """A cache as `CacheSettings` (the `RECEIVER_*` variables) say."""
        # The fields come from the environment, which mypy cannot see.
        settings = settings if settings is not None else CacheSettings()  # type: ignore[call-arg]
        secret = [s.get_secret_value() for s in settings.cache_secret]
        keyring = vault.Keyring([(k, v.get_secret_value()) for k, v in settings.token_keys])
        return cls(
            settings.dsn(),
            keyring,
            channel=settings.notify_channel,
            ttl=settings.cache_ttl_seconds,
            signal_secret=secret,
            on_invalidated=on_invalidated,
        )

    def __repr__(self) -> str:
        return f"TokenCache(channel={self._channel!r}, entries={len(self._entries)})"

    async def start(self, *, wait_listening: float = 10.0) -> None:
        """Open the pool and start listening; waits (bounded) for the first LISTEN."""
        _route_structlog_to_logging()
        if self._database is None:
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
        if self._database is not None and self._own_database:
            await self._database.close()
            self._database = None
        self._listener = None
        self.flush()

    @property
    def started(self) -> bool:
        """Whether `start()` ran and `close()` did not since."""
        return self._listener is not None

    @property
    def listening(self) -> bool:
        """Whether the LISTEN connection is up right now."""
        return self._listening.is_set()

    async def get(self, client_id: str, environment: str = "live") -> str | None:
        """The client's active token in `environment` (live unless told otherwise: a
        test token never stands in for a live one), or None when it has none."""
        state = await self.lookup(client_id, environment)
        return state.token.get_secret_value() if state.token is not None else None

    async def lookup(self, client_id: str, environment: str = "live") -> TokenState:
        """The client's active token and what is known of its newest one, cached."""
        if environment not in vault.ENVIRONMENTS:
            raise errors.UsageError("environment must be 'live' or 'test'")
        entry = self._entries.get((client_id, environment))
        if entry is not None and entry.expires > time.monotonic():
            return entry.state
        if self._database is None:
            raise errors.ReceiverError("TokenCache.start() has not been awaited")
        key = (client_id, environment)
        reading = self._reading.get(key)
        if reading is None:
            # The generations now: a read that an invalidation overtakes is not cached.
            before = (self._epoch, self._generations.get(client_id, 0))
            reading = asyncio.create_task(
                self._read(self._database, client_id, environment, before)
            )
            self._reading[key] = reading
            reading.add_done_callback(lambda done: self._read_done(key, done))
        # shield: one caller giving up must not cancel the read the others await.
        return await asyncio.shield(reading)

    def _read_done(self, key: tuple[str, str], done: asyncio.Task[TokenState]) -> None:
        if self._reading.get(key) is done:
            del self._reading[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody awaited is not "never retrieved"

    async def _read(
        self, database: db.Database, client_id: str, environment: str, before: tuple[int, int]
    ) -> TokenState:
        rows = await database.fetch("active_token", client_id, environment)
        if not rows:
            state = TokenState(None, None, None)
        else:
            row = rows[0]
            token = None
            if row["status"] == "active":
                token = SecretStr(
                    self._keyring.open(
                        row["token_sealed"], vault.token_associated_data(row["id"])
                    ).decode()
                )
            state = TokenState(token, row["prefix"], row["status"])
        if (self._epoch, self._generations.get(client_id, 0)) == before:
            self._entries[(client_id, environment)] = _Entry(time.monotonic() + self._ttl, state)
        return state

    async def report_no_token(self, client_id: str, environment: str) -> None:
        """Record that the application asked for a client the vault holds no token for
        (a webhook may have been missed): `serve` reconciles that client with Debitura
        within a minute. Not a revocation; nothing is dropped from the cache."""
        if self._database is None:
            raise errors.ReceiverError("TokenCache.start() has not been awaited")
        await self._database.fetch("report_link_invalid", client_id, environment, None, "no token")
        log.info(
            "client reported without token",
            extra={"client_id": client_id, "environment": environment},
        )

    async def report_link_invalid(
        self, client_id: str, environment: str, prefix: str, detail: str = "second 401"
    ) -> None:
        """Record that the client's active token was refused twice: visible in
        `receiver tokens list` and `receiver_clients_link_invalid`; not a revocation."""
        if self._database is None:
            raise errors.ReceiverError("TokenCache.start() has not been awaited")
        await self._database.fetch("report_link_invalid", client_id, environment, prefix, detail)
        self.invalidate(client_id, reason="link_invalid")
        log.warning(
            "client link reported invalid",
            extra={"client_id": client_id, "environment": environment, "token_prefix": prefix},
        )

    def invalidate(self, client_id: str, *, reason: str = "signal") -> None:
        """Drop what is cached for one client, in both environments."""
        for environment in vault.ENVIRONMENTS:
            self._entries.pop((client_id, environment), None)
            # A read already under way may predate the change: later callers read anew.
            self._reading.pop((client_id, environment), None)
        self._generations[client_id] = self._generations.get(client_id, 0) + 1
        self._notify(client_id, reason)

    def flush(self, *, reason: str = "flush") -> None:
        """Drop everything."""
        self._entries.clear()
        self._reading.clear()
        self._epoch += 1
        self._notify("*", reason)

    def _notify(self, client_id: str, reason: str) -> None:
        if self._on_invalidated is None:
            return
        try:
            self._on_invalidated(client_id, reason)
        except Exception:  # the application's hook must not break the listener
            log.exception("on_invalidated hook failed")

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        # Any role that can connect can NOTIFY on the channel, the cache reader
        # included: what a payload can cost is one named client's entry (re-read from
        # Postgres: harmless). An unreadable one, or one naming no single client
        # (`*`), is ignored (docs/decisions.md): the receiver never sends either.
        client_id = _notified_client(payload)
        if client_id is None:
            self._unreadable += 1
            now = time.monotonic()
            if now - self._unreadable_logged_at >= UNREADABLE_LOG_SECONDS:
                log.warning(
                    "unreadable invalidation signal ignored",
                    extra={"ignored": self._unreadable},
                )
                self._unreadable, self._unreadable_logged_at = 0, now
            return
        self.invalidate(client_id)
        log.info("invalidated", extra={"client_id": client_id, "via": "notify"})

    async def _listen_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await db.connect(self._dsn, primary=True)
            except errors.ReceiverError as exc:
                # Unavailable, or refused (a database, role or pg_hba an operator is
                # still setting up, as on a new primary after a failover): the
                # application runs on, so the listener keeps trying, never ends.
                if not isinstance(exc, errors.DatabaseUnavailable):
                    log.warning("listener refused: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY_SECONDS)
                continue
            try:
                await self._listen_on(conn)
                delay = 0.1
            except errors.ReceiverError:
                pass
            finally:
                self._listening.clear()
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
            log.warning("listener lost; reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _listen_on(self, conn: db.Connection) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        async with db.translated_errors():
            await conn.add_listener(self._channel, self._on_notify)
        # Anything announced while we were not listening is lost: start clean.
        self.flush(reason="reconnect")
        self._listening.set()
        log.info("listening on %s", self._channel)
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
        if not self._signal_secrets:
            raise errors.ConfigError("RECEIVER_CACHE_SECRET is required to accept HTTP signals")
        body = await request.read()
        try:
            payload = verify_signal(request.headers, body, self._signal_secrets)
        except errors.ReceiverError as exc:
            return web.json_response(exc.body(), status=exc.status)
        self.invalidate(payload["client_id"])
        log.info("invalidated", extra={"client_id": payload["client_id"], "via": "http"})
        return web.json_response({"status": "invalidated"})

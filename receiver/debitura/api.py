"""The Referral Partner API client: four calls on aiohttp's ClientSession.

Every request carries the partner's API key (`XApiKey`), so none follows a redirect
and none goes over plain HTTP except to a loopback host (checked in config). Answers
are size-capped. Connection errors, timeouts, 5xx and 429 are retried with
exponential backoff and jitter, honouring `Retry-After`, bounded in count and time;
rotate-token is the exception: it is not idempotent, so once it has left, a lost
answer is `errors.DebituraAnswerLost` and the caller resolves it with a fetch.

Neither the key nor a token is ever logged, put in an error message or a repr.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from pydantic import SecretStr

from receiver import config, errors, metrics, redaction
from receiver.lifecycle import events

log = structlog.get_logger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
RETRY_AFTER_CAP_SECONDS = 30.0
CALLS = ("fetch", "rotate", "revoke", "validate", "link", "list")
LIST_PATH = "/v1/referral-partners/clients"
# The most pages one listing reads: a cursor that never ends is Debitura's fault, and
# must not keep a reconcile run going for ever.
MAX_PAGES = 100_000


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One Debitura environment: where its API is and the key it takes."""

    environment: str
    base_url: str
    api_key: SecretStr = field(repr=False)


def endpoint(settings: config.Settings, environment: str) -> Endpoint:
    """The API of `environment` (live or test); `errors.ConfigError` naming the
    variable when it is not configured (the command exits 2)."""
    if environment == "test":
        url, key = settings.debitura_test_api_url, settings.debitura_test_api_key
        url_name, key_name = "RECEIVER_DEBITURA_TEST_API_URL", "RECEIVER_DEBITURA_TEST_API_KEY"
    else:
        url, key = settings.debitura_api_url, settings.debitura_api_key
        url_name, key_name = "RECEIVER_DEBITURA_API_URL", "RECEIVER_DEBITURA_API_KEY"
    if url is None:
        raise errors.ConfigError(f"{url_name} is required to manage {environment} tokens")
    if key is None:
        raise errors.ConfigError(f"{key_name} is required to manage {environment} tokens")
    return Endpoint(environment, url, key)


def configured(settings: config.Settings) -> list[str]:
    """The environments whose API is configured (URL and key)."""
    found = []
    for environment in ("live", "test"):
        try:
            endpoint(settings, environment)
        except errors.ConfigError:
            continue
        found.append(environment)
    return found


@dataclass(frozen=True, slots=True)
class Fetched:
    """A client's current token as Debitura holds it."""

    token: SecretStr = field(repr=False)
    issued_at: datetime | None
    status: str | None

    @property
    def prefix(self) -> str:
        """The token's public prefix."""
        return redaction.token_prefix(self.token.get_secret_value())


@dataclass(frozen=True, slots=True)
class Rotated:
    """rotate-token's answer: the new token, and until when the old one works."""

    token: SecretStr = field(repr=False)
    old_prefix: str | None
    old_expires_at: datetime | None

    @property
    def prefix(self) -> str:
        """The new token's public prefix."""
        return redaction.token_prefix(self.token.get_secret_value())


@dataclass(frozen=True, slots=True)
class Validation:
    """What validate-token says about a token."""

    valid: bool
    client_id: str | None = None
    scopes: list[str] | None = None
    status: str | None = None
    issued_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Linked:
    """The link call's answer: the new client, its token, and its status."""

    client_id: str
    token: SecretStr = field(repr=False)
    status: str | None = None
    issued_at: datetime | None = None

    @property
    def prefix(self) -> str:
        """The token's public prefix."""
        return redaction.token_prefix(self.token.get_secret_value())


@dataclass(frozen=True, slots=True)
class Listed:
    """One client in Debitura's list of the partner's clients."""

    client_id: str
    status: str | None


class Api:
    """The four calls, over one aiohttp session (the caller's, closed by the caller)."""

    def __init__(self, session: aiohttp.ClientSession, settings: config.Settings) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=settings.debitura_timeout_seconds)
        self._attempts = settings.debitura_max_attempts
        self._base = settings.debitura_retry_base_seconds
        self._budget = settings.debitura_retry_budget_seconds

    def __repr__(self) -> str:
        return "Api()"

    async def fetch(self, where: Endpoint, client_id: str) -> Fetched:
        """GET the client's current token."""
        answer = _object(
            await self._call(where, "fetch", "GET", _client_path(client_id, "token"), None),
            "fetch",
        )
        token = _token(answer, "bearer_token", "fetch", client_id)
        return Fetched(token, _moment(answer.get("issued_at")), _text(answer.get("status")))

    async def link(self, where: Endpoint, request: dict[str, Any]) -> Linked:
        """POST the partner's link request as it is. Not idempotent (a second call may
        link a second client): sent at most once, like rotate-token; a lost answer is
        `errors.DebituraAnswerLost`."""
        try:
            answer = _object(
                await self._call(where, "link", "POST", LIST_PATH, request, idempotent=False),
                "link",
            )
            client_id = _client_id(answer)
            if client_id is None:
                raise errors.DebituraBadAnswer("link: Debitura's answer has no usable client_id")  # noqa: TRY301
            token = _token(answer, "bearer_token", "link", client_id, where.environment)
        except errors.DebituraBadAnswer as exc:
            # A 2xx whose body cannot be used: a client may have been linked.
            raise errors.DebituraAnswerLost(f"{exc}; whether it took effect is unknown") from None
        return Linked(
            client_id, token, _text(answer.get("status")), _moment(answer.get("issued_at"))
        )

    async def clients(self, where: Endpoint) -> AsyncIterator[list[Listed]]:
        """Debitura's list of the partner's clients, a page at a time (`?cursor=` while
        the answer names a next one). The answer is a JSON array of clients, or an
        object whose `data` is one; a client is `client_id` (or `id`) and `status`.
        Entries without a usable id are skipped (and counted in the log)."""
        cursor: str | None = None
        # The last cursors, to tell a listing that loops from one that is long
        # (bounded: a cursor that never ends must not grow memory with it).
        recent: collections.deque[str] = collections.deque(maxlen=1000)
        for _ in range(MAX_PAGES):
            path = LIST_PATH if cursor is None else f"{LIST_PATH}?cursor={quote(cursor, safe='')}"
            answer = await self._call(where, "list", "GET", path, None)
            entries = answer.get("data") if isinstance(answer, dict) else answer
            if not isinstance(entries, list):
                raise errors.DebituraBadAnswer("list: the answer holds no list of clients")
            page, skipped = [], 0
            for entry in entries:
                listed = _listed(entry)
                if listed is None:
                    skipped += 1
                else:
                    page.append(listed)
            if skipped:
                log.warning("debitura_list_entries_skipped", count=skipped)
            yield page
            cursor = _next_cursor(answer)
            if cursor is None:
                return
            if cursor in recent:
                raise errors.DebituraBadAnswer("list: the answer's cursor repeats")
            recent.append(cursor)
        raise errors.DebituraBadAnswer(f"list: more than {MAX_PAGES} pages")

    async def rotate(
        self, where: Endpoint, client_id: str, reason: str, *, revoke_immediately: bool
    ) -> Rotated:
        """POST rotate-token. Sent at most once: see `errors.DebituraAnswerLost`."""
        try:
            answer = _object(
                await self._call(
                    where,
                    "rotate",
                    "POST",
                    _client_path(client_id, "rotate-token"),
                    {"reason": reason, "revoke_immediately": revoke_immediately},
                    idempotent=False,
                ),
                "rotate",
            )
            token = _token(answer, "new_bearer_token", "rotate", client_id)
        except errors.DebituraBadAnswer as exc:
            # A 2xx whose body cannot be used: Debitura did rotate, we cannot tell to
            # what. Settled like a lost answer, by a fetch, never as "nothing happened".
            raise errors.DebituraAnswerLost(f"{exc}; whether it took effect is unknown") from None
        if redaction.token_environment(token.get_secret_value()) != where.environment:
            # One world's API never changes the other's state: not a rotation.
            raise errors.DebituraNotARotation(
                f"rotate: Debitura's answer for client {client_id!r} holds a token of the "
                "other environment, which is not a rotation"
            )
        old = answer.get("old_bearer_token")
        old_expires_at = _moment(answer.get("old_token_expires_at"), future=True)
        old_prefix = redaction.token_prefix(old) if isinstance(old, str) else None
        return Rotated(token, old_prefix, old_expires_at)

    async def revoke(self, where: Endpoint, client_id: str, reason: str) -> None:
        """POST revoke-token. Repeating it is harmless (a revoked token stays revoked)."""
        await self._call(
            where, "revoke", "POST", _client_path(client_id, "revoke-token"), {"reason": reason}
        )

    async def validate(self, where: Endpoint, token: str) -> Validation:
        """POST validate-token. `{"valid": false}` and a 401 `invalid_token` both
        mean invalid; any other 401 is the API key refused (raised)."""
        try:
            answer = _object(
                await self._call(
                    where, "validate", "POST", "/v1/auth/validate-token", {"token": token}
                ),
                "validate",
            )
        except errors.DebituraTokenInvalid:
            return Validation(valid=False)
        scopes = answer.get("scopes")
        return Validation(
            valid=answer.get("valid") is True,
            client_id=_text(answer.get("client_id")),
            scopes=_texts(scopes) if isinstance(scopes, list) else None,
            status=_text(answer.get("status")),
            issued_at=_moment(answer.get("issued_at")),
        )

    async def _call(
        self,
        where: Endpoint,
        call: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        idempotent: bool = True,
    ) -> Any:
        started = time.monotonic()
        headers = {"XApiKey": where.api_key.get_secret_value(), "Accept": "application/json"}
        attempt = 0
        while True:
            attempt += 1
            delay: float | None = None
            try:
                async with self._session.request(
                    method,
                    where.base_url + path,
                    json=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=self._timeout,
                ) as response:
                    raw = await _read_capped(response.content)
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except aiohttp.ClientConnectorError as exc:
                # Not connected: the request never left, so any call may be tried again.
                fault = f"connection failed ({type(exc).__name__})"
            except (TimeoutError, aiohttp.ClientError) as exc:
                fault = f"no answer ({type(exc).__name__})"
                if not idempotent:
                    _count(call, "lost")
                    log.warning("debitura_answer_lost", call=call, error=type(exc).__name__)
                    raise errors.DebituraAnswerLost(
                        f"{call}: the request was sent but no answer came back ({fault})"
                    ) from None
            else:
                if len(raw) > MAX_ANSWER_BYTES:
                    _count(call, "refused")
                    kind = (
                        errors.DebituraBadAnswer if 200 <= status < 300 else errors.DebituraRefused
                    )
                    raise kind(f"{call}: answer larger than the cap")
                if 200 <= status < 300:
                    _count(call, "ok")
                    log.info("debitura_call", call=call, status=status, attempt=attempt)
                    return _json(raw, call)
                fault = f"HTTP {status}"
                if status == 429:
                    delay = _retry_after(retry_after)
                elif status >= 500:
                    if not idempotent:
                        _count(call, "lost")
                        log.warning("debitura_answer_lost", call=call, status=status)
                        raise errors.DebituraAnswerLost(
                            f"{call}: Debitura answered {status}; whether it took effect is unknown"
                        )
                else:
                    _count(call, str(status))
                    log.warning("debitura_call_refused", call=call, status=status)
                    raise _refusal(call, status, raw)
            elapsed = time.monotonic() - started
            pause = delay if delay is not None else _backoff(self._base, attempt)
            if attempt >= self._attempts or elapsed + pause > self._budget:
                _count(call, "gave_up")
                log.warning("debitura_call_failed", call=call, fault=fault, attempts=attempt)
                if fault == "HTTP 429":
                    raise errors.DebituraRateLimited(
                        f"{call}: Debitura is rate limiting (429) after {attempt} tries"
                    )
                raise errors.DebituraUnavailable(
                    f"{call}: Debitura unavailable ({fault}) after {attempt} tries"
                )
            _count(call, "retried")
            log.info("debitura_retry", call=call, fault=fault, attempt=attempt, pause=pause)
            await asyncio.sleep(pause)


async def _read_capped(content: aiohttp.StreamReader) -> bytes:
    """The answer's bytes, at most one past the cap (read() returns a chunk at a time)."""
    raw = bytearray()
    while len(raw) <= MAX_ANSWER_BYTES:
        chunk = await content.read(MAX_ANSWER_BYTES + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    return bytes(raw)


def _client_path(client_id: str, action: str) -> str:
    # The client id is one path segment whatever it holds.
    return f"/v1/referral-partners/clients/{quote(client_id, safe='')}/{action}"


def _count(call: str, outcome: str) -> None:
    metrics.DEBITURA_CALLS.labels(call=call, outcome=outcome).inc()


def _backoff(base: float, attempt: int) -> float:
    # Full jitter (AWS architecture blog): spreads replicas and clients apart.
    return float(base * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))  # noqa: S311 (jitter)


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value) if value is not None else 1.0
    except ValueError:
        seconds = 1.0
    if not math.isfinite(seconds):
        # NaN compares false with everything: it would slip past the retry budget.
        seconds = 1.0
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_SECONDS)


def _json(raw: bytes, call: str) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise errors.DebituraBadAnswer(f"{call}: the answer is not JSON") from None


def _object(value: Any, call: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.DebituraBadAnswer(f"{call}: the answer is not a JSON object")
    return value


def _client_id(entry: dict[str, Any]) -> str | None:
    """The client id an answer names (`client_id`, or `id` in a list), when it is an
    identifier as deliveries carry them and not token-shaped."""
    value = entry.get("client_id", entry.get("id"))
    if not isinstance(value, str) or not events.is_identifier(value):
        return None
    return None if _REDACTOR.changes(value) else value


def _listed(entry: Any) -> Listed | None:
    client_id = _client_id(entry) if isinstance(entry, dict) else None
    return None if client_id is None else Listed(client_id, _text(entry.get("status")))


def _next_cursor(answer: Any) -> str | None:
    if not isinstance(answer, dict):
        return None  # a bare array: everything at once
    for holder in (answer, answer.get("meta"), answer.get("pagination")):
        if isinstance(holder, dict):
            for name in ("next_cursor", "nextCursor"):
                value = holder.get(name)
                if isinstance(value, str) and value and len(value) <= 1000:
                    return value
    return None


def _moment(value: Any, *, future: bool = False) -> datetime | None:
    """An ISO 8601 time with its zone from Debitura's answer, in UTC; None when
    absent or unreadable. Unless `future`, never later than now (an issue time
    in the future would stop a token from ever being due)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    moment = moment.astimezone(UTC)
    return moment if future else min(moment, datetime.now(UTC))


def _refusal(call: str, status: int, raw: bytes) -> errors.DebituraError:
    try:
        document = json.loads(raw) if raw else {}
    except ValueError:
        document = {}
    error = document.get("error") if isinstance(document, dict) else None
    error = error if isinstance(error, dict) else {}
    code = _text(error.get("code"))
    if status == 401 and code == "invalid_token":
        return errors.DebituraTokenInvalid(f"{call}: Debitura says the token is invalid")
    if status == 401:
        return errors.DebituraAuthentication(
            f"{call}: Debitura refused the API key (401); check RECEIVER_DEBITURA_*API_KEY"
        )
    if status == 403:
        scope = _text(error.get("required_scope"))
        scopes = error.get("token_scopes")
        kept = _texts(scopes) if isinstance(scopes, list) else None
        return errors.DebituraPermission(
            f"{call}: Debitura refused permission (403, needs scope {scope or 'unknown'})",
            scope,
            kept,
        )
    if status == 404:
        return errors.DebituraNotFound(f"{call}: Debitura knows no such client (404)")
    if 300 <= status < 400:
        return errors.DebituraRefused(f"{call}: redirect ({status}) not followed")
    return errors.DebituraRefused(f"{call}: Debitura refused the request ({status})")


def _token(
    answer: dict[str, Any], name: str, call: str, client_id: str, environment: str | None = None
) -> SecretStr:
    value = answer.get(name)
    if (
        not isinstance(value, str)
        or redaction.token_problem(value) is not None
        or (environment is not None and redaction.token_environment(value) != environment)
    ):
        raise errors.DebituraBadAnswer(
            f"{call}: Debitura's answer for client {client_id!r} has no usable {name}"
        )
    return SecretStr(value)


_REDACTOR = redaction.Redactor()


def _texts(values: list[Any]) -> list[str]:
    # Scopes are stored and printed: masked like any of Debitura's free text.
    return [_text(v) or "" for v in values if isinstance(v, str)]


def _text(value: Any) -> str | None:
    # Debitura's free text is printed and stored: nothing token-shaped passes.
    # Masked before it is cut: a token cut at the boundary would keep more than its
    # public prefix.
    return _REDACTOR.text(value[:400])[:200] if isinstance(value, str) else None

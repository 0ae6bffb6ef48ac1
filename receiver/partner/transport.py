"""How the partner library talks to a token endpoint: `https://` only (loopback
excepted), never a redirect with a credential, answers read up to a cap and checked
against a pydantic model, network errors, 5xx and 429 retried with exponential
backoff and full jitter honouring a finite, capped `Retry-After`, bounded in count
and in time (Stripe's `max_network_retries`, with a deadline).

Every failure is a `failures.TokenError` whose message holds no body, header or
credential, raised outside the `except` that saw the cause, so no exception chain
keeps the driver's exception (whose request info holds the headers) or the body.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import pydantic

from receiver import endpoints
from receiver.partner import failures

DEFAULT_ANSWER_LIMIT_BYTES = 64 * 1024  # a token answer is a few hundred bytes
DEFAULT_TIMEOUT_SECONDS = 10.0
_CHUNK = 16 * 1024

M = TypeVar("M", bound=pydantic.BaseModel)


shown = endpoints.shown


def checked_url(url: str, *, what: str = "api_url") -> str:
    """`url` without a trailing slash, when a credential may travel to it
    (`endpoints.credential_problem`). Raises `InsecureURL` naming the URL without its
    credentials."""
    problem = endpoints.credential_problem(url)
    if problem is not None:
        raise failures.InsecureURL(f"{what} {shown(url)!r} refused: the API key {problem}")
    return url.rstrip("/")


def parse_retry_after(value: str | None, *, cap: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta seconds or an HTTP date):
    finite, at least 0, at most `cap`; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = (moment - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return cap if seconds > 0 else None
    return min(max(seconds, 0.0), cap)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of a token request: network errors, 5xx and 429, at most `max_retries`
    more attempts and never past `max_elapsed` seconds since the first (the attempt in
    flight included: its timeout is at most what is left of `max_elapsed`). A wait is
    full jitter, uniform in [0, min(cap, base·2^n)], or the server's Retry-After
    (capped at `retry_after_cap`) when that is longer. `sleep` is how it waits."""

    max_retries: int = 3
    max_elapsed: float = 30.0
    base: float = 0.5
    cap: float = 8.0
    retry_after_cap: float = 60.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def delay(self, retry: int, retry_after: float | None) -> float:
        """How long to wait before retry number `retry` (0-based)."""
        ceiling = min(self.cap, self.base * 2 ** min(retry, 32))
        jittered = random.uniform(0, ceiling)  # noqa: S311 - jitter, not cryptography
        return jittered if retry_after is None else max(jittered, retry_after)


@dataclass(frozen=True, slots=True)
class Answer:
    """A token endpoint's answer: status, its Retry-After (parsed) and the JSON
    document (None when the body was empty or not JSON)."""

    status: int
    retry_after: float | None
    document: Any


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None as soon as it would exceed `limit` bytes (the rest unread)."""
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _document(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else None
    except ValueError:  # JSONDecodeError keeps the body in `.doc`: dropped here
        return None


async def post_once(
    session: aiohttp.ClientSession,
    url: str,
    payload: Mapping[str, Any],
    *,
    key: str,
    headers: Mapping[str, str] | None = None,
    limit: int = DEFAULT_ANSWER_LIMIT_BYTES,
    request_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    retry_after_cap: float = 60.0,
) -> Answer:
    """One POST of a JSON payload, redirects refused, the answer read up to `limit`."""
    async with session.post(
        url,
        json=dict(payload),
        headers=dict(headers or {}),
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=request_timeout),
    ) as response:
        status = response.status
        retry_after = parse_retry_after(response.headers.get("Retry-After"), cap=retry_after_cap)
        body = None if 300 <= status < 400 else await _read_bounded(response, limit)
        if body is None:
            response.close()  # drop the connection: the rest is never read
    if 300 <= status < 400:
        raise failures.Redirected(
            f"POST {shown(url)} answered a redirect ({status}): not followed with a "
            "credential; configure the final https:// URL",
            key,
        )
    if body is None:
        raise failures.AnswerTooLarge(
            f"POST {shown(url)} answered more than {limit} bytes: not read", key
        )
    return Answer(status, retry_after, _document(body))


async def post(
    session: aiohttp.ClientSession,
    url: str,
    payload: Mapping[str, Any],
    *,
    key: str,
    policy: RetryPolicy,
    headers: Mapping[str, str] | None = None,
    limit: int = DEFAULT_ANSWER_LIMIT_BYTES,
    request_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    on_attempt: Callable[[], None] | None = None,
) -> Answer:
    """`post_once`, retried as `policy` says on network errors, 5xx and 429. Any other
    answer (2xx, 4xx) is returned for the caller to judge. Out of retries: a 429 is
    `RateLimited`, the rest `Unavailable`."""
    started = clock()
    retry = 0
    while True:
        if on_attempt is not None:
            on_attempt()
        answer: Answer | None = None
        failure = ""
        # The attempt in flight is bounded by what is left of `max_elapsed` too: a
        # slow-drip answer cannot carry the whole call past its deadline.
        left = policy.max_elapsed - (clock() - started)
        try:
            answer = await post_once(
                session, url, payload, key=key, headers=headers, limit=limit,
                request_timeout=min(request_timeout, max(left, 0.01)),
                retry_after_cap=policy.retry_after_cap,
            )  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = type(exc).__name__  # the class only: its text can quote the request
        if answer is not None and answer.status != 429 and answer.status < 500:
            return answer
        retry_after = answer.retry_after if answer is not None else None
        wait = policy.delay(retry, retry_after)
        if retry >= policy.max_retries or clock() - started + wait > policy.max_elapsed:
            break
        retry += 1
        await policy.sleep(wait)
    attempts = retry + 1
    if answer is not None and answer.status == 429:
        raise failures.RateLimited(
            f"POST {shown(url)} rate limited (429) after {attempts} attempt(s)",
            key,
            retry_after if retry_after is not None else wait,
        )
    status = answer.status if answer is not None else None
    raise failures.Unavailable(
        f"POST {shown(url)} failed after {attempts} attempt(s): "
        + (f"status {status}" if status is not None else failure),
        key,
        status,
    )


def validated(model: type[M], document: Any, *, key: str, what: str) -> M:
    """`document` as `model`, or `MalformedAnswer` naming the offending fields only
    (pydantic's own message quotes the input, which may be a token)."""
    problems: list[str] = []
    try:
        return model.model_validate(document)
    except pydantic.ValidationError as exc:
        problems = sorted(
            {".".join(str(p) for p in e["loc"]) or "(document)" for e in exc.errors()}
        )
    raise failures.MalformedAnswer(
        f"{what} answered an unexpected shape: {', '.join(problems)}", key
    )

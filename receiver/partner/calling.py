"""`call(key, request)`, the same for every token model: Debitura's rule for a 401
(one fresh token, exactly one more call; a second 401 means the link is invalid),
a 403 `permission_error` typed as `PermissionDenied`, a 429 as `RateLimited`.

`request(token)` is the application's own call and returns its own response object:
aiohttp's (`status`), httpx's or requests' (`status_code`), urllib's (`status`).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import pydantic

from receiver.partner import failures, transport

R = TypeVar("R")
RETRY_AFTER_DEFAULT_SECONDS = 1.0
RETRY_AFTER_CAP_SECONDS = 3600.0
# A scope as Debitura spells them (`cases.create`); anything else in a hostile 403
# body is dropped rather than carried into an exception message.
_SCOPE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


class Source(Protocol):
    """What `call` needs of a token model."""

    async def get(self, key: str) -> str: ...

    async def renew(self, key: str, refused: str) -> str:
        """A token fresher than `refused` (the same one when there is none); raises a
        `TokenError` when there can be none (revoked, unlinked)."""
        ...

    async def refused_twice(self, key: str, token: str) -> failures.TokenError:
        """Record that `token` was refused after a renewal; the error to raise."""
        ...


def status_of(response: Any) -> int:
    """The HTTP status of an application's response object, whatever its library."""
    status = getattr(response, "status", None)
    if not isinstance(status, int):
        status = getattr(response, "status_code", None)
    if not isinstance(status, int):
        raise TypeError("request(token) must return a response with .status or .status_code")
    return status


def _headers_of(response: Any) -> Mapping[str, str]:
    headers = getattr(response, "headers", None)
    return headers if headers is not None and hasattr(headers, "get") else {}


class _PermissionError(pydantic.BaseModel):
    type: str | None = None
    required_scope: str | None = None
    token_scopes: list[Any] = pydantic.Field(default_factory=list)


class _ErrorBody(pydantic.BaseModel):
    error: _PermissionError


def _scope(value: Any) -> str | None:
    return value if isinstance(value, str) and _SCOPE.match(value) else None


def permission_denied(key: str, document: Any) -> failures.PermissionDenied:
    """A 403's `PermissionDenied` from Debitura's `permission_error` body (fields
    that are not scope-shaped are left out)."""
    required: str | None = None
    scopes: list[str] = []
    try:
        error = _ErrorBody.model_validate(document).error
    except pydantic.ValidationError:
        error = None
    if error is not None:
        required = _scope(error.required_scope)
        scopes = [s for s in map(_scope, error.token_scopes) if s is not None]
    return failures.PermissionDenied(
        f"permission denied (403): requires scope {required or 'unknown'}; token has "
        f"{', '.join(scopes) or 'none'}",
        key,
        required,
        scopes,
    )


def rate_limited(key: str, response: Any) -> failures.RateLimited:
    """A 429's `RateLimited`, its Retry-After finite and capped."""
    retry_after = transport.parse_retry_after(
        _headers_of(response).get("Retry-After"), cap=RETRY_AFTER_CAP_SECONDS
    )
    return failures.RateLimited(
        "rate limited (429)",
        key,
        RETRY_AFTER_DEFAULT_SECONDS if retry_after is None else retry_after,
    )


async def _document_async(response: Any) -> Any:
    reader = getattr(response, "json", None)
    if not callable(reader):
        return None
    try:
        value = reader()
        return await value if inspect.isawaitable(value) else value
    except Exception:  # noqa: BLE001 - any library's decoding error: no body, no detail
        return None


def document_sync(response: Any) -> Any:
    """The JSON body of a synchronous library's response (requests, urllib), or None."""
    reader = getattr(response, "json", None)
    try:
        if callable(reader):
            return reader()
        read = getattr(response, "read", None)
        if callable(read):
            return json.loads(read(transport.DEFAULT_ANSWER_LIMIT_BYTES))
    except Exception:  # noqa: BLE001 - any library's decoding error: no body, no detail
        return None
    return None


def discard(response: Any) -> None:
    """Close a response the application will never see (a refused call replaced by
    its retry, or one turned into an exception), so its connection is not left to the
    garbage collector. Synchronous `close()` only (aiohttp, httpx, requests, urllib)."""
    close = getattr(response, "close", None)
    if not callable(close):
        return
    try:
        result = close()
    except Exception:  # noqa: BLE001 - closing is best effort; the call's outcome stands
        return
    if inspect.iscoroutine(result):
        result.close()  # an async-only close: never awaited here


async def _check(key: str, response: Any) -> int:
    status = status_of(response)
    if status == 429:
        discard(response)
        raise rate_limited(key, response)
    if status == 403:
        document = await _document_async(response)
        discard(response)
        raise permission_denied(key, document)
    return status


async def call(source: Source, key: str, request: Callable[[str], Awaitable[R]]) -> R:
    """`request(token)` with Debitura's 401 rule; 403 and 429 typed."""
    token = await source.get(key)
    response = await request(token)
    if await _check(key, response) != 401:
        return response
    discard(response)
    fresh = await source.renew(key, token)
    if fresh == token:
        raise await source.refused_twice(key, token)
    response = await request(fresh)
    if await _check(key, response) == 401:
        discard(response)
        raise await source.refused_twice(key, fresh)
    return response

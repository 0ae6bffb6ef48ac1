"""`RefreshingTokens`: providers that issue a short-lived access token with a refresh
token, as api.video does (`POST /auth/api-key {"apiKey"}` and `POST /auth/refresh
{"refreshToken"}`, both answering `{"token_type", "expires_in", "access_token",
"refresh_token"}`). The access token is renewed with the refresh token ahead of its
expiry or on a 401; a refused refresh falls back to a new grant with the API key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated

import aiohttp
import pydantic
from pydantic import SecretStr, StrictStr

from receiver.partner import expiring, failures, transport

log = logging.getLogger("receiver.partner")

_MAX_TOKEN_CHARS = 8192
_REFRESH_REFUSED = (400, 401, 403)
_Token = Annotated[StrictStr, pydantic.Field(min_length=1, max_length=_MAX_TOKEN_CHARS)]


def _bearer(value: str) -> str:
    if value.lower() != "bearer":
        raise ValueError("token_type must be Bearer")
    return value


class GrantAnswer(pydantic.BaseModel):
    """The 200 answer of both the grant and the refresh."""

    model_config = pydantic.ConfigDict(extra="ignore")

    token_type: Annotated[StrictStr, pydantic.AfterValidator(_bearer)]
    expires_in: Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
    access_token: _Token
    refresh_token: _Token


class RefreshingTokens(expiring.ExpiringTokens):
    """One API key's access token, kept fresh with its refresh token.

    The `key` of `get(key)` and `call(key, request)` only names the caller in errors:
    one API key has one access token.
    """

    def __init__(
        self,
        api_key: str | SecretStr,
        *,
        api_url: str,
        grant_path: str = "/auth/api-key",
        refresh_path: str = "/auth/refresh",
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        skew: float = expiring.DEFAULT_SKEW_SECONDS,
        refresh_ahead: float = expiring.DEFAULT_REFRESH_AHEAD_SECONDS,
        retry: transport.RetryPolicy | None = None,
        on_invalidated: expiring.Invalidated | None = None,
        answer_limit: int = transport.DEFAULT_ANSWER_LIMIT_BYTES,
    ) -> None:
        super().__init__(
            session=session,
            clock=clock,
            skew=skew,
            refresh_ahead=refresh_ahead,
            retry=retry or transport.RetryPolicy(),
            on_invalidated=on_invalidated,
        )
        base = transport.checked_url(api_url)
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._grant_url = base + "/" + grant_path.lstrip("/")
        self._refresh_url = base + "/" + refresh_path.lstrip("/")
        self._limit = answer_limit
        self.grants = 0  # POSTs to grant_path (observability)
        self.refreshes = 0  # POSTs to refresh_path

    def __repr__(self) -> str:
        return f"RefreshingTokens(api_url={transport.shown(self._grant_url)!r})"

    def _slot(self, key: str) -> str:
        return ""

    def _count_grant(self) -> None:
        self.grants += 1

    def _count_refresh(self) -> None:
        self.refreshes += 1

    async def _obtain(self, key: str, previous: expiring.Held | None) -> expiring.Held:
        if previous is not None and previous.refresh_token is not None:
            refreshed = await self._request(
                key,
                self._refresh_url,
                {"refreshToken": previous.refresh_token.get_secret_value()},
                self._count_refresh,
            )
            if refreshed is not None:
                return refreshed
            log.info("refresh token refused: a new grant with the API key")
        granted = await self._request(
            key, self._grant_url, {"apiKey": self._api_key.get_secret_value()}, self._count_grant
        )
        if granted is None:
            raise failures.ApiKeyRefused("the grant refused the API key: check it", key)
        return granted

    async def _request(
        self, key: str, url: str, payload: dict[str, str], count: Callable[[], None]
    ) -> expiring.Held | None:
        """The answer as a `Held`; None when the credential sent was refused."""
        issued = self._clock()
        answer = await transport.post(
            self._session_now(), url, payload, key=key, policy=self._retry,
            limit=self._limit, on_attempt=count,
        )  # fmt: skip
        if answer.status in _REFRESH_REFUSED:
            return None
        if answer.status != 200:
            raise failures.UnexpectedStatus(
                f"POST {transport.shown(url)} answered {answer.status}", key, answer.status
            )
        granted = transport.validated(
            GrantAnswer, answer.document, key=key, what=f"POST {transport.shown(url)}"
        )
        log.info("obtained an access token, valid %.0f s", granted.expires_in)
        return expiring.held(
            granted.access_token,
            granted.expires_in,
            issued=issued,
            skew=self._skew,
            refresh_ahead=self._refresh_ahead,
            refresh_token=granted.refresh_token,
        )

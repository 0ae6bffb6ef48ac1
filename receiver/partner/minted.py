"""`MintedTokens`: Debitura's Customer API JWTs, minted per `externalTenantId` with
`POST /oauth/token` and the partner's `XApiKey` (the referral-partner
authentication guide): 30-minute HS256 tokens, no refresh token, re-minted on expiry
or on a 401.
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

DEFAULT_API_URL = "https://referral-api.debitura.com"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path, not a password
_MAX_TOKEN_CHARS = 8192


def _bearer(value: str) -> str:
    if value.lower() != "bearer":
        raise ValueError("tokenType must be Bearer")
    return value


class MintAnswer(pydantic.BaseModel):
    """`POST /oauth/token`'s 200 answer, as the guide documents it."""

    model_config = pydantic.ConfigDict(extra="ignore")

    accessToken: Annotated[StrictStr, pydantic.Field(min_length=1, max_length=_MAX_TOKEN_CHARS)]
    tokenType: Annotated[StrictStr, pydantic.AfterValidator(_bearer)]
    expiresIn: Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
    externalTenantId: StrictStr | None = None
    creditorId: StrictStr | None = None


class MintedTokens(expiring.ExpiringTokens):
    """JWTs minted per `externalTenantId` with the partner's API key.

    `api_url` is the Referral Partner API of the environment in use (live, Debitura's
    sandbox, or `receiver sandbox` on loopback): `https://` unless the host is a
    loopback address. `clock` is monotonic seconds (injectable for tests); `retry`
    bounds the retries of the token endpoint.
    """

    def __init__(
        self,
        api_key: str | SecretStr,
        *,
        api_url: str = DEFAULT_API_URL,
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
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._url = transport.checked_url(api_url) + TOKEN_PATH
        self._limit = answer_limit
        self.mints = 0  # how many times POST /oauth/token was sent (observability)

    def __repr__(self) -> str:
        return f"MintedTokens(api_url={transport.shown(self._url)!r}, tenants={len(self._held)})"

    def creditor_id(self, tenant: str) -> str | None:
        """The `creditorId` of the tenant's current token (None before the first mint,
        or when Debitura sent none)."""
        current = self._held.get(tenant)
        return current.creditor_id if current is not None else None

    def _count(self) -> None:
        self.mints += 1

    async def _obtain(self, key: str, previous: expiring.Held | None) -> expiring.Held:
        issued = self._clock()
        answer = await transport.post(
            self._session_now(),
            self._url,
            {"externalTenantId": key},
            key=key,
            policy=self._retry,
            headers={"XApiKey": self._api_key.get_secret_value()},
            limit=self._limit,
            on_attempt=self._count,
        )
        if answer.status == 401:
            raise failures.ApiKeyRefused(
                "POST /oauth/token refused the API key (401): check XApiKey", key
            )
        if answer.status in (400, 403, 404):
            raise failures.TenantNotLinked(
                f"POST /oauth/token refused the tenant ({answer.status}): it is unknown "
                "or not linked to a creditor",
                key,
            )
        if answer.status != 200:
            raise failures.UnexpectedStatus(
                f"POST /oauth/token answered {answer.status}", key, answer.status
            )
        minted = transport.validated(MintAnswer, answer.document, key=key, what="POST /oauth/token")
        if minted.externalTenantId is not None and minted.externalTenantId != key:
            raise failures.MalformedAnswer(
                "POST /oauth/token answered a token for another tenant", key
            )
        log.info("minted a token for a tenant, valid %.0f s", minted.expiresIn)
        return expiring.held(
            minted.accessToken,
            minted.expiresIn,
            issued=issued,
            skew=self._skew,
            refresh_ahead=self._refresh_ahead,
            creditor_id=minted.creditorId,
        )

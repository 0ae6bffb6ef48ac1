"""Why the partner library could not give a token or finish a call: one root,
`TokenError`, and a class per thing the application may want to do differently.

Every message is built from constants, statuses, sizes and the caller's key (client
id or tenant): never a token, an API key, a refresh token or an answer's body, so a
message, a `repr` or a crash reporter walking the exception is safe to keep. No
exception here is raised with a cause or context that could hold an answer (the
library raises them outside `except` blocks, or `from None` of its own errors only).
"""

from __future__ import annotations

from collections.abc import Sequence


class TokenError(Exception):
    """Why no usable token could be given (or a call not finished) for a key."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, key={self.key!r})"


class InsecureURL(TokenError, ValueError):
    """A token endpoint that is not `https://` (loopback hosts excepted): the API key
    would cross the network in clear. Raised at construction."""


class NoToken(TokenError):
    """The client never had a token in this environment (not linked, or not yet)."""


class TokenRevoked(TokenError):
    """The client's newest token was revoked or has expired; none replaced it."""


class LinkInvalid(TokenError):
    """A fresh token was refused too: the client link itself is invalid (re-link it)."""


class MintRefused(TokenError):
    """The token endpoint refused to issue a token (see the two subclasses)."""


class ApiKeyRefused(MintRefused):
    """The token endpoint answered 401: the API key is wrong or revoked (configuration)."""


class TenantNotLinked(MintRefused, LinkInvalid):
    """The token endpoint accepted the API key but refused this tenant (400/403/404):
    the tenant is unknown or unlinked; a `LinkInvalid` too."""


class PermissionDenied(TokenError):
    """403 `permission_error`: the token is valid but lacks `required_scope`."""

    def __init__(
        self, message: str, key: str, required_scope: str | None, token_scopes: Sequence[str]
    ) -> None:
        super().__init__(message, key)
        self.required_scope = required_scope
        self.token_scopes = tuple(token_scopes)


class RateLimited(TokenError):
    """429: try again after `retry_after` seconds (finite, capped)."""

    def __init__(self, message: str, key: str, retry_after: float) -> None:
        super().__init__(message, key)
        self.retry_after = retry_after


class Unavailable(TokenError):
    """The token endpoint kept failing (network errors, timeouts, 5xx) through every
    retry; `status` is the last HTTP status, None for a network failure."""

    def __init__(self, message: str, key: str, status: int | None) -> None:
        super().__init__(message, key)
        self.status = status


class Redirected(TokenError):
    """The token endpoint answered a redirect: never followed with a credential."""


class AnswerTooLarge(TokenError):
    """The token endpoint's answer exceeded the size cap; the rest was not read."""


class MalformedAnswer(TokenError):
    """The token endpoint's answer was not the documented shape (not JSON, a missing
    or mistyped field, a non-finite or non-positive lifetime, a tokenType other than
    Bearer). The message names the fields, never their values."""


class UnexpectedStatus(TokenError):
    """The token endpoint answered a status the protocol does not define."""

    def __init__(self, message: str, key: str, status: int) -> None:
        super().__init__(message, key)
        self.status = status

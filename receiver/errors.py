"""The project's exceptions: one root, each subclass carrying its HTTP status and code.

Messages are written at the raise site and never contain request input: a token,
a secret or a raw body must not reach an error message (docs/design.md §3, guarantee 3).
"""

from __future__ import annotations

from typing import ClassVar


class ReceiverError(Exception):
    """Root of every error the receiver raises on purpose."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON error body, in the shape Debitura's own API uses."""
        return {"error": {"type": self.type, "code": self.code, "message": self.message}}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error needs."""
        return {}


class InvalidRequest(ReceiverError):
    """The body is not JSON, or the envelope or its data do not match the schema."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidSignature(ReceiverError):
    """The signature header is missing, malformed, wrong, or outside the time tolerance.

    `reason` is one of missing, malformed, stale, future, mismatch (a metrics label).
    """

    status = 401
    type = "authentication_error"
    code = "invalid_signature"

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class AdminUnauthorized(ReceiverError):
    """The admin API's `Authorization: Bearer` is missing or not one of
    RECEIVER_ADMIN_TOKENS."""

    status = 401
    type = "authentication_error"
    code = "invalid_admin_token"

    def headers(self) -> dict[str, str]:
        """RFC 6750: say which scheme is expected, nothing more."""
        return {"WWW-Authenticate": 'Bearer realm="receiver-admin"'}


class UpstreamFailed(ReceiverError):
    """Debitura refused or did not answer a call the admin API made for its caller;
    the message says which and what to do (it never holds a token)."""

    status = 502
    type = "api_error"
    code = "debitura_failed"


class NotFound(ReceiverError):
    """No route answers this path."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ReceiverError):
    """The path exists but not for this HTTP method."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ReceiverError):
    """The client took too long to send its body."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(ReceiverError):
    """The body is larger than `RECEIVER_MAX_BODY_BYTES`."""

    status = 413
    type = "invalid_request_error"
    code = "body_too_large"


class UnsupportedMediaType(ReceiverError):
    """The content type is not the route's: JSON (a webhook), a urlencoded form (the
    console's forms)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class DatabaseUnavailable(ReceiverError):
    """Postgres is unreachable or overloaded; the sender should retry later."""

    status = 503
    type = "api_error"
    code = "service_unavailable"
    retry_after_seconds: ClassVar[int] = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class Overloaded(DatabaseUnavailable):
    """More connections or requests than the receiver takes at once: retry shortly."""

    code = "overloaded"
    retry_after_seconds = 1


class InternalError(DatabaseUnavailable):
    """A fault of the receiver's own. Answered 503 with Retry-After, never 500: the
    sender retries, and nothing counts towards switching the subscription off."""

    code = "internal_error"


class LockBusy(DatabaseUnavailable):
    """A row or client lock was held past the lock timeout: that write waits on one
    client's rows, the database itself is fine (readiness does not fail for it)."""


class ShuttingDown(DatabaseUnavailable):
    """The process is draining before it stops; retry against another replica."""


class SchemaNotReady(DatabaseUnavailable):
    """The database is reachable but its schema is missing or behind: run `receiver migrate`."""


class DatabasePermission(DatabaseUnavailable):
    """The database role lacks a privilege: a setup mistake (the wrong role's URL, a
    schema not migrated by its owner), not an outage. A request gets 503 (the sender
    retries while an operator fixes it); a command says it in one line, exit 2.
    `denied` is Postgres's message, which names objects, never values."""

    def __init__(self, denied: str, role: str | None = None, *, connecting: bool = False) -> None:
        # A sender's 503 says no more than an outage's: roles and tables are ours.
        super().__init__("database is unavailable, retry later")
        self.denied = denied
        self.role = role
        self.connecting = connecting  # refused at login: no CONNECT on the database

    def __str__(self) -> str:
        who = f"role {self.role!r}" if self.role else "the role in RECEIVER_DATABASE_URL"
        if self.connecting:
            hint = (
                "it may not connect to this database: its owner grants that (GRANT CONNECT "
                "ON DATABASE … TO the role, or to receiver_runtime)"
            )
        elif "for database" in self.denied:
            hint = (
                "the database is not migrated and this role may not create its schema: run "
                "`receiver migrate` first, as the role that owns the database"
            )
        elif "must be owner" in self.denied:
            hint = (
                "`receiver migrate` runs as the role that owns the schema (the one that created it)"
            )
        else:
            hint = (
                "serve, dispatch and the commands need a login granted receiver_runtime, "
                "`receiver migrate` the database's owner (is this the cache reader's URL? "
                'README "Roles")'
            )
        return f"{who} lacks a privilege ({self.denied}): {hint}"


class DatabaseRefused(DatabaseUnavailable):
    """Postgres refused the connection for want of a role, a database or a password:
    503 for a request, one line and exit 2 for a command. `reason` is Postgres's
    message, which names the role or database, never a password."""

    def __init__(self, reason: str) -> None:
        super().__init__("database is unavailable, retry later")  # a sender's 503
        self.reason = reason

    def __str__(self) -> str:
        return f"RECEIVER_DATABASE_URL: Postgres refused the connection: {self.reason}"


class UnstorableValue(ReceiverError):
    """Postgres refused a value of the delivery (a data or check error). The webhook
    stores the delivery quarantined instead; the message names the SQLSTATE only."""

    status = 400
    type = "invalid_request_error"
    code = "unstorable_value"


class UsageError(ReceiverError):
    """A command was given input it cannot use (a file, an argument); says what to fix."""


class ConfigError(ReceiverError):
    """A setting is missing or malformed; the message names the variable, never its value."""


class KeyNotFound(ReceiverError):
    """A sealed value names a key id that is not in the keyring."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"sealed value needs key id {key_id!r}, which is not in RECEIVER_TOKEN_KEYS"
        )
        self.key_id = key_id


class SealBroken(ReceiverError):
    """A sealed value failed to open: tampered, truncated, or moved to another row."""


class ListenError(ReceiverError):
    """The service cannot listen where it was told to (a port in use)."""


class MigrationError(ReceiverError):
    """The schema cannot be brought up to date."""


class DebituraError(ReceiverError):
    """A call to Debitura's Referral Partner API failed. Messages name the call, the
    client and the HTTP status or fault, never a token or the API key."""


class DebituraAuthentication(DebituraError):
    """Debitura refused the API key (401 other than `invalid_token`)."""


class DebituraTokenInvalid(DebituraError):
    """Debitura says the token itself is invalid (401 with code `invalid_token`)."""


class DebituraPermission(DebituraError):
    """403 `permission_error`: the key or token lacks a scope (both kept, as Debitura
    gave them)."""

    def __init__(
        self, message: str, required_scope: str | None, token_scopes: list[str] | None
    ) -> None:
        super().__init__(message)
        self.required_scope = required_scope
        self.token_scopes = token_scopes


class DebituraNotFound(DebituraError):
    """404: Debitura knows no such client (or token)."""


class DebituraRateLimited(DebituraError):
    """429 after every allowed retry."""


class DebituraUnavailable(DebituraError):
    """5xx, a timeout or a connection failure after every allowed retry."""


class DebituraAnswerLost(DebituraUnavailable):
    """A call that is not idempotent (rotate-token) left, and no answer came back
    (timeout, reset, 5xx): whether it took effect is unknown, and it is never re-sent;
    a fetch resolves it."""


class DebituraNotARotation(DebituraAnswerLost):
    """rotate-token answered with a token of the other environment: not a rotation of
    this client's token, though Debitura may have rotated it (a fetch settles that)."""


class DebituraRefused(DebituraError):
    """Any other 4xx, or an answer that is not what the API documents."""


class DebituraBadAnswer(DebituraRefused):
    """A 2xx whose body cannot be used (too large, not JSON, no usable token): the call
    took effect at Debitura, and what it did is unknown from here."""


class Forbidden(ReceiverError):
    """A console form posted without its CSRF token, or without a session: refused,
    nothing changed."""

    status = 403
    type = "invalid_request_error"
    code = "forbidden"

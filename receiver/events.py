"""Debitura's webhook envelope and the data of the events we act on (DESIGN §2).

Parsing never echoes input: validation errors are reported by field location and
rule only, and a bearer token lives in a `SecretStr` from the moment it is parsed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
)

from receiver import errors, redaction

ONBOARDING_COMPLETED = "client.onboarding_completed"
# Debitura's default rotation grace period: the replaced token stays valid 24 hours.
ROTATION_GRACE = timedelta(hours=24)
TOKEN_REVOKED = "token.revoked"  # noqa: S105 - an event name, not a credential

_TOKEN = re.compile(r"^tok_(live|test)_[A-Za-z0-9]{12,200}$")
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")]
TokenPrefix = Annotated[str, StringConstraints(pattern=r"^tok_(live|test)_[A-Za-z0-9]{6}$")]
ShortText = Annotated[str, StringConstraints(max_length=200)]


def _check_token(value: SecretStr) -> SecretStr:
    if not _TOKEN.match(value.get_secret_value()):
        # The message states the rule; the value is never repeated.
        raise ValueError("must be tok_live_ or tok_test_ followed by 12-200 letters or digits")
    return value


BearerToken = Annotated[SecretStr, AfterValidator(_check_token)]


def _as_utc(value: datetime) -> datetime:
    # Debitura's timestamps are UTC; a naive one is read as UTC rather than rejected.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]


# Unknown fields are kept in the stored document (sealed, and in the redacted copy),
# not in the models: a model's repr must never carry a value we did not vet.
class Envelope(BaseModel):
    """The outer JSON object of every Debitura webhook."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    id: Identifier | None = None
    spec_version: ShortText | None = Field(default=None, alias="specVersion")
    # A name like client.onboarding_completed; unknown names are recorded as ignored.
    event: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:\-]{1,100}$")]
    timestamp: Timestamp | None = None
    data: dict[str, Any] = Field(default_factory=dict, repr=False)


class OnboardingCompleted(BaseModel):
    """`client.onboarding_completed`: a client's bearer token is issued."""

    model_config = ConfigDict(extra="ignore")

    client_id: Identifier
    bearer_token: BearerToken
    onboarding_completed_at: Timestamp
    # From Debitura's rotate-token flow: until when the token this one replaces stays
    # valid. Absent, Debitura's documented default grace period applies.
    old_token_expires_at: Timestamp | None = None


class TokenRevoked(BaseModel):
    """`token.revoked`: one token (by prefix), or every token of the client, is revoked."""

    model_config = ConfigDict(extra="ignore")

    client_id: Identifier
    token_prefix: TokenPrefix | None = None
    revoked_at: Timestamp | None = None
    reason: ShortText | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A parsed, not yet stored, webhook delivery."""

    key: str
    type: str
    envelope: Envelope
    data: OnboardingCompleted | TokenRevoked | None
    document: dict[str, Any] = field(repr=False)

    @property
    def client_id(self) -> str | None:
        """The client the event is about, when it names one we understand."""
        return self.data.client_id if self.data is not None else None


def event_key(envelope_id: str | None, body: bytes) -> str:
    """The idempotency key: the envelope's id, else a hash of the raw body."""
    if envelope_id:
        return envelope_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


def parse(body: bytes) -> Event:
    """Parse and validate a raw webhook body (already signature-checked)."""
    document = _load_json(body)
    if not isinstance(document, dict):
        raise errors.InvalidRequest("body must be a JSON object")
    envelope = _validate(Envelope, document, "")
    data: OnboardingCompleted | TokenRevoked | None = None
    if envelope.event == ONBOARDING_COMPLETED:
        data = _validate(OnboardingCompleted, envelope.data, "data.")
    elif envelope.event == TOKEN_REVOKED:
        data = _validate(TokenRevoked, envelope.data, "data.")
    return Event(
        key=event_key(envelope.id, body),
        type=envelope.event,
        envelope=envelope,
        data=data,
        document=document,
    )


def _load_json(body: bytes) -> Any:
    try:
        # Strictly UTF-8 (RFC 8259): json.loads(bytes) would also guess UTF-16/32.
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise errors.InvalidRequest("body is not valid UTF-8 JSON") from None
    except RecursionError:
        raise errors.InvalidRequest("body is nested too deeply") from None


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], document: Any, prefix: str) -> M:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise errors.InvalidRequest(_describe(exc, prefix)) from None


def _describe(exc: ValidationError, prefix: str) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        field = prefix + ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{field}: {error['msg']}")
    return "invalid event: " + "; ".join(problems)


def redacted_document(event: Event) -> dict[str, Any]:
    """The event as operators may read it: every token cut to its prefix.

    Postgres `jsonb` cannot hold NUL characters, so they are replaced here; the
    exact original stays available in the sealed body.
    """
    cleaned: dict[str, Any] = _strip_nul(_REDACTOR.value(event.document))
    return cleaned


_REDACTOR = redaction.Redactor()


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


Outcome = Literal["processed", "duplicate", "ignored"]

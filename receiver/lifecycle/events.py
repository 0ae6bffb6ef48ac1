"""Debitura's webhook envelope, and how a verified delivery reads (docs/design.md §2).

`read` never raises: a delivery whose signature verified is authentic, and refusing
it would make Debitura retry and then switch the subscription off. Whatever it holds
comes back as an `Event`, either applicable or quarantined with a machine-readable
reason and a detail that names a field path and an error kind, never a value.
"""

from __future__ import annotations

import hashlib
import json
import math
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

from receiver import redaction

ONBOARDING_COMPLETED = "client.onboarding_completed"
TOKEN_REVOKED = "token.revoked"  # noqa: S105 - an event name, not a credential
# Debitura's default rotation grace period: the replaced token stays valid 24 hours.
ROTATION_GRACE = timedelta(hours=24)
_KNOWN_TYPES = frozenset({ONBOARDING_COMPLETED, TOKEN_REVOKED})
KNOWN_TYPES = tuple(sorted(_KNOWN_TYPES))


def type_label(name: str) -> str:
    """The metric label for an event type: known types by name, anything else `other`
    (labels come from a fixed set, never from input)."""
    return name if name in _KNOWN_TYPES else "other"


Environment = Literal["live", "test"]
Outcome = Literal["processed", "duplicate", "ignored", "quarantined"]
OUTCOMES: tuple[str, ...] = Outcome.__args__  # type: ignore[attr-defined]
QuarantineReason = Literal[
    "invalid_json",
    "not_an_object",
    "invalid_data",
    "unstorable_value",
    "id_conflict",
    "test_delivery_targets_live",
    "token_outside_bearer_token",
]
QUARANTINE_REASONS: tuple[QuarantineReason, ...] = QuarantineReason.__args__  # type: ignore[attr-defined]

_IDENTIFIER = r"^[A-Za-z0-9_.:\-]{1,128}$"
Identifier = Annotated[str, StringConstraints(pattern=_IDENTIFIER)]
# A revocation's prefix of any length from `tok_live_` + 3 characters (design.md §2: a
# revocation fails safe; 15, as in Debitura's example, is the length we store).
MIN_PREFIX_LENGTH = 12


def _public_part(prefix: str) -> str:
    # A prefix long enough to be a whole token (up to the token itself) is a secret:
    # it is applied as its public prefix, so that no more than that is ever stored,
    # signalled or logged. Fail safe: it revokes every token of the client and
    # environment that starts with those characters (two tokens of one client sharing
    # their first 15 characters is as unlikely as a guessed token), never fewer.
    return redaction.token_prefix(prefix) if redaction.holds_token(prefix) else prefix


TokenPrefix = Annotated[
    str,
    StringConstraints(pattern=rf"^tok_(live|test)_[A-Za-z0-9_-]{{{MIN_PREFIX_LENGTH - 9},200}}$"),
    AfterValidator(_public_part),
]
ShortText = Annotated[str, StringConstraints(max_length=200)]
# Past this many digits Python refuses to convert an integer (int_max_str_digits).
_MAX_INT_DIGITS = 4000
# The redacted copy keeps this much nesting; deeper values are masked whole.
_MAX_DEPTH = 32


def _check_token(value: SecretStr) -> SecretStr:
    problem = redaction.token_problem(value.get_secret_value())
    if problem is not None:
        # The message states the rule; the value is never repeated.
        raise ValueError(problem)
    return value


BearerToken = Annotated[SecretStr, AfterValidator(_check_token)]


def _as_utc(value: datetime) -> datetime:
    # Debitura's timestamps are UTC; a naive one is read as UTC rather than rejected.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise ValueError("is out of the supported date range") from None


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

    @property
    def environment(self) -> Environment:
        """The token's own environment: `tok_live_…` or `tok_test_…`."""
        return "live" if self.bearer_token.get_secret_value()[4:8] == "live" else "test"


class TokenRevocation(BaseModel):
    """`token.revoked`: the tokens that start with a prefix, or every token of the
    client, are revoked. (Not `TokenRevoked`: that is the partner library's error.)"""

    model_config = ConfigDict(extra="ignore")

    client_id: Identifier
    token_prefix: TokenPrefix | None = None
    revoked_at: Timestamp | None = None
    reason: ShortText | None = None


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Why a delivery cannot be applied: a reason code and a value-free detail."""

    reason: QuarantineReason
    detail: str


@dataclass(frozen=True, slots=True)
class Event:
    """A verified delivery as read: applicable (`data`, or an ignored type) or
    quarantined. `document` is the copy operators may read: tokens cut to their
    prefix, and values Postgres cannot store replaced (None when not JSON)."""

    key: str
    envelope_id: str | None
    type: str
    is_test: bool
    body_hash: bytes
    occurred_at: datetime | None = None
    data: OnboardingCompleted | TokenRevocation | None = None
    environment: Environment | None = None
    quarantine: Quarantine | None = None
    document: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def client_id(self) -> str | None:
        """The client the event is about, when it names one we understand."""
        return self.data.client_id if self.data is not None else None

    @property
    def named_client_id(self) -> str | None:
        """The client id the body names, even when it is quarantined (for log lines):
        only a string shaped like an identifier, never other input."""
        if self.data is not None:
            return self.data.client_id
        data = (self.document or {}).get("data")
        named = data.get("client_id") if isinstance(data, dict) else None
        return named if isinstance(named, str) and re.fullmatch(_IDENTIFIER, named) else None

    @property
    def public_id(self) -> str:
        """The id answered to the sender: the envelope id if readable, else the key."""
        return self.envelope_id or self.key


def body_key(body_hash: bytes) -> str:
    """The SHA-256 name of a body: what its sealed copy is bound to, and the
    idempotency key (`event_key`) of a delivery without a usable id."""
    return "sha256:" + body_hash.hex()


# The test world's idempotency keys carry this prefix (design.md §2: `id` is the
# idempotency key within its environment), so that a test delivery can never shadow,
# block or quarantine a live one with the same id. Live keys are the id itself, as
# they always were. (Test deliveries stored before this prefix keep their keys.)
TEST_KEY_PREFIX = "test/"


def event_key(envelope_id: str | None, body_hash: bytes, *, is_test: bool) -> str:
    """A delivery's idempotency key in its environment: its id, else its body's
    SHA-256; a test delivery's under `test/` (`/` is in no id, so no live id can
    take a test delivery's key)."""
    key = envelope_id or body_key(body_hash)
    return TEST_KEY_PREFIX + key if is_test else key


def read(body: bytes, *, is_test: bool) -> Event:
    """Read a verified body: never raises, whatever it holds.

    Checks, first failure wins: JSON, an object, no token outside where one belongs
    (an onboarding's `data.bearer_token`, a revocation's `data.token_prefix`),
    storable values, the schema of known events, and a test delivery that would
    touch live state.
    """
    body_hash = hashlib.sha256(body).digest()

    def quarantined(
        reason: QuarantineReason, detail: str, document: dict[str, Any] | None = None, **known: Any
    ) -> Event:
        envelope_id = known.pop("envelope_id", None)
        return Event(
            key=event_key(envelope_id, body_hash, is_test=is_test),
            envelope_id=envelope_id,
            type=known.pop("type", "unknown"),
            is_test=is_test,
            body_hash=body_hash,
            quarantine=Quarantine(reason, detail),
            document=document,
            **known,
        )

    loaded = _load_json(body)
    if isinstance(loaded, Quarantine):
        return quarantined(loaded.reason, loaded.detail)
    if not isinstance(loaded, dict):
        return quarantined("not_an_object", f"body: a JSON {_json_kind(loaded)}, not an object")

    event_name = loaded.get("event")
    # Where a (partial) token belongs: an onboarding's token, a revocation's prefix (as
    # long as a whole token, at most: design.md §2).
    token_path = _TOKEN_PATHS.get(event_name) if isinstance(event_name, str) else None
    inspection = _Inspection(token_path, escapes=b"\\u" in body)
    document = inspection.copy(loaded)
    known: dict[str, Any] = {"document": document}
    # The id and type name the stored row, so they are kept only when plain and clean.
    raw_id = loaded.get("id")
    if isinstance(raw_id, str) and is_identifier(raw_id) and ("id",) not in inspection.token_paths:
        known["envelope_id"] = raw_id
    if (
        isinstance(event_name, str)
        and is_identifier(event_name)
        and len(event_name) <= 100
        and ("event",) not in inspection.token_paths
    ):
        known["type"] = event_name

    if inspection.token_paths:
        paths = ", ".join(_path(p) for p in inspection.token_paths[:5])
        return quarantined("token_outside_bearer_token", f"{paths}: token-shaped value", **known)
    if inspection.unstorable:
        path, kind = inspection.unstorable[0]
        return quarantined("unstorable_value", f"{_path(path)}: {kind}", **known)

    envelope = _validate(Envelope, loaded, ())
    if isinstance(envelope, Quarantine):
        return quarantined(envelope.reason, envelope.detail, **known)
    known["envelope_id"] = envelope.id
    known["type"] = envelope.event
    known["occurred_at"] = envelope.timestamp
    data: OnboardingCompleted | TokenRevocation | Quarantine | None = None
    environment: Environment | None = None
    if envelope.event == ONBOARDING_COMPLETED:
        data = _validate(OnboardingCompleted, envelope.data, ("data",))
        if isinstance(data, OnboardingCompleted):
            environment = data.environment
    elif envelope.event == TOKEN_REVOKED:
        data = _validate(TokenRevocation, envelope.data, ("data",))
        if isinstance(data, TokenRevocation):
            prefix = data.token_prefix
            environment = ("live" if prefix[4:8] == "live" else "test") if prefix else None
            environment = environment or ("test" if is_test else "live")
    if isinstance(data, Quarantine):
        return quarantined(data.reason, data.detail, **known)
    if is_test and environment == "live":
        field_name = "bearer_token" if envelope.event == ONBOARDING_COMPLETED else "token_prefix"
        return quarantined(
            "test_delivery_targets_live",
            f"data.{field_name}: a live token in a test delivery",
            **known,
        )
    return Event(
        key=event_key(envelope.id, body_hash, is_test=is_test),
        is_test=is_test,
        body_hash=body_hash,
        data=data,
        environment=environment,
        **known,
    )


_TOKEN_PATHS: dict[str, Path] = {
    ONBOARDING_COMPLETED: ("data", "bearer_token"),
    TOKEN_REVOKED: ("data", "token_prefix"),
}


def is_identifier(value: str) -> bool:
    """Whether `value` is an identifier as deliveries carry them (a client id)."""
    # fullmatch: Python's `$` would also match before a trailing newline.
    return _IDENTIFIER_RE.fullmatch(value) is not None


# An identifier's characters and length, unanchored (lifecycle/naming.py finds them
# between quotes).
IDENTIFIER_BODY = _IDENTIFIER.strip("^$")
_IDENTIFIER_RE = re.compile(IDENTIFIER_BODY)


class _TooLong:
    """An integer literal too long to convert: kept out of the document, reported."""

    __slots__ = ()


def _int(text: str) -> int | _TooLong:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _TooLong()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_int=_int, parse_constant=_no_constant)


def _load_json(body: bytes) -> Any:
    try:
        # Strictly UTF-8 (RFC 8259): json.loads(bytes) would also guess UTF-16/32.
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return Quarantine("invalid_json", "body: not UTF-8")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        return Quarantine("invalid_json", "body: nested too deeply")
    except ValueError as exc:  # JSONDecodeError included; its message quotes no input
        if isinstance(exc, json.JSONDecodeError):
            return Quarantine("invalid_json", f"body: {exc.msg} at character {exc.pos}")
        return Quarantine("invalid_json", "body: NaN or Infinity is not JSON")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number"


Path = tuple[str | int, ...]


class _Inspection:
    """One pass over a parsed document: the copy operators may read, the paths of
    token-shaped values outside `allowed`, and values Postgres cannot store (NUL,
    unpaired surrogates, non-finite numbers, over-long integers)."""

    def __init__(self, allowed: Path | None, *, escapes: bool) -> None:
        self.allowed = allowed
        # A body decoded as strict UTF-8 holds a NUL or an unpaired surrogate only
        # through a JSON \u escape: without one, those checks are skipped (they were
        # most of this pass's cost on the request path).
        self.escapes = escapes
        self.token_paths: list[Path] = []
        self.unstorable: list[tuple[Path, str]] = []

    def copy(self, document: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._value(document, ())
        return result

    def _value(self, value: Any, path: Path) -> Any:
        if isinstance(value, str):
            return self._text(value, path)
        if isinstance(value, _TooLong):
            self.unstorable.append((path, "integer with more than 4000 digits"))
            return redaction.MASK
        if isinstance(value, float) and not math.isfinite(value):
            self.unstorable.append((path, "number out of range"))
            return redaction.MASK
        if len(path) > _MAX_DEPTH:
            self._scan_deep(value, path)
            return redaction.MASK
        if isinstance(value, dict):
            copied: dict[str, Any] = {}
            for key, item in value.items():
                child = (*path, key)
                safe_key = self._text(key, child)
                if redaction.is_sensitive_key(key):
                    # Walked for what it holds (a token, a value Postgres cannot
                    # store), but shown as the one rule shows a secret: masked whole,
                    # `data.bearer_token` included, whatever its length or shape.
                    self._value(item, child)
                    copied[safe_key] = _REDACTOR.sensitive(item)
                else:
                    copied[safe_key] = self._value(item, child)
            return copied
        if isinstance(value, list):
            return [self._value(item, (*path, i)) for i, item in enumerate(value)]
        return value

    def _text(self, value: str, path: Path) -> str:
        if path != self.allowed and redaction.holds_token(value):
            self.token_paths.append(path)
        if self.escapes:
            if "\x00" in value:
                self.unstorable.append((path, "NUL character"))
                value = value.replace("\x00", "\ufffd")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                self.unstorable.append((path, "unpaired surrogate"))
                value = value.encode("utf-8", "replace").decode("utf-8")
        return _REDACTOR.text(value)

    def _scan_deep(self, value: Any, path: Path) -> None:
        # Past the depth the copy keeps, only tokens still matter (the copy masks the
        # rest); iterative, so a document as deep as the parser allows cannot recurse.
        stack: list[Any] = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str) and redaction.holds_token(item):
                self.token_paths.append(path)
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)


_REDACTOR = redaction.Redactor()
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_]{1,40}$")


def _path(path: Path) -> str:
    """A field path for a detail line: plain names and indexes; a token-shaped key
    shows as `[REDACTED]` (it is stored and printed), any other key (it is input, and
    could be anything) as `?`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif redaction.TOKEN_PATTERN.search(redaction.unescape(part)):
            out += ("." if out else "") + redaction.MASK
        else:
            out += ("." if out else "") + (part if _SAFE_SEGMENT.fullmatch(part) else "?")
    return out or "body"


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], document: Any, prefix: Path) -> M | Quarantine:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False, include_context=False)[:5]:
            problems.append(f"{_path((*prefix, *error['loc']))}: {error['type']}")
        return Quarantine("invalid_data", "; ".join(problems))

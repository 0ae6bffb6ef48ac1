"""Reading a verified delivery: never raises, quarantines with a reason and a detail
that names a field and an error kind, never a value."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from receiver.lifecycle import events
from tests import helpers


def read(document: Any, *, is_test: bool = False) -> events.Event:
    """Read a document (or raw bytes) as a live or test delivery."""
    body = document if isinstance(document, bytes) else helpers.encode(document)
    return events.read(body, is_test=is_test)


def test_onboarding_reads_and_hides_the_token() -> None:
    """A valid onboarding yields its client, its environment, and a masked token."""
    document = helpers.onboarding("cli_abc123")
    event = read(document)
    assert event.quarantine is None
    assert isinstance(event.data, events.OnboardingCompleted)
    assert event.data.client_id == "cli_abc123"
    assert event.environment == "live"
    assert event.key == document["id"]
    assert document["data"]["bearer_token"] not in repr(event)


def test_missing_id_keys_on_the_body_hash() -> None:
    """Without an id, the idempotency key is the SHA-256 of the raw body."""
    body = helpers.encode(helpers.onboarding(event_id=None))
    event = read(body)
    assert event.key == "sha256:" + hashlib.sha256(body).hexdigest() == event.public_id


def test_unknown_fields_are_kept_in_the_document() -> None:
    """Extra fields are not rejected, and stay in the stored document."""
    document = helpers.onboarding()
    document["extra"] = {"nested": [1, 2]}
    event = read(document)
    assert event.quarantine is None
    assert event.document is not None
    assert event.document["extra"] == {"nested": [1, 2]}


def test_debitura_example_token_with_underscores_is_accepted() -> None:
    """Debitura's own rotation example, `tok_live_new_token_456`, is a valid token, and
    its prefix is its first 15 characters."""
    event = read(helpers.onboarding(token="tok_live_new_token_456"))
    assert event.quarantine is None
    assert event.document is not None
    assert "token_456" not in json.dumps(event.document)


BAD_BODIES: list[tuple[bytes, str, str]] = [
    (b"not json", "invalid_json", "body: Expecting value"),
    (b"\xff\xfe", "invalid_json", "body: not UTF-8"),
    (b'{"a": NaN}', "invalid_json", "NaN or Infinity"),
    (b"[" * 100_000, "invalid_json", "nested too deeply"),
    (json.dumps({"e": "\u0000"}).encode("utf-16"), "invalid_json", "not UTF-8"),
    (b"[1, 2]", "not_an_object", "a JSON array"),
    (b'"tok"', "not_an_object", "a JSON string"),
    (b'{"data": {}}', "invalid_data", "event: missing"),
    (b'{"event": "client.onboarding_completed", "data": {}}', "invalid_data", "data.client_id"),
    (b'{"event": "x", "data": {"n": 1e400}}', "unstorable_value", "data.n: number out of range"),
    (b'{"event": "x", "big": ' + b"9" * 5000 + b"}", "unstorable_value", "big: integer"),
    (b'{"event": "x", "r": "a\\u0000b"}', "unstorable_value", "r: NUL character"),
    (b'{"event": "x", "r": "\\ud800"}', "unstorable_value", "r: unpaired surrogate"),
]


@pytest.mark.parametrize(("body", "reason", "detail"), BAD_BODIES)
def test_bad_bodies_are_quarantined_with_a_reason(body: bytes, reason: str, detail: str) -> None:
    """Each malformed body reads as quarantined, with its reason and a detail."""
    event = read(body)
    assert event.quarantine is not None
    assert event.quarantine.reason == reason
    assert detail in event.quarantine.detail
    assert event.key == "sha256:" + hashlib.sha256(body).hexdigest()


def test_invalid_data_keeps_the_envelope_id_as_key() -> None:
    """A readable id stays the key of a quarantined delivery (so a resend deduplicates)."""
    document = helpers.onboarding()
    del document["data"]["onboarding_completed_at"]
    event = read(document)
    assert event.quarantine == events.Quarantine(
        "invalid_data", "data.onboarding_completed_at: missing"
    )
    assert event.key == document["id"]


@pytest.mark.parametrize(
    "bad", ["tok_live_short", "tok_prod_" + "a" * 20, "tok_live_" + "a!b" * 10]
)
def test_malformed_token_is_quarantined_without_echo(bad: str) -> None:
    """A token of the wrong shape is invalid_data whose detail does not repeat it."""
    event = read(helpers.onboarding(token=bad))
    assert event.quarantine is not None
    assert event.quarantine.reason == "invalid_data"
    assert event.quarantine.detail.startswith("data.bearer_token")
    assert bad not in event.quarantine.detail


def test_date_before_year_one_in_utc_is_invalid_data() -> None:
    """0001-01-01T00:00:00+14:00 is before year 1 in UTC: invalid_data, not a crash."""
    event = read(helpers.onboarding(completed_at="0001-01-01T00:00:00+14:00"))
    assert event.quarantine is not None
    assert event.quarantine.reason == "invalid_data"
    assert "data.onboarding_completed_at" in event.quarantine.detail


@pytest.mark.parametrize(
    ("where", "path"),
    [
        (("data", "reason"), "data.reason"),
        (("data", "client_id"), "data.client_id"),
        (("id",), "id"),
        (("event",), "event"),
        (("extra", "deep"), "extra.deep"),
    ],
)
def test_token_outside_bearer_token_is_quarantined_and_redacted(
    where: tuple[str, ...], path: str
) -> None:
    """A token-shaped string anywhere but data.bearer_token quarantines the delivery;
    the readable copy, the key and the type never carry it."""
    token = helpers.canary_token()
    document: dict[str, Any] = helpers.revocation("cli_1", None)
    target = document
    for part in where[:-1]:
        target = target.setdefault(part, {})
    target[where[-1]] = f"see {token}" if where[-1] not in {"id", "event"} else token
    event = read(document)
    assert event.quarantine is not None
    assert event.quarantine.reason == "token_outside_bearer_token"
    assert path in event.quarantine.detail
    assert token not in repr(event) + json.dumps(event.document) + event.key + event.type
    assert token not in event.public_id


def test_token_deeper_than_the_copy_is_still_found() -> None:
    """A token nested past the depth the readable copy keeps still quarantines."""
    token = helpers.canary_token()
    nested: Any = token
    for _ in range(200):
        nested = [nested]
    event = read({"event": "x", "data": {"deep": nested}})
    assert event.quarantine is not None
    assert event.quarantine.reason == "token_outside_bearer_token"
    assert token not in json.dumps(event.document)


def test_revocation_prefix_must_be_fifteen_characters() -> None:
    """token_prefix takes Debitura's form: tok_live_ plus six characters."""
    assert read(helpers.revocation("cli_1", "tok_live_xyz789")).quarantine is None
    assert read(helpers.revocation("cli_1", "tok_live_x_-789")).quarantine is None
    short = read(helpers.revocation("cli_1", "tok_live_xy"))
    assert short.quarantine is not None
    assert short.quarantine.detail.startswith("data.token_prefix")


@pytest.mark.parametrize("name", ["with space", "x" * 101, "", "caf\u00e9"])
def test_event_type_must_be_a_name(name: str) -> None:
    """An event type is a dotted name; anything else is invalid_data."""
    event = read({"event": name, "data": {}})
    assert event.quarantine is not None
    assert event.quarantine.reason == "invalid_data"
    assert event.type == "unknown" or event.type == name


@pytest.mark.parametrize(
    ("document", "is_test", "environment", "quarantined"),
    [
        (helpers.onboarding(token=helpers.canary_token("live")), False, "live", False),
        (helpers.onboarding(token=helpers.canary_token("test")), False, "test", False),
        (helpers.onboarding(token=helpers.canary_token("test")), True, "test", False),
        (helpers.onboarding(token=helpers.canary_token("live")), True, None, True),
        (helpers.revocation("c", "tok_live_abc123"), False, "live", False),
        (helpers.revocation("c", "tok_test_abc123"), False, "test", False),
        (helpers.revocation("c", "tok_live_abc123"), True, None, True),
        (helpers.revocation("c", "tok_test_abc123"), True, "test", False),
        (helpers.revocation("c", None), False, "live", False),
        (helpers.revocation("c", None), True, "test", False),
    ],
)
def test_environment_of_each_delivery(
    document: dict[str, Any], is_test: bool, environment: str | None, quarantined: bool
) -> None:
    """Where a delivery acts: its token's or prefix's environment, else the delivery's;
    a test delivery that names a live token or prefix is quarantined."""
    event = read(document, is_test=is_test)
    assert (event.quarantine is not None) == quarantined
    if quarantined:
        assert event.quarantine is not None
        assert event.quarantine.reason == "test_delivery_targets_live"
    else:
        assert event.environment == environment

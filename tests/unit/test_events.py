"""Envelope and event parsing: strict where it matters, never echoing input."""

from __future__ import annotations

import hashlib
import json

import pytest

from receiver import errors, events
from tests import helpers


def test_onboarding_parses_and_hides_the_token() -> None:
    """A valid onboarding yields its client and a token whose repr is masked."""
    document = helpers.onboarding("cli_abc123")
    event = events.parse(helpers.encode(document))
    assert isinstance(event.data, events.OnboardingCompleted)
    assert event.data.client_id == "cli_abc123"
    assert event.key == document["id"]
    assert document["data"]["bearer_token"] not in repr(event)


def test_missing_id_keys_on_the_body_hash() -> None:
    """Without an id, the idempotency key is the SHA-256 of the raw body."""
    body = helpers.encode(helpers.onboarding(event_id=None))
    assert events.parse(body).key == "sha256:" + hashlib.sha256(body).hexdigest()


def test_unknown_fields_are_kept_in_the_document() -> None:
    """Extra fields are not rejected, and stay in the stored document."""
    document = helpers.onboarding()
    document["extra"] = {"nested": [1, 2]}
    event = events.parse(helpers.encode(document))
    assert event.document["extra"] == {"nested": [1, 2]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"data": {}}', "event"),
        (b'{"event": "client.onboarding_completed", "data": {}}', "data.client_id"),
    ],
)
def test_bad_bodies_are_invalid_requests(body: bytes, message: str) -> None:
    """Each malformed body is a clear 400-class error."""
    with pytest.raises(errors.InvalidRequest, match=message):
        events.parse(body)


@pytest.mark.parametrize(
    "bad", ["tok_live_short", "tok_prod_" + "a" * 20, "tok_live_" + "a-b" * 10]
)
def test_malformed_token_is_rejected_without_echo(bad: str) -> None:
    """A token of the wrong shape is a 400 whose message does not repeat it."""
    document = helpers.onboarding(token=bad)
    with pytest.raises(errors.InvalidRequest) as caught:
        events.parse(helpers.encode(document))
    assert "data.bearer_token" in caught.value.message
    assert bad not in caught.value.message


def test_redacted_document_cuts_tokens_to_their_prefix() -> None:
    """The operators' copy keeps the prefix and drops the rest, anywhere in the event."""
    token = helpers.canary_token()
    document = helpers.onboarding(token=token)
    document["data"]["note"] = f"copied {token} here\x00"
    redacted = events.redacted_document(events.parse(helpers.encode(document)))
    text = json.dumps(redacted)
    assert token not in text
    assert redacted["data"]["bearer_token"].startswith(token[:15])
    assert "\x00" not in redacted["data"]["note"]


def test_revocation_prefix_must_be_fifteen_characters() -> None:
    """token_prefix takes Debitura's form: tok_live_ plus six characters."""
    events.parse(helpers.encode(helpers.revocation("cli_1", "tok_live_xyz789")))
    with pytest.raises(errors.InvalidRequest, match=r"data\.token_prefix"):
        events.parse(helpers.encode(helpers.revocation("cli_1", "tok_live_xy")))


def test_only_utf8_is_json() -> None:
    """A UTF-16 body is refused, not guessed at (found by the fuzz run: a NUL in the
    event type reached Postgres, which cannot store it)."""
    body = json.dumps({"event": "\u0000", "data": {}}).encode("utf-16")
    with pytest.raises(errors.InvalidRequest, match="UTF-8"):
        events.parse(body)


@pytest.mark.parametrize("name", ["\u0000", "with space", "x" * 101, "", "caf\u00e9"])
def test_event_type_must_be_a_name(name: str) -> None:
    """An event type is a dotted name; control characters and spaces are a 400."""
    with pytest.raises(errors.InvalidRequest, match="event"):
        events.parse(json.dumps({"event": name, "data": {}}).encode())

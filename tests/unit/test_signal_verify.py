"""`cache.verify_signal`: the receiver's signals checked the way any partner stack can,
with Standard Webhooks, and the first release's header for one more release."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook

from receiver import errors, signing
from receiver.partner import cache

SECRET = os.urandom(32)
BODY = json.dumps({"signal_id": "s1", "client_id": "cli_1", "reason": "token_revoked"}).encode()


def standard_headers(body: bytes, *, secret: bytes = SECRET, age: float = 0) -> dict[str, str]:
    """Headers as the standardwebhooks library signs them (not the receiver's code)."""
    moment = datetime.now(UTC) - timedelta(seconds=age)
    return {
        "webhook-id": "s1",
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign("s1", moment, body.decode()),
    }


def test_a_standard_webhooks_signature_verifies() -> None:
    assert cache.verify_signal(standard_headers(BODY), BODY, SECRET)["client_id"] == "cli_1"


REFUSED: dict[str, Callable[[], tuple[dict[str, str], bytes]]] = {
    "body changed": lambda: (standard_headers(BODY), BODY.replace(b"cli_1", b"cli_2")),
    "another secret": lambda: (standard_headers(BODY, secret=os.urandom(32)), BODY),
    "replayed late": lambda: (standard_headers(BODY, age=600), BODY),
    "malformed": lambda: (
        {"webhook-id": "s1", "webhook-timestamp": "1", "webhook-signature": "v1"},
        BODY,
    ),
    "unsigned": lambda: ({}, BODY),
}


@pytest.mark.parametrize("case", REFUSED)
def test_anything_else_is_refused_with_a_401(case: str) -> None:
    headers, body = REFUSED[case]()  # built now: the timestamps are fresh
    with pytest.raises(errors.InvalidSignature):
        cache.verify_signal(headers, body, SECRET)


def test_the_legacy_header_verifies_until_it_is_switched_off() -> None:
    headers = {signing.SIGNAL_SIGNATURE_HEADER: signing.header_value(SECRET, BODY)}
    assert cache.verify_signal(headers, BODY, SECRET)["client_id"] == "cli_1"
    with pytest.raises(errors.InvalidSignature):
        cache.verify_signal(headers, BODY, SECRET, legacy=False)


def test_a_signed_body_without_a_client_id_is_a_400() -> None:
    body = b'{"signal_id": "s1"}'
    with pytest.raises(errors.InvalidRequest):
        cache.verify_signal(standard_headers(body), body, SECRET)

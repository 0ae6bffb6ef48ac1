"""`cache.verify_signal`: the receiver's signals checked the way any partner stack can,
with Standard Webhooks, and the first release's header for one more release."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook

from receiver import config, errors, signing
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


def test_any_of_several_secrets_verifies() -> None:
    """During a rotation the cache holds the new and the old secret: a signal signed
    under either verifies; one signed under neither is refused."""
    old, new = os.urandom(32), os.urandom(32)
    for signer in (old, new):
        headers = standard_headers(BODY, secret=signer)
        assert cache.verify_signal(headers, BODY, [new, old])["client_id"] == "cli_1"
    with pytest.raises(errors.InvalidSignature):
        cache.verify_signal(standard_headers(BODY, secret=os.urandom(32)), BODY, [new, old])


def test_whsec_and_base64_text_secrets_verify() -> None:
    """Secrets given as text, `whsec_<base64>` (Standard Webhooks' spelling) or plain
    base64, are the same secret as the raw bytes."""
    encoded = base64.b64encode(SECRET).decode()
    headers = standard_headers(BODY)
    for spelled in (f"whsec_{encoded}", encoded, [f"whsec_{encoded}"]):
        assert cache.verify_signal(headers, BODY, spelled)["client_id"] == "cli_1"


def test_the_legacy_header_verifies_against_any_of_several_secrets() -> None:
    """A legacy header signed under the old secret verifies with [new, old]."""
    old, new = os.urandom(32), os.urandom(32)
    headers = {signing.SIGNAL_SIGNATURE_HEADER: signing.header_value(old, BODY)}
    assert cache.verify_signal(headers, BODY, [new, old])["client_id"] == "cli_1"


def _settings(cache_secret: str) -> config.Settings:
    key = base64.b64encode(os.urandom(32)).decode()
    return config.load_settings(
        webhook_secrets=key,
        token_keys=f"k1:{key}",
        index_key=key,
        cache_url="http://127.0.0.1:9/signals",
        cache_secret=cache_secret,
    )


def test_receiver_cache_secret_takes_whsec_and_base64_comma_separated() -> None:
    """RECEIVER_CACHE_SECRET: several secrets, base64 or `whsec_…`, kept in order (the
    first signs), in the service's settings and in a partner cache's."""
    first, second = os.urandom(32), os.urandom(24)
    a, b = base64.b64encode(first).decode(), base64.b64encode(second).decode()
    for value in (f"whsec_{a},{b}", f" {a} , whsec_{b} "):
        parsed = _settings(value).cache_secret
        assert [s.get_secret_value() for s in parsed] == [first, second]
        partner_side = cache.CacheSettings.model_validate(
            {"token_keys": f"k1:{a}", "cache_secret": value}
        )
        assert [s.get_secret_value() for s in partner_side.cache_secret] == [first, second]


@pytest.mark.parametrize("bad", ["whsec_not-base64!", "c2hvcnQ=", "whsec_"])
def test_a_malformed_cache_secret_is_named_not_shown(bad: str) -> None:
    """A secret that is not base64 or decodes short: one line naming the variable,
    never the value."""
    good = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(errors.ConfigError) as refused:
        _settings(f"{good},{bad}")
    assert "RECEIVER_CACHE_SECRET" in str(refused.value)
    assert good not in str(refused.value)
    assert bad not in str(refused.value)

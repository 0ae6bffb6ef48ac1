"""Debitura's signature scheme, checked against an independent implementation."""

from __future__ import annotations

import base64
import time

import pytest

from receiver import errors, signing
from tests import helpers

SECRET_B64 = helpers.new_secret()
SECRET = base64.b64decode(SECRET_B64)
BODY = b'{"event":"client.onboarding_completed","data":{}}'


def test_our_signature_matches_the_documented_scheme() -> None:
    """A header made by receiver.signing equals one made from the documentation."""
    t = 1_700_000_000
    assert signing.header_value(SECRET, BODY, t) == helpers.debitura_signature(SECRET_B64, BODY, t)


def test_valid_signature_returns_its_timestamp() -> None:
    """A fresh signature over the raw body verifies and yields its t."""
    header = helpers.debitura_signature(SECRET_B64, BODY)
    assert signing.verify(header, BODY, [SECRET], 300) == int(header.split(",")[0][2:])


def test_any_configured_secret_verifies() -> None:
    """During rotation a signature under the second secret still verifies."""
    other = helpers.new_secret()
    header = helpers.debitura_signature(other, BODY)
    signing.verify(header, BODY, [SECRET, base64.b64decode(other)], 300)


def test_any_v1_in_the_header_verifies() -> None:
    """A header with several v1 values verifies when one of them matches."""
    good = helpers.debitura_signature(SECRET_B64, BODY)
    t, v1 = good.split(",")
    signing.verify(f"{t},v1={'0' * 64},{v1},v0=abc", BODY, [SECRET], 300)


def test_body_change_breaks_the_signature() -> None:
    """One byte more in the body and the signature no longer matches."""
    header = helpers.debitura_signature(SECRET_B64, BODY)
    with pytest.raises(errors.InvalidSignature, match="does not match"):
        signing.verify(header, BODY + b" ", [SECRET], 300)


def test_stale_timestamp_is_rejected() -> None:
    """A signature older than the tolerance is refused even when the HMAC is right."""
    header = helpers.debitura_signature(SECRET_B64, BODY, int(time.time()) - 301)
    with pytest.raises(errors.InvalidSignature, match="too old"):
        signing.verify(header, BODY, [SECRET], 300)


def test_future_timestamp_beyond_30s_is_rejected() -> None:
    """A t more than 30 s ahead is refused; 29 s ahead is accepted (clock skew)."""
    now = int(time.time())
    signing.verify(helpers.debitura_signature(SECRET_B64, BODY, now + 29), BODY, [SECRET], 300, now)
    with pytest.raises(errors.InvalidSignature, match="future"):
        signing.verify(
            helpers.debitura_signature(SECRET_B64, BODY, now + 31), BODY, [SECRET], 300, now
        )


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "t=abc,v1=" + "0" * 64,
        "t=1,t=2,v1=" + "0" * 64,
        "v1=" + "0" * 64,
        "t=1700000000",
        "t=1700000000,v1=NOTHEX",
        "t=1700000000,v1=" + "A" * 64,
        "t=" + "9" * 5000,
        "t=١٢٣,v1=" + "0" * 64,
    ],
)
def test_malformed_headers_are_authentication_errors(header: str) -> None:
    """Every malformed header is a 401-class error, never a crash."""
    with pytest.raises(errors.InvalidSignature):
        signing.verify(header, BODY, [SECRET], 300)

"""Debitura's webhook signature scheme, used both ways (docs/design.md §2).

    X-Debitura-Signature: t=<unix seconds>,v1=<lowercase hex HMAC-SHA256>

The HMAC is taken over `<t>.<raw body bytes>` with the base64-decoded secret. The
same scheme signs the receiver's own invalidation POSTs (`X-Receiver-Signature`).
The parser is hand-written because it is six lines and no maintained library
implements this vendor's header; the cryptography is the stdlib's `hmac`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping, Sequence

from receiver import errors

SIGNATURE_HEADER = "X-Debitura-Signature"
# The same scheme on the receiver's own invalidation POSTs, under RECEIVER_CACHE_SECRET.
SIGNAL_SIGNATURE_HEADER = "X-Receiver-Signature"
FUTURE_TOLERANCE_SECONDS = 30
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_HEADER_LENGTH = 4096
# Unix seconds fit in 11 digits until the year 5138; a longer t= is not a time (and
# a 320-digit one would overflow the float arithmetic below).
_MAX_TIMESTAMP_DIGITS = 12


def compute(secret: bytes, timestamp: int, body: bytes) -> str:
    """The lowercase hex v1 signature of `body` at `timestamp` under `secret`."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret, signed, hashlib.sha256).hexdigest()


def header_value(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    """A complete `t=…,v1=…` header value for `body`, signed now unless told otherwise."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={compute(secret, t, body)}"


def parse(header: str) -> tuple[int, list[str]]:
    """Split a signature header into its timestamp and its v1 signatures.

    Unknown schemes (`v0=…`) are skipped so Debitura can add one without breaking us.
    """
    if len(header) > _MAX_HEADER_LENGTH:
        raise errors.InvalidSignature("signature header is too long")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise errors.InvalidSignature(
                "signature header is malformed: expected t=<unix>,v1=<hex>"
            )
        if key == "t":
            if (
                timestamp is not None
                or not value.isascii()
                or not value.isdigit()
                or len(value) > _MAX_TIMESTAMP_DIGITS
            ):
                raise errors.InvalidSignature("signature header has a malformed t= timestamp")
            timestamp = int(value)
        elif key == "v1" and _HEX64.match(value):
            signatures.append(value)
    if timestamp is None:
        raise errors.InvalidSignature("signature header has no t= timestamp")
    if not signatures:
        raise errors.InvalidSignature("signature header has no valid v1= signature")
    return timestamp, signatures


def stored_form(header: str) -> str:
    """A verified header as it is kept: its timestamp and v1 signatures only. Whatever
    else a sender put in it (an unknown scheme, a token) never becomes a SQL
    parameter; what is kept still verifies the body (`events reprocess`)."""
    timestamp, signatures = parse(header)
    return ",".join([f"t={timestamp}", *(f"v1={s}" for s in signatures)])


def verify(
    header: str | None,
    body: bytes,
    secrets: Sequence[bytes],
    tolerance: int,
    now: float | None = None,
) -> int:
    """Check a signature header against the raw body; return its timestamp.

    Accepts when any v1 matches any secret (rotation without downtime). Every
    comparison runs in constant time and all of them run, so timing says nothing
    about which secret or signature was close.
    """
    return authenticate(header, body, {"": secrets}, tolerance, now)[0]


def authenticate(
    header: str | None,
    body: bytes,
    secret_sets: Mapping[str, Sequence[bytes]],
    tolerance: int,
    now: float | None = None,
) -> tuple[int, str]:
    """Like `verify`, against several named sets of secrets (live, test); return the
    timestamp and the name of the first set with a matching secret."""
    if not header:
        raise errors.InvalidSignature(f"missing {SIGNATURE_HEADER} header", reason="missing")
    timestamp, signatures = parse(header)
    current = time.time() if now is None else now
    if current - timestamp > tolerance:
        raise errors.InvalidSignature("signature timestamp is too old", reason="stale")
    if timestamp - current > FUTURE_TOLERANCE_SECONDS:
        raise errors.InvalidSignature("signature timestamp is in the future", reason="future")
    matched = [
        name
        for name, secrets in secret_sets.items()
        if _any_match(signatures, (compute(s, timestamp, body) for s in secrets))
    ]
    if not matched:
        raise errors.InvalidSignature("signature does not match", reason="mismatch")
    return timestamp, matched[0]


def _any_match(given: Sequence[str], expected: Iterable[str]) -> bool:
    matched = False
    for candidate in expected:
        for signature in given:
            matched |= hmac.compare_digest(candidate, signature)
    return matched

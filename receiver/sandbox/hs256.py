"""The HS256 JSON Web Tokens the sandbox mints at `POST /oauth/token`, and checks at
`POST /cases`.

Written with the stdlib's hmac and base64 because PyJWT is not a dependency of the
package and this needs twenty lines of it: one algorithm, one key the sandbox made
itself, no key discovery, no other claims than `exp` to enforce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

_HEADER = {"alg": "HS256", "typ": "JWT"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], key: bytes) -> str:
    """A compact JWS of `claims` signed HS256 under `key`."""
    head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    mac = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def decode(token: str, key: bytes, now: float) -> dict[str, Any] | None:
    """The claims of `token` when its signature holds under `key` and `exp` is still
    ahead of `now`; None for anything else (malformed, forged, expired)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    head, body, mac = parts
    expected = _b64(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, mac):
        return None
    try:
        header = json.loads(_unb64(head))
        claims = json.loads(_unb64(body))
    except (binascii.Error, ValueError):
        return None
    if header != _HEADER or not isinstance(claims, dict):
        return None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or now >= exp:
        return None
    return claims

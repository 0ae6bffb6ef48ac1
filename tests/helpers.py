"""Test helpers: canary tokens, signed deliveries, and an independent signer.

Every token a test makes comes from `canary_token()`, which remembers it; at the
end of the session every log the suite wrote is searched for every canary.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import string
import time
import uuid
from typing import Any

CANARIES: set[str] = set()
_ALPHABET = string.ascii_letters + string.digits


def canary_token(environment: str = "live") -> str:
    """A fresh token that must never appear in any log, response or dump."""
    token = f"tok_{environment}_" + "".join(secrets.choice(_ALPHABET) for _ in range(40))
    CANARIES.add(token)
    return token


def leak_forms(token: str) -> list[str]:
    """The ways a plaintext token could show up in text: as is, hex (bytea), base64,
    and percent-encoded (`tok%5Flive%5F…`, any case)."""
    raw = token.encode()
    return [
        token,
        raw.hex(),
        base64.b64encode(raw).decode(),
        token.replace("_", "%5F"),
        token.replace("_", "%5f"),
    ]


def find_canaries(text: str) -> list[str]:
    """Canaries present in `text`, in any of their leak forms."""
    return [t for t in CANARIES if any(form in text for form in leak_forms(t))]


def new_secret() -> str:
    """A base64 webhook secret as Debitura issues them."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def debitura_signature(secret_b64: str, body: bytes, timestamp: int | None = None) -> str:
    """Debitura's scheme written from its documentation, independent of receiver.signing:
    HMAC-SHA256 over '<t>.<raw body>' with the base64-decoded secret, lowercase hex."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(base64.b64decode(secret_b64), f"{t}.".encode() + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def onboarding(
    client_id: str | None = None,
    token: str | None = None,
    *,
    event_id: str | None = "auto",
    completed_at: str = "2024-01-15T10:30:00Z",
) -> dict[str, Any]:
    """A client.onboarding_completed envelope."""
    envelope: dict[str, Any] = {
        "specVersion": "1.0",
        "event": "client.onboarding_completed",
        "timestamp": "2024-01-15T10:30:00Z",
        "data": {
            "client_id": client_id or f"cli_{uuid.uuid4().hex[:10]}",
            "bearer_token": token or canary_token(),
            "onboarding_completed_at": completed_at,
        },
    }
    if event_id == "auto":
        envelope["id"] = f"evt_{uuid.uuid4().hex}"
    elif event_id is not None:
        envelope["id"] = event_id
    return envelope


def revocation(
    client_id: str,
    prefix: str | None,
    *,
    revoked_at: str = "2024-01-16T10:00:00Z",
    reason: str = "client_request",
) -> dict[str, Any]:
    """A token.revoked envelope."""
    data: dict[str, Any] = {"client_id": client_id, "revoked_at": revoked_at, "reason": reason}
    if prefix is not None:
        data["token_prefix"] = prefix
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "specVersion": "1.0",
        "event": "token.revoked",
        "timestamp": revoked_at,
        "data": data,
    }


def signed_headers(secret_b64: str, body: bytes, **extra: str) -> dict[str, str]:
    """The headers Debitura sends with a delivery."""
    headers = {
        "Content-Type": "application/json",
        "X-Debitura-Signature": debitura_signature(secret_b64, body),
        "X-Debitura-Event": "test",
    }
    headers.update(extra)
    return headers


def encode(document: Any) -> bytes:
    """JSON bytes as a sender would put them on the wire."""
    return json.dumps(document).encode()

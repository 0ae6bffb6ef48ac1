"""What a secret looks like, and how it is masked wherever it appears.

Used by the log processor (every log record) and by the redacted copy of each
stored event. This is the second line of defence: code never hands a token to a
logger in the first place.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from typing import Any

MASK = "[REDACTED]"
PREFIX_LENGTH = 15  # "tok_live_" + 6, as in token.revoked payloads

# A token as Debitura formats it, anywhere in free text: its examples use the whole
# URL-safe alphabet (`tok_live_new_token_456`), so the mask covers all of it.
TOKEN_PATTERN = re.compile(r"tok_(?:live|test)_[A-Za-z0-9_-]+")
# Long enough to be a whole token (12+ characters after the environment) rather than
# the public 15-character prefix that `token.revoked` carries.
FULL_TOKEN = re.compile(r"tok_(?:live|test)_[A-Za-z0-9_-]{12,}")
# What masking covers once a token has begun: the token alphabet and the characters a
# malformed or re-encoded token may carry (`+`, `/`, `=`, a space), so that no part of
# it is left after the first odd character. Masking too much is the safe side.
_TOKEN_TEXT = re.compile(r"tok_(?:live|test)_[A-Za-z0-9_\-+/= ]+")
# A JSON (or JavaScript) escape of an ASCII character, and the escaped solidus: what a
# reader of the text sees as that character (`tok\u005flive_…` is a token).
_ASCII_ESCAPE = re.compile(r"\\u00([2-7][0-9a-eA-E]|[2-6][fF])|\\/")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
_SENSITIVE_WORDS = frozenset(
    {
        "authorization",
        "apikey",
        "bearer",
        "cookie",
        "credential",
        "credentials",
        "key",
        "keys",
        "passwd",
        "password",
        "secret",
        "secrets",
        "signature",
        "token",
        "xapikey",
    }
)


def token_prefix(token: str) -> str:
    """The non-secret prefix of a token (its first 15 characters)."""
    return token[:PREFIX_LENGTH]


def _mask_token(match: re.Match[str]) -> str:
    token = match.group(0)
    if len(token) <= PREFIX_LENGTH:
        # At most the public prefix (`token.revoked` carries it, `tokens list` shows
        # it): nothing secret follows, and operators need it to match a revocation.
        return token
    # Keep the public prefix only when enough of the token stays hidden behind it.
    if len(token) >= PREFIX_LENGTH + 8:
        return token_prefix(token) + "…" + MASK
    return token[: token.index("_", 4) + 1] + MASK


class Redactor:
    """Masks token-shaped text and configured secrets in strings and nested data."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def text(self, value: str) -> str:
        """Mask every secret-shaped substring of `value`, as a reader would see it:
        JSON escapes of ASCII characters are read (and shown) as the characters."""
        if "\\" in value:
            value = unescape(value)
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        if "tok_" in value:
            value = _TOKEN_TEXT.sub(_mask_token, value)
        if "eyJ" in value:
            value = _JWT.sub(MASK, value)
        if "bearer" in value.lower():  # any case, as _BEARER reads it (bEaReR too)
            value = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", value)
        return value

    def value(self, value: Any, depth: int = 0) -> Any:
        """Mask secrets at any depth of dicts, lists and tuples; mask whole values under
        secret-sounding keys."""
        if isinstance(value, str):
            return self.text(value)
        if depth > 32:
            return MASK
        if isinstance(value, dict):
            return {
                k: (self.sensitive(v) if is_sensitive_key(k) else self.value(v, depth + 1))
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v, depth + 1) for v in value]
        if isinstance(value, bytes | bytearray | memoryview):
            return f"<{len(value)} bytes>"
        return value

    def sensitive(self, value: Any) -> Any:
        """A value held under a secret-sounding key: masked whole, except a lone token,
        which keeps its public prefix."""
        if value is None:
            return None
        # A lone token keeps its public prefix, which operators need to match revocations.
        if isinstance(value, str) and TOKEN_PATTERN.fullmatch(value):
            return self.text(value)
        return MASK


def unescape(text: str) -> str:
    """`text` with JSON escapes of printable ASCII characters (`\\u005f`, `\\/`) read
    as the characters they stand for; other escapes (controls, NUL, non-ASCII) are
    left as they are."""
    return _ASCII_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else "/", text)


def readings(raw: bytes) -> list[str]:
    """The ways a reader may read `raw` as text: as UTF-8, in the UTF-16/32 encoding
    its first bytes suggest (JSON's own detection), and each with its escapes read."""
    texts = [raw.decode("utf-8", "replace")]
    encoding = json.detect_encoding(raw)
    if encoding not in ("utf-8", "utf-8-sig"):
        texts.append(raw.decode(encoding, "replace"))
    texts += [unescape(text) for text in texts if "\\" in text]
    return texts


def token_environments(raw: bytes) -> set[str]:
    """Which environments (`live`, `test`) the whole tokens in `raw` belong to, in any
    of its `readings`."""
    found = set()
    for text in readings(raw):
        for match in FULL_TOKEN.finditer(text):
            found.add(match.group(0)[4:8])
    return found


def is_sensitive_key(key: object) -> bool:
    """Whether a mapping key names a secret (`token`, `webhook_secret`, `Authorization`, …).

    A key is judged by its last word, so `token_prefix` and `signature_failures`
    stay readable while `bearer_token` and `x-debitura-signature` are masked.
    """
    return isinstance(key, str) and _sensitive_name(key)


# Log records reuse a small set of key names: judging each once saves a regex split
# per key per record on the request path (it showed in `bench.profile`: bench/README.md).
@functools.lru_cache(maxsize=4096)
def _sensitive_name(key: str) -> bool:
    words = re.split(r"[^a-z0-9]+", key.lower())
    last = next((w for w in reversed(words) if w), "")
    return last in _SENSITIVE_WORDS

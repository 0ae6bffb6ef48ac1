"""What a secret looks like, and how it is masked wherever it appears.

Used by the log processor (every log record) and by the redacted copy of each
stored event. This is the second line of defence: code never hands a token to a
logger in the first place.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

MASK = "[REDACTED]"
PREFIX_LENGTH = 15  # "tok_live_" + 6, as in token.revoked payloads

# A token as Debitura formats it, anywhere in free text: its examples use the whole
# URL-safe alphabet (`tok_live_new_token_456`), so the mask covers all of it.
TOKEN_PATTERN = re.compile(r"tok_(?:live|test)_[A-Za-z0-9_-]+")
# Long enough to be a whole token (12+ characters after the environment) rather than
# the public 15-character prefix that `token.revoked` carries.
FULL_TOKEN = re.compile(r"tok_(?:live|test)_[A-Za-z0-9_-]{12,}")
# A valid token, whole: what a delivery, a fetch or a link may store (design §2).
_VALID_TOKEN = re.compile(r"tok_(live|test)_[A-Za-z0-9_-]{12,200}")
TOKEN_RULE = "must be tok_live_ or tok_test_ followed by 12-200 of [A-Za-z0-9_-]"  # noqa: S105 - the rule, not a secret
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


def token_problem(token: str) -> str | None:
    """What is wrong with a bearer token's form (the rule, never the value), or None."""
    return None if _VALID_TOKEN.fullmatch(token) else TOKEN_RULE


def token_environment(token: str) -> str | None:
    """`live` or `test` for a token (or a prefix) of that environment, else None."""
    match = re.match(r"tok_(live|test)_", token)
    return match.group(1) if match else None


def holds_token(text: str) -> bool:
    """Whether `text`, read as `Redactor.text` reads it (escapes included), holds a
    whole token rather than at most a public prefix."""
    return FULL_TOKEN.search(unescape(text) if "\\" in text else text) is not None


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


@dataclass(frozen=True)
class Shape:
    """One kind of secret as it appears in free text, and how it is masked.

    `trigger` is a lowercase substring every occurrence contains: the cheap test
    before the pattern runs. A new kind of secret is one more entry in `SHAPES`, and
    every sink (log lines, the canonical request line, stored copies, `events show`,
    CLI output) masks it from then on: they all go through `Redactor.text`.
    """

    trigger: str
    pattern: re.Pattern[str]
    mask: Callable[[re.Match[str]], str]


SHAPES: list[Shape] = [
    Shape("tok_", _TOKEN_TEXT, _mask_token),
    Shape("eyj", _JWT, lambda _: MASK),
    # Any case, as the pattern reads it (bEaReR too).
    Shape("bearer", _BEARER, lambda match: f"{match.group(1)} {MASK}"),
]


class Redactor:
    """Masks secret-shaped text and configured secrets in strings and nested data:
    the one masking function of every sink."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def text(self, value: str) -> str:
        """Mask every secret-shaped substring of `value`, as a reader would see it:
        JSON escapes of ASCII characters are read (and shown) as the characters, and a
        percent-encoded secret (`tok%5Flive%5F…`, once or twice) is shown decoded,
        masked."""
        if "\\" in value:
            value = unescape(value)
        masked = self._masked(value)
        if "%" in value:
            for decoded in url_readings(value)[1:]:
                if decoded != value and self._masked(decoded) != decoded:
                    return self._masked(decoded)
        return masked

    def _masked(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        lowered = value.lower()
        for shape in SHAPES:
            if shape.trigger in lowered:
                value = shape.pattern.sub(shape.mask, value)
        return value

    def changes(self, value: str) -> bool:
        """Whether `text` would mask anything in `value`: the one predicate a fast
        path may ask before it skips the masking (it never restates the rule)."""
        return self.text(value) != value

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
        """What stands under a secret-sounding key (`bearer_token` included), as any
        copy may show it: masked whole, whatever its length, shape or type (design
        §2), except a lone whole token, which keeps its public prefix."""
        if value is None:
            return None
        if isinstance(value, str) and FULL_TOKEN.fullmatch(value):
            return self.text(value)
        return MASK


def url_readings(text: str) -> tuple[str, ...]:
    """`text` and what a reader may take it for: percent-decoded once and twice, each
    with its JSON escapes read (`tok%5Cu005flive_…` is a token to whoever decodes it
    and reads the escape)."""
    if "%" not in text:
        return (text,)
    once = urllib.parse.unquote(text)
    twice = urllib.parse.unquote(once)
    return (text, *(unescape(form) if "\\" in form else form for form in (once, twice)))


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

"""Encryption at rest: AES-256-GCM under a keyring, and a blind index (docs/design.md §4).

A sealed value is self-describing:

    version (1 byte, 0x01) | key id length (1 byte) | key id (ASCII)
    | nonce (12 bytes) | ciphertext+tag

The associated data binds it to its row and purpose (`token|<row id>`,
`event|sha256:<body hash>`), so a
ciphertext copied into another row, or into another column, fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from receiver import config, errors

VERSION = 1
NONCE_BYTES = 12
# Live and test tokens are separate worlds (docs/design.md §2).
ENVIRONMENTS = ("live", "test")
_HEADER_MIN = 2 + 1 + NONCE_BYTES + 16


class Keyring:
    """Several AES-256 keys: the first encrypts, every one decrypts."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise errors.ConfigError("RECEIVER_TOKEN_KEYS needs at least one key")
        self.primary_id = keys[0][0]
        self._ciphers = {kid: AESGCM(material) for kid, material in keys}

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary_id!r}, key_ids={list(self._ciphers)!r})"

    @property
    def key_ids(self) -> list[str]:
        """The key ids in the ring, primary first."""
        return list(self._ciphers)

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt under the primary key with a fresh random nonce."""
        kid = self.primary_id.encode()
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._ciphers[self.primary_id].encrypt(nonce, plaintext, associated_data)
        return bytes([VERSION, len(kid)]) + kid + nonce + ciphertext

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        """Decrypt a sealed value; it must have been sealed with the same associated data."""
        kid, nonce, ciphertext = _split(sealed)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise errors.KeyNotFound(kid)
        try:
            return cipher.decrypt(nonce, ciphertext, associated_data)
        except InvalidTag:
            raise errors.SealBroken(
                "sealed value failed to open: tampered, or not sealed for this row"
            ) from None


def key_id_of(sealed: bytes) -> str:
    """The key id a sealed value names, without opening it."""
    return _split(sealed)[0]


def shown_key_id(kid: str) -> str:
    """A key id as the database reads it from sealed bytes (receiver.sealed_key_id), fit
    to print, log or label: one no configured key could have is `(malformed)`. A
    tampered length byte runs the key id into the nonce and ciphertext, which are
    never shown."""
    return kid if config.is_key_id(kid) else config.MALFORMED_KEY_ID


def shown_key_counts(rows: Sequence[Any]) -> dict[tuple[str, str], int]:
    """Rows of counts (`kind`, `key_id`, `n`) summed per kind and key id as
    `shown_key_id` shows it (several malformed ones make one)."""
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        at = (row["kind"], shown_key_id(row["key_id"]))
        counts[at] = counts.get(at, 0) + row["n"]
    return counts


def _split(sealed: bytes) -> tuple[str, bytes, bytes]:
    if len(sealed) < _HEADER_MIN or sealed[0] != VERSION:
        raise errors.SealBroken("sealed value is truncated or of an unknown version")
    kid_length = sealed[1]
    kid_end = 2 + kid_length
    try:
        kid = sealed[2:kid_end].decode("ascii")
    except UnicodeDecodeError:
        raise errors.SealBroken("sealed value has a malformed key id") from None
    nonce = sealed[kid_end : kid_end + NONCE_BYTES]
    ciphertext = sealed[kid_end + NONCE_BYTES :]
    if len(nonce) != NONCE_BYTES or len(ciphertext) < 16:
        raise errors.SealBroken("sealed value is truncated")
    return kid, nonce, ciphertext


def blind_index(index_key: bytes, value: str) -> bytes:
    """HMAC-SHA256 of a value under the index key: finds a token without decrypting it."""
    return hmac.new(index_key, value.encode(), hashlib.sha256).digest()


def names_key(index_key: bytes) -> bytes:
    """The key of `name_hashes`, derived from the index key: no name hash is the first
    bytes of a token's blind index."""
    return hmac.digest(index_key, b"receiver/body-names", "sha256")


def name_hashes(key: bytes, names: set[str]) -> list[int]:
    """The identifiers a stored body names as keyed 64-bit hashes, sorted (`key`:
    `names_key`): erasure finds the bodies naming a client through them
    (events.body_names). A match is a pointer, never the answer: the body is opened
    and read before it is erased."""
    # Keyed BLAKE2b (a MAC by design, with `key` as its key): a quarter of HMAC-SHA256's
    # time per name, and intake hashes about 15 names per delivery.
    return sorted(
        int.from_bytes(
            hashlib.blake2b(name.encode(), key=key, digest_size=8).digest(), "big", signed=True
        )
        for name in names
    )


def token_associated_data(row_id: str) -> bytes:
    """Associated data for a token row."""
    return f"token|{row_id}".encode()


def event_associated_data(sealed_for: str) -> bytes:
    """Associated data for an event's stored raw body. `sealed_for` is the body's own
    key (`sha256:<hex>` of the bytes) for rows that store a body hash, else the row's
    key (rows stored before body hashes): a body opens only as the body it is."""
    return f"event|{sealed_for}".encode()


@dataclass(frozen=True, slots=True)
class Sealer:
    """The key material the request path needs: a keyring and the blind-index key."""

    keyring: Keyring
    index_key: bytes
    names_key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names_key", names_key(self.index_key))

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Sealer:
        """The keyring and index key the settings configure."""
        return cls(
            keyring=Keyring([(kid, k.get_secret_value()) for kid, k in settings.token_keys]),
            index_key=settings.index_key.get_secret_value(),
        )

    def __repr__(self) -> str:
        return f"Sealer(keyring={self.keyring!r})"

    def open_token(self, row_id: str, sealed: bytes) -> str:
        """Decrypt one stored token; it opens only in the row it was sealed for."""
        return self.keyring.open(sealed, token_associated_data(row_id)).decode()

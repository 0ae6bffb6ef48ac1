"""AES-256-GCM sealing with a keyring, bound to its row, and the blind index."""

from __future__ import annotations

import os

import pytest

from receiver import errors, vault

K1 = ("k1", os.urandom(32))
K2 = ("k2", os.urandom(32))
AD = vault.token_associated_data("row-1")


def test_seal_and_open_round_trip() -> None:
    """A value sealed for a row opens for that row, and its bytes hide the plaintext."""
    ring = vault.Keyring([K1])
    sealed = ring.seal(b"tok_live_secretsecretsecret", AD)
    assert b"secretsecret" not in sealed
    assert ring.open(sealed, AD) == b"tok_live_secretsecretsecret"


def test_each_seal_uses_a_fresh_nonce() -> None:
    """Sealing the same value twice gives different bytes."""
    ring = vault.Keyring([K1])
    assert ring.seal(b"x", AD) != ring.seal(b"x", AD)


def test_sealed_value_names_its_key() -> None:
    """The key id is readable without opening the value."""
    assert vault.key_id_of(vault.Keyring([K2, K1]).seal(b"x", AD)) == "k2"


def test_old_keys_still_open_after_rotation() -> None:
    """A value sealed under a key that is no longer primary still opens."""
    sealed = vault.Keyring([K1]).seal(b"x", AD)
    assert vault.Keyring([K2, K1]).open(sealed, AD) == b"x"


def test_missing_key_is_named() -> None:
    """Opening a value whose key left the ring fails naming the key id."""
    sealed = vault.Keyring([K1]).seal(b"x", AD)
    with pytest.raises(errors.KeyNotFound, match="'k1'"):
        vault.Keyring([K2]).open(sealed, AD)


def test_moved_to_another_row_fails_to_open() -> None:
    """A ciphertext copied to another row does not open there."""
    ring = vault.Keyring([K1])
    sealed = ring.seal(b"x", AD)
    with pytest.raises(errors.SealBroken):
        ring.open(sealed, vault.token_associated_data("row-2"))


@pytest.mark.parametrize("position", [0, 5, -1])
def test_tampered_value_fails_to_open(position: int) -> None:
    """Any flipped byte (version, nonce or tag) makes opening fail cleanly."""
    ring = vault.Keyring([K1])
    sealed = bytearray(ring.seal(b"x", AD))
    sealed[position] ^= 0x01
    with pytest.raises((errors.SealBroken, errors.KeyNotFound)):
        ring.open(bytes(sealed), AD)


def test_truncated_value_fails_to_open() -> None:
    """A truncated value is reported, not crashed on."""
    with pytest.raises(errors.SealBroken):
        vault.Keyring([K1]).open(b"\x01\x02k1", AD)


def test_blind_index_is_deterministic_and_keyed() -> None:
    """The same token gives the same index under one key, another under another key."""
    a = vault.blind_index(b"a" * 32, "tok_live_x")
    assert a == vault.blind_index(b"a" * 32, "tok_live_x")
    assert a != vault.blind_index(b"b" * 32, "tok_live_x")


def test_keyring_repr_holds_no_key_material() -> None:
    """The keyring's repr lists key ids only."""
    assert repr(vault.Keyring([K1])) == "Keyring(primary='k1', key_ids=['k1'])"

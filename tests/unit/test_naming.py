"""What a stored body names: the identifiers between quotes that intake stores as name
hashes answer exactly what reading the body the long way answers, however the body is
encoded, so an erasure that finds bodies through the names misses none."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver import vault
from receiver.lifecycle import naming

_WORDS = ["cli_1", "cli_10", "cli-2.a:b", "data", "x", "a b", "é", 'q"cli_1"', "cli_1\n", ""]
_TARGETS = ["cli_1", "cli_10", "cli-2.a:b", "data", "x"]

_documents = st.recursive(
    st.sampled_from(_WORDS) | st.integers() | st.just(float("nan")) | st.none(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_WORDS), inner, max_size=4)
    ),
    max_leaves=12,
)


def _encoded(document: object, escape: bool, ascii_only: bool, encoding: str) -> bytes:
    text = json.dumps(document, ensure_ascii=ascii_only)
    if escape:
        # `_` and `-` stand only inside strings in JSON text: escaping them keeps it JSON.
        text = text.replace("_", "\\u005f").replace("-", "\\u002D")
    return text.encode(encoding)


@settings(max_examples=400, deadline=None)
@given(
    document=_documents,
    escape=st.booleans(),
    ascii_only=st.booleans(),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-32", "utf-8-sig"]),
)
def test_the_quoted_identifiers_answer_what_reading_the_body_answers(
    document: object, escape: bool, ascii_only: bool, encoding: str
) -> None:
    raw = _encoded(document, escape, ascii_only, encoding)
    found = naming.identifiers(raw)
    for target in _TARGETS:
        assert (target in found) == naming.reads_as_named(raw, target), (raw, target)
        assert naming.names_client(raw, target) == naming.reads_as_named(raw, target)


def test_an_identifier_is_named_as_a_whole_string_only() -> None:
    raw = json.dumps({"data": {"client_id": "cli_10", "note": "cli_1 moved"}}).encode()
    assert not naming.names_client(raw, "cli_1")
    assert naming.names_client(raw, "cli_10")
    assert naming.names_client(json.dumps({"cli_1": 1}).encode(), "cli_1")
    escaped = b'{"data": {"client_id": "cli\\u005f1"}}'
    assert naming.names_client(escaped, "cli_1")
    assert naming.names_client(json.dumps(["cli_1"]).encode("utf-16"), "cli_1")


def test_a_client_id_that_is_not_an_identifier_is_read_the_long_way() -> None:
    raw = json.dumps({"who": ["a b", {"é": 1}]}).encode()
    assert not naming.indexable("a b")
    assert naming.names_client(raw, "a b")
    assert naming.names_client(raw, "é")
    assert not naming.names_client(raw, "a")


def test_names_are_keyed_hashes_and_a_body_naming_too_many_keeps_none() -> None:
    key = vault.names_key(os.urandom(32))
    raw = json.dumps({"data": {"client_id": "cli_1", "note": "x"}}).encode()
    names = naming.body_names(key, raw)
    assert names == vault.name_hashes(key, {"note", "cli_1", "x"})
    assert names != naming.body_names(vault.names_key(os.urandom(32)), raw)
    many = json.dumps([f"cli_{n}" for n in range(naming.MAX_NAMES + 1)]).encode()
    assert naming.body_names(key, many) is None


def test_a_name_hash_is_not_a_blind_index() -> None:
    """Names are hashed under a key of their own, derived from the index key: not the
    index key itself, so no name hash is computable from what the blind index uses."""
    index_key = os.urandom(32)
    names_key = vault.names_key(index_key)
    assert names_key != index_key
    assert names_key == vault.names_key(index_key)  # derived, so stable across restarts
    assert vault.name_hashes(names_key, {"cli_1"}) != vault.name_hashes(index_key, {"cli_1"})
    (mark,) = vault.name_hashes(names_key, {"tok_live_x"})
    blind = vault.blind_index(index_key, "tok_live_x")
    assert mark.to_bytes(8, "big", signed=True) != blind[:8]


def test_words_every_delivery_holds_timestamps_and_tokens_are_not_stored() -> None:
    """The known shapes' keys and event types, timestamps and tokens would put an
    index entry in nearly every body and find no client: not stored, and a client id
    shaped like one is searched the long way (not `indexable`)."""
    key = vault.names_key(os.urandom(32))
    token = "tok_live_" + "a1" * 16
    raw = json.dumps(
        {
            "id": "evt_1",
            "event": "client.onboarding_completed",
            "timestamp": "2024-01-15T10:30:00Z",
            "data": {"client_id": "cli_1", "bearer_token": token},
        }
    ).encode()
    assert naming.body_names(key, raw) == vault.name_hashes(key, {"evt_1", "cli_1"})
    for shaped in ("data", "client_id", "token.revoked", "2024-01-15T10:30:00Z", token):
        assert not naming.indexable(shaped)
        assert naming.names_client(raw, shaped) == naming.reads_as_named(raw, shaped)
    assert naming.indexable("cli_1")


def test_no_name_holding_a_whole_token_is_stored() -> None:
    """A token inside a longer identifier (`bearer:tok_live_…`, `tok_live_….sig`, a
    client and its token joined by `:`) is no more a name than the token alone: its
    hash is not stored, and a client id holding one is searched the long way."""
    key = vault.names_key(os.urandom(32))
    token = "tok_live_" + "b2" * 16
    held = [f"bearer:{token}", f"{token}.sig", f"cli_1:{token}", f"x{token}"]
    raw = json.dumps({"id": "evt_2", "data": {"auth": held}}).encode()
    assert naming.body_names(key, raw) == vault.name_hashes(key, {"evt_2", "auth"})
    for shaped in held:
        assert not naming.indexable(shaped)
        assert naming.names_client(raw, shaped) == naming.reads_as_named(raw, shaped)

"""Which clients a stored body names: the one rule erasure reads a body by, and the
hashes of it that intake stores (events.body_names) so that erasure finds the bodies
naming a client through an index, not by opening every stored body."""

from __future__ import annotations

import json
import re
from typing import Any

from receiver import redaction, vault
from receiver.lifecycle import events

# A body naming more identifiers than this keeps no names (NULL): erasure opens it,
# as it opens a body stored before names were kept. Debitura's bodies name about 15.
MAX_NAMES = 1024

# An identifier between double quotes; the closing quote is not consumed, so it may
# open the next one (`"a"b"` holds `a` and `b`).
_QUOTED_IDENTIFIER = re.compile('"(' + events.IDENTIFIER_BODY + ')(?=")')


def _shape_words() -> frozenset[str]:
    words = {events.ONBOARDING_COMPLETED, events.TOKEN_REVOKED}
    for model in (events.Envelope, events.OnboardingCompleted, events.TokenRevocation):
        words.update(field.alias or name for name, field in model.model_fields.items())
    return frozenset(words)


# Names (almost) every delivery holds: the known shapes' keys and event types.
_SHAPE_WORDS = _shape_words()
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ][0-9:.]+(?:[Zz]|[+-]\d{2}:?\d{2})?")


def _kept(name: str) -> bool:
    """Whether a name is stored: not a word every delivery holds, a timestamp, or
    anything holding a whole token (the token alone, or inside a longer identifier:
    `bearer:tok_live_…`, `tok_live_….sig`). Each would add an index entry to nearly
    every body (or a token's hash to the table) and find no client: a client id shaped
    so is searched the long way."""
    return (
        name not in _SHAPE_WORDS
        and _TIMESTAMP.fullmatch(name) is None
        and redaction.FULL_TOKEN.search(name) is None
    )


def indexable(client_id: str) -> bool:
    """Whether bodies naming `client_id` are found through their stored names: an
    identifier (as every client id a delivery or a link stores is) that `_kept`."""
    return events.is_identifier(client_id) and _kept(client_id)


def identifiers(raw: bytes) -> set[str]:
    """Every identifier `raw` holds between double quotes, in any of the ways a reader
    may read it (redaction.readings: UTF-8, the UTF-16/32 JSON detects, each with its
    escapes read). A JSON string (a value or a key, at any depth) that is an
    identifier is among them: written plainly it stands between quotes in the raw
    text; written with escapes, in the reading with its escapes read."""
    found: set[str] = set()
    for text in redaction.readings(raw):
        found.update(_QUOTED_IDENTIFIER.findall(text))
    return found


def body_names(key: bytes, raw: bytes) -> list[int] | None:
    """What intake stores of `raw`'s names (`key`: the sealer's names key); None when
    it names more than MAX_NAMES (erasure then opens it)."""
    found = {name for name in identifiers(raw) if _kept(name)}
    if len(found) > MAX_NAMES:
        return None
    return vault.name_hashes(key, found)


def names_client(raw: bytes, client_id: str) -> bool:
    """Whether a stored body names `client_id` as a string (a value or a key, at any
    depth), in any of the ways a reader may read it: UTF-8 or the UTF-16/32 JSON
    detects, escapes read, NaN allowed; a body no reading parses is searched for the
    id as a JSON string (so `cli_1` does not find `cli_10`).

    For an identifier that is `identifiers` (the same answer: the id as a JSON string
    in some reading), which is what lets the stored names find the body."""
    if events.is_identifier(client_id):
        return client_id in identifiers(raw)
    return reads_as_named(raw, client_id)


def reads_as_named(raw: bytes, client_id: str) -> bool:
    """`names_client` for any string, read the long way: each reading searched for the
    id as a JSON string, and parsed and walked (tests hold `identifiers` to it)."""
    quoted = json.dumps(client_id)
    for text in redaction.readings(raw):
        if quoted in text:
            return True
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            continue
        if _mentions(document, client_id):
            return True
    return False


def _mentions(document: Any, client_id: str) -> bool:
    # Iterative: a body as deep as the parser allows cannot recurse here.
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item == client_id:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False

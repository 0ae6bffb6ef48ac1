"""How `receiver replay` reads its input and builds events: everything checked before
anything is sent, errors that say where."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from receiver import errors
from receiver.admin import outgoing
from tests import helpers


def test_a_json_object_a_json_list_and_ndjson_are_read(tmp_path: Path) -> None:
    """One object, a list, and NDJSON with blank lines: every event, in order, each
    with its exact bytes where the file has them."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps(helpers.onboarding(event_id="evt_a")))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([helpers.revocation("c", None), helpers.onboarding()]))
    lines = tmp_path / "lines.ndjson"
    first, second = json.dumps({"event": "x", "id": "evt_n1"}), json.dumps({"event": "y"})
    lines.write_text(f"{first}\n\n{second}\n")
    found = outgoing.read_events([str(one), str(listed), str(lines)])
    assert [e.event_type for e in found] == [
        "client.onboarding_completed",
        "token.revoked",
        "client.onboarding_completed",
        "x",
        "y",
    ]
    assert found[0].event_id == "evt_a"
    assert found[3].body == first.encode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"event": "x"}\n{oops\n', r"lines\.ndjson:2: invalid JSON"),
        ('[{"event": "x"}, 3]', r"lines\.ndjson\[1\]: an event must be a JSON object"),
        ('{"data": {}}', "has no 'event' field"),
        ("", "no events in the input"),
    ],
)
def test_unusable_input_is_refused_saying_where(tmp_path: Path, text: str, message: str) -> None:
    """A bad line, a non-object, an event without a type, or nothing at all: a usage
    error naming the file and line, before anything is sent."""
    source = tmp_path / "lines.ndjson"
    source.write_text(text)
    with pytest.raises(errors.UsageError, match=message):
        outgoing.read_events([str(source)])


def test_unreadable_file_is_a_usage_error(tmp_path: Path) -> None:
    """A missing file is named in the error."""
    with pytest.raises(errors.UsageError, match=r"missing\.json: cannot read"):
        outgoing.read_events([str(tmp_path / "missing.json")])


def test_prefix_shown_is_never_more_than_the_public_prefix() -> None:
    """The prefix printed for an event is cut to 15 characters, even when a sender put
    a whole token in `token_prefix`."""
    token = helpers.canary_token()
    revocation = outgoing.from_document(helpers.revocation("c", token))
    assert revocation.token_prefix == token[:15]
    assert outgoing.from_document(helpers.onboarding(token=token)).token_prefix == token[:15]

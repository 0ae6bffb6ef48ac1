"""The canonical request line, rendered without the processor chain (receiver/log.py):
it is the line the chain would write, and it can never carry a secret."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver import log
from tests import conftest, helpers

SECRET = "whsec-configured-secret-value-0123"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2ln"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    log.configure(fmt="json", level="debug", secrets=[SECRET], stream=out)
    yield out
    structlog.contextvars.clear_contextvars()
    conftest.log_to_session_file()


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _without_time(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "timestamp"}


def _plain_fields() -> dict[str, Any]:
    return {
        "method": "POST",
        "path": "/webhooks/debitura",
        "status": 200,
        "error": None,
        "duration_ms": 1.25,
        "remote": "127.0.0.1",
        "pid": 4242,
    }


def test_a_plain_line_is_written_directly_and_is_the_chains_line(stream: io.StringIO) -> None:
    """A line with nothing to mask takes the direct path, and reads exactly as the
    processor chain writes it (keys, values and their order)."""
    structlog.contextvars.bind_contextvars(request_id="r-1", event_id="evt_1", outcome="processed")
    assert log._request_line is not None
    assert log._request_line.write("receiver.service.middleware", "info", _plain_fields())
    structlog.get_logger("receiver.service.middleware").info("request", **_plain_fields())
    direct, chain = _lines(stream)
    assert list(direct) == list(chain)
    assert _without_time(direct) == _without_time(chain)
    assert direct["level"] == "info"
    assert direct["logger"] == "receiver.service.middleware"


def test_below_the_level_nothing_is_written(stream: io.StringIO) -> None:
    """A routine line at debug is dropped under `info`, as the chain drops it."""
    out = io.StringIO()
    log.configure(fmt="json", level="info", stream=out)
    log.request_line("receiver.service.middleware", "debug", **_plain_fields())
    log.request_line("receiver.service.middleware", "info", **_plain_fields())
    assert [line["level"] for line in _lines(out)] == ["info"]


_CANARY = helpers.canary_token()
_HOSTILE = [
    _CANARY,
    f"id-{_CANARY}",
    _CANARY.replace("_", "\\u005f", 1),
    f"Bearer {_CANARY[9:]}",
    f"bEaReR {_CANARY[9:]}",
    JWT,
    SECRET,
    'quote"and\\backslash',
    "ünïcödé",
    "\x00nul",
]
_VALUES = st.one_of(
    st.sampled_from(_HOSTILE),
    st.text(max_size=40),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
_FIELDS = ("path", "remote", "error", "method")
_CONTEXT = ("request_id", "event_id", "event_type", "client_id", "outcome", "signature_failure")


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fields=st.fixed_dictionaries({}, optional=dict.fromkeys(_FIELDS, _VALUES)),
    context=st.fixed_dictionaries({}, optional=dict.fromkeys(_CONTEXT, _VALUES)),
    extra=st.sampled_from([{}, {"bearer_token": _CANARY}, {"webhook_secret": "x"}]),
)
def test_whatever_the_fields_hold_the_line_is_the_chains_and_masks_every_secret(
    stream: io.StringIO, fields: dict[str, Any], context: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Canaries, escaped tokens, bearer credentials, JWTs, a configured secret, quotes
    and non-ASCII in any field or in the request's context, and fields outside the
    known set: the line written is what the processor chain writes for the same record,
    and holds no secret."""
    stream.seek(0)
    stream.truncate()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)
    log.request_line("receiver.service.middleware", "info", **fields, **extra)
    structlog.get_logger("receiver.service.middleware").info("request", **fields, **extra)
    text = stream.getvalue()
    direct, chain = _lines(stream)
    assert _without_time(direct) == _without_time(chain)
    assert not helpers.find_canaries(text)
    assert _CANARY[9:] not in text  # the secret part, after a bearer word of any case
    assert SECRET not in text
    assert JWT not in text


def test_secrets_given_as_an_iterator_are_masked_on_the_direct_path_too() -> None:
    """`configure` reads the secrets twice (the chain's redaction, the direct line's
    check): given once as an iterator, both still have them."""
    out = io.StringIO()
    try:
        log.configure(fmt="json", level="info", secrets=iter([SECRET]), stream=out)
        fields = _plain_fields() | {"path": SECRET}
        log.request_line("receiver.service.middleware", "info", **fields)
    finally:
        conftest.log_to_session_file()
    assert SECRET not in out.getvalue()
    assert _lines(out)[0]["path"] == "[REDACTED]"


# Ids by position: a canary is new in each process, and xdist workers must agree.
@pytest.mark.parametrize("value", _HOSTILE, ids=[f"hostile{i}" for i in range(len(_HOSTILE))])
@pytest.mark.parametrize("name", ["path", "request_id"])
def test_each_kind_of_secret_alone_is_masked_as_the_chain_masks_it(
    stream: io.StringIO, value: str, name: str
) -> None:
    """One hostile value, alone in a field or in the request's context: the line is the
    chain's, and no secret of any kind is left in it."""
    fields = _plain_fields()
    if name == "path":
        fields["path"] = value
    else:
        structlog.contextvars.bind_contextvars(request_id=value)
    log.request_line("receiver.service.middleware", "info", **fields)
    structlog.get_logger("receiver.service.middleware").info("request", **fields)
    direct, chain = _lines(stream)
    assert _without_time(direct) == _without_time(chain)
    text = stream.getvalue()
    for secret in (_CANARY, _CANARY[9:], JWT, SECRET):
        assert secret not in text

"""One rule for where a credential may travel, asked by every caller that sends one."""

from __future__ import annotations

import os
from typing import Any

import pytest

from receiver import config, endpoints, errors, partner
from receiver.admin import replay
from receiver.partner import transport

ALLOWED = [
    "https://api.debitura.com",
    "https://api.debitura.com:8443/v1/",
    "http://127.0.0.1:8080",
    "http://127.9.9.9",
    "http://[::1]:9000/x",
    "http://localhost:1",
    "http://LOCALHOST",
    "http://localhost.localdomain:80",
    "HTTPS://api.debitura.com",
]
REFUSED = [
    "http://api.debitura.com",
    "http://10.0.0.1",
    "http://localhost.evil.example",
    "ftp://127.0.0.1",
    "https://",
    "https://user:SECRETVALUE@api.debitura.com",
    "http://SECRETVALUE@127.0.0.1",
    "https://api.debitura.com:99999",
    "api.debitura.com",
]
GOOD: dict[str, Any] = {
    "webhook_secrets": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
    "token_keys": "k1:" + "a" * 43 + "=",
    "index_key": "a" * 43 + "=",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECEIVER_"):
            monkeypatch.delenv(name)


def _verdicts(url: str) -> dict[str, bool]:
    """Whether each caller that sends a credential accepts `url`; no refusal's message
    repeats what the URL's user or password held."""
    verdicts = {"rule": endpoints.credential_problem(url) is None}
    refusals: list[str] = []
    try:
        config.load_settings(**GOOD, debitura_api_url=url)
        verdicts["settings"] = True
    except errors.ConfigError as exc:
        refusals.append(str(exc))
        verdicts["settings"] = False
    try:
        transport.checked_url(url)
        verdicts["partner"] = True
    except partner.InsecureURL as exc:
        refusals.append(str(exc))
        verdicts["partner"] = False
    live = [({"event_id": "evt_1", "live_token": True}, None)]
    try:
        replay.guard_live(live, url, confirmed=True)  # type: ignore[arg-type]
        verdicts["replay"] = True
    except errors.UsageError as exc:
        refusals.append(str(exc))
        verdicts["replay"] = False
    assert not [message for message in refusals if "SECRETVALUE" in message]
    return verdicts


@pytest.mark.parametrize("url", ALLOWED)
def test_https_or_loopback_http_is_accepted_by_every_caller(url: str) -> None:
    """https:// to a named host, or http:// to this machine (any spelling of it)."""
    assert _verdicts(url) == dict.fromkeys(("rule", "settings", "partner", "replay"), True)


@pytest.mark.parametrize("url", REFUSED)
def test_anything_else_is_refused_by_every_caller_without_echoing_it(url: str) -> None:
    """Plain HTTP off this machine, other schemes, no host, a user or password in the
    URL: refused alike by the settings, the partner library and the replay tool, and
    no refusal repeats the URL's credentials."""
    assert _verdicts(url) == dict.fromkeys(("rule", "settings", "partner", "replay"), False)

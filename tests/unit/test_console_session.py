"""The console's session cookie (receiver/service/webconsole/session.py): what proves a
session, and the flags the cookie is set with."""

from __future__ import annotations

import time
from http.cookies import SimpleCookie
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from receiver import config, errors
from receiver.service.webconsole import session

TOKEN = "adm_" + "u" * 40
OTHER = "adm_" + "v" * 40


def _settings(*tokens: str, host: str = "127.0.0.1") -> config.Settings:
    values: dict[str, Any] = dict(config.generate_dev_secrets())
    return config.load_settings(
        **values,
        database_url="postgresql://db.invalid/receiver",
        admin_port=9000,
        admin_host=host,
        admin_tokens=",".join(tokens),
    )


def _cookie(settings: config.Settings, token: str = TOKEN) -> tuple[str, SimpleCookie]:
    response = web.Response()
    session.sign_in(response, settings, token)
    cookie = response.cookies[session.COOKIE]
    return cookie.value, response.cookies


def _request(value: str) -> web.Request:
    return make_mocked_request("GET", "/console/", headers={"Cookie": f"{session.COOKIE}={value}"})


def _changed(hex_text: str) -> str:
    """`hex_text` with its last digit changed (to 0, or to 1 if it was 0: replacing it
    with 0 alone left one cookie in sixteen unchanged, and the test failed then)."""
    return hex_text[:-1] + ("1" if hex_text.endswith("0") else "0")


def test_a_signed_cookie_proves_a_session_and_nothing_else_does() -> None:
    """The cookie just set proves a session under that token's fingerprint; a cookie
    with any part changed, expired, or made with a token no longer configured does not."""
    settings = _settings(OTHER, TOKEN)
    value, _ = _cookie(settings)
    found = session.current(_request(value), settings)
    assert found is not None
    assert found.fingerprint == value.split(".")[0]
    fingerprint, expires, nonce, mac = value.split(".")
    for forged in (
        f"{fingerprint}.{int(expires) + 60}.{nonce}.{mac}",
        f"{fingerprint}.{expires}.{_changed(nonce)}.{mac}",
        f"{fingerprint}.{expires}.{nonce}.{_changed(mac)}",
        f"{fingerprint}.{int(time.time()) - 1}.{nonce}.{mac}",
        "",
        "garbage",
    ):
        assert session.current(_request(forged), settings) is None, forged
    assert session.current(_request(value), _settings(OTHER)) is None
    assert TOKEN not in value


def test_the_csrf_token_is_the_sessions_own() -> None:
    """A form's CSRF token is bound to its session: another session's is refused."""
    settings = _settings(TOKEN)
    one = session.current(_request(_cookie(settings)[0]), settings)
    two = session.current(_request(_cookie(settings)[0]), settings)
    assert one is not None
    assert two is not None
    session.check_form(one, one.csrf)
    with pytest.raises(errors.Forbidden):
        session.check_form(one, two.csrf)


@pytest.mark.parametrize(
    ("host", "secure"),
    [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True), ("10.1.2.3", True)],  # noqa: S104
)
def test_the_cookie_is_secure_unless_the_admin_host_is_loopback(host: str, secure: bool) -> None:
    """HttpOnly, SameSite=Strict, path /console/, an hour; Secure off loopback."""
    _, cookies = _cookie(_settings(TOKEN, host=host))
    cookie = cookies[session.COOKIE]
    assert bool(cookie["secure"]) is secure
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/console/"
    assert cookie["max-age"] == str(session.SESSION_SECONDS)

"""Who is signed in to the console, and the forms they may post.

A session is a signed cookie, not a row or a table in memory: `serve --workers N`
runs N processes behind one port, and a request may reach any of them, so a session
id kept in one process's memory would sign the operator out at random. The cookie
holds the admin token's fingerprint, an expiry and a random nonce, signed with
HMAC-SHA256 under a key derived from that admin token. So:

- nothing secret is in the cookie (the fingerprint names the token; the MAC does not
  reveal it), and only a holder of a configured admin token can make one;
- every worker, and a restarted process, checks it the same way, with no new secret
  to configure;
- removing a token from RECEIVER_ADMIN_TOKENS (and SIGHUP) ends its sessions at once;
- a session ends at its expiry (`SESSION_SECONDS`) whatever happens. Signing out
  clears the cookie in the browser; a copy taken before stays valid until that expiry
  or until its token is removed: the price of keeping no server-side state.

The CSRF token of a session's forms is an HMAC of its nonce under the same key (a
synchronizer token no other site can compute); the sign-in form, posted before any
session exists, carries a random value that must equal a cookie set with the form
(double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from receiver import config, endpoints, errors
from receiver.service import admin_api

COOKIE = "receiver_console"
SIGN_IN_COOKIE = "receiver_console_sign_in"
PATH = "/console/"
SESSION_SECONDS = 3600
CSRF_FIELD = "csrf"
# fingerprint.expires.nonce.mac, as `sign_in` writes it: ASCII digits only (int()
# reads other digits too, and refuses more than 4,300 of them).
_COOKIE_VALUE = re.compile(r"([0-9a-f]{12})\.([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in operator: the admin token's fingerprint and the session's CSRF token."""

    fingerprint: str
    csrf: str


def _key(token: str) -> bytes:
    # A key for the console's MACs alone, derived from the admin token.
    return hmac.new(token.encode(), b"receiver console session v1", hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def _session(token: str, nonce: str) -> Session:
    return Session(admin_api.fingerprint(token), _mac(_key(token), f"csrf.{nonce}"))


def sign_in(response: web.StreamResponse, settings: config.Settings, token: str) -> None:
    """Give the holder of admin token `token` a session cookie."""
    nonce = secrets.token_hex(16)
    expires = int(time.time()) + SESSION_SECONDS
    claims = f"{admin_api.fingerprint(token)}.{expires}.{nonce}"
    _set(response, settings, COOKIE, f"{claims}.{_mac(_key(token), claims)}", SESSION_SECONDS)
    response.del_cookie(SIGN_IN_COOKIE, path=PATH)


def sign_out(response: web.StreamResponse) -> None:
    """Clear the session cookie."""
    response.del_cookie(COOKIE, path=PATH)


def current(request: web.Request, settings: config.Settings) -> Session | None:
    """The session the request's cookie proves, or None (absent, forged, expired, or
    made with an admin token no longer configured)."""
    parts = _COOKIE_VALUE.fullmatch(request.cookies.get(COOKIE, ""))
    if parts is None:
        return None
    fingerprint, expires, nonce, mac = parts.groups()
    if int(expires) <= time.time():
        return None
    found = None
    for secret in settings.admin_tokens:
        token = secret.get_secret_value()
        expected = _mac(_key(token), f"{fingerprint}.{expires}.{nonce}")
        # Every configured token is tried, whatever matched first.
        if hmac.compare_digest(expected.encode(), mac.encode()):
            found = _session(token, nonce)
    return found


def new_sign_in_value() -> str:
    """A fresh CSRF value for the sign-in form (`remember_sign_in_value` sets it as a
    cookie on the answer that shows the form)."""
    return secrets.token_hex(16)


def remember_sign_in_value(
    response: web.StreamResponse, settings: config.Settings, value: str
) -> None:
    """The sign-in form's CSRF value as a short-lived cookie."""
    _set(response, settings, SIGN_IN_COOKIE, value, 600)


def check_sign_in_form(request: web.Request, posted: str) -> None:
    """`errors.Forbidden` unless the sign-in form's CSRF value is its cookie's."""
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), posted.encode()):
        raise errors.Forbidden("the form's CSRF token is missing or wrong: reload the page")


def check_form(session: Session, posted: str) -> None:
    """`errors.Forbidden` unless `posted` is the session's CSRF token."""
    if not hmac.compare_digest(session.csrf.encode(), posted.encode()):
        raise errors.Forbidden("the form's CSRF token is missing or wrong: reload the page")


def _set(
    response: web.StreamResponse, settings: config.Settings, name: str, value: str, age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path=PATH,
        httponly=True,
        samesite="Strict",
        # A plain-HTTP console is only for loopback (an ssh tunnel): anywhere else the
        # cookie travels over TLS only.
        secure=not endpoints.is_loopback(settings.admin_host),
    )

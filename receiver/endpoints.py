"""Which URL a credential may travel to, and how a URL may be printed.

The one rule for every outgoing call that carries a secret (the Debitura API key, a
token in a replayed body, the partner library's API key): `https://` to a named host,
or `http://` to this machine (a stand-in on loopback); never with a user or password
in the URL itself. The settings, the replay tool and the partner library's transport
all ask `credential_problem`.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
RULE = "https:// (http:// only to a loopback host), with no user or password in the URL"


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine (127.0.0.0/8, ::1, localhost), in any case."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def credential_problem(url: str) -> str | None:
    """Why a credential may not travel to `url` (the rule, never the URL), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        return f"not a URL: the rule is {RULE}"
    host = parts.hostname or ""
    scheme = parts.scheme.lower()
    secure = scheme == "https" and bool(host)
    local = scheme == "http" and bool(host) and is_loopback(host)
    if not (secure or local) or parts.username is not None or parts.password is not None:
        return f"must be {RULE}"
    return None


def shown(url: str) -> str:
    """A URL as it may be printed: scheme, host, port and path; no user, password,
    query or fragment (any of which can hold a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

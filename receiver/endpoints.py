"""Which URL a credential may travel to, and how a URL may be printed.

The one rule for every outgoing call that carries a secret (the Debitura API key, a
token in a replayed body, the partner library's API key): `https://` to a named host,
or `http://` to this machine (a stand-in on loopback); never with a user or password
in the URL itself. The settings, the replay tool and the partner library's transport
all ask `credential_problem`. A Postgres URL is printed as its hosts and ports
(`database_hosts`), never with its user or password.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

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


_PORT = re.compile(r"[0-9]{1,5}")


def database_hosts(url: str) -> list[str]:
    """Where a Postgres URL points, as `host:port` in the order they are tried, never
    the user or password (the start line names them)."""
    return [
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for host, port in database_addresses(url)
    ]


# libpq's values (and asyncpg's), beside `target_session_attrs=` in a URL.
SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")


def database_url_problem(url: str) -> str | None:
    """What makes a Postgres URL one that no driver can use as meant (never a value of
    it), or None. Checked at start-up: each is a line and exit 2, where the driver
    would raise a traceback quoting part of the URL, or wait for ever on what looks
    like a database that is down."""
    parts = urlsplit(url)
    if "@" in parts.path or "@" in parts.fragment:
        return "has an @ after its host: percent-encode / ? # in the user or password"
    fields = [field for field in parts.query.split("&") if field]
    if any("=" not in field for field in fields):
        return (
            "has a query parameter with no value"
            " (or an unencoded ? in the user or password: percent-encode it)"
        )
    query = parse_qs(parts.query)
    hosts = parts.netloc.rpartition("@")[2]
    if hosts.strip(",") and "host" in query:
        # libpq takes the query's hosts, asyncpg those before the path: psql and the
        # receiver would connect to different servers.
        return "names its hosts twice (before the path and in ?host=): keep one"
    attrs = query.get("target_session_attrs", [])
    if any(value not in SESSION_ATTRS for value in attrs):
        return f"has a target_session_attrs that is not one of {', '.join(SESSION_ATTRS)}"
    try:
        addresses = database_addresses(url)
    except ValueError as exc:
        return str(exc)
    ports = (query.get("port") or [""])[0].split(",")
    if len(ports) > 1 and len(ports) != len(addresses):
        return "names more or fewer ports than hosts (one port for every host, or one for all)"
    return None


def database_addresses(url: str) -> list[tuple[str, int]]:
    """The hosts (or socket directories) and ports of a Postgres URL, in order. libpq's
    syntax names several for a primary and its standbys (`postgresql://h1:5432,h2:5432/
    db?target_session_attrs=read-write`, docs/design.md §9, Failover), or puts them in the query
    (`?host=/run/pg`, `?host=a,b&port=1,2`). Raises ValueError (naming no value) for a
    port that is not a number."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    netloc = parts.netloc.rpartition("@")[2]
    query_hosts = (query.get("host") or ["localhost"])[0].split(",")
    query_ports = (query.get("port") or ["5432"])[0].split(",")
    if netloc:
        pairs = [_host_and_port(item) for item in netloc.split(",")]
    else:
        pairs = [(host, "") for host in query_hosts]
    # libpq: one port per host, or one for every host
    same = len(query_ports) == len(pairs)
    defaults = query_ports if same else [query_ports[0]] * len(pairs)
    addresses = []
    for (host, port), default in zip(pairs, defaults, strict=True):
        port = port or default
        if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise ValueError("has a port that is not a number from 1 to 65535")
        addresses.append((unquote(host) or query_hosts[0], int(port)))
    return addresses


def _host_and_port(item: str) -> tuple[str, str]:
    if item.startswith("["):  # an IPv6 address: [::1]:5432
        host, _, rest = item[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = item.partition(":")
    return host, port

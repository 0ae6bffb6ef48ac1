"""Who sent a request: the peer, or the client behind `RECEIVER_TRUSTED_PROXIES`
(X-Forwarded-For read from the right)."""

from __future__ import annotations

import ipaddress
from typing import Any

from aiohttp import web

from receiver.service import state


def client_address(request: web.Request) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the
    nearest address in X-Forwarded-For that is not itself a trusted proxy (read from
    the right: only what trusted proxies appended can be believed)."""
    peer = request.remote
    trusted = request.app[state.SETTINGS].trusted_proxies
    if not trusted or peer is None or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    address = peer
    for hop in reversed([h for h in hops if h]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage: nothing further left can be believed
        address = hop
        if not _trusted(hop, trusted):
            break
    return address


def _trusted(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)

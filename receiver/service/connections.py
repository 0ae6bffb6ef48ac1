"""What a stranger's connection may hold, as numbers: how much progress a connection
has made (who makes room when the connection cap is reached), when a body arrives
too slowly to be kept, and how many connections one source may hold before it has
sent an authentic delivery (README "Security").

Kept apart from server.py, which wires these into aiohttp's protocol, so the rules
are plain functions a unit test can pin without sockets.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import Any, Protocol

# A newcomer is ranked as if it had sent this much: a delivery's headers and body come
# in a packet or two right after the connection opens, and until they do the
# connection has sent nothing at all. Without the credit a sender whose packet is a
# round trip behind its SYN would rank below every stranger that trickles a byte.
NEW_CONNECTION_CREDIT_BYTES = 1024
# Ages below this count as this: younger connections rank by what they sent. Short,
# so that a stranger that sent its headers a moment ago soon ranks below a newcomer
# whose request is still a round trip away; long enough for that round trip.
_MIN_AGE_SECONDS = 0.25


def progress(received: int, age: float) -> float:
    """A connection's progress: bytes received per second since it opened, with the
    newcomer's credit. Idle connections, trickled headers and trickled bodies all
    fall towards their true rate (near zero) as they age; a sender that sends its
    request at once stays far above them."""
    return (received + NEW_CONNECTION_CREDIT_BYTES) / max(age, _MIN_AGE_SECONDS)


def rank(received: int, age: float) -> tuple[bool, float]:
    """The order in which connections make room: those older than a round trip by
    their `progress`, and only then the youngest, whose request may be in the air."""
    return (age < _MIN_AGE_SECONDS, progress(received, age))


def stalled(ranked: tuple[bool, float], floor: float) -> bool:
    """Whether a connection with this `rank` is not making progress: older than a round
    trip and receiving slower than `floor` bytes per second since it opened. A
    sender's connections that are sending their requests never are."""
    young, rate = ranked
    return not young and rate < floor


def body_cut_at(started: float, received: int, floor: float, grace: float) -> float:
    """When a body that began at `started` and has `received` bytes so far falls below
    `floor` bytes per second (averaged since it began) if nothing more arrives; never
    before `grace` seconds have passed."""
    return started + max(grace, received / floor)


class Ranked(Protocol):
    """A connection as eviction sees it."""

    def evictable(self) -> bool:
        """Whether closing it loses nobody's authentic delivery."""

    def rank(self, now: float) -> tuple[bool, float]:
        """Its `rank` at `now`."""


def least_progress(connections: Iterable[Ranked], now: float, count: int) -> list[Ranked]:
    """The `count` evictable connections that rank lowest, oldest first among equals
    (connections iterate in the order they opened): one pass, O(n log count)."""
    scored = ((c.rank(now), c) for c in connections if c.evictable())
    return [c for _, c in heapq.nsmallest(count, scored, key=itemgetter(0))]


class Sources:
    """The connections each source address holds that have not yet authenticated:
    at most `limit` per address. The address is the TCP peer's: behind a proxy that
    is the proxy, so a trusted proxy (RECEIVER_TRUSTED_PROXIES) is not counted and its
    own limits apply."""

    def __init__(self, limit: int, trusted: tuple[Any, ...] = ()) -> None:
        self.limit = limit
        self._trusted = trusted
        self._held: dict[str, dict[Any, None]] = {}

    def counted(self, address: str | None) -> bool:
        """Whether connections from `address` count against the limit."""
        if address is None:
            return False  # a Unix socket: no address to count
        if not self._trusted:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return True
        return not any(ip in network for network in self._trusted)

    def holding(self, address: str) -> Iterator[Any]:
        """The connections `address` holds, oldest first."""
        return iter(self._held.get(address, ()))

    def full(self, address: str) -> bool:
        """Whether `address` holds `limit` connections already."""
        return len(self._held.get(address, ())) >= self.limit

    def add(self, address: str, connection: Any) -> None:
        """Count `connection` against `address`."""
        self._held.setdefault(address, {})[connection] = None

    def discard(self, address: str, connection: Any) -> None:
        """Stop counting `connection` (it authenticated, or closed)."""
        held = self._held.get(address)
        if held is not None:
            held.pop(connection, None)
            if not held:
                del self._held[address]

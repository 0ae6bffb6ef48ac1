"""The numbers behind the connection rules (receiver/service/connections.py): who makes
room at the cap, when a body is too slow, how many connections a source may hold."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from receiver.service import connections


@dataclass(eq=False)
class _Connection:
    received: int
    age: float
    busy_with_authentic_delivery: bool = False

    def evictable(self) -> bool:
        return not self.busy_with_authentic_delivery

    def rank(self, now: float) -> tuple[bool, float]:
        return connections.rank(self.received, self.age)


def test_a_prompt_sender_outranks_idle_slow_header_and_slow_body_connections() -> None:
    """Idle (nothing in 5 s), trickled headers (100 B in 5 s) and a trickled body (300
    B in 3 s) all rank below a sender whose 3 KB arrived at once, and below a newcomer
    that has sent nothing yet; a stranger that sent its headers a moment ago ranks
    below that newcomer once it is older than a round trip."""
    idle = _Connection(0, 5.0)
    headers = _Connection(100, 5.0)
    body = _Connection(300, 3.0)
    prompt = _Connection(3000, 0.01)
    newcomer = _Connection(0, 0.001)
    order = connections.least_progress([prompt, newcomer, body, headers, idle], 0.0, 5)
    assert order[:3] == [idle, headers, body]
    assert set(order[3:]) == {prompt, newcomer}
    recent_headers = _Connection(200, 0.3)
    assert connections.least_progress([newcomer, recent_headers], 0.0, 1) == [recent_headers]


def test_a_connection_carrying_an_authentic_delivery_is_never_chosen() -> None:
    """The one connection running a verified delivery is skipped even though it has
    the least progress; with nothing else, nothing is chosen."""
    verified = _Connection(0, 60.0, busy_with_authentic_delivery=True)
    other = _Connection(5000, 1.0)
    assert connections.least_progress([verified, other], 0.0, 1) == [other]
    assert connections.least_progress([verified], 0.0, 1) == []


def test_equal_progress_chooses_the_oldest_first() -> None:
    """Among connections with equal progress, the one that opened first goes first."""
    first, second, third = _Connection(0, 1.5), _Connection(0, 1.5), _Connection(0, 1.5)
    assert connections.least_progress([first, second, third], 0.0, 2) == [first, second]


def test_the_body_floor_waits_for_the_grace_then_averages() -> None:
    """A body is not cut before the grace; after it, not before its average falls
    below the floor: 10,000 bytes at 1 KiB/s last until 10,000/1,024 s."""
    assert connections.body_cut_at(100.0, 0, 1024, 2.0) == 102.0
    assert connections.body_cut_at(100.0, 1000, 1024, 2.0) == 102.0
    assert connections.body_cut_at(100.0, 10_000, 1024, 2.0) == 100.0 + 10_000 / 1024


def test_a_source_holds_at_most_its_limit_and_trusted_proxies_are_not_counted() -> None:
    """Sources counts connections per address up to its limit, lets one go when it
    authenticates or closes, and does not count a trusted proxy's."""
    sources = connections.Sources(2, (ipaddress.ip_network("10.0.0.0/8"),))
    assert sources.counted("192.0.2.1")
    assert not sources.counted("10.1.2.3")
    assert not sources.counted(None)
    a, b = object(), object()
    sources.add("192.0.2.1", a)
    assert not sources.full("192.0.2.1")
    sources.add("192.0.2.1", b)
    assert sources.full("192.0.2.1")
    assert list(sources.holding("192.0.2.1")) == [a, b]
    sources.discard("192.0.2.1", a)
    assert not sources.full("192.0.2.1")
    assert list(sources.holding("192.0.2.1")) == [b]

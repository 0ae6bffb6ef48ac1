"""Faults a test asks the sandbox to commit on its Referral Partner API calls.

- `fail_next(call, status, times=1, retry_after=None)`: the next `times` requests to
  `call` are answered `status` (with `Retry-After` when given) and change nothing.
- `drop_after(call, times=1)`: the next `times` requests take effect (the rotation
  happens, the token is revoked), then the connection is closed without an answer.
- `delay(call, seconds)`: every following request to `call` takes effect, then waits
  `seconds` before answering (0 ends it): a client that times out has lost the answer.
- `hold(call, seconds)`: the next request to `call` waits `seconds` *before* it takes
  effect, then takes effect and answers. A client that gives up sooner has lost the
  answer, and the effect (a rotation) still lands later: fetch shows the old token
  until then.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from receiver import errors

CALLS = ("fetch", "rotate", "revoke", "validate", "oauth", "cases", "link", "list")


@dataclass(frozen=True, slots=True)
class Failure:
    """An injected answer: its status and optional Retry-After seconds."""

    status: int
    retry_after: float | None = None


class Faults:
    """Pending faults per call, consumed in order by the request handlers."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[Failure]] = {call: deque() for call in CALLS}
        self._drops: dict[str, int] = dict.fromkeys(CALLS, 0)
        self._delays: dict[str, float] = dict.fromkeys(CALLS, 0.0)
        self._holds: dict[str, deque[float]] = {call: deque() for call in CALLS}

    @staticmethod
    def _check(call: str) -> None:
        if call not in CALLS:
            raise errors.UsageError(f"unknown call {call!r}: one of {', '.join(CALLS)}")

    def fail_next(
        self, call: str, status: int, times: int = 1, retry_after: float | None = None
    ) -> None:
        """Answer the next `times` requests to `call` with `status`, without effect."""
        self._check(call)
        self._failures[call].extend(Failure(status, retry_after) for _ in range(times))

    def drop_after(self, call: str, times: int = 1) -> None:
        """Apply the next `times` requests to `call`, then close without answering."""
        self._check(call)
        self._drops[call] += times

    def delay(self, call: str, seconds: float) -> None:
        """Hold every following answer to `call` for `seconds` after its effect."""
        self._check(call)
        self._delays[call] = seconds

    def hold(self, call: str, seconds: float) -> None:
        """Keep the next request to `call` unanswered and without effect for `seconds`,
        then apply it and answer."""
        self._check(call)
        self._holds[call].append(seconds)

    def clear(self) -> None:
        """Forget every pending fault."""
        for call in CALLS:
            self._failures[call].clear()
            self._drops[call] = 0
            self._delays[call] = 0.0
            self._holds[call].clear()

    def take_failure(self, call: str) -> Failure | None:
        """The injected failure for this request to `call`, if any (consumed)."""
        pending = self._failures[call]
        return pending.popleft() if pending else None

    def take_drop(self, call: str) -> bool:
        """Whether this request to `call` loses its answer (consumed)."""
        if self._drops[call] <= 0:
            return False
        self._drops[call] -= 1
        return True

    def delay_for(self, call: str) -> float:
        """Seconds to hold the answer to `call`."""
        return self._delays[call]

    def take_hold(self, call: str) -> float:
        """Seconds to hold this request to `call` before its effect (consumed; 0: none)."""
        pending = self._holds[call]
        return pending.popleft() if pending else 0.0

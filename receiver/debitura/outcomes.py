"""What one token action did for one client, as commands print it and metrics count it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from receiver import errors


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one action for one client and environment. Carries prefixes
    only, never a token."""

    client_id: str
    environment: str
    status: str  # rotated, resumed, fetched, unchanged, not_rotated, ... or failed
    ok: bool = True
    prefix: str | None = None
    old_prefix: str | None = None
    detail: str | None = None
    # Debitura answered 5xx or 429 (or nothing): a schedule pauses on it.
    unavailable: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One line for people: who, what, and why when it failed."""
        text = f"{self.client_id} {self.environment}: {self.status}"
        if self.prefix:
            text += f" {self.prefix}…"
        if self.old_prefix and self.old_prefix != self.prefix:
            text += f" (was {self.old_prefix}…)"
        if self.detail:
            text += f": {self.detail}"
        return text

    def as_dict(self) -> dict[str, Any]:
        """For JSON output."""
        return {
            "client_id": self.client_id,
            "environment": self.environment,
            "status": self.status,
            "ok": self.ok,
            "token_prefix": self.prefix,
            "old_prefix": self.old_prefix,
            "detail": self.detail,
            **self.extra,
        }


def failed(
    client_id: str, environment: str, exc: errors.ReceiverError | str, **values: Any
) -> Outcome:
    """A failed outcome from an error (its message never holds a token)."""
    unavailable = isinstance(exc, errors.DebituraUnavailable | errors.DebituraRateLimited)
    return Outcome(
        client_id,
        environment,
        values.pop("status", "failed"),
        ok=False,
        detail=str(exc),
        unavailable=unavailable or isinstance(exc, errors.DatabaseUnavailable),
        **values,
    )

"""The dispatcher's retry schedule: full jitter under a doubling, capped ceiling."""

from __future__ import annotations

import random

import pytest

from receiver.signals import outbox


@pytest.mark.parametrize(
    ("attempts", "ceiling"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (5, 16.0), (30, 300.0), (10_000, 300.0)],
)
def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling(
    attempts: int, ceiling: float
) -> None:
    """Delays spread over [0, base·2^(n-1)], capped (here at 300 s): never above
    the ceiling, and (seeded, 500 draws) reaching into its top tenth and bottom tenth."""
    random.seed(attempts)
    delays = [outbox.backoff_seconds(attempts, 1.0, 300.0) for _ in range(500)]
    assert all(0 <= d <= ceiling for d in delays)
    assert max(delays) > 0.9 * ceiling
    assert min(delays) < 0.1 * ceiling

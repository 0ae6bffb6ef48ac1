"""serve's schedules: how a reconcile run that could not finish paces the next."""

from __future__ import annotations

from receiver.debitura import schedule


def test_a_reconcile_run_that_could_not_finish_pauses_the_next_ever_longer() -> None:
    """After an incomplete run the environment waits the poll, then twice that, up to
    the interval; a complete run ends the pause; environments pause apart."""
    paused = schedule.Backoff(30.0, 100.0)
    assert not paused.waiting("live", 0.0)
    paused.ran("live", complete=False, now=0.0)
    assert paused.waiting("live", 29.0)
    assert not paused.waiting("live", 30.0)
    assert not paused.waiting("test", 1.0)
    paused.ran("live", complete=False, now=30.0)
    assert paused.waiting("live", 89.0)
    assert not paused.waiting("live", 90.0)
    paused.ran("live", complete=False, now=90.0)
    paused.ran("live", complete=False, now=190.0)
    assert paused.waiting("live", 289.0)  # capped at the interval (100 s)
    assert not paused.waiting("live", 290.0)
    paused.ran("live", complete=True, now=290.0)
    assert not paused.waiting("live", 290.0)

"""The replay sender's pieces that need no network: progress, retry schedule, summary."""

from __future__ import annotations

import io

import pytest

from receiver.admin import sender


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def delivery(status: int | None, outcome: str | None = "processed") -> sender.Delivery:
    """A finished delivery."""
    return sender.Delivery(
        "client.onboarding_completed", "evt_1", "tok_test_abc123", status, outcome, None, 3.0, 1
    )


def test_progress_draws_only_on_a_terminal() -> None:
    """The progress bar (count, rate, failures) appears on a terminal, never in a pipe."""
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = sender.Progress(4, stream)
        for status in (200, 200, 500, 200):
            progress.advance(delivery(status))
    final = terminal.getvalue().rsplit("\r", 1)[-1]
    assert "4/4" in final
    assert "event/s" in final
    assert "1 failed" in final
    assert pipe.getvalue() == ""


@pytest.mark.parametrize(
    ("attempt", "base"), [(1, 0), (2, 60), (3, 120), (4, 240), (7, 1800), (8, 1800)]
)
def test_retry_delays_follow_debiturass_schedule(attempt: int, base: int) -> None:
    """The wait before each try is the schedule's entry, ±10%: 8 tries over ~1.5 h."""
    delay = sender.RetryPolicy().delay_before(attempt)
    assert base * 0.9 <= delay <= base * 1.1


def test_the_whole_schedule_spans_about_an_hour_and_a_half() -> None:
    """Eight tries take about 1.5 h from the first to the last, as Debitura's do."""
    total = sum(
        sender.RetryPolicy(schedule=sender.DEBITURA_SCHEDULE).delay_before(a) for a in range(1, 9)
    )
    assert 0.9 * 5460 <= total <= 1.1 * 5460


def test_summary_counts_statuses_and_failures() -> None:
    """The summary splits HTTP statuses and receiver outcomes, and counts failures."""
    summary = sender.Summary(url="http://x")
    summary.deliveries += [
        delivery(200),
        delivery(200, "duplicate"),
        delivery(401, None),
        delivery(None, None),
    ]
    data = summary.as_dict()
    assert data["by_http_status"] == {"200": 2, "401": 1, "error": 1}
    assert data["by_status"] == {"processed": 1, "duplicate": 1}
    assert data["failed"] == 2
    assert "2 acknowledged, 2 failed" in summary.render()

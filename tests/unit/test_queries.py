"""The named queries: each says what it is for."""

from __future__ import annotations

from receiver import db


def test_every_named_query_has_a_description_line() -> None:
    """Each `-- name:` block starts with a comment saying what it does."""
    undescribed = [name for name, sql in db.QUERIES.items() if not sql.startswith("--")]
    assert undescribed == []

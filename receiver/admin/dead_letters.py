"""Dead signals put back to pending on an operator's word (`receiver signals retry`,
the console's signals page), each one audited in the same transaction."""

from __future__ import annotations

from receiver import db
from receiver.lifecycle import audit


async def retry(database: db.Database, actor: audit.Actor, ids: list[str] | None) -> list[str]:
    """Dead letters (all, or those named) back to pending with a fresh count; their
    ids. One audit row per signal retried (client, environment, token prefix), in the
    transaction that retries it: no retry goes unrecorded."""
    async with database.connection() as conn, conn.transaction():
        rows = await conn.fetch(db.QUERIES["retry_dead_signals"], ids)
        for row in rows:
            await audit.audit(
                conn,
                actor,
                "signals_retry",
                client_id=row["client_id"],
                environment=row["environment"],
                token_prefix=row["token_prefix"],
                detail={"signal_id": row["id"], "signal_reason": row["reason"]},
            )
    return [row["id"] for row in rows]

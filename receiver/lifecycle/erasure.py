"""Erasure: forgetting one client (its token values and stored bodies), leaving a
tombstone in the audit trail."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog

from receiver import config, db, vault
from receiver.lifecycle import audit

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Erasure:
    """What erasing one client removed."""

    client_hash: str
    event_key: str | None = None  # None: there was nothing left to erase
    tokens: int = 0
    bodies: int = 0
    environments: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For the audit row and the command's output."""
        return {
            "client_hash": self.client_hash,
            "event_key": self.event_key,
            "tokens": self.tokens,
            "bodies": self.bodies,
            "environments": self.environments,
        }


async def erase_client(
    database: db.Database,
    settings: config.Settings,
    sealer: vault.Sealer,
    client_id: str,
    actor: audit.Actor,
) -> Erasure:
    """Remove every token value and stored body of `client_id`, in one transaction
    under the client's lock (a delivery for it waits, then finds it erased): its
    tokens end revoked with no value and no blind index, its events keep their keys
    without bodies, an invalidation signal is queued per environment, and a
    tombstone (the client's hash, who, when, why) goes to the audit trail.

    Idempotent: when nothing is left to remove, nothing is written.
    """
    erasure = Erasure(client_hash=audit.client_hash(sealer, client_id))
    async with database.connection() as conn, conn.transaction():
        await conn.execute(db.QUERIES["lock_client"], client_id)
        # Quarantined bodies that were not JSON have no redacted copy to search: they
        # are opened (in memory) and searched for the client id as a JSON string, so
        # that erasing cli_1 leaves cli_10's alone.
        quoted = json.dumps(client_id).encode()
        unreadable = [
            row["key"]
            for row in await conn.fetch(db.QUERIES["unreadable_bodies"])
            if quoted
            in sealer.keyring.open(
                row["body_sealed"], vault.event_associated_data(row["sealed_for"])
            )
        ]
        pending = await conn.fetchrow(db.QUERIES["erase_pending"], client_id, unreadable)
        assert pending is not None
        if not pending["tokens"] and not pending["bodies"]:
            return erasure
        erasure.event_key = f"erase_{uuid.uuid4().hex}"
        erasure.environments = list(pending["environments"] or ["live"])
        await conn.execute(
            db.QUERIES["insert_operator_event"], erasure.event_key, "receiver.client_erased"
        )
        erasure.tokens = len(
            await conn.fetch(db.QUERIES["erase_tokens"], client_id, erasure.event_key)
        )
        erasure.bodies = await conn.fetchval(db.QUERIES["erase_bodies"], client_id, unreadable)
        for environment in erasure.environments:
            await conn.execute(
                db.QUERIES["enqueue_signal"],
                client_id,
                environment,
                erasure.event_key,
                settings.notify_channel,
                settings.cache_url is not None,
            )
        await audit.audit(
            conn,
            actor,
            "client_erase",
            client_hash=erasure.client_hash,
            event_key=erasure.event_key,
            detail=erasure.as_dict(),
        )
    log.warning("client_erased", actor=actor.name, **erasure.as_dict())
    return erasure

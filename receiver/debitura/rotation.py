"""Crash-safe rotation through Debitura's rotate-token.

rotate-token is not idempotent, so a rotation is an intent row committed before the
call. The answer's new token is stored through the lifecycle and the intent closed
in one transaction. Anything in between (an answer lost to a timeout, a reset or a
5xx; the process killed; the database down) leaves the intent open, and `resume`
finishes it with a fetch, never a second rotate: a token Debitura holds that the
vault does not is stored, and the old one superseded with the 24 h grace. At no
moment is the stored active token one that Debitura replaced without an open intent
saying so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import structlog

from receiver import config, db, errors, metrics, redaction, vault
from receiver.debitura import api, outcomes
from receiver.lifecycle import adoption, audit, events

log = structlog.get_logger(__name__)

DEFAULT_REASON = "scheduled_rotation"
RESUME_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Rotator:
    """Rotations, their resumption, and the due ones, for one database and API."""

    database: db.Database
    settings: config.Settings
    sealer: vault.Sealer
    api: api.Api

    async def rotate(
        self,
        client_id: str,
        environment: str,
        actor: audit.Actor,
        *,
        reason: str = DEFAULT_REASON,
        revoke_immediately: bool = False,
        trigger: str = "manual",
    ) -> outcomes.Outcome:
        """Rotate the client's active token in `environment` now."""
        outcome = await self._rotate(
            client_id, environment, actor, reason, revoke_immediately=revoke_immediately
        )
        _count(trigger, outcome)
        return outcome

    async def _rotate(
        self,
        client_id: str,
        environment: str,
        actor: audit.Actor,
        reason: str,
        *,
        revoke_immediately: bool,
    ) -> outcomes.Outcome:
        where = api.endpoint(self.settings, environment)
        # The reason is stored in the intent row, audited and sent to Debitura: masked
        # and bounded as every audited text is, whoever called.
        reason = audit.clean(reason)
        old = await self.database.fetchval("active_prefix", client_id, environment)
        if old is None:
            return outcomes.failed(client_id, environment, "no active token to rotate")
        intent = await self.database.fetchval(
            "rotation_intent_open",
            client_id,
            environment,
            old,
            reason,
            revoke_immediately,
            actor.name,
        )
        if intent is None:
            return outcomes.failed(
                client_id,
                environment,
                "a rotation of this client is unfinished: run `receiver tokens rotate --resume`",
            )
        log.info("rotation_started", client_id=client_id, environment=environment, intent=intent)
        try:
            rotated = await self.api.rotate(
                where, client_id, reason, revoke_immediately=revoke_immediately
            )
        except errors.DebituraAnswerLost as exc:
            # It may have happened: ask Debitura what the token is now.
            log.warning("rotation_answer_lost", client_id=client_id, intent=intent)
            finished = await self._finish(intent, actor)
            if finished is None:
                return outcomes.failed(client_id, environment, exc, status="pending")
            return finished
        except errors.DebituraError as exc:
            # Refused or never sent: Debitura changed nothing.
            await self.database.fetchval("rotation_intent_close", intent, "failed", None, str(exc))
            return outcomes.failed(client_id, environment, exc, old_prefix=old)
        await _pause_for_tests(self.settings.test_pause_after_rotate)
        try:
            stored = await adoption.import_token(
                self.database,
                self.settings,
                self.sealer,
                client_id,
                rotated.token.get_secret_value(),
                actor,
                supersede=True,
                old_expires_at=rotated.old_expires_at,
                revoke_old=revoke_immediately,
                action="token_rotate",
                key_prefix="rotate",
                detail={"intent": intent, "revoke_immediately": revoke_immediately},
                close_intent=adoption.IntentClosure(intent, "rotated"),
            )
        except errors.DatabaseUnavailable as exc:
            log.error("rotation_not_stored", client_id=client_id, intent=intent)  # noqa: TRY400
            return outcomes.failed(
                client_id,
                environment,
                f"{exc}; the rotation is recorded: `receiver tokens rotate --resume` finishes it",
                status="pending",
                prefix=rotated.prefix,
                old_prefix=old,
            )
        return outcomes.Outcome(
            client_id, environment, "rotated", prefix=stored.prefix, old_prefix=old
        )

    async def resume(self, actor: audit.Actor) -> list[outcomes.Outcome]:
        """Finish every open rotation (oldest first) with a fetch each."""
        rows = await self.database.fetch("rotation_intents_open", RESUME_BATCH)
        done = []
        for row in rows:
            try:
                outcome = await self._finish(row["id"], actor, row=row)
            except errors.ConfigError as exc:
                outcome = outcomes.failed(row["client_id"], row["environment"], exc)
            if outcome is None:
                outcome = outcomes.failed(
                    row["client_id"], row["environment"], "still unresolved", status="pending"
                )
            _count("resume", outcome)
            done.append(outcome)
        return done

    async def _finish(
        self, intent: int, actor: audit.Actor, *, row: db.Record | None = None
    ) -> outcomes.Outcome | None:
        """Resolve one open rotation by fetching the client's current token; None
        when it stays open (Debitura or the database unavailable)."""
        if row is None:
            rows = await self.database.fetch("rotation_intent", intent)
            if not rows:
                return None
            row = rows[0]
        client_id, environment = row["client_id"], row["environment"]
        where = api.endpoint(self.settings, environment)
        try:
            fetched = await self.api.fetch(where, client_id)
        except errors.DebituraNotFound as exc:
            await self.database.fetchval("rotation_intent_close", intent, "failed", None, str(exc))
            return outcomes.failed(client_id, environment, exc)
        except errors.DebituraError as exc:
            await self.database.fetchval("rotation_intent_retry_later", intent, str(exc))
            log.warning("rotation_resume_failed", client_id=client_id, error=type(exc).__name__)
            return None
        token = fetched.token.get_secret_value()
        if redaction.token_environment(token) != environment:
            await self.database.fetchval(
                "rotation_intent_retry_later", intent, "fetched a token of the other environment"
            )
            return outcomes.failed(
                client_id, environment, "Debitura returned a token of the other environment"
            )
        if fetched.status not in (None, "active"):
            # Revoked (or anything but active) at Debitura since: nothing to store as
            # the active token; the revocation reaches the vault by its webhook or by
            # `clients revoke`.
            await self.database.fetchval(
                "rotation_intent_close", intent, "failed", None, f"token {fetched.status}"
            )
            return outcomes.failed(
                client_id, environment, f"Debitura says the token is {fetched.status}"
            )
        known = await self.database.fetch(
            "token_by_index", vault.blind_index(self.sealer.index_key, token)
        )
        if known:
            # Stored already: either the rotation never happened (the old token is
            # still the current one) or a webhook brought the new one first.
            current = known[0]
            outcome = (
                "not_rotated"
                if current["prefix"] == row["old_prefix"] and current["status"] == "active"
                else "already_stored"
            )
            await self.database.fetchval(
                "rotation_intent_close", intent, outcome, current["prefix"], None
            )
            log.info("rotation_resolved", client_id=client_id, intent=intent, outcome=outcome)
            return outcomes.Outcome(
                client_id,
                environment,
                outcome,
                ok=outcome == "already_stored",
                prefix=current["prefix"],
                old_prefix=row["old_prefix"],
                detail="Debitura still holds the old token: rotate again"
                if outcome == "not_rotated"
                else None,
            )
        # Debitura's grace began after the intent was recorded: counting from then
        # never claims the old token works longer than it does.
        expires = row["started_at"] + events.ROTATION_GRACE
        stored = await adoption.import_token(
            self.database,
            self.settings,
            self.sealer,
            client_id,
            token,
            audit.Actor(row["actor"], row["reason"]),
            supersede=True,
            old_expires_at=expires,
            revoke_old=row["revoke_immediately"],
            action="token_rotate",
            key_prefix="rotate",
            detail={"intent": intent, "resumed_by": actor.name},
            close_intent=adoption.IntentClosure(intent, "resumed"),
        )
        return outcomes.Outcome(
            client_id, environment, "resumed", prefix=stored.prefix, old_prefix=row["old_prefix"]
        )

    async def due(self, *, limit: int) -> list[db.Record]:
        """Active tokens older than RECEIVER_TOKEN_ROTATE_AFTER_DAYS with no rotation
        unfinished, in the environments whose API is configured, oldest first."""
        days = self.settings.token_rotate_after_days
        if days <= 0:
            return []
        return await self.database.fetch(
            "tokens_due_rotation",
            timedelta(days=days),
            api.configured(self.settings),
            limit,
        )

    async def rotate_due(
        self,
        actor: audit.Actor,
        *,
        limit: int,
        rate: float,
        trigger: str = "due",
    ) -> list[outcomes.Outcome]:
        """Rotate due tokens with the 24 h grace, at most `rate` per second. Stops at
        the first sign that Debitura is unavailable or rate limiting (5xx, 429, no
        answer): the rest stay due for the next run."""
        rows = await self.due(limit=limit)
        done: list[outcomes.Outcome] = []
        started = time.monotonic()
        for n, row in enumerate(rows):
            # Spread out: the n-th call goes no earlier than n / rate seconds in.
            wait = started + n / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            outcome = await self.rotate(
                row["client_id"], row["environment"], actor, trigger=trigger
            )
            done.append(outcome)
            if outcome.unavailable:
                log.warning("rotation_paused", remaining=len(rows) - n - 1)
                break
        return done


async def _pause_for_tests(path: Path | None) -> None:
    """TEST ONLY (RECEIVER_TEST_PAUSE_AFTER_ROTATE): say the answer arrived on the
    FIFO `path`, then wait for `<path>.release` to be opened and closed."""
    if path is None:
        return

    def handshake() -> None:
        with path.open("w") as fifo:
            fifo.write("answered\n")
        with Path(f"{path}.release").open() as release:
            release.read()

    await asyncio.to_thread(handshake)


def _count(trigger: str, outcome: outcomes.Outcome) -> None:
    metrics.TOKEN_ROTATIONS.labels(trigger=trigger, outcome=outcome.status).inc()
    log.info(
        "rotation_outcome",
        trigger=trigger,
        client_id=outcome.client_id,
        environment=outcome.environment,
        outcome=outcome.status,
        token_prefix=outcome.prefix,
    )

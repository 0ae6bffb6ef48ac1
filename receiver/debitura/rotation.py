"""Crash-safe rotation through Debitura's rotate-token.

rotate-token is not idempotent, so a rotation is an intent row committed before the
call: the claim on that token (one per token, re-checked as due when it is taken).
The answer's new token is stored through the lifecycle and the intent closed in one
transaction. Anything in between (an answer lost to a timeout, a reset or a 5xx; the
process killed; the database down) leaves the intent open, and `resume` settles it
with a fetch, never a second rotate: a token Debitura holds that the vault does not
is stored, and the old one superseded with the 24 h grace.

An uncertain outcome stays open (docs/design.md §9): a fetch that still shows the old
token may be early (Debitura can apply a held rotation later), so the intent is
checked again with backoff, and closed `not_rotated` only once the 24 h grace has
passed with the old token still Debitura's. At no moment is the stored active token
one that Debitura replaced without an open intent saying so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from receiver import config, db, errors, metrics, redaction, vault
from receiver.debitura import api, outcomes
from receiver.lifecycle import adoption, audit, events

log = structlog.get_logger(__name__)

DEFAULT_REASON = "scheduled_rotation"
RESUME_BATCH = 1000
# Due tokens read per query (tokens rotate --due, its --dry-run, the schedule).
DUE_PAGE = 500
# How far beyond the grace Debitura documents (24 h) an `old_token_expires_at` may
# reach before it is clamped (and logged): a year-9999 expiry would keep the old
# token's ciphertext readable and never pruned.
EXPIRY_MARGIN = timedelta(days=7)


# Where `tokens_due_rotation`'s keyset starts: before the oldest token.
FIRST_DUE_PAGE: tuple[datetime, str, str] = (datetime.min.replace(tzinfo=UTC), "", "")


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
        due: tuple[str, timedelta] | None = None,
    ) -> outcomes.Outcome:
        """Rotate the client's active token in `environment` now; with `due` (its
        prefix and age), only if that token is still the active one and still due
        when the rotation is claimed (else `skipped`)."""
        outcome = await self._rotate(
            client_id, environment, actor, reason, revoke_immediately=revoke_immediately, due=due
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
        due: tuple[str, timedelta] | None,
    ) -> outcomes.Outcome:
        where = api.endpoint(self.settings, environment)
        # The reason is stored in the intent row, audited and sent to Debitura: masked
        # and bounded as every audited text is, whoever called.
        reason = audit.clean(reason)
        old = (
            due[0] if due else await self.database.fetchval("active_prefix", client_id, environment)
        )
        if old is None:
            return outcomes.failed(client_id, environment, "no active token to rotate")
        # A revocation of the client made here from this moment on wins over the
        # rotation's answer: the new token is stored as onboarded now.
        began = datetime.now(UTC)
        intent = await self._claim(
            client_id, environment, old, reason, revoke_immediately, actor, due
        )
        if intent is None:
            return await self._not_claimed(client_id, environment, old, due=due is not None)
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
                finished = outcomes.failed(client_id, environment, exc, status="pending")
            if isinstance(exc, errors.DebituraNotARotation):
                # A token of the other world is no rotation, whatever the fetch found.
                return dataclasses.replace(
                    finished, ok=False, detail=f"{exc}; settled by a fetch: {finished.status}"
                )
            return finished
        except errors.DebituraError as exc:
            # Refused or never sent: Debitura changed nothing.
            await self.database.fetchval("rotation_intent_close", intent, "failed", None, str(exc))
            return outcomes.failed(client_id, environment, exc, old_prefix=old)
        await _pause_for_tests(self.settings.test_pause_after_rotate)
        expires = clamp_expiry(rotated.old_expires_at, client_id=client_id)
        try:
            same = await self._same_token(intent, rotated.token.get_secret_value(), old)
            if same is not None:
                return same
            stored = await adoption.import_token(
                self.database,
                self.settings,
                self.sealer,
                client_id,
                rotated.token.get_secret_value(),
                actor,
                supersede=True,
                old_expires_at=expires,
                revoke_old=revoke_immediately,
                action="token_rotate",
                key_prefix="rotate",
                detail={"intent": intent, "revoke_immediately": revoke_immediately},
                close_intent=adoption.IntentClosure(intent, "rotated"),
                onboarded_at=began,
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
        return await self._stored(stored, "rotated", old)

    async def _claim(
        self,
        client_id: str,
        environment: str,
        old: str,
        reason: str,
        revoke_immediately: bool,
        actor: audit.Actor,
        due: tuple[str, timedelta] | None,
    ) -> int | None:
        """The rotation's intent row (its claim on `old`), or None when it is not
        `old` to rotate any more. Under the client's lock, the lock every store of a
        token takes: the claim's statement then sees a rotation that was storing its
        answer as committed (the old token superseded). Without it, an insert that waited
        on that rotation's open intent went ahead on its stale view, and a due token was
        rotated twice."""
        async with self.database.connection() as conn, conn.transaction():
            await conn.execute(db.QUERIES["lock_client"], client_id)
            intent: int | None = await conn.fetchval(
                db.QUERIES["rotation_intent_open"],
                client_id,
                environment,
                old,
                reason,
                revoke_immediately,
                actor.name,
                due[1] if due else None,
            )
            return intent

    async def _same_token(self, intent: int, token: str, old: str) -> outcomes.Outcome | None:
        """A rotate answer whose new token is the active one it was to replace is not a
        rotation: the intent is closed failed and the command says so."""
        known = await self.database.fetch(
            "token_by_index", vault.blind_index(self.sealer.index_key, token)
        )
        if not (known and known[0]["prefix"] == old and known[0]["status"] == "active"):
            return None
        detail = "Debitura answered the current token as the new one: no rotation happened"
        await self.database.fetchval("rotation_intent_close", intent, "failed", None, detail)
        row = known[0]
        return outcomes.failed(
            row["client_id"], row["environment"], detail, prefix=old, old_prefix=old
        )

    async def _stored(
        self, stored: adoption.Imported, status: str, old: str | None
    ) -> outcomes.Outcome:
        """The outcome of storing a rotation's new token: a success only when it is now
        the client's active token."""
        state = stored.status
        if state == "already_stored":
            state = (
                await self.database.fetchval(
                    "token_status", stored.client_id, stored.environment, stored.prefix
                )
                or state
            )
        if state == "active":
            return outcomes.Outcome(
                stored.client_id, stored.environment, status, prefix=stored.prefix, old_prefix=old
            )
        return outcomes.failed(
            stored.client_id,
            stored.environment,
            f"the new token is stored {state}, not active: the client was revoked (here or "
            "at Debitura) after the rotation began",
            status=state,
            prefix=stored.prefix,
            old_prefix=old,
        )

    async def _not_claimed(
        self, client_id: str, environment: str, old: str, *, due: bool
    ) -> outcomes.Outcome:
        """Why no rotation was claimed: one is unfinished, or (for a due token) the
        token is no longer the active one or no longer due."""
        if await self.database.fetchval("rotation_intent_is_open", client_id, environment):
            if due:
                return outcomes.Outcome(
                    client_id, environment, "skipped", prefix=old, detail="a rotation is under way"
                )
            return outcomes.failed(
                client_id,
                environment,
                "a rotation of this client is unfinished: run `receiver tokens rotate --resume`",
                prefix=old,
            )
        if due:
            return outcomes.Outcome(
                client_id, environment, "skipped", prefix=old, detail="no longer due"
            )
        return outcomes.failed(
            client_id, environment, "the active token changed meanwhile: run it again", prefix=old
        )

    async def resume(self, actor: audit.Actor, *, due_only: bool = False) -> list[outcomes.Outcome]:
        """Settle open rotations (oldest first) with a fetch each: all of them, or with
        `due_only` those whose next check is due (the schedule's backoff)."""
        query = "rotation_intents_due" if due_only else "rotation_intents_open"
        rows = await self.database.fetch(query, RESUME_BATCH)
        done = []
        for row in rows:
            try:
                outcome = await self._finish(row["id"], actor, row=row)
            except errors.ConfigError as exc:
                outcome = outcomes.failed(row["client_id"], row["environment"], exc)
            if outcome is None:
                outcome = outcomes.failed(
                    row["client_id"],
                    row["environment"],
                    errors.DebituraUnavailable("still unresolved: Debitura could not be asked"),
                    status="pending",
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
            current = known[0]
            if current["prefix"] == row["old_prefix"] and current["status"] == "active":
                return await self._still_old(intent, row)
            # A webhook (or another command) brought the new token first.
            await self.database.fetchval(
                "rotation_intent_close", intent, "already_stored", current["prefix"], None
            )
            log.info(
                "rotation_resolved", client_id=client_id, intent=intent, outcome="already_stored"
            )
            return outcomes.Outcome(
                client_id,
                environment,
                "already_stored",
                ok=current["status"] == "active",
                prefix=current["prefix"],
                old_prefix=row["old_prefix"],
                detail=None if current["status"] == "active" else f"stored {current['status']}",
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
            onboarded_at=row["started_at"],
            issued_at=fetched.issued_at,
        )
        return await self._stored(stored, "resumed", row["old_prefix"])

    async def _still_old(self, intent: int, row: db.Record) -> outcomes.Outcome:
        """Debitura still shows the old token. Within the grace the rotation may yet
        apply (a held request): it stays open, checked again with backoff. After it,
        the old token outlived any rotation Debitura could have made: not rotated."""
        client_id, environment = row["client_id"], row["environment"]
        if datetime.now(UTC) - row["started_at"] < events.ROTATION_GRACE:
            await self.database.fetchval(
                "rotation_intent_retry_later", intent, "Debitura still shows the old token"
            )
            log.info("rotation_still_open", client_id=client_id, intent=intent)
            return outcomes.failed(
                client_id,
                environment,
                "Debitura still shows the old token, and the rotation may yet apply: it stays "
                "open, checked again by `serve` and `receiver tokens rotate --resume`",
                status="pending",
                prefix=row["old_prefix"],
            )
        await self.database.fetchval(
            "rotation_intent_close", intent, "not_rotated", row["old_prefix"], None
        )
        log.info("rotation_resolved", client_id=client_id, intent=intent, outcome="not_rotated")
        return outcomes.failed(
            client_id,
            environment,
            "the grace passed and Debitura still holds the old token: rotate again",
            status="not_rotated",
            prefix=row["old_prefix"],
            old_prefix=row["old_prefix"],
        )

    async def due_pages(
        self, *, limit: int | None = None, page_size: int = DUE_PAGE
    ) -> AsyncIterator[list[db.Record]]:
        """Active tokens older than RECEIVER_TOKEN_ROTATE_AFTER_DAYS with no rotation
        unfinished, in the environments whose API is configured, oldest first: page
        after page of at most `page_size` rows (a keyset over the tokens_due index),
        `limit` rows in all (None: every due token). One page in memory at a time."""
        days = self.settings.token_rotate_after_days
        if days <= 0:
            return
        after: tuple[datetime, str, str] = FIRST_DUE_PAGE
        left = limit
        while left is None or left > 0:
            size = page_size if left is None else min(page_size, left)
            page = await self.database.fetch(
                "tokens_due_rotation",
                timedelta(days=days),
                api.configured(self.settings),
                size,
                *after,
            )
            if page:
                yield page
            if len(page) < size:
                return
            last = page[-1]
            after = (last["due_since"], last["client_id"], last["environment"])
            if left is not None:
                left -= len(page)

    async def rotate_due(
        self,
        actor: audit.Actor,
        *,
        limit: int,
        rate: float,
        trigger: str = "due",
    ) -> list[outcomes.Outcome]:
        """Rotate due tokens with the 24 h grace, at most `rate` per second, at most
        `limit` of them, reading the due ones a page at a time. Stops at the first sign
        that Debitura is unavailable or rate limiting (5xx, 429, no answer): the rest
        stay due for the next run."""
        done: list[outcomes.Outcome] = []
        started = time.monotonic()
        n = 0
        async for page in self.due_pages(limit=limit):
            for row in page:
                # Spread out: the n-th call goes no earlier than n / rate seconds in.
                wait = started + n / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                n += 1
                outcome = await self.rotate(
                    row["client_id"],
                    row["environment"],
                    actor,
                    trigger=trigger,
                    due=(row["prefix"], timedelta(days=self.settings.token_rotate_after_days)),
                )
                done.append(outcome)
                if outcome.unavailable:
                    log.warning("rotation_paused", rotated=n)
                    return done
        return done


def clamp_expiry(expires: datetime | None, *, client_id: str) -> datetime | None:
    """Debitura's `old_token_expires_at`, at most the documented 24 h grace plus
    `EXPIRY_MARGIN` from now (logged when clamped)."""
    bound = datetime.now(UTC) + events.ROTATION_GRACE + EXPIRY_MARGIN
    if expires is None or expires <= bound:
        return expires
    log.warning("rotation_expiry_clamped", client_id=client_id, clamped_to=bound.isoformat())
    return bound


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

"""Bring the vault to Debitura's state (docs/design.md §9, "The vault reconciles").

The vault can miss what happened at Debitura: an onboarding webhook lost after
Debitura switched the subscription off, a rotation made elsewhere, a revocation sent
without a webhook. A run over one environment:

1. reads Debitura's list of the partner's clients a page at a time, and fetches and
   stores the token of every active client that has no active token here;
2. checks every active token here (a page of rows at a time, never all in memory)
   against Debitura's current one (fetch) and validates it: a token Debitura
   replaced (a rotation made elsewhere) gives way to Debitura's, superseded with the
   grace while Debitura still calls it valid, else revoked; one Debitura revoked or
   no longer has is revoked here.

Every change goes through the lifecycle (signal, audit row `token_reconcile`); the run
ends with one summary line and a `reconcile_runs` row. Calls are paced like rotation
and the run stops at the first sign that Debitura is unavailable or rate limiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from receiver import db, errors, redaction, vault
from receiver.debitura import api, management, outcomes
from receiver.lifecycle import adoption, audit

log = structlog.get_logger(__name__)

PAGE = 500


@dataclass
class Summary:
    """What one run saw and did."""

    environment: str
    listed: int = 0
    validated: int = 0
    changed: list[outcomes.Outcome] = field(default_factory=list)
    failed: list[outcomes.Outcome] = field(default_factory=list)
    complete: bool = True
    stopped: str | None = None

    def counts(self) -> dict[str, object]:
        """The run's figures (no client ids), as logged and stored."""
        return {
            "environment": self.environment,
            "listed": self.listed,
            "validated": self.validated,
            "changed": len(self.changed),
            "failed": len(self.failed),
            "complete": self.complete,
            "stopped": self.stopped,
        }


class _Pace:
    """At most `rate` Debitura calls per second, spread out."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._started = time.monotonic()
        self._calls = 0

    async def wait(self) -> None:
        delay = self._started + self._calls / self._rate - time.monotonic()
        self._calls += 1
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass(frozen=True, slots=True)
class Reconciler:
    """Reconcile runs for one database and API (through `management.Manager`)."""

    manager: management.Manager

    async def run(
        self,
        environment: str,
        actor: audit.Actor,
        *,
        dry_run: bool = False,
        trigger: str = "manual",
    ) -> Summary:
        """One run over `environment`: Debitura's list, then every active token here."""
        where = api.endpoint(self.manager.settings, environment)
        database = self.manager.database
        run_id = (
            None if dry_run else await database.fetchval("reconcile_started", environment, trigger)
        )
        summary = Summary(environment)
        pace = _Pace(self.manager.settings.token_rotate_rate)
        try:
            await self._listed(where, actor, summary, pace, dry_run=dry_run)
            if summary.stopped is None:
                await self._stored(actor, summary, pace, dry_run=dry_run)
        finally:
            if run_id is not None:
                await database.fetchval(
                    "reconcile_finished", run_id, summary.complete, json.dumps(summary.counts())
                )
        log.info("reconcile_run", trigger=trigger, dry_run=dry_run, **summary.counts())
        return summary

    async def client(
        self, client_id: str, environment: str, actor: audit.Actor
    ) -> outcomes.Outcome | None:
        """Reconcile one client (a partner application reported it): its active token
        validated and settled, or, without one, Debitura's fetched. None: no change."""
        summary = Summary(environment)
        rows = await self.manager.database.fetch("active_token_sealed", client_id, environment)
        if rows:
            await self._check(
                {**dict(rows[0]), "client_id": client_id}, actor, summary, dry_run=False
            )
        else:
            await self._fetch_missing(client_id, environment, actor, summary, dry_run=False)
        done = summary.changed + summary.failed
        return done[0] if done else None

    async def _listed(
        self,
        where: api.Endpoint,
        actor: audit.Actor,
        summary: Summary,
        pace: _Pace,
        *,
        dry_run: bool,
    ) -> None:
        """Step 1: every active client Debitura lists without an active token here."""
        environment = where.environment
        pages = self.manager.api.clients(where)
        while True:
            await pace.wait()
            try:
                page = await anext(pages)
            except StopAsyncIteration:
                return
            except errors.DebituraError as exc:
                _stop(summary, exc, "list")
                return
            summary.listed += len(page)
            for listed in page:
                if not _active(listed.status):
                    continue  # revoked there: its token here is caught by validation
                if await self.manager.database.fetchval(
                    "active_prefix", listed.client_id, environment
                ):
                    continue
                await pace.wait()
                await self._fetch_missing(
                    listed.client_id, environment, actor, summary, dry_run=dry_run
                )
                if summary.stopped is not None:
                    return

    async def _stored(
        self, actor: audit.Actor, summary: Summary, pace: _Pace, *, dry_run: bool
    ) -> None:
        """Step 2: every active token here, validated, a page of rows at a time."""
        after = ""
        while True:
            rows = await self.manager.database.fetch(
                "active_tokens_page", summary.environment, after, PAGE
            )
            for row in rows:
                await pace.wait()
                await self._check(row, actor, summary, dry_run=dry_run)
                if summary.stopped is not None:
                    return
            if len(rows) < PAGE:
                return
            after = rows[-1]["client_id"]

    async def _check(
        self,
        row: db.Record | dict[str, object],
        actor: audit.Actor,
        summary: Summary,
        *,
        dry_run: bool,
    ) -> None:
        """One active token here against Debitura: what it says of ours (validate),
        then its current token (fetch). Nothing is revoked on one answer alone: a token
        is revoked here only when Debitura calls it invalid *and* holds no usable token
        for the client; it gives way only to a token Debitura itself validates as this
        client's. Any other disagreement is reported, and changes nothing."""
        client_id, environment = str(row["client_id"]), summary.environment
        prefix = str(row["prefix"])
        manager = self.manager
        if await self._rotating(client_id, environment):
            return
        where = api.endpoint(manager.settings, environment)
        ours = manager.sealer.open_token(str(row["id"]), row["token_sealed"])  # type: ignore[arg-type]
        valid = await self._valid(where, ours, client_id, summary)
        if valid is None:
            return
        if not dry_run:
            await manager.database.fetchval(
                "token_validated", row["id"], valid.valid, valid.scopes, valid.issued_at
            )
        try:
            fetched = await manager.api.fetch(where, client_id)
        except errors.DebituraNotFound:
            fetched = None
        except errors.DebituraError as exc:
            _stop(summary, exc, "fetch", client_id)
            return
        current = None if fetched is None else fetched.token.get_secret_value()
        usable = (
            fetched is not None
            and current is not None
            and _active(fetched.status)
            and redaction.token_environment(current) == environment
        )
        if current == ours and usable:
            if not valid.valid:
                _fail(
                    summary,
                    client_id,
                    environment,
                    "Debitura's validate and fetch disagree",
                    prefix,
                )
            return
        if not usable or current is None or fetched is None:
            if valid.valid:
                # Debitura calls ours valid: a missing or odd fetch answer is no reason
                # to revoke a working token (a wrong path, a proxy's 404).
                _fail(
                    summary,
                    client_id,
                    environment,
                    "Debitura's fetch found no usable token, but validate calls ours valid",
                    prefix,
                )
                return
            if await self._rotating(client_id, environment, prefix):
                return
            await self._revoke(client_id, environment, prefix, actor, summary, dry_run=dry_run)
            return
        # Debitura holds another token: store it only once Debitura validates it as
        # this client's (a lying fetch alone must not replace a working token).
        theirs = await self._valid(where, current, client_id, summary)
        if theirs is None:
            return
        if not theirs.valid:
            _fail(
                summary,
                client_id,
                environment,
                "Debitura's current token does not validate as this client's",
                prefix,
            )
            return
        if await self._rotating(client_id, environment, prefix):
            return
        log.info(
            "reconcile_token_replaced", client_id=client_id, token_prefix=prefix, valid=valid.valid
        )
        known = await manager.database.fetch(
            "token_by_index", vault.blind_index(manager.sealer.index_key, current)
        )
        if known:
            # Stored here already, but not as this client's active token (revoked
            # here, say): the vault's own decision stands; an operator decides.
            _fail(
                summary,
                client_id,
                environment,
                f"Debitura's token is stored here already ({known[0]['status']}, "
                f"client {known[0]['client_id']})",
                prefix,
            )
            return
        await self._change(
            summary,
            outcomes.Outcome(
                client_id,
                environment,
                "replaced",
                prefix=redaction.token_prefix(current),
                old_prefix=prefix,
            ),
            dry_run,
            lambda: adoption.import_token(
                manager.database,
                manager.settings,
                manager.sealer,
                client_id,
                current,
                actor,
                supersede=True,
                # Still valid at Debitura (a rotation's grace): superseded with the
                # grace; no longer valid: revoked.
                revoke_old=not valid.valid,
                action="token_reconcile",
                key_prefix="reconcile",
                detail={"found": "Debitura holds another token"},
                issued_at=fetched.issued_at,
            ),
        )

    async def _valid(
        self, where: api.Endpoint, token: str, client_id: str, summary: Summary
    ) -> api.Validation | None:
        """What Debitura's validate says of `token` for `client_id`: valid only when
        Debitura calls it valid, active (or says nothing) and this client's; None when
        Debitura could not be asked (the run stops or goes on, as `_stop` decides)."""
        try:
            said = await self.manager.api.validate(where, token)
        except errors.DebituraError as exc:
            _stop(summary, exc, "validate", client_id)
            return None
        summary.validated += 1
        good = said.valid and said.client_id in (None, client_id) and _active(said.status)
        return dataclasses.replace(said, valid=good)

    async def _rotating(self, client_id: str, environment: str, prefix: str | None = None) -> bool:
        """Whether a rotation of the client is under way (its intent settles it, not a
        reconcile), or, with `prefix`, that token is no longer the active one (something
        else changed it while this run looked): left alone either way."""
        database = self.manager.database
        if await database.fetchval("rotation_intent_is_open", client_id, environment):
            log.info("reconcile_left_to_rotation", client_id=client_id, environment=environment)
            return True
        if prefix is None:
            return False
        return bool(await database.fetchval("active_prefix", client_id, environment) != prefix)

    async def _revoke(
        self,
        client_id: str,
        environment: str,
        prefix: str,
        actor: audit.Actor,
        summary: Summary,
        *,
        dry_run: bool,
    ) -> None:
        """Debitura holds no usable token for the client: revoke here too."""
        manager = self.manager
        await self._change(
            summary,
            outcomes.Outcome(
                client_id,
                environment,
                "revoked",
                old_prefix=prefix,
                detail="Debitura holds no usable token for the client",
            ),
            dry_run,
            lambda: adoption.revoke_client(
                manager.database,
                manager.settings,
                manager.sealer,
                client_id,
                environment,
                actor,
                action="token_reconcile",
            ),
        )

    async def _fetch_missing(
        self,
        client_id: str,
        environment: str,
        actor: audit.Actor,
        summary: Summary,
        *,
        dry_run: bool,
    ) -> None:
        """A client Debitura has with no active token here: fetch and store it."""
        manager = self.manager
        where = api.endpoint(manager.settings, environment)
        try:
            fetched = await manager.api.fetch(where, client_id)
        except errors.DebituraNotFound:
            return  # listed, but no token (yet): nothing to store
        except errors.DebituraError as exc:
            _stop(summary, exc, "fetch", client_id)
            return
        token = fetched.token.get_secret_value()
        if not _active(fetched.status) or redaction.token_environment(token) != environment:
            return
        said = await self._valid(where, token, client_id, summary)
        if said is None:
            return
        if not said.valid:
            why = "Debitura's token for the client does not validate as its own"
            _fail(summary, client_id, environment, why, None)
            return
        if await manager.database.fetch(
            "token_by_index", vault.blind_index(manager.sealer.index_key, token)
        ):
            # Stored already, and not active here (revoked here, say): the vault's own
            # revocation stands; an operator decides (`tokens fetch` shows it).
            _fail(
                summary,
                client_id,
                environment,
                "Debitura's token is stored here but not active",
                None,
            )
            return
        await self._change(
            summary,
            outcomes.Outcome(client_id, environment, "fetched", prefix=fetched.prefix),
            dry_run,
            lambda: adoption.import_token(
                manager.database,
                manager.settings,
                manager.sealer,
                client_id,
                token,
                actor,
                supersede=True,
                action="token_reconcile",
                key_prefix="reconcile",
                detail={"found": "no active token here"},
                issued_at=fetched.issued_at,
            ),
        )

    @staticmethod
    async def _change(
        summary: Summary,
        outcome: outcomes.Outcome,
        dry_run: bool,
        apply: Callable[[], Awaitable[object]],
    ) -> None:
        if dry_run:
            summary.changed.append(outcome)
            return
        try:
            await apply()
        except errors.ReceiverError as exc:
            summary.failed.append(outcomes.failed(outcome.client_id, outcome.environment, exc))
            return
        summary.changed.append(outcome)


def _stop(
    summary: Summary, exc: errors.DebituraError, call: str, client_id: str | None = None
) -> None:
    """A failed call: the run is incomplete; it stops when Debitura is unavailable or
    rate limiting (the rest waits for the next run)."""
    summary.complete = False
    if client_id is not None:
        summary.failed.append(outcomes.failed(client_id, summary.environment, exc))
    if (
        isinstance(
            exc,
            errors.DebituraUnavailable | errors.DebituraRateLimited | errors.DebituraAuthentication,
        )
        or client_id is None
    ):
        summary.stopped = f"{call}: {exc}"
        log.warning(
            "reconcile_stopped",
            environment=summary.environment,
            call=call,
            error=type(exc).__name__,
        )


def _fail(summary: Summary, client_id: str, environment: str, why: str, prefix: str | None) -> None:
    summary.complete = False
    summary.failed.append(outcomes.failed(client_id, environment, why, prefix=prefix))


def _active(status: str | None) -> bool:
    """Debitura's status says active (in any case), or says nothing."""
    return status is None or status.strip().lower() == "active"

"""Fetch, validate and revoke through Debitura's API; the effects go through the
lifecycle (`lifecycle.adoption`), as a webhook's would."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from receiver import config, db, errors, redaction, vault
from receiver.debitura import api, outcomes
from receiver.lifecycle import adoption, audit, events

log = structlog.get_logger(__name__)
_REDACTOR = redaction.Redactor()


@dataclass(frozen=True, slots=True)
class Manager:
    """The token actions other than rotation, for one database and API."""

    database: db.Database
    settings: config.Settings
    sealer: vault.Sealer
    api: api.Api

    async def fetch(
        self,
        client_id: str,
        environment: str,
        actor: audit.Actor,
        *,
        onboarded_at: datetime | None = None,
    ) -> outcomes.Outcome:
        """Fetch the client's current token and store it when the vault does not hold
        it yet (it becomes active; the one it replaces keeps the 24 h grace)."""
        where = api.endpoint(self.settings, environment)
        try:
            fetched = await self.api.fetch(where, client_id)
        except errors.DebituraError as exc:
            return outcomes.failed(client_id, environment, exc)
        token = fetched.token.get_secret_value()
        if redaction.token_environment(token) != environment:
            return outcomes.failed(
                client_id,
                environment,
                f"Debitura's {environment} API returned a token of the other environment",
            )
        if fetched.status not in (None, "active"):
            return outcomes.failed(
                client_id, environment, f"Debitura says the token is {fetched.status}"
            )
        index = vault.blind_index(self.sealer.index_key, token)
        known = await self.database.fetch("token_by_index", index)
        if known:
            if fetched.issued_at is not None:
                await self.database.fetchval("token_issued", index, fetched.issued_at)
            return outcomes.Outcome(
                client_id,
                environment,
                "unchanged",
                prefix=fetched.prefix,
                detail=f"already stored ({known[0]['status']})",
            )
        stored = await adoption.import_token(
            self.database,
            self.settings,
            self.sealer,
            client_id,
            token,
            actor,
            supersede=True,
            action="token_fetch",
            key_prefix="fetch",
            detail={"issued_at": _iso(fetched.issued_at)},
            issued_at=fetched.issued_at,
            onboarded_at=onboarded_at,
        )
        return outcomes.Outcome(
            client_id, environment, "fetched", prefix=stored.prefix, old_prefix=stored.replaced
        )

    async def link(
        self, environment: str, request: dict[str, Any], actor: audit.Actor
    ) -> outcomes.Outcome:
        """Link a client through Debitura (the partner's link request passed through)
        and store the answer's token sealed, through the lifecycle: the partner's own
        code never holds it. An answer lost on the way back is settled by fetching the
        client's token when the request names the client, else by the next reconcile
        (which lists Debitura's clients); until then the outcome is `pending`."""
        where = api.endpoint(self.settings, environment)
        began = datetime.now(UTC)  # a revocation here from now on wins over the answer
        try:
            linked = await self.api.link(where, request)
        except errors.DebituraAnswerLost as exc:
            log.warning("link_answer_lost", environment=environment)
            named = request.get("client_id")
            if (
                isinstance(named, str)
                and events.is_identifier(named)
                and not _REDACTOR.changes(named)
            ):
                settled = await self.fetch(named, environment, actor, onboarded_at=began)
                if settled.ok:
                    return dataclasses.replace(
                        settled, status="linked", detail="settled by a fetch"
                    )
            return outcomes.failed(
                named if isinstance(named, str) and events.is_identifier(named) else "-",
                environment,
                f"{exc}: the client may be linked; `receiver tokens reconcile` (and serve's "
                "schedule) fetches its token",
                status="pending",
            )
        except errors.DebituraError as exc:
            return outcomes.failed("-", environment, exc)
        stored = await adoption.import_token(
            self.database,
            self.settings,
            self.sealer,
            linked.client_id,
            linked.token.get_secret_value(),
            actor,
            supersede=True,
            action="client_link",
            key_prefix="link",
            detail={"link_status": linked.status},
            onboarded_at=began,
            issued_at=linked.issued_at,
        )
        ok = stored.status in ("active", "already_stored")
        return outcomes.Outcome(
            linked.client_id,
            environment,
            "linked" if ok else stored.status,
            ok=ok,
            prefix=stored.prefix,
            detail=None
            if ok
            else f"the token is stored {stored.status}: the client was revoked meanwhile",
            extra={"token_status": stored.status},
        )

    async def validate(
        self, client_ids: Sequence[str] | None, environment: str | None
    ) -> list[outcomes.Outcome]:
        """Validate the active tokens (of `client_ids`, in `environment`; None: all)
        and store what Debitura says: validated_at, valid, scopes."""
        rows = await self.database.fetch(
            "tokens_to_validate", list(client_ids) if client_ids else None, environment
        )
        found = {(row["client_id"], row["environment"]) for row in rows}
        # Every environment's API is checked before the first call: a missing key is
        # exit 2 naming it, not a run that stops half-way.
        needed: set[str] = {env for _, env in found}
        if environment is not None:
            needed.add(environment)
        for each in sorted(needed):
            api.endpoint(self.settings, each)
        done = [
            outcomes.failed(client_id, environment or "live", "no active token")
            for client_id in client_ids or ()
            if not any((client_id, env) in found for env in ("live", "test"))
        ]
        for row in rows:
            done.append(await self._validate_one(row))
        return done

    async def _validate_one(self, row: db.Record) -> outcomes.Outcome:
        client_id, environment = row["client_id"], row["environment"]
        where = api.endpoint(self.settings, environment)
        token = self.sealer.open_token(row["id"], row["token_sealed"])
        try:
            said = await self.api.validate(where, token)
        except errors.DebituraError as exc:
            # Unknown, not invalid: the JSON row still says so (`valid: null`).
            return outcomes.failed(
                client_id, environment, exc, prefix=row["prefix"], extra={"valid": None}
            )
        # Valid only for the client it is stored under: a token Debitura ties to
        # another client is as good as invalid here.
        valid = said.valid and said.client_id in (None, client_id)
        await self.database.fetchval(
            "token_validated", row["id"], valid, said.scopes, said.issued_at
        )
        log.info(
            "token_validated",
            client_id=client_id,
            environment=environment,
            token_prefix=row["prefix"],
            valid=valid,
        )
        return outcomes.Outcome(
            client_id,
            environment,
            "valid" if valid else "invalid",
            ok=valid,
            prefix=row["prefix"],
            extra={"valid": valid, "scopes": said.scopes, "token_status": said.status},
        )

    async def revoke(
        self, client_id: str, environment: str, actor: audit.Actor, reason: str
    ) -> outcomes.Outcome:
        """Revoke at Debitura, then locally: every token of the client in that
        environment revoked, a signal, an audit row."""
        where = api.endpoint(self.settings, environment)
        try:
            await self.api.revoke(where, client_id, reason)
        except errors.DebituraError as exc:
            return outcomes.failed(client_id, environment, exc)
        revoked = await adoption.revoke_client(
            self.database, self.settings, self.sealer, client_id, environment, actor
        )
        return outcomes.Outcome(
            client_id,
            environment,
            "revoked",
            detail=f"{revoked} stored token(s) revoked",
            extra={"revoked": revoked},
        )


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else db.iso(moment)

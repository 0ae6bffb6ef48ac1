"""Erasure: forgetting one client (its token values and stored bodies), leaving a
tombstone in the audit trail."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog

from receiver import config, db, errors, vault
from receiver.lifecycle import audit, naming

log = structlog.get_logger(__name__)

# Stored bodies opened per query while looking for the ones that name a client.
_SCAN_BATCH = 500
# The client's own bodies dropped per transaction (each under the client's lock).
ERASE_BATCH = 500


@dataclass(slots=True)
class Erasure:
    """What erasing one client removed."""

    client_hash: str
    event_key: str | None = None  # None: there was nothing left to erase
    tokens: int = 0
    bodies: int = 0
    environments: list[str] = field(default_factory=list)
    # Stored bodies that could not be opened (sealed under a key no longer configured):
    # whether they name the client is unknown, so they are left, and counted.
    unopened: int = 0

    def as_dict(self) -> dict[str, Any]:
        """For the audit row and the command's output."""
        return {
            "client_hash": self.client_hash,
            "event_key": self.event_key,
            "tokens": self.tokens,
            "bodies": self.bodies,
            "environments": self.environments,
            "unopened": self.unopened,
        }


async def erase_client(
    database: db.Database,
    settings: config.Settings,
    sealer: vault.Sealer,
    client_id: str,
    actor: audit.Actor,
    *,
    batch_size: int = ERASE_BATCH,
) -> Erasure:
    """Remove every token value and stored body of `client_id`: its tokens end revoked
    with no value and no blind index, its events keep their keys without bodies, an
    invalidation signal is queued per environment, and a tombstone (the client's
    hash, who, when, why) goes to the audit trail.

    In steps that cost the client's own rows, each short and each releasing the
    client's lock (a delivery for the client waits for one batch, never for the
    whole erasure): the client's own bodies in batches of `batch_size`
    (events_client_body), each in its own transaction under the client's lock; the
    scan of the other stored bodies with no lock held; then one last transaction
    under the lock that erases the tokens, the bodies found naming the client and
    any of its own stored meanwhile. So a delivery for the client that arrives during
    the erasure is applied, then erased, never left behind. A delivery for another
    client takes that client's lock, never this one's: the last transaction, once it
    holds the lock, looks the client's name up again (the index; only new matches
    are opened), so a body of such a delivery naming this client and stored before
    then is erased too (for a client id that is not an identifier, one stored after
    the scan passed is not seen, as before). Interrupted between steps, the erasure
    has dropped some bodies and written no tombstone yet: run it again to finish.

    Bodies are found by what they say, not by their bytes (`naming.names_client`:
    UTF-16, JSON escapes, NaN, the client id at any depth), through the names intake
    stores of each body (`_bodies_naming`); a body sealed under a key no longer
    configured is left and counted in `unopened` (configure the key and run again).

    Idempotent: when nothing is left to remove, nothing is written.
    """
    erasure = Erasure(client_hash=audit.client_hash(sealer, client_id))
    while True:
        async with database.connection() as conn, conn.transaction():
            await conn.execute(db.QUERIES["lock_client"], client_id)
            done = await conn.fetchval(db.QUERIES["erase_client_bodies"], client_id, batch_size)
        erasure.bodies += done
        if done < batch_size:
            break
    async with database.connection() as conn:
        naming_keys, erasure.unopened, looked_up = await _bodies_naming(conn, sealer, client_id)
    async with database.connection() as conn, conn.transaction():
        await conn.execute(db.QUERIES["lock_client"], client_id)
        if naming.indexable(client_id):
            # Bodies of other clients' deliveries naming this one, stored since the
            # names were looked up (while this waited for the lock, say): a look-up
            # through the index, opening only the new matches.
            found = dict.fromkeys(naming_keys)
            erasure.unopened += await _named(conn, sealer, client_id, found, looked_up)
            naming_keys = list(found)
        pending = await conn.fetchrow(db.QUERIES["erase_pending"], client_id, naming_keys)
        assert pending is not None
        if not pending["tokens"] and not pending["bodies"] and not erasure.bodies:
            return erasure
        erasure.event_key = f"erase_{uuid.uuid4().hex}"
        erasure.environments = list(pending["environments"] or ["live"])
        await conn.execute(
            db.QUERIES["insert_operator_event"], erasure.event_key, "receiver.client_erased"
        )
        erasure.tokens = len(
            await conn.fetch(db.QUERIES["erase_tokens"], client_id, erasure.event_key)
        )
        erasure.bodies += await conn.fetchval(db.QUERIES["erase_bodies"], client_id, naming_keys)
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


async def _bodies_naming(
    conn: db.Connection, sealer: vault.Sealer, client_id: str
) -> tuple[list[str], int, set[str]]:
    """Keys of the stored bodies, not attributed to the client, that name it; how
    many bodies could not be opened to tell; and the keys the names look-up read and
    found not naming it, or could not open (a look-up again skips them).

    First the bodies whose names are not known (stored before names were kept, or
    naming too many), opened and read (`naming.names_client`, the one rule), their
    names filled in so the next erasure finds them by index; then, through the stored
    names (events_body_names: what the bodies naming the client cost), each match
    opened and read. In that order: another erasure running meanwhile fills in names
    too, and a body it names before this scan reaches it is no longer unnamed, so it
    is found by its names, which are looked up after the scan (looked up before, it
    was found by neither). A client id that is not an identifier is in no names: every
    body is read."""
    found: dict[str, None] = {}  # in order, once each
    passed: set[str] = set()
    unopened = 0
    indexable = naming.indexable(client_id)
    scan = "erase_unnamed_bodies" if indexable else "erase_every_body"
    after = ""
    while True:
        rows = await conn.fetch(db.QUERIES[scan], after, client_id, _SCAN_BATCH)
        filled: tuple[list[str], list[str]] = ([], [])
        for row in rows:
            raw = _opened(sealer.keyring, row)
            if raw is None:
                if not row["attributed"]:  # the client's own go by their client_id
                    unopened += 1
                continue
            if not row["attributed"] and naming.names_client(raw, client_id):
                found[row["key"]] = None
            names = naming.body_names(sealer.names_key, raw)
            if names is not None and indexable:
                filled[0].append(row["key"])
                filled[1].append("{" + ",".join(map(str, names)) + "}")
        if filled[0]:
            await conn.execute(db.QUERIES["fill_body_names"], *filled)
        if len(rows) < _SCAN_BATCH:
            break
        after = rows[-1]["key"]
    if indexable:
        unopened += await _named(conn, sealer, client_id, found, passed)
    return list(found), unopened, passed


async def _named(
    conn: db.Connection,
    sealer: vault.Sealer,
    client_id: str,
    found: dict[str, None],
    passed: set[str],
) -> int:
    """Add to `found` the bodies whose stored names hold `client_id` (an indexable
    one) and that name it when read, but for those in `found` or `passed` (already
    read), and to `passed` the others; return how many matches could not be
    opened."""
    unopened = 0
    (mark,) = vault.name_hashes(sealer.names_key, {client_id})
    for row in await conn.fetch(db.QUERIES["erase_named_bodies"], mark, client_id):
        if row["key"] in found or row["key"] in passed:
            continue
        raw = _opened(sealer.keyring, row)
        if raw is None:
            unopened += 1
            passed.add(row["key"])
        elif naming.names_client(raw, client_id):
            found[row["key"]] = None
        else:
            passed.add(row["key"])
    return unopened


def _opened(keyring: vault.Keyring, row: Any) -> bytes | None:
    """A stored body's bytes; None when sealed under a key no longer configured."""
    try:
        return keyring.open(row["body_sealed"], vault.event_associated_data(row["sealed_for"]))
    except (errors.KeyNotFound, errors.SealBroken):
        return None

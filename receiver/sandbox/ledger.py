"""The sandbox's memory of what Debitura would know: linked clients, every bearer
token it issued and what became of it, and the tenants `POST /oauth/token` mints for.

Nothing here does I/O or logs a token; `clock` is the sandbox's own (a test may pass
one it moves forward to end a grace period or a JWT's life without sleeping).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from receiver import errors

DEFAULT_SCOPES = ("cases.create", "cases.read", "cases.update")
PARTNER_ID = "ref_partner_sandbox"
# Debitura's documented token prefix is the first 15 characters (`tok_live_xyz789`).
PREFIX_LENGTH = 15
ACTIVE, SUPERSEDED, REVOKED = "active", "superseded", "revoked"


def iso(moment: float) -> str:
    """A unix time as Debitura writes times: UTC, seconds, a Z."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def prefix(token: str) -> str:
    """What may be shown of a token: its first 15 characters."""
    return token[:PREFIX_LENGTH]


@dataclass(slots=True)
class IssuedToken:
    """One bearer token and its fate. The value never appears in the repr."""

    value: str = field(repr=False)
    client_id: str
    issued_at: float
    status: str = ACTIVE
    expires_at: float | None = None  # end of the grace period of a superseded token

    @property
    def prefix(self) -> str:
        """The token's first 15 characters."""
        return prefix(self.value)

    def usable(self, now: float) -> bool:
        """Whether the Customer API would accept it at `now`."""
        if self.status == REVOKED:
            return False
        return self.expires_at is None or now < self.expires_at


@dataclass(slots=True)
class Client:
    """A linked client: its scopes and its current token."""

    client_id: str
    scopes: tuple[str, ...]
    current: IssuedToken

    @property
    def status(self) -> str:
        """As the list call shows it: "revoked" once its token is, else "active"."""
        return REVOKED if self.current.status == REVOKED else ACTIVE


@dataclass(slots=True)
class Tenant:
    """An `externalTenantId` the OAuth endpoint mints JWTs for."""

    external_tenant_id: str
    creditor_id: str
    scopes: tuple[str, ...]


class UnknownClient(errors.ReceiverError):
    """No client of that id is linked in the sandbox."""


class ClientRevoked(errors.ReceiverError):
    """The client's token was revoked: Debitura requires a new linking."""


@dataclass(frozen=True, slots=True)
class Rotation:
    """What a rotation did: the new token and the old one."""

    new: IssuedToken
    old: IssuedToken


class Ledger:
    """Clients, tokens and tenants of one environment ("live" or "test")."""

    def __init__(self, environment: str, clock: Callable[[], float], grace_seconds: float) -> None:
        if environment not in ("live", "test"):
            raise errors.ConfigError("environment must be live or test")
        self.environment = environment
        self.clock = clock
        self.grace_seconds = grace_seconds
        self.clients: dict[str, Client] = {}
        self.tenants: dict[str, Tenant] = {}
        self._tokens: dict[str, IssuedToken] = {}

    def _issue(self, client_id: str) -> IssuedToken:
        # token_urlsafe(24) gives 32 characters of the URL-safe alphabet, 192 bits.
        value = f"tok_{self.environment}_{secrets.token_urlsafe(24)}"
        token = IssuedToken(value=value, client_id=client_id, issued_at=self.clock())
        self._tokens[value] = token
        return token

    def link(self, client_id: str, scopes: Sequence[str]) -> IssuedToken:
        """Link (or re-link) a client with a fresh token, and register it as a tenant
        for `POST /oauth/token` (tenant id = client id) unless one is. A re-link ends
        the previous token at once, as a new linking replaces the old relationship."""
        previous = self.clients.get(client_id)
        if previous is not None and previous.current.status == ACTIVE:
            previous.current.status = SUPERSEDED
            previous.current.expires_at = self.clock()
        token = self._issue(client_id)
        self.clients[client_id] = Client(client_id, tuple(scopes), token)
        if client_id not in self.tenants:
            self.add_tenant(client_id, None, scopes)
        return token

    def client(self, client_id: str) -> Client:
        """The linked client, or UnknownClient."""
        found = self.clients.get(client_id)
        if found is None:
            raise UnknownClient(f"no client {client_id} is linked")
        return found

    def rotate(self, client_id: str, revoke_immediately: bool) -> Rotation:
        """A new current token; the old one revoked now or kept for the grace period."""
        client = self.client(client_id)
        old = client.current
        if old.status == REVOKED:
            raise ClientRevoked(f"the token of {client_id} is revoked")
        now = self.clock()
        if revoke_immediately:
            old.status = REVOKED
            old.expires_at = now
        else:
            old.status = SUPERSEDED
            old.expires_at = now + self.grace_seconds
        client.current = self._issue(client_id)
        return Rotation(new=client.current, old=old)

    def revoke(self, client_id: str) -> IssuedToken | None:
        """Revoke the client's current token; None when it already was."""
        token = self.client(client_id).current
        if token.status == REVOKED:
            return None
        token.status = REVOKED
        token.expires_at = self.clock()
        return token

    def page(self, after: str | None, size: int) -> tuple[list[Client], str | None]:
        """Up to `size` clients in linking order, from the one after `after` (None: the
        first), and the id to continue after (None on the last page). UnknownClient
        when `after` names no client."""
        ids = list(self.clients)
        start = 0 if after is None else self._position(ids, after) + 1
        chosen = ids[start : start + size]
        more = start + size < len(ids)
        return [self.clients[i] for i in chosen], (chosen[-1] if more else None)

    @staticmethod
    def _position(ids: list[str], client_id: str) -> int:
        try:
            return ids.index(client_id)
        except ValueError:
            raise UnknownClient(f"no client {client_id} is linked") from None

    def issued(self) -> list[IssuedToken]:
        """Every token issued so far, in order."""
        return list(self._tokens.values())

    def lookup(self, value: str) -> IssuedToken | None:
        """The issued token with this value, usable or not."""
        return self._tokens.get(value)

    def usable(self, value: str) -> IssuedToken | None:
        """The issued token with this value if the Customer API would accept it now."""
        token = self._tokens.get(value)
        return token if token is not None and token.usable(self.clock()) else None

    def add_tenant(
        self, external_tenant_id: str, creditor_id: str | None, scopes: Sequence[str]
    ) -> Tenant:
        """Register a tenant for `POST /oauth/token`."""
        tenant = Tenant(external_tenant_id, creditor_id or str(uuid.uuid4()), tuple(scopes))
        self.tenants[external_tenant_id] = tenant
        return tenant

"""The `Sandbox` object: one stand-in Debitura environment, in memory, served over
HTTP on loopback (or any host), with webhooks to a receiver. See the package
docstring for the contract other tests rely on."""

from __future__ import annotations

import base64
import binascii
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence

import structlog
from aiohttp import web

from receiver import errors
from receiver.sandbox import api, faults, hs256, ledger, webhooks

log = structlog.get_logger(__name__)

DRAIN_TIMEOUT_SECONDS = 60.0
LIST_SHAPES = ("object", "array")  # `{"data": [...], "next_cursor"}` or a bare array
LIST_ID_KEYS = ("client_id", "id")


def decode_secret(secret_b64: str) -> bytes:
    """A base64 webhook secret's key bytes (ConfigError when it is not base64)."""
    try:
        return base64.b64decode(secret_b64, validate=True)
    except (binascii.Error, ValueError):
        raise errors.ConfigError("the webhook secret is not valid base64") from None


class Sandbox:
    """A stand-in Debitura for one environment ("live" or "test")."""

    def __init__(
        self,
        *,
        environment: str = "test",
        api_key: str | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        time_scale: float = 1.0,
        grace_seconds: float = 24 * 3600,
        jwt_ttl_seconds: int = 1800,
        clock: Callable[[], float] = time.time,
        page_size: int = 100,
        list_shape: str = "object",
        list_id_key: str = "client_id",
    ) -> None:
        if (webhook_url is None) != (webhook_secret is None):
            raise errors.ConfigError("webhooks need both a URL and a secret")
        if time_scale <= 0:
            raise errors.ConfigError("time_scale must be positive")
        if page_size < 1:
            raise errors.ConfigError("page_size must be at least 1")
        if list_shape not in LIST_SHAPES:
            raise errors.ConfigError(f"list_shape must be one of {', '.join(LIST_SHAPES)}")
        if list_id_key not in LIST_ID_KEYS:
            raise errors.ConfigError(f"list_id_key must be one of {', '.join(LIST_ID_KEYS)}")
        self.page_size = page_size
        self.list_shape = list_shape
        self.list_id_key = list_id_key
        self.environment = environment
        self.api_key = api_key or f"sk_sandbox_{secrets.token_urlsafe(24)}"
        self.clock = clock
        self.ledger = ledger.Ledger(environment, clock, grace_seconds)
        self.faults = faults.Faults()
        self.calls: Counter[str] = Counter(dict.fromkeys(faults.CALLS, 0))
        self.jwt_ttl_seconds = jwt_ttl_seconds
        self.jwt_key = secrets.token_bytes(32)
        self.subscription: webhooks.Subscription | None = None
        if webhook_url is not None and webhook_secret is not None:
            self.subscription = webhooks.Subscription(
                webhook_url, decode_secret(webhook_secret), environment, time_scale
            )
        self.url = ""
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"Sandbox(environment={self.environment!r}, url={self.url!r})"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on `host:port` (0: a free port) and set `url`; start webhooks."""
        self._runner = web.AppRunner(api.create_app(self), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}"
        if self.subscription is not None:
            await self.subscription.start()
        log.info("sandbox_started", url=self.url, environment=self.environment)

    async def stop(self) -> None:
        """Stop webhooks (pending tries abandoned) and close the port."""
        if self.subscription is not None:
            await self.subscription.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def deliveries(self) -> list[webhooks.Delivery]:
        """Every webhook queued, with its tries and outcome (empty without webhooks)."""
        return [] if self.subscription is None else self.subscription.deliveries

    async def drain(self, seconds: float = DRAIN_TIMEOUT_SECONDS) -> None:
        """Wait until no webhook is pending (TimeoutError past `seconds`)."""
        if self.subscription is not None:
            await self.subscription.drain(seconds)

    def link_client(
        self,
        client_id: str,
        scopes: Sequence[str] = ledger.DEFAULT_SCOPES,
        *,
        webhook: bool = True,
    ) -> str:
        """Link a client: issue its token, register it as a tenant for `POST
        /oauth/token`, send `client.onboarding_completed` when webhooks are configured
        and `webhook` (False: a webhook the receiver missed, or an API link), and
        return the token (for the test's own use)."""
        token = self.ledger.link(client_id, scopes)
        log.info("sandbox_client_linked", client_id=client_id, token_prefix=token.prefix)
        if not webhook:
            return token.value
        self._send(
            "client.onboarding_completed",
            client_id,
            {
                "client_id": client_id,
                "bearer_token": token.value,
                "onboarding_completed_at": ledger.iso(token.issued_at),
            },
        )
        return token.value

    def clients(self) -> list[tuple[str, str]]:
        """Every linked client as the list call shows it: (client_id, "active" or
        "revoked"), in linking order."""
        return [(c.client_id, c.status) for c in self.ledger.clients.values()]

    def current_token(self, client_id: str) -> str:
        """The client's current token (UnknownClient when none is linked)."""
        return self.ledger.client(client_id).current.value

    def is_valid(self, token: str) -> bool:
        """Whether the Customer API would accept `token` now (bearer token or JWT)."""
        if self.ledger.usable(token) is not None:
            return True
        return hs256.decode(token, self.jwt_key, self.clock()) is not None

    def add_tenant(
        self,
        external_tenant_id: str,
        creditor_id: str | None = None,
        scopes: Sequence[str] = ledger.DEFAULT_SCOPES,
    ) -> str:
        """Register a tenant for `POST /oauth/token`; its creditor id (made up if not given)."""
        return self.ledger.add_tenant(external_tenant_id, creditor_id, scopes).creditor_id

    def rotate(
        self,
        client_id: str,
        *,
        reason: str = "sandbox",
        revoke_immediately: bool = False,
        webhook: bool = True,
    ) -> ledger.Rotation:
        """Rotate as the API does (`token.revoked` sent only when revoking at once, and
        never with `webhook=False`: a rotation made elsewhere, unannounced)."""
        rotation = self.ledger.rotate(client_id, revoke_immediately)
        log.info(
            "sandbox_token_rotated",
            client_id=client_id,
            token_prefix=rotation.new.prefix,
            old_token_prefix=rotation.old.prefix,
            revoke_immediately=revoke_immediately,
        )
        if revoke_immediately and webhook:
            self._send_revoked(rotation.old, reason, ledger.PREFIX_LENGTH)
        return rotation

    def revoke(
        self,
        client_id: str,
        *,
        reason: str = "client_request",
        prefix_length: int = 15,
        webhook: bool = True,
    ) -> None:
        """Revoke the client's token as Debitura would on its own (or through the API):
        at once, with a `token.revoked` whose prefix has `prefix_length` characters
        (none with `webhook=False`: a revocation the receiver is not told of)."""
        token = self.ledger.revoke(client_id)
        if token is None:
            return  # already revoked: nothing changes, nothing is sent again
        log.info("sandbox_token_revoked", client_id=client_id, token_prefix=token.prefix)
        if webhook:
            self._send_revoked(token, reason, prefix_length)

    def mint_jwt(self, tenant: ledger.Tenant) -> str:
        """An HS256 access token for `tenant`, valid `jwt_ttl_seconds`."""
        now = int(self.clock())
        claims = {
            "iss": "receiver-sandbox",
            "sub": tenant.creditor_id,
            "externalTenantId": tenant.external_tenant_id,
            "scope": " ".join(tenant.scopes),
            "iat": now,
            "exp": now + self.jwt_ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        return hs256.encode(claims, self.jwt_key)

    def _send_revoked(self, token: ledger.IssuedToken, reason: str, prefix_length: int) -> None:
        assert token.expires_at is not None
        self._send(
            "token.revoked",
            token.client_id,
            {
                "client_id": token.client_id,
                "token_prefix": token.value[:prefix_length],
                "revoked_at": ledger.iso(token.expires_at),
                "reason": reason,
            },
        )

    def _send(self, event: str, client_id: str, data: dict[str, str]) -> None:
        if self.subscription is not None:
            self.subscription.send(event, client_id, data)

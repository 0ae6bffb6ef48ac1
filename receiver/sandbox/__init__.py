"""`receiver sandbox`: a stand-in Debitura that runs on one laptop (docs/design.md §9).

It serves one environment ("live" or "test"), keeps its state in memory, and issues
fresh high-entropy `tok_<env>_` tokens. Over HTTP it answers:

- the Referral Partner API, with the `XApiKey` header: `GET
  /v1/referral-partners/clients/{id}/token`, `POST …/rotate-token`, `POST
  …/revoke-token`, `POST /v1/auth/validate-token`, `POST /oauth/token`;
- the link call `POST /v1/referral-partners/clients` (any JSON object; its
  `client_id`, when an identifier, else a made-up `cli_…`; its `scopes`, when a list
  of strings): 201 `{"client_id", "bearer_token", "status": "active", "issued_at"}`,
  409 `client_exists` for a client linked and not revoked, and **no webhook**;
- the list call `GET /v1/referral-partners/clients`: `{"data": [{"client_id",
  "status": "active"|"revoked"}, …], "next_cursor": "<opaque>"|null}` in pages of
  `page_size`, the next with `?cursor=` (an unknown one: 400 `invalid_cursor`); with
  `list_shape="array"` a bare array of them all, with `list_id_key="id"` keyed `id`;
- the Customer API: `POST /v1/cases` and `POST /cases`, which accept
  `Authorization: Bearer` with a token it issued (not revoked, not past its grace)
  or a JWT it minted (not expired): 201, else 401 `invalid_token`, or 403
  `permission_error` when the client lacks `cases.create`;
- and, given a receiver URL and a base64 secret, it POSTs signed webhooks
  (`client.onboarding_completed` on an in-process link, `token.revoked` on revocation
  or a rotation with `revoke_immediately`) on Debitura's retry schedule.

Every link (in-process or HTTP) registers the client as a tenant for `POST
/oauth/token`, its `externalTenantId` the client id. Fetch answers the current
token; validate answers `valid: true`, `status: "active"` for a token still usable
(a rotated one within its grace, with `expires_at`), else 401 `invalid_token`.

The in-process API (a contract with other tests; change it only with the lead):

    sb = Sandbox(environment="test", api_key=None,         # None: a generated key
                 webhook_url=None, webhook_secret=None,    # both, or neither
                 time_scale=1.0,                           # divides webhook retry delays
                 grace_seconds=86400, jwt_ttl_seconds=1800,
                 clock=time.time,                          # a test may move time forward
                 page_size=100,                            # clients per page of the list call
                 list_shape="object",                      # or "array": all, unpaged
                 list_id_key="client_id")                  # or "id"
    await sb.start(host="127.0.0.1", port=0)   # sets sb.url, e.g. http://127.0.0.1:41234
    await sb.stop()
    sb.api_key                                 # the XApiKey it expects
    token = sb.link_client("cli_1", scopes=("cases.create", ...))  # + onboarding webhook
    sb.link_client("cli_2", webhook=False)     # linked, the webhook never sent (missed)
    sb.clients() -> [("cli_1", "active"), ...] # as the list call shows them, link order
    sb.current_token("cli_1") -> str           # ledger.UnknownClient if not linked
    sb.is_valid(token) -> bool                 # what POST /cases would say now
    sb.add_tenant("tenant-1", creditor_id=None, scopes=...) -> creditor_id
    sb.revoke("cli_1", reason=..., prefix_length=15)   # as Debitura on its own + webhook
    sb.rotate("cli_1", reason=..., revoke_immediately=False) -> ledger.Rotation
    sb.revoke("cli_1", webhook=False)          # done elsewhere: no webhook at all
    sb.rotate("cli_1", webhook=False)          # (token.revoked not sent even at once)
    sb.faults.fail_next(call, status, times=1, retry_after=None)  # Debitura-shaped body;
                                               # 403: permission_error + required_scope
    sb.faults.drop_after(call, times=1)        # takes effect, then the answer is lost
    sb.faults.delay(call, seconds)             # takes effect, then answers late; 0 ends
    sb.faults.hold(call, seconds)              # the next one: no answer and no effect
                                               # for `seconds` (real time), then both; a
                                               # client that gave up lost the answer only
    sb.faults.clear()
    sb.calls["rotate"]                         # requests per call, faults included
    sb.deliveries                              # webhooks.Delivery: event, attempts, outcome
    sb.subscription.active / .disabled_reason  # off after 8 failures or one 410
    await sb.drain(seconds=60)                 # until no webhook is pending

`call` is one of "fetch", "rotate", "revoke", "validate", "oauth", "cases", "link",
"list".
Tokens never reach a log line (prefixes only); reprs hide them too.
"""

from __future__ import annotations

from receiver.sandbox.faults import CALLS, Faults
from receiver.sandbox.ledger import DEFAULT_SCOPES, ClientRevoked, UnknownClient
from receiver.sandbox.server import Sandbox
from receiver.sandbox.webhooks import SCHEDULE, Delivery

__all__ = [
    "CALLS",
    "DEFAULT_SCOPES",
    "SCHEDULE",
    "ClientRevoked",
    "Delivery",
    "Faults",
    "Sandbox",
    "UnknownClient",
]

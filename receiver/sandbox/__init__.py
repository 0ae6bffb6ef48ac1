"""`receiver sandbox`: a stand-in Debitura that runs on one laptop (docs/design.md §9).

It serves one environment ("live" or "test"), keeps its state in memory, and issues
fresh high-entropy `tok_<env>_` tokens. Over HTTP it answers:

- the Referral Partner API, with the `XApiKey` header: `GET
  /v1/referral-partners/clients/{id}/token`, `POST …/rotate-token`, `POST
  …/revoke-token`, `POST /v1/auth/validate-token`, `POST /oauth/token`;
- the Customer API: `POST /v1/cases` and `POST /cases`, which accept
  `Authorization: Bearer` with a token it issued (not revoked, not past its grace)
  or a JWT it minted (not expired): 201, else 401 `invalid_token`, or 403
  `permission_error` when the client lacks `cases.create`;
- and, given a receiver URL and a base64 secret, it POSTs signed webhooks
  (`client.onboarding_completed` on linking, `token.revoked` on revocation or a
  rotation with `revoke_immediately`) on Debitura's retry schedule.

The in-process API (a contract with other tests; change it only with the lead):

    sb = Sandbox(environment="test", api_key=None,         # None: a generated key
                 webhook_url=None, webhook_secret=None,    # both, or neither
                 time_scale=1.0,                           # divides webhook retry delays
                 grace_seconds=86400, jwt_ttl_seconds=1800,
                 clock=time.time)                          # a test may move time forward
    await sb.start(host="127.0.0.1", port=0)   # sets sb.url, e.g. http://127.0.0.1:41234
    await sb.stop()
    sb.api_key                                 # the XApiKey it expects
    token = sb.link_client("cli_1", scopes=("cases.create", ...))  # + onboarding webhook
    sb.current_token("cli_1") -> str           # ledger.UnknownClient if not linked
    sb.is_valid(token) -> bool                 # what POST /cases would say now
    sb.add_tenant("tenant-1", creditor_id=None, scopes=...) -> creditor_id
    sb.revoke("cli_1", reason=..., prefix_length=15)   # as Debitura on its own + webhook
    sb.rotate("cli_1", reason=..., revoke_immediately=False) -> ledger.Rotation
    sb.faults.fail_next(call, status, times=1, retry_after=None)  # Debitura-shaped body;
                                               # 403: permission_error + required_scope
    sb.faults.drop_after(call, times=1)        # takes effect, then the answer is lost
    sb.faults.delay(call, seconds)             # takes effect, then answers late; 0 ends
    sb.faults.clear()
    sb.calls["rotate"]                         # requests per call, faults included
    sb.deliveries                              # webhooks.Delivery: event, attempts, outcome
    sb.subscription.active / .disabled_reason  # off after 8 failures or one 410
    await sb.drain(seconds=60)                 # until no webhook is pending

`call` is one of "fetch", "rotate", "revoke", "validate", "oauth", "cases".
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

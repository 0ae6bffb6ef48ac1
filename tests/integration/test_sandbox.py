"""`receiver sandbox`, the stand-in Debitura: its Referral Partner API (token, link and
list calls), OAuth, the Customer API's /cases, fault injection and the command, over
real HTTP on loopback."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from receiver import config, partner, signing
from receiver.sandbox import DEFAULT_SCOPES, Sandbox
from tests import helpers
from tests.integration import processes
from tests.integration.standins import eventually

API_KEY = "sk_test_sandbox_key_0123456789"
CLIENTS = "/v1/referral-partners/clients"
TOKEN_SHAPE = re.compile(r"^tok_(live|test)_[A-Za-z0-9_-]{24,}$")


class Clock:
    """A clock the test moves forward instead of sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def remember(sandbox: Sandbox) -> None:
    """Make every token the sandbox issued a canary: the session checks no log has one."""
    helpers.CANARIES.update(token.value for token in sandbox.ledger.issued())


@pytest.fixture
def clock() -> Clock:
    """The sandbox's clock."""
    return Clock()


@pytest.fixture
async def sandbox(clock: Clock) -> AsyncIterator[Sandbox]:
    """A test-environment sandbox without webhooks, on a free loopback port."""
    sb = Sandbox(environment="test", api_key=API_KEY, clock=clock, jwt_ttl_seconds=600)
    await sb.start()
    yield sb
    remember(sb)
    await sb.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client carrying the sandbox's API key."""
    async with aiohttp.ClientSession(headers={"XApiKey": API_KEY}) as session:
        yield session


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, dict[str, str]]:
    """One request: status, JSON body, headers."""
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json(), dict(response.headers)


async def cases(session: aiohttp.ClientSession, sb: Sandbox, token: str) -> int:
    """The status `POST /v1/cases` answers for this bearer credential."""
    status, _, _ = await call(
        session, "POST", f"{sb.url}/v1/cases", json={}, headers={"Authorization": f"Bearer {token}"}
    )
    return status


async def rotate(
    session: aiohttp.ClientSession, sb: Sandbox, client_id: str, immediately: bool = False
) -> tuple[int, Any, dict[str, str]]:
    """POST rotate-token for `client_id`."""
    body = {"reason": "suspected_compromise", "revoke_immediately": immediately}
    return await call(session, "POST", f"{sb.url}{CLIENTS}/{client_id}/rotate-token", json=body)


async def test_fetch_returns_the_current_token_and_404_for_an_unknown_client(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """GET …/token answers the current token, issued_at and status; an unknown client 404."""
    token = sandbox.link_client("cli_fetch")
    assert TOKEN_SHAPE.match(token)
    assert token.startswith("tok_test_")
    status, body, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}/cli_fetch/token")
    assert status == 200
    assert body["bearer_token"] == token == sandbox.current_token("cli_fetch")
    assert body["status"] == "active"
    assert body["issued_at"].endswith("Z")
    status, body, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}/cli_nobody/token")
    assert (status, body["error"]["code"]) == (404, "client_not_found")
    assert sandbox.calls["fetch"] == 2


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"{CLIENTS}/cli_auth/token", None),
        ("POST", f"{CLIENTS}/cli_auth/rotate-token", {"reason": "x"}),
        ("POST", f"{CLIENTS}/cli_auth/revoke-token", {"reason": "x"}),
        ("POST", "/v1/auth/validate-token", {"token": "tok_test_whatever_000000000000000"}),
        ("POST", "/oauth/token", {"externalTenantId": "tenant-auth"}),
        ("POST", CLIENTS, {"client_id": "cli_other"}),
        ("GET", CLIENTS, None),
    ],
)
@pytest.mark.parametrize("key", [None, "sk_wrong"])
async def test_partner_calls_refuse_a_missing_or_wrong_api_key(
    sandbox: Sandbox, method: str, path: str, body: Any, key: str | None
) -> None:
    """Without the right XApiKey each partner call is 401 invalid_api_key, with no effect."""
    token = sandbox.link_client("cli_auth")
    sandbox.add_tenant("tenant-auth")
    headers = {} if key is None else {"XApiKey": key}
    async with aiohttp.ClientSession(headers=headers) as session:
        status, answer, _ = await call(session, method, f"{sandbox.url}{path}", json=body)
    assert status == 401
    assert answer["error"]["type"] == "authentication_error"
    assert answer["error"]["code"] == "invalid_api_key"
    assert sandbox.current_token("cli_auth") == token
    assert sandbox.is_valid(token)
    assert sandbox.clients() == [("cli_auth", "active")]


async def test_grace_rotation_keeps_the_old_token_working_until_the_grace_ends(
    sandbox: Sandbox, http: aiohttp.ClientSession, clock: Clock
) -> None:
    """A grace rotation answers both tokens; /cases takes the old one for 24 h, not after."""
    old = sandbox.link_client("cli_grace")
    status, body, _ = await rotate(http, sandbox, "cli_grace")
    assert status == 200
    new = body["new_bearer_token"]
    assert body["old_bearer_token"] == old
    assert new != old
    assert TOKEN_SHAPE.match(new)
    assert body["old_token_expires_at"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now + 24 * 3600)
    )
    assert sandbox.current_token("cli_grace") == new
    assert (await cases(http, sandbox, old), await cases(http, sandbox, new)) == (201, 201)
    clock.now += 24 * 3600 - 1
    assert await cases(http, sandbox, old) == 201
    clock.now += 1
    assert (await cases(http, sandbox, old), await cases(http, sandbox, new)) == (401, 201)


async def test_immediate_rotation_ends_the_old_token_at_once(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """revoke_immediately: the old token is refused by /cases and validate right away."""
    old = sandbox.link_client("cli_now")
    status, body, _ = await rotate(http, sandbox, "cli_now", immediately=True)
    assert status == 200
    assert await cases(http, sandbox, old) == 401
    assert await cases(http, sandbox, body["new_bearer_token"]) == 201
    status, _, _ = await call(
        http, "POST", f"{sandbox.url}/v1/auth/validate-token", json={"token": old}
    )
    assert status == 401


async def test_revoke_ends_the_token_and_rotation_then_needs_a_new_link(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """revoke-token answers {"status": "revoked"}; the token is refused at once; rotate is 409."""
    token = sandbox.link_client("cli_revoke")
    url = f"{sandbox.url}{CLIENTS}/cli_revoke/revoke-token"
    status, body, _ = await call(http, "POST", url, json={"reason": "client_request"})
    assert (status, body) == (200, {"status": "revoked"})
    assert await cases(http, sandbox, token) == 401
    assert not sandbox.is_valid(token)
    status, body, _ = await rotate(http, sandbox, "cli_revoke")
    assert (status, body["error"]["code"]) == (409, "token_revoked")
    status, body, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}/cli_revoke/token")
    assert (status, body["status"]) == (200, "revoked")
    status, body, _ = await call(
        http, "POST", f"{sandbox.url}{CLIENTS}/cli_x/revoke-token", json={}
    )
    assert status == 404


async def test_validate_answers_a_live_token_and_401_invalid_token_otherwise(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """validate-token: valid, client, scopes, status for a live token; 401 invalid_token else."""
    token = sandbox.link_client("cli_val", scopes=("cases.create", "cases.read"))
    url = f"{sandbox.url}/v1/auth/validate-token"
    status, body, _ = await call(http, "POST", url, json={"token": token})
    assert status == 200
    assert body["valid"] is True
    assert body["client_id"] == "cli_val"
    assert body["scopes"] == ["cases.create", "cases.read"]
    assert body["status"] == "active"
    assert body["partner_id"]
    assert body["issued_at"].endswith("Z")
    sandbox.revoke("cli_val")
    unknown = helpers.canary_token("test")
    live = helpers.canary_token("live")  # the live environment is another host
    for candidate in (token, unknown, live):
        status, body, _ = await call(http, "POST", url, json={"token": candidate})
        assert status == 401
        assert body["error"] == {
            "type": "authentication_error",
            "code": "invalid_token",
            "message": "Invalid bearer token",
        }


async def test_oauth_mints_a_jwt_that_cases_accepts_until_it_expires(
    sandbox: Sandbox, http: aiohttp.ClientSession, clock: Clock
) -> None:
    """POST /oauth/token mints an HS256 JWT; /cases takes it until expiresIn, then 401."""
    creditor = sandbox.add_tenant("tenant-1")
    status, body, _ = await call(
        http, "POST", f"{sandbox.url}/oauth/token", json={"externalTenantId": "tenant-1"}
    )
    assert status == 200
    assert body["tokenType"] == "Bearer"
    assert body["expiresIn"] == 600
    assert body["externalTenantId"] == "tenant-1"
    assert body["creditorId"] == creditor
    jwt = body["accessToken"]
    assert jwt.count(".") == 2
    status, _, _ = await call(
        http, "POST", f"{sandbox.url}/cases", json={}, headers={"Authorization": f"Bearer {jwt}"}
    )
    assert status == 201
    head, claims, signature = jwt.split(".")
    forged = f"{head}.{claims}.{signature[::-1]}"
    assert await cases(http, sandbox, forged) == 401
    clock.now += 600
    assert await cases(http, sandbox, jwt) == 401
    status, body, _ = await call(
        http, "POST", f"{sandbox.url}/oauth/token", json={"externalTenantId": "nobody"}
    )
    assert (status, body["error"]["code"]) == (404, "tenant_not_found")


async def test_cases_refuses_a_missing_or_unknown_credential_and_a_missing_scope(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """/cases: 401 invalid_token without a known token; 403 permission_error naming scopes."""
    status, body, headers = await call(http, "POST", f"{sandbox.url}/v1/cases", json={})
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    assert headers["WWW-Authenticate"] == "Bearer"
    assert await cases(http, sandbox, helpers.canary_token("test")) == 401
    token = sandbox.link_client("cli_scopes", scopes=("cases.read",))
    status, body, _ = await call(
        http, "POST", f"{sandbox.url}/v1/cases", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 403
    assert body["error"]["type"] == "permission_error"
    assert body["error"]["required_scope"] == "cases.create"
    assert body["error"]["token_scopes"] == ["cases.read"]


async def test_fail_next_answers_the_fault_with_retry_after_and_changes_nothing(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """fail_next: the next calls get the status (and Retry-After) without effect, then it heals."""
    token = sandbox.link_client("cli_fail")
    sandbox.faults.fail_next("rotate", 429, retry_after=7)
    sandbox.faults.fail_next("rotate", 503, times=2)
    status, body, headers = await rotate(http, sandbox, "cli_fail")
    assert (status, body["error"]["type"], headers["Retry-After"]) == (429, "rate_limit_error", "7")
    for _ in range(2):
        status, body, headers = await rotate(http, sandbox, "cli_fail")
        assert status == 503
        assert "Retry-After" not in headers
    assert sandbox.current_token("cli_fail") == token
    status, body, _ = await rotate(http, sandbox, "cli_fail")
    assert status == 200
    assert sandbox.current_token("cli_fail") == body["new_bearer_token"]
    assert sandbox.calls["rotate"] == 4


async def test_drop_after_applies_the_rotation_and_loses_the_answer(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """drop_after: the rotation happens, the connection closes unanswered, fetch then finds it."""
    old = sandbox.link_client("cli_drop")
    sandbox.faults.drop_after("rotate")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await rotate(http, sandbox, "cli_drop")
    new = sandbox.current_token("cli_drop")
    assert new != old
    assert sandbox.is_valid(old)
    status, body, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}/cli_drop/token")
    assert (status, body["bearer_token"]) == (200, new)


async def test_delay_holds_the_answer_after_the_effect(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """delay: a client that times out has lost an answer whose effect (revocation) happened."""
    token = sandbox.link_client("cli_slow")
    sandbox.faults.delay("revoke", 30)
    url = f"{sandbox.url}{CLIENTS}/cli_slow/revoke-token"
    with pytest.raises(TimeoutError):
        await call(http, "POST", url, json={}, timeout=aiohttp.ClientTimeout(total=0.5))
    assert not sandbox.is_valid(token)
    sandbox.faults.delay("revoke", 0)
    status, _, _ = await call(http, "POST", url, json={})
    assert status == 200


async def test_the_command_serves_links_and_never_prints_a_token() -> None:
    """`receiver sandbox --link` prints URL, key and env lines; fetch works; no token shown."""
    port = processes.free_port()
    env = processes.clean_env()
    args = ["sandbox", "--port", str(port), "--link", "cli_cmd", "--environment", "test"]
    with processes.background(args, env) as (process, output):

        async def banner_printed() -> bool:
            assert process.poll() is None, output.read_text()
            return "linked cli_cmd" in output.read_text()

        await eventually(banner_printed, seconds=30)
        text = output.read_text()
        key = re.search(r"API key \(generated[^:]*: (\S+)", text)
        assert key is not None
        assert f"RECEIVER_DEBITURA_TEST_API_URL=http://127.0.0.1:{port}" in text
        async with aiohttp.ClientSession(headers={"XApiKey": key.group(1)}) as session:
            url = f"http://127.0.0.1:{port}{CLIENTS}/cli_cmd/token"
            status, body, _ = await call(session, "GET", url)
        assert status == 200
        token = body["bearer_token"]
        helpers.CANARIES.add(token)
        assert token[:15] in text
        assert token not in text
    assert process.returncode == 0


def test_the_command_refuses_a_webhook_url_without_a_secret() -> None:
    """`--webhook-url` alone, or a secret that is not base64, is a usage error: exit 2."""
    env = processes.clean_env()
    alone = processes.run(["sandbox", "--webhook-url", "http://127.0.0.1:9/x"], env)
    assert alone.returncode == 2
    assert "--webhook-secret" in alone.stderr
    garbled = ["sandbox", "--webhook-url", "http://127.0.0.1:9/x", "--webhook-secret", "%%%"]
    assert processes.run(garbled, env).returncode == 2


async def test_the_command_with_dev_signs_with_the_dev_secret(tmp_path: Path) -> None:
    """`receiver sandbox --dev` signs its webhooks with the dev secret of RECEIVER_DATA_DIR."""
    received: list[tuple[bytes, str]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers["X-Debitura-Signature"]))
        return web.json_response({"status": "processed"})

    app = web.Application()
    app.router.add_post("/webhooks/debitura", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hook_port = processes.free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    try:
        env = processes.clean_env(RECEIVER_DATA_DIR=str(tmp_path))
        args = ["sandbox", "--dev", "--port", str(processes.free_port()), "--link", "cli_dev"]
        args += ["--webhook-url", f"http://127.0.0.1:{hook_port}/webhooks/debitura"]
        with processes.background(args, env) as (process, output):

            async def delivered() -> bool:
                assert process.poll() is None, output.read_text()
                return bool(received)

            await eventually(delivered, seconds=30)
    finally:
        await runner.cleanup()
    body, header = received[0]
    helpers.CANARIES.add(json.loads(body)["data"]["bearer_token"])
    secret = json.loads((tmp_path / "dev-secrets.json").read_text())["webhook_secrets"]
    signing.verify(header, body, [base64.b64decode(secret)], 300)


@pytest.mark.parametrize(
    ("status", "type_", "extra"),
    [
        (401, "authentication_error", {}),
        (403, "permission_error", {"required_scope": "referral_partner.tokens"}),
        (404, "not_found_error", {}),
        (500, "api_error", {}),
    ],
)
async def test_an_injected_failure_takes_debitura_shape_for_its_status(
    sandbox: Sandbox, http: aiohttp.ClientSession, status: int, type_: str, extra: dict[str, str]
) -> None:
    """fail_next answers in the error shape Debitura uses for that status (403 names scopes)."""
    sandbox.link_client("cli_shape")
    sandbox.faults.fail_next("fetch", status)
    got, body, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}/cli_shape/token")
    assert got == status
    assert body["error"]["type"] == type_
    assert extra.items() <= body["error"].items()


async def link(
    session: aiohttp.ClientSession, sb: Sandbox, body: Any
) -> tuple[int, Any, dict[str, str]]:
    """POST the link call with `body`."""
    return await call(session, "POST", f"{sb.url}{CLIENTS}", json=body)


async def test_link_answers_the_token_of_the_named_client_which_then_works(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """POST …/clients with a client_id: 201 client_id, token, active, issued_at; it then
    fetches, validates and creates cases like a client linked in-process."""
    body = {"client_id": "cli_api", "company": {"name": "Acme ApS"}}
    status, answer, _ = await link(http, sandbox, body)
    assert status == 201
    assert answer["client_id"] == "cli_api"
    assert answer["status"] == "active"
    assert answer["issued_at"].endswith("Z")
    token = answer["bearer_token"]
    assert TOKEN_SHAPE.match(token)
    assert token == sandbox.current_token("cli_api")
    status, fetched, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}/cli_api/token")
    assert (status, fetched["bearer_token"]) == (200, token)
    status, valid, _ = await call(
        http, "POST", f"{sandbox.url}/v1/auth/validate-token", json={"token": token}
    )
    assert (status, valid["client_id"], valid["scopes"]) == (200, "cli_api", list(DEFAULT_SCOPES))
    assert await cases(http, sandbox, token) == 201
    assert sandbox.calls["link"] == 1


@pytest.mark.parametrize("given", [None, 42, "", "no spaces allowed", "x" * 129])
async def test_link_makes_up_a_client_id_when_the_body_names_no_identifier(
    sandbox: Sandbox, http: aiohttp.ClientSession, given: Any
) -> None:
    """A link body without an identifier client_id gets a generated cli_<hex>."""
    body = {} if given is None else {"client_id": given}
    status, answer, _ = await link(http, sandbox, body)
    assert status == 201
    assert re.fullmatch(r"cli_[0-9a-f]+", answer["client_id"])
    assert sandbox.clients() == [(answer["client_id"], "active")]


async def test_link_refuses_a_body_that_is_not_a_json_object(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """A link body that is an array or not JSON is 400 and links nothing."""
    for raw in (b"[]", b"{not json"):
        status, answer, _ = await call(http, "POST", f"{sandbox.url}{CLIENTS}", data=raw)
        assert (status, answer["error"]["type"]) == (400, "invalid_request_error")
    assert sandbox.clients() == []


async def test_relinking_an_active_client_is_409_and_a_revoked_one_links_anew(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """A second link of an active client is 409 client_exists (token unchanged); once
    revoked, the client links again with a fresh token."""
    first = sandbox.link_client("cli_twice")
    status, answer, _ = await link(http, sandbox, {"client_id": "cli_twice"})
    assert status == 409
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "client_exists"
    assert answer["error"]["message"]
    assert sandbox.current_token("cli_twice") == first
    sandbox.revoke("cli_twice")
    status, answer, _ = await link(http, sandbox, {"client_id": "cli_twice"})
    assert status == 201
    assert answer["bearer_token"] not in (first, None)
    assert sandbox.clients() == [("cli_twice", "active")]


async def test_a_client_linked_by_api_mints_a_jwt_that_creates_a_case(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """The README's JWT example works for a client linked over HTTP: its client id is
    the externalTenantId of `POST /oauth/token`, and the minted JWT creates a case."""
    status, answer, _ = await link(http, sandbox, {"client_id": "your-tenant-id"})
    assert status == 201
    async with aiohttp.ClientSession() as session:
        tokens = partner.MintedTokens(API_KEY, api_url=sandbox.url, session=session)
        sent: list[str] = []

        async def create_case(token: str) -> aiohttp.ClientResponse:
            sent.append(token)
            response = await session.post(
                f"{sandbox.url}/cases", json={}, headers={"Authorization": f"Bearer {token}"}
            )
            await response.read()
            return response

        try:
            response = await tokens.call("your-tenant-id", create_case)
            creditor = tokens.creditor_id("your-tenant-id")
        finally:
            await tokens.close()
    assert response.status == 201
    assert sandbox.calls["oauth"] == 1
    assert creditor == sandbox.ledger.tenants["your-tenant-id"].creditor_id
    [jwt] = sent
    helpers.CANARIES.add(jwt)
    assert jwt.count(".") == 2
    assert jwt != answer["bearer_token"]


async def list_all(
    session: aiohttp.ClientSession, sb: Sandbox
) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Every page of the list call, following next_cursor, and the cursors met."""
    pages: list[list[dict[str, str]]] = []
    cursors: list[str] = []
    url = f"{sb.url}{CLIENTS}"
    while True:
        status, body, _ = await call(session, "GET", url)
        assert status == 200
        assert set(body) == {"data", "next_cursor"}
        pages.append(body["data"])
        if body["next_cursor"] is None:
            return pages, cursors
        cursors.append(body["next_cursor"])
        url = f"{sb.url}{CLIENTS}?cursor={body['next_cursor']}"


async def test_list_pages_the_clients_by_cursor_with_revoked_ones_marked(
    clock: Clock, http: aiohttp.ClientSession
) -> None:
    """GET …/clients: pages of page_size in linking order, next_cursor until the last
    (null); a revoked client listed "revoked"; sb.clients() says the same."""
    sb = Sandbox(api_key=API_KEY, clock=clock, page_size=2)
    await sb.start()
    try:
        for n in range(5):
            sb.link_client(f"cli_{n}")
        sb.revoke("cli_3")
        pages, cursors = await list_all(http, sb)
    finally:
        remember(sb)
        await sb.stop()
    assert [len(page) for page in pages] == [2, 2, 1]
    assert len(set(cursors)) == 2
    listed = [(c["client_id"], c["status"]) for page in pages for c in page]
    assert listed == [(f"cli_{n}", "revoked" if n == 3 else "active") for n in range(5)]
    assert sb.clients() == listed
    assert all(set(c) == {"client_id", "status"} for page in pages for c in page)


async def test_list_with_no_clients_is_one_empty_page(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """Before any link the list call answers no clients and no next cursor."""
    status, body, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}")
    assert (status, body) == (200, {"data": [], "next_cursor": None})


@pytest.mark.parametrize(
    "cursor", ["", "%%%", "bm9ib2R5", base64.urlsafe_b64encode(b"\xff\xfe").decode()]
)
async def test_list_refuses_an_unknown_cursor_with_400(
    sandbox: Sandbox, http: aiohttp.ClientSession, cursor: str
) -> None:
    """A cursor the sandbox did not give (garbage, or naming no client) is 400 invalid_cursor."""
    sandbox.link_client("cli_listed")
    status, body, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}", params={"cursor": cursor})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_cursor"


@pytest.mark.parametrize(
    ("shape", "key"), [("array", "client_id"), ("array", "id"), ("object", "id")]
)
async def test_list_takes_the_shape_and_id_key_it_is_given(
    clock: Clock, http: aiohttp.ClientSession, shape: str, key: str
) -> None:
    """list_shape="array": one bare array of every client, unpaged; list_id_key="id":
    each client keyed `id` instead of `client_id`."""
    sb = Sandbox(api_key=API_KEY, clock=clock, page_size=2, list_shape=shape, list_id_key=key)
    await sb.start()
    try:
        for n in range(3):
            sb.link_client(f"cli_{n}")
        sb.revoke("cli_1")
        status, body, _ = await call(http, "GET", f"{sb.url}{CLIENTS}")
    finally:
        remember(sb)
        await sb.stop()
    assert status == 200
    listed = body if shape == "array" else body["data"]
    expected = [{key: "cli_0", "status": "active"}, {key: "cli_1", "status": "revoked"}]
    if shape == "array":
        expected.append({key: "cli_2", "status": "active"})
    else:
        assert body["next_cursor"] is not None
    assert listed == expected


async def test_grace_rotation_shows_in_fetch_and_validate_until_the_grace_ends(
    sandbox: Sandbox, http: aiohttp.ClientSession, clock: Clock
) -> None:
    """After a grace rotation fetch answers the new token; validate calls the old one
    valid (active, with its expires_at) within the grace and 401 invalid_token after."""
    old = sandbox.link_client("cli_seen")
    status, rotated, _ = await rotate(http, sandbox, "cli_seen")
    assert status == 200
    new = rotated["new_bearer_token"]
    clock.now += 60
    status, fetched, _ = await call(http, "GET", f"{sandbox.url}{CLIENTS}/cli_seen/token")
    assert (status, fetched["bearer_token"], fetched["status"]) == (200, new, "active")
    assert fetched["issued_at"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.now - 60))
    url = f"{sandbox.url}/v1/auth/validate-token"
    status, body, _ = await call(http, "POST", url, json={"token": old})
    assert status == 200
    assert (body["valid"], body["status"], body["client_id"]) == (True, "active", "cli_seen")
    assert body["expires_at"] == rotated["old_token_expires_at"]
    assert body["issued_at"].endswith("Z")
    assert await cases(http, sandbox, old) == 201
    clock.now += 24 * 3600
    status, body, _ = await call(http, "POST", url, json={"token": old})
    assert (status, body["error"]["code"]) == (401, "invalid_token")
    status, body, _ = await call(http, "POST", url, json={"token": new})
    assert (status, body["valid"], body["expires_at"]) == (200, True, None)


async def test_hold_keeps_a_rotation_unapplied_and_unanswered_until_it_ends(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """hold: a client with a 0.2 s timeout gets no answer; fetch shows the old token
    during the hold and the new one after it, when the rotation lands."""
    old = sandbox.link_client("cli_held")
    # Far longer than the client's 0.2 s: on a loaded machine the event loop may stall
    # a few hundred milliseconds, and a hold that ends meanwhile would land before the
    # fetch below (seen once with 0.5 s under `pytest -n 3`).
    sandbox.faults.hold("rotate", 1.5)
    with pytest.raises(TimeoutError):
        await call(
            http,
            "POST",
            f"{sandbox.url}{CLIENTS}/cli_held/rotate-token",
            json={"reason": "scheduled_rotation"},
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    assert sandbox.calls["rotate"] == 1  # it reached the sandbox, which keeps it
    fetch = f"{sandbox.url}{CLIENTS}/cli_held/token"
    status, body, _ = await call(http, "GET", fetch)
    assert (status, body["bearer_token"]) == (200, old)

    async def rotated() -> bool:
        _, body, _ = await call(http, "GET", fetch)
        return bool(body["bearer_token"] != old)

    await eventually(rotated, seconds=10)
    assert sandbox.current_token("cli_held") != old
    assert sandbox.is_valid(old)  # a grace rotation, applied late
    assert sandbox.calls["rotate"] == 1


async def test_hold_answers_a_patient_client_after_the_hold(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    """hold: a client that waits gets the rotation's answer, no sooner than the hold;
    only the next request is held."""
    sandbox.link_client("cli_patient")
    sandbox.faults.hold("rotate", 1.0)
    started = time.monotonic()
    status, body, _ = await rotate(http, sandbox, "cli_patient")
    assert time.monotonic() - started >= 1.0
    assert (status, body["new_bearer_token"]) == (200, sandbox.current_token("cli_patient"))
    started = time.monotonic()
    status, _, _ = await rotate(http, sandbox, "cli_patient")
    assert status == 200
    assert time.monotonic() - started < 1.0


async def test_the_sandbox_never_signs_with_the_production_secret(
    tmp_path: Path, database_url: str
) -> None:
    """With production's RECEIVER_* exported (live and test webhook secrets), `sandbox
    --dev --environment live --link` against a production `serve` signs with the dev
    secret of RECEIVER_DATA_DIR: the receiver refuses it (401), nothing is stored, and
    the sandbox's start line names which secret signs, never its value."""
    port = processes.free_port()
    test_secret = helpers.new_secret()
    env, live_secret = processes.receiver_env(
        database_url, RECEIVER_TEST_WEBHOOK_SECRETS=test_secret
    )
    dev_secret = config.dev_secrets(tmp_path)["webhook_secrets"]
    with processes.serving(["--port", str(port)], env) as (serve, _):
        await processes.wait_healthy(port, serve)
        args = ["sandbox", "--dev", "--environment", "live", "--link", "cli_f1"]
        args += ["--port", str(processes.free_port())]
        args += ["--webhook-url", f"http://127.0.0.1:{port}/webhooks/debitura"]
        shell = env | {"RECEIVER_DATA_DIR": str(tmp_path)}
        with processes.background(args, shell) as (sandbox, output):

            async def refused() -> bool:
                assert sandbox.poll() is None, output.read_text()
                return any(
                    "sandbox_webhook_attempt" in line and '"status": 401' in line
                    for line in output.read_text().splitlines()
                )

            await eventually(refused, seconds=30)
            text = output.read_text()
    assert f"signed with the dev secret in {tmp_path / 'dev-secrets.json'}" in text
    for secret in (live_secret, test_secret, dev_secret):
        assert secret not in text
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM receiver.events") == 0
        assert await conn.fetchval("SELECT count(*) FROM receiver.tokens") == 0
    finally:
        await conn.close()

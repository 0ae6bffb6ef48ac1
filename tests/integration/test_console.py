"""The operator console (`/console/` on the admin listener): a real `receiver serve`
process with RECEIVER_ADMIN_PORT and RECEIVER_ADMIN_TOKENS, driven by headless
Chromium (Debian's `chromium`, through Playwright) where a person's steps matter, and
by plain HTTP where they do not (headers, cookies, refusals, the canary crawl).

One receiver and one browser for the module; each test plants its own deliveries,
signals and tokens under names of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from receiver.service import admin_api
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Client
from tests.integration.console_client import (
    CSRF,
    Console,
    browser_session,
    deliver,
    quarantined,
    served,
    sign_in,
)

playwright = pytest.importorskip("playwright.async_api", reason="playwright is not installed")

CHROMIUM = Path("/usr/bin/chromium")
ADMIN_TOKEN = "adm_console_" + "c" * 36
FINGERPRINT_ACTOR = "admin:" + admin_api.fingerprint(ADMIN_TOKEN)
PAGES = ("/", "/quarantine", "/tokens", "/signals", "/audit")


@pytest.fixture(scope="module")
def console(server_dsn: str, template_name: str) -> Iterator[Console]:
    """`receiver serve` with the admin listener and an admin token, on its own database."""
    with served(server_dsn, template_name, "receiver_console", ADMIN_TOKEN) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium from Debian's package (Playwright cannot download one here),
    one for the module."""
    if not CHROMIUM.exists():  # noqa: ASYNC240 - once per module
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get)")
    async with playwright.async_playwright() as driver:
        launched = await driver.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        await launched.close()


# --- planting -------------------------------------------------------------------


async def query(console: Console, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Rows from the receiver's database."""
    conn = await asyncpg.connect(console.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def dead_signal(console: Console, client_id: str, last_error: str) -> str:
    """A dead letter in the outbox (what a cache answering 400 leaves, for a
    delivery stored now); its id."""
    stored = await deliver(console, helpers.onboarding())
    (row,) = await query(
        console,
        "INSERT INTO receiver.signals (client_id, token_prefix, reason, event_key, status,"
        " attempts, last_error, environment) VALUES ($1, 'tok_live_abcdef', 'token_revoked',"
        " $2, 'dead', 8, $3, 'live') RETURNING id::text",
        client_id,
        stored["event_id"],
        last_error,
    )
    return str(row[0])


# --- a person at the browser ----------------------------------------------------

in_browser = pytest.mark.asyncio(loop_scope="module")  # the module's one browser


async def signed_in_page(browser: Any, console: Console) -> Any:
    """A fresh browser context, signed in through the form."""
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(console.admin + "/console/")
    assert page.url.endswith("/console/sign-in")  # not signed in: sent to the form
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(console.admin + "/console/")
    return page


@in_browser
async def test_an_operator_triages_and_dismisses_a_quarantined_delivery(
    browser: Any, console: Console
) -> None:
    """Signed in, an operator finds the planted delivery in the quarantine with its
    reason, reads its body with the token masked, and dismisses it with a reason: the
    delivery leaves the quarantine and the audit row names the admin token's
    fingerprint and the reason."""
    key = await quarantined(console)
    page = await signed_in_page(browser, console)
    await page.get_by_role("link", name="Quarantine", exact=True).click()
    row = page.get_by_role("row").filter(has_text=key)
    assert "token_outside_bearer_token" in await row.inner_text()
    await row.get_by_role("link", name=key).click()
    assert "[REDACTED]" in await page.locator("pre.body").inner_text()
    assert helpers.find_canaries(await page.content()) == []
    await page.get_by_label("Reason (for the audit trail)").last.fill("sender bug, INC-42")
    await page.get_by_role("button", name="Dismiss for good").click()
    assert "dismissed" in await page.get_by_role("status").inner_text()
    (event,) = await query(console, "SELECT status FROM receiver.events WHERE key = $1", key)
    assert event["status"] == "dismissed"
    (audit,) = await query(
        console,
        "SELECT actor, reason FROM receiver.audit WHERE action = 'events_dismiss'"
        " AND event_key = $1",
        key,
    )
    assert tuple(audit) == (FINGERPRINT_ACTOR, "sender bug, INC-42")
    await page.get_by_role("link", name="Quarantine", exact=True).click()
    assert await page.get_by_role("row").filter(has_text=key).count() == 0
    await page.context.close()


@in_browser
async def test_an_operator_retries_a_dead_signal(browser: Any, console: Console) -> None:
    """The signals page shows a dead letter with its last error; retrying it with a
    reason puts it back to pending, audited under the admin token's fingerprint."""
    client_id = f"cli_dead_{uuid.uuid4().hex[:6]}"
    signal_id = await dead_signal(console, client_id, "the cache answered 400")
    page = await signed_in_page(browser, console)
    await page.get_by_role("link", name="Signals").click()
    await page.get_by_label("Status").select_option("dead")
    await page.get_by_role("button", name="Filter").click()
    row = page.get_by_role("row").filter(has_text=client_id)
    assert "the cache answered 400" in await row.inner_text()
    await row.get_by_label("Reason").fill("cache fixed, INC-43")
    await row.get_by_role("button", name="Retry").click()
    assert "1 dead signal(s) back to pending" in await page.get_by_role("status").inner_text()
    (signal,) = await query(
        console, "SELECT status, attempts FROM receiver.signals WHERE id = $1::uuid", signal_id
    )
    assert tuple(signal) == ("pending", 0)
    (audit,) = await query(
        console,
        "SELECT actor, reason, detail FROM receiver.audit WHERE action = 'signals_retry'"
        " AND client_id = $1",
        client_id,
    )
    assert (audit["actor"], audit["reason"]) == (FINGERPRINT_ACTOR, "cache fixed, INC-43")
    assert json.loads(audit["detail"])["signal_id"] == signal_id
    await page.context.close()


@in_browser
async def test_an_operator_finds_who_revealed_a_token(browser: Any, console: Console) -> None:
    """After `tokens reveal` by alice, the audit page filtered to reveals of the client
    names alice, her reason and the token's prefix (never the token)."""
    client_id = f"cli_rev_{uuid.uuid4().hex[:6]}"
    token = "tok_live_" + os.urandom(16).hex()  # printed by reveal on purpose: no canary
    await deliver(console, helpers.onboarding(client_id, token))
    revealed = await asyncio.to_thread(
        processes.run,
        ["tokens", "reveal", client_id, "--confirm", "--actor", "alice", "--reason", "INC-44"],
        console.env,
    )
    assert revealed.returncode == 0, revealed.stderr
    page = await signed_in_page(browser, console)
    await page.get_by_role("link", name="Audit").click()
    await page.get_by_label("Action").select_option("token_reveal")
    await page.get_by_label("Client id").fill(client_id)
    await page.get_by_role("button", name="Filter").click()
    row = page.get_by_role("row").filter(has_text=client_id)
    assert await row.count() == 1
    text = await row.inner_text()
    assert "alice" in text
    assert "INC-44" in text
    assert token[:15] in text
    assert token not in await page.content()
    await page.context.close()


@in_browser
async def test_every_page_loads_under_the_policy_with_a_skip_link(
    browser: Any, console: Console
) -> None:
    """Every page loads its stylesheet under the policy (no violation reported), has
    one h1, and its first focusable element is the skip link to the content; every
    field and meter on it has an accessible name (a delivery of this minute gives the
    overview its per-minute meter)."""
    await quarantined(console)
    page = await signed_in_page(browser, console)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text))
    for path in PAGES:
        await page.goto(console.admin + "/console" + path)
        assert await page.locator("h1").count() == 1
        unnamed = await page.evaluate(
            "[...document.querySelectorAll('input:not([type=hidden]), select, meter')]"
            ".filter(e => !e.labels.length && !e.getAttribute('aria-label'))"
            ".map(e => e.outerHTML)"
        )
        assert unnamed == [], path
        assert await page.evaluate("document.styleSheets.length") == 1
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.getAttribute('href')") == "#main"
    # Chromium asks for /favicon.ico by itself (a 404): nothing else may fail.
    assert [p for p in problems if "Content Security Policy" in p] == []
    await page.context.close()


# --- plain HTTP -----------------------------------------------------------------


async def test_no_token_reaches_any_page(console: Console) -> None:
    """Canary tokens planted in every field a page shows (a delivery's id, type,
    client, body and detail; a stored token; a signal's client and last error; audit
    reasons and actors) appear in no page's HTML or header, nor does the admin token."""
    token = helpers.canary_token()
    unparsed = await deliver(
        console, b'{"id": "%s", "event": "%s"' % (token.encode(), token.encode())
    )
    keys = [
        await quarantined(console, client_id=helpers.canary_token()),
        str(unparsed["event_id"]),
        await quarantined(console, reason=helpers.canary_token(), extra=[helpers.canary_token()]),
    ]
    await deliver(console, helpers.onboarding(f"cli_{uuid.uuid4().hex[:6]}"))  # a stored canary
    await dead_signal(console, helpers.canary_token(), "refused " + helpers.canary_token())
    actor = helpers.canary_token()
    dismissed = await asyncio.to_thread(
        processes.run,
        ["events", "dismiss", keys[0], "--reason", f"x {helpers.canary_token()}", "--actor", actor],
        console.env,
    )
    assert dismissed.returncode == 0, dismissed.stderr
    shown = []
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin, ADMIN_TOKEN)
        async with session.post(
            console.admin + "/console/delivery/dismiss",
            data={"csrf": csrf, "key": keys[2], "reason": "y " + helpers.canary_token()},
        ) as acted:
            assert acted.status == 200
        pages = [*PAGES, "/sign-in", "/console.css", "/delivery?key=nope", "/signals?status=dead"]
        pages += [f"/quarantine?status={s}" for s in ("processed", "dismissed", "ignored")]
        pages += [f"/delivery?key={k}" for k in keys]
        for path in pages:
            async with session.get(console.admin + "/console" + path) as answer:
                assert answer.status in (200, 404), (path, answer.status)
                shown.append(await answer.text() + str(answer.headers))
    text = "\n".join(shown)
    assert "[REDACTED]" in text  # the planted tokens were shown, masked
    assert helpers.find_canaries(text) == []


async def test_every_console_answer_carries_the_strict_headers_and_the_cookie_its_flags(
    console: Console,
) -> None:
    """Pages, the stylesheet, redirects and errors under /console/ carry the CSP (no
    inline script or style), X-Frame-Options, Referrer-Policy and no-store; the session
    cookie is HttpOnly, SameSite=Strict, path /console/, expiring, and (the admin host
    is loopback here) not Secure."""
    async with browser_session() as session:
        async with session.get(console.admin + "/console/sign-in") as form:
            match = CSRF.search(await form.text())
            assert match is not None
        async with session.post(
            console.admin + "/console/sign-in",
            data={"csrf": match.group(1), "token": ADMIN_TOKEN},
            allow_redirects=False,
        ) as signed:
            cookie = signed.cookies["receiver_console"]
            assert cookie["httponly"]
            assert cookie["samesite"] == "Strict"
            assert cookie["path"] == "/console/"
            assert int(cookie["max-age"]) == 3600
            assert not cookie["secure"]
            assert helpers.find_canaries(str(signed.headers)) == []
        for path in (*PAGES, "/console.css", "/nowhere", "/delivery?key=nope", "/sign-in"):
            async with session.get(console.admin + "/console" + path) as answer:
                headers = answer.headers
                policy = headers["Content-Security-Policy"]
                assert policy.startswith("default-src 'self'"), path
                assert "unsafe" not in policy
                for part in ("form-action 'self'", "frame-ancestors 'none'", "base-uri 'none'"):
                    assert part in policy
                assert headers["X-Frame-Options"] == "DENY"
                assert headers["Referrer-Policy"] == "no-referrer"
                assert headers["Cache-Control"] == "no-store"
                text = await answer.text()
                for inline in ("<script", "style=", "<style", "javascript:"):
                    assert inline not in text, (path, inline)


async def test_the_console_is_absent_on_the_public_port(console: Console) -> None:
    """On the public port every console path is 404, the admin token notwithstanding."""
    async with browser_session() as session:
        for path in ("/console/", "/console/sign-in", "/console/console.css", "/console"):
            async with session.get(console.public + path, allow_redirects=False) as answer:
                assert answer.status == 404, path
        async with session.post(
            console.public + "/console/sign-in", data={"token": ADMIN_TOKEN, "csrf": "x"}
        ) as answer:
            assert answer.status == 404
            assert "Set-Cookie" not in answer.headers


async def test_the_console_is_absent_without_admin_tokens(client: Client) -> None:
    """Without RECEIVER_ADMIN_TOKENS (and an admin listener) every console path is 404."""
    for path in ("/console/", "/console/sign-in", "/console/console.css"):
        assert (await client.get(path, allow_redirects=False)).status == 404, path
    refused = await client.post("/console/sign-in", data={"token": ADMIN_TOKEN, "csrf": "x"})
    assert refused.status == 404


async def test_a_wrong_token_is_refused(console: Console) -> None:
    """A token not among RECEIVER_ADMIN_TOKENS gets the form again (401), no session
    cookie, and the pages still send the browser to the sign-in form."""
    async with browser_session() as session:
        async with session.get(console.admin + "/console/sign-in") as form:
            match = CSRF.search(await form.text())
            assert match is not None
        async with session.post(
            console.admin + "/console/sign-in",
            data={"csrf": match.group(1), "token": ADMIN_TOKEN[:-1] + "x"},
            allow_redirects=False,
        ) as refused:
            assert refused.status == 401
            assert "receiver_console" not in refused.cookies
            assert "not one of the admin tokens" in await refused.text()
        async with session.get(console.admin + "/console/", allow_redirects=False) as page:
            assert page.status == 303
            assert page.headers["Location"] == "/console/sign-in"


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    console: Console,
) -> None:
    """A signed-in session's POST without, or with a wrong, CSRF token is 403 and
    dismisses nothing, retries nothing, audits nothing; so is a POST with no session,
    and a sign-in without the form's CSRF value."""
    key = await quarantined(console)
    client_id = f"cli_csrf_{uuid.uuid4().hex[:6]}"
    signal_id = await dead_signal(console, client_id, "the cache answered 400")
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin, ADMIN_TOKEN)
        for forged in ({}, {"csrf": "0" * len(csrf)}, {"csrf": csrf[:-1]}):
            for path, form in (
                ("/console/delivery/dismiss", {"key": key, "reason": "r"}),
                ("/console/signals/retry", {"id": signal_id, "reason": "r"}),
                ("/console/sign-out", {}),
            ):
                async with session.post(
                    console.admin + path, data=form | forged, allow_redirects=False
                ) as refused:
                    assert refused.status == 403, (path, forged)
    async with browser_session() as stranger:
        async with stranger.post(
            console.admin + "/console/delivery/dismiss",
            data={"key": key, "reason": "r", "csrf": csrf},
            allow_redirects=False,
        ) as refused:
            assert refused.status == 403
        async with stranger.post(
            console.admin + "/console/sign-in", data={"token": ADMIN_TOKEN, "csrf": "x"}
        ) as refused:
            assert refused.status == 403
            assert "receiver_console" not in refused.cookies
    (event,) = await query(console, "SELECT status FROM receiver.events WHERE key = $1", key)
    assert event["status"] == "quarantined"
    (signal,) = await query(
        console, "SELECT status FROM receiver.signals WHERE id = $1::uuid", signal_id
    )
    assert signal["status"] == "dead"
    audited = await query(
        console,
        "SELECT count(*) FROM receiver.audit WHERE event_key = $1 OR client_id = $2",
        key,
        client_id,
    )
    assert audited[0][0] == 0


async def test_signing_out_ends_the_session_in_the_browser(console: Console) -> None:
    """Sign-out (with its CSRF token) clears the cookie: the pages send the browser to
    the sign-in form again."""
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin, ADMIN_TOKEN)
        async with session.post(
            console.admin + "/console/sign-out", data={"csrf": csrf}, allow_redirects=False
        ) as out:
            assert out.status == 303
        async with session.get(console.admin + "/console/", allow_redirects=False) as page:
            assert page.status == 303


async def test_reprocessing_from_the_console_is_audited(console: Console) -> None:
    """Reprocess with a reason re-applies the delivery under today's rules (still a
    token outside `bearer_token`: it stays quarantined, and the page says so), with an
    audit row naming the admin token's fingerprint; without a reason it is refused."""
    key = await quarantined(console)
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin, ADMIN_TOKEN)
        url = console.admin + "/console/delivery/reprocess"
        async with session.post(url, data={"csrf": csrf, "key": key, "reason": " "}) as refused:
            assert refused.status == 400
        async with session.post(
            url, data={"csrf": csrf, "key": key, "reason": "after the fix, INC-45"}
        ) as done:
            assert done.status == 200
            assert "reprocessed: quarantined (token_outside_bearer_token)" in await done.text()
    (audit,) = await query(
        console,
        "SELECT actor, reason FROM receiver.audit WHERE action = 'events_reprocess'"
        " AND event_key = $1",
        key,
    )
    assert tuple(audit) == (FINGERPRINT_ACTOR, "after the fix, INC-45")


async def test_the_filters_narrow_each_page_and_refuse_what_they_do_not_know(
    console: Console,
) -> None:
    """The quarantine by reason, the tokens by client, the audit trail by actor and by
    time each show what matches and nothing else; a filter value no page knows is a
    400 (so is a retry of no signal, or of a malformed id), and `/console` (or the
    sign-in page, once signed in) leads to the overview."""
    key = await quarantined(console)
    client_id = f"cli_filter_{uuid.uuid4().hex[:6]}"
    await deliver(console, helpers.onboarding(client_id))
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin, ADMIN_TOKEN)
        async with session.post(
            console.admin + "/console/delivery/dismiss",
            data={"csrf": csrf, "key": key, "reason": "filtered"},
        ) as acted:
            assert acted.status == 200

        async def page(path: str) -> str:
            async with session.get(console.admin + "/console" + path) as answer:
                assert answer.status == 200, path
                return await answer.text()

        assert key in await page("/quarantine?status=dismissed&reason=token_outside_bearer_token")
        assert key not in await page("/quarantine?status=dismissed&reason=invalid_json")
        tokens = await page(f"/tokens?client={client_id}&status=active&environment=live&limit=50")
        assert client_id in tokens
        assert "cli_filter_" not in tokens.replace(client_id, "")
        mine = await page(f"/audit?actor={FINGERPRINT_ACTOR}&action=events_dismiss")
        assert key in mine
        assert key not in await page("/audit?actor=someone-else")
        assert key not in await page("/audit?since=2999-01-01T00:00")
        assert key in await page("/audit?since=2000-01-01T00:00&until=2999-01-01T00:00")
        for wrong in ("/quarantine?reason=nope", "/tokens?status=nope", "/audit?since=soon"):
            async with session.get(console.admin + "/console" + wrong) as refused:
                assert refused.status == 400, wrong
        for ids in ({"id": "not-a-uuid"}, {}):
            async with session.post(
                console.admin + "/console/signals/retry",
                data={"csrf": csrf, "reason": "r", **ids},
            ) as refused:
                assert refused.status == 400, ids
        for bare in ("/console", "/console/sign-in"):  # signed in: the overview
            async with session.get(console.admin + bare, allow_redirects=False) as answer:
                assert (answer.status, answer.headers["Location"]) == (303, "/console/")

"""Attacks on the operator console (`/console/` on the admin listener), against a real
`receiver serve` with RECEIVER_ADMIN_PORT and RECEIVER_ADMIN_TOKENS: malformed
session cookies, query strings and form bodies (each a 4xx, never an internal error),
a token typed where a delivery's key goes (never echoed in a header or kept in the
audit trail), a filter value that tries to become markup, and a removed admin token.

Plain HTTP only (no browser): every case is about what the server answers.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest

from tests import helpers
from tests.integration import console_client, processes, standins
from tests.integration.console_client import CSRF, Console, browser_session, quarantined, served

ADMIN_TOKEN = "adm_attack_" + "a" * 37
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def console(server_dsn: str, template_name: str) -> Iterator[Console]:
    """`receiver serve` with the admin listener and an admin token, on its own database."""
    with served(server_dsn, template_name, "receiver_console_attacks", ADMIN_TOKEN) as running:
        yield running


async def sign_in(session: aiohttp.ClientSession, base: str, token: str = ADMIN_TOKEN) -> str:
    """Sign in with this module's admin token unless told another."""
    return await console_client.sign_in(session, base, token)


async def audit_text(console: Console) -> str:
    """The whole audit trail as text (what a dump of it would hold)."""
    conn = await asyncpg.connect(console.database_url)
    try:
        rows = await conn.fetch("SELECT * FROM receiver.audit")
    finally:
        await conn.close()
    return "\n".join(str(dict(row)) for row in rows)


async def test_a_malformed_session_cookie_is_no_session_never_an_error(
    console: Console,
) -> None:
    """A session cookie whose expiry is digits Python's int() will not read (more than
    4,300 of them, or a superscript two), or that is huge or not ASCII, proves no
    session: the pages send the browser to the sign-in form and the forms are refused
    (403); nothing answers 503 (an internal error)."""
    async with browser_session() as session:
        await sign_in(session, console.admin)
        (cookie,) = [c.value for c in session.cookie_jar if c.key == "receiver_console"]
    fingerprint, _, nonce, mac = cookie.split(".")
    forged = [
        f"{fingerprint}.{'9' * 5000}.{nonce}.{mac}",
        f"{fingerprint}.\u00b2\u00b2.{nonce}.{mac}",
        f"{fingerprint}.{'1' * 40}.{nonce}.{mac}",
        "x" * 6000,
        "\u00e9" * 100,
        f"{cookie}.{mac}",
    ]
    async with aiohttp.ClientSession() as stranger:
        for value in forged:
            headers = {"Cookie": "receiver_console=" + value}
            async with stranger.get(
                console.admin + "/console/", headers=headers, allow_redirects=False
            ) as page:
                assert (page.status, page.headers.get("Location")) == (
                    303,
                    "/console/sign-in",
                ), value[:60]
            async with stranger.post(
                console.admin + "/console/sign-out", headers=headers, data={"csrf": "x"}
            ) as form:
                assert form.status == 403, value[:60]


async def test_a_limit_the_pages_do_not_offer_is_refused(console: Console) -> None:
    """`limit` is one of the sizes the pages offer (50, 100, 500, 1000) or absent;
    anything else (negative, zero, overflowing, thousands of digits, a digit that is
    not ASCII) is a 400 naming the sizes, never an internal error nor a silent 100."""
    async with browser_session() as session:
        await sign_in(session, console.admin)
        for page in ("/quarantine", "/tokens", "/signals", "/audit"):
            async with session.get(console.admin + "/console" + page + "?limit=500") as fine:
                assert fine.status == 200, page
            for limit in ("-1", "0", "7", "1001", "9" * 30, "9" * 5000, "%C2%B2", "1e3", " 50"):
                async with session.get(
                    console.admin + "/console" + page + "?limit=" + limit
                ) as refused:
                    assert refused.status == 400, (page, limit[:40])
                    assert "50, 100, 500, 1000" in (await refused.json())["error"]["message"]


async def test_a_filter_the_page_does_not_know_is_refused(console: Console) -> None:
    """A misspelt filter (`?stauts=dead`) would show every row while the operator
    believes they see only dead ones: each page takes only its own query keys, and
    anything else is a 400 naming the keys it takes (never the one given)."""
    pages = {
        "/": (),
        "/quarantine": ("status", "reason", "type", "limit"),
        "/tokens": ("client", "status", "environment", "limit"),
        "/signals": ("status", "limit", "retried"),
        "/audit": ("action", "actor", "client", "since", "until", "limit"),
        "/sign-in": (),
    }
    async with browser_session() as session:
        await sign_in(session, console.admin)
        for page, keys in pages.items():
            for wrong in ("stauts=dead", "limit=100&x=1", "Status=dead"):
                url = f"{console.admin}/console{page}?{wrong}"
                async with session.get(url, allow_redirects=False) as refused:
                    assert refused.status == 400, (page, wrong)
                    message = (await refused.json())["error"]["message"]
                    assert "stauts" not in message
                    assert all(key in message for key in keys), (page, message)
            if keys:
                known = "&".join(f"{key}=" for key in keys)
                async with session.get(f"{console.admin}/console{page}?{known}") as fine:
                    assert fine.status == 200, page


async def test_a_form_body_that_cannot_be_read_is_refused(console: Console) -> None:
    """A form that is not UTF-8 or names a charset nobody knows is a 400; a body that
    is not the urlencoded form the pages send (multipart, broken or not: aiohttp's
    parser raises RuntimeError on an unknown transfer encoding) is a 415. Sign-in or a
    signed-in form alike: never an internal error, and nothing is done."""
    key = await quarantined(console)
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin)
        good = f"csrf={csrf}&key={key}&reason=r".encode()
        unreadable = [(FORM, good + b"\xff\xfe"), (FORM + "; charset=no-such-charset", good)]
        not_forms = [
            ("multipart/form-data", good),  # no boundary
            (
                "multipart/form-data; boundary=b",
                b"--b\r\nContent-Disposition: form-data\r\n\r\n" + csrf.encode() + b"\r\n--b--\r\n",
            ),
            (
                "multipart/form-data; boundary=b",
                b'--b\r\nContent-Disposition: form-data; name="csrf"\r\n'
                b"Content-Type: text/plain; charset=no-such-charset\r\n\r\n"
                + csrf.encode()
                + b"\r\n--b--\r\n",
            ),
            (
                "multipart/form-data; boundary=b",
                b'--b\r\nContent-Disposition: form-data; name="csrf"\r\n'
                b"Content-Transfer-Encoding: no-such-encoding\r\n\r\n"
                + csrf.encode()
                + b"\r\n--b--\r\n",
            ),
            (
                "multipart/form-data; boundary=b",
                b"".join(
                    b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                    % (name, value)
                    for name, value in ((b"csrf", csrf.encode()), (b"key", key.encode()))
                )
                + b'--b\r\nContent-Disposition: form-data; name="reason"\r\n\r\nr\r\n--b--\r\n',
            ),
            ("text/plain", good),
            ("application/json", b'{"csrf": "%s"}' % csrf.encode()),
        ]
        for path in ("/console/delivery/dismiss", "/console/sign-in"):
            for expected, bodies in ((400, unreadable), (415, not_forms)):
                for content_type, body in bodies:
                    async with session.post(
                        console.admin + path,
                        data=body,
                        headers={"Content-Type": content_type},
                        allow_redirects=False,
                    ) as refused:
                        assert refused.status == expected, (path, content_type, body[-40:])
    conn = await asyncpg.connect(console.database_url)
    try:
        status = await conn.fetchval("SELECT status FROM receiver.events WHERE key = $1", key)
    finally:
        await conn.close()
    assert status == "quarantined"


async def test_a_form_over_16_kib_is_refused_however_it_arrives(console: Console) -> None:
    """A console form is at most 16 KiB, said in Content-Length or sent in chunks
    with none: 413 either way, and nothing is done."""
    key = await quarantined(console)
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin)
        body = f"csrf={csrf}&key={key}&reason={'r' * 20_000}".encode()

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 4096):
                yield body[start : start + 4096]

        for data in (body, chunks()):
            async with session.post(
                console.admin + "/console/delivery/dismiss",
                data=data,
                headers={"Content-Type": FORM},
                allow_redirects=False,
            ) as refused:
                assert refused.status == 413
    conn = await asyncpg.connect(console.database_url)
    try:
        status = await conn.fetchval("SELECT status FROM receiver.events WHERE key = $1", key)
    finally:
        await conn.close()
    assert status == "quarantined"


async def test_a_token_typed_as_a_delivery_key_goes_nowhere(console: Console) -> None:
    """A token pasted where a delivery's key goes (dismiss, reprocess) is no stored
    delivery: a 404 that does not echo it, no redirect carrying it in `Location`
    (a URL), and no audit row holding it."""
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin)
        for path in ("/console/delivery/dismiss", "/console/delivery/reprocess"):
            for key in (helpers.canary_token(), "x " + helpers.canary_token()):
                async with session.post(
                    console.admin + path,
                    data={"csrf": csrf, "key": key, "reason": "typed by mistake"},
                    allow_redirects=False,
                ) as answer:
                    shown = await answer.text() + str(answer.headers)
                    assert answer.status == 404, (path, answer.headers.get("Location"))
                    assert helpers.find_canaries(shown) == []
    assert helpers.find_canaries(await audit_text(console)) == []


async def test_a_secret_pasted_into_a_reason_is_not_kept(console: Console) -> None:
    """An operator who pastes the admin token (just used to sign in) or the webhook
    secret into a reason: the act is done and audited, but the audit row holds
    neither secret, only the rest of the reason (the page masks configured secrets
    only while they are configured; a dump of the trail is forever)."""
    keys = [await quarantined(console), await quarantined(console)]
    reason = f"INC-46 pasted {ADMIN_TOKEN} and {console.secret} by mistake"
    async with browser_session() as session:
        csrf = await sign_in(session, console.admin)
        for path, key in zip(
            ("/console/delivery/dismiss", "/console/delivery/reprocess"), keys, strict=True
        ):
            async with session.post(
                console.admin + path,
                data={"csrf": csrf, "key": key, "reason": reason},
                allow_redirects=False,
            ) as done:
                assert done.status == 303, path
    conn = await asyncpg.connect(console.database_url)
    try:
        reasons = await conn.fetch(
            "SELECT reason FROM receiver.audit WHERE event_key = ANY($1::text[])", keys
        )
    finally:
        await conn.close()
    assert len(reasons) == 2
    for row in reasons:
        assert row["reason"].startswith("INC-46 pasted "), row["reason"]
        assert ADMIN_TOKEN not in row["reason"]
        assert console.secret not in row["reason"]


async def test_a_link_cannot_put_words_in_the_consoles_mouth(console: Console) -> None:
    """The notice after a form (`done` on a delivery's page, `retried` on the signals
    page) says only what the console's forms say: a link carrying a message of its
    own (a phishing line, shown in the console's own status box) is a 400."""
    key = await quarantined(console)
    spoof = quote("session expired: sign in again at https://evil.example/console")
    async with browser_session() as session:
        await sign_in(session, console.admin)
        for page in (f"/delivery?key={key}&done={spoof}", f"/signals?retried={spoof}"):
            async with session.get(console.admin + "/console" + page) as refused:
                assert refused.status == 400, page
        for page, notice in (
            (f"/delivery?key={key}&done=dismissed", "dismissed"),
            (f"/delivery?key={key}&done={quote('reprocessed: processed')}", "reprocessed"),
            ("/signals?retried=2", "2 dead signal(s) back to pending"),
        ):
            async with session.get(console.admin + "/console" + page) as shown:
                assert shown.status == 200, page
                assert notice in await shown.text()


async def test_a_filter_value_never_becomes_markup(console: Console) -> None:
    """A filter value that reads as markup once its JSON escapes are read
    (`\\u005cu003c` is `\\u003c`, which is `<`) is shown as text: no tag of its own
    reaches the page, in any filter field of any page."""
    injected = (
        "\\u005cu0022\\u005cu003e\\u005cu003cmeta http-equiv=refresh"
        " content=0;url=https://evil.example\\u005cu003e"
    )
    async with browser_session() as session:
        await sign_in(session, console.admin)
        for page, field in (
            ("/tokens", "client"),
            ("/audit", "actor"),
            ("/audit", "client"),
            ("/quarantine", "type"),
        ):
            url = f"{console.admin}/console{page}?{field}={quote(injected)}"
            async with session.get(url) as answer:
                assert answer.status == 200, (page, field)
                html = await answer.text()
            assert "<meta http-equiv=refresh" not in html, (page, field)
            assert html.count("<meta") == 3  # the page's own: charset, viewport, referrer


async def test_removing_an_admin_token_ends_its_sessions_and_no_other(
    database_url: str, tmp_path: Path
) -> None:
    """Two admin tokens from RECEIVER_ADMIN_TOKENS_FILE, a session under each; the
    first removed from the file and SIGHUP: its session proves nothing any more (the
    pages send it to sign-in, its forms are refused, signing in with it is refused),
    while the other token's session goes on."""
    kept, removed = "adm_kept_" + "k" * 40, "adm_removed_" + "r" * 40
    helpers.CANARIES.update((kept, removed))
    tokens = tmp_path / "admin_tokens"
    tokens.write_text(f"{removed},{kept}")
    public, admin = processes.free_port(), processes.free_port()
    env, _ = processes.receiver_env(
        database_url, RECEIVER_ADMIN_PORT=str(admin), RECEIVER_ADMIN_TOKENS_FILE=str(tokens)
    )
    base = f"http://127.0.0.1:{admin}"
    with processes.serving(["--port", str(public)], env) as (process, log):
        await processes.wait_healthy(admin, process)
        async with browser_session() as old, browser_session() as new:
            old_csrf = await sign_in(old, base, removed)
            await sign_in(new, base, kept)
            tokens.write_text(kept)
            process.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return any(
                    "configuration_reloaded" in line and "RECEIVER_ADMIN_TOKENS" in line
                    for line in log.read_text().splitlines()
                )

            await standins.eventually(reloaded)
            async with old.get(base + "/console/", allow_redirects=False) as page:
                assert (page.status, page.headers["Location"]) == (303, "/console/sign-in")
            async with old.post(
                base + "/console/sign-out", data={"csrf": old_csrf}, allow_redirects=False
            ) as form:
                assert form.status == 403
            async with new.get(base + "/console/audit", allow_redirects=False) as page:
                assert page.status == 200
        async with browser_session() as again:
            async with again.get(base + "/console/sign-in") as form:
                match = CSRF.search(await form.text())
            assert match is not None
            async with again.post(
                base + "/console/sign-in",
                data={"csrf": match.group(1), "token": removed},
                allow_redirects=False,
            ) as refused:
                assert refused.status == 401

"""What the console's tests share: a `receiver serve` with the admin listener and one
admin token, an HTTP client that keeps cookies as a browser does, the sign-in through
the form, and a planted quarantined delivery."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests import conftest, helpers
from tests.integration import processes

CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


@dataclass(frozen=True)
class Console:
    """A running receiver with the console: its two listeners, its database, the
    webhook secret deliveries are signed with, and its environment."""

    public: str
    admin: str
    database_url: str
    secret: str
    env: dict[str, str]

    @property
    def public_port(self) -> int:
        return int(self.public.rsplit(":", 1)[1])


@contextmanager
def served(server_dsn: str, template_name: str, prefix: str, token: str) -> Iterator[Console]:
    """`receiver serve` with the admin listener and `token` as its admin token, on a
    database of its own (named after `prefix`)."""
    helpers.CANARIES.add(token)
    with conftest.cloned_database(server_dsn, template_name, prefix) as url:
        public, admin = processes.free_port(), processes.free_port()
        env, secret = processes.receiver_env(
            url, RECEIVER_ADMIN_PORT=str(admin), RECEIVER_ADMIN_TOKENS=token
        )
        with processes.serving(["--port", str(public)], env) as (process, _):
            asyncio.run(processes.wait_healthy(admin, process))
            yield Console(
                f"http://127.0.0.1:{public}", f"http://127.0.0.1:{admin}", url, secret, env
            )


def browser_session() -> aiohttp.ClientSession:
    """An HTTP client that keeps cookies from 127.0.0.1, as a browser does."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(session: aiohttp.ClientSession, base: str, token: str) -> str:
    """Sign in through the form; the session's CSRF token (from the overview's forms)."""
    async with session.get(base + "/console/sign-in") as form:
        match = CSRF.search(await form.text())
    assert match is not None
    async with session.post(
        base + "/console/sign-in",
        data={"csrf": match.group(1), "token": token},
        allow_redirects=False,
    ) as signed:
        assert signed.status == 303
    async with session.get(base + "/console/", allow_redirects=False) as overview:
        assert overview.status == 200
        found = CSRF.search(await overview.text())
    assert found is not None
    return found.group(1)


async def deliver(console: Console, document: Any) -> dict[str, Any]:
    """A delivery signed as Debitura signs it, to the public port; its answer."""
    body = document if isinstance(document, bytes) else helpers.encode(document)
    status, answer = await processes.post_signed(console.public_port, console.secret, body)
    assert status == 200, answer
    return answer


async def quarantined(console: Console, **data: Any) -> str:
    """A delivery that quarantines (a token outside `bearer_token`); its stored key."""
    token = helpers.canary_token()
    document = helpers.onboarding(client_id=f"cli_{uuid.uuid4().hex[:8]}", token=token)
    document["data"].update({"note": f"see {token}", **data})
    answer = await deliver(console, document)
    assert answer["status"] == "quarantined", answer
    return str(answer["event_id"])

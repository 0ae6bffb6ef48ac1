"""Outside parties stood in by small real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from tests import helpers


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    """Wait (bounded) until `check` holds; fail the test if it never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {seconds} s")


class StandInCache:
    """The partner's token cache service: records every signal POST it receives.

    It checks the Standard Webhooks signature with the `standardwebhooks` package and
    the legacy X-Receiver-Signature with the test's own implementation of that
    scheme, and can be told to answer with given statuses, to hang, or to be down
    (its port closed).
    """

    def __init__(self, secret_b64: str, port: int) -> None:
        self.secret_b64 = secret_b64
        self.port = port
        self.received: list[dict[str, Any]] = []
        self.statuses: deque[int] = deque()  # answers for the next requests, then 200
        self.hang: asyncio.Event | None = None  # when set, requests wait for it
        self.latency = 0.0  # seconds each answer takes: a slow cache, not a sync point
        self.arrivals: list[float] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where the receiver should POST signals."""
        return f"http://127.0.0.1:{self.port}/signals"

    async def start(self) -> None:
        """Open the port."""
        app = web.Application()
        app.router.add_post("/signals", self._receive)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Close the port."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> list[str]:
        """Signal ids received, in order, duplicates included."""
        return [r["body"]["signal_id"] for r in self.received]

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        # Verified as an independent client would: by the Standard Webhooks library.
        Webhook(self.secret_b64).verify(body, dict(request.headers))
        header = request.headers.get("X-Receiver-Signature")
        if header is not None:  # the first release's header, still sent (a setting)
            t = int(header.split(",")[0].removeprefix("t="))
            assert header == helpers.debitura_signature(self.secret_b64, body, t), "bad signature"
        self.arrivals.append(time.monotonic())
        self.received.append({"body": json.loads(body), "headers": dict(request.headers)})
        if self.hang is not None:
            await self.hang.wait()
        if self.latency:
            await asyncio.sleep(self.latency)
        status = self.statuses.popleft() if self.statuses else 200
        return web.json_response({"ok": status == 200}, status=status)

"""The HTTP ceiling: a bare aiohttp handler that reads the body and answers 200 JSON."""

from __future__ import annotations

import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    """Read the body, answer like the receiver does."""
    await request.read()
    return web.json_response({"status": "processed", "event_id": "evt"})


async def ready(_: web.Request) -> web.Response:
    """The readiness probe the harness waits on."""
    return web.json_response({"status": "ready"})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/webhooks/debitura", handle)
    app.router.add_get("/readyz", ready)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)

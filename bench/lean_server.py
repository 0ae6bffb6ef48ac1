"""The lean reference receiver: the yardstick of the hot path (issue 14).

Written from `../shared/bench/server.py`'s `db_lean` mode and described the same
way: per request, read the body, check the HMAC-SHA256 signature, pydantic v2
`model_validate_json`, AES-256-GCM seal of the token, and one `INSERT` (its own
implicit transaction, `synchronous_commit = on`, fsynced before the 200) from an
asyncpg pool of 10 with the release-reset query skipped; uvloop event loop, no
access log. It does **not** deduplicate, keep a token lifecycle, write an outbox
row, NOTIFY, log or count anything: the receiver does all of that, which is why its
target is a ratio below 1.

The one difference from the shared file: it reads the same requests as the receiver
(Debitura's `X-Debitura-Signature: t=…,v1=…` over `<t>.<body>`, the onboarding
envelope), so both servers get byte-identical load from one generator.

    python -m bench.lean_server PORT   (RECEIVER_DATABASE_URL, RECEIVER_WEBHOOK_SECRETS)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import sys
from typing import Any

import asyncpg
import uvloop
from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel

TABLE = """
CREATE TABLE IF NOT EXISTS lean_events (
  id          bigserial PRIMARY KEY,
  event_id    text        NOT NULL,
  event_type  text        NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now(),
  payload     jsonb       NOT NULL,
  enc_token   bytea       NOT NULL
)
"""
INSERT = (
    "INSERT INTO lean_events (event_id, event_type, payload, enc_token) VALUES ($1, $2, $3, $4)"
)


class Data(BaseModel):
    client_id: str
    bearer_token: str
    onboarding_completed_at: str


class Event(BaseModel):
    id: str
    event: str
    data: Data


def build_app(pool: asyncpg.Pool, secret: bytes) -> web.Application:
    aead = AESGCM(hashlib.sha256(b"lean-reference-key").digest())

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get("X-Debitura-Signature", "")
        t, _, v1 = header.partition(",")
        expected = hmac.new(secret, t[2:].encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, v1[3:]):
            raise web.HTTPUnauthorized(text="bad signature")
        try:
            event = Event.model_validate_json(body)
        except ValueError:
            raise web.HTTPBadRequest(text="invalid payload") from None
        nonce = os.urandom(12)
        sealed = nonce + aead.encrypt(nonce, event.data.bearer_token.encode(), event.id.encode())
        async with pool.acquire() as conn:
            await conn.execute(INSERT, event.id, event.event, body.decode(), sealed)
        return web.Response(text="ok")

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_post("/webhooks/debitura", receive)
    app.router.add_get("/readyz", ready)
    return app


async def main(port: int) -> None:
    async def as_text(conn: Any) -> None:  # jsonb in as the text it arrived as
        await conn.set_type_codec(
            "jsonb", encoder=lambda s: s, decoder=lambda s: s, schema="pg_catalog"
        )

    async def no_reset(_: Any) -> None:
        pass

    pool = await asyncpg.create_pool(
        os.environ["RECEIVER_DATABASE_URL"],
        min_size=10,
        max_size=10,
        server_settings={"synchronous_commit": "on"},
        init=as_text,
        reset=no_reset,
    )
    await pool.execute(TABLE)
    secret = base64.b64decode(os.environ["RECEIVER_WEBHOOK_SECRETS"].split(",")[0])
    runner = web.AppRunner(build_app(pool, secret), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))

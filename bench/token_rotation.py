"""`receiver tokens rotate --due` for N due clients against `receiver sandbox`: wall
time and the rate of rotate-token requests.

The sandbox runs in this process on loopback; the vault is seeded with each client's
token (through the lifecycle, as `tokens fetch` would) aged past 90 days; then the
real command runs as a subprocess. RECEIVER_TOKEN_ROTATE_RATE caps the calls per
second (the product default is 1/s, deliberately gentle: 1,000 clients then take
about 17 minutes); `--rate` sets it for the run.

    .venv/bin/python -m bench.token_rotation [--clients 1000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import asyncpg

from bench import harness
from receiver import config, db, log, vault
from receiver.lifecycle import adoption, audit
from receiver.sandbox import Sandbox


async def seed(database_url: str, env: dict[str, str], sb: Sandbox, clients: int) -> None:
    """Link `clients` clients at the sandbox and store each one's token, aged 100 days."""
    settings = config.load_settings(
        database_url=database_url,
        webhook_secrets=env["RECEIVER_WEBHOOK_SECRETS"],
        token_keys=env["RECEIVER_TOKEN_KEYS"],
        index_key=env["RECEIVER_INDEX_KEY"],
    )
    sealer = vault.Sealer.from_settings(settings)
    database = await db.Database.open(database_url)
    actor = audit.Actor("bench", "seed")
    try:
        for n in range(clients):
            client_id = f"cli_bench_{n:05d}"
            token = sb.link_client(client_id)
            await adoption.import_token(database, settings, sealer, client_id, token, actor)
    finally:
        await database.close()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE receiver.tokens SET onboarding_completed_at = now() - interval '100 days'"
        )
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0, help="RECEIVER_TOKEN_ROTATE_RATE")
    args = parser.parse_args()
    log.configure(level="error")  # the sandbox's line per call would drown the figures

    dsn = harness.server_dsn()
    sb = Sandbox(environment="live")
    await sb.start()
    try:
        async with harness.fresh_database(dsn) as database_url:
            env = harness.secrets_env(database_url)
            await seed(database_url, env, sb, args.clients)
            env.update(
                RECEIVER_DEBITURA_API_URL=sb.url,
                RECEIVER_DEBITURA_API_KEY=sb.api_key,
                RECEIVER_TOKEN_ROTATE_RATE=str(args.rate),
                RECEIVER_LOG_LEVEL="warning",
            )
            started = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "receiver",
                "tokens",
                "rotate",
                "--due",
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await process.communicate()
            wall = time.monotonic() - started
            conn = await asyncpg.connect(database_url)
            try:
                rotated = await conn.fetchval(
                    "SELECT count(*) FROM receiver.audit WHERE action = 'token_rotate'"
                )
                active_new = await conn.fetchval(
                    "SELECT count(*) FROM receiver.tokens WHERE status = 'active' "
                    "AND created_by_event LIKE 'rotate_%'"
                )
            finally:
                await conn.close()
    finally:
        await sb.stop()
    lines = out.decode().splitlines()
    print(f"tokens rotate --due: {args.clients} due clients, rate cap {args.rate:g}/s")
    print(f"  exit {process.returncode}, {len(lines)} output lines, {rotated} audited rotations,")
    print(f"  {active_new} new active tokens, rotate-token requests {sb.calls['rotate']}")
    print(f"  wall time {wall:.2f} s (process start included)")
    print(f"  request rate {sb.calls['rotate'] / wall:.1f} rotations/s")
    if process.returncode != 0:
        print(err.decode()[-2000:])


if __name__ == "__main__":
    asyncio.run(main())

"""How fast `receiver sandbox` answers the token calls: N clients linked at start,
each rotated (then fetched) once over loopback, from this process, at a concurrency.

    .venv/bin/python -m bench.sandbox [--clients 1000] [--concurrency 8]

The sandbox runs as its own process (`receiver sandbox`), as a partner's test would
run it, so the load generator does not share its event loop. A ceiling for tests
that drive many clients through it (`tokens rotate --due` over 1,000 clients).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import aiohttp

API_KEY = "sk_bench_sandbox_0123456789abcdef"
CLIENTS = "/v1/referral-partners/clients"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _wait_ready(session: aiohttp.ClientSession, url: str, last: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}{CLIENTS}/{last}/token") as answer:
                if answer.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("the sandbox did not come up")


async def _phase(
    session: aiohttp.ClientSession, method: str, urls: list[str], concurrency: int
) -> tuple[float, list[float]]:
    queue = list(reversed(urls))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            url = queue.pop()
            began = time.perf_counter()
            body = {"reason": "bench", "revoke_immediately": False}
            async with session.request(method, url, json=body) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began, latencies


def _report(name: str, elapsed: float, latencies: list[float]) -> None:
    cuts = statistics.quantiles(latencies, n=100)
    print(
        f"{name}: {len(latencies)} in {elapsed:.2f} s = {len(latencies) / elapsed:.0f}/s, "
        f"p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms"
    )


async def _run(clients: int, concurrency: int) -> None:
    port = _free_port()
    ids = [f"cli_bench_{i:05d}" for i in range(clients)]
    links = [arg for cid in ids for arg in ("--link", cid)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    command = [sys.executable, "-m", "receiver", "sandbox", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--api-key", API_KEY, *links],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers={"XApiKey": API_KEY}) as session:
            await _wait_ready(session, url, ids[-1])
            rotations = [f"{url}{CLIENTS}/{cid}/rotate-token" for cid in ids]
            _report("rotate", *await _phase(session, "POST", rotations, concurrency))
            fetches = [f"{url}{CLIENTS}/{cid}/token" for cid in ids]
            _report("fetch", *await _phase(session, "GET", fetches, concurrency))
    finally:
        process.terminate()
        process.wait(timeout=20)


def main() -> None:
    """Parse the options, measure, print one line per call."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(_run(args.clients, args.concurrency))


if __name__ == "__main__":
    main()

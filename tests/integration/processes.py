"""Running the real `receiver` command as a subprocess, its output under the canary check."""

from __future__ import annotations

import asyncio
import http.client
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from receiver import config
from tests import conftest, helpers

# Below the kernel's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, 32768 up
# by default): a port the kernel hands out for `bind(0)` is also one it hands out as
# the local port of an outgoing connection, so between our check and the receiver's
# bind a test's own HTTP client could take it (an admin listener on 0.0.0.0 then
# exited "port in use" about once per suite run).
# Each pytest-xdist worker draws from its own share of the range, and no port twice:
# two probes that both found a port free (two workers, or one test asking for a
# public and an admin port) could hand out the same one, and the second receiver
# exited "port in use" (once in a suite run).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORTS = range(
    20000 + _WORKER, 32000, max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
)
_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nobody listens on right now, on any address (a receiver may bind it on
    0.0.0.0), outside the range outgoing connections take their ports from, never
    handed out before by this process and never one another worker may hand out."""
    for _ in range(200):
        port = random.choice(_PORTS)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))  # noqa: S104 (a probe, closed at once)
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise AssertionError("no free port in 200 tries")


def clean_env(**values: str) -> dict[str, str]:
    """The current environment without any RECEIVER_* variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env.update(values)
    return env


def receiver_env(database_url: str, **extra: str) -> tuple[dict[str, str], str]:
    """Settings for a receiver process with fresh dev secrets, and its webhook secret."""
    values = {f"RECEIVER_{k.upper()}": v for k, v in config.generate_dev_secrets().items()}
    # Each scrape reads afresh: tests compare scrapes a moment apart.
    values["RECEIVER_METRICS_REFRESH_SECONDS"] = "0"
    # No readiness delay at SIGTERM unless a test asks for one (it stops each process).
    values["RECEIVER_SHUTDOWN_DELAY_SECONDS"] = "0"
    env = clean_env(**{**values, "RECEIVER_DATABASE_URL": database_url, **extra})
    return env, values["RECEIVER_WEBHOOK_SECRETS"]


def run(
    args: list[str],
    env: Mapping[str, str],
    timeout: float = 60,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a receiver command to completion; its output joins the canary check."""
    result = subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin if stdin is not None else "",
        cwd=cwd,
    )
    log = conftest.LOG_DIR / f"cli-{time.monotonic_ns()}.log"
    log.write_text(result.stdout + "\n" + result.stderr)
    return result


@contextmanager
def serving(
    args: list[str], env: Mapping[str, str]
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A `receiver serve` process; yields it and the file its output goes to."""
    with background(["serve", *args], env) as started:
        yield started


@contextmanager
def background(
    args: list[str], env: Mapping[str, str]
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Any long-running receiver command; yields it and the file its output goes to.
    On exit it is stopped with SIGTERM (SIGKILL if it does not stop in 20 s)."""
    output = conftest.LOG_DIR / f"{args[0]}-{time.monotonic_ns()}.log"
    with output.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "receiver", *args],
            env=dict(env),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            yield process, output
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def wait_healthy(port: int, process: subprocess.Popen[str], seconds: float = 60) -> None:
    """Poll /healthz until the server answers (bounded)."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"receiver exited early with {process.returncode}")
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("receiver did not become healthy in time")


async def post_signed(port: int, secret_b64: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST a body signed as Debitura signs to a receiver process on `port`; its
    status and JSON answer."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/webhooks/debitura",
            data=body,
            headers=helpers.signed_headers(secret_b64, body),
        ) as answer,
    ):
        return answer.status, await answer.json()


class Served:
    """A receiver process on its own database, for a whole module."""

    def __init__(
        self, url: str, secret: str, database_url: str, keys: dict[str, str], log: Path
    ) -> None:
        self.url, self.secret, self.database_url, self.keys = url, secret, database_url, keys
        self.log = log
        self.port = int(url.rsplit(":", 1)[1])

    def get(self, path: str) -> str:
        """GET a path; the body as text."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            connection.request("GET", path)
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            connection.request("POST", "/webhooks/debitura", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            connection.close()

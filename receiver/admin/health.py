"""`receiver health`: does the local `serve` answer? For a container's HEALTHCHECK, a
systemd ExecStartPost or an exec probe: GET /healthz on the admin listener when
RECEIVER_ADMIN_PORT is set (serve answers its probes there only, and 404 on the
public port), else on the public port. Exit 0 or 1 (Docker reserves 2), one line.

It reads RECEIVER_ADMIN_PORT and RECEIVER_ADMIN_HOST only (config.ProbeSettings): a
health check must not need the service's secrets, nor fail when one is malformed."""

from __future__ import annotations

import argparse
import http.client
import sys
import time

from receiver import config, console, errors

PATH = "/healthz"
PAUSE_SECONDS = 0.5
# A listener bound to every address is reached on loopback.
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


def target(probe: config.ProbeSettings, port: int) -> tuple[str, int]:
    """Where `serve` answers /healthz: the admin listener when one is configured, else
    the public port on loopback."""
    if probe.admin_port is None:
        return "127.0.0.1", port
    return _WILDCARDS.get(probe.admin_host, probe.admin_host), probe.admin_port


def health(args: argparse.Namespace) -> int:
    """`receiver health [--port P] [--timeout S] [--wait S]`."""
    try:
        probe = config.load_probe_settings()
    except errors.ConfigError as exc:
        print(f"receiver: unhealthy: configuration error: {exc}", file=sys.stderr)
        return console.EXIT_FAILURE
    host, port = target(probe, args.port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{PATH}"
    deadline = time.monotonic() + args.wait
    while True:
        failure = _check(host, port, args.timeout, admin=probe.admin_port is not None)
        if failure is None:
            print(f"receiver: healthy: {url}")
            return 0
        if time.monotonic() + PAUSE_SECONDS > deadline:
            print(f"receiver: unhealthy: {url}: {failure}", file=sys.stderr)
            return console.EXIT_FAILURE
        time.sleep(PAUSE_SECONDS)


def _check(host: str, port: int, timeout: float, *, admin: bool) -> str | None:
    """None when /healthz answers 200, else why not (a few words)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", PATH, headers={"User-Agent": "receiver-health"})
        status = connection.getresponse().status
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused (is serve running, on this port?)"
    except (OSError, http.client.HTTPException) as exc:
        return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    finally:
        connection.close()
    if status != 200:
        # serve has an admin listener this environment does not name
        hint = " (is RECEIVER_ADMIN_PORT set for serve?)" if status == 404 and not admin else ""
        return f"answered {status}{hint}"
    return None

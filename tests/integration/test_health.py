"""`receiver health` against a real `serve` (README: Deploying): it finds /healthz on
the admin listener when RECEIVER_ADMIN_PORT is set and on the public port otherwise,
reads no secret, and says in one line, exit 1, when nothing answers."""

from __future__ import annotations

import pytest

from tests.integration import processes


@pytest.mark.parametrize("admin_host", [None, "127.0.0.1", "0.0.0.0"])  # noqa: S104
async def test_health_finds_the_probes_with_and_without_the_admin_port(
    database_url: str, admin_host: str | None
) -> None:
    """Healthy (exit 0, one line) whether serve has an admin listener (on loopback or
    every address) or none; the health command's environment holds no secret."""
    port, admin = processes.free_port(), processes.free_port()
    probe_env = processes.clean_env()
    extra = {}
    if admin_host is not None:
        extra = {"RECEIVER_ADMIN_PORT": str(admin), "RECEIVER_ADMIN_HOST": admin_host}
        probe_env.update(extra)
    env, _ = processes.receiver_env(database_url, **extra)
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port if admin_host is None else admin, process)
        result = processes.run(["health", "--port", str(port)], probe_env)
        # The public port with an admin listener: 404, which was the image's old check.
        public_only = processes.run(["health", "--port", str(port)], processes.clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"receiver: healthy: http://127.0.0.1:{port if admin_host is None else admin}/healthz"
    ]
    if admin_host is not None:
        assert public_only.returncode == 1
        assert "answered 404 (is RECEIVER_ADMIN_PORT set for serve?)" in public_only.stderr


def test_health_with_nothing_listening_is_one_line_and_exit_1() -> None:
    """Nothing on the port: exit 1 (never 2, which Docker reserves), one line naming
    the URL, no traceback; --wait retries before it gives up."""
    port = processes.free_port()
    for args in (["--port", str(port)], ["--port", str(port), "--wait", "1"]):
        result = processes.run(["health", *args], processes.clean_env())
        assert result.returncode == 1
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"receiver: unhealthy: http://127.0.0.1:{port}/healthz: ")
        assert "connection refused" in line


def test_health_with_a_malformed_admin_port_is_unhealthy_not_a_usage_error() -> None:
    """A bad RECEIVER_ADMIN_PORT: exit 1 and one line naming the variable; a malformed
    secret beside it is not read (health needs none)."""
    env = processes.clean_env(RECEIVER_ADMIN_PORT="x", RECEIVER_TOKEN_KEYS="not-a-key")
    result = processes.run(["health"], env)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("receiver: unhealthy: configuration error: RECEIVER_ADMIN_PORT")
    assert "RECEIVER_TOKEN_KEYS" not in line

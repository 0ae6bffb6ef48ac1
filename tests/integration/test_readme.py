"""Every shell command in README.md's code blocks, run as a newcomer would: in a fresh
copy of the repository, against a receiver started the way `make run` starts it.

A block preceded by `<!-- readme-test: skip (why) -->`, and a command whose comment
says `(needs a deployment)`, are not run: the two commands themselves (CI runs them),
Docker, a partner's deployment. Every other command must run to an answer: no
traceback, no usage or configuration error (exit 2). Exit 1 is an answer some
commands give by design (nothing left in quarantine, say).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from receiver import config

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\n)?```sh\n(.*?)```", re.S)


def readme_commands() -> list[str]:
    """The runnable commands of README.md's sh blocks, continuation lines joined."""
    commands = []
    for skip, body in _BLOCK.findall((ROOT / "README.md").read_text()):
        if skip:
            continue
        for command in body.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#") and "(needs a deployment)" not in command:
                commands.append(command)
    return commands


def test_the_readme_has_runnable_commands() -> None:
    """The parser finds what it should (a test of the test's own reading)."""
    commands = readme_commands()
    assert any(c.startswith("receiver prune --dry-run") for c in commands)
    assert not any(c.startswith(("make ", "docker ", "pbpaste")) for c in commands)
    assert not any("staging.example.com" in c for c in commands)


@pytest.fixture
def fresh_copy(tmp_path: Path) -> Path:
    """The tracked files of the repository in a new folder, with the project's
    virtualenv linked in (as `make run` would have created it)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8080)) == 0:
            pytest.skip("port 8080, which the README's commands use, is taken")
    copy = tmp_path / "receiver"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        target = copy / name.decode()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name.decode(), target)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    return copy


@pytest.mark.slow
def test_every_readme_command_runs(fresh_copy: Path) -> None:
    """Start the receiver as `make run` does (`receiver serve --dev`), send the shipped
    examples, then run every README command with the dev settings exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env["PATH"] = f"{fresh_copy / '.venv' / 'bin'}:{env['PATH']}"
    log = (fresh_copy / "serve.log").open("w")
    server = subprocess.Popen(
        ["receiver", "serve", "--dev"], cwd=fresh_copy, env=env, stdout=log, stderr=log
    )
    try:
        secrets_file = fresh_copy / ".receiver" / config.DEV_SECRETS_FILE
        deadline = time.monotonic() + 90
        while "listening" not in (fresh_copy / "serve.log").read_text():
            assert server.poll() is None, (fresh_copy / "serve.log").read_text()
            assert time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.2)
        dev = json.loads(secrets_file.read_text())
        env.update({f"RECEIVER_{k.upper()}": v for k, v in dev.items()})
        examples = sorted(str(p) for p in (fresh_copy / "examples").glob("*.json"))
        seeded = subprocess.run(
            ["receiver", "replay", "send", *examples],
            cwd=fresh_copy, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert seeded.returncode == 0, seeded.stdout + seeded.stderr
        failures = []
        for command in readme_commands():
            result = subprocess.run(
                ["bash", "-c", command], cwd=fresh_copy, env=env,
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if result.returncode not in (0, 1) or "Traceback" in result.stderr:
                failures.append(f"{command}\n  exit {result.returncode}: {result.stderr[-400:]}")
        assert not failures, "\n".join(failures)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

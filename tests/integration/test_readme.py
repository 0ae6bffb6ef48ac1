"""Every shell command in README.md's code blocks, run as a newcomer would: in a fresh
copy of the repository, against a receiver started the way `make run` starts it.

A block preceded by `<!-- readme-test: skip (why) -->`, and a command whose comment
says `(needs a deployment)`, are not run: the two commands themselves (CI runs them),
Docker, a partner's deployment. Every other command must succeed: exit 0 and no
traceback. A block whose commands answer otherwise by design is preceded by
`<!-- readme-test: exit N (why) -->`, and then each of its commands must exit N.

The receiver listens on a free port, not the README's 8080 (which another process on
the machine may hold): the commands are pointed at it (`--to` made explicit).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from receiver import config
from tests.integration import processes

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"(?:<!-- readme-test: (skip|exit \d+)[^>]*-->\n)?```sh\n(.*?)```", re.S)
_README_URL = "http://127.0.0.1:8080"
_SENDS = re.compile(r"\breplay (trigger|send|resend)\b")


def readme_commands() -> list[tuple[str, int]]:
    """The runnable commands of README.md's sh blocks, continuation lines joined, each
    with the exit status it must give."""
    commands = []
    for marker, body in _BLOCK.findall((ROOT / "README.md").read_text()):
        if marker == "skip":
            continue
        expected = int(marker.removeprefix("exit ")) if marker else 0
        for command in body.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#") and "(needs a deployment)" not in command:
                commands.append((command, expected))
    return commands


def pointed_at(command: str, url: str) -> str:
    """`command` sent to the receiver at `url` rather than the README's 8080: the URL
    replaced where it is written, and `--to` added to a replay command that relies on
    its default."""
    command = command.replace(_README_URL, url)
    if _SENDS.search(command) and "--to " not in command:
        command, hash_, comment = command.partition(" #")
        command = f"{command.rstrip()} --to {url}/webhooks/debitura" + (
            f" #{comment}" if hash_ else ""
        )
    return command


def test_the_readme_has_runnable_commands() -> None:
    """The parser finds what it should (a test of the test's own reading)."""
    commands = [command for command, _ in readme_commands()]
    assert any(c.startswith("receiver prune --dry-run") for c in commands)
    assert not any(c.startswith(("make ", "docker ", "pbpaste")) for c in commands)
    assert not any("staging.example.com" in c for c in commands)
    url = "http://127.0.0.1:1234"
    pointed = [pointed_at(c, url) for c in commands]
    assert not any("8080" in c for c in pointed)
    sends = [c for c in pointed if _SENDS.search(c)]
    assert sends
    assert all(f"--to {url}/webhooks/debitura" in c for c in sends)


@pytest.fixture
def fresh_copy(tmp_path: Path) -> Path:
    """The tracked files of the repository in a new folder, with the project's
    virtualenv linked in (as `make run` would have created it)."""
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
    """Start the receiver as `make run` does (`receiver serve --dev`, on a free port),
    send the shipped examples, then run every README command with the dev settings
    exported: each gives exit 0 (or the status its block declares)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env["PATH"] = f"{fresh_copy / '.venv' / 'bin'}:{env['PATH']}"
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}"
    log = (fresh_copy / "serve.log").open("w")
    server = subprocess.Popen(
        ["receiver", "serve", "--dev", "--port", str(port)],
        cwd=fresh_copy,
        # No prune in the background: `receiver prune` must not meet it holding the lock.
        env=env | {"RECEIVER_PRUNE_INTERVAL_SECONDS": "0"},
        stdout=log,
        stderr=log,
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
        # Operator commands run without --dev: the URL `serve --dev` prints for them.
        printed = re.search(
            r"export RECEIVER_DATABASE_URL=(\S+)", (fresh_copy / "serve.log").read_text()
        )
        assert printed is not None, "serve --dev did not print the database URL"
        env["RECEIVER_DATABASE_URL"] = shlex.split(printed.group(1))[0]
        examples = sorted(str(p) for p in (fresh_copy / "examples").glob("*.json"))
        seeded = subprocess.run(
            ["receiver", "replay", "send", *examples, "--to", f"{url}/webhooks/debitura"],
            cwd=fresh_copy, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert seeded.returncode == 0, seeded.stdout + seeded.stderr
        failures = []
        for written, expected in readme_commands():
            command = pointed_at(written, url)
            result = subprocess.run(
                ["bash", "-c", command], cwd=fresh_copy, env=env,
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if result.returncode != expected or "Traceback" in result.stderr:
                failures.append(
                    f"{command}\n  exit {result.returncode} (expected {expected}): "
                    f"{result.stderr[-400:]}"
                )
        assert not failures, "\n".join(failures)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

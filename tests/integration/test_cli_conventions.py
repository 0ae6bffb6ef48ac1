"""The command line's conventions (DESIGN §6, issue 34): one meaning per flag, `--json`
on every change, results on stdout and the rest on stderr, no silent no-op, shell
completion. Real processes against a real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import asyncpg

from receiver.config import Settings
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, operator_env


async def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(processes.run, args, env)


async def _quarantined(post: Post) -> str:
    broken = helpers.revocation("cli_conv", None)
    broken["data"]["revoked_at"] = "not a date"
    answer = await (await post(broken)).json()
    assert answer["status"] == "quarantined"
    key: str = broken["id"]
    return key


async def test_reason_is_the_audit_reason_and_the_old_filter_spellings_are_refused(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """`events list --reason X` and `events reprocess --why` are refused with the new
    spelling (nothing runs); `events reprocess --quarantined --reason invalid_data`, the
    filter's old spelling, would now reprocess everything: refused with a hint; the
    filter is `--quarantine-reason`, and `--reason` is audited."""
    key = await _quarantined(post)
    env = operator_env(settings)
    listed = await cli(["events", "list", "--reason", "invalid_data"], env)
    assert listed.returncode == 2
    assert "--reason is now --quarantine-reason" in listed.stderr
    why = await cli(["events", "reprocess", key, "--why", "x"], env)
    assert why.returncode == 2
    assert "--why is now --reason" in why.stderr
    old_filter = await cli(
        ["events", "reprocess", "--quarantined", "--reason", "invalid_data"], env
    )
    assert old_filter.returncode == 2
    assert "--quarantine-reason invalid_data" in old_filter.stderr
    assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 0

    filtered = await cli(["events", "list", "--quarantine-reason", "invalid_data", "--json"], env)
    assert [json.loads(line)["key"] for line in filtered.stdout.splitlines()] == [key]
    done = await cli(
        [
            "events", "reprocess", "--quarantined", "--quarantine-reason", "invalid_data",
            "--reason", "ticket 7", "--json",
        ],
        env,
    )  # fmt: skip
    # Still invalid: found, applied again, kept quarantined (exit 1 says so).
    assert done.returncode == 1, done.stderr
    assert (json.loads(done.stdout)["key"], json.loads(done.stdout)["outcome"]) == (
        key,
        "quarantined",
    )
    reasons = await conn.fetch("SELECT action, reason FROM receiver.audit")
    assert [tuple(r) for r in reasons] == [("events_reprocess", "ticket 7")]


async def test_the_old_filter_spelling_is_refused_however_it_is_written(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """`events reprocess --quarantined --reason` with a quarantine reason written in
    capitals, with a dash or padded (as an old script or a hurried operator writes
    it): refused like the exact spelling, nothing reprocessed or audited (before,
    every quarantined delivery was reprocessed)."""
    await _quarantined(post)
    env = operator_env(settings)
    for written in ("INVALID_DATA", "invalid-data", " invalid_data "):
        refused = await cli(["events", "reprocess", "--quarantined", f"--reason={written}"], env)
        assert refused.returncode == 2, (written, refused.stdout)
        assert "--quarantine-reason invalid_data" in refused.stderr
    assert await conn.fetchval("SELECT count(*) FROM receiver.audit") == 0


async def test_every_change_takes_json(post: Post, settings: Settings) -> None:
    """`migrate`, `migrate --status`, `signals retry`, `tokens import` and `events
    dismiss` print their outcome as JSON with `--json` (stdout holds only that)."""
    env = operator_env(settings)
    migrated = await cli(["migrate", "--json"], env)
    assert json.loads(migrated.stdout) == {"applied": []}
    status = await cli(["migrate", "--status", "--json"], env)
    *each, summary = [json.loads(line) for line in status.stdout.splitlines()]
    assert summary["pending"] == []
    assert all(row["applied_at"] for row in each)
    retried = await cli(["signals", "retry", "--json"], env)
    assert json.loads(retried.stdout) == {"retried": [], "not_dead": []}
    token = helpers.canary_token()
    imported = await asyncio.to_thread(
        processes.run, ["tokens", "import", "cli_json", "--json"], env, 60, token + "\n"
    )
    assert imported.returncode == 0, imported.stderr
    row = json.loads(imported.stdout)
    assert (row["client_id"], row["token_prefix"], row["status"]) == (
        "cli_json",
        token[:15],
        "active",
    )
    key = await _quarantined(post)
    dismissed = await cli(["events", "dismiss", key, "--reason", "r", "--json"], env)
    assert json.loads(dismissed.stdout)["outcome"] == "dismissed"


async def test_listings_keep_stdout_for_rows_and_say_when_they_stop(
    post: Post, settings: Settings
) -> None:
    """`signals list`'s status summary goes to stderr (stdout: the table only); `tokens
    list`, `audit list` and `signals list` say on stderr when they stop at --limit;
    `audit list --json` gives `detail` as an object; `tokens list --json` names the
    prefix once, `token_prefix`."""
    for _ in range(2):
        await post(helpers.onboarding())
    env = operator_env(settings)
    signals = await cli(["signals", "list"], env)
    assert signals.stdout.splitlines()[0].split()[0] == "id"  # the table's header first
    listings = (
        ["tokens", "list", "--limit", "1"],
        ["signals", "list", "--limit", "1"],
        ["events", "list", "--limit", "1"],
    )
    for args in listings:
        stopped = await cli(args, env)
        assert "stopped at --limit 1: there may be more" in stopped.stderr, args
    tokens = await cli(["tokens", "list", "--json"], env)
    row = json.loads(tokens.stdout.splitlines()[0])
    assert "token_prefix" in row
    assert "prefix" not in row
    # One timestamp format, the log lines' own: UTC with Z.
    assert row["stored_at"].endswith("Z")
    await cli(["clients", "erase", row["client_id"], "--confirm", "--reason", "r"], env)
    trail = await cli(["audit", "list", "--json", "--limit", "1"], env)
    assert isinstance(json.loads(trail.stdout)["detail"], dict)
    assert "stopped at --limit 1" in trail.stderr


async def test_rotation_commands_with_nothing_to_do_say_so(settings: Settings) -> None:
    """`tokens rotate --due --dry-run` with nothing due and `--resume` with nothing open
    say so on stderr (exit 0), not silence."""
    env = operator_env(
        settings,
        RECEIVER_DEBITURA_API_URL="http://127.0.0.1:9",
        RECEIVER_DEBITURA_API_KEY="sk_test_conventions_0123456789",
    )
    due = await cli(["tokens", "rotate", "--due", "--dry-run"], env)
    assert due.returncode == 0, due.stderr
    assert "no token is due (nothing would be rotated)" in due.stderr
    assert due.stdout == ""
    resume = await cli(["tokens", "rotate", "--resume"], env)
    assert resume.returncode == 0, resume.stderr
    assert "no rotation is open" in resume.stderr


def test_a_terminal_gets_results_not_info_lines(settings: Settings, tmp_path: Path) -> None:
    """On a terminal a one-shot command prints its result and no info log line; `-v`
    (before or after the command) brings them back; off a terminal the JSON log
    lines stay (for the machines that read them)."""
    env = operator_env(settings)

    def on_terminal(args: list[str]) -> str:
        controller, terminal = pty.openpty()
        with subprocess.Popen(
            [sys.executable, "-m", "receiver", *args],
            env=env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
        ) as process:
            os.close(terminal)  # the child holds it: end of file when it exits
            chunks = []
            while True:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the child and its terminal are gone
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            process.wait(timeout=60)
        os.close(controller)
        return b"".join(chunks).decode()

    quiet = on_terminal(["prune"])
    assert "dropped: 0 event bod(ies)" in quiet  # its result
    assert "prune_done" not in quiet  # an info log line
    for verbose in (["-v", "prune"], ["prune", "-v"]):
        assert "prune_done" in on_terminal(verbose)
    piped = processes.run(["prune"], env)
    assert "prune_done" in piped.stderr


def test_completion_scripts_complete_commands_and_flags(tmp_path: Path) -> None:
    """`receiver completion bash` completes a command and a flag in a real bash;
    `completion zsh` is a zsh completion function."""
    script = tmp_path / "receiver.bash"
    made = processes.run(["completion", "bash"], processes.clean_env())
    assert made.returncode == 0, made.stderr
    script.write_text(made.stdout)
    probe = (
        f"source {script}\n"
        'complete_line() { COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$1";'
        ' COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _shtab_receiver; echo "${COMPREPLY[@]}"; }\n'
        "complete_line 'receiver tok'\n"
        "complete_line 'receiver keys rotate --dr'\n"
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=False)
    assert done.stdout.splitlines() == ["tokens", "--dry-run"], done.stderr
    zsh = processes.run(["completion", "zsh"], processes.clean_env())
    assert zsh.stdout.startswith("#compdef receiver")


async def test_a_configured_secret_pasted_into_a_reason_is_masked_in_the_audit_trail(
    post: Post, settings: Settings, conn: asyncpg.Connection
) -> None:
    """`--reason` and `--actor` holding the webhook secret (a paste gone wrong) are
    stored masked: the audit trail outlives the secret's rotation, a dump keeps it."""
    env = operator_env(settings)
    secret = env["RECEIVER_WEBHOOK_SECRETS"].split(",")[0]
    key = await _quarantined(post)
    result = await cli(
        ["events", "dismiss", key, "--reason", f"ticket 9 {secret}", "--actor", f"ops {secret}"],
        env,
    )
    assert result.returncode == 0, result.stderr
    row = await conn.fetchrow("SELECT actor, reason FROM receiver.audit")
    assert row is not None
    assert secret not in row["actor"]
    assert secret not in row["reason"]
    assert row["reason"].startswith("ticket 9 ")

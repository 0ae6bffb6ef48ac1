"""`receiver status`: one look at the whole installation, as a real process against a
real Postgres; exit 1 exactly when something needs attention."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from receiver.config import Settings
from tests import helpers
from tests.integration import processes
from tests.integration.conftest import Post, operator_env


async def status(settings: Settings, *args: str, **extra: str) -> tuple[int, str]:
    """Run `receiver status`; its exit status and stdout (never a token)."""
    result = await asyncio.to_thread(
        processes.run, ["status", *args], operator_env(settings, **extra)
    )
    assert helpers.find_canaries(result.stdout + result.stderr) == []
    return result.returncode, result.stdout


async def test_status_of_a_healthy_installation_exits_0(settings: Settings, post: Post) -> None:
    """Migrations applied, nothing quarantined or dead, keys configured: exit 0, and
    the report names the database (never its password) and the last delivery."""
    await post(helpers.onboarding("cli_ok"))
    code, text = await status(settings)
    assert code == 0, text
    assert "attention      none" in text
    code, out = await status(settings, "--json")
    report = json.loads(out)
    assert report["attention"] == []
    assert report["migrations"]["pending"] == []
    assert report["quarantine_open"] == 0
    assert report["last_delivery_within_7_days"]["live"] is not None


async def test_status_names_what_needs_attention_and_exits_1(
    settings: Settings, post: Post, conn: asyncpg.Connection
) -> None:
    """An open quarantine and a dead signal each make it exit 1 with a line saying so."""
    document = helpers.onboarding("cli_q")
    document["data"]["onboarding_completed_at"] = "yesterday"
    assert (await (await post(document)).json())["status"] == "quarantined"
    await post(helpers.onboarding("cli_dead"))
    await conn.execute("UPDATE receiver.signals SET status = 'dead' WHERE client_id = 'cli_dead'")
    code, out = await status(settings, "--json")
    assert code == 1
    needs = json.loads(out)["attention"]
    assert "1 quarantined delivery(ies) open" in needs
    assert "1 dead signal(s)" in needs


async def test_status_with_the_database_down_says_so_in_one_line(settings: Settings) -> None:
    """An unreachable database is reported (host and port, no password) and exit 1,
    not a traceback."""
    url = f"postgresql://nobody:SECRETVALUE@127.0.0.1:{processes.free_port()}/none"
    code, text = await status(settings, RECEIVER_DATABASE_URL=url)
    assert code == 1
    assert "UNREACHABLE" in text
    assert "SECRETVALUE" not in text
    assert "Traceback" not in text


async def test_status_of_an_unmigrated_database_says_migrate_not_unreachable(
    settings: Settings, empty_database_url: str
) -> None:
    """A reachable database nobody migrated yet (the migrate Job forgotten): status says
    it is reachable with every migration pending, exit 1 (before: "UNREACHABLE", the
    one thing it was not)."""
    code, text = await status(settings, RECEIVER_DATABASE_URL=empty_database_url)
    assert code == 1
    assert "database       reachable" in text
    assert "0 applied" in text
    code, out = await status(settings, "--json", RECEIVER_DATABASE_URL=empty_database_url)
    report = json.loads(out)
    assert report["database"]["reachable"] is True
    assert "0001_baseline" in report["migrations"]["pending"]
    assert report["attention"][0].startswith("migrations pending: 0001_baseline")

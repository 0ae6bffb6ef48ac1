"""What operators rely on: metrics, the OpenAPI description, draining, the image."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from receiver import config
from receiver.config import Settings
from receiver.db import migrations
from receiver.lifecycle import events
from receiver.service import app, middleware, openapi, state, webconsole
from tests import helpers
from tests.conftest import with_database
from tests.integration import processes
from tests.integration.conftest import Client, Post, settings_values

ROOT = Path(__file__).resolve().parents[2]


async def scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels."""
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    """How much one sample grew between two scrapes (metrics are process-wide)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metrics_count_a_mixed_run(client: Client, post: Post) -> None:
    """After onboardings, a duplicate, a revocation, an unknown type and bad signatures,
    /metrics shows each count, with no client input or token in any label."""
    before = await scrape(client)
    token = helpers.canary_token()
    onboarding = helpers.onboarding("cli_metrics", token)
    await post(onboarding)
    await post(onboarding)
    await post(helpers.revocation("cli_metrics", token[:15]))
    await post({"id": "evt_odd", "event": "evil.case_created", "data": {}})
    await post({"id": "evt_leak", "event": f"evil.{token}", "data": {}})
    await post(helpers.onboarding(), secret=helpers.new_secret())
    await post(helpers.onboarding(), **{"X-Debitura-Signature": ""})
    after = await scrape(client)

    events = "receiver_events_total"
    assert (
        delta(before, after, events, type="client.onboarding_completed", outcome="processed") == 1
    )
    assert (
        delta(before, after, events, type="client.onboarding_completed", outcome="duplicate") == 1
    )
    assert delta(before, after, events, type="token.revoked", outcome="processed") == 1
    assert delta(before, after, events, type="other", outcome="ignored") == 1
    assert delta(before, after, events, type="other", outcome="quarantined") == 1
    quarantined = "receiver_events_quarantined_total"
    assert delta(before, after, quarantined, reason="token_outside_bearer_token") == 1
    assert after[("receiver_events_quarantined_open", ())] == 1
    failures = "receiver_signature_failures_total"
    assert delta(before, after, failures, reason="mismatch") == 1
    assert delta(before, after, failures, reason="missing") == 1
    requests = "receiver_http_requests_total"
    assert delta(before, after, requests, route="/webhooks/debitura", status="200") == 5
    assert delta(before, after, requests, route="/webhooks/debitura", status="401") == 2
    assert (
        delta(
            before,
            after,
            "receiver_http_request_duration_seconds_count",
            route="/webhooks/debitura",
        )
        == 7
    )
    assert after[("receiver_signals", (("status", "pending"),))] == 0
    text = await (await client.get("/metrics")).text()
    assert token not in text
    assert "evil" not in text
    assert "cli_metrics" not in text


async def test_metrics_answer_while_postgres_does_not(
    aiohttp_client: Any, settings: Settings, server_dsn: str
) -> None:
    """With Postgres unreachable, /metrics still answers 200 with the process's own
    counters, marking the database gauges as not read (`..._up 0`, age -1)."""
    gone = settings.model_copy(
        update={"database_url": SecretStr(with_database(server_dsn, "receiver_nowhere"))}
    )
    client = await aiohttp_client(app.create_app(gone))
    await client.post(app.WEBHOOK_PATH, data=b"{}", headers={"Content-Type": "application/json"})
    response = await client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert 'receiver_signature_failures_total{reason="missing"} ' in text
    assert "receiver_database_gauges_up 0.0" in text
    assert "receiver_database_gauges_age_seconds -1.0" in text


async def test_concurrent_scrapes_read_postgres_once_per_interval(
    aiohttp_client: Any, settings: Settings, conn: asyncpg.Connection
) -> None:
    """Within the refresh interval the gauges are read from Postgres once: twenty
    concurrent scrapes share that read, and a change made after it does not show until
    the interval has passed (an app whose interval is 0 shows it at once)."""
    cached = settings.model_copy(update={"metrics_refresh_seconds": 3600.0})
    client = await aiohttp_client(app.create_app(cached))
    texts = await asyncio.gather(*(client.get("/metrics") for _ in range(20)))
    bodies = [await r.text() for r in texts]
    assert all("receiver_database_gauges_up 1.0" in b for b in bodies)
    assert all("receiver_events_quarantined_open 0.0" in b for b in bodies)
    await conn.execute(
        "INSERT INTO receiver.events (key, type, status, is_test, body_sealed, "
        "quarantine_reason) VALUES ('k', 'x', 'quarantined', false, '\\x01026b31', 'invalid_json')"
    )
    # Asked of the gauges themselves: /metrics also reuses a whole rendering for a
    # second (scrape.RENDER_REUSE_SECONDS), which would hide a read made too often.
    gauges = client.app[state.GAUGES]
    families = await gauges.families(client.app[state.DATABASE])
    open_quarantine = next(f for f in families if f.name == "receiver_events_quarantined_open")
    assert [sample.value for sample in open_quarantine.samples] == [0]
    due = await aiohttp_client(app.create_app(settings))  # interval 0: every scrape reads
    assert "receiver_events_quarantined_open 1.0" in await (await due.get("/metrics")).text()


async def test_openapi_describes_every_route(client: Client) -> None:
    """/openapi.json names every route of the HTTP API, and no other; refs resolve. The
    console's HTML pages (/console/…, for browsers) are no part of the API it
    describes."""
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    served = {
        (route.resource.canonical, route.method.lower())
        for route in client.app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.name != middleware.UNMATCHED  # the catch-all: 404 or 405
        and not route.resource.canonical.startswith(webconsole.PREFIX)
    }
    assert not any(path.startswith(webconsole.PREFIX) for path in document["paths"])
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert served == described
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', str(document).replace("'", '"'))
    assert refs
    assert set(refs) <= set(document["components"]["schemas"])
    envelope = document["components"]["schemas"]["Envelope"]
    assert set(envelope["properties"]) == {"id", "specVersion", "event", "timestamp", "data"}


async def test_answers_match_the_described_schemas(client: Client, post: Post) -> None:
    """Real answers (200 processed and quarantined, 401, 404, 415) validate against the
    described models."""
    openapi.WebhookAnswer.model_validate(await (await post(helpers.onboarding())).json())
    quarantined = openapi.WebhookAnswer.model_validate(await (await post(b"{not json")).json())
    assert quarantined.reason == "invalid_json"
    for response in (
        await post(helpers.onboarding(), secret=helpers.new_secret()),
        await post(helpers.onboarding(), **{"Content-Type": "text/plain"}),
        await client.get("/nowhere"),
    ):
        openapi.ErrorBody.model_validate(await response.json())
    openapi.Status.model_validate(await (await client.get("/readyz")).json())


async def test_readyz_fails_as_soon_as_shutdown_begins(client: Client) -> None:
    """When shutdown starts, the readiness probe answers 503 at once."""
    assert (await client.get("/readyz")).status == 200
    await client.app.shutdown()
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "service_unavailable"


@pytest.mark.slow
async def test_sigterm_under_load_loses_nothing_acknowledged(database_url: str) -> None:
    """SIGTERM in the middle of a burst: the process exits cleanly within the shutdown
    bound, and every event that got a 200 is stored exactly once."""
    env, secret = processes.receiver_env(database_url)
    port = processes.free_port()
    url = f"http://127.0.0.1:{port}/webhooks/debitura"
    documents = [helpers.onboarding() for _ in range(600)]
    acknowledged: set[str] = set()
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)
        queue = list(documents)
        async with aiohttp.ClientSession() as session:

            async def sender() -> None:
                while queue:
                    document = queue.pop()
                    body = helpers.encode(document)
                    try:
                        async with session.post(
                            url, data=body, headers=helpers.signed_headers(secret, body)
                        ) as r:
                            await r.read()
                            if r.status == 200:
                                acknowledged.add(document["id"])
                            else:
                                assert r.status == 503, r.status
                    except aiohttp.ClientError:
                        pass  # refused once the listener closed: Debitura would retry
                    if len(acknowledged) >= 100 and process.poll() is None and not stopping:
                        stopping.append(True)
                        process.send_signal(signal.SIGTERM)

            stopping: list[bool] = []
            await asyncio.gather(*(sender() for _ in range(16)))
        returncode = await asyncio.to_thread(process.wait, 20)
    assert returncode == 0
    conn = await asyncpg.connect(database_url)
    try:
        keys = [r["key"] for r in await conn.fetch("SELECT key FROM receiver.events")]
    finally:
        await conn.close()
    assert len(keys) == len(set(keys))
    assert acknowledged <= set(keys)
    assert len(acknowledged) >= 100


async def test_workers_report_one_set_of_metrics(database_url: str) -> None:
    """`serve --workers 2`: deliveries spread over both processes, yet every scrape,
    whichever worker answers it, reports the total; SIGTERM stops both, exit 0."""
    env, secret = processes.receiver_env(database_url)
    port = processes.free_port()
    base = f"http://127.0.0.1:{port}"
    with processes.serving(["--port", str(port), "--workers", "2"], env) as (process, output):
        await processes.wait_healthy(port, process)
        workers = await listening_pids(output, 2)
        # A connection per request: the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for document in (helpers.onboarding() for _ in range(40)):
                body = helpers.encode(document)
                async with session.post(
                    f"{base}/webhooks/debitura",
                    data=body,
                    headers=helpers.signed_headers(secret, body),
                ) as response:
                    assert response.status == 200
            processed = set()
            for _ in range(10):
                async with session.get(f"{base}/metrics") as response:
                    text = await response.text()
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "receiver_events_total" and sample.labels == {
                            "type": "client.onboarding_completed",
                            "outcome": "processed",
                        }:
                            processed.add(sample.value)
        assert processed == {40.0}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines() if line[:1] == "{"]
    served_by = {
        line["pid"]
        for line in lines
        if line.get("event") == "request" and line.get("path") == "/webhooks/debitura"
    }
    assert served_by == set(workers)  # both workers really served deliveries


async def test_a_dead_worker_is_replaced_and_the_others_keep_serving(
    database_url: str,
) -> None:
    """`serve --workers 2`: a worker killed is replaced (after a backoff) while the
    other keeps serving; the service stays up and SIGTERM still stops it cleanly."""
    env, _ = processes.receiver_env(database_url)
    port = processes.free_port()
    with processes.serving(["--port", str(port), "--workers", "2"], env) as (process, output):
        await processes.wait_healthy(port, process)
        workers = await listening_pids(output, 2)
        os.kill(workers[0], signal.SIGKILL)
        replaced = await listening_pids(output, 3)
        assert replaced[2] not in workers
        os.kill(workers[1], 0)  # the other one was never stopped
        assert process.poll() is None
        await processes.wait_healthy(port, process)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    text = output.read_text()
    assert '"event": "worker_exited"' in text
    assert '"event": "worker_restarted"' in text


async def test_workers_that_keep_dying_stop_the_service(database_url: str) -> None:
    """Workers that die again and again (killed as each starts listening): after five
    deaths within a minute the service gives up, exit 1, so the orchestrator sees it."""
    env, _ = processes.receiver_env(database_url)
    port = processes.free_port()
    with processes.serving(["--port", str(port), "--workers", "2"], env) as (process, output):
        killed = 0
        while process.poll() is None and killed < 5:
            for pid in (await listening_pids(output, killed + 1))[killed:]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed += 1
        assert await asyncio.to_thread(process.wait, 60) == 1
    assert '"event": "worker_crash_loop"' in output.read_text()


async def listening_pids(output: Path, count: int) -> list[int]:
    """The pids of the first `count` processes that logged `listening` (bounded wait)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        text = await asyncio.to_thread(output.read_text)
        lines = [json.loads(line) for line in text.splitlines() if line[:1] == "{"]
        pids = [line["pid"] for line in lines if line.get("event") == "listening"]
        if len(pids) >= count:
            return pids[:count]
        assert asyncio.get_running_loop().time() < deadline, f"{count} workers never listened"
        await asyncio.sleep(0.1)


def test_dockerfile_copies_what_exists_and_runs_as_designed() -> None:
    """Every COPY source exists; the image runs `receiver serve` as a non-root user with a
    health check; dev-only things stay out of the build context."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["receiver"]' in dockerfile
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile
    assert "/healthz" in dockerfile
    assert re.search(r"^USER receiver$", dockerfile, re.MULTILINE)
    assert "embedded" not in dockerfile.split("FROM python:3.11-slim\n")[-1]
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".receiver", "tests", ".git"):
        assert path in ignored


def _locked() -> dict[str, tuple[str, int]]:
    """requirements.lock as {name: (version, number of hashes)}."""
    entries: dict[str, tuple[str, int]] = {}
    name = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            name = canonicalize_name(match.group(1))
            entries[name] = (match.group(2), 0)
        elif "--hash=sha256:" in line and name:
            version, hashes = entries[name]
            entries[name] = (version, hashes + 1)
    return entries


def _needed(name: str, extras: frozenset[str], seen: set[str]) -> None:
    """The installed distribution `name` and everything it needs here, transitively."""
    seen.add(canonicalize_name(name))
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in extras | {""}
        ):
            continue
        if canonicalize_name(requirement.name) not in seen:
            _needed(requirement.name, frozenset(requirement.extras), seen)


def test_the_image_installs_a_current_lock_with_hashes() -> None:
    """requirements.lock pins exactly what the receiver (with its `fast` extra) needs,
    each with hashes, in versions its pyproject allows; the image installs from it
    with --require-hashes, in a layer before the source. Out of date: `make lock`."""
    locked = _locked()
    needed: set[str] = set()
    _needed("receiver", frozenset({"fast"}), needed)
    needed.discard("receiver")
    assert set(locked) == needed, "requirements.lock is out of date: run `make lock`"
    assert all(hashes > 0 for _, hashes in locked.values())
    for text in metadata.requires("receiver") or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "fast"}):
            version, _ = locked[canonicalize_name(requirement.name)]
            assert requirement.specifier.contains(version), (requirement, version)
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = dockerfile.index("--require-hashes --no-deps -r requirements.lock")
    assert install < dockerfile.index("pip install --no-cache-dir --no-deps /dist/*.whl")
    assert "COPY --from=build" not in dockerfile  # the wheel is mounted, not left behind


@pytest.mark.slow
async def test_the_built_wheel_carries_migrations_and_its_entry_point_starts(
    tmp_path: Path, empty_database_url: str
) -> None:
    """The wheel the image installs carries the top-level sql/ as package data (and the
    queries), and its installed `receiver` command migrates an empty database from
    there and serves."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wheel = next(wheels.glob("receiver-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert migrations.sql_dir() == ROOT / "sql"  # a checkout reads the top-level sql/
    for migration in migrations.available():
        assert f"receiver/sql/{migration.name}.sql" in names
    assert "receiver/sql/schema.sql" in names
    assert "receiver/db/queries.sql" in names
    assert not any(name.startswith(("tests/", "bench/")) for name in names)

    target = tmp_path / "installed"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    env, _ = processes.receiver_env(empty_database_url, PYTHONPATH=str(target))
    # From outside the checkout: `python -c` puts the working directory first on sys.path.
    where = subprocess.run(
        [str(target / "bin" / "receiver"), "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert where.returncode == 0
    probe = subprocess.run(
        [sys.executable, "-c", "import receiver, sys; print(receiver.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.startswith(str(target))
    migrated = subprocess.run(
        [str(target / "bin" / "receiver"), "migrate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert f"applied {len(migrations.available())} migration(s)" in migrated.stdout
    port = processes.free_port()
    server = subprocess.Popen(
        [str(target / "bin" / "receiver"), "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await processes.wait_healthy(port, server)  # type: ignore[arg-type]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as ready,
        ):
            assert ready.status == 200
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.mark.parametrize(
    ("trusted", "forwarded", "remote"),
    [
        ("", "203.0.113.9", "127.0.0.1"),  # no proxy trusted: the header is ignored
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),
        ("127.0.0.1", "203.0.113.9, 198.51.100.7", "198.51.100.7"),  # nearest untrusted
        ("127.0.0.1,198.51.100.0/24", "203.0.113.9, 198.51.100.7", "203.0.113.9"),
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
    ],
)
async def test_the_logged_remote_is_the_client_behind_trusted_proxies(
    aiohttp_client: Any,
    settings: Settings,
    log_lines: Callable[[], list[dict[str, Any]]],
    trusted: str,
    forwarded: str,
    remote: str,
) -> None:
    """X-Forwarded-For is believed only from RECEIVER_TRUSTED_PROXIES, read from the
    right, so a client cannot choose the address it is logged under."""
    values = settings_values(settings) | {"trusted_proxies": trusted}
    behind = config.load_settings(**values)
    client = await aiohttp_client(app.create_app(behind))
    await client.get("/nowhere", headers={"X-Forwarded-For": forwarded})
    (line,) = [r for r in log_lines() if r.get("event") == "request"]
    assert line["remote"] == remote


async def test_a_401_line_says_which_check_failed(
    aiohttp_client: Any, settings: Settings, log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    """The request line of a refused delivery names the failed check (a fixed set).
    Each comes from a source of its own (behind a trusted proxy): 401 lines are
    logged once per source per 10 s."""
    behind = config.load_settings(**settings_values(settings), trusted_proxies="127.0.0.1")
    client = await aiohttp_client(app.create_app(behind))
    body = helpers.encode(helpers.onboarding())
    stale = helpers.debitura_signature(helpers.new_secret(), body, timestamp=1_000_000_000)
    forged = helpers.debitura_signature(helpers.new_secret(), body)
    for signature in (stale, forged):
        source = f"2001:db8::{os.urandom(2).hex()}:{os.urandom(2).hex()}"
        headers = helpers.signed_headers(helpers.new_secret(), body)
        headers |= {"X-Debitura-Signature": signature, "X-Forwarded-For": source}
        assert (await client.post(app.WEBHOOK_PATH, data=body, headers=headers)).status == 401
    failures = [r.get("signature_failure") for r in log_lines() if r.get("event") == "request"]
    assert failures == ["stale", "mismatch"]


async def test_metrics_say_which_build_serves_and_when_the_last_event_came(
    post: Post, client: Client
) -> None:
    """receiver_build_info names the version; the last-event timestamp moves with a
    delivery, per environment (the 'no webhook for 6 h' alert)."""
    before = time.time()
    await post(helpers.onboarding())
    text = await (await client.get("/metrics")).text()
    assert f'receiver_build_info{{python="{platform.python_version()}",version="' in text
    line = next(
        ln for ln in text.splitlines()
        if ln.startswith('receiver_last_event_received_timestamp_seconds{environment="live"}')
    )  # fmt: skip
    assert float(line.split()[-1]) >= before - 1


async def test_the_exposition_has_no_created_series_and_every_label_set(client: Client) -> None:
    """No `_created` series; labelled counters have a series for every label value
    they can take before any event of theirs (counters are process-wide, so other
    tests' events may have moved the values, never removed a series)."""
    text = await (await client.get("/metrics")).text()
    assert "_created" not in text
    series = {line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    for reason in events.QUARANTINE_REASONS:
        assert f'receiver_events_quarantined_total{{reason="{reason}"}}' in series
    for failure in ("missing", "malformed", "stale", "future", "mismatch"):
        assert f'receiver_signature_failures_total{{reason="{failure}"}}' in series
    for kind in ("unavailable", "refused", "schema_missing", "retried", "unstorable"):
        assert f'receiver_database_errors_total{{kind="{kind}"}}' in series
    for outcome in ("processed", "duplicate", "ignored", "quarantined"):
        assert f'receiver_events_total{{outcome="{outcome}",type="other"}}' in series
    assert 'receiver_signals_failed_total{retried="true"}' in series

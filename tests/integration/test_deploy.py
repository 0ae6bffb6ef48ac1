"""The files an ops team deploys with (deploy/): alert rules checked and unit-tested by
promtool, a dashboard whose every metric a real receiver exports, a hardened systemd
unit, and Kubernetes manifests valid against the Kubernetes schemas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import helpers
from tests.integration import processes

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "receiver-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "receiver-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "receiver-dashboard.json"
UNIT = DEPLOY / "systemd" / "receiver.service"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
_METRIC = re.compile(r"\breceiver_[a-z0-9_]+")
# What the receiver needs to stop after SIGTERM beyond the readiness delay: requests
# in flight (10 s) and the dispatcher's batch (7 s).
DRAIN_SECONDS = 17


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return found


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the alert rules."""
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """`promtool test rules`: each alert fires on its runbook's condition, not before."""
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULE_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    """Each alert rule is expected to fire somewhere in the unit tests (none untested),
    and the runbook's alarms are all there."""
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in _rules()}
    assert names == firing
    for expected in (
        "ReceiverQuarantineOpen",
        "ReceiverSignalsDead",
        "ReceiverSignalBacklogOld",
        "ReceiverNoLiveDelivery",
        "ReceiverSignatureFailures",
        "ReceiverDatabaseErrors",
        "ReceiverLinkInvalidTokens",
    ):
        assert expected in names


def _exported(scrape: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(scrape):
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    return names


async def test_dashboard_and_alerts_use_only_metrics_a_receiver_exports(
    database_url: str,
) -> None:
    """Every metric a dashboard panel or an alert expression names is in a real
    `/metrics` scrape of a running receiver (after one delivery and one gauge read)."""
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [rule["expr"] for rule in _rules()]
    used = {name for expr in expressions for name in _METRIC.findall(expr)}
    assert len(used) > 15
    env, secret = processes.receiver_env(database_url)
    port = processes.free_port()
    with processes.serving(["--port", str(port)], env) as (process, _):
        await processes.wait_healthy(port, process)
        status, _ = await processes.post_signed(port, secret, helpers.encode(helpers.onboarding()))
        assert status == 200
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as answer,
        ):
            scrape = await answer.text()
    exported = _exported(scrape)
    assert sorted(used - exported) == []


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    """Every manifest validates (strictly: no unknown field) against the Kubernetes
    schemas kubernetes-validate ships."""
    documents = _manifests()
    assert {d["kind"] for d in documents} >= {"Deployment", "Job"}
    for document in documents:
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def test_the_deployment_waits_for_the_shutdown_delay_and_probes_the_admin_port() -> None:
    """Readiness and liveness on the admin port; the grace period covers the shutdown
    delay and the drain; non-root; resources set; the migrate Job holds the database
    URL only (no token keys)."""
    by_kind = {d["kind"]: d for d in _manifests()}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    admin = {p["name"]: p["containerPort"] for p in container["ports"]}["admin"]
    assert env["RECEIVER_ADMIN_PORT"] == str(admin)
    delay = float(env["RECEIVER_SHUTDOWN_DELAY_SECONDS"])
    assert delay > 0
    assert pod["terminationGracePeriodSeconds"] >= delay + DRAIN_SECONDS
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]
    job = by_kind["Job"]["spec"]["template"]["spec"]
    (migrate,) = job["containers"]
    assert migrate["args"] == ["migrate"]
    assert [e["name"] for e in migrate["env"]] == ["RECEIVER_DATABASE_URL"]
    assert "envFrom" not in migrate


def _unit_options() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


def test_the_systemd_unit_is_hardened_and_waits_for_the_shutdown_delay() -> None:
    """DynamicUser, ProtectSystem=strict, NoNewPrivileges; the shutdown delay set and
    TimeoutStopSec covering it and the drain."""
    options = _unit_options()
    assert options["DynamicUser"] == ["yes"]
    assert options["ProtectSystem"] == ["strict"]
    assert options["NoNewPrivileges"] == ["yes"]
    environment = dict(e.split("=", 1) for e in options["Environment"])
    delay = float(environment["RECEIVER_SHUTDOWN_DELAY_SECONDS"])
    assert delay > 0
    assert float(options["TimeoutStopSec"][0]) >= delay + DRAIN_SECONDS


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say (ExecStart pointed at this
    checkout's receiver, since /opt/receiver does not exist here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    receiver = Path(shutil.which("receiver") or "")
    if not receiver.is_file():
        pytest.skip("the receiver command is not on PATH")
    unit = tmp_path / "receiver.service"
    unit.write_text(UNIT.read_text().replace("/opt/receiver/bin/receiver", str(receiver)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""

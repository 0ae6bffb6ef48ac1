"""The files an ops team deploys with (deploy/): alert rules checked and unit-tested by
promtool, a dashboard whose every metric a real receiver exports, a hardened systemd
unit, and Kubernetes manifests valid against the Kubernetes schemas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import helpers
from tests.integration import processes

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
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
        "ReceiverDown",
        "ReceiverReplicaDown",
        "ReceiverInternalErrors",
        "ReceiverServerErrors",
        "ReceiverDatabaseGaugesStale",
    ):
        assert expected in names
    silent = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert names == silent


def _runbook() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Runbook\n", 1)[1].split("\n## ", 1)[0]


def test_every_alert_says_what_it_is_what_to_do_and_links_the_runbook() -> None:
    """Each rule's annotations are summary, description and runbook_url (the README's
    Runbook section), and that section has a row naming the alert."""
    runbook = _runbook()
    for rule in _rules():
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert annotations["runbook_url"].endswith("README.md#runbook")
        assert f"`{rule['alert']}`" in runbook, rule["alert"]


def test_a_down_service_fires_an_alert_and_up_is_the_only_foreign_metric() -> None:
    """When every receiver_* series is gone some rule still fires: one watches for
    their absence. Besides receiver_* series the rules read only Prometheus's `up`."""
    expressions = [rule["expr"] for rule in _rules()]
    assert any("absent(receiver_" in expr for expr in expressions)
    names = set()
    for expr in expressions:
        text = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', "", expr)  # matchers, ranges
        text = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
        names |= set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text))
    foreign = {n for n in names if not n.startswith("receiver_")}
    assert foreign - {"and", "or", "unless", "bool", "group_left"} == {"up"}


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
    expressions = [t["expr"] for t in _targets(dashboard)]
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


def _targets(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every query of every panel, rows' nested panels included."""
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    return [t for panel in panels for t in panel.get("targets", [])]


def test_the_dashboard_has_rows_units_legends_and_job_instance_variables() -> None:
    """Rows; every panel with a unit and every query with a legend; `job` and
    `instance` variables that every query uses; no `or` joining two series (it drops
    the second wherever their labels agree)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"job", "instance"} <= variables
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) >= 3
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        for target in panel["targets"]:
            assert target["legendFormat"], panel["title"]
            assert '$job"' in target["expr"], panel["title"]
            assert '$instance"' in target["expr"], panel["title"]
            assert " or " not in target["expr"], panel["title"]


# Series each panel draws from the sample series below (every target together).
_PANEL_SERIES = {
    "Deliveries answered 200 by outcome": 2,
    "HTTP answers by route and status": 2,
    "Webhook answer time p99": 1,
    "Signature failures by reason": 2,
    "Since the last live delivery": 1,
    "Refused at the caps": 2,
    "Quarantine open": 1,
    "Quarantined by reason (per hour)": 1,
    "Database errors by kind": 2,
    "Internal errors": 1,
    "Commit group size (mean)": 1,
    "Database gauges fresh (1 = read on the last refresh)": 1,
    "Database gauges age": 1,
    "Releases serving": 1,
    "Signals by status": 2,
    "Oldest pending signal": 1,
    # delivered, failed (retried true and false), dead
    "Signals delivered / failed / dead": 4,
    "Signal delivery p99": 1,
    "Active tokens by environment and age": 2,
    # live clients with an invalid link, and live clients without an active token
    "Clients needing attention": 2,
    "Values to rotate / unopenable": 2,
}
_SAMPLE_SERIES = [
    ('receiver_events_total{type="token.revoked", outcome="processed"}', "0+2x10"),
    ('receiver_events_total{type="token.revoked", outcome="duplicate"}', "0+1x10"),
    ('receiver_http_requests_total{route="/webhooks/debitura", status="200"}', "0+5x10"),
    ('receiver_http_requests_total{route="/webhooks/debitura", status="503"}', "0+1x10"),
    (
        'receiver_http_request_duration_seconds_bucket{route="/webhooks/debitura", le="0.1"}',
        "0+5x10",
    ),
    (
        'receiver_http_request_duration_seconds_bucket{route="/webhooks/debitura", le="+Inf"}',
        "0+6x10",
    ),
    ('receiver_signature_failures_total{reason="mismatch"}', "0+1x10"),
    ('receiver_signature_failures_total{reason="stale"}', "0x10"),
    ('receiver_last_event_received_timestamp_seconds{environment="live"}', "60x10"),
    ("receiver_connections_refused_total", "0x10"),
    ("receiver_requests_refused_total", "0+1x10"),
    ("receiver_events_quarantined_open", "2x10"),
    ('receiver_events_quarantined_total{reason="invalid_data"}', "0+1x10"),
    ('receiver_database_errors_total{kind="unavailable"}', "0+1x10"),
    ('receiver_database_errors_total{kind="retried"}', "0x10"),
    ("receiver_internal_errors_total", "0x10"),
    ("receiver_commit_group_size_sum", "0+4x10"),
    ("receiver_commit_group_size_count", "0+2x10"),
    ("receiver_database_gauges_up", "1x10"),
    ("receiver_database_gauges_age_seconds", "2x10"),
    ('receiver_build_info{version="0.1.0", python="3.11.2"}', "1x10"),
    ('receiver_signals{status="pending"}', "3x10"),
    ('receiver_signals{status="dead"}', "1x10"),
    ("receiver_signals_oldest_pending_age_seconds", "30x10"),
    ("receiver_signals_delivered_total", "0+3x10"),
    ('receiver_signals_failed_total{retried="true"}', "0+1x10"),
    ('receiver_signals_failed_total{retried="false"}', "0+1x10"),
    ("receiver_signals_dead_total", "0+1x10"),
    ('receiver_signals_delivery_seconds_bucket{le="0.5"}', "0+3x10"),
    ('receiver_signals_delivery_seconds_bucket{le="+Inf"}', "0+3x10"),
    ('receiver_tokens_active{environment="live", age="under_30d"}', "4x10"),
    ('receiver_tokens_active{environment="test", age="over_90d"}', "1x10"),
    ('receiver_clients_link_invalid{environment="live"}', "1x10"),
    ('receiver_clients_without_active_token{environment="live"}', "2x10"),
    ('receiver_sealed_values_to_rotate{kind="tokens", key_id="k1"}', "5x10"),
    ('receiver_sealed_values_unopenable{kind="tokens"}', "1x10"),
]


def _with_target(series: str) -> str:
    labels = 'job="receiver", instance="10.0.0.7:9090"'
    if "{" not in series:
        return f"{series}{{{labels}}}"
    return series.replace("{", "{" + labels + ", ", 1)


def test_every_dashboard_panel_draws_each_of_its_series(tmp_path: Path) -> None:
    """Each panel's queries, the variables set to one job and instance, evaluated by
    `promtool test rules` over sample series of every metric: each panel draws the
    series it should, none hidden behind another (both kinds of clients needing
    attention, and dead signals beside delivered ones)."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [
        p
        for top in dashboard["panels"]
        for p in [top, *top.get("panels", [])]
        if p["type"] != "row"
    ]
    assert {p["title"] for p in panels} == set(_PANEL_SERIES)
    cases = []
    for panel in panels:
        counts = [
            "(count({}) or vector(0))".format(
                t["expr"].replace("$job", "receiver").replace("$instance", "10.0.0.7:9090")
            )
            for t in panel["targets"]
        ]
        cases.append(
            {
                "expr": " + ".join(counts),
                "eval_time": "10m",
                "exp_samples": [{"labels": "{}", "value": _PANEL_SERIES[panel["title"]]}],
            }
        )
    document = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": _with_target(name), "values": values}
                    for name, values in _SAMPLE_SERIES
                ]
                + [{"series": 'receiver_build_info{job="other", instance="x"}', "values": "1x10"}],
                "promql_expr_test": cases,
            }
        ],
    }
    tests = tmp_path / "dashboard.test.yml"
    tests.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(
        [_promtool(), "test", "rules", tests.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    """Every manifest validates (strictly: no unknown field) against the Kubernetes
    schemas kubernetes-validate ships."""
    documents = _manifests()
    kinds = {d["kind"] for d in documents}
    assert kinds >= {"Deployment", "Job", "NetworkPolicy", "PodMonitor", "Cluster"}
    for document in documents:
        if document["apiVersion"].split("/")[0] in _OPERATOR_GROUPS:
            # kubernetes-validate knows only the built-in kinds (a CRD raises
            # SchemaNotFoundError): the PodMonitor and the Cluster are checked by
            # tests of their own.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(document, "1.30.0", strict=True)
            continue
        kubernetes_validate.validate(document, "1.30.0", strict=True)


# Custom resources of operators (Prometheus Operator, CloudNativePG): no schema ships.
_OPERATOR_GROUPS = frozenset({"monitoring.coreos.com", "postgresql.cnpg.io"})
_CLUSTER_FIELDS = frozenset(
    {"instances", "postgresql", "bootstrap", "storage", "affinity", "resources"}
)


def test_the_postgres_cluster_replicates_synchronously_to_one_of_two_standbys() -> None:
    """The CloudNativePG example (README "High availability"): no CRD schema ships
    with kubernetes-validate, so its fields are checked here against the operator's
    documented spec: a primary and two standbys, commits waiting for any one of them
    (`dataDurability: required`: never acknowledged on the primary alone), the
    receiver's database bootstrapped, and the Secret's URL pointing at its -rw
    Service as the file says."""
    (cluster,) = [d for d in _manifests() if d["kind"] == "Cluster"]
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert set(spec) <= _CLUSTER_FIELDS
    synchronous = spec["postgresql"]["synchronous"]
    assert synchronous["method"] in ("any", "first")
    assert synchronous["number"] >= 1
    assert synchronous["dataDurability"] == "required"
    # One standby beyond those a commit waits for: losing one does not stop writes.
    assert spec["instances"] >= synchronous["number"] + 2
    assert spec["postgresql"]["parameters"]["synchronous_commit"] in ("on", "remote_apply")
    assert spec["bootstrap"]["initdb"]["database"] == "receiver"
    assert spec["storage"]["size"]
    text = (DEPLOY / "kubernetes" / "postgres-cluster.yaml").read_text()
    assert f"@{cluster['metadata']['name']}-rw:5432/receiver" in text


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
    # The console script installed beside this interpreter (the suite's virtualenv),
    # whether or not that virtualenv's bin is on PATH (make test does not put it there).
    receiver = Path(sys.executable).parent / "receiver"
    assert receiver.is_file(), receiver
    unit = tmp_path / "receiver.service"
    unit.write_text(UNIT.read_text().replace("/opt/receiver/bin/receiver", str(receiver)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


def _version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def test_the_manifests_name_this_release_and_the_migrate_job_per_release() -> None:
    """Every image's tag is the package version; the migrate Job's name carries it
    (a Job's template is immutable: a fixed name fails the next release's apply)."""
    version = _version()
    documents = _manifests()
    for document in documents:
        if document["kind"] in ("Deployment", "Job"):
            for container in document["spec"]["template"]["spec"]["containers"]:
                assert container["image"].rsplit(":", 1)[1] == version
    (job,) = [d for d in documents if d["kind"] == "Job"]
    assert job["metadata"]["name"] == "receiver-migrate-" + version.replace(".", "-")


def test_probes_reach_serve_with_the_admin_port_and_one_blip_is_tolerated() -> None:
    """The probes ask the port serve answers them on: the admin port, bound to an
    address the kubelet reaches (not loopback), or else the public one. Readiness
    survives one failed probe and still fails within the shutdown delay."""
    by_kind = {d["kind"]: d for d in _manifests()}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    serve_port = int(container["args"][container["args"].index("--port") + 1])
    if "RECEIVER_ADMIN_PORT" in env:
        expected = int(env["RECEIVER_ADMIN_PORT"])
        assert env.get("RECEIVER_ADMIN_HOST", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1")
    else:
        expected = serve_port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == expected, probe
    readiness = container["readinessProbe"]
    delay = float(env["RECEIVER_SHUTDOWN_DELAY_SECONDS"])
    assert readiness["failureThreshold"] >= 2
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < delay
    labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_the_pod_monitor_and_network_policy_match_the_pods_and_ports() -> None:
    """The PodMonitor scrapes /metrics on the admin port of the Deployment's pods (not
    the Job's); the NetworkPolicy admits the webhook port from the ingress, the admin
    port from monitoring only, and lets out DNS, Postgres and HTTPS."""
    by_kind = {d["kind"]: d for d in _manifests()}
    template = by_kind["Deployment"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {p["name"] for p in container["ports"]}
    monitor = by_kind["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    job_labels = by_kind["Job"]["spec"]["template"]["metadata"]["labels"]
    assert not monitor["selector"]["matchLabels"].items() <= job_labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("admin", "/metrics")
    assert "admin" in ports
    policy = by_kind["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    sources = {
        rule["ports"][0]["port"]: rule["from"][0]["namespaceSelector"]["matchLabels"]
        for rule in policy["ingress"]
    }
    assert set(sources) == {"http", "admin"}
    assert sources["admin"] == {"kubernetes.io/metadata.name": "monitoring"}
    out = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert out == {53, 5432, 443}


def _local_argv(argv: list[str], port: int, free: int) -> list[str]:
    """A deploy file's command, run from this checkout: its receiver (or python) here,
    its port (`port`) replaced by a free one."""
    head, *rest = argv
    if Path(head).name == "receiver":
        command = [sys.executable, "-m", "receiver"]
    else:
        assert Path(head).name == "python", head
        command = [sys.executable]
    return command + [a.replace(str(port), str(free)) for a in rest]


def _dockerfile(instruction: str) -> list[str]:
    """The exec-form argument list of a Dockerfile instruction (continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith(instruction + " ")]
    listing: list[str] = json.loads(line[line.index("[") :])
    return listing


async def _health_checks_pass(
    database_url: str, serve: list[str], check: list[str], env: dict[str, str]
) -> tuple[int, str]:
    """Start `serve` (a deploy file's argv) with `env`, wait until it answers, run
    `check` with the same environment: its exit status and output."""
    environment, _ = processes.receiver_env(database_url, **env)
    port = int(serve[serve.index("--port") + 1])
    admin = int(env.get("RECEIVER_ADMIN_PORT", port))
    with processes.background(serve, environment) as (process, _):
        await processes.wait_healthy(admin, process)
        result = subprocess.run(
            check, env=environment, capture_output=True, text=True, timeout=60, check=False
        )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("admin", [False, True])
async def test_the_images_healthcheck_passes_with_and_without_the_admin_port(
    database_url: str, admin: bool
) -> None:
    """The Dockerfile's HEALTHCHECK, run against its CMD (ports moved to free ones),
    passes whether or not RECEIVER_ADMIN_PORT is set (the public port answers /healthz
    with 404 once it is)."""
    free = processes.free_port()
    cmd = _local_argv(["receiver", *_dockerfile("CMD")], 8080, free)[3:]
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    check = _local_argv(_healthcheck(), 8080, free)
    env = {"RECEIVER_ADMIN_PORT": str(processes.free_port())} if admin else {}
    status, output = await _health_checks_pass(database_url, cmd, check, env)
    assert status == 0, output


def _healthcheck() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK ")]
    listing: list[str] = json.loads(line[line.index(" CMD ") + 5 :])
    return listing


@pytest.mark.parametrize("admin", [False, True])
async def test_the_units_start_check_passes_with_and_without_the_admin_port(
    database_url: str, admin: bool
) -> None:
    """The systemd unit's ExecStartPost (started means answering /healthz) passes
    against its ExecStart with the unit's environment, and with the admin port's line
    taken out."""
    options = _unit_options()
    free = processes.free_port()
    serve = _local_argv(options["ExecStart"][0].split(), 8080, free)[3:]
    serve[serve.index("--host") + 1] = "127.0.0.1"
    serve = [a for a in serve if a not in ("--workers", "2")]
    (post,) = options["ExecStartPost"]
    check = _local_argv(post.split(), 8080, free)
    unit_env = dict(e.split("=", 1) for e in options["Environment"])
    env = {k: v for k, v in unit_env.items() if k.startswith("RECEIVER_ADMIN_")}
    assert env.get("RECEIVER_ADMIN_HOST", "127.0.0.1") == "127.0.0.1"  # loopback only
    if admin:
        env["RECEIVER_ADMIN_PORT"] = str(processes.free_port())
    else:
        del env["RECEIVER_ADMIN_PORT"]
    status, output = await _health_checks_pass(database_url, serve, check, env)
    assert status == 0, output
    assert options["Restart"] == ["always"]

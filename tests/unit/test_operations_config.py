"""Settings and pieces of operations that need no process: the dev data directory
found from anywhere, unknown variables, per-command requirements, no false-zero
gauges, the public prefix, and the client a quarantined body names."""

from __future__ import annotations

from pathlib import Path

import pytest

from receiver import config, errors, redaction
from receiver.console import database_label
from receiver.lifecycle import events
from receiver.service import scrape
from tests import helpers


def test_dev_data_dir_is_found_from_a_subdirectory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--dev` from a subdirectory uses the project's .receiver, not a new one."""
    monkeypatch.delenv("RECEIVER_DATA_DIR", raising=False)
    config.dev_secrets(tmp_path / ".receiver")
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    monkeypatch.chdir(below)
    assert config.dev_data_dir(create=False) == (tmp_path / ".receiver").resolve()


def test_without_a_dev_data_dir_only_serve_creates_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Away from any .receiver, a command other than `serve --dev` stops with a clear
    error instead of generating new secrets; `serve --dev` creates one here."""
    monkeypatch.delenv("RECEIVER_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.ConfigError, match="no dev data directory"):
        config.load_settings(dev=True)
    assert not (tmp_path / ".receiver").exists()
    settings = config.load_settings(dev=True, first_use=True)
    assert settings.data_dir == tmp_path.resolve() / ".receiver"


def test_unknown_receiver_variables_are_named_with_the_likely_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A typo is named with the setting it resembles; known names are not."""
    monkeypatch.setenv("RECEIVER_LOG_LEVL", "debug")
    monkeypatch.setenv("RECEIVER_LOG_LEVEL", "debug")
    monkeypatch.setenv("RECEIVER_CACHE_DATABASE_URL", "postgresql://x/y")
    assert config.unknown_variables() == ["RECEIVER_LOG_LEVL (did you mean RECEIVER_LOG_LEVEL?)"]


def test_the_database_alone_is_enough_for_a_database_only_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NEEDS_DATABASE loads without keys or secrets; NEEDS_VAULT names what is missing."""
    for name in ("WEBHOOK_SECRETS", "TOKEN_KEYS", "INDEX_KEY"):
        monkeypatch.delenv(f"RECEIVER_{name}", raising=False)
    config.load_settings(needs=config.NEEDS_DATABASE, database_url="postgresql://h/db")
    with pytest.raises(errors.ConfigError) as caught:
        config.load_settings(needs=config.NEEDS_VAULT)
    assert "RECEIVER_TOKEN_KEYS is required" in str(caught.value)
    assert "RECEIVER_INDEX_KEY is required" in str(caught.value)
    assert "RECEIVER_WEBHOOK_SECRETS" not in str(caught.value)


def test_the_database_label_never_holds_the_password() -> None:
    """host:port/name, from a URL or a socket-directory query, without user or password."""
    assert database_label("postgresql://u:pw@db.internal:6432/receiver") == (
        "db.internal:6432/receiver"
    )
    assert database_label("postgresql://u:pw@/receiver?host=/run/pg") == "/run/pg:5432/receiver"


def test_a_multi_host_url_is_accepted_and_labelled_by_every_host() -> None:
    """libpq's multi-host syntax (a primary and its standbys, docs/design.md §9, Failover) passes
    the start-up check, and the start line names each host, never the password."""
    url = "postgresql://u:pw@h1:5432,h2:5433/receiver?target_session_attrs=read-write"
    settings = config.load_settings(needs=config.NEEDS_DATABASE, database_url=url)
    assert settings.database_url is not None
    assert database_label(url) == "h1:5432,h2:5433/receiver"
    assert database_label("postgresql://pg-a,pg-b/db?port=6432") == "pg-a:6432,pg-b:6432/db"
    assert database_label("postgresql:///db?host=a,b&port=1,2") == "a:1,b:2/db"
    assert database_label("postgresql://[::1]:7,[::2]/db") == "[::1]:7,[::2]:5432/db"


@pytest.mark.parametrize(
    "url", ["postgresql://h1:5432,h2:x/db", "postgresql://h:70000/db", "postgresql://h:-1/db"]
)
def test_a_host_with_a_bad_port_stops_start_up_without_the_url(url: str) -> None:
    """One host of several with a port that is no port: one line, no value in it."""
    with pytest.raises(errors.ConfigError) as caught:
        config.load_settings(needs=config.NEEDS_DATABASE, database_url=url)
    assert "not a number from 1 to 65535" in str(caught.value)
    assert "h1" not in str(caught.value)
    assert "70000" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        # An unencoded / ? # in the password moves the rest of it (and the hosts)
        # into the path, query or fragment: the start line would print it, the
        # driver raise a traceback quoting it.
        ("postgresql://u:12/hunter2@h1,h2/db", "an @ after its host"),
        ("postgresql://u:12#hunter2@h1/db", "an @ after its host"),
        ("postgresql://u:12?hunter2@h1,h2/db", "query parameter with no value"),
        ("postgresql://u:hunter2@h1/db?sslmode", "query parameter with no value"),
        # What the driver refuses at every connect, waited on as an outage.
        ("postgresql://u:hunter2@h1,h2/db?target_session_attrs=primary-ish", "not one of"),
        ("postgresql://u:hunter2@h1,h2/db?port=1,2,3", "ports than hosts"),
        # libpq connects to the query's host, asyncpg to the other.
        ("postgresql://u:hunter2@h1:5432/db?host=h2", "names its hosts twice"),
    ],
)
def test_a_database_url_the_driver_cannot_use_as_meant_stops_start_up(url: str, says: str) -> None:
    """One line naming what is wrong, never a part of the password."""
    with pytest.raises(errors.ConfigError) as caught:
        config.load_settings(needs=config.NEEDS_DATABASE, database_url=url)
    assert says in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_libpq_urls_that_work_pass_the_start_up_check() -> None:
    """Every libpq form the failover work documents still passes."""
    for url in (
        "postgresql://u:p%2F%3F%23%40%2C@h1:5432,h2/db?target_session_attrs=read-write",
        "postgresql://[::1]:5432,[::1]/db?target_session_attrs=prefer-standby",
        "postgresql:///db?host=/run/pg",
        "postgresql:///db?host=a,b&port=1,2",
        "postgresql://a,b/db?port=6432&sslmode=require",
    ):
        assert config.load_settings(needs=config.NEEDS_DATABASE, database_url=url).database_url


def test_database_gauges_are_absent_before_the_first_read() -> None:
    """Never read: only `up` and `age`, no false 0 for the quarantine."""
    names = [family.name for family in scrape.DatabaseGauges("k1")._render()]
    assert names == ["receiver_database_gauges_up", "receiver_database_gauges_age_seconds"]


def test_the_public_prefix_is_not_masked() -> None:
    """A 15-character prefix stays readable in logs; a whole token is still masked."""
    token = helpers.canary_token("test")
    redactor = redaction.Redactor()
    assert redactor.text(f"prefix {token[:15]}") == f"prefix {token[:15]}"
    assert token not in redactor.text(f"token {token}")


def test_a_quarantined_body_still_names_its_client() -> None:
    """The client id of a quarantined delivery, for its log lines."""
    document = helpers.onboarding("cli_named")
    document["data"]["onboarding_completed_at"] = "yesterday"  # invalid_data
    event = events.read(helpers.encode(document), is_test=False)
    assert event.quarantine is not None
    assert event.named_client_id == "cli_named"
    assert event.client_id is None


def test_a_role_mistake_tells_the_operator_and_not_the_sender() -> None:
    """A refused privilege or login is one full line for the operator (the role, what
    it lacks) and, for a delivery's 503, no more than an outage says: the sender
    learns neither our roles nor our tables."""
    from receiver import errors

    denied = errors.DatabasePermission("permission denied for table client_locks", "app_1")
    refused = errors.DatabaseRefused('role "ghost" does not exist')
    assert "client_locks" in str(denied)
    assert "'app_1'" in str(denied)
    assert "ghost" in str(refused)
    for problem in (denied, refused):
        assert problem.status == 503
        assert problem.body()["error"]["message"] == "database is unavailable, retry later"

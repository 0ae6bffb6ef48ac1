"""Settings: loud, one-line, value-free failures; masked secrets; dev secrets on disk."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from receiver import config, errors

GOOD: dict[str, Any] = {
    "webhook_secrets": base64.b64encode(b"s" * 32).decode(),
    "token_keys": "k1:" + base64.b64encode(b"k" * 32).decode(),
    "index_key": base64.b64encode(b"i" * 32).decode(),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECEIVER_"):
            monkeypatch.delenv(name)


def test_missing_settings_are_named() -> None:
    """Each missing required variable is named in the error."""
    with pytest.raises(errors.ConfigError) as caught:
        config.load_settings()
    message = str(caught.value)
    for name in ("RECEIVER_WEBHOOK_SECRETS", "RECEIVER_TOKEN_KEYS", "RECEIVER_INDEX_KEY"):
        assert f"{name} is required" in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "webhook_secrets",
            "not base64 SECRETVALUE!",
            "RECEIVER_WEBHOOK_SECRETS is not valid base64",
        ),
        ("token_keys", "nokid" + "A" * 40, "RECEIVER_TOKEN_KEYS each entry must be kid:base64"),
        ("token_keys", "k1:" + base64.b64encode(b"short").decode(), "exactly 32 bytes"),
        ("index_key", "SECRETVALUE", "RECEIVER_INDEX_KEY"),
        ("signature_tolerance", "SECRETVALUE", "RECEIVER_SIGNATURE_TOLERANCE"),
        ("notify_channel", "Bad-Channel;SECRETVALUE", "RECEIVER_NOTIFY_CHANNEL"),
        ("keepalive_seconds", "0", "RECEIVER_KEEPALIVE_SECONDS"),
        ("body_timeout_seconds", "SECRETVALUE", "RECEIVER_BODY_TIMEOUT_SECONDS"),
    ],
)
def test_malformed_setting_is_named_without_its_value(name: str, value: str, expected: str) -> None:
    """A malformed value stops loading with a message naming the variable, not the value."""
    with pytest.raises(errors.ConfigError) as caught:
        config.load_settings(**{**GOOD, name: value})
    assert expected in str(caught.value)
    assert "SECRETVALUE" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """RECEIVER_* variables are the source; comma-separated secrets become a list."""
    for name, value in GOOD.items():
        monkeypatch.setenv(f"RECEIVER_{name.upper()}", value)
    monkeypatch.setenv(
        "RECEIVER_WEBHOOK_SECRETS", GOOD["webhook_secrets"] + "," + GOOD["index_key"]
    )
    settings = config.load_settings()
    assert len(settings.webhook_secrets) == 2
    assert settings.signature_tolerance == 300


def test_cache_url_needs_a_secret() -> None:
    """Setting RECEIVER_CACHE_URL without RECEIVER_CACHE_SECRET is refused."""
    with pytest.raises(errors.ConfigError, match="RECEIVER_CACHE_SECRET is required"):
        config.load_settings(**GOOD, cache_url="http://127.0.0.1:9/x")


def test_repr_masks_every_secret() -> None:
    """Neither repr nor str of the settings shows key material."""
    settings = config.load_settings(**GOOD, database_url="postgresql://u:hunter2@h/db")
    for text in (repr(settings), str(settings)):
        for value in [*GOOD.values(), "hunter2", base64.b64encode(b"k" * 32).decode()]:
            assert value.split(":")[-1] not in text


def test_dev_secrets_are_private_and_reused(tmp_path: Path) -> None:
    """Dev secrets are written once with mode 0600 and read back on the next start."""
    first = config.load_settings(dev=True, data_dir=tmp_path)
    path = tmp_path / config.DEV_SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = config.load_settings(dev=True, data_dir=tmp_path)
    assert first.index_key == second.index_key
    assert first.token_keys == second.token_keys


def test_environment_wins_over_dev_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret set in the environment is used even in dev mode."""
    monkeypatch.setenv("RECEIVER_INDEX_KEY", GOOD["index_key"])
    settings = config.load_settings(dev=True, data_dir=tmp_path)
    assert settings.index_key.get_secret_value() == b"i" * 32


def test_a_secret_may_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`RECEIVER_<NAME>_FILE=/path` gives the secret (a final newline ignored), for
    every secret variable, and is not named as an unknown variable."""
    index = tmp_path / "index-key"
    index.write_text(GOOD["index_key"] + "\n")
    monkeypatch.setenv("RECEIVER_INDEX_KEY_FILE", str(index))
    settings = config.load_settings(**{k: v for k, v in GOOD.items() if k != "index_key"})
    assert settings.index_key.get_secret_value() == b"i" * 32
    assert config.unknown_variables() == []
    for name in config.FILE_SECRETS:
        assert name in config.Settings.model_fields


def test_a_secret_and_its_file_together_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Both `RECEIVER_X` and `RECEIVER_X_FILE`: refused, naming both, never a value;
    a file that cannot be read: refused, naming the variable."""
    secret = tmp_path / "s"
    secret.write_text("SECRETVALUE")
    monkeypatch.setenv("RECEIVER_WEBHOOK_SECRETS", "SECRETVALUE")
    monkeypatch.setenv("RECEIVER_WEBHOOK_SECRETS_FILE", str(secret))
    with pytest.raises(errors.ConfigError) as both:
        config.load_settings()
    assert "RECEIVER_WEBHOOK_SECRETS or RECEIVER_WEBHOOK_SECRETS_FILE" in str(both.value)
    assert "SECRETVALUE" not in str(both.value)
    monkeypatch.delenv("RECEIVER_WEBHOOK_SECRETS")
    monkeypatch.setenv("RECEIVER_WEBHOOK_SECRETS_FILE", str(tmp_path / "missing"))
    with pytest.raises(errors.ConfigError) as unreadable:
        config.load_settings()
    assert "RECEIVER_WEBHOOK_SECRETS_FILE names a file that cannot be read" in str(unreadable.value)


def test_a_secret_file_too_large_to_be_a_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A `_FILE` naming something far larger than a secret (a log, a dump; /dev/zero
    would never end) is refused after reading its first 64 KiB, naming the variable
    (before: read whole and, being valid base64, taken as a webhook secret)."""
    large = tmp_path / "large"
    large.write_text("A" * 70_000)  # valid base64
    monkeypatch.setenv("RECEIVER_WEBHOOK_SECRETS_FILE", str(large))
    with pytest.raises(errors.ConfigError) as refused:
        config.load_settings(**{k: v for k, v in GOOD.items() if k != "webhook_secrets"})
    assert "RECEIVER_WEBHOOK_SECRETS_FILE names a file over 64 KiB" in str(refused.value)
    monkeypatch.setenv("RECEIVER_WEBHOOK_SECRETS_FILE", "/dev/zero")
    with pytest.raises(errors.ConfigError, match="over 64 KiB"):
        config.load_settings(**{k: v for k, v in GOOD.items() if k != "webhook_secrets"})

"""Settings: one frozen model read once from the `RECEIVER_*` variables (docs/design.md §5).

Nothing else in the package reads the environment. Key material is decoded and
checked here, at start-up, so a malformed value stops the process before it serves.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    HttpUrl,
    IPvAnyNetwork,
    SecretBytes,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from receiver import endpoints, errors

KEY_BYTES = 32
DEV_SECRETS_FILE = "dev-secrets.json"
DEFAULT_DATA_DIR = ".receiver"
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MALFORMED_KEY_ID = "(malformed)"
_CHANNEL = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def is_key_id(value: str) -> bool:
    """Whether `value` is a key id RECEIVER_TOKEN_KEYS could configure."""
    return _KEY_ID.fullmatch(value) is not None


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _webhook_secrets(value: Any) -> Any:
    parts = _split(value)
    if not isinstance(parts, list) or not parts:
        raise ValueError("needs at least one base64 secret")
    decoded = [_b64(p) if isinstance(p, str) else p for p in parts]
    if any(len(d) < 16 for d in decoded):
        raise ValueError("each secret must decode to at least 16 bytes")
    return decoded


def _test_webhook_secrets(value: Any) -> Any:
    parts = _split(value)
    return _webhook_secrets(list(parts)) if parts else ()


def _key32(value: Any) -> Any:
    if isinstance(value, str):
        value = _b64(value)
    if isinstance(value, bytes) and len(value) != KEY_BYTES:
        raise ValueError(f"must decode to exactly {KEY_BYTES} bytes")
    return value


def _token_keys(value: Any) -> Any:
    parts = _split(value)
    if not isinstance(parts, list) or not parts:
        raise ValueError("needs at least one kid:base64 key")
    keys: list[tuple[str, bytes]] = []
    for part in parts:
        if isinstance(part, tuple):
            kid, material = part
        else:
            kid, sep, encoded = str(part).partition(":")
            if not sep or not is_key_id(kid):
                raise ValueError("each entry must be kid:base64, kid of [A-Za-z0-9_.-]{1,32}")
            material = _key32(encoded)
        keys.append((kid, material))
    kids = [kid for kid, _ in keys]
    if len(set(kids)) != len(kids):
        raise ValueError("key ids must be unique")
    return [(kid, SecretBytes(material)) for kid, material in keys]


WHSEC_PREFIX = "whsec_"


def decode_signal_secret(text: str) -> bytes:
    """A signal secret as Standard Webhooks spells it (`whsec_<base64>`) or as plain
    base64, decoded; at least 16 bytes."""
    decoded = _b64(text.strip().removeprefix(WHSEC_PREFIX))
    if len(decoded) < 16:
        raise ValueError("each secret must decode to at least 16 bytes")
    return decoded


def _signal_secrets(value: Any) -> Any:
    parts = _split(value)
    if parts is None:
        return ()
    if not isinstance(parts, list | tuple):
        parts = [parts]
    return [decode_signal_secret(p) if isinstance(p, str) else p for p in parts]


ADMIN_TOKEN_MIN_CHARS = 32
# The admin listener (RECEIVER_ADMIN_PORT, RECEIVER_ADMIN_HOST): read by Settings, and
# by ProbeSettings for `receiver health`.
AdminPort = Annotated[int | None, Field(ge=1, le=65535)]
DEFAULT_ADMIN_HOST = "127.0.0.1"


def _admin_tokens(value: Any) -> Any:
    parts = _split(value)
    if parts is None:
        return ()
    if not isinstance(parts, list | tuple):
        parts = [parts]
    texts = [p.get_secret_value() if isinstance(p, SecretStr) else str(p) for p in parts]
    if any(len(t) < ADMIN_TOKEN_MIN_CHARS for t in texts):
        raise ValueError(f"each token must be at least {ADMIN_TOKEN_MIN_CHARS} characters")
    return [SecretStr(t) for t in texts]


def _postgres_url(value: SecretStr | None) -> SecretStr | None:
    # Checked here so that a URL no Postgres driver can use is one line at start-up,
    # not a driver traceback or a wait for a database that cannot come. The message
    # says what is wrong, never the URL (it may hold a password).
    if value is None:
        return None
    url = value.get_secret_value()
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ValueError("must be a postgresql:// URL")
    problem = endpoints.database_url_problem(url)
    if problem is not None:
        raise ValueError(problem)
    return value


def _api_url(value: str | None) -> str | None:
    # The API key travels with every request (endpoints.credential_problem). The
    # message never echoes the URL.
    if value is None:
        return None
    problem = endpoints.credential_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value.rstrip("/")


def _channel(value: str) -> str:
    if not _CHANNEL.match(value):
        raise ValueError("must be a lower-case Postgres identifier")
    return value


WebhookSecrets = Annotated[tuple[SecretBytes, ...], NoDecode, BeforeValidator(_webhook_secrets)]
TestWebhookSecrets = Annotated[
    tuple[SecretBytes, ...], NoDecode, BeforeValidator(_test_webhook_secrets)
]
TokenKeys = Annotated[tuple[tuple[str, SecretBytes], ...], NoDecode, BeforeValidator(_token_keys)]
Key32 = Annotated[SecretBytes, BeforeValidator(_key32)]
# RECEIVER_CACHE_SECRET: comma-separated, base64 or `whsec_…`; the first signs, all are
# listed in `webhook-signature` during a rotation window (docs/design.md §4).
CacheSecrets = Annotated[tuple[SecretBytes, ...], NoDecode, BeforeValidator(_signal_secrets)]
Channel = Annotated[str, AfterValidator(_channel)]
ApiUrl = Annotated[str | None, AfterValidator(_api_url)]
AdminTokens = Annotated[tuple[SecretStr, ...], NoDecode, BeforeValidator(_admin_tokens)]


class Settings(BaseSettings):
    """Every setting the receiver reads; see the table in docs/design.md §5 and the README."""

    model_config = SettingsConfigDict(env_prefix="RECEIVER_", frozen=True, extra="forbid")

    database_url: Annotated[SecretStr | None, AfterValidator(_postgres_url)] = None
    # RECEIVER_DATABASE_URL leads to a transaction-mode pooler (PgBouncer): no prepared
    # statements, no session settings at connect, no migrations at `serve` start.
    database_pooled: bool = False
    data_dir: Path = Path(".receiver")
    # The three below are required by the commands that use them, and only those
    # (`require`): `migrate` runs with the database URL alone.
    webhook_secrets: WebhookSecrets = Field(default=(), validate_default=False)
    # A delivery verified by one of these is a test delivery whatever its headers
    # (X-Debitura-Test is not signed), and never changes live state.
    test_webhook_secrets: TestWebhookSecrets = ()
    token_keys: TokenKeys = Field(default=(), validate_default=False)
    index_key: Key32 = Field(default=SecretBytes(b""), validate_default=False)
    cache_url: HttpUrl | None = None
    cache_secret: CacheSecrets = ()
    notify_channel: Channel = "token_invalidation"
    # A signal is retried for as long as it can matter (a cache may hold a token this
    # long), never for a small count: docs/design.md §3, guarantee 4.
    signal_max_age: float = Field(default=86_400.0, gt=0, le=30 * 86_400)
    signal_retry_cap_seconds: float = Field(default=300.0, gt=0, le=3600)
    signal_lease_seconds: float = Field(default=30.0, gt=0, le=3600)
    signal_retry_base_seconds: float = Field(default=1.0, gt=0, le=3600)
    # Signals carry Standard Webhooks headers; the first release's X-Receiver-Signature
    # is sent beside them for this release, so caches can move over (docs/decisions.md).
    signal_legacy_signature: bool = True
    signature_tolerance: int = Field(default=300, ge=1, le=86_400)
    max_body_bytes: int = Field(default=65_536, ge=1_024, le=16 * 1024 * 1024)
    body_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    keepalive_seconds: float = Field(default=75.0, gt=0, le=3600)
    # Debitura waits 10 s for an answer: the service's sessions give up well before.
    statement_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    lock_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # A delivery not committed this long after its handler started is answered 503
    # (Debitura retries) rather than committed after the sender has left.
    request_deadline_seconds: float = Field(default=8.0, gt=0, le=60)
    # Past these the receiver answers 503 + Retry-After at once, so memory and the
    # queue stay bounded under a flood or thousands of slow clients.
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    max_requests_in_flight: int = Field(default=256, ge=1, le=100_000)
    # A body arriving slower than this, averaged since it began, is cut once the grace
    # has passed: a stranger trickling bodies holds no connection for long.
    min_body_bytes_per_second: int = Field(default=1024, ge=1, le=16 * 1024 * 1024)
    min_body_rate_grace_seconds: float = Field(default=2.0, gt=0, le=60)
    # Connections one TCP peer holds before any of them carried an authentic delivery;
    # past it the peer's least-progress one makes room. Trusted proxies are exempt.
    max_connections_per_source: int = Field(default=256, ge=1, le=1_000_000)
    # /metrics reads its Postgres gauges at most this often, whatever the scrapers do.
    metrics_refresh_seconds: float = Field(default=5.0, ge=0, le=3600)
    # Retention (docs/decisions.md): how long values are kept before `prune` drops
    # them (the rows stay). Debitura retries for ~1.5 h, so one day is the floor.
    retain_event_bodies_days: float = Field(default=30.0, ge=1, le=3650)
    retain_token_values_days: float = Field(default=30.0, ge=1, le=3650)
    retain_signals_days: float = Field(default=7.0, ge=1, le=3650)
    # `serve` prunes this often (one replica at a time); 0 leaves it to `receiver prune`.
    prune_interval_seconds: float = Field(default=3600.0, ge=0, le=7 * 86_400)
    # Proxies (addresses or networks) whose X-Forwarded-For is believed: the `remote`
    # in log lines is then the client's address as the nearest trusted proxy saw it.
    trusted_proxies: Annotated[tuple[IPvAnyNetwork, ...], NoDecode, BeforeValidator(_split)] = ()
    # `auto`: uvloop when installed (the `fast` extra), else asyncio's own loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Debitura's Referral Partner API (docs/design.md §9): live, and the test
    # environment that manages every tok_test_ token. No key: those commands exit 2.
    debitura_api_url: ApiUrl = "https://api.debitura.com"
    debitura_api_key: SecretStr | None = None
    debitura_test_api_url: ApiUrl = None
    debitura_test_api_key: SecretStr | None = None
    debitura_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Retries of connection errors, timeouts, 5xx and 429: at most this many tries of
    # one call, within this many seconds, the pauses doubling from the base (jittered).
    debitura_max_attempts: int = Field(default=5, ge=1, le=20)
    debitura_retry_base_seconds: float = Field(default=0.5, gt=0, le=60)
    debitura_retry_budget_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Age at which `serve` and `tokens rotate --due` rotate a token; 0 = never.
    token_rotate_after_days: float = Field(default=90.0, ge=0, le=3650)
    # How often `serve` looks for due tokens and open rotations, and how many rotate
    # calls per second it makes at most (spread out, never all in one burst).
    token_rotate_interval_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)
    token_rotate_rate: float = Field(default=1.0, gt=0, le=1000)
    # TEST ONLY, never set in production: a FIFO path; a rotation that got its answer
    # writes a line to it and waits to read `<path>.release` before storing the new
    # token, so the fault tests can kill the process or stop Postgres at that instant.
    test_pause_after_rotate: Path | None = None
    log_format: Literal["json", "console"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # On SIGTERM/SIGINT/SIGHUP /readyz fails this long before the listener stops, while
    # deliveries are still answered, so a load balancer moves away first. Unset: 5 s,
    # 0 with --dev (README: Configuration).
    shutdown_delay_seconds: float | None = Field(default=None, ge=0, le=300)
    # Set: /metrics, /openapi.json, /healthz and /readyz are served on this port only,
    # bound to admin_host (loopback unless told otherwise).
    admin_port: AdminPort = None
    admin_host: str = DEFAULT_ADMIN_HOST
    # The admin API (POST /admin/v1/clients): bearer tokens, several for rotation;
    # served on the admin listener only, so it needs RECEIVER_ADMIN_PORT.
    admin_tokens: AdminTokens = ()
    # How often `serve` reconciles the vault with Debitura (docs/design.md §9); 0: never.
    reconcile_interval_hours: float = Field(default=24.0, ge=0, le=24 * 365)
    # How often `serve` looks at partner applications' reports (a second 401, a
    # NoToken) and reconciles those clients: within a minute by default.
    reconcile_poll_seconds: float = Field(default=30.0, gt=0, le=3600)

    def webhook_secret_sets(self) -> dict[str, list[bytes]]:
        """The webhook secrets by the world they verify: live, and test."""
        return {
            "live": [s.get_secret_value() for s in self.webhook_secrets],
            "test": [s.get_secret_value() for s in self.test_webhook_secrets],
        }

    def secret_values(self) -> list[str]:
        """Every configured secret as text, for the log redaction processor to mask."""
        raw: list[bytes] = [s.get_secret_value() for s in self.webhook_secrets]
        raw += [s.get_secret_value() for s in self.test_webhook_secrets]
        raw += [k.get_secret_value() for _, k in self.token_keys]
        if self.index_key.get_secret_value():
            raw.append(self.index_key.get_secret_value())
        raw += [s.get_secret_value() for s in self.cache_secret]
        texts = [base64.b64encode(r).decode() for r in raw]
        for key in (self.debitura_api_key, self.debitura_test_api_key):
            if key is not None:
                texts.append(key.get_secret_value())
        texts += [t.get_secret_value() for t in self.admin_tokens]
        return texts

    @model_validator(mode="after")
    def _cache_secret_with_url(self) -> Settings:
        if self.cache_url is not None and not self.cache_secret:
            raise ValueError("RECEIVER_CACHE_SECRET is required when RECEIVER_CACHE_URL is set")
        if self.admin_tokens and self.admin_port is None:
            raise ValueError(
                "RECEIVER_ADMIN_TOKENS needs RECEIVER_ADMIN_PORT: the admin API is served on "
                "the admin listener only, never on the public port"
            )
        return self


def _describe(error: Mapping[str, Any]) -> str:
    loc = error.get("loc") or ()
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if not loc:  # a cross-field rule: its message already names the variables
        return message
    variable = f"RECEIVER_{str(loc[0]).upper()}"
    if error.get("type") == "missing":
        return f"{variable} is required but not set"
    # pydantic's messages describe the rule, never the input; `input` is never printed.
    if message.startswith(("is ", "must ", "needs ", "each ", "key ")):
        return f"{variable} {message}"
    return f"{variable} is invalid: {message}"


class _Locations(BaseSettings):
    """The settings that locate others, readable before the rest are complete."""

    model_config = SettingsConfigDict(env_prefix="RECEIVER_", extra="ignore")

    data_dir: Path | None = None
    webhook_secrets: WebhookSecrets | None = None


class ProbeSettings(BaseSettings):
    """The settings `receiver health` reads: where `serve` answers its probes. Nothing
    else, and no secret: a health check runs with the service's environment and has
    no use for its keys."""

    model_config = SettingsConfigDict(env_prefix="RECEIVER_", extra="ignore", frozen=True)

    admin_port: AdminPort = None
    admin_host: str = DEFAULT_ADMIN_HOST


def load_probe_settings() -> ProbeSettings:
    """`ProbeSettings` from the environment; `errors.ConfigError` naming a bad one."""
    try:
        return ProbeSettings()
    except ValidationError as exc:
        raise _config_error(exc) from None


# What a command needs beyond the database URL (docs/design.md §5): each asks only
# for what it uses, so the role that migrates never holds the token keys.
NEEDS_DATABASE: frozenset[str] = frozenset()
NEEDS_VAULT = frozenset({"token_keys", "index_key"})
NEEDS_SERVICE = NEEDS_VAULT | {"webhook_secrets"}

# RECEIVER_* variables read by others than this model (the partner library's cache,
# the test suite, the benchmark): not typos.
OTHER_VARIABLES = frozenset(
    {"cache_database_url", "cache_ttl_seconds", "test_database_url", "bench_database_url"}
)


def _config_error(exc: ValidationError) -> errors.ConfigError:
    """One line per bad variable, naming it; pydantic's input values are never read."""
    lines = sorted({_describe(e) for e in exc.errors(include_input=False)})
    return errors.ConfigError("; ".join(lines))


def require(settings: Settings, needs: frozenset[str]) -> None:
    """Raise `errors.ConfigError` naming each setting in `needs` that is not set."""
    missing = []
    for name in sorted(needs):
        value = getattr(settings, name)
        if isinstance(value, SecretBytes):
            value = value.get_secret_value()
        if not value:
            missing.append(f"RECEIVER_{name.upper()} is required but not set")
    if missing:
        raise errors.ConfigError("; ".join(missing))


# The secrets that may come from a file instead (`RECEIVER_<NAME>_FILE=/path`, the
# Docker and Kubernetes secrets convention; docs/design.md §5).
FILE_SECRETS = (
    "database_url",
    "webhook_secrets",
    "test_webhook_secrets",
    "token_keys",
    "index_key",
    "cache_secret",
    "debitura_api_key",
    "debitura_test_api_key",
    "admin_tokens",
)
# Settings that may also come from a file: the secrets, and the log level, which a
# SIGHUP can change only that way (a running process's environment never changes).
FILE_SETTINGS = (*FILE_SECRETS, "log_level")


MAX_SECRET_FILE_BYTES = 64 * 1024


def secret_files() -> dict[str, str]:
    """The secrets given as `RECEIVER_<NAME>_FILE`, read from their files (surrounding
    whitespace and the final newline stripped). Setting both a variable and its
    `_FILE` is an error; so is a file that cannot be read. Messages name the
    variable, never the content."""
    values: dict[str, str] = {}
    for name in FILE_SETTINGS:
        variable = f"RECEIVER_{name.upper()}"
        path = os.environ.get(f"{variable}_FILE")
        if path is None:
            continue
        if variable in os.environ:
            raise errors.ConfigError(f"set {variable} or {variable}_FILE, not both")
        try:
            with Path(path).open("rb") as file:
                content = file.read(MAX_SECRET_FILE_BYTES + 1)
            text = content.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise errors.ConfigError(
                f"{variable}_FILE names a file that cannot be read ({type(exc).__name__})"
            ) from None
        if len(content) > MAX_SECRET_FILE_BYTES:
            # /dev/zero or a log file by mistake: never read it whole (at start, or on a
            # reload while serving).
            raise errors.ConfigError(
                f"{variable}_FILE names a file over {MAX_SECRET_FILE_BYTES // 1024} KiB, "
                "not a secret"
            )
        values[name] = text.strip()
    return values


def load_settings(
    *,
    dev: bool = False,
    needs: frozenset[str] = NEEDS_SERVICE,
    first_use: bool = False,
    **overrides: Any,
) -> Settings:
    """Read the settings from the environment; overrides win (tests).

    With `dev`, secrets the environment does not set come from the dev secrets file
    in the data directory (generated there only on `first_use`: `serve --dev`). The
    settings in `needs` must be set. Raises `errors.ConfigError` with one line per
    bad variable, naming it but never echoing its value. A secret may be given as
    `RECEIVER_<NAME>_FILE` (`secret_files`).
    """
    overrides = {**secret_files(), **overrides}
    if dev:
        given = overrides.get("data_dir")
        data_dir = Path(given) if given else dev_data_dir(create=first_use)
        present = env_names_set() | set(overrides)
        generated = dev_secrets(data_dir)
        overrides = {
            **{k: v for k, v in generated.items() if k not in present},
            **overrides,
            "data_dir": data_dir,
        }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise _config_error(exc) from None
    require(settings, needs)
    return settings


def unknown_variables() -> list[str]:
    """`RECEIVER_*` variables in the environment that nothing reads (typos), each
    with the known name it most resembles, if any."""
    known = set(Settings.model_fields) | OTHER_VARIABLES | {f"{n}_file" for n in FILE_SETTINGS}
    found = []
    for name in sorted(env_names_set() - known):
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean RECEIVER_{close[0].upper()}?)" if close else ""
        found.append(f"RECEIVER_{name.upper()}{hint}")
    return found


def _locations() -> _Locations:
    try:
        given: dict[str, Any] = {k: v for k, v in secret_files().items() if k == "webhook_secrets"}
        return _Locations(**given)
    except ValidationError as exc:
        raise _config_error(exc) from None


def webhook_secret_for_replay(*, dev: bool) -> bytes | None:
    """The secret `receiver replay` signs with when `--secret` is not given: the first
    of `RECEIVER_WEBHOOK_SECRETS`, else (with `dev`) the dev secret."""
    locations = _locations()
    if locations.webhook_secrets:
        return locations.webhook_secrets[0].get_secret_value()
    if dev:
        secrets_file = dev_secrets(dev_data_dir(create=False))
        return _b64(secrets_file["webhook_secrets"].split(",")[0])
    return None


def dev_webhook_secret() -> tuple[bytes, Path]:
    """The webhook secret `serve --dev` keeps in the dev data directory (generated
    there on first use, as `serve --dev` would), and the file it is kept in: what
    `receiver sandbox --dev` signs with. Never a secret from the environment
    (`RECEIVER_WEBHOOK_SECRETS` may be production's: design §9)."""
    data_dir = dev_data_dir(create=False)
    stored = dev_secrets(data_dir)
    return _b64(stored["webhook_secrets"].split(",")[0]), data_dir / DEV_SECRETS_FILE


def dev_data_dir(*, create: bool) -> Path:
    """Where `--dev` keeps the embedded Postgres and its secrets, found the same way
    from any directory: `RECEIVER_DATA_DIR` when set, else the nearest `.receiver`
    in the working directory or above it (as git finds `.git`). With `create` (the
    first `serve --dev`), `./.receiver` when there is none; without, a clear error
    rather than a second set of secrets and a second database."""
    configured = _locations().data_dir
    if configured is not None:
        return configured.expanduser().resolve()
    here = Path.cwd().resolve()
    for directory in (here, *here.parents):
        if (directory / DEFAULT_DATA_DIR / DEV_SECRETS_FILE).is_file():
            return directory / DEFAULT_DATA_DIR
    if create:
        return here / DEFAULT_DATA_DIR
    raise errors.ConfigError(
        f"no dev data directory ({DEFAULT_DATA_DIR} with {DEV_SECRETS_FILE}) in {here} or "
        "above it: start `receiver serve --dev` (make run) in the project first, or set "
        "RECEIVER_DATA_DIR"
    )


def generate_dev_secrets() -> dict[str, str]:
    """Fresh key material in the exact formats the settings read."""
    return {
        "webhook_secrets": base64.b64encode(secrets.token_bytes(32)).decode(),
        "token_keys": f"dev1:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}",
        "index_key": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode(),
    }


def dev_secrets(data_dir: Path) -> dict[str, str]:
    """Dev secrets kept in `data_dir` (mode 0600), generated on first use and reused after."""
    path = data_dir / DEV_SECRETS_FILE
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.ConfigError(
            f"RECEIVER_DATA_DIR: cannot create {data_dir} ({exc.strerror}); set "
            "RECEIVER_DATABASE_URL and the secrets, or a RECEIVER_DATA_DIR this user may write"
        ) from None
    values = generate_dev_secrets()
    # O_EXCL + 0600 at creation: the file never exists with wider permissions.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(values, handle, indent=2)
    return values


def env_names_set() -> set[str]:
    """Which settings the environment provides, so dev secrets never override them."""
    prefix = "RECEIVER_"
    return {name[len(prefix) :].lower() for name in os.environ if name.startswith(prefix)}

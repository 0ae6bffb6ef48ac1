"""Postgres access: the pool, the named queries, and the one place driver errors
become the project's own.

This is the only module that imports asyncpg.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
import structlog

# asyncpg raises this one (an InterfaceError) when it cannot encode an argument; it is
# not exported under another name, and its message quotes the argument.
from asyncpg.connect_utils import SessionAttribute
from asyncpg.exceptions._base import DataError as _ArgumentError

from receiver import endpoints, errors

log = structlog.get_logger(__name__)

# Called with a fault's kind (`unavailable`, `unstorable`, …) each time one is seen.
# The service's metrics register here: this layer imports no metrics, since the
# partner library runs it inside the partner's own process.
FAULT_OBSERVERS: list[Callable[[str], None]] = []


def _fault(kind: str) -> None:
    for observe in FAULT_OBSERVERS:
        observe(kind)


Connection = asyncpg.Connection
Record = asyncpg.Record
T = TypeVar("T")

ACQUIRE_TIMEOUT_SECONDS = 3.0
# Debitura gives up on an answer after 10 s; a 503 before then makes it retry.
STATEMENT_TIMEOUT_SECONDS = 6.0
# The most deltas one call of a tally fold takes ($1 of sealed_tallies_fold and
# token_tallies_fold): about 0.1 s, inside the /metrics refresh's bound whatever piled up.
TALLY_FOLD_CHUNK = 100_000
RETRIES = 3

# Faults that mean "Postgres is not able to take this now": the caller answers 503
# and the sender retries later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,  # admin/crash shutdown, cannot connect now, cancel
    asyncpg.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.ReadOnlySQLTransactionError,  # connected to a standby during failover
    asyncpg.InternalClientError,  # the driver lost track of a session the server ended
)
# Faults after which a connection must never be handed out again. When the server
# ends a session in the middle of an operation (a restart, pg_terminate_backend),
# asyncpg sometimes reports InternalClientError ("cannot switch to state 12; another
# operation (2) is in progress") and leaves the connection open in a state no later
# query can use (MagicStack/asyncpg#1069, sqlalchemy/sqlalchemy#13241). The pool
# would hand it out again, and every request on it would fail: close it instead.
_BROKEN: tuple[type[BaseException], ...] = (asyncpg.InternalClientError, asyncpg.InterfaceError)
# The schema is missing or older than the code: not migrated yet.
_SCHEMA_MISSING: tuple[type[BaseException], ...] = (
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedFunctionError,
    asyncpg.InvalidSchemaNameError,
)
# Postgres (or the driver, encoding an argument) refused a value: retrying cannot
# help, and the connection is fine. The messages quote values: never logged.
_UNSTORABLE: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.CheckViolationError,
    asyncpg.NotNullViolationError,
    asyncpg.UntranslatableCharacterError,
    _ArgumentError,
)
# Faults that a fresh attempt of the same all-or-nothing statement resolves.
_RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.UniqueViolationError,  # two writers raced to the same unique row
    asyncpg.TransactionRollbackError,  # deadlock or serialization failure
)

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load_queries() -> dict[str, str]:
    text = (Path(__file__).parent / "queries.sql").read_text()
    parts = _QUERY_HEADER.split(text)
    names = parts[1::2]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # a second query under a name would silently replace the first
        raise RuntimeError(f"queries.sql names {', '.join(repeated)} more than once")
    return {name: body.strip() for name, body in zip(names, parts[2::2], strict=True)}


QUERIES = _load_queries()


@asynccontextmanager
async def translated_errors(conn: Connection | None = None) -> AsyncIterator[None]:
    """Turn driver and network faults into `errors.DatabaseUnavailable` (`conn`: the
    connection the work runs on, when there is one, to name its role)."""
    try:
        yield
    except _UNSTORABLE as exc:
        _fault("unstorable")
        code = getattr(exc, "sqlstate", None) or "client"
        log.warning("database_refused_value", error=type(exc).__name__, sqlstate=code)
        raise errors.UnstorableValue(f"database refused a value (SQLSTATE {code})") from None
    except _SCHEMA_MISSING as exc:
        _fault("schema_missing")
        log.warning("database_schema_missing", error=type(exc).__name__)
        raise errors.SchemaNotReady("database schema is not migrated, retry later") from exc
    except asyncpg.InsufficientPrivilegeError as exc:
        raise denied(exc, None if conn is None else role_of(conn)) from None
    except asyncpg.LockNotAvailableError as exc:
        # lock_timeout: a row or client lock held too long. That client's write waits;
        # Postgres is fine, so this is not "unavailable" (readiness ignores it).
        _fault("lock_busy")
        log.warning("database_lock_busy", error=type(exc).__name__)
        raise errors.LockBusy("a lock on these rows is busy, retry later") from exc
    except _UNAVAILABLE as exc:
        _fault("unavailable")
        # The driver's message can quote parameters; log only the fault's class.
        log.warning("database_unavailable", error=type(exc).__name__)
        raise errors.DatabaseUnavailable("database is unavailable, retry later") from exc


# Refusals at connect that waiting cannot cure: an operator must fix the settings.
_MISCONFIGURED: tuple[type[BaseException], ...] = (
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.InvalidAuthorizationSpecificationError,  # no such role, or pg_hba refuses
    asyncpg.InvalidPasswordError,
)


def _message(exc: BaseException) -> str:
    """Postgres's message alone, one line (`str()` of a driver error appends its
    DETAIL on a line of its own)."""
    message = getattr(exc, "message", None) or str(exc)
    return str(message).splitlines()[0] if message else type(exc).__name__


def denied(exc: asyncpg.InsufficientPrivilegeError, role: str | None) -> errors.DatabasePermission:
    """A refused privilege as `errors.DatabasePermission` (logged once): the wrong
    role's URL, or a schema its owner has not migrated yet. Postgres's message names
    the object, never a value."""
    _fault("refused")  # the role, like a refused connection: an operator must act
    problem = errors.DatabasePermission(_message(exc), role)
    log.warning("database_permission_denied", role=role, denied=problem.denied)
    return problem


def refused_at_login(
    exc: asyncpg.InsufficientPrivilegeError, dsn: str
) -> errors.DatabasePermission:
    """A login refused for want of CONNECT on the database (Postgres's message names
    the database), as `errors.DatabasePermission` naming the role the DSN logs in as."""
    _fault("refused")
    parts = urlsplit(dsn)
    role = (
        unquote(parts.username) if parts.username else parse_qs(parts.query).get("user", [None])[0]
    )
    problem = errors.DatabasePermission(_message(exc), role, connecting=True)
    log.warning("database_permission_denied", role=role, denied=problem.denied)
    return problem


def role_of(conn: Connection) -> str | None:
    """The role a connection's session runs as (Postgres reports it at connect)."""
    role: str | None = getattr(conn.get_settings(), "session_authorization", None)
    return role


# A host that does not answer at all (its machine gone, packets dropped: no "refused")
# holds a connection attempt until the driver's timeout, and asyncpg tries a URL's
# hosts one after another within that one timeout: the promoted standby named after
# the lost primary would never be reached before a request gives up (a pool
# acquisition waits ACQUIRE_TIMEOUT_SECONDS). With several hosts, each gets this long.
CONNECT_TIMEOUT_PER_HOST_SECONDS = 1.0
# Per URL's list of hosts: the one that took the last connection, tried first (after a
# failover, the new primary, so only the first connection pays for the lost host).
_ANSWERED_LAST: dict[tuple[tuple[str, int], ...], tuple[str, int]] = {}
# Hosts whose last attempt got no answer (timed out, unreachable, or given up on by
# the caller, as a pool acquisition does after ACQUIRE_TIMEOUT_SECONDS): tried after
# the others, until one answers again. Without it, with three such hosts before the
# primary, every acquisition gave up before reaching it, and the next began again at
# the first. Bounded by the hosts configured; set operations are atomic.
_SILENT: set[tuple[str, int]] = set()


async def _connect_host_by_host(dsn: str, **options: Any) -> Connection:
    """asyncpg's connect, but with several hosts in the URL each is tried in turn
    within its own timeout, the one that answered last first; `target_session_attrs`
    holds for each (prefer-standby: any standby first, then any host)."""
    addresses = endpoints.database_addresses(dsn)
    if len(addresses) < 2:
        single: Connection = await asyncpg.connect(dsn, **options)
        return single
    key = tuple(addresses)
    last = _ANSWERED_LAST.get(key)
    order = sorted(addresses, key=lambda address: (address != last, address in _SILENT))
    wanted = options.pop("target_session_attrs", None) or _session_attrs(dsn)
    passes = (
        [SessionAttribute.standby, SessionAttribute.any]
        if wanted == SessionAttribute.prefer_standby
        else [wanted]
    )
    failure: BaseException | None = None
    for attrs in passes:
        for host, port in order:
            try:
                conn: Connection = await asyncpg.connect(
                    dsn,
                    host=host,
                    port=port,
                    timeout=CONNECT_TIMEOUT_PER_HOST_SECONDS,
                    target_session_attrs=attrs,
                    **options,
                )
            except (OSError, TimeoutError, asyncio.CancelledError) as exc:
                _SILENT.add((host, port))  # no answer: last, next time
                if isinstance(exc, asyncio.CancelledError):
                    raise
                failure = exc
                continue
            except _UNAVAILABLE as exc:  # starting, refusing for now, or not the kind wanted
                failure = exc
                continue
            _SILENT.discard((host, port))
            _ANSWERED_LAST[key] = (host, port)
            return conn
    assert failure is not None
    raise failure


def _session_attrs(dsn: str) -> SessionAttribute | None:
    given = parse_qs(urlsplit(dsn).query).get("target_session_attrs", [""])[0]
    # An unknown value is left to asyncpg, which refuses it in its own words.
    return SessionAttribute(given) if given in set(SessionAttribute) else None


async def connect(dsn: str, *, primary: bool = False) -> Connection:
    """One connection, outside the pool (migrations, CLI commands). A refusal only the
    settings can cure is a `ConfigError` (exit 2); a fault that may pass is
    `DatabaseUnavailable`.

    `primary`: whatever `target_session_attrs` the URL asks for, only a server out of
    recovery will do. A LISTEN needs it: a standby refuses LISTEN, and NOTIFY is not
    replicated (a partner cache may read from a standby, but listens on the primary)."""
    attrs = SessionAttribute.primary if primary else None  # None: as the URL says
    try:
        async with translated_errors():
            try:
                return await _connect_host_by_host(
                    dsn, server_settings=_SERVER_SETTINGS, target_session_attrs=attrs
                )
            except asyncpg.InsufficientPrivilegeError as exc:
                raise refused_at_login(exc, dsn) from None
    except asyncpg.PostgresError as exc:
        # Refused at connect, not for want of capacity (translated above): no such
        # database or role, or a parameter in the URL's query that asyncpg sends as a
        # setting and Postgres does not know (libpq's connect_timeout). These
        # messages name the database, role or parameter, never a password.
        raise errors.ConfigError(
            f"RECEIVER_DATABASE_URL: Postgres refused it: {_message(exc)}"
        ) from None


# synchronous_commit is forced on whatever the database default: a 200 must follow a
# durable commit (docs/design.md §3, guarantee 1).
# jit off: asyncpg introspects the composite type once per connection, and JIT
# compiling that catalog query costs more than running it.
_SERVER_SETTINGS = {"synchronous_commit": "on", "application_name": "receiver", "jit": "off"}


async def _keep_session(_: Any) -> None:
    """Skip the pool's reset query on release: one round trip less per request.

    Safe because pooled connections keep no session state: locks are transaction
    scoped, nothing is SET or LISTENed on them, and asyncpg itself still rolls back a
    connection released inside a transaction before calling this.
    """


def iso(moment: datetime) -> str:
    """A time as every output shows one: ISO 8601 in UTC with `Z`, as the log lines
    (and Debitura's payloads) write it."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def server_address(conn: Connection | Any) -> str:
    """The host and port (or socket) a connection reached, never a user or password:
    with a multi-host URL, which of the hosts it is."""
    # asyncpg keeps the address it connected to only in a private attribute (the pool's
    # proxy forwards it); without it, the operator still gets the fault, just unnamed.
    address = getattr(conn, "_addr", None)
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address) if address is not None else "unknown"


def plain(row: Record, *, leave_out: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A row as a plain dict for output (CLI tables, JSON lines): times as `iso` text."""
    return {
        k: (iso(v) if isinstance(v, datetime) else v) for k, v in row.items() if k not in leave_out
    }


class Database:
    """A connection pool and the named queries run through it."""

    def __init__(self, pool: asyncpg.Pool, dsn: str = "") -> None:
        self.pool = pool
        self._dsn = dsn  # to name the role when a login is refused

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        max_size: int = 10,
        statement_timeout: float | None = None,
        lock_timeout: float | None = None,
        pooled: bool = False,
    ) -> Database:
        """Create the pool. It connects lazily, so a database that is down at start-up
        shows as 503s and a failing readiness probe, not as a crash.

        The timeouts (seconds) are set on every session of the pool, so Postgres itself
        gives up on a statement or a lock wait (a 503, which the sender retries) before
        the sender gives up on us; the driver's own timeout stays as a backstop."""
        settings = dict(_SERVER_SETTINGS)
        if statement_timeout is not None:
            settings["statement_timeout"] = f"{round(statement_timeout * 1000)}ms"
        if lock_timeout is not None:
            settings["lock_timeout"] = f"{round(lock_timeout * 1000)}ms"
        if pooled:
            # Behind a transaction-mode pooler (PgBouncer), a server session serves
            # many clients: no named prepared statements (they stay on a session we may
            # not get again), and no session settings at connect, which the pooler
            # refuses; the role's settings apply instead (README "Behind PgBouncer").
            settings = {"application_name": _SERVER_SETTINGS["application_name"]}
        pool = await asyncpg.create_pool(
            dsn,
            # The stubs spell out connect's every keyword; ours passes them on as given.
            connect=cast(Any, _connect_host_by_host),
            min_size=0,
            max_size=max_size,
            server_settings=settings,
            reset=_keep_session,
            statement_cache_size=0 if pooled else 100,
        )
        return cls(pool, dsn)

    async def close(self) -> None:
        """Close every connection, waiting for queries in flight."""
        await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection, with every fault translated."""
        async with translated_errors():
            try:
                conn = await self.pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS)
            except _UNAVAILABLE:
                raise  # starting up, shutting down, too many connections: transient
            except asyncpg.PostgresError as exc:
                # Refused at connect (no such database, authentication): an operator
                # must act, and the sender must retry meanwhile.
                _fault("refused")
                # No traceback: the driver's message can quote connection parameters.
                log.error("database_connect_refused", error=type(exc).__name__)  # noqa: TRY400
                if isinstance(exc, asyncpg.InsufficientPrivilegeError):
                    raise refused_at_login(exc, self._dsn) from None
                if isinstance(exc, _MISCONFIGURED):
                    # These messages name the database or role, never a password.
                    raise errors.DatabaseRefused(_message(exc)) from None
                raise errors.DatabaseUnavailable("database refused the connection") from exc
            try:
                # The pool hands out a proxy that forwards every Connection method.
                yield cast(Connection, conn)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise denied(exc, role_of(cast(Connection, conn))) from None
            except _UNSTORABLE:
                raise  # the value was refused, the session is fine
            except asyncpg.ReadOnlySQLTransactionError:
                # A standby (reached by mistake, or a primary demoted under us), or a
                # database set default_transaction_read_only: drop the session, so the
                # next one is connected afresh (to the primary, when the URL names
                # several hosts with target_session_attrs=read-write). The operator
                # learns which host it was; the caller answers 503.
                _fault("read_only")
                # One line, no traceback: the host is what the operator needs.
                log.error("database_read_only", host=server_address(conn))  # noqa: TRY400
                conn.terminate()
                raise
            except _BROKEN:
                conn.terminate()
                raise
            finally:
                await self.pool.release(conn)

    async def _run(self, call: Callable[[Connection], Awaitable[T]]) -> T:
        for attempt in range(1, RETRIES + 1):
            try:
                async with self.connection() as conn:
                    return await call(conn)
            except _RETRYABLE as exc:
                _fault("retried")
                log.info("database_retry", attempt=attempt, error=type(exc).__name__)
                await asyncio.sleep(0.005 * attempt)
        raise errors.DatabaseUnavailable("database is busy, retry later")

    async def fetchval(self, name: str, *args: Any) -> Any:
        """Run a named query and return the first column of its first row."""
        sql = QUERIES[name]
        return await self._run(
            lambda conn: conn.fetchval(sql, *args, timeout=STATEMENT_TIMEOUT_SECONDS)
        )

    async def fetch(self, name: str, *args: Any) -> list[Record]:
        """Run a named query and return every row."""
        sql = QUERIES[name]
        return await self._run(
            lambda conn: conn.fetch(sql, *args, timeout=STATEMENT_TIMEOUT_SECONDS)
        )

    async def fetch_count(self, name: str, *args: Any) -> list[Record]:
        """`fetch` for an operator's count beside deliveries, read the way it was
        written to be read: through its index, on one core, without JIT. At 1M clients
        the planner took `prune_counts` (14 rows due) for 678,000 rows (it takes "holds
        a body" and "old" as independent): a sequential scan of the events, 725-840
        ms, or two parallel workers and JIT for 74 rows (bench/README.md)."""
        sql = QUERIES[name]

        async def counted(conn: Connection) -> list[Record]:
            async with conn.transaction():
                await conn.execute(
                    "SET LOCAL max_parallel_workers_per_gather = 0;"
                    " SET LOCAL enable_seqscan = off; SET LOCAL jit = off"
                )
                return await conn.fetch(sql, *args, timeout=STATEMENT_TIMEOUT_SECONDS)

        return await self._run(counted)

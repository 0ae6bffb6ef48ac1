"""`partner.blocking(tokens)`: the same `get`/`call` for applications without asyncio
(Django, Flask, scripts). The token model runs on an event loop in a thread of its
own; any number of the application's threads call into it (each call waits for its
own answer), and `call` runs the application's synchronous `request(token)` in the
calling thread, with the same 401/403/429 rules as the asynchronous `call`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from receiver.partner import calling, failures

R = TypeVar("R")
T = TypeVar("T")
DEFAULT_TIMEOUT_SECONDS = 120.0


class Tokens(calling.Source, Protocol):
    """A token model: `MintedTokens`, `RefreshingTokens` or `WebhookTokens`."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class BlockingTokens:
    """A token model driven from synchronous code; close it (or use `with`)."""

    def __init__(self, tokens: Tokens, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._tokens = tokens
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="receiver-partner", daemon=True
        )
        # Held while submitting and while closing: no call slips onto a stopping loop.
        self._lock = threading.Lock()
        self._closed = False
        self._thread.start()
        try:
            self._run(tokens.start(), "")
        except BaseException:
            self._stop()
            raise

    def __repr__(self) -> str:
        return f"BlockingTokens({self._tokens!r}, closed={self._closed})"

    def __enter__(self) -> BlockingTokens:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, key: str) -> str:
        """The key's token, as the asynchronous `get` gives it."""
        return self._run(self._tokens.get(key), key)

    def call(self, key: str, request: Callable[[str], R]) -> R:
        """`request(token)` (synchronous, run in this thread), retried exactly once with
        a fresh token on a 401; a second 401 is `LinkInvalid`, a 403
        `PermissionDenied`, a 429 `RateLimited`."""
        token = self.get(key)
        response = request(token)
        if self._check(key, response) != 401:
            return response
        calling.discard(response)
        fresh = self._run(self._tokens.renew(key, token), key)
        if fresh == token:
            raise self._run(self._tokens.refused_twice(key, token), key)
        response = request(fresh)
        if self._check(key, response) == 401:
            calling.discard(response)
            raise self._run(self._tokens.refused_twice(key, fresh), key)
        return response

    def close(self) -> None:
        """Close the token model and stop its thread. Calls still waiting end with a
        `TokenError`, and so do later calls."""
        try:
            self._run(self._tokens.close(), "")
        except failures.TokenError:
            pass  # closed already, or the close timed out: stop the loop all the same
        finally:
            self._stop()

    def _stop(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop).result(self._timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    @staticmethod
    def _check(key: str, response: Any) -> int:
        status = calling.status_of(response)
        if status == 429:
            calling.discard(response)
            raise calling.rate_limited(key, response)
        if status == 403:
            document = calling.document_sync(response)
            calling.discard(response)
            raise calling.permission_denied(key, document)
        return status

    def _run(self, coroutine: Coroutine[Any, Any, T], key: str) -> T:
        with self._lock:
            if self._closed:
                coroutine.close()
                raise failures.TokenError("the blocking token model is closed", key)
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self._timeout)
        except concurrent.futures.CancelledError:
            cancelled = True  # closed while this call waited
        except concurrent.futures.TimeoutError:
            future.cancel()
            cancelled = False
        if cancelled:
            raise failures.TokenError("the blocking token model was closed", key)
        raise failures.Unavailable(f"no answer within {self._timeout:.0f} s", key, None)


async def _cancel_the_rest() -> None:
    """Cancel every other task on the loop (calls in flight, background renewals), so
    no caller waits on a loop that is about to stop."""
    current = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def blocking(tokens: Tokens, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> BlockingTokens:
    """`tokens` (not yet started) for synchronous code: its own thread and event loop."""
    return BlockingTokens(tokens, timeout=timeout)

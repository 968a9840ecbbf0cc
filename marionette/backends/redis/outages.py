"""Outages: calling Redis through a restart or a network cut.

A call that fails with a connection error (redis-py's `ConnectionError` or
`TimeoutError`, which cover refused connections, resets, timeouts and a server still
loading its data) is retried with tenacity's exponential backoff and jitter. A
user's call (a submission, a cancel, a read) retries for up to `lease` seconds and
then raises `BackendUnavailable`; a background thread (claimer, worker, heartbeat,
scheduler) retries until Redis is back or its manager stops. Each outage is logged
once, when it starts, and once more when Redis answers again.

The first try costs nothing extra: tenacity is set up only after a failure. The
`_down` flag is guarded by `_lock`; nothing else is shared.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import tenacity

from marionette._log import Log
from marionette.errors import BackendUnavailable, describe

__all__ = ["Outages"]

T = TypeVar("T")

#: 20 ms doubling to 1 s between tries, with jitter so that processes spread out.
_BACKOFF = tenacity.wait_exponential(multiplier=0.02, max=1.0) + tenacity.wait_random(0, 0.05)


def _nap(stopping: threading.Event, seconds: float) -> None:
    """tenacity's sleep between tries, cut short when `stopping` is set."""
    stopping.wait(seconds)


class Outages:
    """Retries Redis calls through outages and logs each outage once."""

    def __init__(self, log: Log, url: str | None, errors: tuple[type[BaseException], ...]) -> None:
        self._log = log
        self._url = url
        #: The exceptions that mean "Redis is unreachable right now".
        self.errors = errors
        self._lock = threading.Lock()
        self._down = False

    def call(
        self,
        fn: Callable[[], T],
        *,
        limit: float | None = None,
        stopping: threading.Event | None = None,
    ) -> T:
        """`fn()`, retried through connection errors.

        With `limit`, for up to that many seconds, then `BackendUnavailable` (from
        the last error). With `stopping` instead, until that event is set (then the
        last error propagates); the waits between tries end early when it is set.
        """
        try:
            result = fn()
        except self.errors as exc:
            result = self._retry(fn, exc, limit, stopping)
        if self._down:
            self._up()
        return result

    def _retry(
        self,
        fn: Callable[[], T],
        first: BaseException,
        limit: float | None,
        stopping: threading.Event | None,
    ) -> T:
        self.down(first)
        stops: list[Any] = []
        if limit is not None:
            stops.append(tenacity.stop_after_delay(limit))
        if stopping is not None:
            stops.append(lambda state: stopping.is_set())
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(self.errors),
            wait=_BACKOFF,
            stop=tenacity.stop_any(*stops) if stops else tenacity.stop_never,
            sleep=time.sleep if stopping is None else functools.partial(_nap, stopping),
            reraise=True,
        )
        try:
            return retrying(fn)
        except self.errors as exc:
            if limit is None:
                raise
            raise BackendUnavailable(self._url, waited=limit) from exc

    def down(self, exc: BaseException) -> None:
        """An outage began (logged once, until a call succeeds again)."""
        with self._lock:
            if self._down:
                return
            self._down = True
        self._log.warning("redis unreachable, retrying", error=describe(exc))

    def _up(self) -> None:
        with self._lock:
            if not self._down:
                return
            self._down = False
        self._log.info("redis reachable again")

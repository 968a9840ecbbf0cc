"""The marionette demo: a small service that runs for about ten seconds, then stops.

Run it with ``python -m marionette demo [--duration SECONDS]``. In its log you see:

* three ``fetch`` jobs queued to run at once, more than the free workers can take;
* a ``heartbeat`` that waits on its context (``ctx.wait``, never ``time.sleep``) and
  ends by itself when the service shuts down;
* a ``sync`` that fails twice with `ConnectionError` and succeeds on its third
  attempt, retried with exponential backoff (no worker sleeps while it waits);
* an ``export`` that fails for good after its retries, and the `TaskError` it ends with;
* a ``digest`` delayed by a few seconds (`TaskManager.delay`) and a ``cleanup``
  scheduled at a wall-clock time (`TaskManager.schedule` with an aware datetime);
* a graceful stop, also on Ctrl-C, and a count of what succeeded and failed.

The demo is an application, so it configures its own console logging and hands the
logger to the manager. It never calls `structlog.configure()`: that would change the
logging of every other user of structlog in the process, which only the program's
owner may do; the library never configures logging either.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial

import structlog
import tenacity
from structlog.typing import FilteringBoundLogger

from marionette import Config, Context, TaskError, TaskHandler, TaskManager

__all__ = ["DEFAULT_DURATION", "console_logger", "run"]

#: How long the demo runs, in seconds, unless told otherwise.
DEFAULT_DURATION = 10.0


def console_logger(level: int = logging.INFO) -> FilteringBoundLogger:
    """A structlog logger printing timestamped, human-readable lines to stdout.

    Built with `structlog.wrap_logger`, so nothing global changes. At INFO, the
    library's per-task "task completed" lines (DEBUG) stay out of the way.
    """
    logger: FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False),
            # Colours only on a terminal: piped output stays plain text.
            structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()),
        ],
    )
    return logger


# -- the tasks: each is called with its attempt's Context ----------------------------


def fetch(log: FilteringBoundLogger, url: str, seconds: float, ctx: Context) -> int:
    """Download `url` (pretend): the wait is on the context, so a shutdown cuts it short."""
    if ctx.wait(seconds):
        ctx.check()  # cancelled or past its deadline: fail rather than return half a page
    size = len(url) * 1024
    log.info("fetched", url=url, bytes=size, task_id=ctx.task_id)
    return size


def heartbeat(log: FilteringBoundLogger, every: float, ctx: Context) -> int:
    """Beat until the service's shutdown context is cancelled; return the beat count."""
    beats = 0
    while not ctx.wait(every):  # True once the context is done: time to leave
        beats += 1
        log.info("heartbeat", beats=beats)
    return beats


def sync(log: FilteringBoundLogger, seconds: float, ctx: Context) -> str:
    """Flaky: the upstream resets the first two attempts, then answers."""
    log.info("sync started", attempt=ctx.attempt)
    ctx.wait(seconds)
    if ctx.attempt < 3:
        raise ConnectionError("connection reset by peer")
    log.info("sync succeeded", attempt=ctx.attempt)
    return "in sync"


def export(seconds: float, ctx: Context) -> None:
    """Broken for good: the warehouse refuses every connection."""
    ctx.wait(seconds)
    raise ConnectionRefusedError("warehouse:5432 refused the connection")


def chore(log: FilteringBoundLogger, seconds: float, ctx: Context) -> None:
    """A short job; the log line tells when it ran compared with when it was asked for."""
    ctx.wait(seconds)
    log.info("chore done", task=ctx.task_name)


def show_failure(log: FilteringBoundLogger, handler: TaskHandler) -> None:
    """Done callback: what the application gets from a task that failed for good.

    It runs once the task is done, in the thread that settled it (a worker here), so
    it must be quick and must not raise; an error it raises would only be logged.
    """
    error = handler.exception()
    if isinstance(error, TaskError):
        log.error(
            "caught TaskError",
            message=str(error),
            attempts=error.attempts,
            duration=round(error.duration, 2),
        )
        log.error("TaskError.dict()", **error.dict())


# -- the service ----------------------------------------------------------------------


def run(duration: float = DEFAULT_DURATION) -> int:
    """Run the demo for about `duration` seconds; return the exit status.

    Blocks the calling thread. Ctrl-C (KeyboardInterrupt) ends it early, gracefully:
    the manager stops all the same and the status is 130, as shells expect.
    """
    log = console_logger()
    step = duration / 10  # every delay below scales with the duration
    tm = TaskManager(Config(logger=log, workers=3, server_name="demo"))
    # The service's lifetime: the heartbeat runs under it, and cancelling it at the
    # end is what tells long-running tasks to finish.
    shutdown = Context()
    handlers: list[TaskHandler] = []
    status = 0
    started = time.monotonic()
    tm.start()
    try:
        for n, page in enumerate(["news", "weather", "prices"]):
            url = f"https://example.com/{page}"
            job = partial(fetch, log, url, step * (0.5 + n / 4))
            handlers.append(tm.queue(job, name=f"fetch {page}"))
        handlers.append(
            tm.queue(partial(heartbeat, log, 2 * step), name="heartbeat", context=shutdown)
        )
        # Retried after 1 step, then 2 steps: the scheduler holds the task meanwhile.
        backoff = tenacity.wait_exponential(multiplier=step, max=4 * step)
        handlers.append(
            tm.queue(partial(sync, log, step / 4), name="sync", retries=3, backoff=backoff)
        )
        failing = tm.queue(
            partial(export, step / 4),
            name="export",
            retries=2,
            backoff=step,  # a number: a fixed wait, in seconds
            error="nightly export failed",  # the headline of its TaskError
        )
        failing.add_done_callback(partial(show_failure, log))
        handlers.append(failing)
        handlers.append(tm.delay(4 * step, partial(chore, log, step / 4), name="digest"))
        at = datetime.now(UTC) + timedelta(seconds=6 * step)
        handlers.append(tm.schedule(at, partial(chore, log, step / 4), name="cleanup"))
        log.info("all work submitted", tasks=len(handlers), cleanup_at=at.isoformat())
        shutdown.wait(duration)  # serve until the time is up (or Ctrl-C)
    except KeyboardInterrupt:
        log.warning("interrupted, stopping")
        status = 130
    finally:
        shutdown.cancel()  # the heartbeat returns at once
        tm.stop()  # lets running and queued tasks finish; keeps what is not due yet
    counts = Counter(h.state.name.lower() for h in handlers)
    log.info(
        "demo finished",
        elapsed=round(time.monotonic() - started, 2),
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        unfinished=len(handlers) - counts["succeeded"] - counts["failed"],
    )
    return status

"""The marionette demo: an uptime monitor, in the spirit of an HTTP polling coordinator.

Run it with ``python -m marionette demo [--duration SECONDS] [--db PATH]``. It starts a
small HTTP service on 127.0.0.1 (stdlib only) and watches four endpoints of it:

* ``fast`` and ``slow`` always answer; ``flaky`` answers 503 to every third request
  and has an outage of 1.5 s every 5 s; ``down`` is a port where nothing listens.
* Each endpoint is polled on its own interval (`TaskManager.every`); a group limit
  (``Config(limits={"http": 2})``, ``group="http"``) caps the requests in flight,
  and a poll over the cap waits without holding a worker.
* A failed poll is retried with exponential backoff (the scheduler holds it; no
  worker sleeps meanwhile): ``flaky`` mostly recovers that way, while every poll of
  ``down`` fails for good, and the `TaskError` it ends with is printed.
* One listener (`TaskManager.add_listener`) receives the results one at a time: it
  folds them into plain state (no locks), writes each poll into SQLite, and when an
  endpoint goes up or down it queues a keyed ``publish`` task (go-smartpoll's
  pattern: changes made while a publish waits fold into it; it sends the latest).
* A report delayed to mid-run (`TaskManager.delay`) shows what is planned; at a
  wall-clock time (`TaskManager.schedule`, an aware datetime) the cap goes up to 3
  (`TaskManager.set_limit`).
* A status line from `TaskManager.stats` once a second; at the end, a table per
  endpoint (polls, failures, p50/p95 latency) read back from the database.
* A graceful stop, also on Ctrl-C: no new polls, the ones under way finish (retries
  included, within a grace period), then the manager and the server stop.

With ``--processes N`` (and ``--backend URL``, or a private server it starts), the
same monitor runs as a cluster on Redis, N worker processes and this one sharing the
periodics and the cap, one of them killed midway: see `marionette.demo_cluster`.

The demo is an application, so it builds its own console logger and hands it to the
manager. It never calls `structlog.configure()`: that would change the logging of
every other user of structlog in the process, which only the program's owner may do;
the library never configures logging either.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog
import tenacity
from structlog.typing import FilteringBoundLogger

from marionette import (
    Config,
    Context,
    Periodic,
    Stats,
    TaskEvent,
    TaskEventKind,
    TaskHandler,
    TaskManager,
    TaskManagerStopped,
)

__all__ = [
    "BACKOFF",
    "DEFAULT_DURATION",
    "ENDPOINTS",
    "GRACE",
    "HTTP_CAP",
    "POLL_TIMEOUT",
    "Endpoint",
    "Service",
    "console_logger",
    "log_status",
    "percentiles",
    "poll",
    "print_table",
    "run",
]

#: How long the demo runs, in seconds, unless told otherwise.
DEFAULT_DURATION = 10.0
#: After the run, how long polls under way (and their retries) may take to finish.
GRACE = 3.0
#: At most this many requests in flight at once (the group limit of "http").
HTTP_CAP = 2
#: Each attempt's deadline (the ``timeout=`` option); the request's socket timeout too.
POLL_TIMEOUT = 1.0
#: How long each endpoint of the service takes to answer, in seconds.
LATENCY = {"/fast": 0.05, "/slow": 0.4, "/flaky": 0.1}
#: ``/flaky`` fails for the last `OUTAGE` seconds of every `CYCLE`.
CYCLE, OUTAGE = 5.0, 1.5
#: Between the attempts of a failed poll: 0.1 s, 0.2 s, 0.4 s... plus up to 50 ms of
#: jitter, so that the retries of polls that failed together do not march in step.
BACKOFF = tenacity.wait_exponential(multiplier=0.1, max=1) + tenacity.wait_random(0, 0.05)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One monitored endpoint: seconds between polls, and retries of a failed poll."""

    name: str
    interval: float
    retries: int


ENDPOINTS = (
    Endpoint("fast", 0.5, 1),
    Endpoint("slow", 1.0, 1),
    Endpoint("flaky", 0.8, 3),
    Endpoint("down", 2.0, 1),
)


def console_logger() -> FilteringBoundLogger:
    """A structlog logger printing timestamped, human-readable INFO+ lines to stdout.

    Built with `structlog.wrap_logger`, so nothing global changes. At INFO, the
    library's per-task "task completed" lines (DEBUG) stay out of the way.
    """
    logger: FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger("info"),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False),
            # Colours only on a terminal: piped output stays plain text. Keys in the
            # order given, so the status line reads the same every second.
            structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty(), sort_keys=False),
        ],
    )
    return logger


# -- the monitored service -----------------------------------------------------------


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(), so the demo leaves none behind.
    daemon_threads = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)  # port 0: any free port
        self.born = time.monotonic()
        self._hits_lock = threading.Lock()  # guards _flaky_hits (one thread per request)
        self._flaky_hits = 0

    def flaky_fails(self) -> bool:
        """Whether ``/flaky`` fails now: during an outage, and on every third request."""
        with self._hits_lock:
            self._flaky_hits += 1
            hits = self._flaky_hits
        return (time.monotonic() - self.born) % CYCLE >= CYCLE - OUTAGE or hits % 3 == 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A poll that gave up closes the connection under the answer: expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if self.path not in LATENCY:
            self._answer(404)
            return
        time.sleep(LATENCY[self.path])  # the service's own thread: no task sleeps here
        if self.path == "/flaky" and self.server.flaky_fails():
            self._answer(503)
        else:
            self._answer(200)

    def _answer(self, code: int) -> None:
        body = f"{code} {self.responses[code][0]}\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # an access log would drown the monitor's own output


class Service:
    """The HTTP server, in a thread of its own while used as a context manager."""

    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-http")
        # Bound but never listening: connecting to its port is refused at once, and
        # holding it keeps anything else from taking that port meanwhile.
        self._void = socket.socket()
        self._void.bind(("127.0.0.1", 0))

    def url(self, name: str) -> str:
        socket_ = self._void if name == "down" else self._server.socket
        return f"http://127.0.0.1:{socket_.getsockname()[1]}/{name}"

    def __enter__(self) -> Service:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()  # from another thread than serve_forever's
        self._server.server_close()
        self._thread.join()
        self._void.close()


# -- the poll task: called by a worker with its attempt's Context --------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """A poll's result: the HTTP status and the seconds it took."""

    status: int
    latency: float


# No proxy: an http_proxy variable in the environment must not reroute 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def poll(url: str, ctx: Context) -> Answer:
    """GET `url` before the attempt's deadline (without one, with a socket timeout of
    `POLL_TIMEOUT`); an HTTP error or a refused connection raises (an `OSError`,
    which the poll's ``retry=`` strategy retries)."""
    ctx.check()  # cancelled, or already past the deadline: do not start a request
    remaining = ctx.remaining()
    started = time.perf_counter()
    try:
        with _OPENER.open(url, timeout=POLL_TIMEOUT if remaining is None else remaining) as r:
            r.read()
            return Answer(r.status, time.perf_counter() - started)
    except urllib.error.HTTPError as err:
        err.close()  # an HTTPError holds the response open
        raise


# -- results: one listener, plain state, SQLite --------------------------------------


class PollStore:
    """Every poll, one row each, in SQLite; rows are tagged with the run they belong to.

    Three threads use the connection in turn, never at once (hence
    ``check_same_thread=False``): the main thread makes the table, the listener
    thread alone writes while the manager runs, and the main thread reads once
    `TaskManager.stop()` returned (it delivers every event and ends the listener
    thread first).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.run = datetime.now(UTC).isoformat()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS polls (run TEXT, endpoint TEXT, at TEXT,"
            " ok INTEGER, attempts INTEGER, latency_ms REAL, detail TEXT)"
        )

    def add(self, event: TaskEvent, answer: Answer | None) -> None:
        latency = None if answer is None else round(answer.latency * 1000, 2)
        detail = str(event.error) if answer is None else str(answer.status)
        row = (self.run, event.task.name, event.at.isoformat(), answer is not None)
        self._db.execute(
            "INSERT INTO polls VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*row, event.task.attempts, latency, detail),
        )

    def rows(self) -> list[tuple[str, bool, int, float | None]]:
        """This run's polls: (endpoint, ok, attempts, latency_ms)."""
        query = "SELECT endpoint, ok, attempts, latency_ms FROM polls WHERE run = ?"
        return [(e, bool(ok), n, ms) for e, ok, n, ms in self._db.execute(query, (self.run,))]

    def close(self) -> None:
        self._db.close()


class Monitor:
    """What the polls found: the listener, the state it keeps, and the publish task.

    `on_event` runs on the manager's listener thread only, one event at a time, so
    its state needs no lock. `publish` runs on a worker and reads only `summary`, a
    read-only snapshot the listener replaces whole (one reference assignment, atomic),
    so a publish always sees one consistent summary: the latest when it runs.
    """

    def __init__(self, tm: TaskManager, store: PollStore, log: FilteringBoundLogger) -> None:
        self._tm, self._store, self._log = tm, store, log
        self._endpoints = {e.name for e in ENDPOINTS}
        self._up: dict[str, bool] = {}
        self.summary: Mapping[str, str] = MappingProxyType({})
        self.changes = 0  # written by the listener only
        self.published = 0  # written by `publish` only: runs sharing a key never overlap

    def on_event(self, event: TaskEvent) -> None:
        if event.task.name not in self._endpoints:
            return  # publish, report, raise cap: not polls
        answer = event.result if event.kind is TaskEventKind.SUCCEEDED else None
        self._store.add(event, answer)
        name, up = event.task.name, answer is not None
        if self._up.get(name) is up:
            return
        self._up[name] = up
        self.changes += 1
        if up:
            self._log.info("endpoint up", endpoint=name, attempts=event.task.attempts)
        else:  # event.error is the poll's TaskError: its message says it all
            self._log.error("endpoint down", endpoint=name, error=str(event.error))
        self.summary = MappingProxyType({n: "up" if u else "DOWN" for n, u in self._up.items()})
        try:
            # Keyed: while a publish waits to run, this returns it instead of adding one.
            self._tm.queue(self.publish, key="publish", name="publish")
        except TaskManagerStopped:
            pass  # events are still delivered while the manager stops; nothing to publish to

    def publish(self, ctx: Context) -> None:
        """Publish the latest summary: a pretend POST to a status page, then a log line.

        Changes that come while it runs queue one more publish; changes that come
        while that one waits are folded into it, as it reads the summary when it starts.
        """
        summary = self.summary
        ctx.wait(0.2)  # the POST (waiting on the context: a stop with a timeout cuts it short)
        self.published += 1
        self._log.info("summary published", **summary)


# -- scheduled chores ----------------------------------------------------------------


def report(
    tm: TaskManager, periodics: list[Periodic], log: FilteringBoundLogger, ctx: Context
) -> None:
    """Show the plan: each endpoint's next poll, and the tasks waiting (`pending()`)."""
    now = datetime.now(UTC)
    nexts = {p.name: f"{(p.next_run - now).total_seconds():.2f}s" for p in periodics if p.next_run}
    waiting = [f"{h.name}({h.state.name.lower()})" for h in tm.pending()]
    log.info("plan", next_polls=nexts, pending=waiting)


def raise_cap(tm: TaskManager, log: FilteringBoundLogger, ctx: Context) -> None:
    """Off-peak: allow one more request in flight (polls waiting for a slot start now)."""
    tm.set_limit("http", HTTP_CAP + 1)
    log.info("http cap raised", limit=HTTP_CAP + 1)


# -- output --------------------------------------------------------------------------


def log_status(log: FilteringBoundLogger, stats: Stats) -> None:
    """The live status line, from one consistent `Stats` snapshot."""
    http = stats.groups["http"]
    log.info(
        "status",
        uptime=f"{stats.uptime:.1f}s",
        busy=f"{stats.busy}/{stats.workers}",
        http=f"{http.running}/{http.limit}" + (f"+{http.waiting}" if http.waiting else ""),
        scheduled=stats.scheduled,
        ok=stats.succeeded,
        failed=stats.failed,
        retried=stats.retried,
    )


def percentiles(latencies: Sequence[float]) -> tuple[str, str]:
    """p50 and p95 of `latencies` (ms), formatted; "-" when there are none."""
    if len(latencies) >= 2:  # "inclusive": percentiles stay within what was seen
        cuts = statistics.quantiles(latencies, n=20, method="inclusive")
        return f"{cuts[9]:.1f}", f"{cuts[18]:.1f}"
    one = f"{latencies[0]:.1f}" if latencies else "-"
    return one, one


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print a plain-text table between blank lines: the first column left-aligned,
    the others right-aligned, at least three spaces apart."""
    lines = [list(header), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for first, *rest in lines:
        cells = (f"{cell:>{width + 3}}" for cell, width in zip(rest, widths[1:], strict=True))
        print(f"{first:<{widths[0]}}" + "".join(cells))
    print()


def endpoint_table(rows: list[tuple[str, bool, int, float | None]]) -> None:
    """Per endpoint: polls, failures, attempts, p50/p95 latency of the answered polls."""
    table = []
    for ep in ENDPOINTS:
        mine = [r for r in rows if r[0] == ep.name]
        p50, p95 = percentiles([ms for _, ok, _, ms in mine if ok and ms is not None])
        failed = sum(not ok for _, ok, _, _ in mine)
        attempts = sum(n for _, _, n, _ in mine)
        table.append((ep.name, f"{ep.interval:.1f}s", len(mine), failed, attempts, p50, p95))
    print_table(("endpoint", "every", "polls", "failed", "attempts", "p50 ms", "p95 ms"), table)


# -- the application -----------------------------------------------------------------


def start_polling(tm: TaskManager, service: Service) -> list[Periodic]:
    """Poll each endpoint on its own interval, the first time now; return the periodics."""
    return [
        tm.every(
            ep.interval,
            partial(poll, service.url(ep.name)),
            start=0,  # the first poll now, then on the interval's grid
            name=ep.name,
            group="http",  # at most limits["http"] requests in flight
            timeout=POLL_TIMEOUT,
            retries=ep.retries,
            backoff=BACKOFF,
            retry=tenacity.retry_if_exception_type(OSError),  # network errors, not our bugs
            error=f"{ep.name} is unreachable",  # the headline of its TaskError
        )
        for ep in ENDPOINTS
    ]


def watch(tm: TaskManager, log: FilteringBoundLogger, duration: float) -> None:
    """Log a status line every second for `duration` seconds, and one at the end.

    Each comes a moment after a whole second of the polls' grid, when the most
    requests are in flight (and the cap is most likely to hold some back).
    """
    begin = time.monotonic()
    for second in itertools.count(1):
        time.sleep(max(0.0, begin + min(second + 0.01, duration) - time.monotonic()))
        log_status(log, tm.stats())
        if second >= duration:
            return


def run(duration: float = DEFAULT_DURATION, db: Path | str | None = None) -> int:
    """Monitor the local service for about `duration` seconds; return the exit status.

    Polls go into the SQLite file `db` (created if needed; rows of earlier runs are
    kept and left out of the table), by default a temporary file deleted at the end.
    Blocks the calling thread. Ctrl-C ends it early, gracefully, with status 130.
    """
    log = console_logger()
    status = 0
    started = time.monotonic()
    temporary = db is None
    with contextlib.ExitStack() as cleanup:  # closed in reverse: server, then database
        if db is None:
            db = Path(cleanup.enter_context(tempfile.TemporaryDirectory())) / "polls.db"
        store = PollStore(Path(db))
        cleanup.callback(store.close)
        service = cleanup.enter_context(Service())
        tm = TaskManager(
            Config(logger=log, workers=4, server_name="demo", limits={"http": HTTP_CAP})
        )
        monitor = Monitor(tm, store, log)
        tm.add_listener(monitor.on_event, events=[TaskEventKind.SUCCEEDED, TaskEventKind.FAILED])
        planned: list[Periodic | TaskHandler[Any]] = []  # what to cancel at the end
        tm.start()
        try:
            periodics = start_polling(tm, service)
            planned += periodics
            planned.append(
                tm.delay(duration / 2, partial(report, tm, periodics, log), name="report")
            )
            at = datetime.now(UTC) + timedelta(seconds=duration * 0.6)
            planned.append(tm.schedule(at, partial(raise_cap, tm, log), name="raise cap"))
            log.info("monitoring", service=service.url(""), seconds=duration, cap_up_at=f"{at:%X}")
            watch(tm, log, duration)
        except KeyboardInterrupt:
            log.warning("interrupted, stopping")
            status = 130
        finally:
            for item in planned:
                item.cancel()  # nothing new starts (idempotent: fine if already done)
            try:
                if not tm.join(timeout=GRACE):  # polls under way, and their retries
                    log.warning("grace period over, stopping anyway")
            except KeyboardInterrupt:
                status = 130  # a second Ctrl-C: skip the grace period
            tm.stop(timeout=GRACE)
        endpoint_table(store.rows())
        log.info(
            "demo finished",
            elapsed=round(time.monotonic() - started, 2),
            status_changes=monitor.changes,
            summaries_published=monitor.published,
            db="a temporary file, deleted now" if temporary else str(db),
        )
    return status

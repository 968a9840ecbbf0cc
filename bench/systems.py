"""Child-side workloads: one function per benchmark, one branch per system.

Each function runs inside a fresh child process (see ``child.py``), measures one
system once and returns a flat dict of numbers. The loops are written out per
system, without a common wrapper, so that no system pays for an adapter call.

Systems:
- ``marionette``: `marionette.TaskManager` (4 workers unless told otherwise).
- ``threadpool``: `concurrent.futures.ThreadPoolExecutor(4)` (throughput only).
- ``sched``: the stdlib `sched.scheduler` on `time.monotonic`; one thread runs
  ``run()`` where tasks must run (idle, lateness), none where only the data
  structure is measured (delay).
- ``apscheduler``: APScheduler 3 `BackgroundScheduler`, the default memory job store,
  its thread pool executor with 4 workers, ``misfire_grace_time=None`` (a late job
  runs late rather than being skipped, as marionette's do).
- ``baseline``: a process that imports the same modules and does nothing (idle).
"""

from __future__ import annotations

import concurrent.futures
import gc
import random
import resource
import sched
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from common import (
    other_thread_switches,
    percentile,
    process_switches,
    rate_result,
    rss_bytes,
    thread_switches,
)

Result = dict[str, Any]

# Pending tasks are due at random times this far out (seconds).
FAR_LOW, FAR_HIGH = 3600.0, 7200.0


def _noop_ctx(ctx: object) -> None:
    """A marionette task: takes the context, does nothing."""


def _noop() -> None:
    """A task for the peers: no argument, does nothing."""


def _marionette(workers: int = 4, queue_size: int = 64) -> Any:
    import marionette

    tm = marionette.TaskManager(workers=workers, queue_size=queue_size)
    tm.start()
    return tm


def _apscheduler(workers: int = 4, listener: Callable[[Any], None] | None = None) -> Any:
    """A BackgroundScheduler, not started, with `listener` on finished/missed jobs."""
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(workers)},
        job_defaults={"misfire_grace_time": None},
        timezone=UTC,
    )
    if listener is not None:
        scheduler.add_listener(listener, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED)
    return scheduler


class _Countdown:
    """An APScheduler listener that sets `done` after `n` finished or missed jobs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.finished = 0
        self.missed = 0
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        from apscheduler.events import EVENT_JOB_MISSED

        if event.code == EVENT_JOB_MISSED:
            self.missed += 1
        else:
            self.finished += 1
        if self.finished + self.missed >= self.n:
            self.done.set()


# -- throughput ------------------------------------------------------------------


def throughput(system: str, n: int, workers: int = 4, queue_size: int = 64) -> Result:
    """`n` no-op tasks from one producer; seconds from the first submission until
    every task has finished. Also counts the context switches of the process per
    task: each is a thread that blocked (a full or empty queue, the GIL) or was
    preempted, so this is the cost of the hand-offs between the threads."""
    if system == "marionette":
        tm = _marionette(workers, queue_size)
        submit = tm.queue
        task = _noop_ctx
        gc.collect()
        switches = process_switches()
        start = time.perf_counter()
        last = None
        for _ in range(n):
            last = submit(task)
        finished = tm.join(timeout=600)
        elapsed = time.perf_counter() - start
        switches = process_switches() - switches
        completed = n if finished and last is not None and last.done() else -1
        tm.stop()
    elif system == "threadpool":
        pool = concurrent.futures.ThreadPoolExecutor(workers)
        # Start every worker thread before timing, as marionette's start() does.
        barrier = threading.Barrier(workers + 1)
        for _ in range(workers):
            pool.submit(barrier.wait)
        barrier.wait()
        submit_future = pool.submit
        noop = _noop
        gc.collect()
        switches = process_switches()
        start = time.perf_counter()
        for _ in range(n):
            submit_future(noop)
        pool.shutdown(wait=True)
        elapsed = time.perf_counter() - start
        switches = process_switches() - switches
        completed = n
    elif system == "apscheduler":
        countdown = _Countdown(n)
        scheduler = _apscheduler(workers, countdown)
        scheduler.start()
        add = scheduler.add_job
        noop = _noop
        gc.collect()
        switches = process_switches()
        start = time.perf_counter()
        for _ in range(n):
            add(noop)
        countdown.done.wait(600)
        elapsed = time.perf_counter() - start
        switches = process_switches() - switches
        completed = countdown.finished
        scheduler.shutdown(wait=False)
    else:
        raise ValueError(f"unknown system for throughput: {system}")
    return rate_result(n, elapsed, switches, completed)


# -- delay: insert rate, memory and cancel with many pending tasks ---------------


def delay(system: str, n: int, k_insert: int, k_cancel: int, seed: int = 1) -> Result:
    """Fill a started system with `n` tasks due 1 to 2 hours out, in random order.

    Measures the fill rate (0 to `n`), the RSS per pending task (after a full
    collection), the cost of `k_insert` more inserts at `n` pending, and of
    `k_cancel` cancels of random pending tasks. The delays (and, for APScheduler,
    the run dates) are made before the baseline RSS is read and before timing.
    """
    rng = random.Random(seed)
    delays = [rng.uniform(FAR_LOW, FAR_HIGH) for _ in range(n + k_insert)]
    victims = rng.sample(range(n), k_cancel)
    handles: list[Any] = [None] * n
    if system == "marionette":
        tm = _marionette()
        insert = tm.delay
        task = _noop_ctx
        before = rss_bytes()
        start = time.perf_counter()
        for i in range(n):
            handles[i] = insert(delays[i], task)
        fill = time.perf_counter() - start
        after = rss_bytes()
        start = time.perf_counter()
        for i in range(n, n + k_insert):
            insert(delays[i], task)
        more = time.perf_counter() - start
        start = time.perf_counter()
        for i in victims:
            handles[i].cancel()
        cancel = time.perf_counter() - start
        ok = all(handles[i].cancelled() for i in victims)
    elif system == "sched":
        scheduler = sched.scheduler(time.monotonic, time.sleep)
        enter = scheduler.enter
        noop = _noop
        before = rss_bytes()
        start = time.perf_counter()
        for i in range(n):
            handles[i] = enter(delays[i], 0, noop)
        fill = time.perf_counter() - start
        after = rss_bytes()
        start = time.perf_counter()
        for i in range(n, n + k_insert):
            enter(delays[i], 0, noop)
        more = time.perf_counter() - start
        drop = scheduler.cancel
        start = time.perf_counter()
        for i in victims:
            drop(handles[i])
        cancel = time.perf_counter() - start
        # Not `scheduler.queue`: it sorts a copy with a Python __lt__ (seconds at 1e6).
        ok = len(scheduler._queue) == n + k_insert - k_cancel  # type: ignore[attr-defined]
    elif system == "apscheduler":
        scheduler = _apscheduler()
        scheduler.start()
        base = datetime.now(UTC)
        dates = [base + timedelta(seconds=d) for d in delays]
        add = scheduler.add_job
        noop = _noop
        before = rss_bytes()
        start = time.perf_counter()
        for i in range(n):
            handles[i] = add(noop, "date", run_date=dates[i])
        fill = time.perf_counter() - start
        after = rss_bytes()
        start = time.perf_counter()
        for i in range(n, n + k_insert):
            add(noop, "date", run_date=dates[i])
        more = time.perf_counter() - start
        start = time.perf_counter()
        for i in victims:
            handles[i].remove()
        cancel = time.perf_counter() - start
        ok = len(scheduler.get_jobs()) == n + k_insert - k_cancel
        scheduler.shutdown(wait=False)
    else:
        raise ValueError(f"unknown system for delay: {system}")
    return {
        "fill_rate": n / fill,
        "insert_us": more / k_insert * 1e6,
        "bytes_per_task": (after - before) / n,
        "cancel_us": cancel / k_cancel * 1e6,
        "ok": ok,
        "n": n,
    }


# -- idle CPU --------------------------------------------------------------------


def idle(system: str, n: int, seconds: float, settle: float = 1.0, seed: int = 1) -> Result:
    """CPU time and wake-ups of the whole process over `seconds` of wall time while
    `n` tasks are pending 1 to 2 hours out (after `settle` seconds of rest)."""
    rng = random.Random(seed)
    delays = [rng.uniform(FAR_LOW, FAR_HIGH) for _ in range(n)]
    keep: Any = None
    if system == "baseline":
        keep = delays
    elif system == "marionette":
        tm = _marionette()
        keep = [tm.delay(d, _noop_ctx) for d in delays]
    elif system == "sched":
        scheduler = sched.scheduler(time.monotonic, time.sleep)
        for d in delays:
            scheduler.enter(d, 0, _noop)
        threading.Thread(target=scheduler.run, daemon=True, name="sched").start()
        keep = scheduler
    elif system == "apscheduler":
        scheduler = _apscheduler()
        base = datetime.now(UTC)
        # Added before start(), in due order, which start() then files quickly: a
        # started scheduler takes far longer to fill, and only the idle state is
        # measured here.
        for d in sorted(delays):
            scheduler.add_job(_noop, "date", run_date=base + timedelta(seconds=d))
        scheduler.start()
        keep = scheduler
    else:
        raise ValueError(f"unknown system for idle: {system}")
    time.sleep(settle)
    gc.collect()
    switches_before = thread_switches()
    cpu_before = time.process_time()
    wall_before = time.perf_counter()
    time.sleep(seconds)
    cpu_after = time.process_time()
    wall = time.perf_counter() - wall_before
    switches_after = thread_switches()
    del keep
    return {
        "cpu_ms_per_s": (cpu_after - cpu_before) * 1000 / wall,
        "wakeups_per_s": other_thread_switches(switches_before, switches_after) / wall,
        "threads": threading.active_count(),
        "n": n,
    }


# -- lateness --------------------------------------------------------------------


def lateness(
    system: str, n: int, spread: float, lead: float, grace: float = 10.0, seed: int = 1
) -> Result:
    """`n` no-op tasks due at random times spread over `spread` seconds, starting
    `lead` seconds after the first submission, on a started system with free
    workers. Each task records how late it ran (now minus its due time)."""
    rng = random.Random(seed)
    offsets = [lead + rng.uniform(0.0, spread) for _ in range(n)]
    late: list[float] = []
    record = late.append
    timeout = lead + spread + grace
    preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    if system == "marionette":
        tm = _marionette()
        base = time.monotonic()

        def task_for(due: float) -> Callable[[object], None]:
            def task(ctx: object) -> None:
                record(time.monotonic() - due)

            return task

        for offset in offsets:
            due = base + offset
            tm.delay(due - time.monotonic(), task_for(due))
        submitted = time.monotonic() - base
        tm.join(timeout=timeout)
        tm.stop()
    elif system == "sched":
        scheduler = sched.scheduler(time.monotonic, time.sleep)
        base = time.monotonic()

        def action(due: float) -> None:
            record(time.monotonic() - due)

        for offset in offsets:
            scheduler.enterabs(base + offset, 0, action, (base + offset,))
        submitted = time.monotonic() - base
        thread = threading.Thread(target=scheduler.run, daemon=True, name="sched")
        thread.start()
        thread.join(timeout)
    elif system == "apscheduler":
        countdown = _Countdown(n)
        scheduler = _apscheduler(listener=countdown)
        base_wall = time.time()
        base = time.monotonic()

        def job(due: float) -> None:
            record(time.time() - due)

        # Added before start(): a started APScheduler takes longer than `lead` to
        # take 10,000 jobs. A run date is a datetime (microseconds), so the due time
        # is that datetime's own timestamp.
        for offset in offsets:
            run_date = datetime.fromtimestamp(base_wall + offset, UTC)
            scheduler.add_job(job, "date", run_date=run_date, args=(run_date.timestamp(),))
        scheduler.start()
        submitted = time.monotonic() - base
        countdown.done.wait(timeout)
        scheduler.shutdown(wait=False)
    else:
        raise ValueError(f"unknown system for lateness: {system}")
    preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted
    ordered = sorted(late)
    if not ordered:
        ordered = [float("nan")]
    return {
        "p50_ms": percentile(ordered, 0.50) * 1e3,
        "p99_ms": percentile(ordered, 0.99) * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "early": sum(1 for x in late if x < 0),
        "lost": n - len(late),
        "submit_s": submitted,
        # Preemptions of the process's threads (all of them, ended ones included):
        # a sign of other processes competing for the cores.
        "preempted": preempted,
        "n": n,
    }

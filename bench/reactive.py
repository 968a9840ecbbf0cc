"""Child-side workloads of the reactive-scheduling issue: periodics and group limits.

Each function runs inside a fresh child process (see ``child.py``), measures one
system once and returns a flat dict of numbers.

- `periodic`: `n` periodic tasks at `interval` seconds on 4 workers, for `seconds`
  seconds of wall time. Each run records how late it started against the grid
  ``g0 + k * interval`` of its periodic, where ``g0`` is the periodic's first
  planned time; the scheduler thread's CPU time (per thread, from psutil, matched
  on the thread's native id) and the process's CPU time are sampled at the two ends
  of the window. marionette: ``tm.every(interval, task, start=...)``; APScheduler 3:
  a ``BackgroundScheduler`` with ``n`` interval jobs, its defaults for jobs
  (``misfire_grace_time=1``, ``coalesce=True``, ``max_instances=1``) and a
  ``ThreadPoolExecutor(4)`` as the default executor.
- `groups`: no-op throughput with ``group="g"`` and ``Config(limits={"g": limit})``,
  or without a group, from one producer on 4 workers.
"""

from __future__ import annotations

import gc
import heapq
import math
import resource
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
from common import percentile, process_switches, rate_result, thread_switches

Result = dict[str, Any]

_PROCESS = psutil.Process()


def _thread_cpu(native_id: int | None) -> float:
    """CPU seconds (user + system) of one thread of this process, by native id.

    psutil reads ``/proc/self/task/<tid>/stat``: clock ticks, 10 ms on Linux.
    """
    if native_id is None:
        return float("nan")
    for thread in _PROCESS.threads():
        if thread.id == native_id:
            return float(thread.user_time + thread.system_time)
    return float("nan")


def _native_id(name: str) -> int | None:
    for thread in threading.enumerate():
        if thread.name == name:
            return thread.native_id
    return None


class _Probe:
    """One periodic's task: records how late each run starts against its grid.

    ``g0`` (the first planned time, on ``clock``) is set once the periodic exists.
    A run at time ``t`` is attributed to occurrence ``k = floor((t - g0) / interval)``
    and is ``t - g0 - k * interval`` late: exact as long as a run is less than one
    interval late. A run later than that is attributed to a later occurrence, which
    then shows up twice (counted as ``misattributed``).
    """

    __slots__ = ("clock", "counted", "g0", "index", "interval", "late", "seen", "slots")

    def __init__(
        self,
        index: int,
        interval: float,
        counted: int,
        slots: int,
        seen: bytearray,
        late: list[float],
        clock: Any,
    ) -> None:
        self.index = index
        self.interval = interval
        self.counted = counted
        self.slots = slots
        self.seen = seen
        self.late = late
        self.clock = clock
        self.g0 = math.inf

    def __call__(self, ctx: object = None) -> None:
        elapsed = self.clock() - self.g0
        k = int(elapsed // self.interval)
        if 0 <= k < self.slots:
            cell = self.index * self.slots + k
            if self.seen[cell] < 255:
                self.seen[cell] += 1
            if k < self.counted:
                self.late.append(elapsed - k * self.interval)


def _summary(
    late: list[float], seen: bytearray, n: int, slots: int, occurrences: int
) -> dict[str, Any]:
    """Lateness of the runs of the first `occurrences` occurrences; runs lost."""
    counted = sorted(late) or [float("nan")]
    ran = 0
    twice = 0
    for i in range(n):
        base = i * slots
        for k in range(occurrences):
            c = seen[base + k]
            if c:
                ran += 1
                twice += c - 1
    expected = n * occurrences
    return {
        "p50_ms": percentile(counted, 0.50) * 1e3,
        "p99_ms": percentile(counted, 0.99) * 1e3,
        "max_ms": counted[-1] * 1e3,
        "expected": expected,
        "ran": ran,
        "lost": expected - ran,
        "misattributed": twice,
    }


def periodic(
    system: str,
    n: int,
    interval: float = 1.0,
    seconds: float = 10.0,
    aligned: bool = False,
    lead: float = 3.0,
    grace: float = 1.5,
    workers: int = 4,
) -> Result:
    """`n` periodics every `interval` s for a window of `seconds` s on `workers` workers.

    The first runs are due `lead` s after the first submission: spread evenly over
    one interval (``aligned=False``), or all at the same instant (``aligned=True``,
    a burst of `n` runs every interval). The window is the `seconds` s from the first
    due time; the occurrences in it are the ones expected (``n * seconds /
    interval``). After the window, `grace` s more let late runs of those occurrences
    finish before the system is stopped.
    """
    occurrences = round(seconds / interval)
    slots = occurrences + 2 + math.ceil(grace / interval)
    seen = bytearray(n * slots)
    late: list[float] = []
    offsets = [0.0 if aligned else i * interval / n for i in range(n)]
    submit_began = time.monotonic()
    wall_base = time.time() + lead
    base = time.monotonic() + lead
    probes = [_Probe(i, interval, occurrences, slots, seen, late, time.monotonic) for i in range(n)]
    extra: dict[str, Any] = {}
    if system == "marionette":
        import marionette

        tm = marionette.TaskManager(workers=workers)
        tm.start()
        base_dt = datetime.fromtimestamp(wall_base, UTC)
        periodics = []
        for probe, offset in zip(probes, offsets, strict=True):
            p = tm.every(interval, probe, start=base_dt + timedelta(seconds=offset))
            # The first planned time, on the monotonic clock (a private field: the
            # public `next_run` is a datetime, converted through two clock reads).
            probe.g0 = p._grid
            periodics.append(p)
        scheduler_thread = _native_id("marionette-scheduler")
    elif system == "apscheduler":
        from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        counts = {"missed": 0, "max_instances": 0}

        def listener(event: Any) -> None:
            if event.code == EVENT_JOB_MISSED:
                counts["missed"] += 1
            else:
                counts["max_instances"] += 1

        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(workers)}, timezone=UTC
        )
        scheduler.add_listener(listener, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        for probe, offset in zip(probes, offsets, strict=True):
            start_date = datetime.fromtimestamp(wall_base + offset, UTC)
            # APScheduler plans on the wall clock, from start_date: the grid is that.
            probe.clock = time.time
            probe.g0 = start_date.timestamp()
            scheduler.add_job(probe, "interval", seconds=interval, start_date=start_date)
        scheduler.start()  # jobs added before start(): a started one fills slowly
        scheduler_thread = _native_id("APScheduler")
    elif system == "floor":
        # The floor: one bare thread with a heap of due times sleeps on a Condition
        # until the earliest, runs every due probe inline (no hand-off to a
        # worker) and pushes its next grid point. What any "never early" timer
        # thread pays to wake up at each distinct due time, and no more.
        heap = [(base + offset, i) for i, offset in enumerate(offsets)]
        heapq.heapify(heap)
        for probe, offset in zip(probes, offsets, strict=True):
            probe.g0 = base + offset
        wakeup = threading.Condition(threading.Lock())
        halt = threading.Event()

        def timer() -> None:
            with wakeup:
                while not halt.is_set():
                    now = time.monotonic()
                    while heap[0][0] <= now:
                        due, i = heap[0]
                        probes[i]()
                        heapq.heapreplace(heap, (due + interval, i))
                    wakeup.wait(heap[0][0] - now)

        thread = threading.Thread(target=timer, daemon=True, name="floor")
        thread.start()
        scheduler_thread = thread.native_id
    else:
        raise ValueError(f"unknown system for periodic: {system}")
    submitted = time.monotonic() - submit_began
    gc.collect()
    # The window: from the first due time, `seconds` long.
    time.sleep(max(0.0, base - time.monotonic()))
    cpu0, sched0, wall0 = time.process_time(), _thread_cpu(scheduler_thread), time.monotonic()
    woken0 = thread_switches().get(scheduler_thread or -1, 0)
    preempted0 = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    time.sleep(max(0.0, base + seconds - time.monotonic()))
    cpu1, sched1, wall1 = time.process_time(), _thread_cpu(scheduler_thread), time.monotonic()
    woken = thread_switches().get(scheduler_thread or -1, 0) - woken0
    preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted0
    time.sleep(grace)
    wall = wall1 - wall0
    if system == "marionette":
        stats = tm.stats()
        extra = {
            "coalesced": stats.coalesced,
            "coalesced_periodics": sum(p.coalesced for p in periodics),
            "runs_started": sum(p.runs for p in periodics),
            "missed": 0,
            "max_instances": 0,
        }
        tm.stop(timeout=5.0)
    elif system == "floor":
        halt.set()
        extra = {"coalesced": None, "runs_started": None, "missed": 0, "max_instances": 0}
    else:
        extra = {
            "coalesced": None,
            "runs_started": None,
            "missed": counts["missed"],
            "max_instances": counts["max_instances"],
        }
        scheduler.shutdown(wait=False)
    return {
        **_summary(list(late), seen, n, slots, occurrences),
        **extra,
        "scheduler_cpu_share": (sched1 - sched0) / wall,
        "process_cpu_share": (cpu1 - cpu0) / wall,
        # Voluntary context switches of the scheduler thread: each time it blocked,
        # sleeping until a due time or waiting for a lock (or the GIL).
        "scheduler_wakeups_per_s": woken / wall,
        "window_s": wall,
        "submit_s": submitted,
        "preempted": preempted,
        "n": n,
    }


def wakeup(timeout: float, n: int = 2000) -> Result:
    """What one timed sleep costs this machine: a fresh thread sleeps `n` times on a
    `Condition` with `timeout` (nobody notifies it) and measures its own CPU time.

    ``python bench/child.py wakeup '{"timeout": 0.0001}'``: the floor under any
    timer thread that wakes once per distinct due time.
    """
    out: Result = {}

    def sleeper() -> None:
        condition = threading.Condition(threading.Lock())
        cpu, wall = time.thread_time(), time.monotonic()
        with condition:
            for _ in range(n):
                condition.wait(timeout)
        out["cpu_us_per_wait"] = (time.thread_time() - cpu) / n * 1e6
        out["wall_us_per_wait"] = (time.monotonic() - wall) / n * 1e6

    thread = threading.Thread(target=sleeper, name="sleeper")
    thread.start()
    thread.join()
    return {**out, "timeout_us": timeout * 1e6, "n": n}


# -- groups ------------------------------------------------------------------------


def _noop_ctx(ctx: object) -> None:
    """A marionette task: takes the context, does nothing."""


def groups(
    n: int, limit: int | None, named: bool = False, workers: int = 4, queue_size: int = 64
) -> Result:
    """`n` no-op tasks from one producer, with ``group="g"`` limited to `limit`, or
    without a group (`limit` None); seconds from the first submission until every
    task has finished, and the context switches of the process per task.

    With `named` (and no group) each submission passes ``name="noop"``: the same
    option-parsing path as ``group=`` without a gate, to tell the two costs apart.
    """
    import marionette

    opts: dict[str, Any] = {}
    if limit is None:
        tm = marionette.TaskManager(workers=workers, queue_size=queue_size)
        if named:
            opts = {"name": "noop"}
    else:
        tm = marionette.TaskManager(workers=workers, queue_size=queue_size, limits={"g": limit})
        opts = {"group": "g"}
    tm.start()
    submit = tm.queue
    task = _noop_ctx
    gc.collect()
    switches = process_switches()
    start = time.perf_counter()
    last = None
    if opts:
        for _ in range(n):
            last = submit(task, **opts)
    else:
        for _ in range(n):
            last = submit(task)
    finished = tm.join(timeout=600)
    elapsed = time.perf_counter() - start
    switches = process_switches() - switches
    stats = tm.stats()
    completed = stats.succeeded if finished and last is not None and last.done() else -1
    tm.stop()
    return rate_result(n, elapsed, switches, completed)

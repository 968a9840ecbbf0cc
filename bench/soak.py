"""Reliability soak: ``python bench/soak.py [--tasks N]`` (default 1,000,000).

Four producer threads submit N tasks to one `TaskManager` (4 workers), mixing
``queue``, ``delay`` and ``schedule`` (some due in the past), and cancel about one
task in ten a little while after submitting it. About one task in ten follows a
failure plan: it fails on its attempts 1..k, k drawn by a seeded RNG from
1..retries+1 (k = retries+1 means it fails for good); retries use a small fixed
backoff. Then it checks, and prints:

- every handler settled exactly once (one done callback per task) in the state its
  plan and its cancel() result allow, and every task ran the expected number of
  times, never two attempts at once, ``ctx.attempt`` counting its runs;
- `stats()`, the listener's tally of final events and the count of "failed for
  good" log records agree with the per-task tallies;
- after `stop()`, the thread count is back to the baseline and, once the manager
  and every handler are dropped and collected, so is the memory traced by
  `tracemalloc` (within `MEMORY_TOLERANCE`).

It exits non-zero if any check fails. `run_soak` is the importable core; the test
suite runs it with 20,000 tasks (``tests/test_soak.py``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import logging
import os
import random
import sys
import threading
import time
import tracemalloc
from array import array
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import marionette
from marionette import TaskError, TaskEventKind, TaskHandler, TaskManager, TaskState

#: How far traced memory may stay above its baseline once everything is dropped.
#: The baseline is taken after a warm-up run of the same mix, so one-time caches
#: (imports, logging and structlog caches, tenacity, datetime) are already in it.
#: What is left is bounded and does not grow with the task count: measured, 16 KiB
#: at 2,000 tasks and 27-28 KiB at 20,000, 60,000 and 1,000,000, nearly all of it
#: blocks that tracemalloc attributes to ``datetime.utcoffset()`` (called by
#: schedule()'s check of its datetime) and that CPython keeps for reuse. A leak of
#: one small object per task is far larger: at 20,000 tasks, 64 KiB is 3.3 B per
#: task, while the smallest object that could leak (an int, a float) is 24-28 B and
#: a handler over 100 B. So 64 KiB tells "no leak" from a per-task leak that hits
#: more than about one task in ten at the test's size, and from any per-task leak
#: hitting more than a few thousand tasks at 1,000,000.
MEMORY_TOLERANCE = 64 * 1024

#: The share of the cancelled tasks that are slow (see `Plan`), and their wait.
SLOW_SHARE = 0.3
SLOW_WAIT = 0.002

#: How long to wait for threads to be gone after stop() (they may be on their way out).
THREAD_GRACE = 10.0

QUEUE, DELAY, SCHEDULE = 0, 1, 2
NOT_CANCELLED, CANCEL_TRUE, CANCEL_FALSE = 0, 1, 2
_STATE_CODES = {TaskState.SUCCEEDED: 1, TaskState.FAILED: 2, TaskState.CANCELLED: 3}
_CODE_NAMES = {0: "unsettled", 1: "SUCCEEDED", 2: "FAILED", 3: "CANCELLED"}
_FINAL_EVENTS = (TaskEventKind.SUCCEEDED, TaskEventKind.FAILED, TaskEventKind.CANCELLED)


class PlannedFailure(Exception):
    """What a task raises on the attempts its failure plan says fail."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each task number does, drawn once from a seeded RNG.

    `kind`: queue, delay or schedule; `fails`: k, the task fails on attempts 1..k
    (0: never fails; ``retries + 1``: fails for good); `cancel`: 1 if a producer
    cancels it after submitting it; `slow`: 1 if each attempt first waits
    `SLOW_WAIT` on its context and then raises if the context was cancelled (a
    cooperative task, so that some cancels find it running).
    """

    tasks: int
    retries: int
    kind: bytearray
    fails: bytearray
    cancel: bytearray
    slow: bytearray

    @classmethod
    def draw(
        cls, tasks: int, retries: int, seed: int, failure_rate: float, cancel_rate: float
    ) -> Plan:
        rng = random.Random(seed)
        kind, fails, cancel = bytearray(tasks), bytearray(tasks), bytearray(tasks)
        slow = bytearray(tasks)
        roll, below = rng.random, rng.randint
        for i in range(tasks):
            r = roll()
            kind[i] = QUEUE if r < 0.5 else DELAY if r < 0.8 else SCHEDULE
            if roll() < failure_rate:
                fails[i] = below(1, retries + 1)
            if roll() < cancel_rate:
                cancel[i] = 1
                if roll() < SLOW_SHARE:
                    slow[i] = 1
        return cls(tasks, retries, kind, fails, cancel, slow)


class Tally:
    """Per task number: runs, settlements, final state, cancel() result.

    `runs`, `running` and `anomalies` change under `lock` (tasks run on 4 workers);
    the settlement arrays under `lock` too (callbacks run in workers and producers).
    """

    def __init__(self, tasks: int) -> None:
        self.lock = threading.Lock()
        self.runs = array("H", bytes(2 * tasks))
        self.running = bytearray(tasks)
        self.settled = bytearray(tasks)
        self.state = bytearray(tasks)
        self.cancelled = bytearray(tasks)
        self.anomalies: list[str] = []


class SoakTask:
    """Task number `i`: counts its run, then fails if its plan says so."""

    __slots__ = ("fails", "i", "retries", "slow", "tally")

    def __init__(self, i: int, tally: Tally, fails: int, retries: int, slow: bool) -> None:
        self.i = i
        self.tally = tally
        self.fails = fails
        self.retries = retries
        self.slow = slow

    def __call__(self, ctx: marionette.Context) -> int:
        tally, i = self.tally, self.i
        with tally.lock:
            if tally.running[i]:
                tally.anomalies.append(f"task {i}: two attempts at once")
            tally.running[i] = 1
            run = tally.runs[i] = tally.runs[i] + 1
        try:
            if ctx.attempt != run:
                with tally.lock:
                    tally.anomalies.append(f"task {i}: ctx.attempt {ctx.attempt} on run {run}")
            if self.slow:
                ctx.wait(SLOW_WAIT)
                ctx.check()  # raises Cancelled if cancel() found it running
            if run <= self.fails:
                raise PlannedFailure(f"task {i}, attempt {run}")
            return i
        finally:
            with tally.lock:
                tally.running[i] = 0

    def settled(self, handler: TaskHandler) -> None:
        """The done callback: count the settlement, check the final value."""
        tally, i = self.tally, self.i
        state = handler.state
        problem = None
        if state is TaskState.SUCCEEDED and handler.result(0) != i:
            problem = f"task {i}: result {handler.result(0)!r}"
        elif state is TaskState.FAILED:
            error = handler.exception(0)
            if not isinstance(error, TaskError) or error.attempts != self.retries + 1:
                problem = f"task {i}: failed with {error!r}"
        with tally.lock:
            tally.settled[i] += 1
            tally.state[i] = _STATE_CODES.get(state, 0)
            if problem is not None:
                tally.anomalies.append(problem)


class _Counter(logging.Handler):
    """Counts log records by message head (the event), at ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        head = "task failed for good" if message.startswith("task failed for good") else message
        self.counts[head.split("\n", 1)[0][:60]] += 1


@dataclasses.dataclass
class SoakResult:
    """The figures of one soak run and the checks that failed (none: it passed)."""

    tasks: int
    producers: int
    workers: int
    retries: int
    seconds: float = 0.0
    submit_seconds: float = 0.0
    stop_seconds: float = 0.0
    verify_seconds: float = 0.0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    cancels: dict[str, int] = dataclasses.field(default_factory=dict)
    runs_total: int = 0
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    traced: bool = True  # whether tracemalloc traced the run (and memory was checked)
    traced_baseline: int = 0
    traced_peak: int = 0
    traced_after: int = 0
    threads_before: int = 0
    threads_running: int = 0
    threads_after: int = 0
    os_threads_before: int = 0
    os_threads_after: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    memory_top: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds else 0.0

    def lines(self) -> Iterator[str]:
        mib = 1024 * 1024
        yield (
            f"tasks: {self.tasks:,} from {self.producers} producers on {self.workers} workers,"
            f" retries={self.retries}"
        )
        yield (
            f"time: {self.seconds:.1f} s to idle ({self.rate:,.0f} tasks/s; submitting took"
            f" {self.submit_seconds:.1f} s), stop() {self.stop_seconds * 1e3:.0f} ms,"
            f" checks {self.verify_seconds:.1f} s"
        )
        yield "outcomes: " + ", ".join(f"{k} {v:,}" for k, v in self.outcomes.items())
        yield "cancel(): " + ", ".join(f"{k} {v:,}" for k, v in self.cancels.items())
        yield f"runs: {self.runs_total:,} attempts in all"
        yield "stats(): " + ", ".join(f"{k}={v:,}" for k, v in self.stats.items())
        growth = self.traced_peak - self.traced_baseline
        if not self.traced:
            yield "traced memory: not measured (run without tracemalloc)"
        else:
            yield (
                f"traced memory: baseline {self.traced_baseline / mib:.2f} MiB, peak"
                f" {self.traced_peak / mib:.1f} MiB (+{growth / mib:.1f} MiB), after stop() and"
                f" collection {self.traced_after / mib:.2f} MiB"
                f" ({self.traced_after - self.traced_baseline:+,} B; tolerance"
                f" {MEMORY_TOLERANCE:,} B)"
            )
        yield (
            f"threads: {self.threads_before} before, {self.threads_running} while running,"
            f" {self.threads_after} after stop() (OS threads {self.os_threads_before}"
            f" -> {self.os_threads_after})"
        )
        if self.failures:
            yield f"FAILED: {len(self.failures)} check(s)"
            for failure in self.failures[:20]:
                yield f"  - {failure}"
        else:
            yield "every check passed"


def _os_threads() -> int:
    """Threads of this process as the OS sees them (Linux), else Python's count."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _produce(
    tm: TaskManager,
    plan: Plan,
    tally: Tally,
    first: int,
    step: int,
    seed: int,
    max_delay: float,
    backoff: float,
    errors: list[BaseException],
) -> None:
    """Submit tasks first, first + step, ...; cancel the marked ones 0 to 8 submissions later."""
    try:
        rng = random.Random(seed)
        uniform, randint = rng.uniform, rng.randint
        retries = plan.retries
        opts: dict[str, Any] = {"retries": retries, "backoff": backoff}
        to_cancel: collections.deque[tuple[int, TaskHandler]] = collections.deque()
        lag = randint(0, 8)
        for i in range(first, plan.tasks, step):
            task = SoakTask(i, tally, plan.fails[i], retries, bool(plan.slow[i]))
            kind = plan.kind[i]
            if kind == QUEUE:
                handler = tm.queue(task, **opts)
            elif kind == DELAY:
                handler = tm.delay(uniform(-0.005, max_delay), task, **opts)
            else:
                at = datetime.now(UTC) + timedelta(seconds=uniform(-0.005, max_delay))
                handler = tm.schedule(at, task, **opts)
            handler.add_done_callback(task.settled)
            if plan.cancel[i]:
                to_cancel.append((i, handler))
            while len(to_cancel) > lag:  # cancel after `lag` more submissions
                j, victim = to_cancel.popleft()
                tally.cancelled[j] = CANCEL_TRUE if victim.cancel() else CANCEL_FALSE
                lag = randint(0, 8)
        while to_cancel:
            j, victim = to_cancel.popleft()
            tally.cancelled[j] = CANCEL_TRUE if victim.cancel() else CANCEL_FALSE
    except BaseException as exc:  # reported as a failed check
        errors.append(exc)


def _verify(plan: Plan, tally: Tally, result: SoakResult) -> None:
    """Per task: settled once, in a state its plan and its cancel() allow, with the
    expected number of runs. Fills the outcome tallies of `result`."""
    failures = result.failures
    retries = plan.retries
    outcomes: collections.Counter[str] = collections.Counter()
    cancels: collections.Counter[str] = collections.Counter()
    runs_total = 0
    bad = 0
    for i in range(plan.tasks):
        k, runs, state = plan.fails[i], tally.runs[i], tally.state[i]
        settled, cancel = tally.settled[i], tally.cancelled[i]
        runs_total += runs
        outcomes[_CODE_NAMES[state]] += 1
        cancels[("not cancelled", "cancel() True", "cancel() False")[cancel]] += 1
        if cancel == CANCEL_FALSE and state == 3:
            cancels["of which found running and ended CANCELLED"] += 1
        succeeds = k <= retries  # the plan lets some attempt succeed
        full = k + 1 if succeeds else retries + 1  # runs when it is not cancelled
        if cancel == NOT_CANCELLED:
            ok = runs == full and state == (1 if succeeds else 2)
        elif cancel == CANCEL_TRUE:
            # Removed while queued, delayed or waiting for a retry: only failed
            # attempts can have run, and it ends cancelled.
            ok = state == 3 and runs <= min(k, retries)
        elif state == 3:
            # cancel() False: it was running and that attempt raised: a planned
            # failure, or (a slow task) the context's Cancelled.
            ok = 1 <= runs <= min(k + plan.slow[i], retries + 1)
        else:  # cancel() False: it finished (or its running attempt completed anyway)
            ok = runs == full and state == (1 if succeeds else 2)
        if settled != 1 or not ok:
            bad += 1
            if bad <= 10:
                failures.append(
                    f"task {i}: settled {settled} times, {_CODE_NAMES[state]} after {runs} runs"
                    f" (plan: fails {k} of {retries + 1} attempts, cancel result {cancel})"
                )
    if bad > 10:
        failures.append(f"... {bad} tasks in all failed the per-task check")
    result.outcomes = dict(outcomes)
    result.cancels = dict(cancels)
    result.runs_total = runs_total


def _retried_bounds(plan: Plan, tally: Tally) -> tuple[int, int]:
    """The range `stats().retried` must fall in: exact for tasks not cancelled;
    a cancelled task's last failed attempt may or may not have been retried."""
    low = high = 0
    retries = plan.retries
    for i in range(plan.tasks):
        k, runs, state = plan.fails[i], tally.runs[i], tally.state[i]
        if state == 3:
            low += max(runs - 1, 0)
            high += runs
        else:
            retried = min(k, retries)
            low += retried
            high += retried
    return low, high


def _warm_up(logger: logging.Logger, seed: int) -> None:
    """One small run of the same mix, so one-time caches are in the baseline."""
    plan = Plan.draw(400, 2, seed, 0.2, 0.2)
    tally = Tally(plan.tasks)
    errors: list[BaseException] = []
    tm = TaskManager(workers=2, logger=logger, server_name="soak-warm-up")
    tm.start()
    remove = tm.add_listener(lambda event: None, events=_FINAL_EVENTS)
    try:
        _produce(tm, plan, tally, 0, 1, seed, 0.005, 0.001, errors)
        tm.join(timeout=30)
    finally:
        remove()
        tm.stop(timeout=30)


def run_soak(
    tasks: int = 20_000,
    *,
    producers: int = 4,
    workers: int = 4,
    retries: int = 3,
    backoff: float = 0.001,
    failure_rate: float = 0.1,
    cancel_rate: float = 0.1,
    max_delay: float = 0.05,
    seed: int = 20261122,
    timeout: float = 600.0,
    progress: Callable[[str], object] | None = None,
    memory_top: int = 0,
    trace_memory: bool = True,
) -> SoakResult:
    """Run the soak with `tasks` tasks; the result lists every check that failed.

    `timeout` bounds the wait for the manager to go idle (a hang is a failed check,
    not a hung process). `progress` receives a line at each phase. With
    `memory_top`, `result.memory_top` lists the source lines whose traced memory
    grew most between the baseline and the end (for hunting a leak). Without
    `trace_memory`, tracemalloc stays off (it slows the run about 5 times) and the
    memory check is skipped.
    """
    say = progress or (lambda line: None)
    result = SoakResult(tasks=tasks, producers=producers, workers=workers, retries=retries)
    failures = result.failures
    plan = Plan.draw(tasks, retries, seed, failure_rate, cancel_rate)
    tally = Tally(tasks)
    logger = logging.getLogger("marionette.soak")
    logger.propagate = False  # counted here, never printed
    logger.setLevel(logging.ERROR)  # retry warnings are filtered out at no cost
    counter = _Counter()
    logger.addHandler(counter)
    result.traced = trace_memory
    tracing = tracemalloc.is_tracing()
    if trace_memory and not tracing:
        tracemalloc.start()
    try:
        say("warming up")
        threads_at_first = threading.active_count()
        _warm_up(logger, seed)
        deadline = time.monotonic() + THREAD_GRACE
        while threading.active_count() > threads_at_first and time.monotonic() < deadline:
            time.sleep(0.01)  # the warm-up's threads on their way out
        counter.counts.clear()
        final_events: collections.Counter[TaskEventKind] = collections.Counter()
        errors: list[BaseException] = []
        gc.collect()
        result.threads_before = threading.active_count()
        result.os_threads_before = _os_threads()
        before = None
        if trace_memory:
            result.traced_baseline = tracemalloc.get_traced_memory()[0]
            before = tracemalloc.take_snapshot() if memory_top else None
            tracemalloc.reset_peak()

        say(f"running {tasks:,} tasks")
        tm = TaskManager(workers=workers, logger=logger, server_name="soak")
        tm.start()

        def count(event: marionette.TaskEvent) -> None:  # runs on the listener thread only
            final_events[event.kind] += 1

        tm.add_listener(count, events=_FINAL_EVENTS)
        threads = [
            threading.Thread(
                target=_produce,
                args=(tm, plan, tally, p, producers, seed + 1 + p, max_delay, backoff, errors),
                name=f"soak-producer-{p}",
            )
            for p in range(producers)
        ]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        result.threads_running = threading.active_count()
        for thread in threads:
            thread.join()
        result.submit_seconds = time.perf_counter() - began
        idle = tm.join(timeout=timeout)
        result.seconds = time.perf_counter() - began
        if not idle:
            failures.append(f"the manager was not idle {timeout:.0f} s after the last submission")
        stats = tm.stats()
        began = time.perf_counter()
        tm.stop(timeout=timeout)
        result.stop_seconds = time.perf_counter() - began
        for exc in errors:
            failures.append(f"a producer raised {exc!r}")

        say("checking")
        began = time.perf_counter()
        failures.extend(tally.anomalies[:10])
        if len(tally.anomalies) > 10:
            failures.append(f"... {len(tally.anomalies)} anomalies in all")
        _verify(plan, tally, result)
        outcomes = result.outcomes
        result.stats = {
            name: getattr(stats, name)
            for name in ("submitted", "succeeded", "failed", "cancelled", "retried")
        }
        expected = {
            "submitted": tasks,
            "succeeded": outcomes.get("SUCCEEDED", 0),
            "failed": outcomes.get("FAILED", 0),
            "cancelled": outcomes.get("CANCELLED", 0),
        }
        for name, want in expected.items():
            if result.stats[name] != want:
                failures.append(f"stats().{name} is {result.stats[name]:,}, expected {want:,}")
        for name in ("queued", "scheduled", "running"):
            if getattr(stats, name):
                failures.append(f"stats().{name} is {getattr(stats, name)} once idle")
        low, high = _retried_bounds(plan, tally)
        if not low <= stats.retried <= high:
            failures.append(f"stats().retried is {stats.retried:,}, expected {low:,}..{high:,}")
        for kind, name in zip(_FINAL_EVENTS, ("succeeded", "failed", "cancelled"), strict=True):
            if final_events[kind] != expected[name]:
                failures.append(
                    f"the listener saw {final_events[kind]:,} {kind.name} events,"
                    f" expected {expected[name]:,}"
                )
        logged = dict(counter.counts)
        if logged.pop("task failed for good", 0) != expected["failed"]:
            failures.append(
                f"'task failed for good' was logged {counter.counts['task failed for good']:,}"
                f" times for {expected['failed']:,} failed tasks"
            )
        if logged:
            failures.append(f"unexpected error log records: {logged}")

        # Threads: stop() joined the workers; give any thread on its way out a moment.
        deadline = time.monotonic() + THREAD_GRACE
        while threading.active_count() > result.threads_before and time.monotonic() < deadline:
            time.sleep(0.01)
        result.threads_after = threading.active_count()
        result.os_threads_after = _os_threads()
        if result.threads_after != result.threads_before:
            failures.append(
                f"threads: {result.threads_after} after stop(), {result.threads_before} before"
                f" ({[t.name for t in threading.enumerate()]})"
            )
        if result.os_threads_after != result.os_threads_before:
            failures.append(
                f"OS threads: {result.os_threads_after} after stop(),"
                f" {result.os_threads_before} before"
            )

        # Memory: drop the manager and everything that refers to handlers.
        del tm, threads, count, stats
        errors.clear()
        gc.collect()
        if trace_memory:
            result.traced_after, result.traced_peak = tracemalloc.get_traced_memory()
        if before is not None:
            grown = tracemalloc.take_snapshot().compare_to(before, "lineno")
            result.memory_top = [str(stat) for stat in grown[:memory_top]]
        growth = result.traced_after - result.traced_baseline
        if trace_memory and growth > MEMORY_TOLERANCE:
            failures.append(
                f"traced memory is {growth:,} B above its baseline after stop() and a"
                f" collection (tolerance {MEMORY_TOLERANCE:,} B)"
            )
        result.verify_seconds = time.perf_counter() - began
    finally:
        logger.removeHandler(counter)
        if not tracing:
            tracemalloc.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000, help="default: 1,000,000")
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument(
        "--no-tracemalloc",
        action="store_true",
        help="leave tracemalloc off (about 5 times faster) and skip the memory check",
    )
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.producers < 1 or args.workers < 1 or not 0 <= args.retries < 255:
        parser.error("--tasks, --producers and --workers must be >= 1, --retries 0..254")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    def progress(line: str) -> None:
        print(f"  {line}...", file=sys.stderr, flush=True)

    result = run_soak(
        args.tasks,
        producers=args.producers,
        workers=args.workers,
        retries=args.retries,
        seed=args.seed,
        progress=progress,
        trace_memory=not args.no_tracemalloc,
    )
    for line in result.lines():
        print(line)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())

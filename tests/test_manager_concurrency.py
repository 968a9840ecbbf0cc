"""TaskManager under contention: many producers, cancel racing dispatch, stop racing submit."""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import WAIT
from helpers import Threads

from marionette import (
    Context,
    QueueFull,
    TaskHandler,
    TaskManager,
    TaskManagerStopped,
    TaskState,
)

#: A stress test moves thousands of tasks: allow more than one WAIT, still a guard only.
LONG = 6 * WAIT


class Tally:
    """Counts calls per key under a lock, and notices two runs of one key at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: collections.Counter[Any] = collections.Counter()
        self.active: set[Any] = set()
        self.overlaps: list[Any] = []

    def task(self, key: Any, fail_first: bool = False) -> Callable[[Context], Any]:
        def run(ctx: Context) -> Any:
            with self.lock:
                if key in self.active:
                    self.overlaps.append(key)
                self.active.add(key)
                self.runs[key] += 1
            with self.lock:
                self.active.discard(key)
            if fail_first and ctx.attempt == 1:
                raise OSError("first attempt fails")
            return key

        return run


def test_many_producers_every_task_runs_and_settles_exactly_once() -> None:
    """8 producers x 2,000 tasks: each runs once, settles once, and join() is True."""
    producers, per_producer = 8, 2_000
    tally = Tally()
    settled: collections.Counter[int] = collections.Counter()
    handlers: list[TaskHandler] = []
    lock = threading.Lock()
    go = threading.Barrier(producers)

    def on_done(handler: TaskHandler) -> None:
        with lock:
            settled[handler.id] += 1

    manager = TaskManager(workers=4, queue_size=8)
    manager.start()
    try:

        def produce(p: int) -> None:
            go.wait(WAIT)
            mine: list[TaskHandler] = []
            for i in range(per_producer):
                key = (p, i)
                if i % 2:
                    handler = manager.queue(tally.task(key))
                else:
                    handler = manager.delay(0, tally.task(key))
                handler.add_done_callback(on_done)
                mine.append(handler)
            with lock:
                handlers.extend(mine)

        threads = Threads()
        for p in range(producers):
            threads.start(lambda p=p: produce(p))
        threads.join()
        assert manager.join(LONG)
    finally:
        manager.stop(timeout=WAIT)
    total = producers * per_producer
    assert len(handlers) == total
    assert len(tally.runs) == total
    assert set(tally.runs.values()) == {1}
    assert tally.overlaps == []
    assert len(settled) == total
    assert set(settled.values()) == {1}
    assert {h.state for h in handlers} == {TaskState.SUCCEEDED}
    assert sorted(h.result(0) for h in handlers) == sorted(tally.runs)


def test_cancel_racing_with_dispatch() -> None:
    """cancel() racing dispatch: True means never run (again); no task runs twice."""
    n, cancellers, workers = 3_000, 3, 4
    tally = Tally()
    gate = threading.Event()
    manager = TaskManager(workers=workers, queue_size=n + workers + 8)
    manager.start()
    try:
        for _ in range(workers):  # hold every worker until the race starts
            manager.queue(lambda ctx: gate.wait(WAIT))
        handlers: list[tuple[int, bool, TaskHandler]] = []
        for i in range(n):
            flaky = i % 5 == 0  # fails once, then waits for a retry with no backoff
            if i % 3 == 0:
                handler = manager.delay(0, tally.task(i, flaky), retries=1, backoff=0)
            else:
                handler = manager.queue(tally.task(i, flaky), retries=1, backoff=0)
            handlers.append((i, flaky, handler))
        said_true: list[set[int]] = [set() for _ in range(cancellers)]
        go = threading.Barrier(cancellers + 1)

        def cancel_all(c: int) -> None:
            order = list(handlers)
            random.Random(c).shuffle(order)
            go.wait(WAIT)
            for i, _, handler in order:
                if handler.cancel():
                    said_true[c].add(i)

        threads = Threads()
        for c in range(cancellers):
            threads.start(lambda c=c: cancel_all(c))
        go.wait(WAIT)
        gate.set()
        threads.join()
        assert manager.join(LONG)
    finally:
        gate.set()
        manager.stop(timeout=WAIT)
    cancelled_true = set().union(*said_true)
    assert tally.overlaps == []
    for i, flaky, handler in handlers:
        runs = tally.runs[i]
        assert runs == handler.attempts, (i, runs, handler)
        assert runs <= (2 if flaky else 1), (i, runs)
        assert handler.done()
        if i in cancelled_true:
            assert handler.state is TaskState.CANCELLED, (i, handler)
        if handler.state is TaskState.SUCCEEDED:
            assert runs == (2 if flaky else 1)
            assert i not in cancelled_true
        if runs == 0:
            assert handler.state is TaskState.CANCELLED


def test_exec_racing_with_workers_runs_each_task_once() -> None:
    """exec() from several threads racing the workers never runs a task twice."""
    n, racers = 1_000, 3
    tally = Tally()
    gate = threading.Event()
    manager = TaskManager(workers=2, queue_size=n + 8)
    manager.start()
    try:
        for _ in range(2):
            manager.queue(lambda ctx: gate.wait(WAIT))
        handlers = [manager.queue(tally.task(i)) for i in range(n)]
        go = threading.Barrier(racers + 1)

        def exec_all(r: int) -> None:
            order = list(handlers)
            random.Random(r).shuffle(order)
            go.wait(WAIT)
            for handler in order:
                handler.exec()

        threads = Threads()
        for r in range(racers):
            threads.start(lambda r=r: exec_all(r))
        go.wait(WAIT)
        gate.set()
        threads.join()
        assert manager.join(LONG)
    finally:
        gate.set()
        manager.stop(timeout=WAIT)
    assert tally.overlaps == []
    assert [tally.runs[i] for i in range(n)] == [1] * n
    assert {h.state for h in handlers} == {TaskState.SUCCEEDED}


SUBMIT_KINDS = ["queue", "queue-nonblocking", "delay0", "delay-short", "schedule-past"]


@pytest.mark.parametrize("timeout", [None, 0.0], ids=["stop()", "stop(timeout=0)"])
def test_stop_racing_with_submissions_loses_nothing(timeout: float | None) -> None:
    """stop() racing submissions: each raises, or runs, or is kept and run after start()."""
    producers, rounds = 4, 3
    tally = Tally()
    accepted: list[tuple[Any, TaskHandler]] = []
    lock = threading.Lock()
    manager = TaskManager(workers=2, queue_size=4)
    try:
        for round_ in range(rounds):
            manager.start()
            enough = threading.Event()
            refused = [0]

            def produce(
                p: int,
                round_: int = round_,
                enough: threading.Event = enough,
                refused: list[int] = refused,
            ) -> None:
                for i in range(100_000):
                    key = (round_, p, i)
                    kind = SUBMIT_KINDS[(p + i) % len(SUBMIT_KINDS)]
                    task = tally.task(key, fail_first=i % 3 == 0)
                    opts: dict[str, Any] = {"retries": 1, "backoff": 0}
                    try:
                        if kind == "queue":
                            handler = manager.queue(task, **opts)
                        elif kind == "queue-nonblocking":
                            try:
                                handler = manager.queue(task, block=False, **opts)
                            except QueueFull:
                                continue  # refused at once: not submitted
                        elif kind == "delay0":
                            handler = manager.delay(0, task, **opts)
                        elif kind == "delay-short":
                            handler = manager.delay(0.002, task, **opts)
                        else:
                            handler = manager.schedule(
                                datetime.now(UTC) - timedelta(seconds=1), task, **opts
                            )
                    except TaskManagerStopped:
                        with lock:
                            refused[0] += 1
                        return
                    with lock:
                        accepted.append((key, handler))
                    if i == 200:
                        enough.set()
                raise AssertionError("the manager never stopped")

            threads = Threads()
            for p in range(producers):
                threads.start(lambda p=p: produce(p))
            assert enough.wait(LONG)
            manager.stop(timeout=timeout)
            threads.join()
            assert refused[0] == producers
            with lock:
                states = {h.state for _, h in accepted}
            # what did not finish is kept for start(); only an abandoned task still runs
            allowed = {TaskState.SUCCEEDED, TaskState.PENDING, TaskState.SCHEDULED}
            if timeout is not None:
                allowed.add(TaskState.RUNNING)
            assert states <= allowed
        manager.start()
        assert manager.join(LONG)
    finally:
        manager.stop(timeout=WAIT)
    assert tally.overlaps == []
    assert {h.state for _, h in accepted} == {TaskState.SUCCEEDED}
    assert len(tally.runs) == len(accepted)
    assert [h for key, h in accepted if tally.runs[key] != h.attempts] == []
    assert {h.attempts for key, h in accepted if key[2] % 3} == {1}


def test_concurrent_starts_make_one_set_of_threads() -> None:
    """start() called from several threads at once starts the workers only once."""
    before = {t for t in threading.enumerate() if t.name.startswith("marionette-")}
    manager = TaskManager(workers=3)
    go = threading.Barrier(4)
    try:
        threads = Threads()
        for _ in range(4):
            threads.start(lambda: (go.wait(WAIT), manager.start()))
        threads.join()
        ours = [
            t.name
            for t in threading.enumerate()
            if t.name.startswith("marionette-") and t not in before
        ]
        assert sorted(ours) == [
            "marionette-scheduler",
            "marionette-worker-1",
            "marionette-worker-2",
            "marionette-worker-3",
        ]
    finally:
        manager.stop()


def test_concurrent_stops_all_return_stopped() -> None:
    """stop() from several threads: all return once the running task has finished."""
    manager = TaskManager(workers=2)
    manager.start()
    started, gate = threading.Event(), threading.Event()

    def slow(ctx: Context) -> str:
        started.set()
        gate.wait(WAIT)
        return "finished"

    try:
        handler = manager.queue(slow)
        assert started.wait(WAIT)
        go = threading.Barrier(4)
        states: list[TaskState] = []

        def stop() -> None:
            go.wait(WAIT)
            manager.stop()
            states.append(handler.state)

        threads = Threads()
        for _ in range(3):
            threads.start(stop)
        go.wait(WAIT)
        gate.set()
        threads.join()
        assert not manager.is_running()
        assert states == [TaskState.SUCCEEDED] * 3
    finally:
        gate.set()
        manager.stop()


@pytest.mark.parametrize("workers", [1, 3])
def test_restart_cycles_under_load(workers: int) -> None:
    """Repeated start/stop while tasks resubmit themselves: every accepted task runs once."""
    tally = Tally()
    accepted: list[TaskHandler] = []
    lock = threading.Lock()
    manager = TaskManager(workers=workers, queue_size=2)

    def chain(depth: int, key: tuple[int, ...]) -> Callable[[Context], None]:
        def run(ctx: Context) -> None:
            tally.task(key)(ctx)
            if depth:
                for k in range(2):
                    try:
                        child = manager.queue(chain(depth - 1, (*key, k)))
                    except TaskManagerStopped:
                        continue
                    with lock:
                        accepted.append(child)

        return run

    try:
        for cycle in range(5):
            manager.start()
            with lock:
                accepted.append(manager.queue(chain(6, (cycle,))))
            manager.stop()
        manager.start()
        assert manager.join(LONG)
    finally:
        manager.stop(timeout=WAIT)
    assert tally.overlaps == []
    assert {h.state for h in accepted} == {TaskState.SUCCEEDED}
    assert len(tally.runs) == len(accepted)
    assert set(tally.runs.values()) == {1}

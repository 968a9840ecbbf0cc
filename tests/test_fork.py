"""os.fork() while marionette runs: the child gets stopped managers and schedulers that
keep their pending work and can be started there; the parent is unaffected.

Each child runs its checks, sends a JSON report to the parent through a pipe and leaves
with ``os._exit``: it never returns into pytest. The parent always reaps it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import WAIT

from marionette import (
    Context,
    Scheduler,
    TaskEvent,
    TaskEventKind,
    TaskHandler,
    TaskManager,
    TaskManagerStopped,
    TaskState,
)

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="this platform has no os.fork"),
    # Python 3.12+ warns that forking a multi-threaded process may deadlock the child:
    # making sure it does not is what these tests are for.
    pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning"),
]

#: How long the parent waits for a child's report: a hang guard only.
PIPE_WAIT = 30.0


# -- helpers -----------------------------------------------------------------------


def _read_report(fd: int, pid: int) -> bytes:
    """Read the pipe until the child closes it (by exiting), bounded by PIPE_WAIT."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + PIPE_WAIT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"child {pid} sent no report within {PIPE_WAIT}s (hung?)")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def in_child(check: Callable[[], Any]) -> Any:
    """Fork; run `check()` in the child and return what it returned, here, in the parent.

    The child writes a JSON report to a pipe and calls ``os._exit``, whatever happens;
    an exception in the child fails the test with the child's traceback.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it must never return into pytest
        code = 70
        try:
            os.close(read)
            try:
                report: dict[str, Any] = {"ok": True, "value": check()}
            except BaseException:
                report = {"ok": False, "error": traceback.format_exc()}
            data = memoryview(json.dumps(report, default=repr).encode())
            while data:
                data = data[os.write(write, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        raw = _read_report(read, pid)
    finally:
        os.close(read)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, raw
    report = json.loads(raw)
    assert report["ok"], report["error"]
    return report["value"]


def whoami(ctx: Context) -> int:
    return os.getpid()


def stats_add_up(manager: TaskManager) -> bool:
    stats = manager.stats()
    return stats.submitted == stats.succeeded + stats.failed + stats.cancelled


class Blockers:
    """`n` tasks that hold `n` workers until `release`; `started` waits until all run."""

    def __init__(self, manager: TaskManager, n: int, release: threading.Event) -> None:
        self.barrier = threading.Barrier(n + 1)
        self.release = release

        def block(ctx: Context) -> int:
            self.barrier.wait(WAIT)
            self.release.wait(WAIT)
            return os.getpid()

        self.handlers = [manager.queue(block) for _ in range(n)]

    def started(self) -> None:
        self.barrier.wait(WAIT)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """The event blocked tasks wait on; set at teardown so that no task stays blocked."""
    event = threading.Event()
    yield event
    event.set()


def fail_first(ctx: Context) -> int:
    if ctx.attempt == 1:
        raise OSError("the first attempt fails")
    return os.getpid()


# -- the main case -------------------------------------------------------------------


def test_child_gets_a_stopped_manager_that_keeps_its_pending_work(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """Running tasks end cancelled in the child, the rest runs there after start()."""
    manager = make(workers=3, queue_size=16)
    retrying_now = threading.Event()
    manager.add_listener(lambda e: retrying_now.set(), events={TaskEventKind.RETRYING})
    retrying = manager.queue(fail_first, retries=1, backoff=3600)
    assert retrying_now.wait(WAIT)
    blockers = Blockers(manager, 3, release)
    blockers.started()
    queued = [manager.queue(whoami) for _ in range(3)]
    delayed = manager.delay(3600, whoami)
    parent = os.getpid()

    def check() -> dict[str, Any]:
        out: dict[str, Any] = {"pid": os.getpid(), "running": manager.is_running()}
        out["blockers"] = [h.state.name for h in blockers.handlers]
        out["queued"] = [h.state.name for h in queued]
        out["delayed"] = delayed.state.name
        out["retrying"] = [retrying.state.name, retrying.attempts]
        stats = manager.stats()
        out["stats"] = [stats.running, stats.busy, stats.queued, stats.scheduled]
        try:
            manager.queue(whoami)
        except TaskManagerStopped:
            out["refused"] = True
        try:
            blockers.handlers[0].result(0)
        except concurrent.futures.CancelledError:
            out["cancelled_result"] = True
        manager.start()
        out["queued_ran_in"] = [h.result(WAIT) for h in queued]
        assert manager.reschedule(delayed, 0)
        assert manager.reschedule(retrying, 0)
        out["delayed_ran_in"] = delayed.result(WAIT)
        out["retry_ran_in"] = [retrying.result(WAIT), retrying.attempts]
        out["fresh"] = manager.queue(whoami).result(WAIT)
        out["join"] = manager.join(WAIT)
        out["adds_up"] = stats_add_up(manager)
        manager.stop()
        out["threads"] = [t.name for t in threading.enumerate()]
        return out

    child = in_child(check)
    pid = child["pid"]
    assert pid != parent
    assert child["running"] is False
    assert child["blockers"] == ["CANCELLED"] * 3
    assert child["queued"] == ["PENDING"] * 3
    assert child["delayed"] == "SCHEDULED"
    assert child["retrying"] == ["SCHEDULED", 1]
    assert child["stats"] == [0, 0, 3, 2]
    assert child["refused"] is True
    assert child["cancelled_result"] is True
    assert child["queued_ran_in"] == [pid] * 3
    assert child["delayed_ran_in"] == pid
    assert child["retry_ran_in"] == [pid, 2]
    assert child["fresh"] == pid
    assert child["join"] is True
    assert child["adds_up"] is True
    assert child["threads"] == [threading.current_thread().name]
    # The parent is unaffected: its running tasks finish here, and the rest runs here too.
    assert manager.is_running()
    assert [h.state for h in queued] == [TaskState.PENDING] * 3
    release.set()
    assert [h.result(WAIT) for h in blockers.handlers] == [parent] * 3
    assert [h.result(WAIT) for h in queued] == [parent] * 3
    assert manager.reschedule(delayed, 0)
    assert manager.reschedule(retrying, 0)
    assert delayed.result(WAIT) == parent
    assert retrying.result(WAIT) == parent
    assert manager.join(WAIT)
    assert stats_add_up(manager)


def test_fork_keeps_gated_periodic_and_listener_work(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """Tasks waiting on a group or key, a periodic and listeners all carry on in the child."""
    manager = make(workers=3, limits={"g": 1})
    started = threading.Event()

    def holder(ctx: Context) -> int:
        started.set()
        release.wait(WAIT)
        return os.getpid()

    running = manager.queue(holder, group="g", key="k")
    assert started.wait(WAIT)
    by_group = manager.queue(whoami, group="g")
    by_key = manager.queue(whoami, key="k")
    events: list[tuple[str, int, int]] = []
    events_changed = threading.Condition()

    def listen(event: TaskEvent) -> None:
        with events_changed:
            events.append((event.kind.name, event.task.id, os.getpid()))
            events_changed.notify_all()

    manager.add_listener(listen)
    periodic = manager.every(3600, whoami, key="tick")

    def check() -> dict[str, Any]:
        pid = os.getpid()
        out: dict[str, Any] = {"pid": pid}
        out["states"] = [running.state.name, by_group.state.name, by_key.state.name]
        manager.start()
        out["ran_in"] = [by_group.result(WAIT), by_key.result(WAIT)]
        assert manager.reschedule("tick", 0)  # the periodic's next run, due now
        with events_changed:
            events_changed.wait_for(lambda: periodic.last is not None, WAIT)
        last = periodic.last
        ran_in = None if last is None else last.result(WAIT)
        out["periodic"] = [periodic.runs, ran_in]
        group = manager.stats().groups["g"]
        out["groups"] = [group.running, group.waiting]
        periodic.cancel()
        out["join"] = manager.join(WAIT)
        manager.stop()  # delivers every event
        out["events"] = sorted({k for k, _, p in events if p == pid})
        return out

    child = in_child(check)
    pid = child["pid"]
    assert child["states"] == ["CANCELLED", "PENDING", "PENDING"]
    assert child["ran_in"] == [pid, pid]
    assert child["periodic"] == [1, pid]
    assert child["groups"] == [0, 0]
    assert child["join"] is True
    assert child["events"] == ["CANCELLED", "STARTED", "SUBMITTED", "SUCCEEDED"]
    release.set()
    assert running.result(WAIT) == os.getpid()
    assert by_group.result(WAIT) == os.getpid()
    assert by_key.result(WAIT) == os.getpid()
    assert periodic.runs == 0
    periodic.cancel()
    assert manager.join(WAIT)
    assert stats_add_up(manager)


def test_fork_while_a_listener_that_stopped_the_manager_blocks(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """The events the stopping listener's thread had yet to deliver are delivered in the
    child after its start(); the parent's thread delivers them here."""
    manager = make(workers=2)
    entered, hold, stopped = threading.Event(), threading.Event(), threading.Event()
    seen: list[tuple[str, str, int]] = []
    changed = threading.Condition()

    def listener(event: TaskEvent) -> None:
        if not entered.is_set():
            entered.set()
            hold.wait(WAIT)  # the events of b and c pile up behind this batch
            manager.stop()
            stopped.set()
            release.wait(WAIT)  # the fork happens here, before the rest is delivered
        with changed:
            seen.append((event.task.name, event.kind.name, os.getpid()))
            changed.notify_all()

    def succeeded(pid: int) -> set[str]:
        return {name for name, kind, p in seen if kind == "SUCCEEDED" and p == pid}

    manager.add_listener(listener)
    manager.queue(whoami, name="a")
    assert entered.wait(WAIT)
    for handler in [manager.queue(whoami, name=name) for name in "bc"]:
        handler.result(WAIT)
    hold.set()
    assert stopped.wait(WAIT)

    def check() -> list[list[str]]:
        pid = os.getpid()
        manager.start()
        with changed:
            assert changed.wait_for(lambda: {"b", "c"} <= succeeded(pid), WAIT)
        manager.stop()
        return [[name, kind] for name, kind, p in seen if p == pid and name in "bc"]

    child = in_child(check)
    for name in "bc":
        assert [kind for n, kind in child if n == name] == ["SUBMITTED", "STARTED", "SUCCEEDED"]
    release.set()
    with changed:
        assert changed.wait_for(lambda: {"b", "c"} <= succeeded(os.getpid()), WAIT)


# -- where and when the fork happens ---------------------------------------------------


def test_fork_from_inside_a_task(make: Callable[..., TaskManager]) -> None:
    """A task that forks: in the child it ended cancelled and the rest runs; here it succeeds."""
    manager = make(workers=1)
    go = threading.Event()
    queued: list[TaskHandler] = []

    def forker(ctx: Context) -> Any:
        assert go.wait(WAIT)
        me = forking  # made before it was submitted: no race with this read

        def check() -> dict[str, Any]:
            out: dict[str, Any] = {"pid": os.getpid(), "running": manager.is_running()}
            out["me"] = me.state.name
            out["queued"] = [h.state.name for h in queued]
            manager.start()
            out["ran_in"] = [h.result(WAIT) for h in queued]
            out["join"] = manager.join(WAIT)  # this thread is no worker here: no RuntimeError
            out["adds_up"] = stats_add_up(manager)
            manager.stop()
            return out

        return in_child(check)

    forking = manager.wrap_task(forker)
    manager.queue(forking)
    queued.extend(manager.queue(whoami) for _ in range(2))
    go.set()
    child = forking.result(PIPE_WAIT + WAIT)
    pid = child["pid"]
    assert pid != os.getpid()
    assert child["running"] is False
    assert child["me"] == "CANCELLED"
    assert child["queued"] == ["PENDING", "PENDING"]
    assert child["ran_in"] == [pid, pid]
    assert child["join"] is True
    assert child["adds_up"] is True
    assert forking.state is TaskState.SUCCEEDED
    assert [h.result(WAIT) for h in queued] == [os.getpid()] * 2
    assert manager.join(WAIT)
    assert stats_add_up(manager)


def test_fork_from_a_task_that_called_stop(make: Callable[..., TaskManager]) -> None:
    """A task calls stop() and then forks: the child holds the queued tasks and runs them
    after its own start(); here the stop finishes and runs them too."""
    manager = make(workers=1)
    go = threading.Event()
    queued: list[TaskHandler] = []

    def forker(ctx: Context) -> Any:
        assert go.wait(WAIT)
        manager.stop()  # returns at once: the stopper thread waits for this task

        def check() -> dict[str, Any]:
            out: dict[str, Any] = {"pid": os.getpid(), "running": manager.is_running()}
            out["queued"] = [h.state.name for h in queued]
            manager.start()
            out["ran_in"] = [h.result(WAIT) for h in queued]
            manager.stop()
            return out

        return in_child(check)

    forking = manager.queue(forker)
    queued.extend(manager.queue(whoami) for _ in range(2))
    go.set()
    child = forking.result(PIPE_WAIT + WAIT)
    assert child["running"] is False
    assert child["queued"] == ["PENDING", "PENDING"]
    assert child["ran_in"] == [child["pid"]] * 2
    assert [h.result(WAIT) for h in queued] == [os.getpid()] * 2
    manager.stop()
    assert not manager.is_running()


def test_fork_while_another_thread_stops_the_manager(
    make: Callable[..., TaskManager], release: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork in the middle of stop(): the child has a stopped manager it can start."""
    manager = make(workers=2)
    blockers = Blockers(manager, 1, release)
    blockers.started()
    delayed = manager.delay(3600, whoami)
    stopping = threading.Event()
    original = manager.scheduler.stop

    def stop_scheduler() -> None:  # the first step of TaskManager.stop()
        stopping.set()
        original()

    monkeypatch.setattr(manager.scheduler, "stop", stop_scheduler)
    stopper = threading.Thread(target=manager.stop, name="test-stopper")
    stopper.start()
    try:
        assert stopping.wait(WAIT)

        def check() -> dict[str, Any]:
            out: dict[str, Any] = {"pid": os.getpid(), "running": manager.is_running()}
            out["states"] = [blockers.handlers[0].state.name, delayed.state.name]
            manager.start()
            assert manager.reschedule(delayed, 0)
            out["ran_in"] = delayed.result(WAIT)
            out["fresh"] = manager.queue(whoami).result(WAIT)
            out["join"] = manager.join(WAIT)
            manager.stop()
            out["stopped"] = not manager.is_running()
            return out

        child = in_child(check)
    finally:
        release.set()
        stopper.join(WAIT)
    assert not stopper.is_alive()
    assert child["running"] is False
    assert child["states"] == ["CANCELLED", "SCHEDULED"]
    assert child["ran_in"] == child["pid"]
    assert child["fresh"] == child["pid"]
    assert child["join"] is True
    assert child["stopped"] is True
    # Here the stop finished the running task and kept the delayed one.
    assert blockers.handlers[0].result(0) == os.getpid()
    assert delayed.state is TaskState.SCHEDULED
    manager.start()
    assert manager.reschedule(delayed, 0)
    assert delayed.result(WAIT) == os.getpid()
    assert manager.join(WAIT)


def test_child_of_a_never_started_manager_can_start_it(make: Callable[..., TaskManager]) -> None:
    """A manager made but never started before the fork works in the child and here."""
    manager = make(start=False, workers=2)

    def check() -> dict[str, Any]:
        out: dict[str, Any] = {"pid": os.getpid(), "running": manager.is_running()}
        manager.start()
        out["ran_in"] = manager.queue(whoami).result(WAIT)
        out["join"] = manager.join(WAIT)
        manager.stop()
        return out

    child = in_child(check)
    assert child["running"] is False
    assert child["ran_in"] == child["pid"]
    assert child["join"] is True
    assert not manager.is_running()
    manager.start()
    assert manager.queue(whoami).result(WAIT) == os.getpid()


def test_child_that_forks_again_before_starting_anything(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """A child forks a grandchild before starting anything: each runs the kept tasks once."""
    manager = make(workers=1)
    blockers = Blockers(manager, 1, release)
    blockers.started()
    queued = [manager.queue(whoami) for _ in range(2)]

    def run_here() -> dict[str, Any]:
        out: dict[str, Any] = {"pid": os.getpid(), "running": manager.is_running()}
        out["states"] = [h.state.name for h in [*blockers.handlers, *queued]]
        manager.start()
        out["ran_in"] = [h.result(WAIT) for h in queued]
        out["join"] = manager.join(WAIT)
        manager.stop()
        return out

    def child_check() -> dict[str, Any]:
        grandchild = in_child(run_here)  # forks before this child started anything
        return {"grandchild": grandchild, "child": run_here()}

    report = in_child(child_check)
    for who in ("grandchild", "child"):
        seen = report[who]
        assert seen["running"] is False, who
        assert seen["states"] == ["CANCELLED", "PENDING", "PENDING"], who
        assert seen["ran_in"] == [seen["pid"]] * 2, who
        assert seen["join"] is True, who
    assert report["grandchild"]["pid"] != report["child"]["pid"]
    release.set()
    assert [h.result(WAIT) for h in queued] == [os.getpid()] * 2
    assert manager.join(WAIT)


# -- a standalone Scheduler ------------------------------------------------------------------


class Outbox:
    """The `out` of a standalone Scheduler: keeps (item, pid) and lets a test wait."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []
        self.changed = threading.Condition()
        self.hold: dict[str, threading.Event] = {}
        self.inside: dict[str, threading.Event] = {}

    def __call__(self, item: str) -> None:
        with self.changed:
            self.items.append((item, os.getpid()))
            self.changed.notify_all()
        if item in self.hold:
            self.inside[item].set()
            self.hold[item].wait(WAIT)

    def wait_for(self, item: str) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: (item, os.getpid()) in self.items, WAIT)

    def here(self) -> list[str]:
        with self.changed:
            return [item for item, pid in self.items if pid == os.getpid()]


@pytest.fixture
def scheduler() -> Iterator[tuple[Scheduler[str], Outbox]]:
    """A standalone Scheduler with a recording `out`; stopped after the test."""
    outbox = Outbox()
    sched: Scheduler[str] = Scheduler(outbox)
    try:
        yield sched, outbox
    finally:
        for event in outbox.hold.values():
            event.set()
        sched.stop()


def test_fork_while_a_standalone_scheduler_runs(
    scheduler: tuple[Scheduler[str], Outbox],
) -> None:
    """The child's scheduler is stopped, keeps its pending items and hands them out there."""
    sched, outbox = scheduler
    sched.start()
    sched.delay(0, "now")
    assert outbox.wait_for("now")
    sched.delay(3600, "later")
    sched.delay(7200, "much later")

    def check() -> dict[str, Any]:
        out: dict[str, Any] = {"running": sched.is_running(), "pending": len(sched)}
        out["next_due"] = sched.next_due() is not None
        sched.start()
        assert sched.reschedule("later", 0)
        assert outbox.wait_for("later")
        out["handed_out"] = outbox.here()
        out["left"] = len(sched)
        sched.stop()
        return out

    child = in_child(check)
    assert child == {
        "running": False,
        "pending": 2,
        "next_due": True,
        "handed_out": ["later"],
        "left": 1,
    }
    assert sched.is_running()
    assert len(sched) == 2
    assert sched.reschedule("later", 0)
    assert outbox.wait_for("later")
    assert outbox.here() == ["now", "later"]


def test_fork_while_the_scheduler_hands_out_a_batch_keeps_the_rest(
    scheduler: tuple[Scheduler[str], Outbox],
) -> None:
    """The batch being handed out at the fork is handed out in the child, from the item
    whose out() was under way (that call never completes in the child)."""
    sched, outbox = scheduler
    outbox.hold["first"], outbox.inside["first"] = threading.Event(), threading.Event()
    sched.delay(0, "first")
    sched.delay(0, "second")  # due in the same pass as "first"
    sched.delay(3600, "later")
    sched.start()
    assert outbox.inside["first"].wait(WAIT)  # the thread is inside out("first")

    def check() -> list[str]:
        outbox.hold["first"].set()  # only in the child: its out("first") starts afresh
        sched.start()
        assert sched.reschedule("later", 0)
        assert outbox.wait_for("later")  # the batch was due earlier: out before "later"
        return outbox.here()

    handed_out = in_child(check)
    assert handed_out[:2] == ["first", "second"]


def test_fork_while_a_submission_waits_for_room_in_the_queue(
    make: Callable[..., TaskManager], release: threading.Event
) -> None:
    """A submission blocked by back pressure at the fork does not hold the child's join()."""
    manager = make(workers=1, queue_size=1)
    blockers = Blockers(manager, 1, release)
    blockers.started()
    queued = manager.queue(whoami)  # the queue is full now
    submitted = threading.Event()
    manager.add_listener(lambda e: submitted.set(), events={TaskEventKind.SUBMITTED})
    late: list[TaskHandler] = []
    producer = threading.Thread(target=lambda: late.append(manager.queue(whoami)))
    producer.start()
    try:
        assert submitted.wait(WAIT)  # counted; now blocked (or about to block) for room

        def check() -> dict[str, Any]:
            manager.start()
            out: dict[str, Any] = {"ran": queued.result(WAIT) == os.getpid()}
            out["join"] = manager.join(3.0)  # a hang guard: the work takes milliseconds
            out["adds_up"] = stats_add_up(manager)
            manager.stop(timeout=WAIT)
            return out

        child = in_child(check)
    finally:
        release.set()
        producer.join(WAIT)
    assert [h.result(WAIT) for h in late] == [os.getpid()]
    assert child == {"ran": True, "join": True, "adds_up": True}

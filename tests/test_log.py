"""Logging: the stdlib default, events and their fields, structlog loggers, never configured."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import structlog.testing
from conftest import WAIT

from marionette import Context, TaskError, TaskManager

NAME = "marionette"


@contextlib.contextmanager
def running(**overrides: Any) -> Iterator[TaskManager]:
    """A started manager, stopped on exit; after the block every worker's logging is done."""
    manager = TaskManager(**overrides)
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(timeout=WAIT)


def fail_times(n: int) -> Any:
    def task(ctx: Context) -> str:
        if ctx.attempt <= n:
            raise OSError(f"flaky {ctx.attempt}")
        return "ok"

    return task


def always_fail(ctx: Context) -> None:
    raise OSError(f"down {ctx.attempt}")


def ours(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == NAME]


def messages(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in ours(caplog) if r.getMessage().startswith(event)]


def run_a_mix(manager: TaskManager) -> None:
    """A success, a retried success, a final failure and a cancellation."""
    manager.queue(lambda ctx: 1, name="fine").result(WAIT)
    manager.queue(fail_times(1), name="flaky", retries=1, backoff=0).result(WAIT)
    with pytest.raises(TaskError):
        manager.queue(always_fail, name="doomed").result(WAIT)
    manager.delay(3600, lambda ctx: None, name="never").cancel()


def test_default_logger_is_the_plain_stdlib_marionette_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """logger=None logs via stdlib "marionette": no handler, NOTSET, records propagate."""
    stdlib = logging.getLogger(NAME)
    with running(workers=1) as manager:
        run_a_mix(manager)
    assert stdlib.handlers == []
    assert stdlib.level == logging.NOTSET
    assert stdlib.propagate is True
    errors = messages(caplog, "task failed for good")  # caught by caplog's root handler
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR


def test_successful_tasks_log_nothing_at_warning_or_above(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Successful tasks log only a debug "task completed" line each, nothing louder."""
    caplog.set_level(logging.DEBUG, logger=NAME)
    with running(workers=2) as manager:
        handlers = [manager.queue(lambda ctx, i=i: i, name=f"ok-{i}") for i in range(20)]
        assert [h.result(WAIT) for h in handlers] == list(range(20))
    assert [r.getMessage() for r in ours(caplog) if r.levelno >= logging.WARNING] == []
    completed = messages(caplog, "task completed")
    assert len(completed) == 20
    assert {r.levelno for r in completed} == {logging.DEBUG}
    assert {h.id for h in handlers} == {
        int(r.getMessage().split("task_id=")[1].split()[0]) for r in completed
    }


def test_a_retry_is_a_warning_with_retry_in(caplog: pytest.LogCaptureFixture) -> None:
    """A failed attempt with retries left logs one warning carrying retry_in and the error."""
    with running(workers=1, server_name="retrier") as manager:
        handler = manager.queue(fail_times(1), name="flaky", retries=1, backoff=0.001)
        assert handler.result(WAIT) == "ok"
    [record] = messages(caplog, "task failed, retrying")
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    assert "retry_in=0.001" in text
    assert "task=flaky" in text
    assert f"task_id={handler.id}" in text
    assert "attempt=1" in text
    assert "flaky 1" in text
    assert "server=retrier" in text
    assert messages(caplog, "task failed for good") == []


def test_final_failure_is_one_error_per_task(caplog: pytest.LogCaptureFixture) -> None:
    """ "task failed for good" is one error per task, naming task, server and attempts."""
    with running(workers=2, server_name="billing") as manager:
        once = manager.queue(always_fail, name="charge")
        thrice = manager.queue(always_fail, name="refund", retries=2, backoff=0)
        for handler in (once, thrice):
            with pytest.raises(TaskError):
                handler.result(WAIT)
    records = messages(caplog, "task failed for good")
    assert len(records) == 2
    assert {r.levelno for r in records} == {logging.ERROR}
    by_task = {r.getMessage().split("task=")[1].split()[0]: r.getMessage() for r in records}
    assert set(by_task) == {"charge", "refund"}
    assert f"task_id={once.id}" in by_task["charge"]
    assert f"task_id={thrice.id}" in by_task["refund"]
    assert "attempts=3" in by_task["refund"]
    assert "down 3" in by_task["refund"]
    assert all("server=billing" in m for m in by_task.values())
    assert len(messages(caplog, "task failed, retrying")) == 2


def test_a_base_exception_is_logged_once_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """A task ended by a BaseException logs "task failed for good" once, at error level."""

    def task(ctx: Context) -> None:
        raise SystemExit(3)

    with running(workers=1) as manager:
        handler = manager.queue(task, name="quitter", retries=2, backoff=0)
        with pytest.raises(SystemExit):
            handler.result(WAIT)
    [record] = messages(caplog, "task failed for good")
    assert record.levelno == logging.ERROR
    assert "task=quitter" in record.getMessage()
    assert messages(caplog, "task failed, retrying") == []


def test_every_line_carries_the_server_name(caplog: pytest.LogCaptureFixture) -> None:
    """Every record the manager writes, at every level, carries server=<server_name>."""
    caplog.set_level(logging.DEBUG, logger=NAME)
    with running(workers=1, server_name="node-7") as manager:
        run_a_mix(manager)
        handler = manager.queue(lambda ctx: None)
        handler.add_done_callback(lambda h: 1 / 0)
        handler.result(WAIT)
    texts = [r.getMessage() for r in ours(caplog)]
    for event in (
        "task manager started",
        "task completed",
        "task failed, retrying",
        "task failed for good",
        "task manager stopped",
    ):
        assert [t for t in texts if t.startswith(event)], event
    assert [t for t in texts if "server=node-7" not in t] == []


def test_start_and_stop_are_info_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Starting and stopping log info lines with the pool's size and the server name."""
    caplog.set_level(logging.INFO, logger=NAME)
    with running(workers=3, queue_size=9, server_name="infos"):
        pass
    [started] = messages(caplog, "task manager started")
    [stopped] = messages(caplog, "task manager stopped")
    assert started.levelno == logging.INFO
    assert stopped.levelno == logging.INFO
    assert "workers=3" in started.getMessage()
    assert "queue_size=9" in started.getMessage()
    assert "server=infos" in started.getMessage()
    assert "server=infos" in stopped.getMessage()


def test_a_structlog_logger_receives_events_with_task_keys() -> None:
    """A structlog logger gets events with server, task_id, task and attempt keys."""
    capture = structlog.testing.LogCapture()
    logger = structlog.wrap_logger(
        None,
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    with running(workers=1, logger=logger, server_name="structured") as manager:
        ok = manager.queue(lambda ctx: 1, name="fine")
        ok.result(WAIT)
        flaky = manager.queue(fail_times(1), name="flaky", retries=1, backoff=0)
        flaky.result(WAIT)
        doomed = manager.queue(always_fail, name="doomed")
        with pytest.raises(TaskError):
            doomed.result(WAIT)
    entries = capture.entries
    assert all(e["server"] == "structured" for e in entries)
    events = [e["event"] for e in entries]
    assert events[0] == "task manager started"
    assert events[-1] == "task manager stopped"
    [completed] = [e for e in entries if e["event"] == "task completed" and e["task"] == "fine"]
    assert completed["log_level"] == "debug"
    assert completed["task_id"] == ok.id
    assert completed["attempt"] == 1
    [retrying] = [e for e in entries if e["event"] == "task failed, retrying"]
    assert retrying["log_level"] == "warning"
    assert (retrying["task_id"], retrying["task"], retrying["attempt"]) == (flaky.id, "flaky", 1)
    assert retrying["retry_in"] == 0
    [failed] = [e for e in entries if e["event"] == "task failed for good"]
    assert failed["log_level"] == "error"
    assert (failed["task_id"], failed["task"], failed["attempt"]) == (doomed.id, "doomed", 1)


def test_a_stdlib_logger_is_accepted(caplog: pytest.LogCaptureFixture) -> None:
    """A logging.Logger passed as logger receives the records, not "marionette"."""
    custom = logging.getLogger("tests.marionette.custom")
    with running(workers=1, logger=custom, server_name="custom") as manager:
        doomed = manager.queue(always_fail, name="doomed")
        assert isinstance(doomed.exception(WAIT), TaskError)
    records = [r for r in caplog.records if r.name == custom.name]
    [failed] = [r for r in records if r.getMessage().startswith("task failed for good")]
    assert failed.levelno == logging.ERROR
    assert "task=doomed" in failed.getMessage()
    assert "server=custom" in failed.getMessage()
    assert ours(caplog) == []


class BrokenLogger:
    """A logger whose every method raises."""

    def __init__(self, bind_raises: bool) -> None:
        self.bind_raises = bind_raises
        self.calls = 0

    def bind(self, **values: Any) -> BrokenLogger:
        if self.bind_raises:
            raise RuntimeError("bind is broken")
        return self

    def _broken(self, event: str, **values: Any) -> None:
        self.calls += 1
        raise RuntimeError("logging is broken")

    debug = info = warning = error = _broken


@pytest.mark.parametrize("bind_raises", [False, True])
def test_a_logger_that_raises_does_not_break_the_manager(
    capsys: pytest.CaptureFixture[str], bind_raises: bool
) -> None:
    """Tasks succeed, retry, fail and cancel as usual when every logging call raises."""
    logger = BrokenLogger(bind_raises)
    with running(workers=2, logger=logger) as manager:
        assert manager.queue(lambda ctx: "fine").result(WAIT) == "fine"
        assert manager.queue(fail_times(1), retries=1, backoff=0).result(WAIT) == "ok"
        doomed = manager.queue(always_fail)
        with pytest.raises(TaskError):
            doomed.result(WAIT)
        handler = manager.queue(lambda ctx: None)
        handler.add_done_callback(lambda h: 1 / 0)
        handler.result(WAIT)
        assert manager.delay(3600, lambda ctx: None).cancel() is True
        assert manager.join(WAIT)
    assert not manager.is_running()
    assert logger.calls >= 4  # the manager did try to log
    capsys.readouterr()


def test_the_library_never_configures_structlog() -> None:
    """Running managers with any logger leaves structlog's global configuration alone."""
    configured, config = structlog.is_configured(), structlog.get_config()
    capture = structlog.testing.LogCapture()
    loggers = [None, structlog.wrap_logger(None, processors=[capture]), logging.getLogger("x")]
    for logger in loggers:
        with running(workers=1, logger=logger) as manager:
            run_a_mix(manager)
    assert structlog.is_configured() is configured
    assert structlog.get_config() == config


def test_a_fresh_program_sees_warnings_and_errors_only() -> None:
    """A program configuring nothing sees failures on stderr, never per-task lines."""
    code = """
import structlog
from marionette import TaskManager
with TaskManager(workers=1, server_name="fresh") as tm:
    for _ in range(5):
        tm.queue(lambda ctx: 1).result(10)
    handler = tm.queue(lambda ctx: 1 / 0, name="divider", retries=1, backoff=0)
    try:
        handler.result(10)
    except Exception:
        pass
print("configured", structlog.is_configured())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "configured False"
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    retrying = [line for line in lines if line.startswith("task failed, retrying")]
    failed = [line for line in lines if line.startswith("task failed for good")]
    assert len(retrying) == 1
    assert len(failed) == 1
    assert "task=divider" in failed[0]
    assert "server=fresh" in failed[0]
    assert "ZeroDivisionError" in failed[0]
    assert "server=fresh" in retrying[0]
    assert not [line for line in lines if "task completed" in line or "started" in line]


def test_logging_from_many_threads_keeps_one_line_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Concurrent failures from several workers each log their final failure exactly once."""
    with running(workers=4, server_name="many") as manager:
        go = threading.Barrier(4)
        handlers = [manager.queue(lambda ctx: (go.wait(WAIT), 1 / 0)) for _ in range(4)]
        for handler in handlers:
            with pytest.raises(TaskError):
                handler.result(WAIT)
    records = messages(caplog, "task failed for good")
    ids = sorted(int(r.getMessage().split("task_id=")[1].split()[0]) for r in records)
    assert ids == sorted(h.id for h in handlers)

"""Public-API fuzz: random values of wrong types and out-of-range numbers, given to every
public function and option, raise a documented error at the call (`TypeError`, a
`ValueError` subclass, a `MarionetteError` subclass) or are accepted; nothing hangs,
no thread crashes, and the manager keeps running tasks.

One manager (or scheduler) per test function, not per example, for speed. After each
example the manager must still run a fresh task and log no internal error. Values a
known bug trips over are kept out of the strategies and shown by the ``xfail`` tests
at the end instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from numbers import Real
from typing import Any

import pytest
import tenacity
from conftest import WAIT
from helpers import Recorder as SharedRecorder
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from marionette import (
    Config,
    Context,
    MarionetteError,
    Periodic,
    Scheduler,
    TaskEventKind,
    TaskHandler,
    TaskManager,
)

#: What a public call may raise for a bad argument.
DOCUMENTED: tuple[type[BaseException], ...] = (TypeError, ValueError, MarionetteError)

#: Log events that only a bug in marionette itself produces.
INTERNAL_ERRORS = ("worker error", "scheduler out raised")

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: Beyond any float: `float(10**400)` raises OverflowError (see the xfail tests).
BEYOND_FLOAT = 10**400


# -- values --------------------------------------------------------------------------


class Unhashable:
    """An object that cannot be a dict key."""

    __hash__ = None  # type: ignore[assignment]


NAIVE = datetime(2030, 1, 1, 12, 0)
SPECIAL: list[Any] = [
    None,
    "",
    " ",
    "x",
    "5",
    "-1",
    "nan",
    b"5",
    bytearray(b"x"),
    [],
    [1, 2],
    (),
    {},
    {"a": 1},
    {1: 2},
    set(),
    object(),
    Unhashable(),
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    1,
    2,
    -1.5,
    0.0,
    -0.0,
    1e-9,
    1e300,
    -1e300,
    2**31,
    2**63,
    2**64,
    -(2**63),
    10**300,
    sys.maxsize,
    True,
    False,
    timedelta(-1),
    timedelta(0),
    timedelta(microseconds=1),
    timedelta.max,
    timedelta.min,
    NAIVE,
    datetime.min,
    datetime.max,
    datetime.min.replace(tzinfo=UTC),
    datetime.max.replace(tzinfo=UTC),
    datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=5))),
    datetime(2000, 1, 1, tzinfo=UTC),
    datetime(2100, 1, 1, tzinfo=timezone(timedelta(hours=-3))),
    Context(),
    Context.background(),
    TaskEventKind.FAILED,
    [TaskEventKind.FAILED],
    UTC,
    ValueError("boom"),
    KeyboardInterrupt(),
    int,
    str,
    len,
    print,
    lambda *args: None,
]


def junk(
    floats: st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[Any]:
    """Wrong types, out-of-range numbers, odd times and a few valid values.

    Mapped, so that ``st.one_of(valid, junk())`` does not flatten it into a dozen
    branches that would drown the valid one.
    """
    return st.one_of(
        st.sampled_from(SPECIAL),
        st.integers(min_value=-(2**70), max_value=2**70),
        floats if floats is not None else st.floats(),
        st.text(max_size=8),
        st.binary(max_size=4),
        st.timedeltas(),
        st.datetimes(),  # naive
        st.datetimes(
            min_value=datetime(1, 1, 2),
            max_value=datetime(9999, 12, 30),
            timezones=st.sampled_from([UTC, timezone(timedelta(hours=14))]),
        ),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ).map(lambda value: value)


def hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `fn`: its value, or None when it raised a documented error (others propagate).

    The outcome is noted for ``--hypothesis-show-statistics``.
    """
    name = getattr(fn, "__name__", "call")
    try:
        value = fn(*args, **kwargs)
    except DOCUMENTED as exc:
        note(f"{name}: {type(exc).__name__}")
        return None
    note(f"{name}: accepted")
    return value


def note(text: str) -> None:
    """Record an outcome for the statistics (a no-op outside a hypothesis example)."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def is_waitable(value: object) -> bool:
    """Would `value` be accepted as a timeout that really waits (None: for ever)?"""
    if value is None:
        return True
    if isinstance(value, timedelta):
        return value.total_seconds() > 0
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        number = float(value)
    except OverflowError:
        return True
    return number > 0 and not math.isnan(number)


def fresh(ctx: Context) -> str:
    return "fresh"


def always_fail(ctx: Context) -> None:
    raise OSError("always")


class Recorder(SharedRecorder):
    """The shared recording logger, plus the internal errors it saw."""

    def internal_errors(self) -> list[str]:
        with self.cond:
            return [e["event"] for e in self.events if e["event"] in INTERNAL_ERRORS]


@pytest.fixture
def rec() -> Recorder:
    """A recording logger."""
    return Recorder()


@pytest.fixture
def manager(rec: Recorder) -> Iterator[TaskManager]:
    """One running manager for a whole fuzz test (hypothesis runs many examples)."""
    tm = TaskManager(workers=2, logger=rec, limits={"g": 2})
    tm.start()
    try:
        yield tm
    finally:
        tm.stop(timeout=WAIT)


def settle(manager: TaskManager, rec: Recorder, *made: object) -> None:
    """After an example: cancel what it made; the manager must still run a fresh task."""
    for thing in made:
        if isinstance(thing, (TaskHandler, Periodic)):
            thing.cancel()
    if not manager.is_running():  # the example stopped it
        manager.start()
    assert manager.queue(fresh).result(WAIT) == "fresh"
    assert manager.join(WAIT)
    assert rec.internal_errors() == []
    stats = manager.stats()
    assert stats.submitted == stats.succeeded + stats.failed + stats.cancelled, stats


# -- arguments: valid, then up to two of them replaced by junk --------------------------


def how_many(names: list[str]) -> st.SearchStrategy[list[str]]:
    """0, 1 or 2 distinct names (none in a third of the cases: the accepted path)."""
    return st.sampled_from([0, 0, 1, 1, 2, 2]).flatmap(
        lambda n: st.lists(
            st.sampled_from(names), min_size=min(n, len(names)), max_size=n, unique=True
        )
    )


def spoil(
    valid: dict[str, st.SearchStrategy[Any]],
    options: dict[str, st.SearchStrategy[Any]] | None = None,
    **junks: st.SearchStrategy[Any],
) -> Any:
    """Valid values for every argument, then 0-2 of them replaced by junk.

    One bad argument at a time is what shows that each one is checked; valid
    baselines keep the accepted path fuzzed too. With `options`, ``"opts"`` holds a
    valid subset of those keyword options, and a spoiled option is added as junk
    (now and then a misspelt one too). `junks` overrides the junk drawn for some
    arguments (where a known bug must be kept out). ``"_spoiled"`` lists the names.
    """
    option_names = [f"opt:{name}" for name in sorted(options or {})]

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        values = {name: draw(strategy) for name, strategy in valid.items()}
        opts = draw(st.fixed_dictionaries({}, optional=options)) if options else {}
        spoiled = draw(how_many(sorted(valid) + option_names))
        for name in spoiled:
            if name.startswith("opt:"):
                opts[name[4:]] = draw(junk())
            else:
                values[name] = draw(junks.get(name, junk()))
        if options and draw(st.sampled_from([True] + [False] * 9)):
            opts["retires"] = 3  # a misspelt option
        values["opts"] = opts
        values["_spoiled"] = spoiled
        return values

    return build()


DONE_CONTEXT = Context().with_timeout(0)
VALID_OPTIONS: dict[str, st.SearchStrategy[Any]] = {
    "retries": st.one_of(st.integers(0, 5), st.just(10**30)),
    "backoff": st.one_of(
        st.floats(0, 3600),
        st.sampled_from([0, 3600, timedelta(0), tenacity.wait_fixed(3600), tenacity.wait_none()]),
    ),
    "retry": st.sampled_from(
        [tenacity.retry_if_exception_type(OSError), tenacity.retry_always, tenacity.retry_never]
    ),
    "stop": st.sampled_from(
        [tenacity.stop_after_attempt(2), tenacity.stop_never, tenacity.stop_after_delay(0)]
    ),
    "timeout": st.one_of(
        st.floats(1e-6, 100), st.timedeltas(timedelta(microseconds=1), timedelta(days=1))
    ),
    "context": st.sampled_from([Context(), DONE_CONTEXT]),
    "error": st.sampled_from(["headline", ValueError("x"), KeyboardInterrupt()]),
    "name": st.text(min_size=1, max_size=5),
    "key": st.sampled_from(["k1", "k2"]),
    "group": st.just("g"),
}
VALID_TASKS = st.sampled_from([fresh, always_fail])
SOON = st.one_of(
    st.floats(-10, 3600),
    st.integers(-10, 3600),
    st.timedeltas(timedelta(seconds=-10), timedelta(hours=1)),
)
AWARE = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=9))]),
)


# -- Config and TaskManager -------------------------------------------------------------

VALID_CONFIG: dict[str, st.SearchStrategy[Any]] = {
    "logger": st.sampled_from([None, logging.getLogger("marionette.fuzz")]),
    "workers": st.integers(1, 3),
    "queue_size": st.integers(1, 100),
    "server_name": st.text(min_size=1, max_size=8).filter(str.strip),
    "limits": st.dictionaries(st.text(min_size=1, max_size=3), st.integers(1, 5), max_size=2),
}


def test_config_fields() -> None:
    """Config(...) with random field values raises a documented error or works."""
    limits_junk = st.one_of(junk(), st.dictionaries(junk().filter(hashable), junk(), max_size=2))

    @FUZZ
    @given(fields=spoil(VALID_CONFIG, limits=limits_junk))
    def run(fields: dict[str, Any]) -> None:
        spoiled = fields.pop("_spoiled")
        fields.pop("opts")
        config = call(Config, **fields)
        if config is None:
            assert spoiled  # the valid baseline is accepted
            return
        assert isinstance(config, Config)
        if config.workers > 4 or config.queue_size > 10**6:
            return  # valid, but too big to start here
        manager = TaskManager(config)
        manager.start()
        try:
            assert manager.queue(fresh).result(WAIT) == "fresh"
        finally:
            manager.stop(timeout=WAIT)

    run()


ENV_NAMES = [
    "MARIONETTE_WORKERS",
    "MARIONETTE_QUEUE_SIZE",
    "MARIONETTE_SERVER_NAME",
    "MARIONETTE_LIMITS",
    "X_WORKERS",
]


def test_config_from_env() -> None:
    """Config.from_env with random prefixes and variable values raises a documented error."""
    values = st.one_of(
        st.text(max_size=12),
        st.integers(-5, 10**20).map(str),
        st.sampled_from(["0", "-3", "1e3", " 7 ", "a=1,b=0", "a=1, b=2", "=1", ",", "a=x"]),
    )

    @FUZZ
    @given(
        prefix=st.sampled_from(["MARIONETTE_", "X_", None, b"X_", 5]),
        environ=st.dictionaries(st.one_of(st.sampled_from(ENV_NAMES), st.text()), values),
    )
    def run(prefix: Any, environ: dict[str, str]) -> None:
        config = call(Config.from_env, prefix, environ=environ)
        assert config is None or isinstance(config, Config)

    run()


def test_task_manager_overrides() -> None:
    """TaskManager(config, **overrides) with random values raises a documented error."""

    @FUZZ
    @given(
        overrides=spoil({**VALID_CONFIG, "config": st.sampled_from([None, Config()])}),
        unknown=st.sampled_from([None] * 7 + ["worker", "timeout", "config"]),
    )
    def run(overrides: dict[str, Any], unknown: str | None) -> None:
        overrides.pop("_spoiled")
        overrides.pop("opts")
        config = overrides.pop("config")
        if unknown is not None:
            overrides[unknown] = 1
        manager = call(TaskManager, config, **overrides)
        if manager is not None:
            assert not manager.is_running()
            assert manager.config.workers == overrides["workers"]

    run()


# -- submissions and their options --------------------------------------------------------


def test_submissions(manager: TaskManager, rec: Recorder) -> None:
    """queue/delay/schedule/wrap_task with random tasks, times, block and options."""

    @FUZZ
    @given(
        how=st.sampled_from(["queue", "delay", "schedule", "wrap_task"]),
        args=spoil(
            {"task": VALID_TASKS, "delay": SOON, "at": AWARE, "block": st.booleans()},
            VALID_OPTIONS,
        ),
    )
    def run(how: str, args: dict[str, Any]) -> None:
        task, opts = args["task"], args["opts"]
        if how == "queue":
            handler = call(manager.queue, task, block=args["block"], **opts)
        elif how == "delay":
            handler = call(manager.delay, args["delay"], task, **opts)
        elif how == "schedule":
            handler = call(manager.schedule, args["at"], task, **opts)
        else:
            handler = call(manager.wrap_task, task, **opts)
            if handler is not None:
                call(manager.queue, handler, block=False)
        assert handler is None or isinstance(handler, TaskHandler)
        settle(manager, rec, handler)

    run()


def test_submitting_a_handler_with_random_arguments(manager: TaskManager, rec: Recorder) -> None:
    """A TaskHandler resubmitted with random times, options or owners raises documented errors."""
    other = TaskManager(workers=1)  # never started: no thread

    @FUZZ
    @given(
        how=st.sampled_from(["queue", "delay", "schedule", "wrap_task"]),
        foreign=st.booleans(),
        when=st.one_of(SOON, AWARE, junk()),
        opts=st.one_of(st.just({}), spoil({}, VALID_OPTIONS).map(lambda args: args["opts"])),
    )
    def run(how: str, foreign: bool, when: Any, opts: dict[str, Any]) -> None:
        handler = (other if foreign else manager).wrap_task(fresh)
        if how == "queue":
            call(manager.queue, handler, **opts)
        elif how == "delay":
            call(manager.delay, when, handler, **opts)
        elif how == "schedule":
            call(manager.schedule, when, handler, **opts)
        else:
            call(manager.wrap_task, handler, **opts)
        call(manager.queue, handler)  # a second submission: ValueError if it was submitted
        settle(manager, rec, handler)

    run()


# Known bug (see the xfail test below): floats(0 < x < 1e-3) as intervals, and starts far
# in the past, overflow the periodic planning. The junk for these is kept clear of that.
PERIODIC_JUNK = junk(
    st.floats(allow_subnormal=False, min_value=-1e6, max_value=1e12)
    | st.sampled_from([math.nan, math.inf, -math.inf])
).filter(
    lambda v: (
        not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e-3)
        and not (isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > 1e6 and v < 0)
        and not (isinstance(v, timedelta) and v.total_seconds() < -1e6)
    )
)
VALID_EVERY: dict[str, st.SearchStrategy[Any]] = {
    "interval": st.one_of(
        st.floats(1e-3, 1e6),
        st.integers(1, 10**6),
        st.timedeltas(timedelta(milliseconds=1), timedelta(days=1)),
    ),
    "task": VALID_TASKS,
    "start": st.one_of(st.none(), st.floats(-1e6, 1e6), AWARE),
    "jitter": st.one_of(st.just(0), st.floats(0, 10), st.timedeltas(timedelta(0), timedelta(1))),
    "fixed_delay": st.booleans(),
    "key": st.sampled_from([None, "tick"]),
}
VALID_CRON: dict[str, st.SearchStrategy[Any]] = {
    "expression": st.sampled_from(
        ["* * * * *", "*/5 * * * * *", "@hourly", "0 0 L * 5#5", "0 12 * * MON-FRI"]
    ),
    "task": VALID_TASKS,
    "tz": st.sampled_from([None, "UTC", "Europe/Berlin", "America/New_York", UTC]),
    "key": st.sampled_from([None, "tick"]),
}
CRON_JUNK = st.one_of(
    st.sampled_from(["@reboot", "0 0 30 2 *", "61 * * * *", "* * * *", "* * * * * * *"]),
    st.text(max_size=20),
    junk(),
)
ZONE_JUNK = st.one_of(
    st.sampled_from(["Nowhere/City", "", "../etc", "a\x00b", "\ud800", "utc "]), junk()
)


PERIODIC_OPTIONS = {k: VALID_OPTIONS[k] for k in ("retries", "name", "group", "timeout")}


def settle_periodic(manager: TaskManager, rec: Recorder, periodic: object) -> None:
    """What every() or cron() returned: a `Periodic` that cancels for good, or None."""
    assert periodic is None or isinstance(periodic, Periodic)
    settle(manager, rec, periodic)
    if periodic is not None:
        assert periodic.cancelled()
        assert periodic.next_run is None


def test_every(manager: TaskManager, rec: Recorder) -> None:
    """every() with random intervals, tasks, starts, jitters, fixed_delay, keys and options."""

    @FUZZ
    @given(
        args=spoil(VALID_EVERY, PERIODIC_OPTIONS, interval=PERIODIC_JUNK, start=PERIODIC_JUNK),
    )
    def run(args: dict[str, Any]) -> None:
        opts = args["opts"]
        periodic = call(
            manager.every,
            args["interval"],
            args["task"],
            start=args["start"],
            jitter=args["jitter"],
            fixed_delay=args["fixed_delay"],
            key=args["key"],
            **opts,
        )
        settle_periodic(manager, rec, periodic)

    run()


def test_cron(manager: TaskManager, rec: Recorder) -> None:
    """cron() with random expressions, tasks, zones, keys and options."""

    @FUZZ
    @given(
        args=spoil(VALID_CRON, PERIODIC_OPTIONS, expression=CRON_JUNK, tz=ZONE_JUNK),
    )
    def run(args: dict[str, Any]) -> None:
        periodic = call(
            manager.cron,
            args["expression"],
            args["task"],
            tz=args["tz"],
            key=args["key"],
            **args["opts"],
        )
        settle_periodic(manager, rec, periodic)

    run()


def test_reschedule_get_and_set_limit(manager: TaskManager, rec: Recorder) -> None:
    """reschedule(), get() and set_limit() with random targets, times and limits."""
    foreign = TaskManager(workers=1).wrap_task(fresh)  # never started: no thread

    @FUZZ
    @given(
        args=spoil(
            {
                "target": st.sampled_from(["handler", "key", "foreign", "missing"]),
                "when": st.one_of(SOON, AWARE),
                "only_sooner": st.booleans(),
                "key": st.sampled_from(["k", "missing"]),
                "group": st.sampled_from(["g", "new"]),
                "limit": st.integers(1, 10),
            }
        ),
    )
    def run(args: dict[str, Any]) -> None:
        pending = manager.delay(3600, fresh, key="k")
        named = {"handler": pending, "key": "k", "foreign": foreign, "missing": "nope"}
        target = args["target"]
        task = named.get(target, target) if isinstance(target, str) else target
        moved = call(manager.reschedule, task, args["when"], only_sooner=args["only_sooner"])
        assert moved in (None, True, False)
        found = call(manager.get, args["key"])
        assert found is None or isinstance(found, TaskHandler)
        call(manager.set_limit, args["group"], args["limit"])
        settle(manager, rec, pending)
        for name, stats in manager.stats().groups.items():
            assert isinstance(stats.limit, int), name
            assert stats.limit >= 1, name
        manager.set_limit("g", 2)

    run()


def test_listeners_join_and_stop(manager: TaskManager, rec: Recorder) -> None:
    """add_listener(fn, events=), join(timeout) and stop(timeout) with random values."""
    calls: list[object] = []
    kinds = st.one_of(
        st.none(),
        st.sets(st.sampled_from(list(TaskEventKind))),
        st.lists(st.sampled_from(list(TaskEventKind))).map(tuple),
    )

    @FUZZ
    @given(
        args=spoil(
            {
                "fn": st.just(calls.append),
                "events": kinds,
                "join": st.one_of(st.none(), st.floats(0, 1), st.integers(0, 10**9)),
                "stop": st.one_of(st.none(), st.floats(0, WAIT), st.integers(0, 10**12)),
            },
        ),
        stop=st.booleans(),
    )
    def run(args: dict[str, Any], stop: bool) -> None:
        remove = call(manager.add_listener, args["fn"], events=args["events"])
        result = call(manager.join, args["join"])  # idle: returns at once whatever the value
        assert result in (None, True)
        if stop:
            call(manager.stop, args["stop"])
        if remove is not None:
            remove()
            remove()  # twice is harmless
        settle(manager, rec)

    run()


def test_handler_result_exception_and_callbacks(manager: TaskManager, rec: Recorder) -> None:
    """result(timeout), exception(timeout), add_done_callback(fn) with random values."""
    ended = [manager.queue(fresh), manager.queue(always_fail), manager.delay(3600, fresh)]
    assert ended[2].cancel()
    assert manager.join(WAIT)
    # A cancelled handler's result() raises CancelledError, a failed one's its TaskError,
    # and a pending one's TimeoutError: all documented for these two methods.
    allowed: tuple[type[BaseException], ...] = (
        *DOCUMENTED,
        concurrent.futures.CancelledError,
        TimeoutError,
    )

    @FUZZ
    @given(
        which=st.sampled_from(["succeeded", "failed", "cancelled", "pending"]),
        method=st.sampled_from(["result", "exception"]),
        args=spoil(
            {
                "timeout": st.one_of(st.none(), st.floats(-1, 1), st.integers(0, 10**12)),
                "callback": st.just(lambda h: None),
            }
        ),
    )
    def run(which: str, method: str, args: dict[str, Any]) -> None:
        timeout = args["timeout"]
        if which == "pending":
            handler = manager.delay(3600, fresh)
            if is_waitable(timeout):
                timeout = 0  # a real wait would wait: only its validation is fuzzed here
        else:
            handler = ended[["succeeded", "failed", "cancelled"].index(which)]
        try:
            getattr(handler, method)(timeout)
        except allowed as exc:
            note(f"{method}: {type(exc).__name__}")
        call(handler.add_done_callback, args["callback"])
        settle(manager, rec, handler)

    run()


# -- Context --------------------------------------------------------------------------------


def test_context_with_timeout_and_wait() -> None:
    """Context.with_timeout(t) and Context.wait(t) with random values."""
    done = Context()
    done.cancel()

    @FUZZ
    @given(
        root=st.sampled_from(["background", "new", "done"]),
        timeout=st.one_of(st.floats(-10, 100), st.timedeltas(), junk()),
    )
    def run(root: str, timeout: Any) -> None:
        parent = {"background": Context.background(), "new": Context(), "done": done}[root]
        child = call(parent.with_timeout, timeout)
        assert child is None or isinstance(child, Context)
        if child is not None and root == "done":
            assert child.done()
        if not is_waitable(timeout):
            waited = call(Context().wait, timeout)  # not done, and no real wait
            assert waited in (None, False)
        waited = call(done.wait, timeout)  # done already: returns at once
        assert waited in (None, True)

    run()


# -- a standalone Scheduler -------------------------------------------------------------------


def test_standalone_scheduler(rec: Recorder) -> None:
    """Scheduler delay/schedule/reschedule/cancel with random times and items."""
    out = threading.Condition()
    handed: list[object] = []

    def collect(item: object) -> None:
        with out:
            handed.append(item)
            out.notify_all()

    assert call(Scheduler, "not callable") is None
    sched: Scheduler[Any] = Scheduler(collect, rec)
    sched.start()
    try:

        @FUZZ
        @given(
            method=st.sampled_from(["delay", "schedule", "reschedule", "cancel"]),
            args=spoil(
                {
                    "delay": SOON,
                    "at": AWARE,
                    "item": st.one_of(st.text(max_size=3), st.integers()),
                    "only_sooner": st.booleans(),
                }
            ),
        )
        def run(method: str, args: dict[str, Any]) -> None:
            item = args["item"]
            if method == "delay":
                call(sched.delay, args["delay"], item)
            elif method == "schedule":
                call(sched.schedule, args["at"], item)
            elif method == "reschedule":
                call(sched.delay, 3600, "pending")
                when = args["delay"] if hash(str(item)) % 2 else args["at"]
                call(sched.reschedule, "pending", when, only_sooner=args["only_sooner"])
            else:
                call(sched.cancel, item)
            for leftover in sched.items():
                sched.cancel(leftover)
            probe = object()
            sched.delay(0, probe)
            with out:
                assert out.wait_for(lambda: probe in handed, WAIT)
            assert sched.is_running()
            assert rec.internal_errors() == []

        run()
    finally:
        sched.stop()


# -- known bugs ---------------------------------------------------------------------------------


def _beyond_float_calls(manager: TaskManager, pending: TaskHandler) -> dict[str, Callable[[], Any]]:
    sched: Scheduler[str] = Scheduler(lambda item: None)  # never started: no thread
    return {
        "delay": lambda: manager.delay(BEYOND_FLOAT, fresh),
        "backoff": lambda: manager.queue(fresh, backoff=BEYOND_FLOAT),
        "timeout": lambda: manager.queue(fresh, timeout=BEYOND_FLOAT),
        "join": lambda: manager.join(BEYOND_FLOAT),
        "stop": lambda: manager.stop(BEYOND_FLOAT),
        "every": lambda: manager.every(BEYOND_FLOAT, fresh),
        "reschedule": lambda: manager.reschedule(pending, BEYOND_FLOAT),
        "result": lambda: pending.result(BEYOND_FLOAT),
        "with_timeout": lambda: Context().with_timeout(BEYOND_FLOAT),
        "wait": lambda: Context().wait(BEYOND_FLOAT),
        "scheduler.delay": lambda: sched.delay(BEYOND_FLOAT, "x"),
    }


BEYOND_FLOAT_CALLS = [
    "delay",
    "backoff",
    "timeout",
    "join",
    "stop",
    "every",
    "reschedule",
    "result",
    "with_timeout",
    "wait",
    "scheduler.delay",
]


@pytest.mark.parametrize("which", BEYOND_FLOAT_CALLS)
def test_an_int_beyond_the_float_range_raises_a_documented_error(rec: Recorder, which: str) -> None:
    """10**400 seconds is accepted or raises a documented error, as 1e300 does."""
    manager = TaskManager(workers=1, logger=rec)
    manager.start()
    pending = manager.delay(3600, fresh)
    try:
        try:
            made = _beyond_float_calls(manager, pending)[which]()
        except DOCUMENTED:
            made = None
        settle(manager, rec, made, pending)
    finally:
        manager.stop(timeout=WAIT)


@pytest.mark.parametrize(
    "environ",
    [[], 42, {"MARIONETTE_WORKERS": 5}, {"MARIONETTE_LIMITS": 2}],
    ids=["list", "int", "int-workers", "int-limits"],
)
def test_from_env_with_a_bad_environ_raises_a_documented_error(environ: Any) -> None:
    """A wrong environ raises TypeError (or ConfigError), never AttributeError."""
    with pytest.raises(DOCUMENTED):
        Config.from_env(environ=environ)


def test_cron_zone_naming_a_directory_raises_value_error(manager: TaskManager) -> None:
    """tz="America" (a directory of zones, not a zone) raises ValueError."""
    with pytest.raises(ValueError):
        manager.cron("* * * * *", fresh, tz="America")


def test_periodic_interval_below_a_microsecond_is_refused(manager: TaskManager) -> None:
    """every(5e-324) is refused with ValueError: the grid would not advance."""
    with pytest.raises(ValueError, match="interval"):
        manager.every(5e-324, fresh)


@pytest.mark.parametrize(("interval", "start"), [(0.5, -1e308)], ids=["ancient-start"])
def test_periodic_with_extreme_accepted_values_keeps_running(
    rec: Recorder, interval: float, start: float | None
) -> None:
    """An accepted every(...) keeps running: its second run comes, no internal error."""
    manager = TaskManager(workers=1, logger=rec)
    manager.start()
    count = [0]

    def task(ctx: Context) -> None:
        with rec.cond:
            count[0] += 1
            rec.cond.notify_all()

    try:
        periodic = manager.every(interval, task, start=start)
        with rec.cond:  # the second run, or the scheduler logging its failure
            rec.cond.wait_for(lambda: count[0] >= 2 or bool(rec.internal_errors()), WAIT)
        periodic.cancel()
        assert rec.internal_errors() == []
        assert count[0] >= 2
    finally:
        manager.stop(timeout=WAIT)

"""Registered tasks (in memory): @tm.task, RegisteredTask, bind, the shortcuts, options."""

from __future__ import annotations

import types
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import freezegun.api
import pytest
from conftest import WAIT

from marionette import (
    Context,
    RegisteredTask,
    Task,
    TaskError,
    TaskManager,
    TaskState,
)

Clock = freezegun.api.FrozenDateTimeFactory


# -- helpers -----------------------------------------------------------------------


def send_email(ctx: Context, to: str, *, retry: bool = False) -> str:
    """A task with a positional and a keyword-only argument."""
    return f"sent to {to}" + (" (retry)" if retry else "")


def other_send(ctx: Context, to: str) -> str:
    return f"other {to}"


def flaky(ctx: Context) -> int:
    """Fails its first attempt, then returns the attempt number."""
    if ctx.attempt == 1:
        raise OSError("flaky")
    return ctx.attempt


def copy_of(fn: types.FunctionType) -> types.FunctionType:
    """A copy of `fn`, as a module imported twice (or reloaded) makes: another object,
    the same qualified name and code."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
    copy.__qualname__ = fn.__qualname__
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


# -- registration ------------------------------------------------------------------


def test_bare_decorator_registers_under_module_and_qualified_name(tm: TaskManager) -> None:
    """@tm.task registers the function under f"{__module__}.{__qualname__}"."""

    @tm.task
    def report(ctx: Context, day: str) -> str:
        return day

    qualname = "test_bare_decorator_registers_under_module_and_qualified_name.<locals>.report"
    assert isinstance(report, RegisteredTask)
    assert report.name == f"{__name__}.{qualname}"
    assert tm._registry[report.name] is report
    assert repr(report) == f"<RegisteredTask {report.name}>"


def test_decorator_with_options_and_a_custom_name(tm: TaskManager) -> None:
    """@tm.task(name=..., **opts) registers under that name with those default options."""

    @tm.task(name="app.tasks.send", retries=2)
    def send(ctx: Context, to: str) -> str:
        return to

    assert send.name == "app.tasks.send"
    assert dict(send.defaults) == {"retries": 2}
    assert tm._registry["app.tasks.send"] is send
    assert repr(send) == "<RegisteredTask app.tasks.send>"


def test_task_called_with_a_function_registers_it(tm: TaskManager) -> None:
    """tm.task(fn) and tm.task(fn, name=..., **opts) register without decorator syntax."""
    plain = tm.task(send_email)
    named = tm.task(other_send, name="other", timeout=5)
    assert plain.name == f"{__name__}.send_email"
    assert named.name == "other"
    assert dict(named.defaults) == {"timeout": 5}
    assert set(tm._registry) == {plain.name, "other"}


def test_calling_it_calls_the_function_itself(tm: TaskManager) -> None:
    """A registered task stays a plain function: rt(ctx, ...) calls fn in this thread."""
    rt = tm.task(send_email)
    assert rt(Context.background(), "a@b.c", retry=True) == "sent to a@b.c (retry)"
    assert rt.fn is send_email
    assert tm.stats().submitted == 0


def test_another_function_under_a_taken_name_raises(tm: TaskManager) -> None:
    """Registering a different function under a taken name raises ValueError; the first stays."""
    first = tm.task(send_email, name="mail")
    with pytest.raises(ValueError, match="'mail' is taken"):
        tm.task(other_send, name="mail")
    assert tm._registry["mail"] is first


def test_the_same_function_again_is_idempotent(tm: TaskManager) -> None:
    """The same function (or its copy, as a module imported twice makes) under the same
    name registers again without error, equal to the first registration."""
    first = tm.task(send_email, retries=1)
    again = tm.task(send_email, retries=1)
    copied = tm.task(copy_of(send_email), retries=1)  # type: ignore[arg-type]
    assert again is first
    assert copied is first
    assert tm._registry == {first.name: first}


def test_the_same_function_with_other_options_raises(tm: TaskManager) -> None:
    """An entry never changes: the same function under its name with other options
    raises ValueError, and the registered options stay."""
    first = tm.task(send_email, retries=1)
    with pytest.raises(ValueError, match="registered with options"):
        tm.task(send_email, retries=2)
    assert tm._registry == {first.name: first}
    assert dict(first.defaults) == {"retries": 1}


def test_registered_tasks_are_equal_by_manager_name_function_and_options(
    make: Callable[..., TaskManager],
) -> None:
    """Equality (and hash) follow the manager, the name, the function and the options."""
    one, two = make(start=False), make(start=False)
    rt = one.task(send_email)
    assert rt == rt.options()
    assert hash(rt) == hash(rt.options())
    assert rt != rt.options(retries=2)
    assert rt != two.task(send_email)
    assert rt != one.task(send_email, name="other")


def test_invalid_options_at_registration_raise_at_once(tm: TaskManager) -> None:
    """A misspelled or invalid option fails at decoration time, before any function."""
    with pytest.raises(TypeError, match="unknown task option"):
        tm.task(retrys=3)
    with pytest.raises(TypeError, match="unknown task option"):
        tm.task(send_email, retrys=3)
    with pytest.raises(ValueError, match="retries must not be negative"):
        tm.task(retries=-1)
    assert tm._registry == {}


def test_functions_that_cannot_be_registered_raise_type_error(tm: TaskManager) -> None:
    """A task must take the context first, be callable, and get a non-empty str name."""
    with pytest.raises(TypeError, match="first positional argument"):
        tm.task(lambda: 1)  # type: ignore[arg-type, misc]
    with pytest.raises(TypeError, match="must be a function"):
        tm.task(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        tm.task(name="")(send_email)
    assert tm._registry == {}


# -- bind --------------------------------------------------------------------------


def test_bind_makes_a_task_naming_its_call(tm: TaskManager) -> None:
    """A Call is a Task (the runtime protocol) whose do(ctx) calls fn with its arguments."""
    rt = tm.task(send_email)
    call = rt.bind("a@b.c", retry=True)
    assert isinstance(call, Task)
    assert call.task is rt
    assert call.args == ("a@b.c",)
    assert call.kwargs == {"retry": True}
    assert str(call) == rt.name
    assert call.do(Context.background()) == "sent to a@b.c (retry)"
    assert repr(call) == f"<Call {rt.name}('a@b.c', retry=True)>"


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "missing 1 required positional argument: 'to'"),
        (("a", "b"), {}, "takes 2 positional arguments but 3 were given"),
        (("a",), {"retyr": True}, "unexpected keyword argument 'retyr'"),
        ((), {"to": "a", "ctx": None}, "multiple values for argument 'ctx'"),
    ],
    ids=["missing", "extra", "wrong-keyword", "ctx-twice"],
)
def test_bind_checks_the_arguments_before_any_submission(
    tm: TaskManager, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    """Arguments that do not fit fn's signature raise TypeError at bind and at each
    shortcut, and nothing is submitted."""
    rt = tm.task(send_email)
    with pytest.raises(TypeError, match=message):
        rt.bind(*args, **kwargs)
    with pytest.raises(TypeError, match=message):
        rt.queue(*args, **kwargs)
    with pytest.raises(TypeError, match=message):
        rt.delay(1, *args, **kwargs)
    with pytest.raises(TypeError, match=message):
        rt.schedule(datetime.now(UTC), *args, **kwargs)
    assert tm.stats().submitted == 0


# -- the shortcuts -----------------------------------------------------------------


def test_queue_runs_it_with_its_arguments_under_the_registered_name(tm: TaskManager) -> None:
    """rt.queue(...) runs fn with those arguments; the handler and ctx.task_name carry
    the registered name."""

    @tm.task(name="app.whoami")
    def whoami(ctx: Context, a: int, *, b: int) -> tuple[str | None, int]:
        return ctx.task_name, a + b

    handler = whoami.queue(1, b=2)
    assert handler.result(WAIT) == ("app.whoami", 3)
    assert handler.name == "app.whoami"
    assert str(handler) == "app.whoami"


def test_queueing_a_bound_call_runs_it(tm: TaskManager) -> None:
    """tm.queue(rt.bind(...)) runs fn with those arguments, like rt.queue(...)."""
    rt = tm.task(send_email)
    handler = tm.queue(rt.bind("x@y.z", retry=True))
    assert handler.result(WAIT) == "sent to x@y.z (retry)"
    assert handler.name == rt.name


def test_delay_runs_it_with_its_arguments_once_due(frozen: Clock, tm: TaskManager) -> None:
    """rt.delay(d, ...) waits for its delay, then runs fn with those arguments."""
    rt = tm.task(send_email)
    handler = rt.delay(5, "a@b.c", retry=True)
    frozen.tick(4.5)
    tm.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    frozen.tick(0.5)
    tm.scheduler.wake()
    assert handler.result(WAIT) == "sent to a@b.c (retry)"


def test_schedule_runs_it_with_its_arguments_at_its_time(frozen: Clock, tm: TaskManager) -> None:
    """rt.schedule(at, ...) waits for that time, then runs fn with those arguments."""
    rt = tm.task(send_email)
    handler = rt.schedule(datetime.now(UTC) + timedelta(seconds=30), to="a@b.c")
    frozen.tick(29.5)
    tm.scheduler.wake()
    assert handler.state is TaskState.SCHEDULED
    frozen.tick(0.5)
    tm.scheduler.wake()
    assert handler.result(WAIT) == "sent to a@b.c"


# -- options -----------------------------------------------------------------------


def test_registered_retries_apply(tm: TaskManager) -> None:
    """A task registered with retries=1 that fails once succeeds on its second attempt."""
    rt = tm.task(flaky, retries=1, backoff=0)
    handler = rt.queue()
    assert handler.result(WAIT) == 2
    assert handler.attempts == 2


def test_submission_options_override_registered_ones(tm: TaskManager) -> None:
    """Options given to tm.queue(call, ...) win over the registered ones."""
    rt = tm.task(flaky, retries=1, backoff=0)
    handler = tm.queue(rt.bind(), retries=0, name="no-retry")
    with pytest.raises(TaskError):
        handler.result(WAIT)
    assert handler.attempts == 1
    assert handler.name == "no-retry"


def test_registered_timeout_gives_each_attempt_a_deadline(tm: TaskManager) -> None:
    """A task registered with timeout= gets a context with that deadline."""

    @tm.task(timeout=30)
    def remaining(ctx: Context) -> float | None:
        return ctx.remaining()

    left = remaining.queue().result(WAIT)
    assert left is not None
    assert 0 < left <= 30
    assert remaining.options(timeout=None).queue().result(WAIT) is None


def test_registered_key_keeps_one_pending_instance(tm: TaskManager) -> None:
    """A key given at registration dedups its submissions; a submission's key= wins."""
    rt = tm.task(send_email, key="mail")
    first = rt.delay(60, "a")
    assert rt.delay(60, "b") is first
    assert tm.queue(rt.bind("c"), key="mail") is first
    other = tm.delay(60, rt.bind("d"), key="other")
    assert other is not first
    assert tm.get("mail") is first
    assert first.cancel()
    assert other.cancel()


def test_options_returns_a_copy_with_more_options(tm: TaskManager) -> None:
    """rt.options(...) merges over the registered options into a copy that shares name
    and function; the original and the registry are unchanged."""
    rt = tm.task(flaky, retries=0)
    more = rt.options(retries=1, backoff=0)
    assert isinstance(more, RegisteredTask)
    assert (more.name, more.fn) == (rt.name, rt.fn)
    assert dict(more.defaults) == {"retries": 1, "backoff": 0}
    assert dict(rt.defaults) == {"retries": 0}
    assert tm._registry[rt.name] is rt
    assert more.queue().result(WAIT) == 2
    with pytest.raises(TaskError):
        rt.queue().result(WAIT)


def test_options_of_a_bound_copy_reach_every_submission_path(tm: TaskManager) -> None:
    """A call of an .options() copy carries its options to wrap_task and to tm.queue."""
    rt = tm.task(send_email).options(name="mail label", key="user:42")
    wrapped = tm.wrap_task(rt.bind("a"))
    assert wrapped.name == "mail label"
    first = rt.delay(60, "b")
    assert tm.queue(rt.bind("c")) is first
    assert first.cancel()


def test_options_validates_at_once(tm: TaskManager) -> None:
    """rt.options() with an unknown or invalid option raises before any submission."""
    rt = tm.task(send_email)
    with pytest.raises(TypeError, match="unknown task option"):
        rt.options(retrys=2)
    with pytest.raises(ValueError, match="timeout must be positive"):
        rt.options(timeout=0)
    assert dict(rt.defaults) == {}

"""Registered tasks: ``@tm.task``, `RegisteredTask`, and the calls it binds.

A function cannot travel between processes, so a task that may run in another one is
registered by name: ``@tm.task`` keeps ``fn(ctx, *args, **kwargs)`` in its manager's
registry (`TaskManager._registry`, a dict from name to `RegisteredTask`) with the
default options it was registered with. `RegisteredTask.bind` checks a call's
arguments against ``fn``'s signature at once and makes a `Call`: a `Task` that names
its registered task, its arguments and its keyword arguments, which is what the Redis
backend stores; the in-memory backend runs it as any `Task` object.

The options merge is the manager's (the in-memory backend's is in ``_prepare``): the
options of the `RegisteredTask` a `Call` came from are the defaults, and the options
given at submission win over them. So ``tm.queue(rt.bind(1))`` and ``rt.queue(1)`` do
the same.

Locking. The registry is written under the manager's `_lock` (only `register` does)
and read without it: a dict read is atomic, and an entry, once made, never changes.
"""

from __future__ import annotations

import inspect
import reprlib
import types
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar

from .context import Context
from .handler import TaskHandler, parse_options

if TYPE_CHECKING:
    from .manager import TaskManager

__all__ = ["Call", "RegisteredTask", "register"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

#: Stands for the attempt's `Context` when a call's arguments are checked.
_CTX = object()


class RegisteredTask(Generic[P, R]):
    """A function registered by name on a manager, with default options.

    Made by ``@tm.task``; any thread may use it. Calling it calls the function itself
    (``rt(ctx, 1, x=2)``: it stays a plain function for tests). `bind` makes a
    submittable call; `queue`, `delay` and `schedule` submit one to the manager it
    was registered on, with the registered options; `options` makes a copy with more
    options. Two are equal when they name the same task on the same manager with the
    same function and options.
    """

    __slots__ = ("__wrapped__", "_check", "_fn", "_manager", "_name", "_opts", "_signature")

    def __init__(
        self,
        manager: TaskManager,
        fn: Callable[Concatenate[Context, P], R],
        name: str,
        opts: Mapping[str, Any],
        signature: inspect.Signature,
    ) -> None:
        self._manager = manager
        self._fn = fn
        self._name = name
        # Validated, and kept as given: the manager merges a submission's options
        # over them and validates the result once (see `defaults`).
        self._opts: Mapping[str, Any] = types.MappingProxyType(dict(opts))
        self._signature = signature
        # Binds arguments as `fn` would, without running it (`checker`).
        self._check = checker(signature, getattr(fn, "__name__", "check"))
        #: For `inspect.signature`, `inspect.unwrap` and documentation tools.
        self.__wrapped__ = fn

    @property
    def name(self) -> str:
        """The registry name; also the default label in logs (``handler.name``,
        ``ctx.task_name``) of what it submits."""
        return self._name

    @property
    def fn(self) -> Callable[Concatenate[Context, P], R]:
        """The registered function."""
        return self._fn

    @property
    def defaults(self) -> Mapping[str, Any]:
        """The options it submits with (read-only): those given at registration, with
        those added by `options`. A submission's own options win over them."""
        return self._opts

    def __call__(self, ctx: Context, /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function itself, in the calling thread: ``fn(ctx, *args, **kwargs)``."""
        return self._fn(ctx, *args, **kwargs)

    def bind(self, /, *args: P.args, **kwargs: P.kwargs) -> Call[R]:
        """A submittable call of this task with these arguments (nothing is submitted).

        The arguments are checked against the function's signature at once: a
        missing, extra or unknown one raises `TypeError` here, before any
        submission. Submit the call with ``tm.queue(call, **opts)`` (or `delay`,
        `schedule`, `every`, `cron`): the registered options apply, and the ones
        given there win.
        """
        try:
            self._check(_CTX, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self._name}: {exc}") from None
        return Call(self, args, kwargs)

    def queue(self, /, *args: P.args, **kwargs: P.kwargs) -> TaskHandler[R]:
        """``tm.queue(self.bind(*args, **kwargs))``: run it as soon as a worker is free.

        Blocks while the manager's queue is full, as `TaskManager.queue` does.
        """
        return self._manager.queue(self.bind(*args, **kwargs))

    def delay(
        self, delay: float | timedelta, /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskHandler[R]:
        """``tm.delay(delay, self.bind(*args, **kwargs))``: run it on or after `delay`
        seconds (or a `timedelta`) from now. Never blocks."""
        return self._manager.delay(delay, self.bind(*args, **kwargs))

    def schedule(self, at: datetime, /, *args: P.args, **kwargs: P.kwargs) -> TaskHandler[R]:
        """``tm.schedule(at, self.bind(*args, **kwargs))``: run it on or after the aware
        `datetime` `at`. Never blocks."""
        return self._manager.schedule(at, self.bind(*args, **kwargs))

    def options(self, /, **opts: Any) -> RegisteredTask[P, R]:
        """A copy with `opts` merged over its options (``rt.options(key="user:42",
        retries=5).queue(42)``); this one is left as it is.

        The options are validated at once (`TypeError`, `ValueError`). The copy has
        the same name and function, and is not registered again: the registry keeps
        the task as registered. ``name=`` here is the label in logs, as in a
        submission; the registry name stays.
        """
        merged = {**self._opts, **opts}
        parse_options(merged)
        return RegisteredTask(self._manager, self._fn, self._name, merged, self._signature)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegisteredTask):
            return NotImplemented
        return (
            self._manager is other._manager
            and self._name == other._name
            and same_function(self._fn, other._fn)
            and dict(self._opts) == dict(other._opts)
        )

    def __hash__(self) -> int:
        return hash((id(self._manager), self._name))

    def __repr__(self) -> str:
        return f"<RegisteredTask {self._name}>"


class Call(Generic[R_co]):
    """One call of a registered task: a `Task` whose `do(ctx)` calls
    ``fn(ctx, *args, **kwargs)``. Made by `RegisteredTask.bind`, its arguments already
    checked; ``str(call)`` is the registered name (so the default label in logs)."""

    __slots__ = ("args", "kwargs", "task")

    def __init__(
        self,
        task: RegisteredTask[..., R_co],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        #: The registered task called: its name, function and default options.
        self.task = task
        self.args = args
        self.kwargs = kwargs

    def do(self, ctx: Context) -> R_co:
        """Run one attempt: the registered function with the bound arguments."""
        return self.task._fn(ctx, *self.args, **self.kwargs)

    def __str__(self) -> str:
        return self.task._name

    def __repr__(self) -> str:
        shown = [reprlib.repr(a) for a in self.args]
        shown += [f"{k}={reprlib.repr(v)}" for k, v in self.kwargs.items()]
        return f"<Call {self.task._name}({', '.join(shown)})>"


class _Default:
    """Stands for a parameter's default in the source of a checker."""

    def __repr__(self) -> str:
        return "_d"


def checker(signature: inspect.Signature, name: str = "check") -> Callable[..., None]:
    """A function with `signature`'s parameters (names, kinds, which have defaults) and
    an empty body: calling it checks arguments as the task would, in C, about thirty
    times faster than ``signature.bind`` (which every submission would pay)."""
    parameters = [
        p.replace(annotation=p.empty, default=p.empty if p.default is p.empty else _Default())
        for p in signature.parameters.values()
    ]
    text = str(signature.replace(parameters=parameters, return_annotation=signature.empty))
    namespace: dict[str, Any] = {}
    try:  # named as the function, so that errors read as calling it would
        exec(f"def {name}{text}: pass", {"_d": None}, namespace)
    except SyntaxError:  # not an identifier somewhere: bind the slow way

        def bind(*args: Any, **kwargs: Any) -> None:
            signature.bind(*args, **kwargs)

        return bind
    check: Callable[..., None] = namespace[name]
    return check


def same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether `a` and `b` are one function: the same object, or copies of it (the same
    qualified name and code), as a module imported twice makes (``__main__`` and by
    name, or reloaded unchanged)."""
    if a is b:
        return True
    code = getattr(a, "__code__", None)
    return (
        code is not None
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", object())
        and code == getattr(b, "__code__", None)
    )


def register(
    manager: TaskManager,
    fn: Callable[Concatenate[Context, P], R],
    name: str | None,
    opts: Mapping[str, Any],
) -> RegisteredTask[P, R]:
    """Register `fn` on `manager` under `name` (default: its module and qualified name).

    Raises `TypeError` for a non-callable, for a function that cannot take the
    attempt's context as its first positional argument, for a bad name, and for an
    invalid option (`parse_options`); `ValueError` when another function has the name.
    The same function again under its name (or its copy, from a module imported
    twice) with equal options returns the registered task: an entry never changes,
    so the same function with other options raises `ValueError` too. Takes the
    manager's lock briefly; runs no user code under it.
    """
    if not callable(fn):
        raise TypeError(f"a registered task must be a function fn(ctx, ...), not {fn!r}")
    if name is None:
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str):
            raise TypeError(f"{fn!r} has no __module__ and __qualname__ to be named by: give name=")
        name = f"{module}.{qualname}"
    elif not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, not {name!r}")
    try:
        signature = inspect.signature(fn)
    except ValueError as exc:  # a builtin without a signature
        raise TypeError(f"cannot register {fn!r}: {exc}") from None
    try:
        signature.bind_partial(_CTX)
    except TypeError:
        raise TypeError(
            f"cannot register {fn!r} as {name}: a task takes the attempt's Context as its "
            f"first positional argument, and its signature is {signature}"
        ) from None
    parse_options(opts)
    task = RegisteredTask(manager, fn, name, opts, signature)
    registry = manager._registry
    with manager._lock:
        existing = registry.get(name)
        if existing is None:
            registry[name] = task
    if existing is None:
        manager._registered(name)
        return task
    if not same_function(existing._fn, fn):
        raise ValueError(
            f"task name {name!r} is taken by {existing._fn!r}: register {fn!r} "
            "under another name (@tm.task(name=...))"
        )
    if existing != task:  # compares option values: user code, so outside the lock
        raise ValueError(
            f"task {name!r} is registered with options {dict(existing._opts)!r}, not "
            f"{dict(opts)!r}: register it once, and use rt.options(...) for variants"
        )
    return existing  # type: ignore[return-value]  # the same function, so the same types

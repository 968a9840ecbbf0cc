"""The library's own threads: who owns them, and stopping them at exit.

Owners. Each thread a manager runs (its workers and its listener thread) is
registered with its manager while it runs. Such a thread must never block on a full
queue (it would wait for itself, or for a manager waiting for it) nor wait for the
work it is part of (`join`, `stop`). The registry is a dict keyed by thread ident;
each entry is written only by the thread it names, and single-key dict operations
are atomic, so readers need no lock.

Exit. marionette's threads are not daemons (a daemon dies mid-task at exit), so a
manager or scheduler the program forgot to stop would keep the process alive
forever. `concurrent.futures` solves the same problem the same way: a hook that
the `threading` module runs before it joins the remaining non-daemon threads.

Fork. A child made by `os.fork()` has only the forking thread. Before the fork,
every manager and scheduler takes all its locks (managers first, then schedulers,
then the context lock: the one lock order used everywhere), so nothing is copied
in the middle of a change; the parent then releases them, and the child first
turns each one into a stopped object that keeps its pending work, then releases
them. This is what the `logging` module does for its own locks.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["current_owner", "forkable", "owned", "owners", "track", "untrack"]

#: Thread ident -> the object (a TaskManager) whose thread it is.
owners: dict[int, object] = {}


@contextmanager
def owned(owner: object) -> Iterator[None]:
    """Register the calling thread as `owner`'s for the duration of the block."""
    ident = threading.get_ident()
    previous = owners.get(ident)  # a task run by exec() inside another task
    owners[ident] = owner
    try:
        yield
    finally:
        if previous is None:
            owners.pop(ident, None)  # gone already in a child made by fork
        else:
            owners[ident] = previous


def current_owner() -> object:
    """The owner of the calling thread, or None for a thread that is not ours."""
    return owners.get(threading.get_ident())


class _Stoppable(Protocol):
    def stop(self) -> None: ...


class _Forkable(Protocol):
    #: Lower ranks take their locks first (managers 0, schedulers 1).
    _fork_rank: int

    def _fork_prepare(self) -> None: ...
    def _fork_parent(self) -> None: ...
    def _fork_child(self) -> None: ...


# Guards `_running`, `_registered` and `_forkables`.
_lock = threading.Lock()
_running: weakref.WeakSet[_Stoppable] = weakref.WeakSet()
_registered = False
_forkables: weakref.WeakSet[_Forkable] = weakref.WeakSet()
# What the fork hooks hold between "before" and "after", in locking order.
_held: list[_Forkable] = []


def forkable(obj: _Forkable) -> None:
    """Make `obj` fork-safe: its `_fork_*` hooks run around every `os.fork()`."""
    with _lock:
        _forkables.add(obj)


def _before_fork() -> None:
    from . import context  # the context lock is the last in the lock order

    _lock.acquire()
    _held[:] = sorted(_forkables, key=lambda obj: obj._fork_rank)
    for obj in _held:
        obj._fork_prepare()
    context._lock.acquire()


def _after_fork_in_parent() -> None:
    from . import context

    context._lock.release()
    for obj in reversed(_held):
        obj._fork_parent()
    _held.clear()
    _lock.release()


def _after_fork_in_child() -> None:
    from . import context

    context._lock.release()
    owners.clear()  # the threads they name do not exist here
    _running.clear()  # nothing runs here, so nothing to stop at exit
    for obj in reversed(_held):
        obj._fork_child()
    _held.clear()
    _lock.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def track(obj: _Stoppable) -> None:
    """Stop `obj` at interpreter exit unless `untrack` is called first."""
    global _registered
    with _lock:
        _running.add(obj)
        if _registered:
            return
        _registered = True
    try:
        # Not in typeshed; stable since 3.9 and what concurrent.futures uses.
        threading._register_atexit(_stop_all)  # type: ignore[attr-defined]
    except RuntimeError:  # the interpreter is already shutting down
        pass


def untrack(obj: _Stoppable) -> None:
    with _lock:
        _running.discard(obj)


def _stop_all() -> None:
    with _lock:
        running = list(_running)
    for obj in running:
        obj.stop()

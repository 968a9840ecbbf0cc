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
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["current_owner", "owned", "owners", "track", "untrack"]

#: Thread ident -> the object (a TaskManager) whose thread it is.
owners: dict[int, object] = {}


@contextmanager
def owned(owner: object) -> Iterator[None]:
    """Register the calling thread as `owner`'s for the duration of the block."""
    ident = threading.get_ident()
    owners[ident] = owner
    try:
        yield
    finally:
        del owners[ident]


def current_owner() -> object:
    """The owner of the calling thread, or None for a thread that is not ours."""
    return owners.get(threading.get_ident())


class _Stoppable(Protocol):
    def stop(self) -> None: ...


# Guards `_running` and `_registered`.
_lock = threading.Lock()
_running: weakref.WeakSet[_Stoppable] = weakref.WeakSet()
_registered = False


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

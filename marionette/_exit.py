"""Stop what is still running when the interpreter exits.

marionette's threads are not daemons (a daemon dies mid-task at exit), so a manager
or scheduler the program forgot to stop would keep the process alive forever.
`concurrent.futures` solves the same problem the same way: a hook that the
`threading` module runs before it joins the remaining non-daemon threads.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol

__all__ = ["track", "untrack"]


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

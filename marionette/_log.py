"""Logging defaults: structlog on top of the standard `logging` module.

A library never configures logging. With no logger given, marionette logs through
the stdlib logger named ``marionette`` with no handler of its own and its level left
at NOTSET, so the application's logging configuration decides what appears; a
fresh program sees warnings and errors through Python's last-resort handler, which
prints only the message, so the message carries the event and every key/value.

`Log` wraps whichever logger is in use with the two things the hot path needs: a
cheap level check before any keyword dict is built, and isolation from a logger that
raises (a broken logger must never break a worker).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

__all__ = ["DEBUG", "ERROR", "INFO", "LOGGER_NAME", "WARNING", "Log", "default_logger"]

LOGGER_NAME = "marionette"
DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR

_logfmt = structlog.processors.LogfmtRenderer()


def _render(logger: object, method: str, event_dict: MutableMapping[str, Any]) -> str:
    """``"event key=value ..."``: readable even where only the message is printed.

    A traceback (from ``exc_info``) follows on the next lines, as stdlib logging does.
    """
    event = str(event_dict.pop("event", ""))
    trace = event_dict.pop("exception", None)
    rest = _logfmt(logger, method, event_dict)
    line = f"{event} {rest}" if rest else event
    return f"{line}\n{trace}" if trace else line


def default_logger(stdlib: logging.Logger | None = None) -> Any:
    """A structlog logger writing rendered messages to a stdlib logger."""
    return structlog.wrap_logger(
        stdlib if stdlib is not None else logging.getLogger(LOGGER_NAME),
        processors=[structlog.processors.format_exc_info, _render],
        wrapper_class=structlog.stdlib.BoundLogger,
    )


def _level_check(logger: Any) -> Callable[[int], bool] | None:
    """The logger's own level test, if it has one (stdlib-style or structlog's)."""
    for name in ("isEnabledFor", "is_enabled_for"):
        check = getattr(logger, name, None)
        if callable(check):
            return check  # type: ignore[no-any-return]
    return None


def _always(level: int) -> bool:
    return True


def _guarded(check: Callable[[int], bool] | None) -> Callable[[int], bool]:
    """`check`, made safe to call: a level test that raises counts as disabled.

    The stdlib's own test is used as it is, since it is on the hot path and cannot
    fail short of a broken interpreter.
    """
    if check is None:
        return _always
    owner = getattr(check, "__self__", None)
    if isinstance(owner, structlog.stdlib.BoundLogger):
        # Skip a level of indirection: ask the stdlib logger it wraps directly.
        owner = getattr(owner, "_logger", owner)
        check = getattr(owner, "isEnabledFor", check)
    if isinstance(owner, logging.Logger):
        return check

    def guarded(level: int) -> bool:
        try:
            return bool(check(level))
        except Exception:
            _report()
            return False

    return guarded


class Log:
    """A bound logger plus a level check; logging errors are reported, never raised.

    Any thread may call it. The wrapped logger's methods run in the calling thread,
    never under a marionette lock.
    """

    __slots__ = ("_logger", "enabled")

    def __init__(self, logger: Any) -> None:
        if logger is None:
            logger = default_logger()
        elif isinstance(logger, logging.Logger):
            logger = default_logger(logger)
        self._logger = logger
        #: ``enabled(level) -> bool``: whether a line at `level` would be emitted
        #: (True when the logger cannot tell). Checked before building a line.
        self.enabled: Callable[[int], bool] = _guarded(_level_check(logger))

    @property
    def logger(self) -> Any:
        """The structlog logger in use."""
        return self._logger

    def bind(self, **values: Any) -> Log:
        """A `Log` whose every line carries `values`."""
        try:
            return Log(self._logger.bind(**values))
        except Exception:  # a broken logger: keep logging through it unbound
            _report()
            return self

    def debug(self, event: str, **values: Any) -> None:
        self._emit(DEBUG, "debug", event, values)

    def info(self, event: str, **values: Any) -> None:
        self._emit(INFO, "info", event, values)

    def warning(self, event: str, **values: Any) -> None:
        self._emit(WARNING, "warning", event, values)

    def error(self, event: str, **values: Any) -> None:
        self._emit(ERROR, "error", event, values)

    def _emit(self, level: int, method: str, event: str, values: dict[str, Any]) -> None:
        if not self.enabled(level):
            return
        try:
            getattr(self._logger, method)(event, **values)
        except Exception:
            _report()
        except BaseException:
            # A logger raising SystemExit or the like: the threads marionette runs
            # must outlive it, but the caller's own thread gets it, as usual.
            if not _ours():
                raise
            _report()


def _ours() -> bool:
    """Is the calling thread one of marionette's (a worker, scheduler or listener)?"""
    return threading.current_thread().name.startswith("marionette-")


def _report() -> None:
    """Tell stderr that the logger itself failed, as `logging.Handler.handleError` does."""
    try:
        sys.stderr.write("marionette: the logger raised while logging:\n")
        traceback.print_exc(file=sys.stderr)
    except Exception:  # stderr itself is gone: nothing is left to tell
        pass

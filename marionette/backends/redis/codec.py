"""What crosses processes on Redis, as data: JSON payloads, options, and errors.

Nothing is ever pickled, and nothing is imported by a name read from Redis. A task's
arguments and result are JSON; its per-submission options are plain values; an error
is its type's name, its message and its traceback text, rebuilt as itself only when
the type is a Python builtin or one of marionette's own errors, and as a `RemoteError`
otherwise. Pure functions of their arguments: this module does not import redis-py,
and any thread may call any of them.
"""

from __future__ import annotations

import builtins
import json
import math
import traceback
from collections.abc import Callable, Mapping
from typing import Any, cast

from marionette._time import seconds
from marionette.errors import (
    BackendUnavailable,
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    MarionetteError,
    NoServerName,
    NoWorkers,
    QueueFull,
    RemoteError,
    TaskManagerStopped,
    Unschedulable,
    WorkerLost,
    describe,
    safe_repr,
    text,
)

__all__ = [
    "CORRUPT_ERROR",
    "MAX_PAYLOAD",
    "CorruptPayload",
    "check_json",
    "decode_call",
    "decode_error",
    "decode_result",
    "encode_call",
    "encode_error",
    "encode_options",
    "encode_result",
]

#: The largest payload (a call's arguments, or a result), in bytes of UTF-8 JSON.
MAX_PAYLOAD = 512 * 1024

#: The deepest nesting of lists and dicts accepted; deeper is taken for a cycle.
_MAX_DEPTH = 100
#: The most UTF-8 bytes kept of an error's message (its head) and traceback (its tail).
_MAX_TEXT = 16 * 1024
#: The type name of the `RemoteError` standing for error data that cannot be read.
CORRUPT_ERROR = "marionette.CorruptError"

_RULE = (
    "on Redis, task arguments, keyword arguments and results must be JSON: "
    "dict with str keys, list, tuple, str, int, float, bool, None"
)


class CorruptPayload(ValueError):
    """A payload read from Redis is not one this codec writes; `reason` says how.

    The backend sends such a payload to the dead letters instead of running it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- JSON values ---------------------------------------------------------------------

# Exact types, looked up in one set: the common case costs a hash, not isinstance calls.
_SCALARS = frozenset({str, int, bool, type(None)})
_isfinite = math.isfinite


def _ok(value: Any, depth: int) -> bool:
    """Whether `value` comes back equal from a JSON round trip (tuples aside).

    The hot path of every submission, so it only answers yes or no; `_fault` finds
    the culprit once the answer is no. Scalar items are tested inline to save a call.
    """
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is float:
        return _isfinite(value)
    if kind is list or kind is tuple:
        if depth >= _MAX_DEPTH:
            return False
        depth += 1
        for item in value:  # noqa: SIM110 (all() over a generator costs twice as much)
            if type(item) not in _SCALARS and not _ok(item, depth):
                return False
        return True
    if kind is dict:
        if depth >= _MAX_DEPTH:
            return False
        depth += 1
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                return False
            if type(item) not in _SCALARS and not _ok(item, depth):
                return False
        return True
    # Subclasses (a StrEnum, an IntEnum, an OrderedDict, a namedtuple) are written as
    # their base type by the json module and compare equal to what comes back.
    if isinstance(value, (str, int)):
        return True
    if isinstance(value, float):
        return _isfinite(value)
    if isinstance(value, (list, tuple)):
        return _ok(list(value), depth)
    if isinstance(value, dict):
        return _ok(dict(value), depth)
    return False


def _noun(value: object) -> str:
    """``"a set"``, ``"an int"``, ``"a datetime.datetime"``: what `value` is, for a message."""
    cls = type(value)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _fault(value: Any, depth: int) -> tuple[str, str]:
    """The path (``"['to'][2]"``) to the first part of `value` that `_ok` rejects, and
    why; only called once `_ok(value, depth)` said no."""
    if isinstance(value, float):
        return "", f"the float {value!r} is not JSON"
    if isinstance(value, (list, tuple, dict)):
        if depth >= _MAX_DEPTH:
            return "", f"{_noun(value)} nested more than {_MAX_DEPTH} deep (a cycle?) is not JSON"
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    return "", f"a dict with {_noun(key)} key ({safe_repr(key)[:40]}) is not JSON"
                if not _ok(item, depth + 1):
                    path, reason = _fault(item, depth + 1)
                    return f"[{key!r}]{path}", reason
        else:
            for index, item in enumerate(value):
                if not _ok(item, depth + 1):
                    path, reason = _fault(item, depth + 1)
                    return f"[{index}]{path}", reason
    return "", f"{_noun(value)} is not JSON"


def _short(path: str) -> str:
    # A cycle's path is a hundred steps long; its start says where the cycle sits.
    return path if len(path) <= 80 else f"{path[:80]}..."


def check_json(value: object, where: str) -> None:
    """Raise `TypeError` unless `value` comes back equal from a JSON round trip.

    Tuples are accepted (they come back as lists); NaN and infinities, dicts with
    keys other than `str`, bytes, sets, datetimes, `Decimal` and other objects are
    not, nor is nesting deeper than 100 levels (a cycle). The message starts with
    `where` (``"the return value of send_email"``) and gives the path to the bad part
    (``"at [0]['when']"``). Cheap for small values: no encoding is done.
    """
    if not _ok(value, 0):
        path, reason = _fault(value, 0)
        at = f" at {_short(path)}" if path else ""
        raise TypeError(f"{where}{at}: {reason} ({_RULE})")


def _unencodable(value: object) -> Any:
    # Reached only if a value changed between the check and the encoding.
    raise TypeError(f"{_noun(value)} is not JSON")


def _encoder(ascii_only: bool) -> Callable[[object], str]:
    """A compact JSON encoder, made once: `json.dumps` with options builds a new
    encoder on every call, and `JSONEncoder.encode` its C half, which costs more than
    the encoding of a small call. Circular references need no check here, since
    `_ok` refuses nesting deeper than _MAX_DEPTH."""
    plain = json.JSONEncoder(
        ensure_ascii=ascii_only, separators=(",", ":"), allow_nan=False, check_circular=False
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (PyPy, a stripped build)
        return plain.encode
    strings = json.encoder.encode_basestring_ascii if ascii_only else json.encoder.encode_basestring
    chunks = make(None, _unencodable, strings, None, ":", ",", False, False, False)

    def encode(value: object) -> str:
        return "".join(chunks(value, 0))

    return encode


_encode = _encoder(ascii_only=False)
_encode_ascii = _encoder(ascii_only=True)


def _dump(value: object, what: str) -> str:
    """Compact JSON of a checked `value`, at most MAX_PAYLOAD bytes as UTF-8."""
    encoded = _encode(value)
    if encoded.isascii():  # O(1) in CPython: the common case is measured for free
        size = len(encoded)
    else:
        try:
            size = len(encoded.encode())
        except UnicodeEncodeError:
            # A lone surrogate (from a file name read with surrogateescape) is no
            # UTF-8; escaped as \\udcxx it is valid JSON and still comes back equal.
            encoded = _encode_ascii(value)
            size = len(encoded)
    if size > MAX_PAYLOAD:
        raise ValueError(
            f"{what} take {size} bytes as JSON, over the {MAX_PAYLOAD} bytes (512 KiB) "
            "a payload may take on Redis"
        )
    return encoded


def _reject_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity; this codec never writes them.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _load(payload: str | bytes) -> Any:
    try:
        if isinstance(payload, (bytes, bytearray)):
            payload = payload.decode()
        return _DECODER.decode(payload)
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeDecodeError included
        raise CorruptPayload(f"not JSON: {text(exc)}") from None


def encode_call(task_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The JSON text of a call's arguments, ``[args, kwargs]``, compact and UTF-8 ready.

    Runs on every submission. An argument that is not JSON (see `check_json`) raises
    `TypeError` naming it and the task (``"kwargs['to'][2] of send_email: a set is not
    JSON ..."``); a payload over `MAX_PAYLOAD` bytes raises `ValueError` with its size.
    `task_name` only labels those messages; the caller stores the name apart.
    """
    if not (_ok(args, 0) and _ok(kwargs, 0)):
        for root, value in (("args", args), ("kwargs", kwargs)):
            if not _ok(value, 0):
                path, reason = _fault(value, 0)
                raise TypeError(f"{root}{_short(path)} of {task_name}: {reason} ({_RULE})")
    return _dump([args, kwargs], f"the arguments of {task_name}")


def decode_call(payload: str | bytes) -> tuple[list[Any], dict[str, Any]]:
    """The arguments and keyword arguments of a call from `encode_call`'s text.

    Tuples come back as lists. Raises `CorruptPayload` for text that is not JSON or
    not ``[list, dict]``.
    """
    data = _load(payload)
    if type(data) is not list or len(data) != 2:
        raise CorruptPayload(f"a call must be [args, kwargs], not {safe_repr(data)[:200]}")
    args, kwargs = data
    if type(args) is not list or type(kwargs) is not dict:
        raise CorruptPayload(f"a call must be [args, kwargs], not {safe_repr(data)[:200]}")
    return args, kwargs


def encode_result(value: object, task_name: str) -> str:
    """The JSON text of a task's return value.

    A value that is not JSON raises `TypeError` (``"the return value of f at [1]:
    ..."``), one over `MAX_PAYLOAD` bytes `ValueError`: the caller fails the task
    for good with it.
    """
    where = f"the return value of {task_name}"
    check_json(value, where)
    return _dump(value, where)


def decode_result(payload: str | bytes) -> Any:
    """A task's return value from `encode_result`'s text; `CorruptPayload` if not JSON."""
    return _load(payload)


# -- options -------------------------------------------------------------------------


def _retries(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"retries must be an int, not {safe_repr(value)}")
    if value < 0:
        raise ValueError(f"retries must not be negative, not {value!r}")
    return value


def _timeout(value: Any) -> float:
    timeout = seconds(value, "timeout")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, not {value!r}")
    return timeout


def _backoff(value: Any) -> float:
    if callable(value):
        raise TypeError(
            f"backoff={safe_repr(value)} is a strategy object, which cannot cross processes: "
            "on Redis, give it at registration (@tm.task(backoff=...)), where every process "
            "registers the same one, or pass backoff as a number of seconds"
        )
    return seconds(value, "backoff", allow_negative=False)


def _error(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, BaseException):
        return text(value)
    raise TypeError(f"error must be an exception or a message, not {safe_repr(value)}")


def _label(option: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise TypeError(f"{option} must be a non-empty str, not {safe_repr(value)}")
        return value

    return check


# The options that are plain data, each with its validator (the value given -> the
# value kept), and the ones that are not, each with the fix for the caller.
_DATA_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "retries": _retries,
    "timeout": _timeout,
    "backoff": _backoff,
    "error": _error,
    "name": _label("name"),
    "key": _label("key"),
    "group": _label("group"),
}
_PROCESS_OPTIONS = {
    option: (
        f"{option}= is a strategy object, which cannot cross processes: on Redis, give it "
        f"at registration (@tm.task({option}=...)), where every process registers the same one"
    )
    for option in ("retry", "stop")
}
_PROCESS_OPTIONS["context"] = (
    "context= cannot cross processes (a Context lives in one process): on Redis, give "
    "timeout= for a deadline and call cancel() on the handler to cancel"
)


def encode_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a submission's options for Redis; return them as plain JSON values.

    Allowed: `retries` (int >= 0), `timeout` (seconds or timedelta, > 0, kept as
    float), `backoff` (seconds or timedelta, >= 0, kept as float: a fixed wait),
    `error` (a message; an exception is kept as its text), `name`, `key` and `group`
    (non-empty str). Options given as None are dropped. Strategy objects (a callable
    `backoff`, `retry`, `stop`) and `context` raise `TypeError` naming the fix, as do
    unknown names; out-of-range values raise `ValueError`.
    """
    if not opts:  # the common case, on every submission
        return {}
    unknown = sorted(set(opts) - _DATA_OPTIONS.keys() - _PROCESS_OPTIONS.keys())
    if unknown:
        raise TypeError(f"unknown task option(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for option, value in opts.items():
        if value is None:
            continue
        check = _DATA_OPTIONS.get(option)
        if check is None:
            raise TypeError(_PROCESS_OPTIONS[option])
        out[option] = check(value)
    return out


# -- errors --------------------------------------------------------------------------

# The builtin exception classes, by name, taken at import: the only types besides
# marionette's own that are rebuilt, so a later change to `builtins` cannot add one.
_BUILTINS: dict[str, type[BaseException]] = {
    name: obj
    for name, obj in vars(builtins).items()
    if isinstance(obj, type)
    and issubclass(obj, BaseException)
    and obj.__module__ == "builtins"
    and obj.__qualname__ == name  # not the aliases (IOError, EnvironmentError)
}

# marionette's own errors. TaskError is a task's outcome, not an attempt's error, and
# a RemoteError travels as the error it stands for.
_OWN: dict[str, type[MarionetteError]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls
    for cls in (
        MarionetteError,
        TaskManagerStopped,
        Unschedulable,
        ConfigError,
        NoWorkers,
        NoServerName,
        QueueFull,
        Cancelled,
        DeadlineExceeded,
        BackendUnavailable,
        WorkerLost,
    )
}

# The attributes of marionette's own errors that are kept besides the message.
_FIELDS: dict[type[BaseException], tuple[str, ...]] = {
    ConfigError: ("field", "value"),
    NoWorkers: ("field", "value"),
    NoServerName: ("field", "value"),
    BackendUnavailable: ("url", "waited"),
    WorkerLost: ("process",),
}


def _head(value: str) -> str:
    """`value` cut to its first _MAX_TEXT bytes of UTF-8, marked with "..." if cut."""
    if len(value) * 4 <= _MAX_TEXT:
        return value
    data = value.encode("utf-8", "surrogatepass")
    if len(data) <= _MAX_TEXT:
        return value
    return data[: _MAX_TEXT - 3].decode("utf-8", "ignore") + "..."


def _tail(value: str) -> str:
    """`value` cut to its last _MAX_TEXT bytes of UTF-8, led by "...\\n" if cut: the
    end of a traceback is where the error was raised."""
    if len(value) * 4 <= _MAX_TEXT:
        return value
    data = value.encode("utf-8", "surrogatepass")
    if len(data) <= _MAX_TEXT:
        return value
    return "...\n" + data[-(_MAX_TEXT - 4) :].decode("utf-8", "ignore")


def _traceback(exc: BaseException) -> str:
    """The formatted traceback, causes and notes included; "" for an exception that
    was never raised and carries nothing more than its type and message."""
    if (
        exc.__traceback__ is None
        and exc.__cause__ is None
        and exc.__context__ is None
        and not getattr(exc, "__notes__", None)
    ):
        return ""
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:  # a broken exception must still be reportable
        return describe(exc)


def _args(exc: BaseException) -> list[Any] | None:
    """`exc.args` if they are JSON and small, to rebuild `exc` from; else None."""
    args = exc.args
    if isinstance(exc, OSError) and exc.filename is not None and len(args) == 2:
        # OSError keeps file names out of .args; put them back, so that a
        # FileNotFoundError is rebuilt with its file name.
        if exc.filename2 is None:
            args = (*args, exc.filename)
        else:
            args = (*args, exc.filename, None, exc.filename2)
    if not _ok(args, 0) or len(_encode(args)) > _MAX_TEXT:
        return None
    return list(args)


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An attempt's error as JSON-able data, for another process to rebuild.

    ``{"type", "message", "traceback"}`` always: the type's qualified name (just the
    name for a builtin, ``"module.Qualname"`` otherwise), the message (its first
    16 KiB) and the formatted traceback, causes and notes included (its last 16 KiB,
    led by "...\\n" when cut; "" for an exception never raised). ``"args"`` when the
    exception's arguments are JSON and small; ``"fields"`` for the attributes of
    marionette's own errors (`WorkerLost.process`, `BackendUnavailable.url`, ...). A
    `RemoteError` is encoded as the error it stands for. Never raises, whatever
    `exc`'s ``__str__`` does.
    """
    if isinstance(exc, RemoteError):
        return {
            "type": text(exc.type_name),
            "message": _head(text(exc.message)),
            "traceback": _tail(text(exc.traceback)),
        }
    cls = type(exc)
    module = text(cls.__module__)
    data: dict[str, Any] = {
        "type": cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}",
        "message": _head(text(exc)),
        "traceback": _tail(_traceback(exc)),
    }
    args = _args(exc)
    if args is not None:
        data["args"] = args
    fields = {
        name: value
        for name in _FIELDS.get(cls, ())
        if (value := getattr(exc, name, None)) is not None and _ok(value, 0)
    }
    if fields:
        data["fields"] = fields
    return data


def _construct(
    cls: type[BaseException], message: str, args: list[Any] | None
) -> BaseException | None:
    """`cls(*args)`, else `cls(message)` (`cls()` for no message), else None."""
    tries = [args] if args is not None else []
    tries.append([message] if message else [])
    for call in tries:
        try:
            return cls(*call)
        except Exception:  # a builtin whose constructor wants other arguments
            continue
    return None


def _own(cls: type[MarionetteError], message: str, fields: Mapping[str, Any]) -> MarionetteError:
    """One of marionette's errors, with its stored message and whatever fields fit."""
    if cls is BackendUnavailable:
        url, waited = fields.get("url"), fields.get("waited")
        rebuilt = BackendUnavailable(
            url if isinstance(url, str) else None,
            waited=waited if type(waited) in (int, float) else None,
        )
        # The message is made from the fields: the stored one wins if they were lost.
        if str(rebuilt) != message:
            rebuilt.args = (message,)
        return rebuilt
    if cls is WorkerLost:
        process = fields.get("process")
        return WorkerLost(message, process=process if isinstance(process, str) else None)
    if issubclass(cls, ConfigError):
        field = fields.get("field")
        return cls(
            message, field=field if isinstance(field, str) else None, value=fields.get("value")
        )
    return cls(message)


def _corrupt(data: object) -> RemoteError:
    return RemoteError(CORRUPT_ERROR, f"undecodable error data: {safe_repr(data)[:200]}")


def decode_error(data: Mapping[str, Any]) -> BaseException:
    """Rebuild an error from `encode_error`'s data, as far as it is safe to.

    A builtin exception type (looked up among the builtins only) or one of
    marionette's own errors is rebuilt as that type, from its stored arguments or
    else its message, with the remote traceback added as a note
    (``"remote traceback:\\n..."``), so ``except* ConnectionError`` works across
    processes. Any other type, or one whose constructor refuses what was stored,
    comes back as a `RemoteError`. No module is ever imported by the stored name.
    Never raises: data that cannot be read gives a `RemoteError` whose type name is
    ``"marionette.CorruptError"``.
    """
    raw = cast(object, data)  # it came from Redis: it may be anything at all
    try:
        if not isinstance(raw, Mapping):
            return _corrupt(raw)
        type_name, message = raw.get("type"), raw.get("message")
        remote_tb, args = raw.get("traceback"), raw.get("args")
        fields = raw.get("fields", {})
    except Exception:  # a Mapping whose get raises
        return _corrupt(raw)
    if (
        not isinstance(type_name, str)
        or not type_name
        or not isinstance(message, str)
        or not isinstance(remote_tb, str)
        or (args is not None and type(args) is not list)
        or not isinstance(fields, Mapping)
    ):
        return _corrupt(raw)
    rebuilt: BaseException | None = None
    builtin = _BUILTINS.get(type_name)
    if builtin is not None:
        rebuilt = _construct(builtin, message, args)
    elif (own := _OWN.get(type_name)) is not None:
        try:
            rebuilt = _own(own, message, fields)
        except Exception:  # fields that fit no constructor
            rebuilt = None
    if rebuilt is None:
        return RemoteError(type_name, message, remote_tb)
    if remote_tb:
        rebuilt.add_note(f"remote traceback:\n{remote_tb}")
    return rebuilt

"""JSON payloads, options and errors as data (marionette/backends/redis/codec.py)."""

from __future__ import annotations

import builtins
import collections
import enum
import errno
import json
import math
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from marionette import (
    BackendUnavailable,
    Cancelled,
    ConfigError,
    Context,
    DeadlineExceeded,
    MarionetteError,
    NoServerName,
    NoWorkers,
    QueueFull,
    RemoteError,
    TaskError,
    TaskManagerStopped,
    Unschedulable,
    WorkerLost,
)
from marionette.backends.redis.codec import (
    CORRUPT_ERROR,
    MAX_PAYLOAD,
    CorruptPayload,
    check_json,
    decode_call,
    decode_error,
    decode_result,
    encode_call,
    encode_error,
    encode_options,
    encode_result,
)

RULE = "on Redis, task arguments, keyword arguments and results must be JSON"


class Color(enum.StrEnum):
    """A str subclass, written to JSON as its value."""

    RED = "red"


class Level(enum.IntEnum):
    """An int subclass, written to JSON as its value."""

    HIGH = 3


Point = collections.namedtuple("Point", "x y")


class PaymentDeclined(Exception):
    """A user exception type: no other process may rebuild it."""


class NeedsTwo(Exception):
    """A user exception whose constructor wants two arguments."""

    def __init__(self, code: int, detail: object) -> None:
        super().__init__(code, detail)


class Unprintable(Exception):
    """An exception whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class BadStr:
    """An object whose ``__str__`` raises, as the argument of a builtin exception."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class ExplodingMapping(Mapping[str, Any]):
    """A mapping whose every read raises."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("unreadable")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("unreadable")

    def __len__(self) -> int:
        return 1


def raise_payment_declined() -> None:
    """Raise a user error from a named function, for the traceback."""
    raise PaymentDeclined("card 42 declined")


def raised(exc: BaseException) -> BaseException:
    """`exc` after it was raised and caught, so that it carries a traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def roundtrip(exc: BaseException) -> BaseException:
    """`exc` encoded, written as JSON, read back and decoded, as another process sees it."""
    return decode_error(json.loads(json.dumps(encode_error(exc))))


def nested(levels: int) -> list[Any]:
    """A list nested `levels` deep: ``[[[]]]`` for 3."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


# -- JSON values: accepted ---------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "text",
        "",
        "é ☃ 𝄞",
        0,
        -7,
        2**70,
        1.5,
        -0.0,
        1e308,
        True,
        False,
        None,
        [],
        {},
        [1, "a", None, [2.5, [True]]],
        {"a": {"b": [1, "x", None]}, "": 0},
    ],
)
def test_every_json_type_is_accepted_and_round_trips(value: object) -> None:
    """Each JSON type, alone or nested, passes the check and comes back equal."""
    check_json(value, "v")
    back = decode_result(encode_result(value, "f"))
    assert back == value
    assert type(back) is type(value)


def test_tuples_come_back_as_lists() -> None:
    """Tuples are accepted anywhere in a call and are read back as lists."""
    args, kwargs = decode_call(encode_call("f", (1, (2, 3)), {"t": (4, ("x",))}))
    assert args == [1, [2, 3]]
    assert kwargs == {"t": [4, ["x"]]}


def test_call_is_compact_json_without_ascii_escapes() -> None:
    """A call is written ``[args, kwargs]`` without spaces, non-ASCII text kept as is."""
    assert encode_call("f", ("a@b.c", 42), {"retry": True}) == '[["a@b.c",42],{"retry":true}]'
    assert encode_call("f", ("é",), {}) == '[["é"],{}]'


def test_call_round_trips_from_str_and_bytes() -> None:
    """`decode_call` reads the text back, from str or from the bytes Redis returns."""
    encoded = encode_call("f", ("a@b.c", 42, {"k": [1.5, None]}), {"retry": True})
    expected = (["a@b.c", 42, {"k": [1.5, None]}], {"retry": True})
    assert decode_call(encoded) == expected
    assert decode_call(encoded.encode()) == expected


def test_subclasses_of_json_types_are_accepted_as_their_base() -> None:
    """A StrEnum, an IntEnum, an OrderedDict and a namedtuple come back equal as plain JSON."""
    value = [Color.RED, Level.HIGH, collections.OrderedDict(a=1), Point(1, 2), {Color.RED: 1}]
    check_json(value, "v")
    back = decode_result(encode_result(value, "f"))
    assert back == ["red", 3, {"a": 1}, [1, 2], {"red": 1}]
    assert type(back[0]) is str


def test_lone_surrogate_round_trips() -> None:
    """A string with a lone surrogate (not UTF-8) is escaped and still comes back equal."""
    encoded = encode_call("f", ("\udcff.txt",), {})
    encoded.encode()  # the text Redis stores must be valid UTF-8
    assert decode_call(encoded) == (["\udcff.txt"], {})


def test_nesting_up_to_a_hundred_levels_is_accepted() -> None:
    """A value nested 100 levels deep passes; one level more is refused."""
    check_json(nested(100), "v")
    with pytest.raises(TypeError, match="nested more than 100 deep"):
        check_json(nested(101), "v")


# -- JSON values: refused ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "noun"),
    [
        ({1, 2}, "a set"),
        (frozenset(), "a frozenset"),
        (b"x", "a bytes"),
        (bytearray(b"x"), "a bytearray"),
        (datetime(2024, 1, 1, tzinfo=UTC), "a datetime.datetime"),
        (Decimal("1.5"), "a decimal.Decimal"),
        (1j, "a complex"),
        (object(), "an object"),
        (print, "a builtin_function_or_method"),
        (Context.background(), "a marionette.context.Context"),
    ],
)
def test_non_json_argument_is_refused_by_name(value: object, noun: str) -> None:
    """A non-JSON argument raises TypeError naming it, the task, its kind and the rule."""
    with pytest.raises(TypeError) as info:
        encode_call("send_email", ("ok", value), {})
    assert str(info.value).startswith(f"args[1] of send_email: {noun} is not JSON ({RULE}")


def test_nested_keyword_argument_is_refused_with_its_path() -> None:
    """A set deep in a keyword argument is named by its path, ``kwargs['to'][2]``."""
    with pytest.raises(TypeError, match=r"^kwargs\['to'\]\[2\] of send_email: a set is not JSON"):
        encode_call("send_email", (), {"to": ["a", "b", {"c"}]})


def test_nested_positional_argument_is_refused_with_its_path() -> None:
    """A datetime in a dict in an argument is named by its path, ``args[0]['k']``."""
    value = {"ok": 1, "k": datetime(2024, 1, 1, tzinfo=UTC)}
    with pytest.raises(TypeError, match=r"^args\[0\]\['k'\] of f: a datetime.datetime is not"):
        encode_call("f", (value,), {})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_refused(bad: float) -> None:
    """NaN and the infinities are not JSON, anywhere in a payload."""
    with pytest.raises(TypeError, match=rf"^args\[0\]\['x'\] of f: the float {bad!r} is not JSON"):
        encode_call("f", ({"x": bad},), {})
    with pytest.raises(TypeError, match="the float"):
        check_json([bad], "v")


@pytest.mark.parametrize("key", [1, 1.5, None, True, (1, 2)])
def test_dicts_with_keys_other_than_str_are_refused(key: object) -> None:
    """A dict key that is not a str would come back as a different key: refused."""
    with pytest.raises(TypeError, match=r"^kwargs\['m'\] of f: a dict with an? \w+ key"):
        encode_call("f", (), {"m": {"ok": 1, key: "v"}})


def test_a_cycle_is_refused_not_a_recursion_error() -> None:
    """A list containing itself raises TypeError with a short path, not RecursionError."""
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(TypeError, match=r"a cycle\?") as info:
        encode_call("f", (cycle,), {})
    assert len(str(info.value)) < 400


def test_check_json_names_where_and_path() -> None:
    """`check_json` starts the message with `where` and gives the path to the bad part."""
    value = [1, {"when": datetime(2024, 1, 1, tzinfo=UTC)}]
    with pytest.raises(TypeError) as info:
        check_json(value, "the return value of report")
    assert str(info.value).startswith(
        "the return value of report at [1]['when']: a datetime.datetime is not JSON ("
    )
    with pytest.raises(TypeError, match=r"^the return value of report: a set is not JSON"):
        check_json({1}, "the return value of report")


def test_non_json_result_is_refused_naming_the_task() -> None:
    """`encode_result` refuses a return value that is not JSON, naming the task."""
    with pytest.raises(TypeError, match=r"^the return value of report at \[0\]: a bytes is not"):
        encode_result([b"pdf"], "report")


@st.composite
def any_value(draw: st.DrawFn) -> Any:
    """Values that are JSON, and values that are not, mixed at any depth."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=5)
        | st.binary(max_size=2)
        | st.sets(st.integers(), max_size=2)
    )
    return draw(
        st.recursive(
            leaves,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.tuples(inner, inner)
                | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3)
            ),
            max_leaves=10,
        )
    )


def untuple(value: Any) -> Any:
    """`value` with every tuple turned into a list, as JSON reads it back."""
    if isinstance(value, (list, tuple)):
        return [untuple(item) for item in value]
    if isinstance(value, dict):
        return {key: untuple(item) for key, item in value.items()}
    return value


@given(any_value())
def test_accepted_exactly_when_a_json_round_trip_gives_it_back(value: Any) -> None:
    """`check_json` accepts a value if and only if json gives it back equal (tuples aside)."""
    try:
        back = json.loads(json.dumps(value, allow_nan=False))
        survives = back == untuple(value)
    except (TypeError, ValueError):
        survives = False
    try:
        check_json(value, "v")
        accepted = True
    except TypeError:
        accepted = False
    assert accepted == survives
    if accepted:
        assert decode_result(encode_result(value, "f")) == untuple(value)


# -- the size cap --------------------------------------------------------------------

# '[["' + text + '"],{}]': the bytes a one-string call adds around its string.
FRAME = len('[[""],{}]')


def test_payload_of_exactly_the_cap_is_accepted() -> None:
    """A call of exactly 512 KiB of JSON is accepted."""
    encoded = encode_call("f", ("x" * (MAX_PAYLOAD - FRAME),), {})
    assert len(encoded.encode()) == MAX_PAYLOAD == 512 * 1024


def test_payload_one_byte_over_the_cap_is_refused_with_its_size() -> None:
    """A call one byte over 512 KiB raises ValueError giving its size and the task."""
    with pytest.raises(ValueError, match=r"^the arguments of f take 524289 bytes as JSON, over"):
        encode_call("f", ("x" * (MAX_PAYLOAD - FRAME + 1),), {})


def test_payload_size_counts_utf8_bytes_not_characters() -> None:
    """Non-ASCII text is measured in UTF-8 bytes: fewer characters than the cap can exceed it."""
    chars = (MAX_PAYLOAD - FRAME) // 2 + 1  # 2 bytes each
    assert chars + FRAME < MAX_PAYLOAD
    with pytest.raises(ValueError, match=f"take {chars * 2 + FRAME} bytes"):
        encode_call("f", ("é" * chars,), {})


def test_result_over_the_cap_is_refused() -> None:
    """A return value over 512 KiB of JSON raises ValueError naming the task."""
    assert encode_result("x" * (MAX_PAYLOAD - 2), "report")
    with pytest.raises(ValueError, match=r"^the return value of report take"):
        encode_result("x" * (MAX_PAYLOAD - 1), "report")


# -- decoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        '[["a"],{}',
        b"\xff\xfe[]",
        "NaN",
        "[[NaN],{}]",
        "[[Infinity],{}]",
        "{}",
        "[]",
        "[[],{},3]",
        "[{},[]]",
        "[[],[]]",
        '["a",{}]',
        "null",
        cast(Any, None),
    ],
)
def test_bad_call_payload_raises_corrupt_payload(payload: str | bytes) -> None:
    """Text that is not JSON, or not ``[list, dict]``, raises CorruptPayload with a reason."""
    with pytest.raises(CorruptPayload) as info:
        decode_call(payload)
    assert isinstance(info.value, ValueError)
    assert info.value.reason
    assert str(info.value) == info.value.reason


@pytest.mark.parametrize("payload", ["", "{", b"\xc3", "NaN", "[1] 2"])
def test_bad_result_payload_raises_corrupt_payload(payload: str | bytes) -> None:
    """A result that is not JSON raises CorruptPayload."""
    with pytest.raises(CorruptPayload, match=r"^not JSON"):
        decode_result(payload)


def test_result_decodes_from_bytes() -> None:
    """`decode_result` reads the bytes Redis returns."""
    assert decode_result(b'{"a":[1,"\xc3\xa9"]}') == {"a": [1, "é"]}


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        ({"retries": 3}, {"retries": 3}),
        ({"retries": 0}, {"retries": 0}),
        ({"timeout": 1.5}, {"timeout": 1.5}),
        ({"timeout": 2}, {"timeout": 2.0}),
        ({"timeout": timedelta(seconds=2)}, {"timeout": 2.0}),
        ({"backoff": 2}, {"backoff": 2.0}),
        ({"backoff": 0}, {"backoff": 0.0}),
        ({"backoff": timedelta(milliseconds=500)}, {"backoff": 0.5}),
        ({"key": "user:42"}, {"key": "user:42"}),
        ({"group": "http"}, {"group": "http"}),
        ({"name": "charge"}, {"name": "charge"}),
        ({"error": "card not charged"}, {"error": "card not charged"}),
        ({"error": PaymentDeclined("declined")}, {"error": "declined"}),
        ({"retries": 2, "key": "k", "timeout": 1}, {"retries": 2, "key": "k", "timeout": 1.0}),
    ],
)
def test_each_data_option_is_kept_as_plain_json(
    opts: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Every option allowed on Redis is validated and returned as a plain JSON value."""
    out = encode_options(opts)
    assert out == expected
    assert [type(v) for v in out.values()] == [type(v) for v in expected.values()]
    check_json(out, "options")


def test_options_given_as_none_are_dropped() -> None:
    """None means "not given", for every option, strategies and context included."""
    assert encode_options({"retries": None, "key": None, "retry": None, "context": None}) == {}
    assert encode_options({}) == {}


@pytest.mark.parametrize(
    ("option", "value", "fix"),
    [
        ("backoff", tenacity.wait_fixed(1), r"@tm\.task\(backoff=\.\.\.\)"),
        ("backoff", lambda state: 1.0, r"or pass backoff as a number of seconds"),
        ("retry", tenacity.retry_if_exception_type(OSError), r"@tm\.task\(retry=\.\.\.\)"),
        ("stop", tenacity.stop_after_delay(3), r"@tm\.task\(stop=\.\.\.\)"),
        ("context", Context.background(), r"context= cannot cross processes"),
    ],
)
def test_options_that_are_not_data_are_refused_with_the_fix(
    option: str, value: object, fix: str
) -> None:
    """Strategy objects and contexts raise TypeError naming the option and the fix."""
    with pytest.raises(TypeError, match=fix) as info:
        encode_options({option: value})
    assert str(info.value).startswith(f"{option}=")


def test_unknown_options_are_named() -> None:
    """Unknown option names raise TypeError listing them, sorted."""
    with pytest.raises(TypeError, match=r"^unknown task option\(s\): bogus, retires$"):
        encode_options({"retires": 3, "key": "k", "bogus": None})


@pytest.mark.parametrize(
    ("opts", "error", "match"),
    [
        ({"retries": -1}, ValueError, "retries must not be negative"),
        ({"retries": True}, TypeError, "retries must be an int"),
        ({"retries": 1.5}, TypeError, "retries must be an int"),
        ({"timeout": 0}, ValueError, "timeout must be positive"),
        ({"timeout": -1}, ValueError, "timeout must be positive"),
        ({"timeout": math.nan}, ValueError, "timeout must be finite"),
        ({"timeout": "1"}, TypeError, "timeout must be a number of seconds"),
        ({"backoff": -0.5}, ValueError, "backoff must not be negative"),
        ({"backoff": math.inf}, ValueError, "backoff must be finite"),
        ({"backoff": "2"}, TypeError, "backoff must be a number of seconds"),
        ({"key": ""}, TypeError, "key must be a non-empty str"),
        ({"group": 3}, TypeError, "group must be a non-empty str"),
        ({"name": b"n"}, TypeError, "name must be a non-empty str"),
        ({"error": 42}, TypeError, "error must be an exception or a message"),
    ],
)
def test_bad_option_values_are_refused(
    opts: dict[str, Any], error: type[Exception], match: str
) -> None:
    """A wrong type raises TypeError, a value out of range ValueError, naming the option."""
    with pytest.raises(error, match=match):
        encode_options(opts)


# -- errors: builtins ----------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError(errno.ECONNRESET, "Connection reset by peer"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        KeyError("x"),
        ValueError("bad value"),
        TimeoutError(),
        SystemExit(3),
        KeyboardInterrupt(),
        OSError("plain"),
    ],
    ids=repr,
)
def test_builtin_errors_are_rebuilt_with_type_and_args(exc: BaseException) -> None:
    """A builtin exception comes back as its own type with the same args and text."""
    back = roundtrip(raised(exc))
    assert type(back) is type(exc)
    assert back.args == exc.args
    assert str(back) == str(exc)


def test_connection_error_keeps_its_errno() -> None:
    """A rebuilt ConnectionError has its errno and strerror, not just a message."""
    back = roundtrip(raised(ConnectionResetError(errno.ECONNRESET, "reset")))
    assert isinstance(back, ConnectionResetError)
    assert back.errno == errno.ECONNRESET
    assert back.strerror == "reset"


def test_system_exit_keeps_its_code() -> None:
    """A rebuilt SystemExit has its exit code."""
    back = roundtrip(SystemExit(3))
    assert isinstance(back, SystemExit)
    assert back.code == 3


def test_file_not_found_keeps_its_file_name() -> None:
    """An OSError's file names, kept out of its args, are carried and rebuilt."""
    exc = raised(FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp/x.txt"))
    back = roundtrip(exc)
    assert isinstance(back, FileNotFoundError)
    assert back.filename == "/tmp/x.txt"
    assert str(back) == str(exc)
    two = roundtrip(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"))
    assert isinstance(two, OSError)
    assert (two.filename, two.filename2) == ("/a", "/b")


def test_builtin_type_name_is_bare_and_data_is_json() -> None:
    """A builtin's type is stored by bare name; the data is JSON with the documented keys."""
    data = encode_error(raised(ValueError("bad")))
    assert data["type"] == "ValueError"
    assert data["message"] == "bad"
    assert data["args"] == ["bad"]
    assert set(data) == {"type", "message", "traceback", "args"}
    check_json(data, "error data")


def test_rebuilt_error_carries_the_remote_traceback_as_a_note() -> None:
    """A rebuilt builtin has a note "remote traceback:" naming the function that raised."""

    def fetch_prices() -> None:
        raise ConnectionError("reset")

    try:
        fetch_prices()
    except ConnectionError as exc:
        back = roundtrip(exc)
    notes = getattr(back, "__notes__", [])
    assert len(notes) == 1
    assert notes[0].startswith("remote traceback:\nTraceback (most recent call last):")
    assert "fetch_prices" in notes[0]


def test_error_never_raised_has_no_traceback_and_no_note() -> None:
    """An exception that was never raised is stored without a traceback, rebuilt without a note."""
    data = encode_error(ValueError("made, not raised"))
    assert data["traceback"] == ""
    assert not hasattr(decode_error(data), "__notes__")


def test_except_star_matches_a_task_error_of_rebuilt_errors() -> None:
    """``except* ConnectionError`` catches a TaskError built from errors read from Redis."""
    rebuilt = [roundtrip(raised(ConnectionError("refused"))), roundtrip(raised(ValueError("x")))]
    errors = [e for e in rebuilt if isinstance(e, Exception)]
    assert len(errors) == 2
    err = TaskError.build(
        errors, attempts=2, duration=1.0, error=None, task_id=7, task_name="app.fetch"
    )
    caught: list[BaseExceptionGroup[BaseException]] = []

    def handle_connection_errors() -> None:
        try:
            raise err
        except* ConnectionError as group:
            caught.append(group)

    with pytest.raises(TaskError) as rest:
        handle_connection_errors()
    assert [str(e) for e in caught[0].exceptions] == ["refused"]
    assert [type(e) for e in rest.value.exceptions] == [ValueError]


def test_builtin_needing_other_arguments_falls_back_to_remote_error() -> None:
    """A builtin with non-JSON args whose constructor refuses a message is a RemoteError."""
    exc = raised(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    data = encode_error(exc)
    assert "args" not in data  # bytes are not JSON
    back = decode_error(data)
    assert isinstance(back, RemoteError)
    assert back.type_name == "UnicodeDecodeError"
    assert back.message == str(exc)
    assert "invalid start byte" in back.traceback


def test_builtin_with_an_unprintable_argument_is_still_rebuilt() -> None:
    """A ValueError whose argument cannot be printed is stored and rebuilt with a placeholder."""
    back = roundtrip(raised(ValueError(BadStr())))
    assert type(back) is ValueError
    assert str(back) == "<unprintable ValueError>"


# -- errors: marionette's own --------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        MarionetteError("base"),
        TaskManagerStopped(),
        Unschedulable("delay is NaN"),
        ConfigError("bad lease", field="lease", value=0.5),
        NoWorkers("workers must be at least 1", field="workers", value=0),
        NoServerName("server_name is empty", field="server_name", value=""),
        QueueFull("queue full"),
        Cancelled(),
        DeadlineExceeded(),
        BackendUnavailable("redis://:pw@cache:6379/0", waited=10.0),
        BackendUnavailable(),
        WorkerLost(process="web-1:4242:ab12"),
        WorkerLost(),
    ],
    ids=repr,
)
def test_marionette_errors_are_rebuilt_as_themselves(exc: MarionetteError) -> None:
    """Each of marionette's errors comes back as its own type, with its message."""
    back = roundtrip(raised(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)


def test_worker_lost_keeps_its_process_and_default_message() -> None:
    """A rebuilt WorkerLost has the documented message and the lost process's id."""
    back = roundtrip(WorkerLost(process="web-1:4242"))
    assert isinstance(back, WorkerLost)
    assert str(back) == "the process running this attempt was lost"
    assert back.process == "web-1:4242"


def test_deadline_exceeded_is_still_a_timeout_error() -> None:
    """A rebuilt DeadlineExceeded is caught by ``except TimeoutError``."""
    with pytest.raises(TimeoutError, match="context deadline exceeded"):
        raise roundtrip(raised(DeadlineExceeded()))


def test_fields_of_marionette_errors_are_kept() -> None:
    """ConfigError's field and value and BackendUnavailable's url and wait come back."""
    config = roundtrip(NoWorkers("workers must be at least 1", field="workers", value=0))
    assert isinstance(config, NoWorkers)
    assert (config.field, config.value) == ("workers", 0)
    backend = roundtrip(BackendUnavailable("redis://:pw@cache/0", waited=10.0))
    assert isinstance(backend, BackendUnavailable)
    assert (backend.url, backend.waited) == ("redis://:***@cache/0", 10.0)
    assert isinstance(backend, ConnectionError)


def test_backend_unavailable_keeps_its_message_when_fields_are_lost() -> None:
    """A BackendUnavailable stored without fields keeps its stored message."""
    data = encode_error(BackendUnavailable("redis://cache/0"))
    del data["fields"]
    back = decode_error(data)
    assert isinstance(back, BackendUnavailable)
    assert str(back) == "Redis at redis://cache/0 could not be reached"
    assert back.url is None


def test_task_error_is_not_rebuilt() -> None:
    """A TaskError raised by a task is an outcome, not an attempt error: it is a RemoteError."""
    err = TaskError.build(
        [ValueError("x")], attempts=1, duration=0.1, error=None, task_id=1, task_name="t"
    )
    back = roundtrip(raised(err))
    assert isinstance(back, RemoteError)
    assert back.type_name == "marionette.errors.TaskError"


# -- errors: everything else is a RemoteError -----------------------------------------


def test_user_exception_is_a_remote_error_with_name_message_and_traceback() -> None:
    """A user exception type comes back as a RemoteError with its name, text and traceback."""
    try:
        raise_payment_declined()
    except PaymentDeclined as exc:
        back = roundtrip(exc)
    assert isinstance(back, RemoteError)
    assert back.type_name == f"{PaymentDeclined.__module__}.PaymentDeclined"
    assert back.message == "card 42 declined"
    assert "raise_payment_declined" in back.traceback
    assert back.traceback.rstrip().endswith("PaymentDeclined: card 42 declined")
    assert str(back) == f"{back.type_name}: card 42 declined"


def test_user_exception_with_two_arguments_is_a_remote_error() -> None:
    """An exception whose constructor needs two arguments comes back as a RemoteError."""
    back = roundtrip(raised(NeedsTwo(402, object())))
    assert isinstance(back, RemoteError)
    assert back.type_name.endswith("NeedsTwo")


def test_nested_class_is_named_by_its_qualified_name() -> None:
    """A class defined in a function is stored with its module and qualified name."""

    class Local(Exception):
        pass

    data = encode_error(Local("x"))
    assert data["type"] == f"{__name__}.{Local.__qualname__}"
    assert "<locals>.Local" in data["type"]


def test_unprintable_exception_is_encoded_and_comes_back() -> None:
    """An exception whose ``__str__`` raises is encoded with a placeholder message."""
    data = encode_error(raised(Unprintable()))
    assert data["message"] == "<unprintable Unprintable>"
    back = decode_error(data)
    assert isinstance(back, RemoteError)
    assert back.message == "<unprintable Unprintable>"


def test_remote_error_travels_as_the_error_it_stands_for() -> None:
    """Encoding a RemoteError again gives the original type, not a RemoteError of one."""
    first = roundtrip(raised(PaymentDeclined("declined")))
    assert isinstance(first, RemoteError)
    second = roundtrip(first)
    assert isinstance(second, RemoteError)
    assert (second.type_name, second.message) == (first.type_name, first.message)
    assert second.traceback == first.traceback


def test_long_traceback_keeps_its_last_16_kib() -> None:
    """A traceback over 16 KiB keeps its end, led by "...\\n"; the message keeps its start."""
    message = "start " + "x" * 40_000 + " end"
    data = encode_error(raised(PaymentDeclined(message)))
    assert data["traceback"].startswith("...\n")
    assert len(data["traceback"].encode()) <= 16 * 1024
    assert data["traceback"].rstrip().endswith(" end")
    assert data["message"].startswith("start ")
    assert data["message"].endswith("...")
    assert len(data["message"].encode()) <= 16 * 1024


def test_large_args_are_not_stored() -> None:
    """Arguments over 16 KiB of JSON are left out; the error is rebuilt from its message."""
    data = encode_error(ValueError("x" * 20_000))
    assert "args" not in data
    back = decode_error(data)
    assert type(back) is ValueError
    assert str(back).endswith("...")


# -- errors: corrupt data and no imports ---------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"type": "ValueError"},
        {"type": "ValueError", "message": "m"},
        {"type": 3, "message": "m", "traceback": ""},
        {"type": "", "message": "m", "traceback": ""},
        {"type": "ValueError", "message": None, "traceback": ""},
        {"type": "ValueError", "message": "m", "traceback": 7},
        {"type": "ValueError", "message": "m", "traceback": "", "args": "m"},
        {"type": "ValueError", "message": "m", "traceback": "", "fields": []},
        ["ValueError", "m", ""],
        "ValueError: m",
        None,
        ExplodingMapping(),
    ],
    ids=repr,
)
def test_corrupt_error_data_gives_a_remote_error(data: Any) -> None:
    """Data that is not what encode_error writes gives a RemoteError; decode_error never raises."""
    back = decode_error(data)
    assert isinstance(back, RemoteError)
    assert back.type_name == CORRUPT_ERROR
    assert back.message.startswith("undecodable error data: ")


def test_own_error_with_fields_of_the_wrong_type_is_still_rebuilt() -> None:
    """Stored fields of the wrong type are ignored, not trusted."""
    data = encode_error(WorkerLost(process="p"))
    data["fields"] = {"process": 42}
    back = decode_error(data)
    assert isinstance(back, WorkerLost)
    assert back.process is None


@pytest.mark.parametrize(
    "type_name",
    [
        "os.system",
        "subprocess.Popen",
        "marionette_test_no_such_module.Boom",
        "eval",
        "exec",
        "print",
        "__import__",
        "IOError",
        "marionette.errors.TaskError",
        "marionette.TaskManager",
    ],
)
def test_decode_error_never_imports_or_calls_by_name(type_name: str) -> None:
    """A type that is not a builtin exception or marionette error is a RemoteError, nothing
    is imported, and no builtin function is called with the stored arguments."""
    before = set(sys.modules)
    data = {
        "type": type_name,
        "message": "m",
        "traceback": "",
        "args": ["__import__('marionette_test_no_such_module')"],
    }
    back = decode_error(data)
    assert set(sys.modules) == before
    assert "marionette_test_no_such_module" not in sys.modules
    assert isinstance(back, RemoteError)
    assert back.type_name == type_name


def test_classes_added_to_builtins_later_are_not_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the builtin exceptions present at import are rebuilt, not ones added since."""

    class Planted(Exception):
        pass

    Planted.__module__ = "builtins"
    Planted.__qualname__ = "Planted"
    monkeypatch.setattr(builtins, "Planted", Planted, raising=False)
    back = decode_error({"type": "Planted", "message": "m", "traceback": ""})
    assert isinstance(back, RemoteError)
    assert back.type_name == "Planted"


def test_the_codec_imports_no_redis_client() -> None:
    """Importing the codec, in a fresh interpreter, does not import redis-py."""
    code = (
        "import sys, marionette.backends.redis.codec\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

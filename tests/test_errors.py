"""The error tree and `TaskError` (marionette/errors.py)."""

from __future__ import annotations

import pytest

from marionette import (
    BackendUnavailable,
    Cancelled,
    ConfigError,
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
from marionette.errors import mask_url

SCALARS = (str, int, float, bool, type(None))


class Unprintable(Exception):
    """An exception whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class PaymentError(Exception):
    """A user error class used as the ``error=`` headline."""


def build(
    errors: list[Exception],
    *,
    attempts: int | None = None,
    duration: float = 4.1,
    error: BaseException | str | None = None,
    task_id: int = 42,
    task_name: str = "charge",
) -> TaskError:
    """A `TaskError` made the way the manager makes one."""
    return TaskError.build(
        errors,
        attempts=len(errors) if attempts is None else attempts,
        duration=duration,
        error=error,
        task_id=task_id,
        task_name=task_name,
    )


# -- the hierarchy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        TaskManagerStopped,
        Unschedulable,
        ConfigError,
        NoWorkers,
        NoServerName,
        QueueFull,
        Cancelled,
        DeadlineExceeded,
        TaskError,
    ],
)
def test_every_error_derives_from_marionette_error(cls: type[BaseException]) -> None:
    """Every public error class is a `MarionetteError` (and so an `Exception`)."""
    assert issubclass(cls, MarionetteError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (Unschedulable, ValueError),
        (ConfigError, ValueError),
        (NoWorkers, ConfigError),
        (NoServerName, ConfigError),
        (NoWorkers, ValueError),
        (NoServerName, ValueError),
        (DeadlineExceeded, TimeoutError),
        (TaskError, ExceptionGroup),
    ],
)
def test_builtins_are_mixed_in_where_the_meaning_matches(
    cls: type[BaseException], base: type[BaseException]
) -> None:
    """Each error is also the builtin (or marionette) class its meaning matches."""
    assert issubclass(cls, base)


def test_config_errors_are_distinct_kinds() -> None:
    """`NoWorkers` and `NoServerName` are separate `ConfigError`s, neither is the other."""
    assert not issubclass(NoWorkers, NoServerName)
    assert not issubclass(NoServerName, NoWorkers)
    assert not issubclass(Cancelled, TimeoutError)


def test_deadline_exceeded_is_caught_as_timeout_error() -> None:
    """``except TimeoutError`` catches a `DeadlineExceeded`."""
    with pytest.raises(TimeoutError):
        raise DeadlineExceeded()


def test_task_manager_stopped_message() -> None:
    """`TaskManagerStopped()` reads "the task manager is not running"."""
    assert str(TaskManagerStopped()) == "the task manager is not running"


def test_config_error_keeps_field_and_value() -> None:
    """A `ConfigError` keeps the field at fault and the bad value as attributes."""
    err = NoWorkers("workers must be at least 1", field="workers", value=0)
    assert err.field == "workers"
    assert err.value == 0
    assert "workers" in str(err)


# -- TaskError: the message ----------------------------------------------------------


def test_message_has_the_documented_form() -> None:
    """The message reads "charge #42 failed after 3 attempts in 4.1s: ConnectionError: reset"."""
    err = build([ConnectionError("refused"), OSError("down"), ConnectionError("reset")])
    assert str(err) == "charge #42 failed after 3 attempts in 4.1s: ConnectionError: reset"


def test_message_says_one_attempt_in_the_singular() -> None:
    """With one attempt the message says "1 attempt", not "1 attempts"."""
    err = build([ValueError("bad")], duration=0.5)
    assert str(err) == "charge #42 failed after 1 attempt in 0.5s: ValueError: bad"


def test_message_rounds_duration_to_a_tenth() -> None:
    """The duration in the message is shown with one decimal."""
    err = build([ValueError("x")], duration=12.34)
    assert "in 12.3s" in str(err)


def test_message_of_an_error_without_text_names_its_type() -> None:
    """An attempt error with an empty message is described by its type name alone."""
    err = build([KeyError()])
    assert str(err).endswith("failed after 1 attempt in 4.1s: KeyError")


def test_error_option_message_is_the_headline() -> None:
    """An ``error=`` message heads the text, and the standard description follows."""
    err = build([ConnectionError("reset")], error="card not charged")
    text = str(err)
    assert text.startswith("card not charged")
    assert "charge #42 failed after 1 attempt in 4.1s" in text
    assert "ConnectionError: reset" in text
    assert err.error == "card not charged"


def test_error_option_exception_is_the_headline() -> None:
    """An ``error=`` exception heads the text and is kept as `.error`, the same object."""
    headline = PaymentError("payment declined")
    err = build([ConnectionError("reset")], error=headline)
    assert str(err).startswith("payment declined")
    assert "charge #42 failed after 1 attempt" in str(err)
    assert err.error is headline


def test_unprintable_attempt_error_is_still_described() -> None:
    """An attempt error whose ``__str__`` raises still gets a message naming its type."""
    err = build([Unprintable()])
    text = str(err)
    assert text.startswith("charge #42 failed after 1 attempt in 4.1s: Unprintable")
    assert err.dict()["attempt_1"].startswith("Unprintable")


def test_unprintable_error_option_is_still_described() -> None:
    """An ``error=`` exception whose ``__str__`` raises does not break the final error."""
    err = build([ValueError("x")], error=Unprintable())
    assert "charge #42 failed after 1 attempt" in str(err)
    assert "Unprintable" in err.dict()["error"]


# -- TaskError: fields and dict() ----------------------------------------------------


def test_fields_are_kept() -> None:
    """`attempts`, `duration`, `error`, `task_id`, `task_name` and the errors are kept."""
    errors = [OSError("a"), ValueError("b")]
    err = build(errors, attempts=2, duration=1.5, error="boom", task_id=7, task_name="job")
    assert err.attempts == 2
    assert err.duration == 1.5
    assert err.error == "boom"
    assert err.task_id == 7
    assert err.task_name == "job"
    assert list(err.exceptions) == errors


def test_dict_is_flat_with_one_key_per_attempt() -> None:
    """`dict()` holds only scalars, with attempt_1..attempt_n describing each attempt."""
    err = build(
        [ConnectionError("refused"), TimeoutError("slow"), ConnectionError("reset")],
        error="card not charged",
    )
    flat = err.dict()
    assert all(isinstance(v, SCALARS) for v in flat.values()), flat
    assert flat["task_id"] == 42
    assert flat["task"] == "charge"
    assert flat["attempts"] == 3
    assert flat["duration"] == pytest.approx(4.1)
    assert flat["error"] == "card not charged"
    assert flat["attempt_1"] == "ConnectionError: refused"
    assert flat["attempt_2"] == "TimeoutError: slow"
    assert flat["attempt_3"] == "ConnectionError: reset"
    assert "attempt_4" not in flat


def test_dict_of_an_exception_headline_is_a_string() -> None:
    """With an ``error=`` exception, `dict()["error"]` is a string describing it."""
    flat = build([ValueError("x")], error=PaymentError("declined")).dict()
    assert isinstance(flat["error"], str)
    assert "declined" in flat["error"]


# -- TaskError: except* and derive -------------------------------------------------


def test_except_star_matches_attempt_errors_by_type() -> None:
    """``except* OSError`` catches a TaskError whose attempts failed with OSErrors."""
    caught: list[BaseExceptionGroup[BaseException]] = []
    try:
        raise build([ConnectionError("refused"), ConnectionError("reset")])
    except* OSError as group:
        caught.append(group)
    assert len(caught) == 1
    assert [str(e) for e in caught[0].exceptions] == ["refused", "reset"]


def test_except_star_split_keeps_fields_on_both_parts() -> None:
    """Splitting with ``except*`` keeps attempts/duration/error/task_id/task_name on each part."""
    matched: list[BaseExceptionGroup[BaseException]] = []
    rest: list[BaseExceptionGroup[BaseException]] = []
    conn, value = ConnectionError("reset"), ValueError("bad")
    try:
        try:
            raise build([conn, value], attempts=2, duration=3.0, error="headline", task_id=9)
        except* OSError as group:
            matched.append(group)
    except* ValueError as group:
        rest.append(group)
    for part, expected in ((matched, conn), (rest, value)):
        assert len(part) == 1
        group = part[0]
        assert isinstance(group, TaskError)
        assert list(group.exceptions) == [expected]
        assert group.attempts == 2
        assert group.duration == 3.0
        assert group.error == "headline"
        assert group.task_id == 9
        assert group.task_name == "charge"


def test_split_and_subgroup_return_task_errors() -> None:
    """`split` and `subgroup` give TaskErrors carrying the original's fields and message."""
    err = build([OSError("o"), KeyError("k")], error="headline")
    match, rest = err.split(OSError)
    sub = err.subgroup(KeyError)
    for part in (match, rest, sub):
        assert isinstance(part, TaskError)
        assert part.attempts == 2
        assert part.task_id == 42
        assert part.error == "headline"
        assert str(part) == str(err)
    assert match is not None
    assert rest is not None
    assert sub is not None
    assert [type(e) for e in match.exceptions] == [OSError]
    assert [type(e) for e in rest.exceptions] == [KeyError]
    assert [type(e) for e in sub.exceptions] == [KeyError]


def test_except_star_does_not_match_other_types() -> None:
    """``except* OSError`` lets a TaskError of ValueErrors through untouched."""
    err = build([ValueError("a")])
    handled: list[BaseExceptionGroup[BaseException]] = []

    def raise_through_an_oserror_handler() -> None:
        try:
            raise err
        except* OSError as group:
            handled.append(group)

    with pytest.raises(TaskError) as info:
        raise_through_an_oserror_handler()
    assert handled == []
    assert [str(e) for e in info.value.exceptions] == ["a"]
    assert info.value.task_id == 42
    assert str(info.value) == str(err)


# -- the errors of the Redis backend --------------------------------------------------


@pytest.mark.parametrize("cls", [BackendUnavailable, WorkerLost, RemoteError])
def test_redis_errors_derive_from_marionette_error(cls: type[BaseException]) -> None:
    """The Redis backend's errors are `MarionetteError`s too."""
    assert issubclass(cls, MarionetteError)


def test_backend_unavailable_is_a_connection_error() -> None:
    """``except ConnectionError`` (and ``OSError``) catches a `BackendUnavailable`."""
    with pytest.raises(ConnectionError):
        raise BackendUnavailable("redis://localhost:6379/0")
    assert issubclass(BackendUnavailable, OSError)


def test_backend_unavailable_message_is_built_from_its_fields() -> None:
    """The message names the URL and the time spent retrying, both kept as attributes."""
    err = BackendUnavailable("redis://localhost:6379/0", waited=10)
    assert str(err) == "Redis at redis://localhost:6379/0 could not be reached (retried for 10.0s)"
    assert err.url == "redis://localhost:6379/0"
    assert err.waited == 10
    assert err.errno is None


def test_backend_unavailable_without_url() -> None:
    """Without a URL (a client object was configured) the message says just "Redis"."""
    err = BackendUnavailable()
    assert str(err) == "Redis could not be reached"
    assert err.url is None
    assert err.waited is None


def test_backend_unavailable_masks_the_password() -> None:
    """A password in the URL never reaches the message or `.url`."""
    err = BackendUnavailable("redis://alice:s3cret@cache:6379/0?password=other")
    assert "s3cret" not in str(err)
    assert "other" not in str(err)
    assert err.url == "redis://alice:***@cache:6379/0?password=***"


def test_backend_unavailable_keeps_the_cause_the_raiser_chains() -> None:
    """``raise ... from exc`` keeps the connection error as ``__cause__``."""
    cause = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(BackendUnavailable) as info:
        raise BackendUnavailable("redis://h") from cause
    assert info.value.__cause__ is cause


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:p%40ss@h/2", "redis://user:***@h/2"),
        ("redis://:p@ss@h/0", "redis://:***@h/0"),
        ("unix://u:pw@/tmp/redis.sock?db=3", "unix://u:***@/tmp/redis.sock?db=3"),
        ("redis://h/0?Password=pw&db=1", "redis://h/0?Password=***&db=1"),
        ("redis://[::1", "<unparsable url>"),
    ],
)
def test_mask_url_hides_every_password(url: str, masked: str) -> None:
    """`mask_url` masks the user-part and query passwords, and is idempotent."""
    assert mask_url(url) == masked
    assert mask_url(masked) == masked


def test_worker_lost_default_message_and_process() -> None:
    """`WorkerLost()` has the documented message; `process` is kept, None by default."""
    assert str(WorkerLost()) == "the process running this attempt was lost"
    assert WorkerLost().process is None
    err = WorkerLost(process="web-1:4242")
    assert err.process == "web-1:4242"
    assert str(err) == "the process running this attempt was lost"
    assert str(WorkerLost("killed by the OOM killer")) == "killed by the OOM killer"


def test_worker_lost_is_not_a_timeout_or_connection_error() -> None:
    """A lost attempt is its own kind: not caught by ``except (TimeoutError, OSError)``."""
    assert not issubclass(WorkerLost, (TimeoutError, OSError))


def test_remote_error_keeps_type_message_and_traceback() -> None:
    """`RemoteError` keeps the remote type's name, message and traceback text."""
    err = RemoteError("app.billing.PaymentDeclined", "card 42", traceback="Traceback ...")
    assert err.type_name == "app.billing.PaymentDeclined"
    assert err.message == "card 42"
    assert err.traceback == "Traceback ..."
    assert str(err) == "app.billing.PaymentDeclined: card 42"
    assert RemoteError("a.B", "m").traceback == ""


def test_remote_error_without_message_reads_as_its_type_name() -> None:
    """A remote error with an empty message reads as the type name alone."""
    assert str(RemoteError("app.Empty", "")) == "app.Empty"


def test_remote_error_in_a_task_error_message() -> None:
    """A `TaskError` of a `RemoteError` names the remote type in its message."""
    err = build([RemoteError("app.Declined", "card 42")])
    assert str(err).endswith("failed after 1 attempt in 4.1s: RemoteError: app.Declined: card 42")

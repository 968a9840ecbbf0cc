"""Time values at the API boundary: seconds as floats, `timedelta` accepted.

Deadlines are `time.monotonic()` values; wall-clock `datetime`s appear only where the
user speaks in wall-clock terms. The clock is always read through the `time` module
at call time, never through a reference captured at import, so freezegun reaches it.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from numbers import Real

from .errors import Unschedulable

__all__ = ["MAX_UTC", "aware", "monotonic_to_utc", "seconds", "timestamp_to_utc"]

MAX_UTC = datetime.max.replace(tzinfo=UTC)


def seconds(
    value: object,
    name: str,
    *,
    error: type[ValueError] = ValueError,
    allow_negative: bool = True,
) -> float:
    """Return `value` (a real number or a `timedelta`) as float seconds.

    A bool, None or any other type raises `TypeError`; NaN and infinities raise
    `error`, as does a negative value when `allow_negative` is false. Both messages
    name the argument and the bad value.
    """
    kind = type(value)
    try:
        if kind is float or kind is int:  # the common case, without the ABC checks below
            result = float(value)  # type: ignore[arg-type]
        elif isinstance(value, timedelta):
            result = value.total_seconds()
        elif isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
        else:
            result = float(value)
    except OverflowError:  # an int too large for a float
        raise error(f"{name} must be finite, not {value!r}") from None
    if not math.isfinite(result):
        raise error(f"{name} must be finite, not {value!r}")
    if result < 0 and not allow_negative:
        raise error(f"{name} must not be negative, not {value!r}")
    return result


def aware(at: object, name: str = "at") -> datetime:
    """Check that `at` is an aware `datetime` other than the zero timestamp."""
    if at is None:
        raise Unschedulable(f"{name} is None: a task needs a time to be scheduled at")
    if not isinstance(at, datetime):
        raise TypeError(f"{name} must be an aware datetime, not {at!r}")
    if at.replace(tzinfo=None) == datetime.min:
        raise Unschedulable(f"{name} is the zero timestamp (datetime.min): cannot schedule at it")
    if at.utcoffset() is None:
        raise Unschedulable(
            f"{name} is a naive datetime ({at.isoformat()}): give it a tzinfo, e.g. UTC"
        )
    return at


def timestamp_to_utc(timestamp: float) -> datetime:
    """An aware UTC datetime for a `time.time()` value, clamped to the datetime range."""
    try:
        return datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return MAX_UTC if timestamp > 0 else datetime.min.replace(tzinfo=UTC)


def monotonic_to_utc(deadline: float) -> datetime:
    """The aware UTC wall-clock time at which the monotonic clock reads `deadline`."""
    return timestamp_to_utc(time.time() + (deadline - time.monotonic()))

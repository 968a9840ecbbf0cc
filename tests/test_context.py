"""Context: cancellation and deadlines (marionette/context.py)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import freezegun.api
import pytest
from conftest import WAIT

from marionette import Cancelled, Context, DeadlineExceeded, MarionetteError

Frozen = freezegun.api.FrozenDateTimeFactory


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any], threading.Event]:
    """Start `fn` in a thread; return it, the list its result lands in, and a
    "started" event set just before `fn` is called."""
    result: list[Any] = []
    started = threading.Event()

    def run() -> None:
        started.set()
        result.append(fn())

    thread = threading.Thread(target=run, name="test-context-waiter", daemon=True)
    thread.start()
    return thread, result, started


# -- background and roots ------------------------------------------------------------


def test_background_is_one_shared_root() -> None:
    """`Context.background()` always returns the same, never-done context."""
    bg = Context.background()
    assert Context.background() is bg
    assert not bg.done()
    assert bg.err is None
    assert bg.deadline is None
    assert bg.remaining() is None
    bg.check()  # does not raise


def test_background_cannot_be_cancelled() -> None:
    """`background().cancel()` raises `TypeError` and leaves it live."""
    bg = Context.background()
    with pytest.raises(TypeError):
        bg.cancel()
    assert not bg.done()
    assert bg.err is None


def test_background_wait_with_zero_timeout_returns_false() -> None:
    """Waiting on the background context times out: it never becomes done."""
    assert Context.background().wait(0) is False


def test_new_context_is_a_live_cancellable_root() -> None:
    """`Context()` is a live root with no deadline, that can be cancelled on its own."""
    ctx = Context()
    assert not ctx.done()
    assert ctx.err is None
    assert ctx.deadline is None
    assert ctx.remaining() is None
    ctx.cancel()
    assert ctx.done()
    assert not Context.background().done()
    assert not Context().done()


def test_roots_are_independent() -> None:
    """Cancelling one root does not touch another root or its children."""
    a, b = Context(), Context()
    child_of_b = b.with_cancel()
    a.cancel()
    assert not b.done()
    assert not child_of_b.done()


def test_task_fields_outside_a_task() -> None:
    """Outside a task, `task_id` and `task_name` are None and `attempt` is 0."""
    for ctx in (
        Context.background(),
        Context(),
        Context().with_cancel(),
        Context.background().with_timeout(60),
    ):
        assert ctx.task_id is None
        assert ctx.task_name is None
        assert ctx.attempt == 0


# -- cancel and err ---------------------------------------------------------------------


def test_cancel_sets_err_to_cancelled_and_check_raises_it() -> None:
    """After `cancel()`, `done()` is True, `err` is a `Cancelled` and `check()` raises it."""
    ctx = Context().with_cancel()
    ctx.check()
    ctx.cancel()
    assert ctx.done()
    assert isinstance(ctx.err, Cancelled)
    assert isinstance(ctx.err, MarionetteError)
    with pytest.raises(Cancelled) as info:
        ctx.check()
    assert info.value is ctx.err


def test_cancel_is_idempotent() -> None:
    """Cancelling twice is harmless and keeps the first error."""
    ctx = Context()
    ctx.cancel()
    first = ctx.err
    ctx.cancel()
    assert ctx.err is first
    assert isinstance(first, Cancelled)


def test_cancellation_flows_to_children_and_grandchildren() -> None:
    """Cancelling a context cancels its children and grandchildren, with `Cancelled`."""
    root = Context()
    child = root.with_cancel()
    timed = root.with_timeout(3600)
    grandchild = child.with_cancel()
    great = timed.with_timeout(3600).with_cancel()
    root.cancel()
    for ctx in (child, timed, grandchild, great):
        assert ctx.done()
        assert isinstance(ctx.err, Cancelled)


def test_cancellation_never_flows_upwards() -> None:
    """Cancelling a child leaves its parent, siblings and the root live."""
    root = Context()
    child = root.with_cancel()
    sibling = root.with_cancel()
    grandchild = child.with_cancel()
    grandchild.cancel()
    assert not child.done()
    child.cancel()
    assert grandchild.done()
    assert not root.done()
    assert not sibling.done()
    assert root.err is None


def test_cancelling_a_middle_context_cancels_only_its_subtree() -> None:
    """Cancelling a middle context ends its descendants and nothing else."""
    root = Context()
    middle = root.with_cancel()
    below = middle.with_cancel().with_cancel()
    other = root.with_cancel().with_cancel()
    middle.cancel()
    assert below.done()
    assert not other.done()
    assert not root.done()


def test_child_of_background_is_cancellable_alone() -> None:
    """A child of the background context can be cancelled; the background stays live."""
    child = Context.background().with_cancel()
    child.cancel()
    assert child.done()
    assert not Context.background().done()


@pytest.mark.parametrize("make", ["with_cancel", "with_timeout"])
def test_child_of_a_cancelled_parent_is_born_cancelled(make: str) -> None:
    """A child made from an already-cancelled parent is done from the start."""
    parent = Context()
    parent.cancel()
    child = parent.with_cancel() if make == "with_cancel" else parent.with_timeout(3600)
    assert child.done()
    assert isinstance(child.err, Cancelled)
    grandchild = child.with_cancel()
    assert grandchild.done()


def test_children_made_while_another_thread_cancels_all_end_cancelled() -> None:
    """Children made concurrently with the parent's cancellation all end cancelled."""
    root = Context()
    children: list[Context] = []
    barrier = threading.Barrier(5)

    def make() -> None:
        barrier.wait(WAIT)
        local = [root.with_cancel() for _ in range(300)]
        children.extend(local)

    threads = [threading.Thread(target=make, name=f"test-maker-{n}") for n in range(4)]
    for thread in threads:
        thread.start()
    barrier.wait(WAIT)
    root.cancel()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert len(children) == 1200
    assert all(isinstance(c.err, Cancelled) for c in children)


# -- deadlines -----------------------------------------------------------------------


def test_with_timeout_sets_a_monotonic_deadline(frozen: Frozen) -> None:
    """`with_timeout(5)` sets `deadline` to `time.monotonic() + 5`; `remaining()` counts down."""
    ctx = Context().with_timeout(5)
    assert ctx.deadline == pytest.approx(time.monotonic() + 5)
    assert ctx.remaining() == pytest.approx(5)
    frozen.tick(2)
    assert ctx.remaining() == pytest.approx(3)
    assert not ctx.done()


def test_deadline_expires_with_deadline_exceeded(frozen: Frozen) -> None:
    """Past its deadline a context is done with `DeadlineExceeded`, a `TimeoutError`."""
    ctx = Context().with_timeout(5)
    frozen.tick(4.999)
    assert not ctx.done()
    assert ctx.err is None
    frozen.tick(0.001)
    assert ctx.done()
    assert isinstance(ctx.err, DeadlineExceeded)
    assert isinstance(ctx.err, TimeoutError)
    assert ctx.remaining() == 0.0
    with pytest.raises(DeadlineExceeded):
        ctx.check()
    frozen.tick(10)
    assert ctx.remaining() == 0.0


def test_with_timeout_accepts_a_timedelta(frozen: Frozen) -> None:
    """`with_timeout(timedelta(...))` is the same as the number of seconds."""
    ctx = Context().with_timeout(timedelta(minutes=1, milliseconds=500))
    assert ctx.remaining() == pytest.approx(60.5)
    frozen.tick(60.5)
    assert isinstance(ctx.err, DeadlineExceeded)


@pytest.mark.parametrize("timeout", [0, -1, -1e9, timedelta(seconds=-3)])
def test_zero_or_negative_timeout_gives_an_expired_child(timeout: float | timedelta) -> None:
    """A zero or negative timeout gives a child already past its deadline."""
    ctx = Context().with_timeout(timeout)
    assert ctx.done()
    assert isinstance(ctx.err, DeadlineExceeded)
    assert ctx.remaining() == 0.0


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf])
def test_with_timeout_rejects_nan_and_infinity(timeout: float) -> None:
    """NaN or infinite timeouts raise `ValueError`."""
    with pytest.raises(ValueError, match="timeout"):
        Context().with_timeout(timeout)


@pytest.mark.parametrize("timeout", ["5", None, True, [1], object()])
def test_with_timeout_rejects_non_numbers(timeout: object) -> None:
    """A timeout that is not a number (a bool is not one) raises `TypeError`."""
    with pytest.raises(TypeError, match="timeout"):
        Context().with_timeout(timeout)  # type: ignore[arg-type]


def test_child_deadline_is_never_later_than_its_parent(frozen: Frozen) -> None:
    """A child's deadline is the earlier of its own timeout and its parent's deadline."""
    parent = Context().with_timeout(10)
    longer = parent.with_timeout(60)
    shorter = parent.with_timeout(3)
    cancellable = parent.with_cancel()
    assert longer.deadline == parent.deadline
    assert cancellable.deadline == parent.deadline
    assert shorter.deadline is not None
    assert parent.deadline is not None
    assert shorter.deadline < parent.deadline
    frozen.tick(10)
    for ctx in (parent, longer, shorter, cancellable):
        assert isinstance(ctx.err, DeadlineExceeded)


def test_grandchild_inherits_the_earliest_deadline(frozen: Frozen) -> None:
    """A grandchild's deadline is capped by every ancestor's deadline."""
    root = Context().with_timeout(5)
    middle = root.with_cancel().with_timeout(100)
    grandchild = middle.with_timeout(50)
    assert grandchild.deadline == root.deadline
    frozen.tick(5)
    assert isinstance(grandchild.err, DeadlineExceeded)


def test_child_expiry_does_not_end_the_parent(frozen: Frozen) -> None:
    """A child that passes its own, earlier deadline leaves its parent live."""
    parent = Context().with_timeout(60)
    child = parent.with_timeout(1)
    frozen.tick(2)
    assert isinstance(child.err, DeadlineExceeded)
    assert not parent.done()
    assert parent.err is None


def test_child_of_an_expired_parent_is_born_expired(frozen: Frozen) -> None:
    """A child made from a parent past its deadline is done with `DeadlineExceeded`."""
    parent = Context().with_timeout(1)
    frozen.tick(1)
    assert parent.done()
    child = parent.with_cancel()
    assert child.done()
    assert isinstance(child.err, DeadlineExceeded)


def test_first_ending_wins(frozen: Frozen) -> None:
    """Once a context ended, a later cancel or deadline does not change its error."""
    expired = Context().with_timeout(1)
    frozen.tick(1)
    assert isinstance(expired.err, DeadlineExceeded)
    expired.cancel()
    assert isinstance(expired.err, DeadlineExceeded)

    cancelled = Context().with_timeout(1)
    cancelled.cancel()
    frozen.tick(5)
    assert isinstance(cancelled.err, Cancelled)


def test_cancelled_parent_gives_children_cancelled_not_deadline(frozen: Frozen) -> None:
    """Children of a parent cancelled before its deadline end with `Cancelled`."""
    parent = Context().with_timeout(10)
    child = parent.with_timeout(20)
    parent.cancel()
    frozen.tick(30)
    assert isinstance(child.err, Cancelled)


# -- wait ----------------------------------------------------------------------------


def test_wait_returns_true_at_once_when_done() -> None:
    """`wait` on a done context returns True without blocking, with or without a timeout."""
    ctx = Context()
    ctx.cancel()
    assert ctx.wait(0) is True
    assert ctx.wait() is True
    assert ctx.wait(WAIT) is True


def test_wait_returns_false_on_timeout() -> None:
    """`wait(timeout)` on a live context returns False once the timeout passes."""
    ctx = Context()
    start = time.monotonic()
    assert ctx.wait(0.05) is False
    assert time.monotonic() - start >= 0.04
    assert not ctx.done()
    assert ctx.wait(timedelta(milliseconds=1)) is False


@pytest.mark.parametrize(("timeout", "error"), [(math.nan, ValueError), ("1", TypeError)])
def test_wait_rejects_bad_timeouts(timeout: object, error: type[Exception]) -> None:
    """`wait` with a NaN timeout raises `ValueError`, with a non-number `TypeError`."""
    with pytest.raises(error):
        Context().wait(timeout)  # type: ignore[arg-type]


def test_wait_wakes_promptly_when_another_thread_cancels() -> None:
    """A thread blocked in `wait()` returns True soon after another thread cancels."""
    ctx = Context()
    thread, result, started = in_thread(lambda: ctx.wait(WAIT * 6))
    assert started.wait(WAIT)
    cancelled_at = time.monotonic()
    ctx.cancel()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert result == [True]
    assert time.monotonic() - cancelled_at < WAIT


def test_wait_without_timeout_wakes_when_the_parent_is_cancelled() -> None:
    """`wait()` with no timeout on a child returns True when its parent is cancelled."""
    parent = Context()
    child = parent.with_cancel().with_cancel()
    thread, result, started = in_thread(child.wait)
    assert started.wait(WAIT)
    parent.cancel()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert result == [True]
    assert isinstance(child.err, Cancelled)


def test_wait_wakes_at_the_deadline() -> None:
    """`wait()` with no timeout returns True when the context's deadline passes."""
    ctx = Context().with_timeout(0.1)
    deadline = ctx.deadline
    assert deadline is not None
    thread, result, _ = in_thread(ctx.wait)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert result == [True]
    assert time.monotonic() >= deadline
    assert isinstance(ctx.err, DeadlineExceeded)


def test_wait_on_a_child_wakes_at_the_parent_deadline() -> None:
    """A child waits no longer than its parent's deadline."""
    parent = Context().with_timeout(0.1)
    child = parent.with_cancel()
    assert child.wait(WAIT) is True
    assert isinstance(child.err, DeadlineExceeded)


def test_wait_timeout_shorter_than_deadline_returns_false() -> None:
    """`wait(timeout)` returns False when the timeout comes before the deadline."""
    ctx = Context().with_timeout(3600)
    assert ctx.wait(0.01) is False
    assert not ctx.done()


def test_many_waiters_all_wake_on_one_cancel() -> None:
    """Every thread waiting on a context (or a child of it) wakes on one cancel."""
    root = Context()
    contexts = [root, root.with_cancel(), root.with_timeout(3600), root]
    started: list[threading.Event] = []
    runs = []
    for ctx in contexts:
        thread, result, event = in_thread(lambda ctx=ctx: ctx.wait(WAIT * 6))
        runs.append((thread, result))
        started.append(event)
    for event in started:
        assert event.wait(WAIT)
    root.cancel()
    for thread, result in runs:
        thread.join(WAIT)
        assert not thread.is_alive()
        assert result == [True]

"""Type checks of the public API, run by tests/test_typing.py with ``mypy --strict``.

Each line ending in ``# error: CODE`` must be reported by mypy with that error code,
and no other line may be. Never imported: only type-checked.
"""

from __future__ import annotations

import concurrent.futures
from datetime import UTC, datetime
from typing import assert_type

from marionette import Context, TaskHandler, TaskManager


def number(ctx: Context) -> int:
    return 1


def shout(text: str) -> str:
    return text.upper()


def no_context() -> int:
    return 1


class Fetch:
    def do(self, ctx: Context) -> str:
        return "page"


async def main(tm: TaskManager) -> None:
    assert_type(tm.queue(number), TaskHandler[int])
    assert_type(tm.queue(Fetch()), TaskHandler[str])
    assert_type(tm.queue(lambda ctx: 2.5), TaskHandler[float])
    assert_type(tm.delay(5, number), TaskHandler[int])
    assert_type(tm.schedule(datetime.now(UTC), number), TaskHandler[int])
    wrapped = tm.wrap_task(number)
    assert_type(wrapped, TaskHandler[int])
    assert_type(tm.queue(wrapped), TaskHandler[int])
    assert_type(wrapped.result(1), int)
    assert_type(wrapped.as_future(), concurrent.futures.Future[int])
    assert_type(await tm.queue(number), int)
    assert_type(await tm.queue(Fetch()), str)
    wrapped.add_done_callback(lambda h: assert_type(h, TaskHandler[int]))

    shout(tm.queue(number).result())  # error: arg-type
    tm.queue(no_context)  # error: arg-type
    tm.delay(5, number, retries=1).result().upper()  # error: attr-defined

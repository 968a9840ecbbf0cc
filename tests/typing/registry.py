"""Type checks of registered tasks, run by tests/test_typing.py with ``mypy --strict``.

Each line ending in ``# error: CODE`` must be reported by mypy with that error code,
and no other line may be. Never imported: only type-checked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import assert_type

from marionette import Context, RegisteredTask, Task, TaskHandler, TaskManager


def takes_report(rt: RegisteredTask[[str], list[str]]) -> None:
    pass


def typed(tm: TaskManager, ctx: Context) -> None:
    def send_email(ctx: Context, to: str, *, retry: bool = False) -> int:
        return 1

    def no_context(to: str) -> int:
        return 1

    send = tm.task(send_email)

    @tm.task(name="app.report", retries=3)
    def report(ctx: Context, day: str) -> list[str]:
        return [day]

    takes_report(report)
    assert_type(send(ctx, "a@b.c"), int)
    assert_type(send(ctx, "a@b.c", retry=True), int)
    assert_type(send.name, str)
    assert_type(send.queue("a@b.c"), TaskHandler[int])
    assert_type(send.queue("a@b.c", retry=True).result(), int)
    assert_type(send.delay(5, "a@b.c"), TaskHandler[int])
    assert_type(send.schedule(datetime.now(UTC), "a@b.c"), TaskHandler[int])
    takes_report(report.options(retries=5))
    assert_type(send.options(retries=3).queue("a@b.c"), TaskHandler[int])
    call = send.bind("a@b.c")
    task: Task[int] = call
    assert_type(tm.queue(call), TaskHandler[int])
    assert_type(tm.queue(send.bind("a@b.c"), key="k"), TaskHandler[int])
    assert_type(tm.delay(5, report.bind("monday")), TaskHandler[list[str]])
    assert_type(task.do(ctx), int)

    send.queue(42)  # error: arg-type
    send.bind(to=1)  # error: arg-type
    send.delay(5, "a@b.c", retyr=True)  # error: call-arg
    send(ctx)  # error: call-arg
    tm.task(no_context)  # error: arg-type
    report.queue("monday").result().upper()  # error: attr-defined
    takes_report(send)  # error: arg-type

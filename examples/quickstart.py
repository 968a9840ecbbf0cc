"""marionette in thirty lines: start a manager, queue and delay tasks, retry a flaky
one, read the results, and stop. Run it with ``python examples/quickstart.py``.

The library's own warnings (each retry, the final failure) appear on stderr through
Python's `logging`: a program that configures logging decides what it sees.
"""

from __future__ import annotations

from marionette import Context, TaskError, TaskManager


def greet(ctx: Context) -> str:
    """A task is any callable taking the attempt's Context; its return is the result."""
    return f"hello from task #{ctx.task_id}"


def flaky(ctx: Context) -> str:
    if ctx.attempt < 3:  # the first two attempts fail, and are retried after a backoff
        raise ConnectionError("connection reset by peer")
    return f"flaky succeeded on attempt {ctx.attempt}"


def broken(ctx: Context) -> None:
    raise ValueError("the input is corrupt")


def main() -> None:
    with TaskManager(workers=2) as tm:  # starts the worker threads; stops them on exit
        now = tm.queue(greet)  # runs as soon as a worker is free
        later = tm.delay(0.5, greet)  # runs in half a second
        retried = tm.queue(flaky, retries=3, backoff=0.1)  # 0.1 s between attempts
        doomed = tm.queue(broken, name="import")  # no retries: fails on its first error
        print(now.result())  # blocks until the task is done, like a Future
        print(later.result())
        print(retried.result())
        try:
            doomed.result()
        except TaskError as err:  # an ExceptionGroup of every attempt's error
            print(f"failed for good: {err}")


if __name__ == "__main__":
    main()

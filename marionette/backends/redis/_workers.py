"""The Redis backend's workers: the worker loop, and each attempt's outcome.

`workers` threads take claimed tasks from the run's bounded queue. A worker pays one
round trip per task: the ``step`` script settles the attempt it just finished and
starts the one it took (the start is recorded before the task runs, so that a
process dying mid-task is counted as a lost attempt, and a task that kills its
process every time fails after three). When the queue is empty the worker settles
first, then waits. A failure is decided here with the task's tenacity strategies
(`retry_delay`, registered with the task in every process) and goes to the shared
schedule with its backoff, or settles the task for good. No worker sleeps.
All of it under the manager's lock (see `_core`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from marionette._log import DEBUG
from marionette._queue import TaskQueue
from marionette.backends.redis._core import Job
from marionette.backends.redis._services import Services
from marionette.backends.redis.codec import encode_error, encode_result
from marionette.backends.redis.handler import RedisHandler
from marionette.context import Context, attempt_context
from marionette.errors import DeadlineExceeded, TaskError, describe
from marionette.events import TaskEventKind
from marionette.handler import Options, parse_options, retry_delay

__all__ = ["Workers"]

_Kind = TaskEventKind
# Returned by take() when the queue is empty and a finished attempt awaits its settle.
_SETTLE_FIRST: Any = object()


@dataclass(slots=True)
class Outcome:
    """How an attempt ended, to settle in Redis and then report here."""

    job: Job
    #: 'ok', 'retry', 'fail', 'base' or 'cancel' (see scripts/step.lua).
    kind: str
    value: str = ""
    error: str = ""
    delay: float = 0.0
    #: What the task returned, or the exception that ended the attempt.
    result: Any = None
    exc: BaseException | None = None
    #: The task's final error, when it failed for good.
    final: BaseException | None = None


class Workers(Services):
    """The worker loop and attempt outcomes of a Redis manager."""

    def _serve(self, q: TaskQueue) -> None:
        done: Outcome | None = None
        while True:
            with self._lock:
                if done is not None:
                    self._ended_locked(done.job)
                if done is not None and not q.queue:
                    job = _SETTLE_FIRST
                else:
                    job = q.take_locked()
                    self._claimable.notify()  # room for the claimer
            if job is _SETTLE_FIRST:
                assert done is not None
                self._step(done, None)
                done = None
                continue
            if job is None:
                if done is not None:
                    self._step(done, None)
                return
            done = self._step(done, job)

    def _step(self, done: Outcome | None, job: Job | None) -> Outcome | None:
        """Settle `done` and start `job` (one round trip when both are under the same
        process id), report the one, run the other if it started, and return how it
        ended."""
        if done is not None and job is not None and done.job.proc != job.proc:
            self._step(done, None)
            done = None
        proc = job.proc if job is not None else done.job.proc if done is not None else ""
        call_done = None if done is None else done.job.id
        call_job = None if job is None else job.id
        try:
            settled, start, attempt = self._background(
                lambda: self._store.step(
                    proc,
                    call_done,
                    "" if done is None else done.kind,
                    "" if done is None else done.value,
                    "" if done is None else done.error,
                    0 if done is None else math.ceil(done.delay * 1000),
                    call_job,
                ),
                self._stopping,
            )
        except self._outages.errors:  # stopped during an outage: the lease will tell
            settled, start, attempt = -1, "", 0
        ctx = None
        if job is not None and start == "ok":
            opts = self._options(job)
            deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
            ctx = attempt_context(None, deadline, job, attempt)
        # Handlers for the listeners only: made before the lock (making one takes it).
        wanted = self._events.wanted
        done_handler = (
            None if done is None or not wanted else self._handler(done.job.id, done.job.name)
        )
        job_handler = None if job is None or not wanted else self._handler(job.id, job.name)
        with self._lock:  # one critical section: the last attempt's report, this one's start
            if done is not None:
                self._report_locked(done, settled == 1, done_handler)
            if job is not None:
                if ctx is None:  # lost to another process, or cancelled while claimed
                    # (CANCELLED is heard where cancel() removed it: no run ended here)
                    if self._jobs.get(job.id) is job:
                        del self._jobs[job.id]
                else:
                    job.ctx, job.attempt = ctx, attempt
                    self._busy += 1
                    if ctx._deadline is not None:
                        self._scheduler._push_locked(ctx, ctx._deadline, False)
                    if job_handler is not None:
                        self._emit_run_locked(_Kind.STARTED, job_handler)
        if done is not None:
            self._log_outcome(done, settled == 1)
        return None if ctx is None else self._attempt(job, ctx, opts)  # type: ignore[arg-type]

    def _ended_locked(self, job: Job) -> None:
        """The attempt of `job` returned (its outcome is yet to be settled)."""
        ctx = job.ctx
        if ctx is not None:
            job.ctx = None
            self._busy -= 1
            if ctx._deadline is not None:
                self._scheduler._cancel_locked(ctx)

    def _attempt(self, job: Job, ctx: Context, opts: Options) -> Outcome:
        """Run the attempt the step started (its end is recorded by `_ended_locked`)."""
        registered = self._registry.get(job.task)
        if registered is None:  # claimed only when registered, and never unregistered
            missing = LookupError(f"no task is registered as {job.task!r} here")
            return self._failed(job, ctx, opts, missing, final=True)
        try:
            value = registered.fn(ctx, *job.args, **job.kwargs)
        except TypeError as exc:
            # Raised by the call itself, not inside the task: the stored arguments no
            # longer fit the function (a deploy changed it). No retry can help.
            mismatch = exc.__traceback__ is not None and exc.__traceback__.tb_next is None
            return self._failed(job, ctx, opts, exc, final=mismatch)
        except BaseException as exc:
            return self._failed(job, ctx, opts, exc)
        deadline = ctx._deadline
        if deadline is not None and time.monotonic() >= deadline:
            late = DeadlineExceeded(f"attempt {ctx.attempt} returned after its deadline")
            return self._failed(job, ctx, opts, late)
        try:
            encoded = encode_result(value, job.task)
        except (TypeError, ValueError) as exc:
            return self._failed(job, ctx, opts, exc, final=True)
        return Outcome(job, "ok", value=encoded, result=value)

    def _options(self, job: Job) -> Options:
        """The attempt's options: the registered ones, under the submission's own."""
        if not job.options:  # the common case: parsed once per task name
            cached = self._options_cache.get(job.task)
            if cached is None:
                cached = self._options_cache[job.task] = parse_options(self._defaults(job))[0]
            return cached
        return parse_options({**self._defaults(job), **json.loads(job.options)})[0]

    def _defaults(self, job: Job) -> dict[str, Any]:
        registered = self._registry.get(job.task)
        return {} if registered is None else dict(registered.defaults)

    def _failed(
        self, job: Job, ctx: Context, opts: Options, exc: BaseException, *, final: bool = False
    ) -> Outcome:
        """The outcome of a failed attempt: retry after a backoff, or fail for good."""
        error = json.dumps(encode_error(exc), separators=(",", ":"))
        if job.cancelling:
            return Outcome(job, "cancel", error=error, exc=exc)
        if not isinstance(exc, Exception):
            return Outcome(job, "base", error=error, exc=exc, final=exc)
        delay: float | None = None
        cause: BaseException | None = None
        if not final:
            try:
                delay = retry_delay(opts, job.failures + 1, exc, job.submitted)
            except Exception as strategy_error:  # a broken strategy ends the task, loudly
                cause = strategy_error
            except BaseException as strategy_exit:  # as if the task had raised it
                return Outcome(job, "base", error=error, exc=exc, final=strategy_exit)
        if delay is not None:
            return Outcome(job, "retry", error=error, delay=delay, exc=exc)
        previous = [e for e in job.errors or () if isinstance(e, Exception)]
        failure = TaskError.build(
            [*previous, exc],
            attempts=ctx.attempt,
            duration=time.monotonic() - job.submitted,
            error=opts.error,
            task_id=job.id,
            task_name=job.name,
        )
        if cause is not None:
            failure.__cause__ = cause
        return Outcome(job, "fail", error=error, exc=exc, final=failure)

    def _report_locked(
        self, done: Outcome, settled: bool, handler: RedisHandler[Any] | None
    ) -> None:
        """After the settle: forget the job; tell the listeners (if any: `handler`)."""
        job = done.job
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        if settled and not job.discarded and handler is not None:
            kind = {
                "ok": _Kind.SUCCEEDED,
                "retry": _Kind.RETRYING,
                "cancel": _Kind.CANCELLED,
            }.get(done.kind, _Kind.FAILED)
            error = done.exc if kind is _Kind.RETRYING else done.final
            self._emit_run_locked(kind, handler, error=error, result=done.result)

    def _log_outcome(self, done: Outcome, settled: bool) -> None:
        """After the settle, with no lock held: the log line of the outcome."""
        job = done.job
        log = self._log
        if not settled:
            if not job.discarded:
                log.warning(
                    "task outcome discarded: this process lost it to another",
                    task_id=job.id,
                    task=job.name,
                )
            return
        if done.kind == "ok":
            if log.enabled(DEBUG):
                log.debug("task completed", task_id=job.id, task=job.name, attempt=job.attempt)
        elif done.kind == "retry":
            assert done.exc is not None
            log.warning(
                "task failed, retrying",
                task_id=job.id,
                task=job.name,
                attempt=job.attempt,
                retry_in=round(done.delay, 3),
                error=describe(done.exc),
            )
        elif done.kind == "cancel":
            if log.enabled(DEBUG):
                log.debug("task cancelled", task_id=job.id, task=job.name, attempt=job.attempt)
        elif isinstance(done.final, TaskError):
            log.error("task failed for good", attempt=job.attempt, **done.final.dict())
        elif done.final is not None:
            log.error(
                "task failed for good",
                task_id=job.id,
                task=job.name,
                attempt=job.attempt,
                error=describe(done.final),
            )

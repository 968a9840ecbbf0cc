"""The Redis backend's service threads: claimer, heartbeat, messages, callbacks.

- ``marionette-claimer`` (only with workers) claims due tasks of the names this
  process registered into the run's bounded queue, in batches: once the queue is
  half empty, as many as it has room for (at most `queue_size` claimed and not
  started). When the queues are empty it sleeps until a message says one of them is
  not ('r <name>'): it never polls.
- ``marionette-heartbeat`` renews the lease every third of it and reaps the
  processes whose lease ran out (their claims pass to the others), beating sooner
  when another process's lease ends first. It and the lease are the only timers.
- ``marionette-messages`` reads the namespace's pub/sub channel (a blocking read)
  and turns each message into a wake-up: of the claimer, of the scheduler (an earlier
  due time), of a task's waiters, of a running attempt to cancel, of `join()`. After
  a reconnect it wakes everyone, since messages sent meanwhile were lost.
- ``marionette-callbacks`` runs the done callbacks of tasks that finished elsewhere,
  so that a slow callback never holds the messages back.

The scheduler thread (the manager's `Scheduler`) promotes due tasks of the shared
schedule: it sleeps until the earliest due time it knows of, as every process's does;
the promote script moves each due task once, whichever process runs it first.
All of it under the manager's lock (see `_core`).
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from typing import Any

from marionette._queue import TaskQueue
from marionette.backends.redis._core import Job, RedisCore
from marionette.backends.redis.codec import CorruptPayload, decode_call
from marionette.backends.redis.handler import decode_errors, label
from marionette.backends.redis.periodic import following
from marionette.backends.redis.store import Beat, Claimed
from marionette.context import Context
from marionette.errors import BackendUnavailable, describe
from marionette.events import TaskEventKind

__all__ = ["PROMOTE", "Services"]


class _Promote:
    """The scheduler item that stands for "promote what is due in Redis"."""

    def __repr__(self) -> str:
        return "<promote due tasks>"


PROMOTE = _Promote()
#: Tasks promoted per script call (a long schedule is promoted in several).
_PROMOTE_BATCH = 500
#: How long the occurrences a promote lists are this process's to fire: a process
#: that dies meanwhile delays them by this much at most (a faster periodic's
#: occurrences due meanwhile fold into that late run, as after an outage).
_FIRE_HOLD_MS = 250
#: How long after another process's lease ends the heartbeat looks (its clock and
#: the server's differ by a round trip).
_REAP_MARGIN = 0.01


class Services(RedisCore):
    """The claimer, heartbeat, message and callback threads of a Redis manager."""

    def _opened(self) -> None:
        q = self._queue
        threads = [
            threading.Thread(target=self._listening, name="marionette-messages"),
            threading.Thread(target=self._beating, name="marionette-heartbeat"),
            threading.Thread(target=self._calling_back, name="marionette-callbacks"),
        ]
        if self._config.workers > 0:
            threads.append(
                threading.Thread(target=self._claiming, args=(q,), name="marionette-claimer")
            )
        self._services = threads
        for thread in threads:
            thread.start()
        self._arm(0.0)

    def _closed(self, abandoned: bool) -> None:
        """The end of a stop: tasks a timed-out stop gave up on (running, or still
        queued) are handed back (they run again elsewhere, the running ones as lost
        attempts); the services end; the process leaves the cluster."""
        with self._lock:
            gone = list(self._jobs.values())
            for job in gone:
                job.discarded = True
            self._jobs.clear()
        self._hand_back(gone)
        self._stopping.set()
        self._callbacks.put(None)
        try:  # wake the message thread now rather than after its read times out
            self._store.client.publish(self._store.channel, f"q {self._proc}")
        except self._outages.errors:
            pass
        for thread in self._services:
            if thread is not threading.current_thread():
                thread.join()
        self._services = []
        try:
            self._call(lambda: self._store.leave(self._proc))
        except BackendUnavailable as exc:
            self._log.warning("could not leave the cluster cleanly", error=describe(exc))

    # -- the claimer -------------------------------------------------------------

    def _registered(self, name: str) -> None:
        with self._lock:  # its queue may hold tasks already: look
            self._ready += 1
            self._claimable.notify_all()

    def _claiming(self, q: TaskQueue) -> None:
        turn = 0
        # Claims come in batches: the claimer waits until the queue is half empty
        # (the workers have the other half to run meanwhile), then fills it, so a
        # busy process pays one claim per half a queue of tasks, not one per task.
        low = q.maxsize // 2
        while True:
            with self._lock:
                while not self._shut and len(q.queue) > low:
                    self._claimable.wait()
                if self._shut:
                    return
                room = q.maxsize - len(q.queue)
                ready = self._ready
                names = list(self._registry)
            claimed = 0
            if names:
                turn = (turn + 1) % len(names)
                names = names[turn:] + names[:turn]  # no name always served first
                got = self._claim(q, room, names)
                if got is None:
                    return
                claimed = got
            if claimed < room:  # the queues we serve are empty: sleep until one is not
                with self._lock:
                    while self._ready == ready and not self._shut:
                        self._claimable.wait()

    def _claim(self, q: TaskQueue, room: int, names: list[str]) -> int | None:
        """Claim up to `room` tasks into `q`; how many were claimed (None: stopping)."""
        proc = self._proc
        failed: list[bool] = []

        def claim() -> tuple[int, list[Claimed]] | None:
            try:
                return self._store.claim(proc, room, names)
            except self._outages.errors:
                failed.append(True)
                raise

        try:
            reply = self._background(claim, self._halting)
            if reply is not None and failed:  # a reply may have been lost: look again
                reply = self._background(lambda: self._store.recover(proc), self._halting)
        except self._outages.errors:
            return None
        if reply is None:  # this process lost its lease
            self._rejoin(proc)
            return 0
        now, rows = reply
        jobs = [job for job in (self._job(row, now, proc) for row in rows) if job is not None]
        with self._lock:
            if self._shut:
                late = jobs
            else:
                late = []
                for job in jobs:
                    if job.id not in self._jobs:
                        self._jobs[job.id] = job
                        q.force_locked(job)
        if late:
            self._hand_back(late)
            return None
        return len(rows)

    def _job(self, row: Claimed, now: int, proc: str) -> Job | None:
        """A claimed task, decoded; one that cannot be goes to the dead letters."""
        try:
            args, kwargs = decode_call(row.payload)
            named = label(row.name, row.options) if row.options else row.name
        except CorruptPayload as exc:
            reason = f"its payload cannot be read: {exc.reason}"
            self._log.error("task sent to the dead letters", task_id=row.id, reason=reason)
            try:
                self._background(lambda: self._store.dead(proc, row.id, reason), self._halting)
            except self._outages.errors:
                pass
            return None
        job = Job(
            row.id,
            row.name,
            args,
            kwargs,
            options=row.options,
            failures=row.failures,
            submitted=time.monotonic() - max(0, now - row.submitted) / 1000,
            proc=proc,
            name=named,
        )
        if row.errors:
            job.errors = decode_errors(row.errors)
        return job

    # -- the heartbeat -----------------------------------------------------------

    def _beating(self) -> None:
        interval = self._config.lease / 3
        wait = 0.0  # a first beat at once, to learn when the others' leases end
        while not self._stopping.wait(wait):
            proc = self._proc
            failed: list[bool] = []
            beat = functools.partial(self._beat, proc, failed)
            try:
                held, now, ends = self._background(beat, self._stopping)
            except self._outages.errors:
                return
            if failed:
                # Redis was out of reach: the message connection may be dead without
                # knowing it (a cut that drops packets), so it makes a new one.
                self._relisten = True
            if not held:
                self._rejoin(proc)
            # The next beat comes sooner if another process's lease ends first: a
            # dead process's claims pass on when its lease ends, not up to a third
            # of a lease later (live processes renew theirs long before).
            wait = interval
            if ends >= 0:
                wait = min(interval, max(0.0, (ends - now) / 1000) + _REAP_MARGIN)

    def _beat(self, proc: str, failed: list[bool]) -> Beat:
        """One heartbeat; a failed try is noted in `failed`."""
        try:
            return self._store.heartbeat(proc, self._lease_ms, self._info(), False)
        except self._outages.errors:
            failed.append(True)
            raise

    def _rejoin(self, lost: str) -> None:
        """This process lost its lease (`lost` was its id): the cluster reaped it and
        gave its claims to others. Drop them here and join anew under the next epoch;
        the attempts still running under the old id can no longer settle anything."""
        with self._rejoining:
            if self._proc != lost:
                return  # another thread rejoined already
            self._epoch += 1
            self._proc = f"{self._base_id}:{self._epoch}"
            with self._lock:
                q = self._queue
                if q is not None:
                    kept = [i for i in q.queue if i is None or i.proc != lost]
                    q.queue.clear()
                    q.queue.extend(kept)
                for task_id in [j.id for j in self._jobs.values() if j.proc == lost]:
                    job = self._jobs.pop(task_id)
                    job.discarded = True
                self._claimable.notify_all()
            self._log.warning("this process lost its lease; its tasks passed to others")
            try:
                self._background(
                    lambda: self._store.heartbeat(self._proc, self._lease_ms, self._info(), True),
                    self._stopping,
                )
            except self._outages.errors:
                return
            self._wake_all()

    # -- messages ----------------------------------------------------------------

    def _listening(self) -> None:
        lease = self._config.lease
        while not self._stopping.is_set():
            pubsub = self._store.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._store.channel)
                self._wake_all()  # what was said while we were not listening is lost
                while not self._stopping.is_set() and not self._relisten:
                    message = pubsub.get_message(timeout=lease)
                    if message is not None:
                        self._dispatch(message["data"])
                self._relisten = False
            except self._outages.errors as exc:
                self._outages.down(exc)
                self._stopping.wait(0.5)
            finally:
                try:
                    pubsub.close()
                except self._outages.errors:
                    pass

    def _dispatch(self, data: Any) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        kind, _, rest = text.partition(" ")
        if kind == "r":
            if rest in self._registry:
                with self._lock:
                    self._ready += 1
                    self._claimable.notify_all()
        elif kind == "d":
            self._arm(max(0.0, int(rest) / 1000 - self._skew - time.time()))
        elif kind == "f":
            self._finished(int(rest))
        elif kind == "x":
            self._cancel_running(int(rest))
        elif kind == "i":
            with self._lock:
                self._idle += 1
                self._changed.notify_all()

    def _wake_all(self) -> None:
        """After a reconnect: every sleeper looks again (messages may have been lost)."""
        with self._lock:
            self._ready += 1
            self._idle += 1
            self._claimable.notify_all()
            self._changed.notify_all()
            ids = list(self._watches)
            for watch in self._watches.values():
                for event in watch.events:
                    event.set()
                watch.events.clear()
        for task_id in ids:
            self._callbacks.put((task_id, None))  # look whether it finished meanwhile
        self._arm(0.0)

    def _cancel_running(self, task_id: int) -> None:
        with self._lock:
            job = self._jobs.get(task_id)
            if job is None or job.ctx is None:
                return
            job.cancelling = True
            ctx = job.ctx
        ctx.cancel()

    # -- callbacks ---------------------------------------------------------------

    def _calling_back(self) -> None:
        while True:
            item = self._callbacks.get()
            if item is None:
                return
            task_id, callbacks = item
            handler = self._handler(task_id, None)
            try:
                fields = self._read(task_id)
            except BackendUnavailable:
                fields = None
            if fields is not None:
                handler._keep(fields)
            if callbacks is None:  # a look after a reconnect: fire if it finished
                if fields is None or handler._finished(fields):
                    self._finished(task_id)
                continue
            for fn in callbacks:
                self._run_callback(handler, fn)

    # -- the scheduler's side ----------------------------------------------------

    def _arm(self, delay: float) -> None:
        """Promote due tasks `delay` seconds from now (or sooner if already armed so)."""
        with self._lock:
            self._scheduler._arm_locked(PROMOTE, time.monotonic() + delay)

    def _on_due(self, item: Any) -> None:
        if item is PROMOTE:
            self._promote()
        elif isinstance(item, Context):
            self._overrun(item)

    def _promote(self) -> None:
        """Promote the due tasks of the shared schedule, fire the due occurrences of
        periodics, and sleep until the next due time (the first process to wake does
        each; the others find nothing to do, or other occurrences)."""
        while True:
            try:
                count, wait, now, periodics = self._background(
                    lambda: self._store.promote(_PROMOTE_BATCH, _FIRE_HOLD_MS), self._halting
                )
            except self._outages.errors:
                return
            self._skew = now / 1000 - time.time()
            if periodics and not self._fire(periodics, now):
                return
            if count < _PROMOTE_BATCH and not periodics:
                break
        if wait >= 0:
            self._arm(wait / 1000)

    def _fire(self, periodics: list[tuple[str, int, str]], now: int) -> bool:
        """Fire the due occurrences (key, grid, definition) in one call, each planning
        its periodic's next one (False if stopping)."""
        occurrences: list[tuple[str, int, int | None, int | None]] = []
        for key, grid, spec in periodics:
            try:
                planned = following(json.loads(spec), grid, now)
            except (ValueError, KeyError) as exc:  # a definition it cannot read: no plan
                self._log.error("periodic definition unreadable", key=key, error=describe(exc))
                planned = None
            if planned is None:
                occurrences.append((key, grid, None, None))
            else:
                occurrences.append((key, grid, int(planned[0]), math.ceil(planned[1])))
        try:
            fired = self._background(lambda: self._store.fire(occurrences), self._halting)
        except self._outages.errors:
            return False
        if self._events.wanted:
            for outcome, task_id in fired:
                kind = TaskEventKind.SUBMITTED if outcome == 1 else TaskEventKind.COALESCED
                if outcome and kind in self._events.wanted:
                    handler = self._handler(task_id, None)
                    with self._lock:
                        self._emit_locked(kind, handler)
        return True

    def _overrun(self, ctx: Context) -> None:
        """An attempt's deadline passed: report it once if that attempt still runs."""
        task = ctx._task
        if task is None:
            return
        with self._lock:
            job = self._jobs.get(task.id)
            running = job is not None and job.ctx is ctx
        if running:
            self._log.warning(
                "task still running past its deadline",
                task_id=task.id,
                task=task.name,
                attempt=ctx.attempt,
            )

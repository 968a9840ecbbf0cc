"""The Redis backend's Lua transitions as units: `Store` against a real server.

No manager runs here: each test drives the scripts the way the manager's threads do
(submit, claim, step, heartbeat, promote, cancel, ...) under process ids of its own,
and reads the keys back (the layout is described at the top of scripts/common.lua).
A process whose lease must run out is registered with a lease of 0 ms: by the
server's clock it has expired at once, so the next heartbeat of another process
reaps it without any waiting. After every path the gauges (queued, scheduled,
running) are back to 0 and the idle message 'i' has been published.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
import redis
from conftest import WAIT
from helpers import Threads

from marionette import WorkerLost
from marionette.backends.redis import store as store_module
from marionette.backends.redis.codec import encode_call
from marionette.backends.redis.handler import decode_errors
from marionette.backends.redis.periodic import definition
from marionette.backends.redis.store import Store

#: The lease of the processes that must stay alive during a test.
LEASE_MS = 60_000
#: The lease of a process a test lets die: expired as soon as it is registered.
DEAD_MS = 0
PAYLOAD = encode_call("n", (), {})
GAUGES = ("queued", "scheduled", "running")


class Wake:
    """A subscriber of the namespace's wake-up channel (subscribed once made)."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.channel = channel
        self.client = client
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(channel)
        confirmed = self.pubsub.get_message(timeout=WAIT)  # the subscription is live
        assert confirmed is not None
        assert confirmed["type"] == "subscribe"
        self._marks = 0

    def until(self, wanted: str) -> list[str]:
        """Every message up to and including the first `wanted` (bounded by WAIT)."""
        seen: list[str] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=deadline - time.monotonic())
            if message is None or message["type"] != "message":
                continue
            data = message["data"].decode()
            seen.append(data)
            if data == wanted:
                return seen
        raise AssertionError(f"no {wanted!r} message; heard {seen}")

    def drain(self) -> list[str]:
        """Every message published so far: publishes a marker and reads up to it
        (messages of one channel arrive in order, so nothing earlier is missed)."""
        self._marks += 1
        marker = f"test-mark {self._marks}"
        self.client.publish(self.channel, marker)
        return self.until(marker)[:-1]

    def close(self) -> None:
        self.pubsub.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def store(client: redis.Redis, redis_namespace: str) -> Store:
    """A Store of the test's namespace, results kept for a minute."""
    return Store(client, redis_namespace, result_ttl=60.0)


@pytest.fixture
def wake(client: redis.Redis, store: Store) -> Iterator[Wake]:
    w = Wake(client, store.channel)
    yield w
    w.close()


# -- helpers -------------------------------------------------------------------------------


def submit(
    store: Store,
    proc: str,
    lane: int,
    token: str,
    name: str = "n",
    mode: str = "q",
    when: int = 0,
    retried: bool = False,
) -> int:
    """Submit a task of `name` (no options, no key, no group); its id."""
    task_id, new = store.submit(
        proc, lane, token, name, PAYLOAD, "", mode, when, key="", group="", retried=retried
    )
    assert new
    return task_id


def promote(store: Store, limit: int) -> tuple[int, int]:
    """(tasks promoted, ms until the next due one or -1)."""
    reply = store.promote(limit, 5_000)
    return int(reply[0]), int(reply[1])


def join(store: Store, proc: str, lease_ms: int = LEASE_MS) -> str:
    """Register `proc` with a lease of `lease_ms`; return it."""
    held = store.heartbeat(proc, lease_ms, None, True).held
    assert held
    return proc


def task(client: redis.Redis, store: Store, task_id: int) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(f"{store.prefix}t:{task_id}").items()}


def queue(client: redis.Redis, store: Store, name: str = "n") -> list[int]:
    """The ids in `name`'s queue, head (next claimed) first."""
    return [int(i) for i in reversed(client.lrange(f"{store.prefix}q:{name}", 0, -1))]


def claims(client: redis.Redis, store: Store, proc: str) -> set[int]:
    return {int(i) for i in client.smembers(f"{store.prefix}claims:{proc}")}


def gauges(store: Store) -> tuple[int, ...]:
    counters = store.counters()
    return tuple(counters.get(g, 0) for g in GAUGES)


def assert_idle(store: Store, wake: Wake) -> None:
    """The gauges are back to 0, and the idle message was published."""
    assert gauges(store) == (0, 0, 0)
    wake.until("i")


def run(store: Store, proc: str, task_id: int, kind: str = "ok", value: str = "1") -> None:
    """Start a task `proc` claimed, then settle it with `kind`."""
    assert store.step(proc, None, "", "", "", 0, task_id) == (-1, "ok", 1)
    error = "" if kind == "ok" else json.dumps({"type": "ValueError", "message": "x"})
    assert store.step(proc, task_id, kind, value, error, 0, None)[0] == 1


def reap(store: Store, reaper: str) -> None:
    """A heartbeat of `reaper`: reaps every process whose lease has run out."""
    held = store.heartbeat(reaper, LEASE_MS, None, False).held
    assert held


# -- submit --------------------------------------------------------------------------------


def test_submit_is_idempotent_per_process_lane_and_token(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A call retried after a lost reply (the same proc, lane and token, `retried`)
    returns the first call's id and makes no second task, however often it is retried;
    a new token, lane or process makes a new task."""
    first = submit(store, "p1", 0, "1")
    assert submit(store, "p1", 0, "1", retried=True) == first
    assert submit(store, "p1", 0, "1", retried=True) == first
    assert store.counters()["submitted"] == 1
    assert queue(client, store) == [first]
    others = [
        submit(store, "p1", 0, "2", retried=True),  # the reply of "1" was not lost
        submit(store, "p1", 1, "2", retried=True),
        submit(store, "p2", 0, "2", retried=True),
    ]
    assert len({first, *others}) == 4
    assert store.counters()["submitted"] == 4
    assert queue(client, store) == [first, *others]
    assert gauges(store) == (4, 0, 0)
    for task_id in (first, *others):
        assert store.cancel(task_id) == "now"
    assert_idle(store, wake)


def test_without_hiredis_redis_py_packs_the_same_calls(
    store: Store, client: redis.Redis, wake: Wake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hiredis is optional: without its packer, redis-py's packs the same commands
    (text beyond ASCII and numbers included)."""
    monkeypatch.setattr(store_module, "_hiredis_pack", None)
    first = submit(store, "p1", 0, "1", name="é")
    delayed = submit(store, "p1", 1, "2", name="é", mode="d", when=60_000)
    assert queue(client, store, "é") == [first]
    assert task(client, store, first)["n"] == "é"
    assert gauges(store) == (1, 1, 0)
    for task_id in (first, delayed):
        assert store.cancel(task_id) == "now"
    assert_idle(store, wake)


def test_a_forked_child_calls_on_a_connection_of_its_own(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A child made by fork never writes on its parent's socket (their replies would
    mix): its first call opens a connection; the parent keeps its own."""
    first = submit(store, "p1", 0, "1")
    parent = store._connection()
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it used a new connection successfully
        ok = False
        try:
            ok = store._connection() is not parent and submit(store, "p2", 0, "1") > first
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._connection() is parent
    second = submit(store, "p1", 0, "2")
    ids = queue(client, store)
    assert len(ids) == 3
    assert (ids[0], ids[-1]) == (first, second)
    for task_id in ids:
        assert store.cancel(task_id) == "now"
    assert_idle(store, wake)


def test_ids_increase_with_submission(store: Store, wake: Wake) -> None:
    """Task ids grow with each submission, across lanes and processes."""
    ids = [submit(store, f"p{i % 3}", i % 2, str(i), mode="d", when=60_000) for i in range(30)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 30
    assert gauges(store) == (0, 30, 0)
    for task_id in ids:
        assert store.cancel(task_id) == "now"
    assert_idle(store, wake)


def test_a_delayed_task_is_scheduled_and_announced(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A delayed task waits in the schedule, due `when` ms after submission; a due time
    earlier than every other one is announced ('d <ms>'), a later one is not."""
    before = client.time()
    later = submit(store, "p", 0, "1", mode="d", when=60_000)
    sooner = submit(store, "p", 0, "2", mode="d", when=30_000)
    latest = submit(store, "p", 0, "3", mode="d", when=90_000)
    due = {i: int(task(client, store, i)["d"]) for i in (later, sooner, latest)}
    start_ms = int(before[0]) * 1000 + int(before[1]) // 1000
    assert due[later] - start_ms >= 60_000
    assert 29_000 < due[later] - due[sooner] <= 30_000  # each from its own submission
    assert task(client, store, later)["s"] == "s"
    heard = [m for m in wake.drain() if m.startswith("d ")]
    assert heard == [f"d {due[later]}", f"d {due[sooner]}"]
    for task_id in (later, sooner, latest):
        assert store.cancel(task_id) == "now"
    assert client.zcard(f"{store.prefix}sched") == 0
    assert_idle(store, wake)


def test_a_delayed_tasks_due_time_is_never_before_the_submission_plus_delay(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A task delayed by 100 ms is due no earlier than the server's clock (read just
    before the submission, in microseconds) + 100 ms, on each of 50 submissions."""
    early = []
    ids = []
    for i in range(50):
        seconds, micros = client.time()
        before_us = int(seconds) * 1_000_000 + int(micros)
        task_id = submit(store, "p", 0, str(i), mode="d", when=100)
        ids.append(task_id)
        due_us = int(task(client, store, task_id)["d"]) * 1000
        if due_us < before_us + 100_000:
            early.append(before_us + 100_000 - due_us)
    for task_id in ids:
        store.cancel(task_id)
    assert_idle(store, wake)
    assert early == [], f"due early by up to {max(early)} us"


# -- claim ---------------------------------------------------------------------------------


def test_claim_moves_tasks_oldest_first_into_the_claim_set(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """claim takes up to `limit` tasks, oldest first, into the process's claim set
    (state c), with what a worker needs to run them."""
    proc = join(store, "worker")
    ids = [submit(store, "web", 0, str(i)) for i in range(3)]
    claimed = store.claim(proc, 2, ["n"])
    assert claimed is not None
    now, rows = claimed
    assert [r.id for r in rows] == ids[:2]
    row = rows[0]
    assert (row.name, row.payload, row.options, row.attempts, row.failures, row.errors) == (
        "n",
        PAYLOAD,
        "",
        0,
        0,
        "",
    )
    assert 0 < row.submitted <= now
    assert claims(client, store, proc) == set(ids[:2])
    assert queue(client, store) == [ids[2]]
    assert task(client, store, ids[0])["s"] == "c"
    assert gauges(store) == (3, 0, 0)  # a claimed task still counts as queued
    for task_id in ids:
        assert store.cancel(task_id) == "now"
    assert_idle(store, wake)


def test_claim_refuses_a_process_without_a_lease(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A process that has no lease (never joined, or reaped) claims nothing: None."""
    task_id = submit(store, "web", 0, "1")
    assert store.claim("ghost", 10, ["n"]) is None
    assert queue(client, store) == [task_id]
    assert task(client, store, task_id)["s"] == "q"
    victim = join(store, "victim", DEAD_MS)
    reap(store, join(store, "reaper"))
    assert store.claim(victim, 10, ["n"]) is None
    assert store.cancel(task_id) == "now"
    assert_idle(store, wake)


# -- step ----------------------------------------------------------------------------------


def test_step_starts_then_settles_a_task(store: Store, client: redis.Redis, wake: Wake) -> None:
    """A start makes the claimed task running (attempt 1); a settle 'ok' stores its
    value, ends it S with the result TTL, and the cluster is idle again."""
    proc = join(store, "worker")
    task_id = submit(store, "web", 0, "1")
    store.claim(proc, 1, ["n"])
    assert store.step(proc, None, "", "", "", 0, task_id) == (-1, "ok", 1)
    assert task(client, store, task_id)["s"] == "r"
    assert gauges(store) == (0, 0, 1)
    assert "i" not in wake.drain()
    assert store.step(proc, task_id, "ok", "[5]", "", 0, None) == (1, "", 0)
    fields = task(client, store, task_id)
    assert (fields["s"], fields["v"], fields["at"]) == ("S", "[5]", "1")
    assert 0 < client.pttl(f"{store.prefix}t:{task_id}") <= 60_000
    assert claims(client, store, proc) == set()
    assert store.counters()["succeeded"] == 1
    assert_idle(store, wake)


def test_a_process_that_lost_a_claim_can_neither_start_nor_settle_it(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """step is fenced by the claim set: another process starting a task it did not
    claim gets 'lost', settling it gets 0; a reaped process's late settle gets 0 and
    changes nothing."""
    other = join(store, "other")  # before the victim: joining reaps the expired
    victim = join(store, "victim", DEAD_MS)
    task_id = submit(store, "web", 0, "1")
    store.claim(victim, 1, ["n"])
    assert store.step(other, None, "", "", "", 0, task_id) == (-1, "lost", 0)
    assert task(client, store, task_id)["s"] == "c"
    assert store.step(victim, None, "", "", "", 0, task_id) == (-1, "ok", 1)
    assert store.step(other, task_id, "ok", "1", "", 0, None)[0] == 0
    assert task(client, store, task_id)["s"] == "r"
    reap(store, other)  # the victim's lease ran out: its running attempt is lost
    assert store.step(victim, task_id, "ok", "1", "", 0, None)[0] == 0
    fields = task(client, store, task_id)
    assert (fields["s"], fields["lo"]) == ("q", "1")
    assert "v" not in fields
    assert store.counters().get("succeeded", 0) == 0
    claimed = store.claim(other, 1, ["n"])
    assert claimed is not None
    assert [r.id for r in claimed[1]] == [task_id]
    assert store.step(other, None, "", "", "", 0, task_id) == (-1, "ok", 2)
    assert store.step(other, task_id, "ok", "2", "", 0, None)[0] == 1
    assert_idle(store, wake)


def test_a_start_retried_after_a_lost_reply_says_ok_with_the_same_attempt(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A start sent twice (its reply was lost) is 'ok' both times with attempt 1, and
    counts one attempt and one running task."""
    proc = join(store, "worker")
    task_id = submit(store, "web", 0, "1")
    store.claim(proc, 1, ["n"])
    assert store.step(proc, None, "", "", "", 0, task_id) == (-1, "ok", 1)
    assert store.step(proc, None, "", "", "", 0, task_id) == (-1, "ok", 1)
    assert task(client, store, task_id)["at"] == "1"
    assert gauges(store) == (0, 0, 1)
    assert store.step(proc, task_id, "ok", "1", "", 0, None)[0] == 1
    assert store.step(proc, task_id, "ok", "1", "", 0, None)[0] == 0  # settled once
    assert store.counters()["succeeded"] == 1
    assert_idle(store, wake)


def test_a_retry_goes_to_the_schedule_and_a_failure_ends_the_task(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A settle 'retry' with a delay schedules the task again (errors kept, one failure
    counted); a settle 'fail' ends it F, counted by name."""
    proc = join(store, "worker")
    task_id = submit(store, "web", 0, "1")
    store.claim(proc, 1, ["n"])
    store.step(proc, None, "", "", "", 0, task_id)
    error = json.dumps({"type": "ConnectionError", "message": "reset", "traceback": ""})
    assert store.step(proc, task_id, "retry", "", error, 60_000, None)[0] == 1
    fields = task(client, store, task_id)
    assert (fields["s"], fields["f"]) == ("s", "1")
    assert [type(e) for e in decode_errors(fields["e"])] == [ConnectionError]
    assert gauges(store) == (0, 1, 0)
    assert store.counters()["retried"] == 1
    assert client.zscore(f"{store.prefix}sched", task_id) == int(fields["d"])
    client.zadd(f"{store.prefix}sched", {str(task_id): 0})  # due now (no waiting)
    assert promote(store, 10)[0] == 1
    claimed = store.claim(proc, 1, ["n"])
    assert claimed is not None
    [row] = claimed[1]
    assert (row.attempts, row.failures) == (1, 1)
    assert store.step(proc, None, "", "", "", 0, task_id) == (-1, "ok", 2)
    assert store.step(proc, task_id, "fail", "", error, 0, None)[0] == 1
    fields = task(client, store, task_id)
    assert (fields["s"], fields["f"]) == ("F", "2")
    assert len(decode_errors(fields["e"])) == 2
    assert client.hget(f"{store.prefix}failed", "n") == b"1"
    assert_idle(store, wake)


# -- heartbeat and the reaper --------------------------------------------------------------


def test_a_reaped_claim_goes_back_to_the_front_of_its_queue_with_no_attempt(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A dead process's claimed task (never started) is queued again at the head of its
    queue, as if never claimed: no attempt, no error; the process's records go."""
    reaper = join(store, "reaper")  # before the victim: joining reaps the expired
    victim = join(store, "victim", DEAD_MS)
    first, second = submit(store, "web", 0, "1"), submit(store, "web", 0, "2")
    store.claim(victim, 1, ["n"])
    assert queue(client, store) == [second]
    reap(store, reaper)
    assert queue(client, store) == [first, second]
    fields = task(client, store, first)
    assert fields["s"] == "q"
    assert not {"at", "e", "lo"} & fields.keys()
    assert client.zscore(f"{store.prefix}procs", victim) is None
    assert not client.exists(f"{store.prefix}claims:{victim}")
    assert gauges(store) == (2, 0, 0)
    claimed = store.claim(reaper, 10, ["n"])
    assert claimed is not None
    assert [r.id for r in claimed[1]] == [first, second]
    run(store, reaper, first)
    run(store, reaper, second)
    assert_idle(store, wake)


def test_a_reaped_running_task_counts_a_lost_attempt(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A dead process's running task counts a lost attempt (a WorkerLost naming the
    process, `lo` 1), uses no retry, and goes back to the head of its queue."""
    reaper = join(store, "reaper")  # before the victim: joining reaps the expired
    victim = join(store, "victim", DEAD_MS)
    task_id, behind = submit(store, "web", 0, "1"), submit(store, "web", 0, "2")
    store.claim(victim, 1, ["n"])
    store.step(victim, None, "", "", "", 0, task_id)
    reap(store, reaper)
    fields = task(client, store, task_id)
    assert (fields["s"], fields["lo"], fields["at"]) == ("q", "1", "1")
    assert "f" not in fields
    [lost] = decode_errors(fields["e"])
    assert isinstance(lost, WorkerLost)
    assert lost.process == victim
    assert queue(client, store) == [task_id, behind]
    assert gauges(store) == (2, 0, 0)
    claimed = store.claim(reaper, 1, ["n"])
    assert claimed is not None
    [row] = claimed[1]
    assert (row.id, row.attempts, row.failures) == (task_id, 1, 0)
    assert store.step(reaper, None, "", "", "", 0, task_id) == (-1, "ok", 2)
    assert store.step(reaper, task_id, "ok", "1", "", 0, None)[0] == 1
    assert "lo" not in task(client, store, task_id)
    store.claim(reaper, 1, ["n"])
    run(store, reaper, behind)
    assert_idle(store, wake)


def test_three_lost_attempts_in_a_row_fail_the_task(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """A task whose process dies during three attempts in a row fails for good (F),
    with three WorkerLost errors, counted failed; the cluster is idle again."""
    reaper = join(store, "reaper")
    task_id = submit(store, "web", 0, "1")
    for n in range(1, 4):
        victim = join(store, f"victim-{n}", DEAD_MS)
        claimed = store.claim(victim, 1, ["n"])
        assert claimed is not None
        assert [r.id for r in claimed[1]] == [task_id]
        assert store.step(victim, None, "", "", "", 0, task_id) == (-1, "ok", n)
        if n < 3:
            assert "i" not in wake.drain()
        reap(store, reaper)
    fields = task(client, store, task_id)
    assert (fields["s"], fields["at"]) == ("F", "3")
    assert [type(e) for e in decode_errors(fields["e"])] == [WorkerLost] * 3
    assert store.counters()["failed"] == 1
    assert client.hget(f"{store.prefix}failed", "n") == b"1"
    assert queue(client, store) == []
    assert client.pttl(f"{store.prefix}t:{task_id}") > 0
    assert_idle(store, wake)


def test_a_running_task_whose_cancel_was_asked_ends_cancelled_when_reaped(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """cancel() of a running task asks its process ('x <id>', field k); if that process
    dies instead, the reaper ends the task cancelled, not queued again."""
    reaper = join(store, "reaper")  # before the victim: joining reaps the expired
    victim = join(store, "victim", DEAD_MS)
    task_id = submit(store, "web", 0, "1")
    store.claim(victim, 1, ["n"])
    store.step(victim, None, "", "", "", 0, task_id)
    assert store.cancel(task_id) == "r"
    assert f"x {task_id}" in wake.drain()
    assert task(client, store, task_id)["k"] == "1"
    reap(store, reaper)
    fields = task(client, store, task_id)
    assert fields["s"] == "C"
    assert "k" not in fields
    assert store.counters()["cancelled"] == 1
    assert queue(client, store) == []
    assert_idle(store, wake)


def test_a_heartbeat_of_a_reaped_process_says_lost(store: Store, wake: Wake) -> None:
    """A process reaped by another's heartbeat hears 'lost' from its own next one, and
    may join again."""
    victim = join(store, "victim", DEAD_MS)
    reap(store, join(store, "reaper"))
    assert store.heartbeat(victim, LEASE_MS, None, False).held is False
    assert store.heartbeat(victim, LEASE_MS, None, True).held is True
    assert store.live_processes() == 2
    assert_idle(store, wake)


def test_a_heartbeat_says_when_the_next_lease_of_another_process_ends(store: Store) -> None:
    """So that the heartbeat thread can reap a dead process as its lease ends: the
    earliest end among the others (never its own), -1 with no other process."""
    alone = store.heartbeat("a", 60_000, None, True)
    assert alone.ends == -1
    store.heartbeat("b", 30_000, None, True)
    store.heartbeat("c", 45_000, None, True)
    beat = store.heartbeat("a", 1_000, None, False)  # its own lease ends first
    assert 29_000 <= beat.ends - beat.now <= 30_000
    beat = store.heartbeat("b", 50_000, None, False)  # a's now ends first
    assert 0 <= beat.ends - beat.now <= 1_000
    for proc in "abc":
        store.leave(proc)


def test_handback_returns_claims_at_once(store: Store, client: redis.Redis, wake: Wake) -> None:
    """handback gives a claimed task back to the head of its queue with no attempt,
    and a running one back as a lost attempt; ids it does not hold are ignored."""
    proc = join(store, "worker")
    claimed_id, running_id = submit(store, "web", 0, "1"), submit(store, "web", 0, "2")
    store.claim(proc, 2, ["n"])
    store.step(proc, None, "", "", "", 0, running_id)
    assert store.handback(proc, [claimed_id, running_id, 10**6]) == 2
    assert queue(client, store) == [running_id, claimed_id]  # each put back at the head
    assert "at" not in task(client, store, claimed_id)
    fields = task(client, store, running_id)
    assert (fields["at"], fields["lo"]) == ("1", "1")
    assert claims(client, store, proc) == set()
    assert gauges(store) == (2, 0, 0)
    store.claim(proc, 2, ["n"])
    run(store, proc, claimed_id)
    assert store.step(proc, None, "", "", "", 0, running_id) == (-1, "ok", 2)
    assert store.step(proc, running_id, "ok", "1", "", 0, None)[0] == 1
    assert_idle(store, wake)


# -- promote -------------------------------------------------------------------------------


def test_promote_moves_each_due_task_exactly_once_under_a_race(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """Eight threads promoting in small batches at once over 1,000 due tasks: each task
    enters its queue exactly once, and the promoted counts add up to 1,000."""
    ids: dict[str, list[int]] = {"a": [], "b": []}
    for i in range(1000):
        name = "ab"[i % 2]
        ids[name].append(submit(store, "web", 0, str(i), name=name, mode="d", when=1))
    assert gauges(store) == (0, 1000, 0)
    promoted: list[int] = []
    threads = Threads()

    def promoter() -> None:
        while True:  # until the schedule is empty (the last tasks are due within 1 ms)
            count, wait = promote(store, 7)
            promoted.append(count)
            if count < 7 and wait == -1:  # a full batch may leave due tasks behind
                return

    for _ in range(8):
        threads.start(promoter)
    threads.join()
    assert sum(promoted) == 1000
    for name in "ab":
        # Once each. (Not in submission order: tasks due in the same ms are promoted
        # in the zset's order for equal scores, by id as a string: 11 before 9.)
        assert sorted(queue(client, store, name)) == ids[name]
    assert client.zcard(f"{store.prefix}sched") == 0
    assert gauges(store) == (1000, 0, 0)
    pipe = client.pipeline(transaction=False)
    for task_id in ids["a"] + ids["b"]:
        pipe.hget(f"{store.prefix}t:{task_id}", "s")
    assert set(pipe.execute()) == {b"q"}
    for task_id in ids["a"] + ids["b"]:
        assert store.cancel(task_id) == "now"
    assert_idle(store, wake)


def test_promote_leaves_tasks_not_yet_due_and_says_when_the_next_is(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """promote moves nothing before its time and returns the wait until the earliest
    due task; -1 when the schedule is empty."""
    assert promote(store, 10) == (0, -1)
    task_id = submit(store, "web", 0, "1", mode="d", when=60_000)
    count, wait = promote(store, 10)
    assert count == 0
    assert 59_000 < wait <= 60_001  # due times are rounded up to the next ms
    assert task(client, store, task_id)["s"] == "s"
    assert store.cancel(task_id) == "now"
    assert promote(store, 10) == (0, -1)
    assert_idle(store, wake)


def test_promote_holds_the_due_occurrences_it_lists_and_fire_fires_each_once(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """Processes that wake at once share the due occurrences: the one whose promote
    listed them holds them (another promote does not list them); an abandoned hold
    ends (here at once: hold 0) and the occurrence is listed again; one fire call
    fires many, each once: the second for the same grid finds it fired."""
    now = int(time.time() * 1000)
    for key in ("a", "b"):
        spec = definition("every", "n", PAYLOAD, "", "", interval=60.0)
        first = (now - 1000, now - 1000)
        assert store.define(key, spec, ("n", PAYLOAD, "", ""), ("", 60_000, 0), first) == "created"
    _, _, _, held = store.promote(10, 60_000)
    assert sorted(key for key, _, _ in held) == ["a", "b"]
    _, wait, _, others = store.promote(10, 60_000)
    assert others == []
    assert wait > 55_000
    next_grid, next_due = now + 59_000, now + 59_000
    fired = store.fire([(key, grid, next_grid, next_due) for key, grid, _ in held * 2])
    assert [outcome for outcome, _ in fired] == [1, 1, 0, 0]
    runs = {task_id for _, task_id in fired[:2]}
    assert sorted(queue(client, store)) == sorted(runs)
    assert {store.periodic(key)["grid"] for key in ("a", "b")} == {str(next_grid)}

    assert store.define("c", spec, ("n", PAYLOAD, "", ""), ("", 60_000, 0), first) == "created"
    assert [key for key, _, _ in store.promote(10, 0)[3]] == ["c"]
    ((_, grid, _),) = store.promote(10, 0)[3]  # the first caller's hold is over
    assert store.fire([("c", grid, None, None)])[0][0] == 1
    assert store.promote(10, 0)[3] == []  # no plan: fired once, not listed again


# -- cancel --------------------------------------------------------------------------------


def test_a_cancelled_queued_task_stays_in_its_queue_until_a_claim_drops_it(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """cancel of a queued task ends it C at once ('now'), leaving its id in the queue
    with no TTL; the next claim drops the id (its TTL starts) and never returns it."""
    proc = join(store, "worker")
    cancelled, kept = submit(store, "web", 0, "1"), submit(store, "web", 0, "2")
    assert store.cancel(cancelled) == "now"
    assert store.cancel(cancelled) == "C"
    assert task(client, store, cancelled)["s"] == "C"
    assert queue(client, store) == [cancelled, kept]
    assert client.pttl(f"{store.prefix}t:{cancelled}") == -1
    assert gauges(store) == (1, 0, 0)
    assert "i" not in wake.drain()
    claimed = store.claim(proc, 10, ["n"])
    assert claimed is not None
    assert [r.id for r in claimed[1]] == [kept]
    assert queue(client, store) == []
    assert client.pttl(f"{store.prefix}t:{cancelled}") > 0
    assert "at" not in task(client, store, cancelled)
    run(store, proc, kept)
    assert store.counters()["cancelled"] == 1
    assert_idle(store, wake)


def test_a_cancelled_claimed_task_is_never_started(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """cancel of a task claimed and not started ends it C; the claimer's start then
    says 'cancelled' and drops it from its claims."""
    proc = join(store, "worker")
    task_id = submit(store, "web", 0, "1")
    store.claim(proc, 1, ["n"])
    assert store.cancel(task_id) == "now"
    assert_idle(store, wake)
    assert store.step(proc, None, "", "", "", 0, task_id) == (-1, "cancelled", 0)
    assert claims(client, store, proc) == set()
    fields = task(client, store, task_id)
    assert fields["s"] == "C"
    assert "at" not in fields
    assert gauges(store) == (0, 0, 0)


def test_cancel_of_a_scheduled_task_removes_it_from_the_schedule(
    store: Store, client: redis.Redis, wake: Wake
) -> None:
    """cancel of a scheduled task takes it out of the schedule at once; an unknown id
    says 'unknown'; a finished one says its final state."""
    proc = join(store, "worker")
    scheduled = submit(store, "web", 0, "1", mode="d", when=60_000)
    assert store.cancel(scheduled) == "now"
    assert client.zscore(f"{store.prefix}sched", scheduled) is None
    assert store.cancel(10**9) == "unknown"
    assert_idle(store, wake)
    done = submit(store, "web", 0, "2")
    store.claim(proc, 1, ["n"])
    run(store, proc, done)
    assert store.cancel(done) == "S"
    assert store.counters()["cancelled"] == 1
    assert_idle(store, wake)


# -- dead letters --------------------------------------------------------------------------


def test_dead_requeue_and_purge(store: Store, client: redis.Redis, wake: Wake) -> None:
    """A claimed task whose payload cannot be read becomes a dead letter (D, a
    ValueError, no TTL); requeue puts it back in its queue as a new submission; purge
    drops the letters and lets their tasks expire."""
    proc = join(store, "worker")
    task_id = submit(store, "web", 0, "1")
    store.claim(proc, 1, ["n"])
    store.dead(proc, task_id, "its payload cannot be read: test")
    fields = task(client, store, task_id)
    assert fields["s"] == "D"
    assert [type(e) for e in decode_errors(fields["e"])] == [ValueError]
    assert client.pttl(f"{store.prefix}t:{task_id}") == -1
    [letter] = store.dead_letters()
    assert (letter["id"], letter["name"]) == (task_id, "n")
    assert letter["reason"] == "its payload cannot be read: test"
    assert_idle(store, wake)
    assert store.requeue() == (1, 0)
    assert store.dead_letters() == []
    assert queue(client, store) == [task_id]
    assert task(client, store, task_id)["s"] == "q"
    assert store.counters()["submitted"] == 2
    store.claim(proc, 1, ["n"])
    store.dead(proc, task_id, "again")
    assert store.purge() == 1
    assert store.dead_letters() == []
    assert client.pttl(f"{store.prefix}t:{task_id}") > 0
    assert store.requeue() == (0, 0)
    assert_idle(store, wake)

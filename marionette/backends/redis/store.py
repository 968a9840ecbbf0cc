"""Store: a namespace's data in Redis, changed only by one atomic Lua script per
transition (scripts/*.lua: submit, claim, step, promote, heartbeat, handback, leave,
cancel, watch, dead, requeue, purge, recover; for keys, groups and periodics: move,
limit, define, fire, pause, resume, replan).

Every key of a namespace ``ns`` starts with ``{ns}:``, one hash tag, so a Redis
Cluster keeps them in one slot and the scripts may touch any of them. Each script is
loaded once (``EVALSHA``, reloaded by redis-py after a server restart) and reads the
server's clock (``TIME``): the cluster shares one clock, whatever the processes'.
What the keys hold is described at the top of ``scripts/common.lua``.

This module only speaks to Redis; retrying through outages is `Outages`' job, and
deciding what to do is the manager's. Thread-safe: each thread calls on a
connection of its own (see `Store._run`).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

__all__ = ["Beat", "Claimed", "Store", "TaskFields"]


def _find_hiredis_pack() -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis's command packer (the optional extra `hiredis`), or None without it.

    Imported by name so that type-checking reads the same with or without it."""
    try:
        module = importlib.import_module("hiredis")
    except ImportError:  # pragma: no cover - depends on the installation
        return None
    pack: Callable[[tuple[Any, ...]], bytes] = module.pack_command
    return pack


_hiredis_pack = _find_hiredis_pack()

_SCRIPTS = (
    "cancel",
    "claim",
    "dead",
    "define",
    "fire",
    "handback",
    "heartbeat",
    "leave",
    "limit",
    "move",
    "pause",
    "promote",
    "purge",
    "recover",
    "replan",
    "requeue",
    "resume",
    "step",
    "submit",
    "watch",
)
#: The fields `watch` and `read` return, in order.
_FIELDS = ("s", "n", "o", "at", "T", "E", "d", "v", "e", "x")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: How many times this process descends from a fork: a connection made before the
#: fork belongs to the parent (counted here, as os.getpid() costs a system call).
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)

#: A top-level definition of common.lua: ``local function name`` or ``local name``.
_DEFINITION = re.compile(r"^local (?:function )?(\w+)", re.MULTILINE)


#: In a script, where the definitions go when a fast path comes first.
_MARKER = "-- common --\n"


def _script(name: str) -> str:
    """A script: the definitions of common.lua it uses (directly or through another
    one), then its body (or, at the line ``-- common --``, between its fast path and
    the rest). Every definition a script carries costs each call of it
    (Lua makes its closures anew): about 11 us for all of them on this project's
    machine, a fifth of a submission's time in Redis."""
    folder = resources.files(__package__).joinpath("scripts")
    common = folder.joinpath("common.lua").read_text()
    body = folder.joinpath(f"{name}.lua").read_text()
    starts = [m.start() for m in _DEFINITION.finditer(common)] + [len(common)]
    preamble = common[: starts[0]]  # the comments at the top
    chunks = {
        m.group(1): common[m.start() : end]
        for m, end in zip(_DEFINITION.finditer(common), starts[1:], strict=True)
    }
    order = list(chunks)
    needed: set[str] = set()
    pending = [body]
    while pending:
        text = pending.pop()
        for candidate in order:
            if candidate not in needed and re.search(rf"\b{candidate}\b", text):
                needed.add(candidate)
                pending.append(chunks[candidate])
    # K and TTL (the prefix and the result TTL, from ARGV) come first in any case.
    first = "".join(chunks[n] for n in ("K", "TTL"))
    definitions = "".join(chunks[n] for n in order if n in needed and n not in ("K", "TTL"))
    head, marker, tail = body.partition(_MARKER)
    if marker:  # a fast path first, which needs none of the definitions
        return preamble + first + head + definitions + tail
    return preamble + first + definitions + body


class Beat(NamedTuple):
    """A heartbeat's reply."""

    held: bool  #: False: the process was presumed dead and reaped; it must rejoin
    now: int  #: the server's clock, ms
    ends: int  #: when the next lease of another process ends (ms; -1: none held)


class Claimed(NamedTuple):
    """A task a process claimed: what a worker needs to run its next attempt."""

    id: int
    name: str
    payload: str
    options: str
    attempts: int
    failures: int
    #: Submission time, server milliseconds.
    submitted: int
    #: The errors of its earlier attempts (a JSON list), or ''.
    errors: str


@dataclass(frozen=True, slots=True)
class TaskFields:
    """A task's hash as a handler reads it (None where the field is absent)."""

    state: str
    name: str
    options: str | None
    attempts: int
    submitted: int
    ended: int | None
    due: int | None
    value: str | None
    errors: str | None
    base: bool

    @classmethod
    def parse(cls, row: list[Any]) -> TaskFields:
        f = dict(zip(_FIELDS, (None if v is None else _text(v) for v in row), strict=True))
        return cls(
            state=f["s"] or "",
            name=f["n"] or "",
            options=f["o"],
            attempts=int(f["at"] or 0),
            submitted=int(f["T"] or 0),
            ended=None if f["E"] is None else int(f["E"]),
            due=None if f["d"] is None else int(f["d"]),
            value=f["v"],
            errors=f["e"],
            base=f["x"] == "b",
        )


class Store:
    """The Lua transitions of one namespace, as Python calls."""

    def __init__(self, client: Any, namespace: str, result_ttl: float) -> None:
        self.client = client
        #: The prefix of every key, with the namespace's hash tag.
        self.prefix = "{" + namespace + "}:"
        #: The pub/sub channel of the namespace's wake-up messages.
        self.channel = self.prefix + "wake"
        self._ttl = int(result_ttl * 1000)
        self._key = self.prefix + "id"  # the key every script declares (cluster routing)
        self._local = threading.local()
        self._scripts = {name: client.register_script(_script(name)) for name in _SCRIPTS}
        from redis.exceptions import NoScriptError

        self._no_script = NoScriptError

    def _run(self, name: str, *args: Any) -> Any:
        """Run a script on the calling thread's own connection.

        redis-py's command path (its pool, retries, hooks and metrics) costs about
        twice a loopback round trip here, and a script call is marionette's whole hot
        path; marionette decides itself what a failed call means (see `Outages`). So
        each thread keeps one connection of its own (made by the client's pool; not
        shared, so no lock), closed after a failure (it reconnects on its next use),
        and dropped in a child made by fork.
        """
        connection = self._connection()
        script = self._scripts[name]
        try:
            try:
                connection.send_packed_command(self._pack(script.sha, args), False)
                return connection.read_response()
            except self._no_script:  # a restarted server forgot it: load it again
                script.sha = self.client.script_load(script.script)
                connection.send_packed_command(self._pack(script.sha, args), False)
                return connection.read_response()
        except BaseException:
            connection.disconnect()
            raise

    def _pack(self, sha: str, args: tuple[Any, ...]) -> list[bytes]:
        """The chunks of ``EVALSHA sha`` with `args`: packed by hiredis when installed
        (a third of the time of redis-py's own packing, which inspects every
        argument)."""
        command = ("EVALSHA", sha, 1, self._key, self.prefix, self._ttl, *args)
        if _hiredis_pack is not None:
            return [_hiredis_pack(command)]
        packed: list[bytes] = self._connection().pack_command(*command)
        return packed

    def _connection(self) -> Any:
        local = self._local
        connection = getattr(local, "connection", None)
        if connection is None or local.forks != _forks:
            connection = local.connection = self.client.connection_pool.make_connection()
            local.forks = _forks
        return connection

    # -- transitions -------------------------------------------------------------

    def submit(
        self,
        proc: str,
        lane: int,
        token: str,
        name: str,
        payload: str,
        options: str,
        mode: str,
        when: int,
        key: str,
        group: str,
        retried: bool,
    ) -> tuple[int, bool]:
        """(the task's id, whether it is new): with a key whose pending task exists,
        that task's id and False. A `retried` call with the same lane token (the
        reply of an earlier one was lost) returns what the first did."""
        task_id, new = self._run(
            "submit", proc, lane, token, name, payload, options, mode, when, key, group,
            "1" if retried else "",
        )  # fmt: skip
        return int(task_id), bool(new)

    def claim(self, proc: str, limit: int, names: list[str]) -> tuple[int, list[Claimed]] | None:
        """(server now, claimed tasks), or None when `proc` has no lease."""
        return self._claimed(self._run("claim", proc, limit, *names))

    def recover(self, proc: str) -> tuple[int, list[Claimed]]:
        """The tasks `proc` holds claimed and not started (after a lost claim reply)."""
        found = self._claimed(self._run("recover", proc))
        assert found is not None
        return found

    @staticmethod
    def _claimed(reply: list[Any]) -> tuple[int, list[Claimed]] | None:
        now = int(reply[0])
        if now < 0:
            return None
        if not reply[1:] or isinstance(reply[1][1], str):  # the client decodes replies
            tasks = [
                Claimed(int(r[0]), r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), r[7])
                for r in reply[1:]
            ]
        else:
            tasks = [
                Claimed(
                    int(r[0]),
                    _text(r[1]),
                    _text(r[2]),
                    _text(r[3]),
                    int(r[4]),
                    int(r[5]),
                    int(r[6]),
                    _text(r[7]),
                )
                for r in reply[1:]
            ]
        return now, tasks

    def step(
        self,
        proc: str,
        done: int | None,
        kind: str,
        value: str,
        error: str,
        delay_ms: int,
        start: int | None,
    ) -> tuple[int, str, int]:
        """Settle `done` (if any) and start `start` (if any) in one round trip.

        Returns (settled: 1, 0 when fenced off, -1 when nothing was settled; the start:
        'ok', 'lost', 'cancelled' or ''; the attempt number when started).
        """
        reply = self._run(
            "step",
            proc,
            "" if done is None else done,
            kind,
            value,
            error,
            delay_ms,
            "" if start is None else start,
        )
        started = reply[1]
        outcome = _text(started[0]) if started else ""
        attempt = int(started[1]) if outcome == "ok" else 0
        return int(reply[0]), outcome, attempt

    def promote(self, limit: int, hold_ms: int) -> tuple[int, int, int, list[tuple[str, int, str]]]:
        """(tasks promoted, ms until the next due task or occurrence or -1, server now,
        the periodics due now as (key, grid, definition)), each of those held for
        this caller for `hold_ms` (see promote.lua)."""
        reply = self._run("promote", limit, hold_ms)
        due = [(_text(key), int(float(grid)), _text(spec)) for key, grid, spec in reply[3:]]
        return int(reply[0]), int(reply[1]), int(reply[2]), due

    def fire(
        self, occurrences: Sequence[tuple[str, int, int | None, int | None]]
    ) -> list[tuple[int, int]]:
        """Fire periodics' occurrences, each given as (key, planned grid, next grid,
        next due): for each, (0, 0) if another process did, (1, run id) for a new
        run, (2, pending run id) when it merged into it."""
        args: list[Any] = []
        for key, grid, next_grid, next_due in occurrences:
            args += (key, grid, "" if next_grid is None else next_grid)
            args.append("" if next_due is None else next_due)
        return [(int(outcome), int(task_id)) for outcome, task_id in self._run("fire", *args)]

    def define(
        self,
        key: str,
        spec: str,
        run: tuple[str, str, str, str],
        plan: tuple[str, int, int],
        first: tuple[int, int],
    ) -> str:
        """Make, join or replace a periodic: 'created', 'joined' or 'replaced'.

        `run` is (task name, payload, options, group) of its runs; `plan` is
        (fixed delay '1' or '', interval ms, jitter ms); `first` is (grid, due) of the
        first occurrence, used unless it is joined."""
        return _text(self._run("define", key, spec, *run, *plan, *first))

    def pause(self, key: str, how: str) -> int:
        """Pause ('p') or end ('x') a periodic: the run it cancelled, 0, or -1."""
        return int(self._run("pause", key, how))

    def resume(self, key: str, grid: int, due: int) -> bool:
        return bool(self._run("resume", key, grid, due))

    def limit(self, group: str, limit: int, only_if_unset: bool) -> int:
        """Set a group's limit (or only if it has none): the limit in force."""
        return int(self._run("limit", group, limit, "1" if only_if_unset else "0"))

    def move(self, task_id: int, due: int, only_sooner: bool) -> bool:
        return bool(self._run("move", task_id, due, "1" if only_sooner else "0"))

    def replan(self, key: str, due: int, only_sooner: bool) -> bool:
        return bool(self._run("replan", key, due, "1" if only_sooner else "0"))

    def heartbeat(
        self, proc: str, lease_ms: int, info: dict[str, Any] | None, register: bool
    ) -> Beat:
        """Renew `proc`'s lease and reap the dead."""
        reply = self._run(
            "heartbeat",
            proc,
            lease_ms,
            "" if info is None else json.dumps(info, separators=(",", ":")),
            "1" if register else "0",
        )
        if _text(reply[0]) != "ok":
            return Beat(False, int(reply[1]), -1)
        return Beat(True, int(reply[1]), int(reply[3]))

    def handback(self, proc: str, ids: list[int]) -> int:
        """Give back claimed (or, after a timed-out stop, running) tasks."""
        return int(self._run("handback", proc, *ids)) if ids else 0

    def leave(self, proc: str) -> None:
        self._run("leave", proc)

    def cancel(self, task_id: int) -> str:
        """'C' cancelled now, 'r' running (asked to stop), a final state, or 'unknown'."""
        return _text(self._run("cancel", task_id))

    def watch(self, task_id: int) -> TaskFields | None:
        """A task's fields, asking to hear when it finishes; None when unknown."""
        row = self._run("watch", task_id)
        return None if not row else TaskFields.parse(row)

    def read(self, task_id: int) -> TaskFields | None:
        """A task's fields, without asking to hear of it; None when unknown."""
        row = self.client.hmget(f"{self.prefix}t:{task_id}", *_FIELDS)
        return None if row[0] is None else TaskFields.parse(row)

    def state(self, task_id: int) -> str | None:
        value = self.client.hget(f"{self.prefix}t:{task_id}", "s")
        return None if value is None else _text(value)

    def dead(self, proc: str, task_id: int, reason: str) -> None:
        self._run("dead", proc, task_id, reason)

    def requeue(self) -> tuple[int, int]:
        requeued, dropped = self._run("requeue")
        return int(requeued), int(dropped)

    def purge(self) -> int:
        return int(self._run("purge"))

    # -- reading -----------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """The cluster's counters and gauges (``stats``). Submissions are counted by the
        id counter (one id per new task; a keyed duplicate makes none), plus the dead
        letters requeued: one call less on every submission."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.prefix + "stats")
        pipe.get(self.prefix + "id")
        raw, ids = pipe.execute()
        counters = {_text(k): int(v) for k, v in raw.items()}
        counters["submitted"] = int(ids or 0) + counters.get("resubmitted", 0)
        return counters

    def processes(self) -> list[tuple[str, float, dict[str, Any]]]:
        """Every registered process: (id, lease expiry in server ms, its info)."""
        rows = self.client.zrange(self.prefix + "procs", 0, -1, withscores=True)
        out = []
        for proc, expiry in rows:
            proc = _text(proc)
            raw = self.client.get(f"{self.prefix}proc:{proc}")
            out.append((proc, expiry, json.loads(raw) if raw else {}))
        return out

    def live_processes(self) -> int:
        """How many processes hold a lease now (by the server's clock)."""
        now = self.client.time()
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        return int(self.client.zcount(self.prefix + "procs", now_ms, "+inf"))

    def waiting(
        self, limit: int
    ) -> tuple[list[tuple[int, str, str | None]], list[tuple[int, str, str | None]]]:
        """Up to `limit` queued tasks (oldest first, across the names' queues) and up to
        `limit` scheduled ones (soonest first), as (id, name, options)."""
        names = [_text(n) for n in self.client.smembers(self.prefix + "names")]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.lrange(f"{self.prefix}q:{name}", -limit, -1)  # the head is the right end
        heads = pipe.execute() if names else []
        queued_ids = sorted({int(i) for head in heads for i in head})
        scheduled_ids = [int(i) for i in self.client.zrange(self.prefix + "sched", 0, limit - 1)]
        pipe = self.client.pipeline(transaction=False)
        for task_id in (*queued_ids, *scheduled_ids):
            pipe.hmget(f"{self.prefix}t:{task_id}", "s", "n", "o")
        rows = pipe.execute() if queued_ids or scheduled_ids else []
        queued, scheduled = [], []
        for task_id, (state, name, options) in zip(
            (*queued_ids, *scheduled_ids), rows, strict=True
        ):
            if state is None:
                continue
            entry = (task_id, _text(name), None if options is None else _text(options))
            if _text(state) in ("q", "c", "k", "g"):
                queued.append(entry)
            elif _text(state) == "s":
                scheduled.append(entry)
        return queued[:limit], scheduled[:limit]

    def key_tasks(self, key: str) -> tuple[int | None, int | None]:
        """(pending, running) task ids of a key."""
        pending, running = self.client.hmget(f"{self.prefix}key:{key}", "p", "r")
        return (
            None if pending is None else int(pending),
            None if running is None else int(running),
        )

    def groups(self) -> dict[str, tuple[int, int, int]]:
        """Every group of the cluster: (limit, slots held, tasks waiting)."""
        names = sorted(_text(g) for g in self.client.smembers(self.prefix + "groups"))
        out = {}
        for name in names:
            limit, running = self.client.hmget(f"{self.prefix}g:{name}", "limit", "running")
            waiting = self.client.llen(f"{self.prefix}gw:{name}")
            out[name] = (int(limit or 0), max(0, int(running or 0)), int(waiting))
        return out

    def is_group(self, group: str) -> bool:
        return bool(self.client.sismember(self.prefix + "groups", group))

    def periodic_keys(self) -> list[str]:
        return sorted(_text(k) for k in self.client.smembers(self.prefix + "periodics"))

    def periodic(self, key: str) -> dict[str, str]:
        """A periodic's fields (empty when it does not exist)."""
        raw = self.client.hgetall(f"{self.prefix}per:{key}")
        return {_text(k): _text(v) for k, v in raw.items()}

    def periodic_due(self, key: str) -> float | None:
        """When a periodic's next occurrence is due (server ms), or None."""
        score = self.client.zscore(self.prefix + "pers", key)
        return None if score is None else float(score)

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.client.lrange(self.prefix + "dead", 0, -1)]

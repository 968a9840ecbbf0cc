"""What ``python -m marionette inspect`` and ``dead`` read from a cluster.

Read-only except for the dead letters' `requeue` and `purge`; needs no running
manager, only the namespace's Redis. A snapshot of many keys, read one after another:
on a busy cluster its parts are taken a few milliseconds apart.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from marionette.backends.redis.store import Store

__all__ = ["Inspector"]

#: How many of the next due tasks `inspect` lists and counts by name.
NEXT_DUE = 10
SCHEDULED_SAMPLE = 1000
#: How many ids of each queue `inspect` looks at one by one.
QUEUE_SAMPLE = 10_000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class Inspector:
    """Reads a namespace's state for people (see `snapshot`)."""

    def __init__(self, client: Any, namespace: str) -> None:
        self._store = Store(client, namespace, result_ttl=86400.0)
        self._client = client
        self._prefix = self._store.prefix

    def _now_ms(self) -> int:
        seconds, micros = self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def snapshot(self) -> dict[str, Any]:
        """Processes (host, pid, workers, busy, heartbeat age), counts per task name
        (queued, scheduled, running, failed), groups (limit, running, waiting),
        periodics (next run, runs, coalesced), the next due tasks, the counters, the
        dead letters."""
        now = self._now_ms()
        prefix, client = self._prefix, self._client
        processes = []
        running: dict[str, int] = {}
        queued: dict[str, int] = {}
        lease_left: list[float] = []
        for proc, expiry, info in self._store.processes():
            ids = [_text(i) for i in client.smembers(f"{prefix}claims:{proc}")]
            for task_id in ids:
                state, name = client.hmget(f"{prefix}t:{task_id}", "s", "n")
                if state is None:
                    continue
                # Running, or claimed and not started yet (still waiting to start).
                into = running if _text(state) == "r" else queued
                into[_text(name)] = into.get(_text(name), 0) + 1
            lease_left.append(expiry - now)
            processes.append(
                {
                    "id": proc,
                    "host": info.get("host"),
                    "pid": info.get("pid"),
                    "server": info.get("server"),
                    "workers": info.get("workers"),
                    "busy": info.get("busy"),
                    "claimed": len(ids),
                    "alive": expiry > now,
                    "lease_left": round((expiry - now) / 1000, 3),
                    "names": info.get("names", []),
                }
            )
        names = sorted(_text(n) for n in client.smembers(prefix + "names"))
        failed = {_text(k): int(v) for k, v in client.hgetall(prefix + "failed").items()}
        scheduled: dict[str, int] = {}
        next_due: list[dict[str, Any]] = []
        sample = client.zrange(prefix + "sched", 0, SCHEDULED_SAMPLE - 1, withscores=True)
        for task_id, due in sample:
            name = client.hget(f"{prefix}t:{_text(task_id)}", "n")
            name = "?" if name is None else _text(name)
            scheduled[name] = scheduled.get(name, 0) + 1
            if len(next_due) < NEXT_DUE:
                next_due.append({"id": int(task_id), "name": name, "due": _iso(due)})
        for name in names:
            queued[name] = queued.get(name, 0) + self._queued(name)
        by_name = {
            name: {
                "queued": queued.get(name, 0),
                "scheduled": scheduled.get(name, 0),
                "running": running.get(name, 0),
                "failed": failed.get(name, 0),
            }
            for name in sorted({*names, *scheduled, *running, *queued, *failed})
        }
        groups = {
            name: {"limit": limit, "running": running, "waiting": waiting}
            for name, (limit, running, waiting) in self._store.groups().items()
        }
        periodics = []
        for key in self._store.periodic_keys():
            fields = self._store.periodic(key)
            if not fields:
                continue
            due = self._store.periodic_due(key)
            spec = json.loads(fields.get("def", "{}"))
            periodics.append(
                {
                    "key": key,
                    "task": fields.get("rn"),
                    "schedule": spec.get("cron") or f"every {spec.get('interval')}s",
                    "state": {"a": "active", "p": "paused"}.get(fields.get("state", ""), "?"),
                    "next_run": None if due is None else _iso(due),
                    "runs": int(fields.get("runs", 0)),
                    "coalesced": int(fields.get("coalesced", 0)),
                }
            )
        return {
            "namespace": prefix[1:-2],
            "time": _iso(now),
            "processes": processes,
            "groups": groups,
            "periodics": periodics,
            "counters": self._store.counters(),
            "tasks": by_name,
            "scheduled_total": int(client.zcard(prefix + "sched")),
            "next_due": next_due,
            "dead_letters": self._store.dead_letters(),
        }

    def _queued(self, name: str) -> int:
        """The tasks waiting in a name's queue (the ids of tasks cancelled while there
        stay until a claim drops them: they are not counted); past QUEUE_SAMPLE ids,
        the rest is counted as the queue's length says."""
        key = f"{self._prefix}q:{name}"
        length = int(self._client.llen(key))
        ids = self._client.lrange(key, -QUEUE_SAMPLE, -1)
        pipe = self._client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(f"{self._prefix}t:{_text(task_id)}", "s")
        states = pipe.execute() if ids else []
        waiting = sum(1 for state in states if state is not None and _text(state) == "q")
        return waiting + max(0, length - len(ids))

    def dead_letters(self) -> list[dict[str, Any]]:
        return [
            {**entry, "at": _iso(entry["at"])} if isinstance(entry.get("at"), int) else entry
            for entry in self._store.dead_letters()
        ]

    def requeue(self) -> tuple[int, int]:
        """Put the dead letters' tasks back in their queues: (requeued, gone)."""
        return self._store.requeue()

    def purge(self) -> int:
        """Drop the dead letters (their tasks expire after the result TTL)."""
        return self._store.purge()


def render(snapshot: dict[str, Any]) -> str:
    """`snapshot` as the tables `inspect` prints for people."""
    lines = [f"namespace {snapshot['namespace']} at {snapshot['time']}", ""]
    processes = snapshot["processes"]
    lines.append(f"processes ({sum(p['alive'] for p in processes)} live)")
    rows = [["host", "pid", "workers", "busy", "claimed", "lease left", "server"]]
    rows += [
        [
            str(p["host"]),
            str(p["pid"]),
            str(p["workers"]),
            str(p["busy"]),
            str(p["claimed"]),
            f"{p['lease_left']:.1f}s" if p["alive"] else "expired",
            str(p["server"]),
        ]
        for p in processes
    ]
    lines += _table(rows)
    lines += ["", "tasks"]
    rows = [["name", "queued", "scheduled", "running", "failed"]]
    rows += [
        [name, *(str(counts[k]) for k in ("queued", "scheduled", "running", "failed"))]
        for name, counts in snapshot["tasks"].items()
    ]
    lines += _table(rows)
    counters = snapshot["counters"]
    lines += [
        "",
        "counters: "
        + ", ".join(
            f"{k}={counters.get(k, 0)}"
            for k in ("submitted", "succeeded", "failed", "retried", "cancelled", "coalesced")
        ),
        f"scheduled: {snapshot['scheduled_total']}",
    ]
    if snapshot["groups"]:
        lines += ["", "groups"]
        lines += _table(
            [["group", "limit", "running", "waiting"]]
            + [
                [name, str(g["limit"]), str(g["running"]), str(g["waiting"])]
                for name, g in snapshot["groups"].items()
            ]
        )
    if snapshot["periodics"]:
        lines += ["", "periodics"]
        lines += _table(
            [["key", "task", "schedule", "state", "next run", "runs", "coalesced"]]
            + [
                [
                    p["key"],
                    str(p["task"]),
                    p["schedule"],
                    p["state"],
                    str(p["next_run"] or "-"),
                    str(p["runs"]),
                    str(p["coalesced"]),
                ]
                for p in snapshot["periodics"]
            ]
        )
    if snapshot["next_due"]:
        lines += ["", "next due"]
        lines += _table(
            [["id", "name", "due"]]
            + [[str(d["id"]), d["name"], d["due"]] for d in snapshot["next_due"]]
        )
    dead = snapshot["dead_letters"]
    lines += ["", f"dead letters: {len(dead)}"]
    lines += [f"  #{d.get('id')} {d.get('name')}: {d.get('reason')}" for d in dead[:10]]
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def to_json(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True)

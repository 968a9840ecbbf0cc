"""Reactive features on Redis across three processes: ``python bench/redis_reactive.py [NAME ...]``.

Periodic tasks and group limits of a cluster of three worker processes ("nodes"),
marionette against the peers that offer the feature on Redis (RQ's cron scheduler,
Celery beat, arq cron, Huey's periodic tasks; Dramatiq's ConcurrentRateLimiter for
groups), on a private redis-server started for the run. Every measurement starts its
own nodes on a flushed server; within a round every case is measured once, in an
order that rotates from round to round; the tables show medians over the rounds
(default 3), worst rounds where a column says so.

    python bench/redis_reactive.py                        # everything, about 45 minutes
    python bench/redis_reactive.py --quick                # small sizes, one round
    python bench/redis_reactive.py periodic-once groups   # only those benchmarks
    python bench/redis_reactive.py --systems marionette,arq
    python bench/redis_reactive.py --rounds 5 --json reactive.json

Benchmarks: periodic-once, periodic-10k, groups. Markdown goes to stdout, progress to
stderr. The systems: ``redis_reactive_systems.py``; their tasks, and the producer
process: the ``redis_reactive_tasks`` package; the server and the processes:
``redis_harness.py`` (shared with ``redis_peers.py``).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import percentile
from redis_harness import (
    CpuReading,
    Harness,
    MeasurementError,
    RedisServer,
    WorkerProcess,
    cpu_reading,
    cpu_seconds,
    redis_server,
)
from redis_peers import finite, fmt_seconds
from redis_reactive_systems import SYSTEMS, ReactiveSystem
from redis_reactive_tasks import BEATS, REFUSED, SPANS
from redis_tasks import TICKS
from run import fmt_int, fmt_num, loadavg, table

Measurement = dict[str, Any]
Results = dict[str, list[Measurement | None]]  # by case key, one entry per round
PRODUCER = "redis_reactive_tasks.producer"
#: A run this much before its due time still counts for that occurrence: arq rounds
#: due times to milliseconds, and a clock read is not a due time.
EARLY_TOLERANCE = 0.001


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of the benchmarks; `QUICK` is the smoke test's."""

    nodes: int = 3
    # periodic-once
    once_ticks: int = 20  # ticks counted (1 s systems)
    huey_ticks: int = 3  # ticks counted for Huey, whose period is a minute
    once_warmup: float = 5.0  # the counted ticks start this long after the first run
    # periodic-10k
    periodics: int = 10_000
    many_warmup: float = 10.0
    many_window: float = 30.0
    # marionette's definitions: the first occurrence is due this long after the
    # defining process starts (plus 1 s per 2,000 periodics for the defining itself)
    lead: float = 3.0
    grace: float = 3.0  # runs are read this long after the window closes
    # groups
    limit: int = 4
    grouped: int = 10_000
    ungrouped: int = 10_000
    held: int = 1_000  # the "held" workload: tasks of each kind, each holding...
    hold: float = 0.01  # ...its worker this long
    group_budget: float = 150.0  # a peer's emulation is watched this long at most
    ready_timeout: float = 120.0


QUICK = Sizes(
    once_ticks=6,
    huey_ticks=1,
    once_warmup=3.0,
    periodics=1_000,
    many_warmup=4.0,
    many_window=8.0,
    grouped=1_000,
    ungrouped=1_000,
    held=200,
    group_budget=40.0,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of a benchmark: a system with the parameters of its measurement, or
    the reason it cannot be measured (`unavailable`)."""

    key: str
    label: str
    system: ReactiveSystem
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    unavailable: str | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    method: str  # printed under the title, formatted with the sizes as `o`
    cases: Callable[[Sizes], list[Case]]
    measure: Callable[[ReactiveHarness, Case, Sizes, int], Measurement]
    report: Callable[[Sequence[Case], Results, Sizes], list[str]]


# -- the harness ---------------------------------------------------------------------


class ReactiveHarness(Harness):
    """`Harness` with nodes of several processes and this benchmark's producer."""

    def __init__(self, server: RedisServer, directory: Path, timeout: float) -> None:
        super().__init__(server, directory, timeout)
        #: Environment variables of the current measurement's nodes and producers.
        self.extra: dict[str, str] = {}
        #: The processes that ran each periodic, and the jobs (set by `beats`).
        self.pids: dict[int, set[int]] = {}
        self.tags: dict[int, list[str]] = {}

    def run_producer(self, system: str, action: str, **kwargs: Any) -> Measurement:
        """Runs `action` in a fresh producer process (``redis_reactive_tasks.producer``)
        and returns its JSON result; raises `MeasurementError` if it failed."""
        command = [sys.executable, "-m", PRODUCER, system, action]
        env = {**self.env, "BENCH_ROLE": "producer", **self.extra}
        return self.run_child(command, action, kwargs, env)

    def configure(self, **variables: str) -> None:
        """Environment variables for the next measurement's nodes and producers."""
        self.extra = dict(variables)

    def start_nodes(self, system: ReactiveSystem, count: int) -> list[list[WorkerProcess]]:
        """Starts `count` nodes of `system`, each its processes (see the systems)."""
        nodes = []
        env = {**self.env, "BENCH_ROLE": "worker", **self.extra}
        for index in range(count):
            node = []
            for command in system.node(self.server.url, index, self.directory):
                self._logs += 1
                log = self.directory / f"node-{index}-{self._logs}-{system.name}.log"
                process = WorkerProcess(command, env, self.directory, log)
                self.workers.append(process)
                node.append(process)
            nodes.append(node)
        return nodes

    def ready_nodes(self, system: str, nodes: Sequence[Sequence[WorkerProcess]]) -> float:
        """Sends ``tick`` probes until a worker of every node has run one (as
        `Harness.ready` does, through this benchmark's producer)."""
        start = time.monotonic()
        deadline = start + self.timeout
        pending = [node[0] for node in nodes]
        seen = 0
        while pending:
            self.run_producer(system, "probe", n=6, interval=0.5)
            seen += 6
            left = deadline - time.monotonic()
            if left <= 0 or self.wait_for(TICKS, seen, left) < seen:
                raise MeasurementError("workers not ready")
            for pid, ppid, _ in self.entries(TICKS):
                pending = [w for w in pending if not w.owns(int(pid), int(ppid))]
        return time.monotonic() - start

    def cpu(self) -> CpuReading:
        """The CPU time of every thread of every process started so far."""
        return cpu_reading(p.pid for w in self.workers for p in w.tree())

    def beats(self, until: float) -> dict[int, list[float]]:
        """The recorded runs up to `until` (epoch s), by periodic, in time order. Also
        sets `pids` (the processes that ran each periodic) and `tags` (the job each
        run was, where the system names it)."""
        runs: dict[int, list[float]] = {}
        self.pids = {}
        self.tags = {}
        length = int(self.redis.llen(BEATS))
        for offset in range(0, length, 100_000):
            for entry in self.redis.lrange(BEATS, offset, offset + 99_999):
                i, pid, at, tag = str(entry).split()
                t = float(at)
                if t <= until:
                    runs.setdefault(int(i), []).append(t)
                    self.pids.setdefault(int(i), set()).add(int(pid))
                    if tag != "-":
                        self.tags.setdefault(int(i), []).append(tag)
        for times in runs.values():
            times.sort()
        return runs

    def reruns(self) -> int | None:
        """Runs of a job that had run already (None: the system names no jobs)."""
        if not self.tags:
            return None
        return sum(len(tags) - len(set(tags)) for tags in self.tags.values())

    def jobs(self, i: int) -> int:
        """How many distinct jobs ran periodic `i`."""
        return len(set(self.tags.get(i, ())))


def sleep_until(h: ReactiveHarness, at: float) -> None:
    """Sleeps until the wall time `at`, failing fast if a node exits."""
    while True:
        left = at - time.time()
        if left <= 0:
            return
        h.check_alive()
        time.sleep(min(left, 0.5))


# -- occurrences -----------------------------------------------------------------------


def grid_at_or_after(t: float, phase: float, interval: float) -> float:
    """The first point of the grid ``phase + k * interval`` at or after `t`."""
    return phase + math.ceil((t - phase) / interval) * interval


@dataclasses.dataclass
class Occurrences:
    """What happened to the occurrences of a window, over every periodic.

    A *tick* is the interval from one occurrence's due time to the next one's; the
    runs that started in it are the occurrence's. Its wait is the time from its due
    time to the first run that started at or after it (within the tick when it has
    a run, later when not; infinite when none came before the runs were read).
    """

    ticks: int = 0
    runs: int = 0
    gaps: int = 0  # ticks with no run
    doubled: int = 0  # ticks with two runs or more
    extra: int = 0  # runs beyond the first in their tick
    never: int = 0  # occurrences no run followed at all
    max_in_tick: int = 0
    waits: list[float] = dataclasses.field(default_factory=list)
    per_tick: Counter[int] = dataclasses.field(default_factory=Counter)
    #: Runs in the window of each periodic, by periodic.
    per_periodic: list[int] = dataclasses.field(default_factory=list)


def occurrences(
    runs: dict[int, list[float]],
    n: int,
    phase: Callable[[int], float],
    interval: float,
    t0: float,
    t1: float,
) -> Occurrences:
    """The occurrences of periodics 0..n-1 due in [t0, t1), periodic i's due at
    ``phase(i) + k * interval``, against their `runs` (sorted start times)."""
    out = Occurrences()
    for i in range(n):
        times = runs.get(i, [])
        p = phase(i) % interval
        k = math.ceil((t0 - p) / interval)
        before = out.runs
        while True:
            due = p + k * interval
            if due >= t1:
                break
            k += 1
            first = bisect.bisect_left(times, due - EARLY_TOLERANCE)
            end = bisect.bisect_left(times, due + interval - EARLY_TOLERANCE)
            count = end - first
            out.ticks += 1
            out.runs += count
            out.per_tick[count] += 1
            out.max_in_tick = max(out.max_in_tick, count)
            if count == 0:
                out.gaps += 1
            else:
                out.extra += count - 1
                if count > 1:
                    out.doubled += 1
            if first < len(times):
                out.waits.append(times[first] - due)
            else:
                out.waits.append(math.inf)
                out.never += 1
        out.per_periodic.append(out.runs - before)
    return out


def wait_stats(waits: list[float]) -> dict[str, float | None]:
    if not waits:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(waits)
    return {
        "p50": percentile(ordered, 0.50),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1],
    }


# -- statistics --------------------------------------------------------------------


def values(r: Results, key: str, metric: str) -> list[float]:
    return [m[metric] for m in r.get(key, []) if m is not None and m.get(metric) is not None]


def median(r: Results, key: str, metric: str) -> float | None:
    found = values(r, key, metric)
    return statistics.median(found) if found else None


def worst(r: Results, key: str, metric: str) -> float | None:
    found = values(r, key, metric)
    return max(found) if found else None


def least(r: Results, key: str, metric: str) -> float | None:
    found = values(r, key, metric)
    return min(found) if found else None


def rounds(r: Results, key: str) -> str:
    return str(sum(m is not None for m in r.get(key, [])))


def job_checks(r: Results, key: str) -> str:
    """ "job run twice / tasks beyond occurrences", worst rounds ("—" where unknown)."""
    return f"{fmt_int(worst(r, key, 'reruns'))} / {fmt_int(worst(r, key, 'beyond'))}"


def unavailable_row(c: Case, width: int) -> list[str]:
    """A row saying that a case was not measured (`notes` says why)."""
    return [c.label, "not measured (see below)", *([""] * (width - 2))]


def notes(cases: Sequence[Case]) -> list[str]:
    """Why each case that was not measured could not be."""
    lines = [f"- {c.label}: {c.unavailable}." for c in cases if c.unavailable]
    return ["", "Not measured:", "", *lines] if lines else []


# -- periodic-once ---------------------------------------------------------------------


def periodic_cases(o: Sizes, names: Sequence[str], many: bool) -> list[Case]:
    cases = []
    for name in names:
        s = SYSTEMS[name]
        reason = s.many if many else s.once
        cases.append(Case(name, s.label, s, unavailable=reason))
    return cases


def once_cases(o: Sizes) -> list[Case]:
    return periodic_cases(o, ("marionette", "rq", "celery", "arq", "huey", "dramatiq"), False)


def start_periodic(h: ReactiveHarness, c: Case, o: Sizes, n: int) -> tuple[float, float | None]:
    """Starts the nodes of a periodic benchmark with `n` periodics, defines them for
    marionette, and waits for the first run; returns that run's time and the first
    due time marionette's periodics were given (None for the peers)."""
    s = c.system
    h.configure(BENCH_PERIODICS=str(n))
    nodes = h.start_nodes(s, o.nodes)
    base = None
    if not s.peer:
        h.ready_nodes(s.producer, nodes)
        lead = o.lead + n / 2000
        base = math.ceil(time.time() + lead)
        spread = s.phase is not None and s.phase(1, 2) != s.phase(0, 2)
        done = h.run_producer(s.producer, "define", n=n, interval=1.0, base=base, spread=spread)
        if done["finished"] > base:
            raise MeasurementError(
                f"defining {n:,} periodics took {done['seconds']:.1f} s, past the first due time"
            )
    first_timeout = o.ready_timeout + 2 * (s.once_interval if n == 1 else 1.0)
    if h.wait_for(BEATS, 1, first_timeout) < 1:
        raise MeasurementError(f"no periodic ran within {first_timeout:.0f} s")
    at = h.redis.lindex(BEATS, 0).split()[2]
    return float(at), base


def beyond_occurrences(
    h: ReactiveHarness, n: int, phase: Callable[[int], float], base: float | None, until: float
) -> int | None:
    """marionette: the jobs of each periodic beyond its occurrences due from its first
    (`base` + its phase) to `until` (0 unless an occurrence made two tasks)."""
    if base is None:
        return None
    excess = 0
    for i in range(n):
        due = math.floor(until - (base + phase(i))) + 1
        excess += max(0, h.jobs(i) - max(0, due))
    return excess


def measure_once(h: ReactiveHarness, c: Case, o: Sizes, rnd: int) -> Measurement:
    """Three nodes, one periodic; the ticks after a warm-up that follows the first run."""
    s = c.system
    h.fresh()
    interval = s.once_interval
    first, base = start_periodic(h, c, o, 1)
    # Without a fixed grid (Huey), ticks are centred on the first run's.
    phase = s.phase(0, 1) if s.phase is not None else (first - interval / 2) % interval
    ticks = o.once_ticks if interval == 1.0 else o.huey_ticks
    if s.phase is None:
        t0 = first + interval / 2  # the end of the first run's tick
    else:
        t0 = grid_at_or_after(first + o.once_warmup, phase, interval)
    t1 = t0 + ticks * interval
    horizon = t1 + o.grace
    sleep_until(h, horizon)
    runs = h.beats(horizon)
    h.stop_workers()
    found = occurrences(runs, 1, lambda i: phase, interval, t0, t1)
    in_window = [t for t in runs.get(0, []) if t0 - EARLY_TOLERANCE <= t < t1 - EARLY_TOLERANCE]
    known_grid = s.phase is not None
    waits = wait_stats([w for w in found.waits if math.isfinite(w)]) if known_grid else {}
    return {
        "ticks": found.ticks,
        "runs": found.runs,
        "per_tick": found.runs / found.ticks,
        "gaps": found.gaps,
        "doubled": found.doubled,
        "max_in_tick": found.max_in_tick,
        "never": found.never,
        "distribution": {str(k): v for k, v in sorted(found.per_tick.items())},
        "processes": len(h.pids.get(0, set())),
        "late_p50": waits.get("p50"),
        "late_max": waits.get("max"),
        "interval": interval,
        "runs_in_window": len(in_window),
        "reruns": h.reruns(),
        "beyond": beyond_occurrences(h, 1, lambda i: phase, base, horizon),
    }


def report_once(cases: Sequence[Case], r: Results, o: Sizes) -> list[str]:
    headers = [
        "system",
        "ticks (period)",
        "runs per tick (median)",
        "ticks with 0 runs (worst)",
        "ticks with 2+ runs (worst)",
        "most runs in a tick (worst)",
        "runs per tick, all rounds",
        "processes that ran it",
        "late p50 (median)",
        "late max (worst)",
        "job run twice / tasks beyond occurrences (worst)",
        "rounds",
    ]
    rows = []
    for c in cases:
        if c.unavailable:
            rows.append(unavailable_row(c, len(headers)))
            continue
        done = [m for m in r.get(c.key, []) if m is not None]
        spread: Counter[str] = Counter()
        for m in done:
            spread.update(m["distribution"])
        period = f"{c.system.once_interval:g} s"
        rows.append(
            [
                c.label,
                f"{fmt_int(median(r, c.key, 'ticks'))} ({period})",
                fmt_num(median(r, c.key, "per_tick")),
                fmt_int(worst(r, c.key, "gaps")),
                fmt_int(worst(r, c.key, "doubled")),
                fmt_int(worst(r, c.key, "max_in_tick")),
                ", ".join(f"{k}: {v}" for k, v in sorted(spread.items(), key=lambda x: int(x[0]))),
                fmt_int(median(r, c.key, "processes")),
                fmt_seconds(median(r, c.key, "late_p50")),
                fmt_seconds(worst(r, c.key, "late_max")),
                job_checks(r, c.key),
                rounds(r, c.key),
            ]
        )
    return [
        *table(headers, rows),
        *notes(cases),
        "",
        '"runs per tick, all rounds": how many ticks had 0, 1, 2, ... runs, summed over the'
        ' rounds. "late": from the due time to the first run of the tick, where the system'
        " keeps a fixed grid (Huey runs every 60 s from each consumer's start: no grid, no"
        ' lateness). "job run twice": runs of a job id already seen (where the system'
        ' gives the run its id: marionette, arq); "tasks beyond occurrences": marionette,'
        " the tasks of a periodic beyond the occurrences due from its first to the end.",
    ]


# -- periodic-10k ------------------------------------------------------------------------


def many_cases(o: Sizes) -> list[Case]:
    names = ("marionette", "marionette-spread", "rq", "celery", "arq", "huey", "dramatiq")
    cases = periodic_cases(o, names, True)
    return [
        dataclasses.replace(c, label=c.label.replace("3 workers)", "3 workers), aligned"))
        if c.key == "marionette"
        else c
        for c in cases
    ]


def sample(h: ReactiveHarness, s: ReactiveSystem) -> dict[str, Any]:
    """The counters read at each end of the window; `own` counts the commands this
    costs the server after its first one (INFO), to be subtracted."""
    commands = h.server.commands_processed()
    got: dict[str, Any] = {
        "time": time.time(),
        "commands": commands,
        "beats": int(h.redis.llen(BEATS)),
        "cpu": h.cpu(),
        "server_cpu": h.server.cpu(),
    }
    own = 1
    if s.backlog is not None:
        got["backlog"] = s.backlog(h.redis)
        own += 2
    if not s.peer:
        got["coalesced"] = int(h.redis.hget("{mbench}:stats", "coalesced") or 0)
        own += 1
    got["commandstats"] = {
        name.removeprefix("cmdstat_"): int(stat["calls"])
        for name, stat in h.redis.info("commandstats").items()
    }
    got["own"] = own + 2  # and the INFO of the next sample
    return got


def measure_many(h: ReactiveHarness, c: Case, o: Sizes, rnd: int) -> Measurement:
    """Three nodes, `o.periodics` periodics at 1 s; a window after a warm-up."""
    s = c.system
    h.fresh()
    assert s.phase is not None
    phase = s.phase
    n = o.periodics
    first, base = start_periodic(h, c, o, n)
    t0 = math.ceil(first + o.many_warmup)
    t1 = t0 + o.many_window
    horizon = t1 + o.grace
    sleep_until(h, t0)
    a = sample(h, s)
    sleep_until(h, t1)
    b = sample(h, s)
    sleep_until(h, horizon)
    h.check_alive()
    h.stop_workers()
    runs = h.beats(horizon)
    found = occurrences(runs, n, lambda i: phase(i, n), 1.0, t0, t1)
    elapsed = b["time"] - a["time"]
    commands = b["commands"] - a["commands"] - a["own"] - (b["beats"] - a["beats"])
    waits = wait_stats(found.waits)
    calls = Counter(b["commandstats"])
    calls.subtract(a["commandstats"])
    each = sorted(found.per_periodic)
    return {
        "silent": sum(1 for x in each if x == 0),
        "each_min": each[0],
        "each_median": statistics.median(each),
        "each_max": each[-1],
        "top_commands_per_s": {k: v / elapsed for k, v in calls.most_common(8)},
        "ticks": found.ticks,
        "runs": found.runs,
        "runs_per_s": found.runs / o.many_window,
        "gaps": found.gaps,
        "doubled": found.doubled,
        "extra": found.extra,
        "never": found.never,
        "late_p50": waits["p50"],
        "late_p99": waits["p99"],
        "late_max": waits["max"],
        "coalesced": (b["coalesced"] - a["coalesced"]) if "coalesced" in a else None,
        "backlog_start": a.get("backlog"),
        "backlog_end": b.get("backlog"),
        "commands_per_s": commands / elapsed,
        "redis_cpu_ms_per_s": 1000 * cpu_seconds(a["server_cpu"], b["server_cpu"]) / elapsed,
        "nodes_cpu_ms_per_s": 1000 * cpu_seconds(a["cpu"], b["cpu"]) / elapsed,
        "reruns": h.reruns(),
        "beyond": beyond_occurrences(h, n, lambda i: phase(i, n), base, horizon),
    }


def report_many(cases: Sequence[Case], r: Results, o: Sizes) -> list[str]:
    headers = [
        "system",
        "runs/s (median; due: " + f"{o.periodics:,}/s)",
        "late p50 (median)",
        "late p99 (median)",
        "late max (worst)",
        "occurrences without a run of their own (median)",
        "runs of one periodic in the window, min / median / max (median)",
        "periodics that never ran in the window (worst)",
        "of which merged, per `coalesced` (median)",
        "no run at all (worst)",
        "extra runs in a tick (worst)",
        "job run twice / tasks beyond occurrences (worst)",
        "backlog in Redis, window start → end (median)",
        "Redis commands/s (median)",
        "redis-server CPU (median)",
        "the nodes' CPU (median)",
        "rounds",
    ]
    rows = []
    for c in cases:
        if c.unavailable:
            rows.append(unavailable_row(c, len(headers)))
            continue
        ticks = median(r, c.key, "ticks")
        gaps = median(r, c.key, "gaps")
        share = "" if not ticks or gaps is None else f" ({100 * gaps / ticks:.1f} %)"
        rows.append(
            [
                c.label,
                fmt_int(median(r, c.key, "runs_per_s")),
                fmt_seconds(median(r, c.key, "late_p50")),
                fmt_seconds(median(r, c.key, "late_p99")),
                fmt_seconds(worst(r, c.key, "late_max")),
                f"{fmt_int(gaps)}{share}",
                " / ".join(fmt_int(median(r, c.key, f"each_{x}")) for x in ("min", "median", "max"))
                + f" of {o.many_window:g}",
                fmt_int(worst(r, c.key, "silent")),
                fmt_int(median(r, c.key, "coalesced")) if not c.system.peer else "—",
                fmt_int(worst(r, c.key, "never")),
                fmt_int(worst(r, c.key, "extra")),
                job_checks(r, c.key),
                f"{fmt_int(median(r, c.key, 'backlog_start'))} → "
                f"{fmt_int(median(r, c.key, 'backlog_end'))}",
                fmt_int(median(r, c.key, "commands_per_s")),
                fmt_num(median(r, c.key, "redis_cpu_ms_per_s"), " ms/s"),
                fmt_num(median(r, c.key, "nodes_cpu_ms_per_s"), " ms/s"),
                rounds(r, c.key),
            ]
        )
    return [
        *table(headers, rows),
        *notes(cases),
        "",
        "A tick is one periodic's second, from a due time to the next; its runs are those"
        ' that started in it. "late": from each due time to the first run that started at'
        " or after it: within the tick when the tick has a run; to a later tick's run when"
        " it has none (bounded by how often the periodic runs at all, not by how old the"
        ' job that ran was: a queue that holds a backlog shows it in "backlog"). "no run at'
        f' all": no run followed before the runs were read ({o.grace:g} s after the'
        ' window). "extra runs in a tick": beyond a tick\'s first; a run later than'
        ' a second lands in the next tick and counts there too. "job run twice" and'
        ' "tasks beyond occurrences": as in periodic-once. marionette\'s `coalesced` is'
        " the cluster's counter over the window.",
    ]


# -- groups ------------------------------------------------------------------------------


def group_cases(o: Sizes) -> list[Case]:
    m, d = SYSTEMS["marionette"], SYSTEMS["dramatiq"]
    noop = {"grouped": o.grouped, "ungrouped": o.ungrouped, "hold": 0.0}
    held = {"grouped": o.held, "ungrouped": o.held, "hold": o.hold}
    hold_ms = f"{o.hold * 1000:g} ms"
    cases = [
        Case("m-none", f"{m.label}: no group, {o.grouped + o.ungrouped:,} no-ops", m, {
            "grouped": 0, "ungrouped": o.grouped + o.ungrouped, "hold": 0.0}),
        Case("m-noop", f"{m.label}: limit {o.limit}, no-ops", m, noop),
        Case("m-held", f"{m.label}: limit {o.limit}, {hold_ms} tasks", m, held),
        Case("d-noop", f"{d.label}: ConcurrentRateLimiter({o.limit}), no-ops", d, noop),
        Case("d-held", f"{d.label}: ConcurrentRateLimiter({o.limit}), {hold_ms} tasks", d, held),
    ]  # fmt: skip
    for name in ("rq", "celery", "arq", "huey"):
        s = SYSTEMS[name]
        cases.append(Case(name, s.label, s, unavailable=s.groups))
    return cases


def peak(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at once (an end and a start at the same instant do
    not overlap)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def measure_groups(h: ReactiveHarness, c: Case, o: Sizes, rnd: int) -> Measurement:
    """Tasks submitted first (no node running), then three nodes started; each task
    records when it started and ended."""
    s, p = c.system, c.params
    h.fresh()
    h.configure(MARIONETTE_LIMITS=f"http={o.limit}", BENCH_GROUP_LIMIT=str(o.limit))
    total = p["grouped"] + p["ungrouped"]
    h.run_producer(s.producer, "spans", group="http", **p)
    nodes = h.start_nodes(s, o.nodes)
    started = min(w.started for node in nodes for w in node)
    budget = h.timeout if not s.peer else o.group_budget
    h.wait_for(SPANS, total, budget)
    watched = time.time() - started
    spans: dict[str, list[tuple[float, float]]] = {"g": [], "u": []}
    for kind, _, start, end in h.entries(SPANS):
        spans[kind].append((float(start), float(end)))
    refused = int(h.redis.llen(REFUSED))
    backlog = s.backlog(h.redis) if s.backlog else None
    h.stop_workers()
    out: Measurement = {
        "completed": sum(len(v) for v in spans.values()),
        "total": total,
        "watched_s": watched,
        "refused": refused,
        "backlog": backlog,
    }
    everything = spans["g"] + spans["u"]
    if everything:
        last = max(end for _, end in everything)
        first = min(start for start, _ in everything)
        out["rate"] = len(everything) / (last - started)
        out["steady_rate"] = len(everything) / (last - first) if last > first else None
    for kind in ("g", "u"):
        found = spans[kind]
        out[f"{kind}_done"] = len(found)
        if found:
            first = min(start for start, _ in found)
            last = max(end for _, end in found)
            out[f"{kind}_rate"] = len(found) / (last - first) if last > first else None
            out[f"{kind}_last_s"] = last - started
            out[f"{kind}_peak"] = peak(found)
    return out


def report_groups(cases: Sequence[Case], r: Results, o: Sizes) -> list[str]:
    headers = [
        "case",
        "tasks/s from the nodes' spawn (median)",
        "group tasks/s, its first to last (median)",
        "ungrouped tasks/s, its first to last (median)",
        "last group task ends (median)",
        "last ungrouped task ends (median)",
        f"group at once, peak (worst; limit {o.limit})",
        "completed of submitted (worst)",
        "refused by the limiter (median)",
        "rounds",
    ]
    rows = []
    for c in cases:
        if c.unavailable:
            rows.append(unavailable_row(c, len(headers)))
            continue
        completed = least(r, c.key, "completed")
        total = c.params["grouped"] + c.params["ungrouped"]
        rows.append(
            [
                c.label,
                fmt_int(median(r, c.key, "rate")),
                fmt_int(median(r, c.key, "g_rate")),
                fmt_int(median(r, c.key, "u_rate")),
                fmt_seconds(median(r, c.key, "g_last_s")),
                fmt_seconds(median(r, c.key, "u_last_s")),
                fmt_int(worst(r, c.key, "g_peak")),
                f"{fmt_int(completed)} of {total:,}",
                fmt_int(median(r, c.key, "refused")) if c.system.peer else "—",
                rounds(r, c.key),
            ]
        )
    return [
        *table(headers, rows),
        *notes(cases),
        "",
        "The first rate counts every task from the spawn of the first node to the last"
        " task's end (the nodes' start-up included); the others count one kind from its"
        ' first start to its last end. "ends": the last task of each kind, from the'
        " spawn of the first node. The peak: the most group tasks whose recorded [start,"
        " end] intervals overlap (a no-op's interval is a few microseconds, so only the"
        f" held tasks test the limit). A peer's emulation is watched {o.group_budget:g} s"
        " at most.",
    ]


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark(
            "periodic-once",
            "One 1-second periodic task, three processes each with its scheduler on",
            "{o.nodes} nodes of each system, every one with its scheduler on; one periodic"
            " task every second (Huey: every minute, its shortest period). Each run RPUSHes"
            " its wall time and pid. Counted: the {o.once_ticks} ticks (Huey: {o.huey_ticks})"
            " that start {o.once_warmup:g} s after the first run (all nodes are up by then);"
            " a run belongs to the tick it started in (1 ms of tolerance before the due time).",
            once_cases,
            measure_once,
            report_once,
        ),
        Benchmark(
            "periodic-10k",
            "10,000 periodic tasks at 1 s on three processes",
            "{o.nodes} nodes of each system; {o.periodics:,} periodic tasks every second,"
            " each run RPUSHing its periodic's number, pid and wall time. marionette's are"
            " due on whole seconds (aligned, as the peers' cron grids are) or spread evenly"
            " over each second. A {o.many_window:g} s window opens {o.many_warmup:g} s after"
            " the first run; runs are read {o.grace:g} s after it closes. Redis commands:"
            " INFO stats total_commands_processed over the window (Redis 7 counts the"
            " commands a Lua script runs, each), less the runs' own RPUSHes and the"
            " harness's reads. CPU: on-CPU time of every process of the nodes"
            " (Linux schedstat), per second of wall time; 1,000 ms/s is one core.",
            many_cases,
            measure_many,
            report_many,
        ),
        Benchmark(
            "groups",
            "A concurrency limit across three processes",
            "Tasks submitted by one producer process first, the group's and the others"
            " alternating, then {o.nodes} nodes started (4 workers each: 12 at once). The"
            " group: marionette's `limits={{'http': {o.limit}}}` (MARIONETTE_LIMITS), for the"
            " whole cluster. Each task records its [start, end] (a no-op, or holding its"
            " worker {o.hold:g} s).",
            group_cases,
            measure_groups,
            report_groups,
        ),
    )
}


# -- running -----------------------------------------------------------------------------


def run_benchmark(
    h: ReactiveHarness, bench: Benchmark, cases: Sequence[Case], o: Sizes, n_rounds: int
) -> tuple[Results, list[str]]:
    """Every measurable case once per round, in an order rotating by one each round."""
    measurable = [c for c in cases if c.unavailable is None]
    results: Results = {c.key: [] for c in measurable}
    failures = []
    for rnd in range(n_rounds):
        shift = rnd % len(measurable) if measurable else 0
        for c in [*measurable[shift:], *measurable[:shift]]:
            began = time.perf_counter()
            m: Measurement | None = None
            try:
                m = bench.measure(h, c, o, rnd)
            except MeasurementError as e:
                failures.append(f"{c.label}, round {rnd + 1}: {e}")
            finally:
                h.stop_workers()
                h.configure()
            results[c.key].append(m)
            took = time.perf_counter() - began
            status = "" if m is not None else " FAILED"
            print(
                f"  [{bench.name} {rnd + 1}/{n_rounds}] {c.label}: {took:.1f} s{status}",
                file=sys.stderr,
            )
    return results, failures


def versions() -> str:
    """Versions of the libraries, read in a child so that this process imports none."""
    names = ("rq", "dramatiq", "huey", "celery", "kombu", "arq", "redis", "hiredis", "marionette")
    code = (
        "import importlib.metadata as m\n"
        f"for p in {names!r}:\n"
        "    try: print(f'{p} {m.version(p)}')\n"
        "    except m.PackageNotFoundError: print(f'{p} missing')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return ", ".join(done.stdout.split("\n")).strip(", ")


def revision() -> str:
    done = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "unknown"


def describe(systems: Sequence[ReactiveSystem]) -> list[str]:
    lines = ["## Systems", ""]
    for s in systems:
        lines.append(f"- **{s.label}**: {s.how}")
    return lines


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the processes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test")
    parser.add_argument(
        "--rounds", type=int, help="rounds per benchmark (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--systems", help=f"comma-separated systems to run (default all: {','.join(SYSTEMS)})"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds allowed for any one wait (default 600)"
    )
    parser.add_argument("--redis-server", help="the redis-server executable (default: on PATH)")
    parser.add_argument(
        "--json", type=Path, help="also write every measurement to this file (null: never ran)"
    )
    parser.add_argument(
        "--nodes", type=int, help="processes per system (default 3): to see how the cost scales"
    )
    parser.add_argument("--periodics", type=int, help="periodic-10k's count (default 10,000)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for b in BENCHMARKS.values():
            print(f"{b.name:14} {b.title}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    chosen = set(args.systems.split(",")) if args.systems else set(SYSTEMS)
    unknown = sorted(chosen - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown system(s): {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    n_rounds = args.rounds or (1 if args.quick else 3)
    sizes = QUICK if args.quick else Sizes()
    for field in ("nodes", "periodics"):
        value = getattr(args, field)
        if value is not None:
            if value < 1:
                parser.error(f"--{field} must be at least 1")
            sizes = dataclasses.replace(sizes, **{field: value})
    benches = [BENCHMARKS[n] for n in (args.names or BENCHMARKS)]
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    began = time.perf_counter()
    load = loadavg()
    out = [
        "# Reactive features on Redis, three processes" + (" (--quick)" if args.quick else ""),
        "",
        f"- date: {datetime.date.today().isoformat()}, revision {revision()}",
        f"- Python {platform.python_version()}, {platform.system()} {platform.release()},"
        f" {os.cpu_count()} CPUs",
        f"- versions: {versions()}",
        f"- load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"- nodes per system: {sizes.nodes}; rounds: {n_rounds}; every measurement on a"
        " flushed server with its own nodes; cases interleaved, their order rotated every"
        " round; medians over rounds (worst round where a column says so)",
    ]
    sections: list[str] = []
    dump: dict[str, Results] = {}
    failed = False
    used: dict[str, ReactiveSystem] = {}
    with (
        tempfile.TemporaryDirectory(prefix="redis-reactive-") as tmp,
        redis_server(args.redis_server, Path(tmp)) as server,
    ):
        out.append(f"- redis-server {server.version()} on port {server.port}, no persistence")
        h = ReactiveHarness(server, Path(tmp), args.timeout)
        where = subprocess.run(
            [sys.executable, "-c", "import marionette; print(marionette.__path__[0])"],
            capture_output=True,
            text=True,
            env=h.env,
            cwd=tmp,
        )
        out.append(f"- the nodes import marionette from {where.stdout.strip() or '?'}")
        try:
            for bench in benches:
                print(f"{bench.name}: {bench.title}", file=sys.stderr)
                cases = [c for c in bench.cases(sizes) if c.system.name in chosen]
                used.update({c.system.name: c.system for c in cases})
                load_before = loadavg()
                sections += ["", f"## {bench.name}: {bench.title}", ""]
                sections += [bench.method.format(o=sizes), ""]
                results, failures = run_benchmark(h, bench, cases, sizes, n_rounds)
                sections += bench.report(cases, results, sizes)
                sections += [f"\nfailed: {line}" for line in failures]
                failed = failed or bool(failures)
                dump[bench.name] = results
                sections.append(
                    f"\n(load average, 1 min: {load_before[0]:.2f} before,"
                    f" {loadavg()[0]:.2f} after)"
                )
        finally:
            h.stop_workers()
    load = loadavg()
    out += [
        f"- load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"- wall time: {time.perf_counter() - began:.0f} s",
        *sections,
        "",
        *describe(list(used.values())),
    ]
    print("\n".join(out))
    if args.json is not None:
        everything = {"sizes": dataclasses.asdict(sizes), **dump}
        args.json.write_text(json.dumps(finite(everything), indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

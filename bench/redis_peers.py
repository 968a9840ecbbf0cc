"""Redis task queues compared: ``python bench/redis_peers.py [NAME ...]``.

RQ (forking Worker and SimpleWorker), Dramatiq, Huey, Celery and arq, and
marionette's Redis backend, on a private redis-server started for the run. Every
measurement starts its own producer process and worker process(es) on a flushed
server. Within a round every system is measured once, in an order that rotates from
round to round; ratios to the best peer are taken within a round, and the tables show
medians over the rounds (default 3).

    python bench/redis_peers.py                      # everything: 1 h 50 min on 2 cores
    python bench/redis_peers.py --quick              # small sizes, one round
    python bench/redis_peers.py submit memory        # only those benchmarks
    python bench/redis_peers.py --systems huey,arq   # only those systems
    python bench/redis_peers.py --rounds 5 --json redis.json

Benchmarks: submit, memory, throughput, lateness, idle, sigkill. Markdown goes to
stdout, progress to stderr. The systems and their tasks: ``redis_systems.py`` and
the ``redis_tasks`` package; the processes: ``redis_harness.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from common import percentile
from redis_harness import Harness, MeasurementError, cpu_seconds, redis_server
from redis_systems import SYSTEMS, System
from redis_tasks import BLOCKED, RUNS, TICKS
from run import fmt_int, fmt_num, fmt_ratio, loadavg, table

Measurement = dict[str, Any]
Results = dict[str, list[Measurement | None]]  # by system name, one entry per round


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of the benchmarks; `QUICK` is the smoke test's."""

    submit: int = 10_000
    memory: int = 20_000
    throughput: int = 20_000
    lateness: int = 2_000
    window: float = 10.0  # lateness: due times spread over this many seconds
    lead: float = 8.0  # lateness: the window opens this long after the producer connected
    grace: float = 30.0  # lateness: a task not run by the window's end + grace is lost
    idle_pending: int = 10_000
    idle_out: float = 3600.0  # idle: tasks due between 1 and 2 hours out
    settle: float = 3.0
    idle_seconds: float = 10.0
    sigkill_after: float = 2.0  # sigkill: the worker is killed this long after the task started
    sigkill_watch: float = 120.0
    ready_timeout: float = 120.0  # a worker must run its first probe within this


QUICK = Sizes(
    submit=1_000,
    memory=2_000,
    throughput=2_000,
    lateness=200,
    window=3.0,
    grace=10.0,
    idle_pending=1_000,
    settle=1.0,
    idle_seconds=2.0,
    sigkill_watch=20.0,
)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    method: str  # printed under the title, formatted with the sizes as `o`
    measure: Callable[[Harness, System, Sizes, int], Measurement]
    report: Callable[[Sequence[System], Results, Sizes], list[str]]


# -- statistics --------------------------------------------------------------------


def values(r: Results, name: str, metric: str) -> list[float]:
    """The metric of a system, one value per round that produced one."""
    return [m[metric] for m in r.get(name, []) if m is not None and m.get(metric) is not None]


def median(r: Results, name: str, metric: str) -> float | None:
    found = values(r, name, metric)
    return statistics.median(found) if found else None


def worst(r: Results, name: str, metric: str) -> float | None:
    found = values(r, name, metric)
    return max(found) if found else None


def least(r: Results, name: str, metric: str) -> float | None:
    found = values(r, name, metric)
    return min(found) if found else None


def vs_best_peer(
    systems: Sequence[System], r: Results, name: str, metric: str, higher_is_better: bool
) -> float | None:
    """Median over rounds of this system's value divided by the best peer's value
    in the same round (1.00x for the best peer itself)."""
    peers = [s.name for s in systems if s.peer]
    ratios = []

    def usable(m: Measurement | None) -> bool:
        return m is not None and bool(m.get(metric)) and math.isfinite(m[metric])

    for i, m in enumerate(r.get(name, [])):
        if m is None or not usable(m):
            continue
        theirs = [
            p[metric]
            for p in (r[peer][i] for peer in peers if i < len(r.get(peer, [])))
            if p is not None and usable(p)
        ]
        if theirs:
            best = max(theirs) if higher_is_better else min(theirs)
            ratios.append(m[metric] / best)
    return statistics.median(ratios) if ratios else None


def rounds(r: Results, name: str) -> str:
    return str(sum(m is not None for m in r.get(name, [])))


def fmt_seconds(x: float | None) -> str:
    """A duration that may be anything from a millisecond to minutes; infinite
    for a task that never ran."""
    if x is None:
        return "—"
    if math.isinf(x):
        return "never ran"
    if abs(x) < 1:
        return fmt_num(x * 1000, " ms")
    return fmt_num(x, " s")


# -- submit ------------------------------------------------------------------------


def measure_submit(h: Harness, s: System, o: Sizes, rnd: int) -> Measurement:
    """`o.submit` no-op tasks from one thread of a fresh producer, no worker running."""
    h.fresh()
    done = h.producer(s, "enqueue", task="noop", n=o.submit)
    return {"rate": o.submit / done["seconds"], "seconds": done["seconds"], **done}


def report_submit(systems: Sequence[System], r: Results, o: Sizes) -> list[str]:
    rows = [
        [
            s.label,
            fmt_int(median(r, s.name, "rate")),
            fmt_ratio(vs_best_peer(systems, r, s.name, "rate", higher_is_better=True)),
            rounds(r, s.name),
        ]
        for s in systems
    ]
    lines = table(["system", "submissions/s (median)", "vs best peer", "rounds"], rows)
    return lines + pending_warnings(systems, r, o.submit)


def pending_warnings(systems: Sequence[System], r: Results, expected: int) -> list[str]:
    """A warning for every round whose system did not hold `expected` pending tasks."""
    wrong = [
        f"{s.label}: {m['pending']:,}"
        for s in systems
        for m in r.get(s.name, [])
        if m is not None and m["pending"] != expected
    ]
    if not wrong:
        return []
    return [f"\nWARNING: pending after submitting, expected {expected:,}: {'; '.join(wrong)}"]


# -- memory ------------------------------------------------------------------------


def measure_memory(h: Harness, s: System, o: Sizes, rnd: int) -> Measurement:
    """``INFO memory`` used_memory before and after `o.memory` pending no-op tasks,
    both read with no client connected but the harness."""
    h.fresh()
    before = h.server.used_memory()
    done = h.producer(s, "enqueue", task="noop", n=o.memory)
    h.wait_for_clients()
    after = h.server.used_memory()
    return {
        "bytes_per_task": (after - before) / o.memory,
        "used_before": before,
        "used_after": after,
        **done,
    }


def report_memory(systems: Sequence[System], r: Results, o: Sizes) -> list[str]:
    rows = [
        [
            s.label,
            fmt_num(median(r, s.name, "bytes_per_task"), " B"),
            fmt_ratio(vs_best_peer(systems, r, s.name, "bytes_per_task", higher_is_better=False)),
            rounds(r, s.name),
        ]
        for s in systems
    ]
    lines = table(
        ["system", "Redis bytes per pending task (median)", "vs best peer", "rounds"], rows
    )
    return lines + pending_warnings(systems, r, o.memory)


# -- throughput --------------------------------------------------------------------


def measure_throughput(h: Harness, s: System, o: Sizes, rnd: int) -> Measurement:
    """`o.throughput` ticks enqueued, then one worker started; seconds from its
    start (the spawn of its process) to the last tick's record."""
    h.fresh()
    h.producer(s, "enqueue", task="tick", n=o.throughput)
    worker = h.start_worker(s)
    completed = h.wait_for(TICKS, o.throughput, h.timeout)
    if completed == 0:
        raise MeasurementError(f"no task ran in {h.timeout:.0f} s")
    stamps = sorted(float(t) for _, _, t in h.entries(TICKS))
    state = h.producer(s, "state")
    first, last = stamps[0], stamps[-1]
    return {
        "rate": completed / (last - worker.started),
        "steady_rate": (completed - 1) / (last - first) if completed > 1 else None,
        "startup_s": first - worker.started,
        "completed": completed,
        "n": o.throughput,
        **state,
    }


def report_throughput(systems: Sequence[System], r: Results, o: Sizes) -> list[str]:
    rows = [
        [
            s.label,
            fmt_int(median(r, s.name, "rate")),
            fmt_ratio(vs_best_peer(systems, r, s.name, "rate", higher_is_better=True)),
            fmt_int(median(r, s.name, "steady_rate")),
            fmt_seconds(median(r, s.name, "startup_s")),
            rounds(r, s.name),
        ]
        for s in systems
    ]
    headers = [
        "system",
        "tasks/s from worker start (median)",
        "vs best peer",
        "tasks/s, first to last task",
        "worker start to first task",
        "rounds",
    ]
    lines = table(headers, rows)
    incomplete = [
        f"{s.label}: {m['completed']:,} of {m['n']:,} ran, {m['pending']:,} left pending"
        for s in systems
        for m in r.get(s.name, [])
        if m is not None and (m["completed"] != m["n"] or m["pending"] != 0)
    ]
    if incomplete:
        lines.append(f"\nWARNING: {'; '.join(incomplete)}")
    return lines


# -- lateness ----------------------------------------------------------------------


def measure_lateness(h: Harness, s: System, o: Sizes, rnd: int) -> Measurement:
    """A worker running; `o.lateness` tasks due at random times over `o.window`
    seconds (the same times for every system of a round); each records when it
    ran. Lateness is that time minus its due time."""
    h.fresh()
    worker = h.start_worker(s)
    h.ready(s, [worker], o.ready_timeout)
    offsets = [x * o.window for x in random_fractions(rnd, o.lateness)]
    done = h.producer(s, "enqueue_delayed", offsets=offsets, lead=o.lead)
    end = done["base"] + o.window + o.grace
    h.wait_for(RUNS, o.lateness, max(0.0, end - time.time()))
    runs: dict[float, list[float]] = {}
    for due, actual in h.entries(RUNS):
        runs.setdefault(float(due), []).append(float(actual))
    # The producer's due times, computed as it did; a task that never ran is
    # infinitely late, so that the percentiles say so instead of leaving it out.
    dues = [done["base"] + offset for offset in offsets]
    lateness = sorted(min(runs[due]) - due if due in runs else math.inf for due in dues)
    return {
        "p50": percentile(lateness, 0.50),
        "p99": percentile(lateness, 0.99),
        "max": lateness[-1],
        "min": lateness[0],
        "early": sum(actual < due for due, times in runs.items() for actual in times),
        "lost": sum(due not in runs for due in dues),
        "twice": sum(len(times) - 1 for times in runs.values()),
        "submit_s": done["seconds"],
    }


def random_fractions(seed: int, n: int) -> list[float]:
    """`n` numbers in [0, 1), the same for every system of a round."""
    rng = random.Random(seed)
    return [rng.random() for _ in range(n)]


def report_lateness(systems: Sequence[System], r: Results, o: Sizes) -> list[str]:
    rows = [
        [
            s.label,
            fmt_seconds(median(r, s.name, "p50")),
            fmt_seconds(median(r, s.name, "p99")),
            fmt_ratio(vs_best_peer(systems, r, s.name, "p99", higher_is_better=False)),
            fmt_seconds(worst(r, s.name, "max")),
            fmt_seconds(least(r, s.name, "min")),
            fmt_int(worst(r, s.name, "early")),
            fmt_int(worst(r, s.name, "lost")),
            fmt_int(worst(r, s.name, "twice")),
            rounds(r, s.name),
        ]
        for s in systems
    ]
    headers = [
        "system",
        "p50 (median)",
        "p99 (median)",
        "p99 vs best peer",
        "max (worst round)",
        "earliest (worst round)",
        "early (worst)",
        f"lost: not run {o.grace:g} s after the window (worst)",
        "ran twice (worst)",
        "rounds",
    ]
    lines = table(headers, rows)
    slow = [s.label for s in systems if (worst(r, s.name, "submit_s") or 0) > o.lead]
    if slow:
        lines.append(
            f"\nWARNING: submitting took longer than the {o.lead:g} s lead for: {', '.join(slow)}"
        )
    return lines


# -- idle --------------------------------------------------------------------------


def measure_idle(h: Harness, s: System, o: Sizes, rnd: int) -> Measurement:
    """`o.idle_pending` tasks due 1 to 2 hours out, then a worker started; after a
    probe has run and `o.settle` seconds more, CPU of the worker's process tree,
    commands Redis processed and redis-server's CPU, over `o.idle_seconds`."""
    h.fresh()
    offsets = [x * o.idle_out for x in random_fractions(rnd, o.idle_pending)]
    h.producer(s, "enqueue_delayed", offsets=offsets, lead=o.idle_out)
    worker = h.start_worker(s)
    h.ready(s, [worker], o.ready_timeout)
    time.sleep(o.settle)
    cpu, server_cpu = worker.cpu(), h.server.cpu()
    commands = h.server.commands_processed()
    start = time.monotonic()
    time.sleep(o.idle_seconds)
    elapsed = time.monotonic() - start
    cpu_s = cpu_seconds(cpu, worker.cpu())
    server_cpu_s = cpu_seconds(server_cpu, h.server.cpu())
    # The first INFO of the two is counted by the second: one command is ours.
    commands = h.server.commands_processed() - commands - 1
    h.check_alive()
    processes, threads = worker.threads()
    state = h.producer(s, "state")
    return {
        "cpu_ms_per_s": 1000 * cpu_s / elapsed,
        "redis_commands_per_s": commands / elapsed,
        "redis_cpu_ms_per_s": 1000 * server_cpu_s / elapsed,
        "processes": processes,
        "threads": threads,
        **state,
    }


def report_idle(systems: Sequence[System], r: Results, o: Sizes) -> list[str]:
    rows = [
        [
            s.label,
            fmt_num(median(r, s.name, "cpu_ms_per_s"), " ms/s"),
            fmt_num(worst(r, s.name, "cpu_ms_per_s"), " ms/s"),
            fmt_num(median(r, s.name, "redis_commands_per_s"), "/s"),
            fmt_num(median(r, s.name, "redis_cpu_ms_per_s"), " ms/s"),
            f"{fmt_int(median(r, s.name, 'processes'))} / {fmt_int(median(r, s.name, 'threads'))}",
            rounds(r, s.name),
        ]
        for s in systems
    ]
    headers = [
        "system",
        "worker CPU (median)",
        "worker CPU (worst)",
        "Redis commands (median)",
        "redis-server CPU (median)",
        "processes / threads",
        "rounds",
    ]
    return table(headers, rows) + pending_warnings(systems, r, o.idle_pending)


# -- sigkill -----------------------------------------------------------------------


def measure_sigkill(h: Harness, s: System, o: Sizes, rnd: int) -> Measurement:
    """Two workers running; a task that blocks starts on one of them, whose process
    tree is then SIGKILLed; the other is watched for `o.sigkill_watch` seconds."""
    h.fresh()
    workers = [h.start_worker(s), h.start_worker(s)]
    h.ready(s, workers, o.ready_timeout)
    h.producer(s, "enqueue", task="block", n=1)
    started = h.pop(BLOCKED, o.ready_timeout)
    if started is None:
        raise MeasurementError(f"the blocking task did not start in {o.ready_timeout:.0f} s")
    pid, ppid = int(started[0]), int(started[1])
    victim = next((w for w in workers if w.owns(pid, ppid)), None)
    if victim is None:
        raise MeasurementError(f"the blocking task ran in pid {pid}, in neither worker")
    # Mid-task, not at its first instant: whatever a system does once a task has
    # started (Celery's early ack lands a few hundred ms later) is done by then.
    time.sleep(max(0.0, float(started[2]) + o.sigkill_after - time.time()))
    victim.kill()
    killed_at = time.time()
    again = h.pop(BLOCKED, o.sigkill_watch)
    if again is not None:
        return {"rerun_s": float(again[2]) - killed_at, "outcome": "re-ran"}
    state = h.producer(s, "state")
    if state["pending"]:
        outcome = "still pending"
    elif state["failed"]:
        outcome = "failed"
    else:
        outcome = "lost"
    return {"rerun_s": None, "outcome": outcome, **state}


def report_sigkill(systems: Sequence[System], r: Results, o: Sizes) -> list[str]:
    watch = f"{o.sigkill_watch:g} s"
    rows = []
    for s in systems:
        outcomes = [m["outcome"] for m in r.get(s.name, []) if m is not None]
        counts = {k: outcomes.count(k) for k in dict.fromkeys(outcomes)}
        rows.append(
            [
                s.label,
                f"{counts.get('re-ran', 0)} of {len(outcomes)}",
                fmt_seconds(median(r, s.name, "rerun_s")),
                ", ".join(f"{k} ({n})" for k, n in counts.items() if k != "re-ran") or "—",
            ]
        )
    headers = [
        "system",
        f"re-ran within {watch}",
        "after (median)",
        f"otherwise, after {watch} (rounds)",
    ]
    return [
        *table(headers, rows),
        "",
        '"still pending": the system still holds the task (queued or claimed) and may run it'
        ' later; "failed": it keeps it as failed and will not run it by itself; "lost": no'
        " trace of it is left in Redis.",
    ]


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark(
            "submit",
            "Submissions per second: no-op tasks from one thread, no worker",
            "{o.submit:,} no-op tasks submitted from one thread of a fresh producer process,"
            " no worker running; timed from the first submission to the return of the last"
            " (the producer's imports and connection are not timed).",
            measure_submit,
            report_submit,
        ),
        Benchmark(
            "memory",
            "Redis memory per pending task: used_memory growth over pending no-op tasks",
            "INFO memory used_memory on the flushed server, and again once a producer process"
            " has submitted {o.memory:,} no-op tasks (no worker) and disconnected; the growth"
            " divided by {o.memory:,}.",
            measure_memory,
            report_memory,
        ),
        Benchmark(
            "throughput",
            "Throughput: tasks enqueued first, then one worker process",
            "{o.throughput:,} tasks submitted by a producer process, then one worker process"
            " started. Each task records its completion with one RPUSH of its wall time to a"
            " Redis list (the same round trip for every system). tasks/s = {o.throughput:,} /"
            " (the last task's time - the time the worker process was spawned); 'first to last"
            " task' leaves the worker's start-up out. Afterwards the system's own state must"
            " hold no pending task (every task acknowledged as the system does).",
            measure_throughput,
            report_throughput,
        ),
        Benchmark(
            "lateness",
            "Lateness of delayed tasks due at random times over a short window",
            "One worker running (it has run a probe task). A producer submits {o.lateness:,}"
            " tasks due at random times over a {o.window:g} s window that opens {o.lead:g} s after"
            " it connected (the same times for every system of a round), with each system's own"
            " delay feature; each task RPUSHes the wall time it ran. Lateness = ran - due, over"
            " each task's first run; early = ran before due; lost = not run {o.grace:g} s after"
            " the window closed; ran twice = runs beyond the first.",
            measure_lateness,
            report_lateness,
        ),
        Benchmark(
            "idle",
            "Idle worker CPU with delayed tasks pending an hour out",
            "{o.idle_pending:,} tasks due 1 to 2 hours out, then one worker started; once it has"
            " run a probe task and {o.settle:g} s more have passed, {o.idle_seconds:g} s measured."
            " Worker CPU: on-CPU time of every thread of the worker's process tree (Linux"
            " schedstat, in ns) per second of wall time; Redis commands: total_commands_processed"
            " per second (the harness's own excluded); redis-server CPU likewise.",
            measure_idle,
            report_idle,
        ),
        Benchmark(
            "sigkill",
            "A worker SIGKILLed mid-task: does the task run again elsewhere?",
            "Two worker processes running (each has run a probe task). A task that records its"
            " start and then blocks on a Redis key is submitted; {o.sigkill_after:g} s after it"
            " started, the process tree of the worker running it is SIGKILLed, and the other"
            " worker is watched for {o.sigkill_watch:g} s. Each system's defaults for"
            " acknowledgement and redelivery (see Systems).",
            measure_sigkill,
            report_sigkill,
        ),
    )
}


# -- running -----------------------------------------------------------------------


def run_benchmark(
    h: Harness, bench: Benchmark, systems: Sequence[System], o: Sizes, n_rounds: int
) -> tuple[Results, list[str]]:
    """Every system once per round, in an order rotating by one each round.
    Returns the measurements and a line per failed one."""
    results: Results = {s.name: [] for s in systems}
    failures = []
    for rnd in range(n_rounds):
        shift = rnd % len(systems)
        for s in [*systems[shift:], *systems[:shift]]:
            began = time.perf_counter()
            m: Measurement | None = None
            try:
                m = bench.measure(h, s, o, rnd)
            except MeasurementError as e:
                failures.append(f"{s.label}, round {rnd + 1}: {e}")
            finally:
                h.stop_workers()
            results[s.name].append(m)
            took = time.perf_counter() - began
            status = "" if m is not None else " FAILED"
            print(
                f"  [{bench.name} {rnd + 1}/{n_rounds}] {s.label}: {took:.1f} s{status}",
                file=sys.stderr,
            )
    return results, failures


def available(h: Harness, systems: Sequence[System]) -> tuple[list[System], list[str]]:
    """The systems that pass a check here (a producer opens, a worker starts and runs
    a probe task), and a line for each of the others."""
    usable, lines = [], []
    for s in systems:
        h.fresh()
        try:
            h.producer(s, "check")
            h.ready(s, [h.start_worker(s)], timeout=60)
            usable.append(s)
        except MeasurementError as e:
            lines.append(f"{s.unavailable or f'{s.name} failed its check'}: {e}")
        finally:
            h.stop_workers()
    return usable, lines


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


def describe(systems: Sequence[System]) -> list[str]:
    """How each system was run: its worker command and the defaults that matter."""
    lines = ["## Systems", ""]
    for s in systems:
        command = " ".join(["python", *s.worker_command("$BENCH_REDIS_URL")[1:]])
        lines += [
            f"- **{s.label}**: `{command}`",
            f"  - done with a task: {s.acknowledged}",
            f"  - when its worker dies: {s.on_worker_death}",
        ]
    return lines


def finite(data: Any) -> Any:
    """`data` with every infinite float (a task that never ran) as None: plain JSON."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [finite(v) for v in data]
    return data


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
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
        "--timeout", type=float, default=900, help="seconds allowed for any one wait (default 900)"
    )
    parser.add_argument("--redis-server", help="the redis-server executable (default: on PATH)")
    parser.add_argument(
        "--json",
        type=Path,
        help="also write every measurement to this file (null: a task that never ran)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for b in BENCHMARKS.values():
            print(f"{b.name:12} {b.title}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    chosen_systems = args.systems.split(",") if args.systems else list(SYSTEMS)
    unknown = [n for n in chosen_systems if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s): {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    n_rounds = args.rounds or (1 if args.quick else 3)
    sizes = QUICK if args.quick else Sizes()
    benches = [BENCHMARKS[n] for n in (args.names or BENCHMARKS)]
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    began = time.perf_counter()
    load = loadavg()
    out = [
        "# Redis task queues" + (" (--quick)" if args.quick else ""),
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- Python {platform.python_version()}, {platform.system()} {platform.release()},"
        f" {os.cpu_count()} CPUs",
        f"- versions: {versions()}",
        f"- load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"- rounds: {n_rounds}; every measurement on a flushed server with its own producer and"
        " worker processes; systems interleaved, their order rotated every round; ratios to"
        " the best peer taken within a round; medians over rounds (worst round for max,"
        " earliest, early, lost)",
    ]
    chosen = [SYSTEMS[n] for n in chosen_systems]
    with (
        tempfile.TemporaryDirectory(prefix="redis-peers-") as tmp,
        redis_server(args.redis_server, Path(tmp)) as server,
    ):
        out.append(f"- redis-server {server.version()} on port {server.port}, no persistence")
        h = Harness(server, Path(tmp), args.timeout)
        try:
            print("checking the systems", file=sys.stderr)
            systems, unavailable = available(h, chosen)
            sections, dump, failed = run_all(h, benches, systems, unavailable, sizes, n_rounds)
        finally:
            h.stop_workers()
    load = loadavg()
    out += [f"- not measured: {line}" for line in unavailable]
    out += [
        f"- load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"- wall time: {time.perf_counter() - began:.0f} s",
        *sections,
        "",
        *describe(chosen),
    ]
    print("\n".join(out))
    if args.json is not None:
        everything = {"sizes": dataclasses.asdict(sizes), **dump}
        args.json.write_text(json.dumps(finite(everything), indent=1) + "\n")
    # A peer that cannot run is an error; marionette may be missing until it lands.
    missing = [s for s in chosen if s not in systems]
    return 1 if failed or any(s.unavailable is None for s in missing) else 0


def run_all(
    h: Harness,
    benches: Sequence[Benchmark],
    systems: Sequence[System],
    unavailable: Sequence[str],
    o: Sizes,
    n_rounds: int,
) -> tuple[list[str], dict[str, Results], bool]:
    """Runs the benchmarks one after the other: their Markdown sections, their
    measurements by name, and whether any measurement failed."""
    sections: list[str] = []
    dump: dict[str, Results] = {}
    failed = False
    for bench in benches:
        print(f"{bench.name}: {bench.title}", file=sys.stderr)
        load_before = loadavg()
        sections += ["", f"## {bench.name}: {bench.title}", "", bench.method.format(o=o), ""]
        if systems:
            results, failures = run_benchmark(h, bench, systems, o, n_rounds)
            sections += bench.report(systems, results, o)
            sections += [f"\nfailed: {line}" for line in failures]
            failed = failed or bool(failures)
            dump[bench.name] = results
        else:
            sections.append("(no system to measure)")
        sections += [f"\n{line}" for line in unavailable]
        sections.append(
            f"\n(load average, 1 min: {load_before[0]:.2f} before, {loadavg()[0]:.2f} after)"
        )
    return sections, dump, failed


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of marionette against its peers: ``python bench/run.py [NAME ...]``.

Every measurement runs in a fresh child process (``bench/child.py``), one at a time.
Within a round every case of a benchmark is measured once, and the order of the
cases rotates from round to round, so that no system always goes first or last on a
noisy machine. Ratios are taken between cases of the same round, and the tables
show medians over the rounds.

    python bench/run.py                   # everything, a few minutes
    python bench/run.py --quick           # small sizes, one round: a smoke test
    python bench/run.py delay idle        # only those benchmarks
    python bench/run.py --rounds 5 --json results.json
    python bench/run.py --snapshot HEAD   # the committed code, not the working tree
    python bench/run.py --baseline HEAD~3 throughput  # also marionette at HEAD~3, interleaved

Benchmarks: throughput, delay, idle, lateness, structures, periodic, groups (see
bench/README.md).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHILD = HERE / "child.py"

Measurement = dict[str, Any]
Results = dict[str, list[Measurement | None]]


@dataclasses.dataclass(frozen=True)
class Baseline:
    """marionette at another commit (``--baseline``), measured beside the new code."""

    commit: str
    path: Path  # its export, first on its children's PYTHONPATH


@dataclasses.dataclass(frozen=True)
class Options:
    quick: bool
    full: bool
    rounds: int | None
    timeout: float
    baseline: Baseline | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One system at one size: measured once per round, in its own process."""

    key: str
    label: str
    function: str
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Target:
    """A target of the issue, checked against the medians of this run."""

    benchmark: str
    text: str
    observed: str
    met: bool | None  # None: not measured in this run


@dataclasses.dataclass
class Report:
    lines: list[str]
    targets: list[Target]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    rounds: int
    cases: Callable[[Options], list[Case]]
    report: Callable[[list[Case], Results, Options], Report]
    # With --baseline: the metrics of marionette's cases compared, new / baseline
    # (metric, header); none: --baseline does not apply to this benchmark.
    compare: tuple[tuple[str, str], ...] = ()


# -- statistics --------------------------------------------------------------------


def values(results: Results, key: str, metric: str) -> list[float]:
    """The metric of a case, one value per round that produced one."""
    return [m[metric] for m in results.get(key, []) if m is not None and m[metric] is not None]


def median(results: Results, key: str, metric: str) -> float | None:
    found = values(results, key, metric)
    return statistics.median(found) if found else None


def ratio(results: Results, a: str, b: str, metric: str) -> float | None:
    """Median over rounds of a / b, each ratio taken within one round."""
    pairs = []
    for ma, mb in zip(results.get(a, []), results.get(b, []), strict=False):
        if ma is not None and mb is not None and ma[metric] and mb[metric]:
            pairs.append(ma[metric] / mb[metric])
    return statistics.median(pairs) if pairs else None


def worst(results: Results, key: str, metric: str) -> float | None:
    found = values(results, key, metric)
    return max(found) if found else None


# -- formatting --------------------------------------------------------------------


def fmt_int(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def fmt_num(x: float | None, unit: str = "") -> str:
    """Three significant digits, at most."""
    if x is None:
        return "—"
    if abs(x) >= 100:
        text = f"{x:,.0f}"
    elif abs(x) >= 10:
        text = f"{x:.1f}"
    elif abs(x) >= 1:
        text = f"{x:.2f}"
    else:
        text = f"{x:.3f}"
    return f"{text}{unit}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """A Markdown table, padded to read well in a terminal too; the first `left`
    columns are aligned left, the others (numbers) right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return [line(headers), rule, *(line(r) for r in rows)]


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("MET" if met else "MISSED")


# -- throughput --------------------------------------------------------------------


def throughput_cases(o: Options) -> list[Case]:
    n = 20_000 if o.quick else 200_000
    n_aps = 2_000 if o.quick else (n if o.full else 10_000)
    return [
        Case(
            "m64",
            "marionette, queue_size=64 (default)",
            "throughput",
            {"system": "marionette", "n": n, "queue_size": 64},
        ),
        Case(
            "m1024",
            "marionette, queue_size=1024",
            "throughput",
            {"system": "marionette", "n": n, "queue_size": 1024},
        ),
        Case("tpe", "ThreadPoolExecutor(4)", "throughput", {"system": "threadpool", "n": n}),
        Case(
            "aps",
            f"APScheduler 3 BackgroundScheduler ({n_aps:,} tasks)",
            "throughput",
            {"system": "apscheduler", "n": n_aps},
        ),
    ]


def rate_table(
    cases: list[Case], r: Results, first: str, against: Sequence[tuple[str, str]]
) -> list[str]:
    """The table of a no-op throughput benchmark: median tasks/s, the ratio to each
    case `against` names (key, header), context switches per task, rounds; then a
    warning for any case that did not see every task complete."""
    rows = [
        [
            c.label,
            fmt_int(median(r, c.key, "rate")),
            *(fmt_ratio(ratio(r, c.key, key, "rate")) for key, _ in against),
            fmt_num(median(r, c.key, "switches_per_task")),
            f"{len(values(r, c.key, 'rate'))}",
        ]
        for c in cases
    ]
    headers = [
        first,
        "tasks/s (median)",
        *(header for _, header in against),
        "context switches per task",
        "rounds",
    ]
    lines = table(headers, rows)
    incomplete = [
        c.label
        for c in cases
        if any(m is not None and m["completed"] != m["n"] for m in r.get(c.key, []))
    ]
    if incomplete:
        lines.append(f"\nWARNING: not every task completed for: {', '.join(incomplete)}")
    return lines


def throughput_report(cases: list[Case], r: Results, o: Options) -> Report:
    against = [("tpe", "vs ThreadPoolExecutor"), ("aps", "vs APScheduler")]
    lines = rate_table(cases, r, "system", against)
    targets = []
    for key, what in (
        ("m64", "default queue_size=64"),
        ("m1024", "queue_size=1024, informational"),
    ):
        x = ratio(r, key, "tpe", "rate")
        targets.append(
            Target(
                "throughput",
                f"no-op throughput >= 2x ThreadPoolExecutor(4) ({what})",
                f"{fmt_ratio(x)} ({fmt_int(median(r, key, 'rate'))}/s"
                f" vs {fmt_int(median(r, 'tpe', 'rate'))}/s)",
                None if x is None else x >= 2.0,
            )
        )
    return Report(lines, targets)


# -- delay -------------------------------------------------------------------------


def delay_sizes(o: Options) -> list[int]:
    return [10_000, 100_000] if o.quick else [100_000, 1_000_000]


def delay_cases(o: Options) -> list[Case]:
    cases = []
    sizes = delay_sizes(o)
    for n in sizes:
        k = 1_000 if o.quick else 10_000
        cases.append(
            Case(
                f"m{n}",
                f"marionette, {n:,} pending",
                "delay",
                {"system": "marionette", "n": n, "k_insert": k, "k_cancel": k},
            )
        )
        # sched cancels in O(n) with a Python __eq__ per entry: a few suffice.
        k_sched = 20 if n <= 100_000 else 4
        cases.append(
            Case(
                f"s{n}",
                f"sched, {n:,} pending",
                "delay",
                {"system": "sched", "n": n, "k_insert": k, "k_cancel": k_sched},
            )
        )
        if n == sizes[0] or o.full:
            k_aps = 200 if o.quick else 1_000
            cases.append(
                Case(
                    f"a{n}",
                    f"APScheduler, {n:,} pending",
                    "delay",
                    {"system": "apscheduler", "n": n, "k_insert": k_aps, "k_cancel": k_aps},
                )
            )
    return cases


def delay_report(cases: list[Case], r: Results, o: Options) -> Report:
    rows = []
    for c in cases:
        n = c.kwargs["n"]
        rows.append(
            [
                c.label,
                fmt_int(median(r, c.key, "fill_rate")),
                fmt_ratio(ratio(r, c.key, f"s{n}", "fill_rate")),
                fmt_num(median(r, c.key, "insert_us"), " µs"),
                fmt_num(median(r, c.key, "bytes_per_task"), " B"),
                fmt_num(median(r, c.key, "cancel_us"), " µs"),
                f"{len(values(r, c.key, 'fill_rate'))}",
            ]
        )
    headers = [
        "system",
        "fill inserts/s",
        "vs sched",
        "insert at N",
        "RSS per task",
        "cancel at N",
        "rounds",
    ]
    lines = table(headers, rows)
    bad = [c.label for c in cases if any(m is not None and not m["ok"] for m in r.get(c.key, []))]
    if bad:
        lines.append(f"\nWARNING: a consistency check failed for: {', '.join(bad)}")
    targets = []
    for n in delay_sizes(o):
        x = ratio(r, f"m{n}", f"s{n}", "fill_rate")
        targets.append(
            Target(
                "delay",
                f"delay() insert rate >= 0.5x sched, {n:,} pending",
                f"{fmt_ratio(x)} ({fmt_int(median(r, f'm{n}', 'fill_rate'))}/s vs "
                f"{fmt_int(median(r, f's{n}', 'fill_rate'))}/s)",
                None if x is None else x >= 0.5,
            )
        )
    for n in delay_sizes(o):
        b = median(r, f"m{n}", "bytes_per_task")
        targets.append(
            Target(
                "delay",
                f"RSS <= 400 B per pending task, {n:,} pending",
                f"{fmt_num(b, ' B')} (sched {fmt_num(median(r, f's{n}', 'bytes_per_task'), ' B')})",
                None if b is None else b <= 400,
            )
        )
    n = delay_sizes(o)[-1]
    cancel = median(r, f"m{n}", "cancel_us")
    targets.append(
        Target(
            "delay",
            f"cancel of a pending task < 20 µs, {n:,} pending",
            f"{fmt_num(cancel, ' µs')} (sched {fmt_num(median(r, f's{n}', 'cancel_us'), ' µs')})",
            None if cancel is None else cancel < 20,
        )
    )
    return Report(lines, targets)


# -- idle --------------------------------------------------------------------------

# "At the noise floor": within this much CPU of a process doing nothing.
IDLE_MARGIN_MS_PER_S = 0.1


def idle_cases(o: Options) -> list[Case]:
    n = 10_000 if o.quick else 100_000
    kw = {"n": n, "seconds": 1.0 if o.quick else 2.0, "settle": 0.3 if o.quick else 0.5}
    return [
        Case(
            "base", "baseline: a Python process doing nothing", "idle", {"system": "baseline", **kw}
        ),
        Case("m", f"marionette, {n:,} pending", "idle", {"system": "marionette", **kw}),
        Case("s", f"sched + 1 thread in run(), {n:,} pending", "idle", {"system": "sched", **kw}),
        Case("a", f"APScheduler, {n:,} pending", "idle", {"system": "apscheduler", **kw}),
    ]


def idle_report(cases: list[Case], r: Results, o: Options) -> Report:
    rows = []
    for c in cases:
        rows.append(
            [
                c.label,
                fmt_num(median(r, c.key, "cpu_ms_per_s"), " ms/s"),
                fmt_num(worst(r, c.key, "cpu_ms_per_s"), " ms/s"),
                fmt_num(median(r, c.key, "wakeups_per_s"), "/s"),
                fmt_int(median(r, c.key, "threads")),
                f"{len(values(r, c.key, 'cpu_ms_per_s'))}",
            ]
        )
    lines = table(
        ["system", "CPU (median)", "CPU (worst)", "thread wake-ups", "threads", "rounds"], rows
    )
    cpu, floor = median(r, "m", "cpu_ms_per_s"), median(r, "base", "cpu_ms_per_s")
    wakeups = median(r, "m", "wakeups_per_s")
    met = None
    if cpu is not None and floor is not None and wakeups is not None:
        met = cpu <= floor + IDLE_MARGIN_MS_PER_S and wakeups < 1.0
    target = Target(
        "idle",
        f"idle CPU at the noise floor (<= floor + {IDLE_MARGIN_MS_PER_S} ms/s, no tick)",
        f"{fmt_num(cpu, ' ms/s')}, {fmt_num(wakeups, ' wake-ups/s')}"
        f" (floor {fmt_num(floor, ' ms/s')})",
        met,
    )
    return Report(lines, [target])


# -- lateness ----------------------------------------------------------------------


def lateness_cases(o: Options) -> list[Case]:
    if o.quick:
        kw: dict[str, Any] = {"n": 1_000, "spread": 0.5, "lead": 1.0}
    else:
        kw = {"n": 10_000, "spread": 2.0, "lead": 1.5}
    return [
        Case("m", "marionette (4 workers)", "lateness", {"system": "marionette", **kw}),
        Case("s", "sched + 1 thread in run()", "lateness", {"system": "sched", **kw}),
        Case("a", "APScheduler (4 workers)", "lateness", {"system": "apscheduler", **kw}),
    ]


def lateness_report(cases: list[Case], r: Results, o: Options) -> Report:
    rows = []
    for c in cases:
        rows.append(
            [
                c.label,
                fmt_num(median(r, c.key, "p50_ms"), " ms"),
                fmt_num(median(r, c.key, "p99_ms"), " ms"),
                fmt_num(worst(r, c.key, "max_ms"), " ms"),
                fmt_int(worst(r, c.key, "early")),
                fmt_int(worst(r, c.key, "lost")),
                fmt_int(median(r, c.key, "preempted")),
                f"{len(values(r, c.key, 'p99_ms'))}",
            ]
        )
    headers = [
        "system",
        "p50 (median)",
        "p99 (median)",
        "max (worst round)",
        "early (worst)",
        "lost (worst)",
        "involuntary switches",
        "rounds",
    ]
    lines = table(headers, rows)
    n, lead = cases[0].kwargs["n"], cases[0].kwargs["lead"]
    slow = [c.label for c in cases if (worst(r, c.key, "submit_s") or 0) > lead]
    if slow:
        lines.append(
            f"\nWARNING: submitting took longer than the {lead} s lead for: {', '.join(slow)}"
        )
    p99, early, lost = median(r, "m", "p99_ms"), worst(r, "m", "early"), worst(r, "m", "lost")
    targets = [
        Target(
            "lateness",
            f"lateness p99 < 1 ms ({n:,} tasks)",
            fmt_num(p99, " ms"),
            None if p99 is None else p99 < 1.0,
        ),
        Target("lateness", "none early", fmt_int(early), None if early is None else early == 0),
        Target("lateness", "none lost", fmt_int(lost), None if lost is None else lost == 0),
    ]
    return Report(lines, targets)


# -- structures --------------------------------------------------------------------

STRUCTURE_LABELS = {
    "heap": "heap + lazy deletion (marionette _Timeline)",
    "insort": "bisect.insort on a list",
    "sortedlist": "sortedcontainers.SortedList",
}


def structure_sizes(o: Options) -> list[int]:
    return [10_000, 100_000] if o.quick else [100_000, 1_000_000]


def structure_cases(o: Options) -> list[Case]:
    cases = []
    for n in structure_sizes(o):
        for kind, label in STRUCTURE_LABELS.items():
            k = 1_000 if o.quick else 10_000
            bulk = kind == "insort" and n > 100_000  # an incremental fill is quadratic
            if kind == "insort":
                k = min(k, 2_000)
            cases.append(
                Case(
                    f"{kind}{n}",
                    f"{label}, {n:,}",
                    "structure",
                    {"kind": kind, "n": n, "k_insert": k, "k_cancel": k, "bulk": bulk},
                )
            )
    return cases


def structure_report(cases: list[Case], r: Results, o: Options) -> Report:
    rows = []
    for c in cases:
        fill = median(r, c.key, "fill_rate")
        rows.append(
            [
                c.label,
                "built by one sort" if c.kwargs["bulk"] else fmt_int(fill),
                fmt_num(median(r, c.key, "insert_us"), " µs"),
                fmt_num(median(r, c.key, "cancel_us"), " µs"),
                fmt_num(median(r, c.key, "bytes_per_entry"), " B"),
                f"{len(values(r, c.key, 'insert_us'))}",
            ]
        )
    headers = [
        "structure, entries",
        "fill inserts/s",
        "insert at N",
        "cancel at N",
        "RSS per entry",
        "rounds",
    ]
    lines = table(headers, rows)
    n = structure_sizes(o)[-1]
    targets = []
    for metric, what in (("insert_us", "insert"), ("cancel_us", "cancel")):
        heap = median(r, f"heap{n}", metric)
        others = {k: median(r, f"{k}{n}", metric) for k in ("insort", "sortedlist")}
        met = None
        if heap is not None and all(v is not None for v in others.values()):
            met = all(heap < v for v in others.values() if v is not None)
        observed = f"heap {fmt_num(heap, ' µs')}, " + ", ".join(
            f"{k} {fmt_num(v, ' µs')}" for k, v in others.items()
        )
        targets.append(
            Target(
                "structures", f"heap beats insort and SortedList on {what} at {n:,}", observed, met
            )
        )
    return Report(lines, targets)


# -- periodic (reactive scheduling) ------------------------------------------------

PERIODIC_SYSTEMS = {
    "marionette": "marionette, tm.every() (4 workers)",
    "floor": "floor: a bare timer thread, runs inline",
    "apscheduler": "APScheduler 3, interval jobs (4 workers, its defaults)",
}


def periodic_cases(o: Options) -> list[Case]:
    if o.quick:
        kw: dict[str, Any] = {"n": 1_000, "seconds": 3.0, "lead": 1.0, "grace": 1.0}
    else:
        kw = {"n": 10_000, "seconds": 10.0, "lead": 3.0, "grace": 1.5}
    cases = []
    for aligned, how in ((False, "spread"), (True, "aligned")):
        for system, label in PERIODIC_SYSTEMS.items():
            cases.append(
                Case(
                    f"{system}-{how}",
                    f"{label}, {how}",
                    "periodic",
                    {"system": system, "interval": 1.0, "aligned": aligned, **kw},
                )
            )
    return cases


def periodic_report(cases: list[Case], r: Results, o: Options) -> Report:
    rows = []
    for c in cases:
        skipped = None
        if c.kwargs["system"] == "apscheduler":
            missed = worst(r, c.key, "missed")
            capped = worst(r, c.key, "max_instances")
            if missed is not None and capped is not None:
                skipped = f"{fmt_int(missed)} + {fmt_int(capped)}"
        rows.append(
            [
                c.label,
                fmt_num(_pct(median(r, c.key, "scheduler_cpu_share")), " %"),
                fmt_num(_pct(median(r, c.key, "process_cpu_share")), " %"),
                fmt_int(median(r, c.key, "scheduler_wakeups_per_s")),
                fmt_num(median(r, c.key, "p50_ms"), " ms"),
                fmt_num(median(r, c.key, "p99_ms"), " ms"),
                fmt_num(worst(r, c.key, "max_ms"), " ms"),
                f"{fmt_int(worst(r, c.key, 'lost'))} of {fmt_int(median(r, c.key, 'expected'))}",
                fmt_int(worst(r, c.key, "coalesced")),
                skipped or "—",
                f"{len(values(r, c.key, 'p99_ms'))}",
            ]
        )
    headers = [
        "system, first runs",
        "scheduler thread CPU",
        "process CPU",
        "scheduler blocked/s",
        "lateness p50",
        "p99",
        "max (worst)",
        "runs lost (worst)",
        "coalesced (worst)",
        "APS missed + max_instances (worst)",
        "rounds",
    ]
    lines = table(headers, rows)
    kw = cases[0].kwargs
    slow = [c.label for c in cases if (worst(r, c.key, "submit_s") or 0) > kw["lead"]]
    if slow:
        lines.append(
            f"\nWARNING: submitting took longer than the {kw['lead']} s lead for: {', '.join(slow)}"
        )
    odd = [c.label for c in cases if (worst(r, c.key, "misattributed") or 0) > 0]
    if odd:
        lines.append(
            "\nNOTE: some runs were more than one interval late, so their lateness is"
            f" understated (each is attributed to a later occurrence): {', '.join(odd)}"
        )
    targets = []
    for how in ("spread", "aligned"):
        key = f"marionette-{how}"
        lost, twice = worst(r, key, "lost"), worst(r, key, "misattributed")
        met = None if lost is None or twice is None else lost == 0 and twice == 0
        targets.append(
            Target(
                "periodic",
                f"{fmt_int(kw['n'])} periodics, first runs {how}: no run lost or more"
                " than one interval late (late beats lost)",
                f"{fmt_int(lost)} lost, {fmt_int(twice)} over one interval late",
                met,
            )
        )
    return Report(lines, targets)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


# -- groups ------------------------------------------------------------------------


def groups_cases(o: Options) -> list[Case]:
    n = 20_000 if o.quick else 200_000
    return [
        Case("none", "no group", "groups", {"n": n, "limit": None}),
        Case(
            "named",
            'no group, name="noop" (the options path, no gate)',
            "groups",
            {"n": n, "limit": None, "named": True},
        ),
        Case("g4", 'group="g", limits={"g": 4}', "groups", {"n": n, "limit": 4}),
        Case("g2", 'group="g", limits={"g": 2}', "groups", {"n": n, "limit": 2}),
    ]


def groups_report(cases: list[Case], r: Results, o: Options) -> Report:
    against = [("none", "vs no group"), ("named", 'vs name="noop"'), ("g4", "vs limit 4")]
    return Report(rate_table(cases, r, "4 workers, one producer", against), [])


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark(
            "throughput",
            "No-op throughput: 4 workers, one producer",
            5,
            throughput_cases,
            throughput_report,
            (("rate", "tasks/s (higher is better)"),),
        ),
        Benchmark(
            "delay",
            "delay(): insert rate, memory and cancel with many pending tasks",
            3,
            delay_cases,
            delay_report,
            (
                ("fill_rate", "fill inserts/s (higher is better)"),
                ("insert_us", "insert at N, µs (lower is better)"),
                ("bytes_per_task", "RSS per task, B (lower is better)"),
                ("cancel_us", "cancel at N, µs (lower is better)"),
            ),
        ),
        Benchmark(
            "idle",
            "Idle CPU with tasks pending an hour or two out",
            3,
            idle_cases,
            idle_report,
            (("cpu_ms_per_s", "CPU, ms/s (lower is better)"),),
        ),
        Benchmark(
            "lateness",
            "Lateness of tasks due over a short window, free workers",
            5,
            lateness_cases,
            lateness_report,
            (("p50_ms", "p50, ms (lower is better)"), ("p99_ms", "p99, ms (lower is better)")),
        ),
        Benchmark(
            "structures",
            "Scheduler data structures: heap vs insort vs SortedList",
            3,
            structure_cases,
            structure_report,
        ),
        Benchmark(
            "periodic",
            "10,000 periodics at 1 s intervals, 4 workers, a 10 s window",
            3,
            periodic_cases,
            periodic_report,
        ),
        Benchmark(
            "groups",
            "Group-limited throughput: 200,000 no-op tasks, 4 workers, one producer",
            5,
            groups_cases,
            groups_report,
        ),
    )
}


# -- running -----------------------------------------------------------------------


def child_env(first: Path | None = None) -> dict[str, str]:
    """The environment of a child; `first`, if given, goes first on its PYTHONPATH."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if first is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(first), env.get("PYTHONPATH")) if p)
    return env


def measure(case: Case, timeout: float, first: Path | None = None) -> Measurement | None:
    """Run one case in a fresh child process, `first` first on its PYTHONPATH; None
    (reported) if it failed."""
    command = [sys.executable, str(CHILD), case.function, json.dumps(case.kwargs)]
    env = child_env(first)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"    {case.label}: timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    if done.returncode != 0 or not done.stdout.strip():
        tail = done.stderr.strip().splitlines()[-5:]
        print(f"    {case.label}: failed ({done.returncode}): {' / '.join(tail)}", file=sys.stderr)
        return None
    result: Measurement = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def baseline_pairs(bench: Benchmark, cases: list[Case], o: Options) -> list[tuple[Case, Case]]:
    """Each marionette case and its copy measuring the --baseline commit (none
    without --baseline or for a benchmark that does not support it)."""
    if o.baseline is None or not bench.compare:
        return []
    at = f"marionette@{o.baseline.commit}"
    return [
        (
            c,
            dataclasses.replace(
                c, key=f"{c.key}@{o.baseline.commit}", label=c.label.replace("marionette", at, 1)
            ),
        )
        for c in cases
        if c.kwargs.get("system") == "marionette"
    ]


def run_benchmark(
    bench: Benchmark, o: Options
) -> tuple[list[Case], list[tuple[Case, Case]], Results]:
    """Every case, rounds times, interleaved; the baseline copies (see
    `baseline_pairs`) are more cases, after the others, in the same rotation."""
    cases = bench.cases(o)
    pairs = baseline_pairs(bench, cases, o)
    olds = [old for _, old in pairs]
    cases += olds
    rounds = o.rounds or (1 if o.quick else bench.rounds)
    results: Results = {c.key: [] for c in cases}
    for rnd in range(rounds):
        shift = rnd % len(cases)
        order = cases[shift:] + cases[:shift]  # interleaved, rotating
        for case in order:
            first = o.baseline.path if o.baseline is not None and case in olds else None
            began = time.perf_counter()
            m = measure(case, o.timeout, first)
            results[case.key].append(m)
            took = time.perf_counter() - began
            print(
                f"  [{bench.name} {rnd + 1}/{rounds}] {case.label}: {took:.1f} s", file=sys.stderr
            )
    return cases, pairs, results


def compare_table(
    bench: Benchmark, pairs: list[tuple[Case, Case]], r: Results, new: str, old: str
) -> list[str]:
    """new / baseline for each compared metric of each marionette case: the ratio
    within each round, and its median over the rounds."""
    rounds = len(r[pairs[0][0].key])
    rows = []
    for a, b in pairs:
        for metric, header in bench.compare:
            per_round = []
            for ma, mb in zip(r[a.key], r[b.key], strict=True):
                if ma is not None and mb is not None and ma[metric] and mb[metric]:
                    per_round.append(f"{ma[metric] / mb[metric]:.3f}")
                else:
                    per_round.append("—")
            x = ratio(r, a.key, b.key, metric)
            rows.append(
                [
                    a.label,
                    header,
                    fmt_num(median(r, a.key, metric)),
                    fmt_num(median(r, b.key, metric)),
                    *per_round,
                    "—" if x is None else f"{x:.3f}",
                ]
            )
    headers = [
        "case",
        "metric",
        f"new {new} (median)",
        f"baseline {old} (median)",
        *(f"round {i + 1}" for i in range(rounds)),
        "new / baseline (median)",
    ]
    return [
        "",
        f"new / baseline: marionette {new} / marionette@{old}, within each round",
        "",
        *table(headers, rows, left=2),
    ]


def loadavg() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages: how busy the machine was (NaN if unknown)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def machine() -> list[str]:
    load = loadavg()
    return [
        f"- date: {datetime.date.today().isoformat()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}",
        f"- CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        f"- load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]


def revision() -> str:
    """The commit of the code measured, and whether marionette/ differs from it."""
    root = HERE.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "marionette"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    return f"{commit}{' + uncommitted changes in marionette/' if dirty else ''}"


def export_snapshot(rev: str) -> tuple[Path, str]:
    """Export `rev`'s marionette/ into a temporary directory (``git archive``).

    Children import marionette from there (it goes first on PYTHONPATH), so the
    code measured is exactly that commit, whatever is being edited meanwhile.
    Returns the directory and the commit's short hash.
    """
    root = HERE.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix=f"marionette-{commit}-"))
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, "marionette"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target, commit


def imported_from(first: Path | None = None) -> str:
    """The file a child (`first` first on its PYTHONPATH) imports marionette from."""
    return subprocess.run(
        [sys.executable, "-c", "import marionette; print(marionette.__file__)"],
        capture_output=True,
        text=True,
        cwd=HERE,
        env=child_env(first),
    ).stdout.strip()


def versions() -> str:
    """Versions of the systems, read from a child so this process imports none."""
    code = (
        "import importlib.metadata as m\n"
        "print(', '.join(f'{p} {m.version(p)}' for p in "
        "('marionette', 'APScheduler', 'sortedcontainers', 'psutil')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test")
    parser.add_argument(
        "--full",
        action="store_true",
        help="also APScheduler at full size (200,000 tasks; 1,000,000 pending: slow)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds per benchmark (default: 5 for throughput, lateness and groups, 3 for the"
        " others; 1 with --quick)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds allowed per child process"
    )
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--snapshot",
        metavar="REV",
        help="measure marionette/ as committed at REV (e.g. HEAD), exported with git archive,"
        " instead of the working tree",
    )
    supported = [b.name for b in BENCHMARKS.values() if b.compare]
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure marionette/ as committed at REV (marionette@REV) as one more system"
        " in every round, and report new / baseline within each round and its median; for "
        + ", ".join(supported)
        + " (the other benchmarks run as without it)",
    )
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
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    timeout = args.timeout or (60.0 if args.quick else 300.0)
    chosen = [BENCHMARKS[n] for n in (args.names or BENCHMARKS)]

    out = ["# marionette benchmarks" + (" (--quick)" if args.quick else ""), "", *machine()]
    out.append(f"- versions: {versions()}")
    if args.snapshot:
        where, commit = export_snapshot(args.snapshot)
        atexit.register(shutil.rmtree, where, ignore_errors=True)
        os.environ["PYTHONPATH"] = child_env(where)["PYTHONPATH"]
        found = imported_from()
        if not found.startswith(str(where)):
            parser.error(f"children would import marionette from {found!r}, not {where}")
        out.append(
            f"- marionette revision: {commit} (exported with git archive; uncommitted"
            " changes in the working tree not measured)"
        )
        new = commit
    else:
        out.append(f"- marionette revision: {revision()}")
        new = "working tree"
    baseline = None
    if args.baseline:
        where, commit = export_snapshot(args.baseline)
        atexit.register(shutil.rmtree, where, ignore_errors=True)
        found = imported_from(where)
        if not found.startswith(str(where)):
            parser.error(f"baseline children would import marionette from {found!r}, not {where}")
        baseline = Baseline(commit, where)
        applies = ", ".join(b.name for b in chosen if b.compare) or "none of the benchmarks run"
        out.append(
            f"- baseline: marionette@{commit} (exported with git archive), measured beside"
            f" marionette in every round of: {applies}"
        )
    o = Options(
        quick=args.quick, full=args.full, rounds=args.rounds, timeout=timeout, baseline=baseline
    )
    began = time.perf_counter()
    targets: list[Target] = []
    dump: dict[str, Any] = {}
    sections = []
    for bench in chosen:
        print(f"{bench.name}: {bench.title}", file=sys.stderr)
        load_before = loadavg()
        cases, pairs, results = run_benchmark(bench, o)
        report = bench.report(cases, results, o)
        targets.extend(report.targets)
        load_after = loadavg()
        sections += ["", f"## {bench.name}: {bench.title}", "", *report.lines]
        if baseline is not None and pairs:
            sections += compare_table(bench, pairs, results, new, baseline.commit)
        sections.append(
            f"\n(load average, 1 min: {load_before[0]:.2f} before, {load_after[0]:.2f} after)"
        )
        dump[bench.name] = {
            c.key: {"case": dataclasses.asdict(c), "rounds": results[c.key]} for c in cases
        }
    load = loadavg()
    out.append(f"- load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    out.append(f"- wall time: {time.perf_counter() - began:.0f} s")
    out += sections
    rows = [[t.benchmark, t.text, t.observed, verdict(t.met)] for t in targets]
    out += [
        "",
        "## Targets",
        "",
        *table(["benchmark", "target", "observed (median)", "verdict"], rows, left=4),
    ]
    print("\n".join(out))
    if args.json is not None:
        args.json.write_text(json.dumps(dump, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the child-side workloads: memory, CPU, wake-ups, percentiles.

Everything here runs inside one fresh child process per measurement.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import threading
from collections.abc import Sequence
from typing import Any

import psutil

_PROCESS = psutil.Process()


def rss_bytes() -> int:
    """Resident set size of this process after a full garbage collection."""
    gc.collect()
    return int(_PROCESS.memory_info().rss)


def thread_switches() -> dict[int, int]:
    """Voluntary context switches of each thread of this process, by native id.

    A thread that ticks (wakes on a timer) shows up here even when its CPU cost is
    below the clock's resolution. Linux only; an empty dict elsewhere.
    """
    prefix = "voluntary_ctxt_switches:"
    switches: dict[int, int] = {}
    root = "/proc/self/task"
    try:
        tids = os.listdir(root)
    except OSError:
        return switches
    for tid in tids:
        try:
            with open(f"{root}/{tid}/status") as status:
                for line in status:
                    if line.startswith(prefix):
                        switches[int(tid)] = int(line.split()[1])
                        break
        except OSError:  # the thread ended meanwhile
            continue
    return switches


def other_thread_switches(before: dict[int, int], after: dict[int, int]) -> int:
    """Switches between two snapshots, every thread but the main one."""
    main = threading.main_thread().native_id
    return sum(n - before.get(tid, 0) for tid, n in after.items() if tid != main)


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def process_switches() -> int:
    """Context switches (voluntary + involuntary) of every thread of the process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def rate_result(n: int, elapsed: float, switches: int, completed: int) -> dict[str, Any]:
    """A throughput measurement: `n` tasks in `elapsed` seconds, `switches` context
    switches, `completed` tasks seen finished (-1 if unknown)."""
    return {
        "rate": n / elapsed,
        "seconds": elapsed,
        "switches_per_task": switches / n,
        "completed": completed,
        "n": n,
    }

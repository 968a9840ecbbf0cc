"""Child-side micro-benchmark of the scheduler's data structure and two alternatives.

The claim under test, from the docstring of ``marionette/scheduler.py``: a binary
heap with lazy deletion beats ``bisect.insort`` on a list and
``sortedcontainers.SortedList`` for insert and cancel at 1,000,000 entries.

Structures, each used the way a scheduler would use it:
- ``heap``: marionette's own ``scheduler._Timeline`` (``heapq`` entries plus a dict
  from item to live entry; cancel pops the dict entry, the heap entry dies lazily).
- ``insort``: a list kept sorted with ``bisect.insort``; the caller keeps each
  entry as its handle (as `sched` does) and cancel finds it with ``bisect_left``
  and deletes it.
- ``sortedlist``: ``sortedcontainers.SortedList``; cancel is ``SortedList.remove``.

Entries are ``(deadline, seq, item)`` (the heap's own are 4-tuples); items are
distinct objects made before the baseline RSS is read, so the memory per entry is
what the structure costs, not the items it refers to. Items are instances of a
slotted class, tracked by the garbage collector as task handlers are: with plain
``object()`` items the collector untracks the entry tuples and the heap's dict, and
the first young collection after a full one then walks the whole dict again (about
25 ms at 1,000,000 entries), an artefact that real handlers do not have.
"""

from __future__ import annotations

import bisect
import random
import time
from typing import Any

from common import rss_bytes

KINDS = ("heap", "insort", "sortedlist")


class Item:
    """A stand-in for a task handler: a small slotted object the collector tracks."""

    __slots__ = ("ref",)

    def __init__(self) -> None:
        self.ref: object = None


def structure(
    kind: str, n: int, k_insert: int, k_cancel: int, bulk: bool = False, seed: int = 1
) -> dict[str, Any]:
    """Fill `kind` with `n` entries at random deadlines (random order), then time
    `k_insert` more inserts and `k_cancel` cancels of random entries at `n`.

    With `bulk` (only sensible for ``insort``, whose incremental fill is quadratic),
    the sorted list is built with one sort instead and no fill rate is reported.
    """
    rng = random.Random(seed)
    base = 1e6
    deadlines = [base + rng.uniform(3600.0, 7200.0) for _ in range(n + k_insert)]
    items = [Item() for _ in range(n + k_insert)]
    victims = rng.sample(range(n), k_cancel)
    handles: list[Any] = [None] * n
    fill: float | None
    if kind == "heap":
        from marionette.scheduler import _Timeline

        timeline = _Timeline()
        push = timeline.push
        before = rss_bytes()
        start = time.perf_counter()
        for i in range(n):
            push(items[i], deadlines[i], False)
        fill = time.perf_counter() - start
        after = rss_bytes()
        start = time.perf_counter()
        for i in range(n, n + k_insert):
            push(items[i], deadlines[i], False)
        more = time.perf_counter() - start
        remove = timeline.remove
        start = time.perf_counter()
        for i in victims:
            remove(items[i])
        cancel = time.perf_counter() - start
        size = len(timeline)
    elif kind == "insort":
        entries: list[tuple[float, int, object]] = []
        before = rss_bytes()
        if bulk:
            fill = None
            for i in range(n):
                handles[i] = (deadlines[i], i, items[i])
            entries = sorted(handles)
        else:
            insort = bisect.insort
            start = time.perf_counter()
            for i in range(n):
                entry = handles[i] = (deadlines[i], i, items[i])
                insort(entries, entry)
            fill = time.perf_counter() - start
        after = rss_bytes()
        insort = bisect.insort
        start = time.perf_counter()
        for i in range(n, n + k_insert):
            insort(entries, (deadlines[i], i, items[i]))
        more = time.perf_counter() - start
        bisect_left = bisect.bisect_left
        start = time.perf_counter()
        for i in victims:
            del entries[bisect_left(entries, handles[i])]
        cancel = time.perf_counter() - start
        size = len(entries)
    elif kind == "sortedlist":
        from sortedcontainers import SortedList

        sorted_list: SortedList[tuple[float, int, object]] = SortedList()
        add = sorted_list.add
        before = rss_bytes()
        start = time.perf_counter()
        for i in range(n):
            entry = handles[i] = (deadlines[i], i, items[i])
            add(entry)
        fill = time.perf_counter() - start
        after = rss_bytes()
        start = time.perf_counter()
        for i in range(n, n + k_insert):
            add((deadlines[i], i, items[i]))
        more = time.perf_counter() - start
        remove_entry = sorted_list.remove
        start = time.perf_counter()
        for i in victims:
            remove_entry(handles[i])
        cancel = time.perf_counter() - start
        size = len(sorted_list)
    else:
        raise ValueError(f"unknown structure: {kind}")
    return {
        "fill_rate": None if fill is None else n / fill,
        "insert_us": more / k_insert * 1e6,
        "cancel_us": cancel / k_cancel * 1e6,
        "bytes_per_entry": (after - before) / n,
        "ok": size == n + k_insert - k_cancel,
        "n": n,
    }

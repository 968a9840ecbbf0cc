"""The weather aggregator from go-smartpoll's README, with marionette.

Three (simulated) weather APIs each have their own rate limit, so each is polled at
its own rate, retried with backoff when it fails, and an aggregate is published each
time any reading changes. Run it with ``python examples/weather.py`` (about 5 s).

How smartpoll's parts map onto marionette:

* a named task -> a keyed task: one pending instance per key, never two at once;
* the control loop, where task results are handled in order -> a listener: events
  arrive one at a time, so the state it keeps needs no lock;
* ``internal.ScheduleSooner(name, d)`` -> `poll_in` below: `TaskManager.reschedule`
  with ``only_sooner=True``, else a keyed `TaskManager.delay`;
* ``internal.Schedule("publish", 0)`` -> ``tm.queue(publish, key="publish")``: while a
  publish waits to run, more changes do not add another one.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType

from marionette import Context, TaskEvent, TaskEventKind, TaskManager, TaskManagerStopped

log = logging.getLogger("weather")


@dataclass(frozen=True)
class Api:
    """A weather API: its rate limit (one call per `every` seconds) and how often it fails."""

    name: str
    every: float
    failure_rate: float


APIS = [Api("api1", 0.5, 0.1), Api("api2", 1.0, 0.3), Api("api3", 1.5, 0.2)]
BY_NAME = {api.name: api for api in APIS}


def fetch(api: Api, ctx: Context) -> float:
    """Call the API: a temperature in degrees Celsius, to the half degree."""
    if ctx.wait(random.uniform(0.02, 0.1)):  # the network; True if cancelled meanwhile
        ctx.check()
    if random.random() < api.failure_rate:
        raise ConnectionError(f"{api.name} answered 503")
    return round(random.gauss(18.0, 0.4) * 2) / 2


def poll_in(tm: TaskManager, api: Api, seconds: float) -> None:
    """Poll `api` in `seconds`, unless it is planned sooner already (ScheduleSooner)."""
    if not tm.reschedule(api.name, seconds, only_sooner=True):
        # Nothing was planned, or it is planned sooner: then this returns that one.
        tm.delay(seconds, partial(fetch, api), key=api.name, name=api.name, retries=2, backoff=0.1)


class Aggregator:
    """The control loop's state. `on_result` runs on the listener thread only; the
    publish task reads `latest`, a read-only copy replaced whole on each change."""

    def __init__(self, tm: TaskManager) -> None:
        self.tm = tm
        self.readings: dict[str, float] = {}
        self.latest: Mapping[str, float] = MappingProxyType({})
        self.published = 0  # written by publish only: tasks sharing a key never overlap

    def on_result(self, event: TaskEvent) -> None:
        api = BY_NAME.get(event.task.name)
        if api is None:
            return  # a publish
        try:
            poll_in(self.tm, api, api.every)  # success or not, poll again at its own rate
            if (
                event.kind is TaskEventKind.SUCCEEDED
                and self.readings.get(api.name) != event.result
            ):
                self.readings[api.name] = event.result
                self.latest = MappingProxyType(dict(self.readings))
                self.tm.queue(self.publish, key="publish", name="publish")
        except TaskManagerStopped:
            pass  # events still arrive while the manager stops: plan nothing more

    def publish(self, ctx: Context) -> None:
        readings = self.latest  # the newest copy, however many changes queued this run
        self.published += 1
        mean = statistics.fmean(readings.values())
        shown = " ".join(f"{name}={t:.1f}" for name, t in sorted(readings.items()))
        log.info("published %.2f C from %d source(s): %s", mean, len(readings), shown)


def main() -> None:
    # An application configures logging: here, the library's lines and ours, in order.
    logging.basicConfig(
        level=logging.INFO, format="%(relativeCreated)5.0fms %(name)-10s %(message)s"
    )
    tm = TaskManager(workers=3)
    aggregator = Aggregator(tm)
    tm.add_listener(aggregator.on_result, events=[TaskEventKind.SUCCEEDED, TaskEventKind.FAILED])
    with tm:
        for api in APIS:  # the first poll of each now; then they reschedule
            poll_in(tm, api, 0)
        time.sleep(2.5)
        # A user opens the app: fetch everything now (only_sooner never delays a poll).
        moved = sum(tm.reschedule(api.name, 0, only_sooner=True) for api in APIS)
        log.info("refresh requested: %d poll(s) brought forward", moved)
        time.sleep(2.5)
    log.info(
        "done: %d summaries published; last: %s", aggregator.published, dict(aggregator.latest)
    )


if __name__ == "__main__":
    main()

"""One measurement in a fresh process: ``python bench/child.py FUNCTION JSON_KWARGS``.

Prints one JSON line with the measurement and leaves with `os._exit`, so that
tearing down a million pending objects (or a thread that still sleeps) is not paid
for, nor waited on.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import reactive
import structures
import systems

FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "throughput": systems.throughput,
    "delay": systems.delay,
    "idle": systems.idle,
    "lateness": systems.lateness,
    "structure": structures.structure,
    "periodic": reactive.periodic,
    "groups": reactive.groups,
    "wakeup": reactive.wakeup,
}


def main(argv: list[str]) -> None:
    name, kwargs = argv[1], json.loads(argv[2])
    result = FUNCTIONS[name](**kwargs)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)

"""The package face: exports, and an import that starts nothing and reads nothing."""

from __future__ import annotations

import subprocess
import sys

import marionette

EXPECTED = [
    "BackendUnavailable",
    "Cancelled",
    "Config",
    "ConfigError",
    "Context",
    "DeadlineExceeded",
    "GroupStats",
    "MarionetteError",
    "NoServerName",
    "NoWorkers",
    "Periodic",
    "QueueFull",
    "RegisteredTask",
    "RemoteError",
    "Scheduler",
    "Stats",
    "Task",
    "TaskError",
    "TaskEvent",
    "TaskEventKind",
    "TaskHandler",
    "TaskManager",
    "TaskManagerStopped",
    "TaskState",
    "Unschedulable",
    "WorkerLost",
]


def test_all_is_sorted_and_pinned() -> None:
    """`__all__` is sorted and names exactly the public API."""
    assert marionette.__all__ == sorted(marionette.__all__)
    assert marionette.__all__ == EXPECTED
    for name in EXPECTED:
        assert hasattr(marionette, name)


def test_import_starts_no_thread_and_reads_no_environment() -> None:
    """`import marionette` in a fresh interpreter starts no thread and reads no env var."""
    code = """
import os, threading
reads = []
class Env(dict):
    def __getitem__(self, k): reads.append(k); return super().__getitem__(k)
    def get(self, k, d=None): reads.append(k); return super().get(k, d)
os.environ = Env(os.environ)
before = threading.active_count()
import marionette
assert threading.active_count() == before, threading.enumerate()
assert not [r for r in reads if "MARIONETTE" in r], reads
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_py_typed_is_shipped() -> None:
    """The package carries its PEP 561 marker."""
    from importlib.resources import files

    assert files("marionette").joinpath("py.typed").is_file()

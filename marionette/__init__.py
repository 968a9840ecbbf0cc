"""marionette: an in-process task manager with scheduling, retries with backoff and
future scheduling built in; the Python form of the Go package of the same name.

Importing it starts no thread and reads no environment variable.
"""

from .config import Config
from .context import Context
from .errors import (
    BackendUnavailable,
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    MarionetteError,
    NoServerName,
    NoWorkers,
    QueueFull,
    RemoteError,
    TaskError,
    TaskManagerStopped,
    Unschedulable,
    WorkerLost,
)
from .events import TaskEvent, TaskEventKind
from .handler import Task, TaskHandler, TaskState
from .manager import TaskManager
from .periodic import Periodic
from .registry import RegisteredTask
from .scheduler import Scheduler
from .stats import GroupStats, Stats

__all__ = [
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

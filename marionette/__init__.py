"""marionette: an in-process task manager with scheduling, retries with backoff and
future scheduling built in; the Python form of the Go package of the same name.

Importing it starts no thread and reads no environment variable.
"""

from .config import Config
from .context import Context
from .errors import (
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    MarionetteError,
    NoServerName,
    NoWorkers,
    QueueFull,
    TaskError,
    TaskManagerStopped,
    Unschedulable,
)
from .handler import Task, TaskHandler, TaskState
from .manager import TaskManager
from .scheduler import Scheduler

__all__ = [
    "Cancelled",
    "Config",
    "ConfigError",
    "Context",
    "DeadlineExceeded",
    "MarionetteError",
    "NoServerName",
    "NoWorkers",
    "QueueFull",
    "Scheduler",
    "Task",
    "TaskError",
    "TaskHandler",
    "TaskManager",
    "TaskManagerStopped",
    "TaskState",
    "Unschedulable",
]

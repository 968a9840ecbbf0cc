"""Config: a frozen dataclass validated when it is made, and `Config.from_env`."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, NoServerName, NoWorkers

__all__ = ["Config", "check_limit"]


def _check_int(name: str, value: object, minimum: int, error: type[ConfigError]) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < minimum:
        raise error(f"{name} must be at least {minimum}, not {value!r}", field=name, value=value)


class Limits(Mapping[str, int]):
    """A read-only copy of `Config.limits` (unlike `types.MappingProxyType`, it can
    be pickled and deep-copied along with its Config)."""

    __slots__ = ("_limits",)

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)

    def __getitem__(self, group: str) -> int:
        return self._limits[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._limits)

    def __len__(self) -> int:
        return len(self._limits)

    def __hash__(self) -> int:
        return hash(frozenset(self._limits.items()))

    def __repr__(self) -> str:
        return repr(self._limits)


@dataclass(frozen=True, slots=True)
class Config:
    """How a `TaskManager` is built. Immutable; validated at construction.

    `workers` (default 4) worker threads; below 1 raises `NoWorkers` (0 is allowed
    on Redis: a submit-only manager that never claims a task).
    `queue_size` (default 64) bounds the task queue; below 1 raises `ConfigError`.
    `server_name` (default ``"marionette"``) is bound into every log line as
    ``server``; empty raises `NoServerName`. `logger` is a structlog logger (a stdlib
    `logging.Logger` is also accepted and wrapped); None logs through the stdlib
    logger named ``marionette``. `limits` maps a group name to the most tasks of
    that group running at once (each an int >= 1, else `ConfigError`); it is copied
    into a read-only mapping. A value of the wrong type raises `TypeError`.

    `backend` None keeps everything in memory; a ``redis://``, ``rediss://`` or
    ``unix://`` URL, or a `redis.Redis` client (never closed by marionette), selects
    Redis (``pip install 'marionette[redis]'``). The managers of every process with
    the same Redis and `namespace` (default ``"marionette"``: non-empty, without
    whitespace, ``{`` or ``}``) form one cluster. `lease` (seconds, >= 1, default
    10) is how long a process may go without renewing its heartbeat before its
    claims pass to the others; `result_ttl` (seconds, > 0, default one day) how long
    a settled task's state, result and errors stay readable. The URL is checked for
    its scheme here; redis-py reads the rest when the manager is made.
    """

    logger: Any = None
    workers: int = 4
    queue_size: int = 64
    server_name: str = "marionette"
    limits: Mapping[str, int] = field(default_factory=dict)
    backend: Any = None
    namespace: str = "marionette"
    lease: float = 10.0
    result_ttl: float = 86400.0

    def __post_init__(self) -> None:
        _check_backend(self.backend)
        _check_int("workers", self.workers, 0 if self.backend is not None else 1, NoWorkers)
        _check_int("queue_size", self.queue_size, 1, ConfigError)
        if not isinstance(self.server_name, str):
            raise TypeError(f"server_name must be a str, not {self.server_name!r}")
        if not self.server_name.strip():
            raise NoServerName(
                f"server_name must not be empty, not {self.server_name!r}",
                field="server_name",
                value=self.server_name,
            )
        if not isinstance(self.limits, Mapping):
            raise TypeError(f"limits must be a mapping of group name to int, not {self.limits!r}")
        for group, limit in self.limits.items():
            if not isinstance(group, str) or not group:
                raise TypeError(f"limits: a group name must be a non-empty str, not {group!r}")
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise ConfigError(
                    f"limits[{group!r}] must be an int >= 1, not {limit!r}",
                    field=f"limits[{group!r}]",
                    value=limit,
                )
        object.__setattr__(self, "limits", Limits(self.limits))
        _check_namespace(self.namespace)
        object.__setattr__(self, "lease", _check_seconds("lease", self.lease, 1.0, inclusive=True))
        object.__setattr__(
            self, "result_ttl", _check_seconds("result_ttl", self.result_ttl, 0.0, inclusive=False)
        )
        logger = self.logger
        if logger is not None and not isinstance(logger, logging.Logger):
            missing = [
                m
                for m in ("debug", "info", "warning", "error", "bind")
                if not callable(getattr(logger, m, None))
            ]
            if missing:
                lacks = ", ".join(missing)
                raise TypeError(
                    f"logger must be a structlog logger (it lacks {lacks}), not {logger!r}"
                )

    @classmethod
    def from_env(
        cls, prefix: str = "MARIONETTE_", environ: Mapping[str, str] | None = None
    ) -> Config:
        """Read ``{prefix}WORKERS``, ``{prefix}QUEUE_SIZE``, ``{prefix}SERVER_NAME``,
        ``{prefix}LIMITS`` (``"http=2,db=4"``), ``{prefix}BACKEND`` (a Redis URL; empty
        means memory), ``{prefix}NAMESPACE``, ``{prefix}LEASE`` and
        ``{prefix}RESULT_TTL`` (seconds).

        `environ` defaults to `os.environ`, read at call time. Unset variables keep
        their defaults. A malformed or invalid value raises `ConfigError` (or its
        subclass `NoWorkers` / `NoServerName`) naming the variable.
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {prefix!r}")
        env = os.environ if environ is None else environ
        if not isinstance(env, Mapping):
            raise TypeError(f"environ must be a mapping of str to str, not {env!r}")
        for name in _VARIABLES:
            raw = env.get(prefix + name)
            if raw is not None and not isinstance(raw, str):
                raise ConfigError(
                    f"{prefix + name} must be a string, not {raw!r}", field=prefix + name, value=raw
                )
        values: dict[str, Any] = {}
        raw_limits = env.get(prefix + "LIMITS")
        if raw_limits is not None:
            values["limits"] = _parse_limits(prefix + "LIMITS", raw_limits)
        for name, kind in _FIELDS.items():
            variable = prefix + name.upper()
            raw = env.get(variable)
            if raw is None:
                continue
            if kind is str:
                if name != "backend" or raw.strip():
                    values[name] = raw.strip() if name == "backend" else raw
                continue
            try:
                values[name] = kind(raw.strip())
            except ValueError:
                noun = "an integer" if kind is int else "a number"
                raise ConfigError(
                    f"{variable} must be {noun}, not {raw!r}", field=variable, value=raw
                ) from None
        try:
            return cls(**values)
        except ConfigError as exc:
            name = str(exc.field)
            variable = prefix + ("LIMITS" if name.startswith("limits") else name.upper())
            raise type(exc)(
                f"{variable}={env.get(variable)!r}: {exc}", field=variable, value=exc.value
            ) from exc


#: The environment variables `from_env` reads (after the prefix).
_VARIABLES = (
    "WORKERS",
    "QUEUE_SIZE",
    "SERVER_NAME",
    "LIMITS",
    "BACKEND",
    "NAMESPACE",
    "LEASE",
    "RESULT_TTL",
)
#: The fields `from_env` reads, and how their text converts (limits are apart).
_FIELDS: dict[str, Callable[[str], Any]] = {
    "workers": int,
    "queue_size": int,
    "server_name": str,
    "backend": str,
    "namespace": str,
    "lease": float,
    "result_ttl": float,
}
_SCHEMES = ("redis://", "rediss://", "unix://")


def check_limit(group: object, limit: object) -> None:
    """`set_limit`'s arguments: a non-empty group name (`TypeError`) and an int >= 1
    (`ValueError`)."""
    if not isinstance(group, str) or not group:
        raise TypeError(f"group must be a non-empty str, not {group!r}")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, not {limit!r}")


def _check_backend(backend: object) -> None:
    """None, a Redis URL (its scheme checked here), or something like a redis.Redis."""
    if backend is None:
        return
    if isinstance(backend, str):
        if not backend.startswith(_SCHEMES):
            raise ConfigError(
                f"backend must be a redis://, rediss:// or unix:// URL, not {backend!r}",
                field="backend",
                value=backend,
            )
        return
    if not callable(getattr(backend, "execute_command", None)):
        raise TypeError(f"backend must be a Redis URL or a redis.Redis client, not {backend!r}")


def _check_namespace(namespace: object) -> None:
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str, not {namespace!r}")
    if not namespace or any(c.isspace() or c in "{}" for c in namespace):
        raise ConfigError(
            f"namespace must be non-empty, without whitespace, '{{' or '}}', not {namespace!r}",
            field="namespace",
            value=namespace,
        )


def _check_seconds(name: str, value: object, minimum: float, *, inclusive: bool) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    seconds = float(value)
    low = seconds < minimum if inclusive else seconds <= minimum
    if not math.isfinite(seconds) or low:
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ConfigError(
            f"{name} must be a finite number of seconds {bound}, not {value!r}",
            field=name,
            value=value,
        )
    return seconds


def _parse_limits(variable: str, raw: str) -> dict[str, int]:
    """``"http=2, db=4"`` -> ``{"http": 2, "db": 4}``; an empty string is no limits."""
    limits: dict[str, int] = {}
    for part in raw.split(","):
        if not part.strip():
            continue
        group, sep, value = part.partition("=")
        try:
            if not sep or not group.strip():
                raise ValueError(part)
            limits[group.strip()] = int(value.strip())
        except ValueError:
            raise ConfigError(
                f"{variable} must look like 'http=2,db=4', not {raw!r}", field=variable, value=raw
            ) from None
    return limits

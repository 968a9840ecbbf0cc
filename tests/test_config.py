"""Config: defaults, validation, `from_env`, and overrides (marionette/config.py)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle
from typing import Any

import pytest
import structlog

from marionette import Config, ConfigError, NoServerName, NoWorkers, TaskManager

ENV_VARS = (
    "MARIONETTE_WORKERS",
    "MARIONETTE_QUEUE_SIZE",
    "MARIONETTE_SERVER_NAME",
    "MARIONETTE_LIMITS",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """`os.environ` without any MARIONETTE_ variable (restored after the test)."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


class FakeLogger:
    """Just enough of a structlog logger: the methods marionette calls."""

    def bind(self, **values: Any) -> FakeLogger:
        return self

    def debug(self, event: str, **values: Any) -> None: ...
    def info(self, event: str, **values: Any) -> None: ...
    def warning(self, event: str, **values: Any) -> None: ...
    def error(self, event: str, **values: Any) -> None: ...


# -- defaults and immutability ---------------------------------------------------------


def test_defaults() -> None:
    """`Config()` has 4 workers, a queue of 64, server name "marionette" and no logger."""
    config = Config()
    assert config.workers == 4
    assert config.queue_size == 64
    assert config.server_name == "marionette"
    assert config.logger is None


def test_config_is_frozen() -> None:
    """Assigning to a field of a `Config` raises `FrozenInstanceError`."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 8  # type: ignore[misc]
    assert config.workers == 4


def test_replace_validates_too() -> None:
    """`dataclasses.replace` goes through the same validation as construction."""
    assert dataclasses.replace(Config(), workers=2).workers == 2
    with pytest.raises(NoWorkers):
        dataclasses.replace(Config(), workers=0)


def test_valid_values_are_kept() -> None:
    """Valid values given to `Config` are kept as given."""
    config = Config(workers=1, queue_size=1, server_name="billing")
    assert (config.workers, config.queue_size, config.server_name) == (1, 1, "billing")


# -- validation: typed errors naming the field -------------------------------------------


@pytest.mark.parametrize("workers", [0, -1, -100])
def test_workers_below_one_raise_no_workers(workers: int) -> None:
    """`workers` < 1 raises `NoWorkers` naming the field."""
    with pytest.raises(NoWorkers, match="workers") as info:
        Config(workers=workers)
    assert info.value.field == "workers"
    assert info.value.value == workers


@pytest.mark.parametrize("size", [0, -1])
def test_queue_size_below_one_raises_config_error(size: int) -> None:
    """`queue_size` < 1 raises a `ConfigError` (not `NoWorkers`) naming the field."""
    with pytest.raises(ConfigError, match="queue_size") as info:
        Config(queue_size=size)
    assert not isinstance(info.value, (NoWorkers, NoServerName))
    assert info.value.field == "queue_size"


@pytest.mark.parametrize("name", ["", " ", "\t\n"])
def test_empty_or_blank_server_name_raises_no_server_name(name: str) -> None:
    """An empty or blank `server_name` raises `NoServerName` naming the field."""
    with pytest.raises(NoServerName, match="server_name") as info:
        Config(server_name=name)
    assert info.value.field == "server_name"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workers", "4"),
        ("workers", 4.0),
        ("workers", None),
        ("workers", True),
        ("queue_size", "64"),
        ("queue_size", 1.5),
        ("queue_size", False),
        ("server_name", None),
        ("server_name", 42),
        ("server_name", b"marionette"),
    ],
)
def test_wrong_types_raise_type_error_naming_the_field(field: str, value: object) -> None:
    """A value of the wrong type (a bool is not an int) raises `TypeError` naming the field."""
    with pytest.raises(TypeError, match=field):
        Config(**{field: value})


@pytest.mark.parametrize("logger", [object(), "marionette", 42])
def test_logger_without_the_methods_raises_type_error(logger: object) -> None:
    """A logger lacking the logging methods raises `TypeError` naming `logger`."""
    with pytest.raises(TypeError, match="logger"):
        Config(logger=logger)


def test_stdlib_logger_is_accepted() -> None:
    """A stdlib `logging.Logger` is an accepted logger."""
    stdlib = logging.getLogger("tests.config")
    assert Config(logger=stdlib).logger is stdlib


def test_structlog_loggers_are_accepted() -> None:
    """A structlog logger, or any object with its methods, is an accepted logger."""
    for logger in (structlog.get_logger(), structlog.wrap_logger(None), FakeLogger()):
        assert Config(logger=logger).logger is logger


# -- from_env -------------------------------------------------------------------------


def test_from_env_reads_the_three_variables() -> None:
    """`from_env` reads MARIONETTE_WORKERS, _QUEUE_SIZE and _SERVER_NAME from `environ`."""
    config = Config.from_env(
        environ={
            "MARIONETTE_WORKERS": "8",
            "MARIONETTE_QUEUE_SIZE": "128",
            "MARIONETTE_SERVER_NAME": "api-1",
        }
    )
    assert (config.workers, config.queue_size, config.server_name) == (8, 128, "api-1")


def test_from_env_unset_variables_keep_defaults() -> None:
    """Variables that are not set keep the field defaults."""
    assert Config.from_env(environ={}) == Config()
    assert Config.from_env(environ={"MARIONETTE_QUEUE_SIZE": "3"}) == Config(queue_size=3)


def test_from_env_ignores_surrounding_whitespace_in_numbers() -> None:
    """A number with surrounding whitespace (as in a .env file) is read."""
    assert Config.from_env(environ={"MARIONETTE_WORKERS": " 6\n"}).workers == 6


def test_from_env_reads_os_environ_at_call_time(clean_env: pytest.MonkeyPatch) -> None:
    """Without `environ`, `os.environ` is read when `from_env` is called, not before."""
    assert Config.from_env() == Config()
    clean_env.setenv("MARIONETTE_WORKERS", "7")
    clean_env.setenv("MARIONETTE_SERVER_NAME", "from-os")
    config = Config.from_env()
    assert config.workers == 7
    assert config.server_name == "from-os"
    clean_env.setenv("MARIONETTE_WORKERS", "3")
    assert Config.from_env().workers == 3


def test_from_env_with_environ_ignores_os_environ(clean_env: pytest.MonkeyPatch) -> None:
    """A passed `environ` is the only source: `os.environ` is not consulted."""
    clean_env.setenv("MARIONETTE_WORKERS", "9")
    assert Config.from_env(environ={}).workers == 4


def test_from_env_custom_prefix() -> None:
    """A custom prefix reads APP_WORKERS etc., and not the MARIONETTE_ variables."""
    environ = {
        "APP_WORKERS": "2",
        "APP_SERVER_NAME": "app",
        "MARIONETTE_WORKERS": "9",
        "MARIONETTE_QUEUE_SIZE": "5",
    }
    config = Config.from_env(prefix="APP_", environ=environ)
    assert (config.workers, config.queue_size, config.server_name) == (2, 64, "app")


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("MARIONETTE_WORKERS", "four"),
        ("MARIONETTE_WORKERS", ""),
        ("MARIONETTE_WORKERS", "2.5"),
        ("MARIONETTE_QUEUE_SIZE", "lots"),
        ("MARIONETTE_QUEUE_SIZE", "0x10"),
    ],
)
def test_from_env_malformed_value_raises_config_error_naming_the_variable(
    variable: str, raw: str
) -> None:
    """A value that is not an integer raises `ConfigError` naming the variable."""
    with pytest.raises(ConfigError, match=variable):
        Config.from_env(environ={variable: raw})


@pytest.mark.parametrize("raw", ["0", "-2"])
def test_from_env_zero_workers_raises_no_workers_naming_the_variable(raw: str) -> None:
    """MARIONETTE_WORKERS=0 raises `NoWorkers` whose message names the variable."""
    with pytest.raises(NoWorkers, match="MARIONETTE_WORKERS"):
        Config.from_env(environ={"MARIONETTE_WORKERS": raw})


def test_from_env_zero_queue_size_raises_config_error_naming_the_variable() -> None:
    """MARIONETTE_QUEUE_SIZE=0 raises `ConfigError` whose message names the variable."""
    with pytest.raises(ConfigError, match="MARIONETTE_QUEUE_SIZE") as info:
        Config.from_env(environ={"MARIONETTE_QUEUE_SIZE": "0"})
    assert not isinstance(info.value, NoWorkers)


def test_from_env_blank_server_name_raises_no_server_name_naming_the_variable() -> None:
    """An empty MARIONETTE_SERVER_NAME raises `NoServerName` naming the variable."""
    with pytest.raises(NoServerName, match="MARIONETTE_SERVER_NAME"):
        Config.from_env(environ={"MARIONETTE_SERVER_NAME": ""})
    with pytest.raises(NoServerName, match="MARIONETTE_SERVER_NAME"):
        Config.from_env(environ={"MARIONETTE_SERVER_NAME": "   "})


def test_from_env_custom_prefix_errors_name_the_prefixed_variable() -> None:
    """With a custom prefix, errors name the prefixed variable."""
    with pytest.raises(ConfigError, match="APP_QUEUE_SIZE"):
        Config.from_env(prefix="APP_", environ={"APP_QUEUE_SIZE": "x"})
    with pytest.raises(NoWorkers, match="APP_WORKERS"):
        Config.from_env(prefix="APP_", environ={"APP_WORKERS": "0"})


# -- limits (concurrency groups) --------------------------------------------------------


def test_limits_default_to_empty() -> None:
    """`Config().limits` is an empty mapping."""
    assert dict(Config().limits) == {}


def test_limits_are_a_read_only_copy() -> None:
    """`limits` is copied at construction and cannot be changed through the config."""
    given = {"http": 2, "db": 4}
    config = Config(limits=given)
    given["http"] = 100
    given["new"] = 1
    assert dict(config.limits) == {"http": 2, "db": 4}
    with pytest.raises(TypeError):
        config.limits["http"] = 3  # type: ignore[index]


def test_configs_with_limits_compare_and_hash() -> None:
    """Configs with equal limits are equal, and a config with limits is hashable."""
    assert Config(limits={"a": 1}) == Config(limits={"a": 1})
    assert Config(limits={"a": 1}) != Config(limits={"a": 2})
    assert isinstance(hash(Config(limits={"a": 1})), int)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_raises_config_error_naming_the_group(limit: int) -> None:
    """A group limit below 1 raises `ConfigError` naming the limits and the group."""
    with pytest.raises(ConfigError, match=r"limits.*http"):
        Config(limits={"http": limit})


@pytest.mark.parametrize("limits", [{"": 1}, {3: 1}, [("http", 2)], "http=2"])
def test_limits_of_the_wrong_type_raise_type_error(limits: object) -> None:
    """A non-mapping, or a non-str or empty group name, raises `TypeError`."""
    with pytest.raises(TypeError, match="limits"):
        Config(limits=limits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("http=2,db=4", {"http": 2, "db": 4}), (" http = 2 , db=4 ,", {"http": 2, "db": 4}), ("", {})],
)
def test_from_env_reads_limits(raw: str, expected: dict[str, int]) -> None:
    """`from_env` reads MARIONETTE_LIMITS="http=2,db=4"; an empty value means no limits."""
    assert dict(Config.from_env(environ={"MARIONETTE_LIMITS": raw}).limits) == expected


@pytest.mark.parametrize("raw", ["http", "http=", "=2", "http=two", "http=2;db=4", "http=0"])
def test_from_env_bad_limits_raise_config_error_naming_the_variable(raw: str) -> None:
    """A malformed or out-of-range MARIONETTE_LIMITS raises `ConfigError` naming it."""
    with pytest.raises(ConfigError, match="MARIONETTE_LIMITS"):
        Config.from_env(environ={"MARIONETTE_LIMITS": raw})


def test_config_can_be_deep_copied_and_pickled() -> None:
    """A `Config` without a logger survives `copy.deepcopy` and a pickle round trip."""
    config = Config(workers=2, limits={"http": 2})
    assert copy.deepcopy(config) == config
    assert pickle.loads(pickle.dumps(config)) == config


def test_config_can_be_shallow_copied() -> None:
    """`copy.copy` of a `Config` gives an equal config."""
    config = Config(workers=2, limits={"http": 2})
    assert copy.copy(config) == config


# -- TaskManager overrides --------------------------------------------------------------


def test_task_manager_overrides_replace_config_fields() -> None:
    """`TaskManager(workers=8)` sets that field; other fields come from `config`."""
    assert TaskManager(workers=8).config.workers == 8
    manager = TaskManager(Config(server_name="billing", queue_size=5), workers=2)
    assert manager.config == Config(server_name="billing", queue_size=5, workers=2)
    assert not manager.is_running()


def test_task_manager_without_arguments_uses_defaults() -> None:
    """`TaskManager()` uses the default `Config`."""
    assert TaskManager().config == Config()


def test_task_manager_unknown_override_raises_type_error() -> None:
    """An override that is not a `Config` field raises `TypeError` naming it."""
    with pytest.raises(TypeError, match="wokers"):
        TaskManager(wokers=8)


def test_task_manager_validates_overrides() -> None:
    """Overrides are validated like `Config` fields, with the same typed errors."""
    with pytest.raises(NoWorkers, match="workers"):
        TaskManager(workers=0)
    with pytest.raises(ConfigError, match="queue_size"):
        TaskManager(queue_size=0)
    with pytest.raises(NoServerName, match="server_name"):
        TaskManager(server_name="")
    with pytest.raises(TypeError, match="workers"):
        TaskManager(workers="8")


# -- part three: the backend fields ----------------------------------------------------


def test_backend_defaults_keep_everything_in_memory() -> None:
    """By default there is no backend, the namespace is "marionette", lease 10 s, one day."""
    config = Config()
    assert config.backend is None
    assert (config.namespace, config.lease, config.result_ttl) == ("marionette", 10.0, 86400.0)


@pytest.mark.parametrize(
    "url", ["redis://localhost:6380/0", "rediss://u:p@host/1", "unix:///tmp/redis.sock"]
)
def test_redis_urls_are_accepted(url: str) -> None:
    """redis://, rediss:// and unix:// URLs select Redis (checked for their scheme here)."""
    assert Config(backend=url).backend == url


@pytest.mark.parametrize("url", ["http://localhost", "localhost:6379", ""])
def test_other_backend_strings_raise_config_error_naming_the_field(url: str) -> None:
    """A backend string that is not a Redis URL raises ConfigError naming `backend`."""
    with pytest.raises(ConfigError) as caught:
        Config(backend=url)
    assert caught.value.field == "backend"


def test_a_backend_that_is_neither_url_nor_client_raises_type_error() -> None:
    """A backend object without execute_command (not a redis.Redis) raises TypeError."""
    with pytest.raises(TypeError, match="backend"):
        Config(backend=42)


def test_zero_workers_only_with_a_backend() -> None:
    """workers=0 (submit-only) is allowed on Redis; in memory it raises NoWorkers."""
    assert Config(workers=0, backend="redis://localhost").workers == 0
    with pytest.raises(NoWorkers):
        Config(workers=0)
    with pytest.raises(NoWorkers):
        Config(workers=-1, backend="redis://localhost")


@pytest.mark.parametrize("namespace", ["", "a b", "a{b", "b}", "tab\there"])
def test_bad_namespaces_raise_config_error(namespace: str) -> None:
    """A namespace that is empty or has whitespace or braces raises ConfigError."""
    with pytest.raises(ConfigError) as caught:
        Config(namespace=namespace)
    assert caught.value.field == "namespace"


@pytest.mark.parametrize(
    ("field", "value"),
    [("lease", 0.5), ("lease", float("nan")), ("result_ttl", 0), ("result_ttl", float("inf"))],
)
def test_lease_and_result_ttl_bounds(field: str, value: float) -> None:
    """lease below 1 s and result_ttl not above 0 (or not finite) raise ConfigError."""
    with pytest.raises(ConfigError) as caught:
        Config(**{field: value})
    assert caught.value.field == field


def test_from_env_reads_the_backend_fields() -> None:
    """MARIONETTE_BACKEND, _NAMESPACE, _LEASE and _RESULT_TTL are read; an empty backend is
    memory."""
    config = Config.from_env(
        environ={
            "MARIONETTE_BACKEND": "redis://localhost:6380/2",
            "MARIONETTE_NAMESPACE": "shop",
            "MARIONETTE_LEASE": "2.5",
            "MARIONETTE_RESULT_TTL": "60",
            "MARIONETTE_WORKERS": "0",
        }
    )
    assert (config.backend, config.namespace, config.lease, config.result_ttl) == (
        "redis://localhost:6380/2",
        "shop",
        2.5,
        60.0,
    )
    assert config.workers == 0
    assert Config.from_env(environ={"MARIONETTE_BACKEND": ""}).backend is None


def test_from_env_names_the_variable_of_a_bad_lease() -> None:
    """A malformed or out-of-range MARIONETTE_LEASE raises ConfigError naming it."""
    for raw in ("soon", "0.1"):
        with pytest.raises(ConfigError) as caught:
            Config.from_env(environ={"MARIONETTE_LEASE": raw})
        assert caught.value.field == "MARIONETTE_LEASE"

"""The demo and the command line: ``python -m marionette demo``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from marionette import __main__ as cli
from marionette import demo

ROOT = Path(__file__).resolve().parent.parent
#: Guard against a hung demo on a slow machine; the demo itself takes its duration.
TIMEOUT = 60


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m marionette *args`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "marionette", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_demo_runs_to_the_end_and_exits_0() -> None:
    """A short demo shows the retried task recovering and the broken one failing for good."""
    done = run_cli("demo", "--duration", "2")
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert "sync succeeded" in out
    assert "attempt=3" in out
    assert "task failed for good" in out
    assert "caught TaskError" in out
    assert "nightly export failed" in out
    assert "task manager stopped" in out
    assert "succeeded=7" in out
    assert "failed=1" in out
    assert "unfinished=0" in out


def test_no_command_prints_usage_and_exits_2() -> None:
    """Without a command, the usage goes to stderr and the exit status is 2."""
    done = run_cli()
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert "demo" in done.stderr


def test_help_lists_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --help`` describes the duration option and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--duration SECONDS" in capsys.readouterr().out


@pytest.mark.parametrize("duration", ["0", "-1", "nan", "inf", "soon"])
def test_bad_duration_is_a_usage_error(duration: str) -> None:
    """A duration that is not a positive finite number is rejected by the parser."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--duration", duration])
    assert exit_info.value.code == 2


def test_demo_in_process_stops_everything(capsys: pytest.CaptureFixture[str]) -> None:
    """Run in-process, the demo returns 0 and leaves no thread behind (see conftest)."""
    assert demo.run(0.5) == 0
    assert "demo finished" in capsys.readouterr().out


def test_demo_configures_no_global_logging() -> None:
    """Importing the demo and building its logger leave structlog unconfigured."""
    demo.console_logger().info("hello")
    assert not structlog.is_configured()

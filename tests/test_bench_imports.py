"""Every benchmark module imports against the current package: a renamed or removed name
the benchmarks use fails here, not on the next benchmark run."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("module", sorted(p.stem for p in BENCH.glob("*.py")))
def test_bench_module_imports(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    try:
        importlib.import_module(module)
    finally:
        sys.modules.pop(module, None)

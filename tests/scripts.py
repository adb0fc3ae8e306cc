"""Load a benchmark script (``benchmarks/*.py`` is not a package) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["ROOT", "load_benchmark"]

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(filename: str) -> ModuleType:
    """``benchmarks/<filename>`` as the module ``fxprune_bench_<stem>``.

    It is entered in ``sys.modules`` before it runs: dataclasses look their module up there.
    """
    name = f"fxprune_bench_{Path(filename).stem}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

"""The scripts in bench/ as modules, for the tests of their pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """``bench/<name>.py`` as a module. Some scripts put bench/ on ``sys.path`` to import their
    neighbours; that is undone here, or bench/kernels.py would shadow HF's ``kernels`` package, which
    transformers (>= 5.25) imports in the OLMoE parity tests that run later in the same session."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module

"""Shared helpers for the test suite."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ETT_PATH = Path(os.environ.get("VDN_ETT_PATH", ROOT.parent / "shared" / "data" / "ETT-small" / "ETTh1.csv"))


def assert_close(actual, expected, atol=1e-6, rtol=1e-6, msg=""):
    """Assert two tensors (or numbers) agree elementwise within ``atol + rtol * |expected|``."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)} {msg}"
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    assert bool((err <= tol).all()), f"max abs err {err.max().item():.3e} {msg}"


def requires_ett():
    """Skip marker for tests that read the shared ETTh1 file."""
    return pytest.mark.skipif(
        not ETT_PATH.exists(),
        reason=f"ETTh1 not found at {ETT_PATH}; set VDN_ETT_PATH to its location",
    )


def load_script(path, name=None):
    """Import a script (an example or a benchmark) as a module named ``name`` (default: the file
    stem) and register it in ``sys.modules``, where worker processes and pickle look for it."""
    path = Path(path)
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

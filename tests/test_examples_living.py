"""Smoke tests of the living-neuron studies: each example runs end to end with ``--tiny``."""

import math

import pandas as pd
import pytest
import torch

from tests.common import ROOT, load_script


def load_example(name):
    """Import ``examples/<name>.py`` as a module."""
    return load_script(ROOT / "examples" / f"{name}.py", f"example_{name}")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The examples set torch's thread count; put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_collapse_study_tiny(tmp_path):
    module = load_example("collapse_study")
    table = module.main(module.parse_args(["--tiny", "--out", str(tmp_path)]))
    for name in ("collapse.csv", "collapse.png", "monitor.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = pd.read_csv(tmp_path / "collapse.csv")
    assert len(saved) == len(table) == 3 * 2
    assert set(saved.controller) == {"fixed", "klband"}
    for column in ("fraction_living", "total_kl", "val_nll"):
        assert saved[column].notna().all(), column
    monitor = pd.read_csv(tmp_path / "monitor.csv")
    assert {"global_beta", "controller", "step", "status", "kl"} <= set(monitor.columns)


def test_collapse_study_default_sweep_spans_the_range():
    module = load_example("collapse_study")
    args = module.parse_args([])
    assert len(args.betas) >= 6 and min(args.betas) <= 1e-4 and max(args.betas) >= 10


def test_granularity_tiny(tmp_path):
    module = load_example("granularity")
    summary = module.main(module.parse_args(["--tiny", "--out", str(tmp_path)]))
    for name in ("granularity.csv", "granularity_summary.csv", "granularity.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert summary.config.tolist() == ["unit", "layer", "global", "deterministic"]
    assert (summary.seeds == 2).all()
    assert summary.val_nll_mean.notna().all() and summary.val_mse_mean.notna().all()
    twin = summary[summary.config == "deterministic"].iloc[0]
    assert math.isnan(twin.fraction_living_mean)
    per_seed = pd.read_csv(tmp_path / "granularity.csv")
    assert len(per_seed) == 4 * 2

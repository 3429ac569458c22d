"""``benchmarks/skip_candidates.py``: its baseline family is the harness's skip path, and its two
new families reduce to known fits at their limits."""

import pandas as pd
import pytest
import torch

from tests.common import assert_close
from tests.test_forecast_benchmark import load, synthetic_csv
from vdn_pyro.data import load_csv
from vdn_pyro.data.protocol import protocol_splits
from vdn_pyro.forecasting import fit_least_squares
from vdn_pyro.models import DLinear

L, H = 48, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = synthetic_csv(tmp_path_factory.mktemp("skip") / "series.csv", 1200, ["a", "b", "c"], "h")
    return load("skip_candidates"), path, protocol_splits(load_csv(path), L, H, "long_horizon")


def test_the_full_look_back_family_is_the_harness_skip_path(setup):
    module, _, splits = setup
    found = module.candidates(splits)
    fit = fit_least_squares(DLinear(L, H), splits)
    ridge, val, _ = found[f"shared, L' = {L}"]
    assert ridge == fit["ridge"]
    assert_close(torch.tensor(val), torch.tensor(fit["val_mse"]), rtol=1e-5, atol=0)


def test_a_large_penalty_towards_the_last_value_repeats_it(setup):
    module, _, splits = setup
    x, y = splits.windows("train")
    d = module.design(x, L)
    towards = torch.zeros(L + 1, H, dtype=torch.float64)
    towards[L - 1] = 1.0
    solution = module.ridge_solve(d.T @ d, d.T @ y.double(), d.shape[0], 1e8, towards)  # (L + 1, H)
    xv, _ = splits.windows("val")
    forecast = module.design(xv, L) @ solution  # (N, H)
    repeat = xv[:, -1:].double().expand_as(forecast)
    # the bias is not penalised: it absorbs the mean residual of repeating the last value
    assert_close(forecast - forecast.mean(0), repeat - repeat.mean(0), atol=1e-4, rtol=0)


def test_one_map_per_channel_of_a_single_channel_series_is_the_shared_map(tmp_path):
    module = load("skip_candidates")
    path = synthetic_csv(tmp_path / "one.csv", 1200, ["a"], "h")
    found = module.candidates(protocol_splits(load_csv(path), L, H, "long_horizon"))
    shared, single = found[f"shared, L' = {L}"], found["per channel"]
    assert shared[0] == single[0]
    assert_close(torch.tensor(shared[1:]), torch.tensor(single[1:]), rtol=1e-9, atol=0)


def test_the_script_writes_its_table_and_refuses_a_missing_file(setup, tmp_path, capsys):
    module, path, _ = setup
    argv = ["--data", str(path), "--lookback", str(L), "--horizons", str(H), "--out-dir", str(tmp_path)]
    frame = module.main(argv)
    assert set(frame.family) == {"shared, L' = 48", "shrunk to last value", "per channel"}
    written = pd.read_csv(tmp_path / "skip_candidates.csv")
    assert len(written) == len(frame) and (tmp_path / "skip_candidates.md").is_file()
    with pytest.raises(SystemExit) as stop:
        module.main(["--data", str(tmp_path / "absent.csv"), "--out-dir", str(tmp_path / "none")])
    assert stop.value.code == 2 and "expected a CSV" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()

"""The exact reference of ``benchmarks/path_calibration.py``: its Kalman oracle is the exact
Gaussian predictive of the state-space model, checked against dense Gaussian conditioning."""

import math
import subprocess
import sys

import pandas as pd
import pytest
import torch

from tests.common import ROOT, assert_close
from tests.test_forecast_benchmark import load
from vdn_pyro.data import ratio_splits
from vdn_pyro.forecasting import evaluate_forecaster

PHI, Q, R, L, H = 0.9, 0.5, 0.7, 12, 6


def dense_predictive(x_raw):
    """Mean ``(B, H)`` and covariance ``(H, H)`` of the next H observations given the L of each
    window ``(B, L)`` (raw units), by conditioning the joint Gaussian of all L + H of them."""
    n = L + H
    t = torch.arange(n, dtype=torch.float64)
    level = Q**2 / (1 - PHI**2) * PHI ** (t[:, None] - t[None, :]).abs()  # stationary AR(1)
    joint = level + R**2 * torch.eye(n, dtype=torch.float64)
    past, future = slice(0, L), slice(L, n)
    gain = torch.linalg.solve(joint[past, past], joint[past, future]).T  # (H, L)
    return x_raw @ gain.T, joint[future, future] - gain @ joint[past, future]


def test_oracle_is_the_exact_gaussian_predictive():
    module = load("path_calibration")
    values = module.simulate(400, PHI, Q, R, seed=0)
    assert values.shape == (400, 1)
    splits = ratio_splits(values, L, H)
    oracle = module.Oracle(splits, PHI, Q, R)
    x, _ = splits.windows("test")
    loc, unit = splits.scaler.loc[0], splits.scaler.scale[0]
    mean, cov = dense_predictive(x.double() * unit + loc)
    assert_close(oracle.cov, cov / unit**2, rtol=1e-10, atol=1e-12)
    torch.manual_seed(0)
    pred = oracle.predict(x, num_samples=20000)
    assert_close(pred.mean.double(), ((mean - loc) / unit).to(x.dtype).double(), rtol=1e-5, atol=1e-5)
    draws = pred.samples[:, 0].double()  # (S, H): the first window's paths
    assert_close(
        torch.cov(draws.T), cov / unit**2, atol=5 * math.sqrt(2 / 20000) * float(cov.max() / unit**2)
    )
    # a duck-typed predictor (no torch module) is scored like a model
    scores = evaluate_forecaster(oracle, x, splits.windows("test")[1], num_samples=50, paths=True)
    assert 0 < scores["crps"] < 2 and 0 < scores["coverage_90_sum"] <= 1


@pytest.mark.parametrize("bad, word", [(["--phi", "1.5"], "phi"), (["--train-draws", "0"], "train-draws")])
def test_bad_options_are_refused_in_one_line(tmp_path, bad, word):
    script = ROOT / "benchmarks" / "path_calibration.py"
    done = subprocess.run(
        [sys.executable, str(script), *bad, "--out-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and word in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_recalibrated_roll_out_reuses_the_trained_one(tmp_path):
    module = load("path_calibration")
    argv = ["--seeds", "0", "--models", "rollout", "rollout_cal", "--rows", "1500", "--lookback", "24"]
    argv += ["--horizon", "8", "--patch", "4", "--units", "4", "--epochs", "1", "--samples", "8"]
    argv += ["--out-dir", str(tmp_path)]
    module.main(module.parse_args(argv))
    runs = pd.read_csv(tmp_path / "path_calibration_runs.csv").set_index("model")
    assert runs.loc["rollout_cal", "mse"] == runs.loc["rollout", "mse"]  # the same trained network
    assert runs.loc["rollout_cal", "path_factor"] > 0 and runs.loc["rollout_cal", "noise_factor"] > 0
    assert runs[["path_factor"]].loc[["rollout"]].isna().all().all()

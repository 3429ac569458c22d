import math

import numpy as np
import pytest
import torch

from tests.common import assert_close
from vdn_pyro.metrics import (
    crps_gaussian,
    crps_samples,
    forecast_metrics,
    gaussian_interval,
    gaussian_interval_coverage,
    gaussian_interval_width,
    gaussian_nll,
    interval_coverage,
    interval_width,
    mae,
    mse,
    sample_interval,
)

sr = pytest.importorskip("scoringrules")

Z90 = 1.6448536269514722  # standard normal quantile at 0.95


def test_mse_mae_hand_values():
    pred = torch.tensor([1.0, 2.0, 3.0])
    y = np.array([1.0, 0.0, 5.0])  # errors 0, 2, -2
    out = mse(pred, y)
    assert out.dim() == 0
    assert out.dtype == torch.float64  # float32 and float64 inputs promote
    assert_close(out, 8 / 3)
    assert_close(mae(pred, y), 4 / 3)
    assert_close(mse(pred, y, reduction="sum"), 8.0)
    assert_close(mae(pred, y, reduction="none"), [0.0, 2.0, 2.0])
    assert_close(mse([[1, 2]], [[1, 1]]), 0.5)  # integer lists become floats


def test_shape_errors():
    with pytest.raises(ValueError, match=r"mse: expected pred of the shape of y \(3,\) but got \(2,\)"):
        mse(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"samples of shape \(S,\) \+ y.shape = \(S, 2, 3\).*\(5, 3, 2\)"):
        crps_samples(torch.zeros(5, 3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"scale broadcastable to the shape of y \(4,\) but got \(3,\)"):
        crps_gaussian(torch.zeros(4), torch.ones(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"loc broadcastable.*\(2, 4\)"):
        gaussian_nll(torch.zeros(2, 4), torch.ones(()), torch.zeros(4))


def test_bad_reduction_and_scale():
    with pytest.raises(ValueError, match=r"reduction in \('mean', 'sum', 'none'\) but got 'max'"):
        mae(torch.zeros(2), torch.zeros(2), reduction="max")
    with pytest.raises(ValueError, match="scale > 0 but got min scale 0"):
        crps_gaussian(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2))
    with pytest.raises(TypeError, match="tensor or numeric array"):
        mse(["a", "b"], torch.zeros(2))


def test_crps_gaussian_hand_value():
    # at y = loc: scale * (2 * phi(0) - 1 / sqrt(pi))
    expected = 2.0 * (2 / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi))
    assert_close(crps_gaussian(1.0, 2.0, torch.tensor(1.0)), expected)


def test_crps_gaussian_against_scoringrules():
    rng = np.random.default_rng(0)
    loc, scale, y = rng.normal(size=50), rng.uniform(0.1, 3.0, size=50), rng.normal(size=50) * 2
    expected = sr.crps_normal(y, loc, scale)
    assert_close(crps_gaussian(loc, scale, y, reduction="none"), expected, atol=1e-10)
    assert_close(crps_gaussian(loc, scale, y), expected.mean(), atol=1e-10)


def test_crps_samples_hand_values():
    samples = torch.tensor([[0.0], [1.0]])  # (S=2, 1)
    y = torch.tensor([0.0])
    # E|X - y| = 0.5; sum over ordered pairs of |x_i - x_j| = 2
    assert_close(crps_samples(samples, y, fair=False), 0.5 - 0.5 * 2 / 4)
    assert_close(crps_samples(samples, y, fair=True), 0.5 - 0.5 * 2 / 2)
    # one sample: the empirical CRPS is the absolute error
    assert_close(crps_samples(torch.tensor([[3.0]]), torch.tensor([1.0]), fair=False), 2.0)
    with pytest.raises(ValueError, match="at least 2 samples; pass fair=False"):
        crps_samples(torch.tensor([[3.0]]), torch.tensor([1.0]))


@pytest.mark.parametrize("fair,estimator", [(True, "fair"), (False, "nrg")], ids=["fair", "plain"])
def test_crps_samples_against_scoringrules(fair, estimator):
    rng = np.random.default_rng(1)
    samples = rng.normal(size=(37, 4, 5)) * rng.uniform(0.5, 2, size=(4, 5))
    y = rng.normal(size=(4, 5))
    expected = sr.crps_ensemble(y, samples, m_axis=0, estimator=estimator)  # (4, 5)
    assert_close(crps_samples(samples, y, fair=fair, reduction="none"), expected, atol=1e-10)
    assert_close(crps_samples(samples, y, fair=fair), expected.mean(), atol=1e-10)


def test_crps_samples_approaches_gaussian():
    torch.manual_seed(0)
    loc, scale = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 2.0])
    y = torch.tensor([0.3, 2.0, -2.5])
    samples = loc + scale * torch.randn(20000, 3, dtype=torch.float64)
    exact = crps_gaussian(loc, scale, y, reduction="none")
    assert_close(crps_samples(samples, y, reduction="none"), exact, atol=0.02)


def test_gaussian_nll():
    assert_close(gaussian_nll(0.0, 1.0, torch.tensor(0.0)), 0.5 * math.log(2 * math.pi))
    loc, scale, y = torch.randn(10), torch.rand(10) + 0.1, torch.randn(10)
    expected = -torch.distributions.Normal(loc, scale).log_prob(y)
    assert_close(gaussian_nll(loc, scale, y, reduction="none"), expected, atol=1e-5)


def test_sample_interval_known_quantiles():
    samples = torch.arange(101.0)[:, None].expand(101, 5)  # (S=101, 5): quantile q is 100 q
    y = torch.tensor([4.9, 5.0, 50.0, 95.0, 95.1])
    lower, upper = sample_interval(samples, 0.9)
    assert_close(lower, torch.full((5,), 5.0), atol=1e-5)
    assert_close(upper, torch.full((5,), 95.0), atol=1e-5)
    assert_close(interval_coverage(samples, y, 0.9, reduction="none"), [0.0, 1.0, 1.0, 1.0, 0.0])
    assert_close(interval_coverage(samples, y, 0.9), 0.6)
    assert_close(interval_coverage(samples, y, 0.5), 0.2)  # only 50.0 in [25, 75]
    assert_close(interval_width(samples, 0.9), 90.0, atol=1e-4)
    assert_close(interval_width(samples, 0.5), 50.0, atol=1e-4)


def test_sample_interval_matches_numpy_quantile():
    samples = np.random.default_rng(2).normal(size=(13, 6))
    lower, upper = sample_interval(samples, 0.8)
    assert_close(lower, np.quantile(samples, 0.1, axis=0), atol=1e-12)
    assert_close(upper, np.quantile(samples, 0.9, axis=0), atol=1e-12)


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_coverage_of_calibrated_forecasts(level):
    torch.manual_seed(0)
    y = torch.randn(4000)
    samples = torch.randn(200, 4000)
    # binomial standard error sqrt(0.25 / 4000) < 0.008
    assert abs(interval_coverage(samples, y, level).item() - level) < 0.03
    assert abs(gaussian_interval_coverage(torch.zeros(4000), 1.0, y, level).item() - level) < 0.03


def test_gaussian_interval():
    lower, upper = gaussian_interval(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5]), 0.9)
    assert_close(lower, [1.0 - 2.0 * Z90, -1.0 - 0.5 * Z90])
    assert_close(upper, [1.0 + 2.0 * Z90, -1.0 + 0.5 * Z90])
    assert_close(gaussian_interval_width(torch.tensor([2.0, 0.5]), 0.9), 2 * Z90 * 1.25)
    lower, upper = gaussian_interval(0.0, 1.0, 0.5)
    assert_close(upper, 0.6744897501960817)


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5], ids=["zero", "one", "negative"])
def test_bad_level(level):
    with pytest.raises(ValueError, match="0 < level < 1"):
        interval_coverage(torch.zeros(3, 2), torch.zeros(2), level)


def test_interval_width_takes_no_y():
    with pytest.raises(TypeError, match="interval_width takes no y"):
        interval_width(torch.zeros(3, 2), torch.zeros(2), 0.9)


def test_forecast_metrics_gaussian():
    loc, scale, y = torch.randn(6, 4), torch.rand(6, 4) + 0.5, torch.randn(6, 4)
    out = forecast_metrics(loc=loc, scale=scale, y=y)
    assert list(out) == [
        "mse",
        "mae",
        "crps",
        "nll",
        "coverage_50",
        "width_50",
        "coverage_90",
        "width_90",
    ]
    assert all(isinstance(v, float) for v in out.values())
    assert_close(out["mse"], mse(loc, y))
    assert_close(out["crps"], crps_gaussian(loc, scale, y))
    assert_close(out["nll"], gaussian_nll(loc, scale, y))
    assert_close(out["coverage_90"], gaussian_interval_coverage(loc, scale, y, 0.9))
    assert_close(out["width_90"], 2 * Z90 * scale.mean(), atol=1e-5)


def test_forecast_metrics_samples():
    samples, y = torch.randn(50, 6, 4), torch.randn(6, 4)
    out = forecast_metrics(samples, y=y)
    assert "nll" not in out
    assert_close(out["mae"], mae(samples.mean(0), y))
    assert_close(out["crps"], crps_samples(samples, y))
    assert_close(out["coverage_50"], interval_coverage(samples, y, 0.5))
    assert_close(out["width_50"], interval_width(samples, 0.5))
    plain = forecast_metrics(samples, y=y, fair=False)
    assert_close(plain["crps"], crps_samples(samples, y, fair=False))
    assert plain["crps"] > out["crps"]
    # loc and scale next to samples: loc is the point forecast, samples give the CRPS
    loc, scale = torch.zeros(6, 4), torch.ones(())
    both = forecast_metrics(samples, loc, scale, y=y)
    assert_close(both["mse"], mse(loc, y))
    assert_close(both["crps"], out["crps"])
    assert_close(both["nll"], gaussian_nll(loc, scale, y))


def test_forecast_metrics_errors():
    with pytest.raises(ValueError, match="samples, or loc and scale"):
        forecast_metrics(loc=torch.zeros(3), y=torch.zeros(3))
    with pytest.raises(ValueError, match="scale without loc"):
        forecast_metrics(torch.zeros(4, 3), scale=torch.ones(3), y=torch.zeros(3))
    with pytest.raises(ValueError, match=r"samples of shape.*\(S, 3\)"):
        forecast_metrics(torch.zeros(4, 2), y=torch.zeros(3))

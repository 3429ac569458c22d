import math

import numpy as np
import pytest
import torch

from tests.common import assert_close
from vdn_pyro import metrics
from vdn_pyro.metrics import (
    crps_gaussian,
    crps_samples,
    crps_sum,
    energy_score,
    forecast_metrics,
    gaussian_interval,
    gaussian_interval_coverage,
    gaussian_interval_width,
    gaussian_nll,
    interval_coverage,
    interval_width,
    mae,
    mse,
    path_metrics,
    sample_interval,
    sum_coverage,
    sum_interval,
    sum_interval_width,
    variogram_score,
)

sr = pytest.importorskip("scoringrules")

Z90 = 1.6448536269514722  # standard normal quantile at 0.95
_INV_SQRT_PI = 1 / math.sqrt(math.pi)  # CRPS of N(0, 1) averaged over N(0, 1) observations


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


# ---- scores that see paths: samples (S,) + B + (H,), y B + (H,), one score per window ----

ESTIMATORS = [(True, "fair"), (False, "nrg")]


def _random_paths(seed, num_samples=23, batch=(4, 3), horizon=9, level=0.0):
    """Correlated random paths (a random walk plus noise) with per-window level and scale."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=batch + (1,))
    steps = rng.normal(size=(num_samples,) + batch + (horizon,))
    samples = level + scale * (np.cumsum(steps, -1) + rng.normal(size=steps.shape))
    y = level + scale * np.cumsum(rng.normal(size=batch + (horizon,)), -1)
    return samples, y


def _sr_paths(samples):
    """Our (S,) + B + (H,) ensemble in scoringrules' layout B + (S, H)."""
    return np.moveaxis(samples, 0, -2)


@pytest.mark.parametrize("fair,estimator", ESTIMATORS, ids=["fair", "plain"])
def test_energy_score_against_scoringrules(fair, estimator):
    samples, y = _random_paths(3)
    expected = sr.es_ensemble(y, _sr_paths(samples), estimator=estimator)  # (4, 3)
    out = energy_score(samples, y, fair=fair, reduction="none")
    assert out.shape == (4, 3) and out.dtype == torch.float64
    assert_close(out, expected, atol=1e-10, rtol=0)
    assert_close(energy_score(samples, y, fair=fair), expected.mean(), atol=1e-10, rtol=0)
    assert_close(energy_score(samples, y, fair=fair, reduction="sum"), expected.sum(), atol=1e-9, rtol=0)
    # a common level far above the spread: the centred Gram form keeps full accuracy
    high, y_high = _random_paths(3, level=1e4)
    expected = sr.es_ensemble(y_high, _sr_paths(high), estimator=estimator)
    assert_close(energy_score(high, y_high, fair=fair, reduction="none"), expected, atol=1e-8, rtol=0)


def test_energy_score_hand_values():
    # S identical paths: no spread, the score is the Euclidean error, exactly, also in float32
    path = torch.tensor([1.0, -2.0, 0.5, 3.0])
    samples = path.expand(5, 2, 4)  # (S=5, B=2, H=4)
    y = torch.stack([path, path + torch.tensor([3.0, 4.0, 0.0, 0.0])])  # (B, H)
    for fair in (True, False):
        out = energy_score(samples, y, fair=fair, reduction="none")
        assert out.dtype == torch.float32
        assert torch.equal(out, torch.tensor([0.0, 5.0]))
    # H = 1: the energy score is the CRPS
    rng = np.random.default_rng(4)
    draws, obs = rng.normal(size=(17, 6, 1)), rng.normal(size=(6, 1))
    assert_close(
        energy_score(draws, obs, reduction="none"),
        crps_samples(draws[..., 0], obs[:, 0], reduction="none"),
        atol=1e-12,
    )
    # one window given as a bare path: y (H,), samples (S, H), one score of shape ()
    paths, path = _random_paths(4, batch=())
    out = energy_score(paths, path, reduction="none")
    assert out.shape == ()
    assert_close(out, sr.es_ensemble(path, paths, estimator="fair"), atol=1e-10, rtol=0)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0], ids=["p0.5", "p1", "p2"])
@pytest.mark.parametrize("fair,estimator", ESTIMATORS, ids=["fair", "plain"])
def test_variogram_score_against_scoringrules(p, fair, estimator):
    samples, y = _random_paths(5, num_samples=11, horizon=7)
    expected = sr.vs_ensemble(y, _sr_paths(samples), p=p, estimator=estimator)  # (4, 3)
    out = variogram_score(samples, y, p=p, fair=fair, reduction="none")
    assert out.shape == (4, 3)
    assert_close(out, expected, atol=1e-9, rtol=1e-12)
    assert_close(variogram_score(samples, y, p=p, fair=fair), expected.mean(), atol=1e-9, rtol=1e-12)


def test_variogram_score_sees_increments_only():
    samples, y = _random_paths(6, num_samples=8, horizon=5)
    shifted = variogram_score(samples + 7.0, y - 3.0, reduction="none")
    assert_close(shifted, variogram_score(samples, y, reduction="none"), atol=1e-10)
    assert_close(variogram_score(samples[..., :1], y[..., :1]), 0.0)  # H = 1: no pairs


@pytest.mark.parametrize("fair,estimator", ESTIMATORS, ids=["fair", "plain"])
def test_crps_sum_against_scoringrules(fair, estimator):
    samples, y = _random_paths(7)
    expected = sr.crps_ensemble(y.sum(-1), samples.sum(-1), m_axis=0, estimator=estimator)  # (4, 3)
    assert_close(crps_sum(samples, y, fair=fair, reduction="none"), expected, atol=1e-10, rtol=0)
    assert_close(crps_sum(samples, y, fair=fair), expected.mean(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_sum_interval_against_numpy(level):
    samples, y = _random_paths(8, num_samples=41, batch=(300,))
    sums, y_sum = samples.sum(-1), y.sum(-1)  # (S, B), (B,)
    lower, upper = np.quantile(sums, (1 - level) / 2, axis=0), np.quantile(sums, (1 + level) / 2, axis=0)
    interval = sum_interval(samples, level)
    assert_close(interval.lower, lower, atol=1e-10)
    assert_close(interval.upper, upper, atol=1e-10)
    inside = ((lower <= y_sum) & (y_sum <= upper)).astype(float)
    assert 0 < inside.mean() < 1  # the data exercise both outcomes
    assert_close(sum_coverage(samples, y, level, reduction="none"), inside)
    assert_close(sum_coverage(samples, y, level), inside.mean())
    assert_close(sum_interval_width(samples, level, reduction="none"), upper - lower, atol=1e-10)
    assert_close(sum_interval_width(samples, level), (upper - lower).mean(), atol=1e-10)


def test_path_scores_chunked_equal_unchunked(monkeypatch):
    samples, y = _random_paths(9, num_samples=6, batch=(5, 2), horizon=4)
    whole = {
        "energy": energy_score(samples, y, reduction="none"),
        "variogram": variogram_score(samples, y, reduction="none"),
    }
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 30)  # one window a chunk
    assert_close(energy_score(samples, y, reduction="none"), whole["energy"], atol=1e-12)
    assert_close(variogram_score(samples, y, reduction="none"), whole["variogram"], atol=1e-12)


def test_path_scores_see_cross_step_dependence():
    """Two forecasters with the same N(0, 1) marginals, scored on perfectly correlated truths
    (one shock per window held over the horizon): steps drawn independently, or one shared shock
    per path. The marginal CRPS cannot tell them apart; the path scores prefer the shared shock."""
    gen = torch.Generator().manual_seed(0)
    num_samples, num_windows, horizon = 100, 400, 24
    y = torch.randn(num_windows, 1, generator=gen, dtype=torch.float64).expand(num_windows, horizon)
    independent = torch.randn(num_samples, num_windows, horizon, generator=gen, dtype=torch.float64)
    shared = torch.randn(num_samples, num_windows, 1, generator=gen, dtype=torch.float64)
    shared = shared.expand(num_samples, num_windows, horizon)  # (S, B, H)

    def z_score(score):
        """Mean per-window difference (independent - shared) over its standard error."""
        diff = score(independent) - score(shared)  # (B,)
        return (diff.mean() / (diff.std() / math.sqrt(num_windows))).item()

    marginal = lambda x: crps_samples(x, y, reduction="none").mean(-1)  # (B,)
    # equal within Monte Carlo error, and both at the exact CRPS of N(0, 1) against N(0, 1) truths
    assert abs(z_score(marginal)) < 4
    for forecast in (independent, shared):
        per_window = marginal(forecast)
        assert abs(per_window.mean().item() - _INV_SQRT_PI) < 4 * per_window.std().item() / math.sqrt(
            num_windows
        )
    assert z_score(lambda x: energy_score(x, y, reduction="none")) > 8
    assert z_score(lambda x: crps_sum(x, y, reduction="none")) > 8
    assert z_score(lambda x: variogram_score(x, y, reduction="none")) > 8
    # the 90% interval of the sum holds about 0.9 (S - 1) / (S + 1) for the shared shock only
    assert abs(sum_coverage(shared, y, 0.9).item() - 0.9 * 99 / 101) < 0.05
    assert sum_coverage(independent, y, 0.9).item() < 0.4


def test_path_metrics_and_forecast_metrics_paths():
    samples, y = _random_paths(10, num_samples=30, batch=(6, 2), horizon=5)
    out = path_metrics(samples, y)
    assert list(out) == [
        "energy",
        "crps_sum",
        "coverage_50_sum",
        "width_50_sum",
        "coverage_90_sum",
        "width_90_sum",
    ]
    assert all(isinstance(v, float) for v in out.values())
    assert_close(out["energy"], energy_score(samples, y))
    assert_close(out["crps_sum"], crps_sum(samples, y))
    assert_close(out["coverage_90_sum"], sum_coverage(samples, y, 0.9))
    assert_close(out["width_50_sum"], sum_interval_width(samples, 0.5))
    plain = path_metrics(samples, y, fair=False, variogram=True)
    assert_close(plain["energy"], energy_score(samples, y, fair=False))
    assert_close(plain["variogram"], variogram_score(samples, y, fair=False))
    # forecast_metrics: the marginal keys and values are unchanged, the path keys follow
    before = forecast_metrics(samples, y=y)
    after = forecast_metrics(samples, y=y, paths=True)
    assert list(after) == list(before) + list(out)
    assert {k: after[k] for k in before} == before
    assert {k: after[k] for k in out} == out
    loc, scale = samples.mean(0), samples.std(0)
    both = forecast_metrics(samples, loc, scale, y=y, paths=True)
    assert both["nll"] == forecast_metrics(samples, loc, scale, y=y)["nll"]
    assert both["energy"] == out["energy"]
    with pytest.raises(ValueError, match="paths=True needs joint sample paths"):
        forecast_metrics(loc=loc, scale=scale, y=y, paths=True)


def test_path_score_errors():
    samples, y = torch.zeros(4, 3, 5), torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"energy_score: expected samples of shape \(S,\) \+ y.shape"):
        energy_score(torch.zeros(4, 5, 3), y)
    with pytest.raises(ValueError, match=r"crps_sum: expected y of shape B \+ \(H,\).*got \(\)"):
        crps_sum(torch.zeros(4), torch.tensor(0.0))
    bad = samples.clone()
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="energy_score: expected finite samples but got 1 NaN"):
        energy_score(bad, y)
    with pytest.raises(
        ValueError, match="crps_sum: expected finite y but got 6 NaN or infinite values of 15"
    ):
        crps_sum(samples, torch.tensor([[math.inf, -math.inf, 0, 0, 0]]).expand(3, 5))
    with pytest.raises(ValueError, match="fair=True needs at least 2 samples but got 1; pass fair=False"):
        energy_score(samples[:1], y)
    assert_close(energy_score(samples[:1], y, fair=False), 0.0)
    with pytest.raises(ValueError, match="expected an order p > 0"):
        variogram_score(samples, y, p=0)
    with pytest.raises(
        ValueError, match=r"sum_interval_width: expected samples of shape \(S,\) \+ B \+ \(H,\)"
    ):
        sum_interval_width(torch.zeros(4), 0.9)
    with pytest.raises(ValueError, match="0 < level < 1"):
        sum_coverage(samples, y, 1.5)
    with pytest.raises(TypeError, match="path_metrics: expected y to be a tensor or numeric array"):
        path_metrics(samples, y=object())

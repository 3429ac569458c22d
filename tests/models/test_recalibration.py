"""SpreadRecalibration: the base forecast's parts rescaled exactly, the factors of a known
mis-scaled Gaussian path model recovered, flat windows left out, the caller's random stream
untouched, bad input refused."""

import pytest
import torch

from vdn_pyro.metrics import crps_samples
from vdn_pyro.models import ForecastPrediction, RolloutConfig, RolloutForecaster, SpreadRecalibration


class ShiftedPaths:
    """A Monte Carlo forecaster of known law: mean 0, each draw a path shifted by one level
    ``N(0, level^2)`` shared by its H steps, plus independent ``N(0, noise^2)`` per step."""

    def __init__(self, horizon, level=1.0, noise=1.0):
        self.horizon, self.level, self.noise = horizon, level, noise

    def predict(self, x, num_samples=100, batch_size=None):
        shape = (num_samples, x.shape[0], self.horizon)
        loc = (self.level * torch.randn(shape[:2] + (1,))).expand(shape)  # (S, B, H)
        scale = torch.full(shape, self.noise)
        return ForecastPrediction(loc + scale * torch.randn(shape), loc, scale, torch.zeros(shape[1:]))


class OneGaussian(ShiftedPaths):
    def predict(self, x, num_samples=100, batch_size=None):
        loc = torch.zeros(1, x.shape[0], self.horizon)
        samples = torch.randn((num_samples,) + loc.shape[1:])  # (S, B, H)
        return ForecastPrediction(samples, loc, torch.ones_like(loc), loc[0])


def test_predict_rescales_the_base_parts_exactly():
    base = ShiftedPaths(horizon=6, level=0.7, noise=0.3)
    x = torch.randn(5, 12)
    torch.manual_seed(3)
    ref = base.predict(x, 40)
    torch.manual_seed(3)
    same = SpreadRecalibration(base).predict(x, 40)  # a = b = 1: the base forecast itself
    for field in ("samples", "loc", "scale", "point"):
        assert torch.equal(getattr(same, field), getattr(ref, field))
    torch.manual_seed(3)
    pred = SpreadRecalibration(base, path_factor=2.0, noise_factor=0.5).predict(x, 40)
    torch.testing.assert_close(pred.loc, 2.0 * ref.loc)  # the mean is 0
    torch.testing.assert_close(pred.scale, 0.5 * ref.scale)
    torch.testing.assert_close(pred.samples, 2.0 * ref.loc + 0.5 * (ref.samples - ref.loc))
    assert torch.equal(pred.point, ref.point) and torch.equal(pred.mean, ref.point)


def test_fit_recovers_the_factors_of_a_mis_scaled_path_model():
    # the data: levels twice the base's, per-step noise half of it; the fit should say (2, 0.5).
    # The level sets the sum's spread (a), and with a fixed, the marginal's spread sets b: the
    # marginal variance 0.6^2 + 0.5^2 pins b only when the level does not dominate it.
    horizon, windows = 48, 3000
    g = torch.Generator().manual_seed(0)
    y = 0.6 * torch.randn(windows, 1, generator=g) + 0.5 * torch.randn(windows, horizon, generator=g)
    x = torch.zeros(windows, 8)
    model = SpreadRecalibration(ShiftedPaths(horizon, level=0.3))
    info = model.fit(x, y, num_samples=64, max_windows=windows)
    assert info["path_factor"] == pytest.approx(2.0, rel=0.06)
    assert info["noise_factor"] == pytest.approx(0.5, rel=0.1)
    assert (model.path_factor, model.noise_factor) == (info["path_factor"], info["noise_factor"])
    assert info["crps_sum"] < info["crps_sum_base"] and info["crps"] < info["crps_base"]
    assert info["windows"] == windows


def test_fit_on_a_well_scaled_model_stays_near_one_and_leaves_the_random_stream():
    horizon, windows = 12, 2000
    g = torch.Generator().manual_seed(1)
    y = torch.randn(windows, 1, generator=g) + torch.randn(windows, horizon, generator=g)
    x = torch.zeros(windows, 4)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    info = SpreadRecalibration(ShiftedPaths(horizon)).fit(x, y, num_samples=64, max_windows=500, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert info["windows"] == 500
    assert info["path_factor"] == pytest.approx(1.0, abs=0.12)
    assert info["noise_factor"] == pytest.approx(1.0, abs=0.12)


def test_fit_is_reproducible_from_its_seed():
    y = torch.randn(300, 8)
    x = torch.zeros(300, 4)
    a = SpreadRecalibration(ShiftedPaths(8)).fit(x, y, num_samples=16, seed=4)
    b = SpreadRecalibration(ShiftedPaths(8)).fit(x, y, num_samples=16, seed=4)
    assert a == b


@pytest.mark.parametrize("noise_score", ["crps", "nll"])
def test_the_fit_reports_the_scores_of_the_forecast_it_leaves(noise_score):
    # the fit's nll and crps are those of predict() on the same draws: the mixture's log density
    # (ForecastPrediction.log_prob) and the draws' CRPS, at the fitted factors and at a = b = 1
    horizon, windows = 12, 400
    g = torch.Generator().manual_seed(3)
    y = 1.5 * torch.randn(windows, 1, generator=g) + 0.4 * torch.randn(windows, horizon, generator=g)
    x = torch.randn(windows, 4, generator=g)
    model = SpreadRecalibration(ShiftedPaths(horizon, level=0.5))
    info = model.fit(x, y, num_samples=32, seed=7, noise_score=noise_score)
    assert info["path_factor"] > 2.0  # the levels are three times the base's
    for a, b, key in ((info["path_factor"], info["noise_factor"], ""), (1.0, 1.0, "_base")):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            pred = SpreadRecalibration(model.base, a, b).predict(x, 32)
        assert info[f"nll{key}"] == pytest.approx(-pred.log_prob(y).mean().item(), rel=1e-5)
        assert info[f"crps{key}"] == pytest.approx(crps_samples(pred.samples, y).item(), rel=1e-5)


def test_the_log_score_fit_recovers_the_noise_of_a_mis_scaled_path_model():
    horizon, windows = 48, 3000
    g = torch.Generator().manual_seed(0)
    y = 0.6 * torch.randn(windows, 1, generator=g) + 0.5 * torch.randn(windows, horizon, generator=g)
    info = SpreadRecalibration(ShiftedPaths(horizon, level=0.3)).fit(
        torch.zeros(windows, 8), y, num_samples=64, max_windows=windows, noise_score="nll"
    )
    assert info["path_factor"] == pytest.approx(2.0, rel=0.06)
    assert info["noise_factor"] == pytest.approx(0.5, rel=0.06)
    assert info["nll"] < info["nll_base"]


def test_flat_windows_are_left_out_of_the_fit():
    # a constant channel's windows: a base that forecast them exactly would score 0 at any
    # factor; this one draws spread around them, which would pull both factors down
    g = torch.Generator().manual_seed(2)
    y = 2.0 * torch.randn(400, 1, generator=g) + 0.5 * torch.randn(400, 8, generator=g)
    x = torch.randn(400, 4, generator=g)
    flat_x, flat_y = torch.full((300, 4), 3.0), torch.full((300, 8), 3.0)
    base = ShiftedPaths(8)
    clean = SpreadRecalibration(base).fit(x, y, num_samples=16, seed=1)
    mixed = SpreadRecalibration(base).fit(
        torch.cat([x, flat_x]), torch.cat([y, flat_y]), num_samples=16, seed=1
    )
    assert mixed == {**clean, "flat": 300} and clean["flat"] == 0
    assert clean["path_factor"] > 1.5  # the levels are twice the base's
    with pytest.raises(ValueError, match="constant channels"):
        SpreadRecalibration(base).fit(flat_x, flat_y, num_samples=16)


def test_a_roll_out_forecaster_recalibrates_and_keeps_its_mean():
    torch.manual_seed(0)
    config = RolloutConfig(lookback=48, horizon=12, patch=6, units=4, features=8, kernel_size=5)
    net = RolloutForecaster(config)
    x, y = torch.randn(40, 48), torch.randn(40, 12)
    model = SpreadRecalibration(net)
    info = model.fit(x, y, num_samples=8)
    assert info["path_factor"] > 0 and info["noise_factor"] > 0
    pred = model.predict(x[:3], 10)
    assert pred.samples.shape == pred.loc.shape == pred.scale.shape == (10, 3, 12)
    torch.testing.assert_close(pred.point, net.predict(x[:3], 10).point)


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="predict"):
        SpreadRecalibration(object())
    for bad in (0.0, -1.0, float("nan"), "2", True):
        with pytest.raises(ValueError, match="path_factor"):
            SpreadRecalibration(ShiftedPaths(4), path_factor=bad)
    x, y = torch.zeros(10, 3), torch.randn(10, 4)
    with pytest.raises(ValueError, match="StudentTControl"):
        SpreadRecalibration(OneGaussian(4)).fit(x, y, num_samples=8)
    model = SpreadRecalibration(ShiftedPaths(4))
    with pytest.raises(ValueError, match="num_samples"):
        model.fit(x, y, num_samples=1)
    with pytest.raises(ValueError, match="max_windows"):
        model.fit(x, y, max_windows=0)
    with pytest.raises(ValueError, match="same N"):
        model.fit(x, y[:5])
    with pytest.raises(ValueError, match="noise_score"):
        model.fit(x, y, noise_score="energy")

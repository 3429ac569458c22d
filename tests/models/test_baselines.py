"""Tests for the point baselines :class:`~vdn_pyro.models.DLinear` and
:class:`~vdn_pyro.models.RepeatLast`."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from tests.common import assert_close
from vdn_pyro import LocalELBO, fit
from vdn_pyro.forecasting import score_prediction
from vdn_pyro.metrics import forecast_metrics
from vdn_pyro.models import DLinear, ForecastPrediction, RepeatLast
from vdn_pyro.models.baselines import (
    StudentTControl,
    StudentTPrediction,
    crps_student_t,
    student_t_cdf,
    student_t_quantile,
)

L, H, B = 24, 6, 5


def seasonal_windows(n=400, noise=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(float(n + L + H))
    series = torch.sin(2 * math.pi * t / 12) + 0.01 * t + noise * torch.randn(t.shape, generator=gen)
    windows = series.unfold(0, L + H, 1)  # (N, L + H)
    return windows[:, :L].contiguous(), windows[:, L:].contiguous()


def test_repeat_last_and_its_calibration():
    x = torch.randn(B, L)
    model = RepeatLast(L, H)
    assert_close(model.point(x), x[:, -1:].expand(B, H))
    assert_close(model.point(x[:, None]), x[:, None, -1:].expand(B, 1, H))
    assert not list(model.parameters())
    y = x[:, -1:] + torch.arange(1.0, H + 1)  # error h at step h
    scale = model.calibrate(x, y)
    assert_close(scale, torch.arange(1.0, H + 1), rtol=1e-6)
    pred = model.predict(x, num_samples=7)
    assert isinstance(pred, ForecastPrediction)
    assert pred.num_components == 1 and pred.samples.shape == (7, B, H)
    assert_close(pred.scale[0], scale.expand(B, H))


def test_dlinear_matches_its_formula():
    model = DLinear(L, H, kernel_size=5)
    x = torch.randn(B, L)
    trend = model.net.moving_average(x)
    expected = model.net.trend(trend) + model.net.season(x - trend)
    assert_close(model.point(x), expected, rtol=1e-6, atol=1e-6)
    normed = DLinear(L, H, kernel_size=5, instance_norm="last")
    normed.load_state_dict(model.state_dict())
    shifted = normed.point(x + 3.0) - normed.point(x)
    assert_close(shifted, torch.full((B, H), 3.0), atol=1e-5)  # NLinear-style: shift equivariant


def test_point_model_is_a_gaussian_with_its_scale():
    model = DLinear(L, H)
    x, y = torch.randn(B, L), torch.randn(B, H)
    with torch.no_grad():
        model.scale.fill_(0.5)
    tr = poutine.trace(model.model).get_trace(x, y)
    expected = dist.Normal(model.point(x), 0.5).log_prob(y).sum()
    tr.compute_log_prob()
    assert_close(tr.nodes["obs"]["log_prob_sum"], expected, rtol=1e-5)
    assert model.guide(x, y) is None
    loss = LocalELBO().differentiable_loss(model.model, model.guide, x, y, num_data=3 * B)
    assert_close(loss, -3 * expected, rtol=1e-5)


def test_dlinear_fits_and_beats_repeat_last():
    x, y = seasonal_windows()
    pyro.set_rng_seed(0)
    model = DLinear(L, H, kernel_size=5)
    result = fit(model, x, y, epochs=10, batch_size=64, lr=0.01, seed=0, progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    scale = model.calibrate(x, y)
    repeat = RepeatLast(L, H)
    repeat.calibrate(x, y)
    ours = score_prediction(model.predict(x), y)
    naive = score_prediction(repeat.predict(x), y)
    assert ours["mse"] < 0.05 < naive["mse"]
    assert ours["crps"] < naive["crps"] and ours["nll"] < naive["nll"]
    assert_close(scale**2, ((model.point(x) - y) ** 2).mean(0), rtol=1e-4)


def test_prediction_scores_are_the_closed_form_ones():
    model = RepeatLast(L, H)
    x, y = torch.randn(B, L), torch.randn(B, H)
    model.calibrate(x, y)
    pred = model.predict(x, num_samples=3)
    expected = forecast_metrics(loc=model.point(x), scale=model.scale.expand(B, H), y=y)
    assert score_prediction(pred, y) == expected


def test_chunks_are_accepted():
    model = DLinear(L, H)
    x, y = torch.randn(B, 3, L), torch.randn(B, 3, H)
    assert model.point(x).shape == (B, 3, H)
    model.calibrate(x, y)
    assert model.predict(x, num_samples=2).samples.shape == (2, B, 3, H)


@pytest.mark.parametrize(
    "x, y, match",
    [
        (torch.randn(B, L - 1), None, "lookback=24"),
        (torch.randn(B, L), torch.randn(B, H + 2), r"y of shape \(5, 6\)"),
        (torch.full((B, L), math.nan), None, "finite x"),
    ],
    ids=["lookback", "horizon", "nan"],
)
def test_bad_inputs_are_rejected(x, y, match):
    for model in (DLinear(L, H), RepeatLast(L, H)):
        with pytest.raises(ValueError, match=match):
            model.model(x, y)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="horizon"):
        RepeatLast(L, 0)
    with pytest.raises(ValueError, match="odd kernel_size"):
        DLinear(L, H, kernel_size=4)
    with pytest.raises(ValueError, match="num_samples"):
        RepeatLast(L, H).predict(torch.randn(B, L), num_samples=0)


def test_set_linear_makes_dlinear_that_linear_map():
    torch.manual_seed(0)
    for norm in (None, "last"):
        model = DLinear(L, H, kernel_size=5, instance_norm=norm)
        weight, bias = torch.randn(H, L), torch.randn(H)
        model.set_linear(weight, bias)
        x = torch.randn(B, L)
        shift = x[:, -1:] if norm == "last" else 0.0
        assert_close(model.point(x), (x - shift) @ weight.T + bias + shift, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"weight \(6, 24\)"):
        model.set_linear(torch.randn(L, H), torch.randn(H))


def test_closed_form_fit_recovers_a_linear_map_and_ridge_shrinks_it():
    torch.manual_seed(0)
    weight, bias = 0.1 * torch.randn(H, L), torch.randn(H)
    x = torch.randn(500, L)
    y = x @ weight.T + bias  # noiseless: least squares recovers it exactly
    model = DLinear(L, H, kernel_size=5).fit_least_squares(x, y)
    assert_close(model.net.trend.weight, weight, atol=1e-4, rtol=1e-4)
    assert_close(model.net.trend.bias, bias, atol=1e-4, rtol=1e-4)
    assert model.scale.max() < 1e-3  # calibrated on the (zero) residuals
    norms = [
        DLinear(L, H, kernel_size=5).fit_least_squares(x, y, ridge=r).net.trend.weight.norm()
        for r in (0.0, 0.1, 1.0, 10.0)
    ]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    with pytest.raises(ValueError, match="ridge"):
        model.fit_least_squares(x, y, ridge=-0.1)
    with pytest.raises(ValueError, match="ridge"):
        model.fit_least_squares(x, y, ridge=float("nan"))


# ----------------------------------------------------------------------------- Student-t controls
class _GaussianBase:
    """A deterministic stand-in: one Gaussian per element, mean and scale read from x."""

    def predict(self, x, num_samples=1):
        loc, scale = 0.5 * x[:, :H], 0.5 + x[:, H : 2 * H].abs()  # (B, H) each
        noise = torch.randn((num_samples,) + loc.shape)
        return ForecastPrediction(loc + scale * noise, loc[None], scale[None])


def _t_data(n, df, factor, joint, seed=0):
    """Windows of the stand-in and targets drawn from its Student-t control."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, L, generator=gen)
    pred = _GaussianBase().predict(x)
    shape = (n, 1) if joint else (n, H)
    mixing = 2 * torch._standard_gamma(torch.full(shape, df / 2))  # chi-square(df)
    noise = torch.randn(n, H, generator=gen) * torch.sqrt(df / mixing)
    return x, pred.loc[0] + factor * pred.scale[0] * noise


@pytest.mark.parametrize("df", [1.2, 3.0, 30.0, 900.0])
def test_student_t_cdf_quantile_and_crps_are_exact(df):
    scipy_stats = pytest.importorskip("scipy.stats")
    sr = pytest.importorskip("scoringrules")
    z = torch.cat([torch.linspace(-40, 40, 801, dtype=torch.float64), torch.tensor([0.0, 1e-7, -3e-6])])
    assert_close(student_t_cdf(z, df), torch.from_numpy(scipy_stats.t.cdf(z.numpy(), df)), atol=1e-12)
    for level in (0.05, 0.75, 0.95):
        assert student_t_quantile(level, df) == pytest.approx(scipy_stats.t.ppf(level, df), abs=1e-9)
    y = z.numpy()
    reference = torch.from_numpy(sr.crps_t(y, df, 0.3, 1.7))
    assert_close(crps_student_t(0.3, 1.7, df, z), reference, rtol=1e-10, atol=1e-12)


def test_student_t_prediction_scores_are_the_t_ones():
    scipy_stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(0)
    loc, scale, df = torch.randn(50, H), 0.5 + torch.rand(50, H), 3.5
    y = loc + scale * torch.distributions.StudentT(df).sample((50, H))
    pred = StudentTPrediction(torch.zeros(2, 50, H), loc, scale, df, joint=False)
    scores = pred.scores(y)
    expected_nll = -torch.distributions.StudentT(df, loc.double(), scale.double()).log_prob(y.double()).mean()
    assert scores["nll"] == pytest.approx(float(expected_nll), rel=1e-10)
    pit = scipy_stats.t.cdf(((y - loc) / scale).double().numpy(), df)
    assert scores["coverage_90"] == pytest.approx(float(((pit >= 0.05) & (pit <= 0.95)).mean()))
    q = scipy_stats.t.ppf(0.95, df)
    assert scores["width_90"] == pytest.approx(float((2 * q * scale.double()).mean()), rel=1e-8)
    assert scores["mse"] == pytest.approx(float(((loc - y) ** 2).double().mean()), rel=1e-6)
    # the multivariate t: the joint density of scipy's, marginals those of the per-step t
    joint = StudentTPrediction(torch.zeros(2, 50, H), loc, scale, df, joint=True)
    reference = [
        scipy_stats.multivariate_t.logpdf(y[i].double().numpy(), loc[i].double().numpy(), np.diag(s), df=df)
        for i, s in enumerate((scale.double() ** 2).numpy())
    ]
    assert_close(joint.path_log_prob(y), torch.tensor(reference, dtype=torch.float64), rtol=1e-10)
    assert joint.scores(y) == scores
    assert_close(pred.path_log_prob(y), pred.log_prob(y).sum(-1))


@pytest.mark.parametrize("joint", [False, True], ids=["per-step", "multivariate"])
def test_student_t_control_recovers_its_parameters(joint):
    x, y = _t_data(20000, df=4.0, factor=0.7, joint=joint)
    control = StudentTControl(_GaussianBase(), joint=joint)
    info = control.fit(x, y)
    assert info["df"] == pytest.approx(4.0, rel=0.1) and info["scale_factor"] == pytest.approx(0.7, rel=0.03)
    assert (control.df, control.scale_factor) == (info["df"], info["scale_factor"])
    # the reported NLL is that of the fitted model (its own likelihood) on the data
    pred = control.predict(x, num_samples=2)
    own = -(pred.path_log_prob(y).mean() / H) if joint else -pred.log_prob(y).mean()
    assert info["nll"] == pytest.approx(float(own), rel=1e-6)
    # each model's likelihood prefers the data it generated
    other = StudentTControl(_GaussianBase(), joint=not joint).fit(x, y)["nll"]
    assert info["nll"] < other


@pytest.mark.parametrize("joint", [False, True], ids=["per-step", "multivariate"])
def test_student_t_control_leaves_flat_windows_out_of_its_fit(joint):
    """A constant channel's windows are forecast almost exactly; near-zero residual paths make the
    likelihood unbounded as the scale shrinks (the multivariate t collapses onto them), so the
    fit leaves the flat windows out and recovers the parameters of the others."""
    x, y = _t_data(8000, df=4.0, factor=0.7, joint=joint)
    clean = StudentTControl(_GaussianBase(), joint=joint).fit(x, y)
    flat_x, flat_y = torch.zeros(3000, L), torch.zeros(3000, H)  # a constant (centred) channel
    mixed = StudentTControl(_GaussianBase(), joint=joint).fit(torch.cat([x, flat_x]), torch.cat([y, flat_y]))
    assert mixed == clean
    # what they would do: the same windows a hair away from flat drag the fit to degenerate tails
    near_x = 1e-5 * torch.randn(3000, L, generator=torch.Generator().manual_seed(1))
    near = StudentTControl(_GaussianBase(), joint=joint).fit(torch.cat([x, near_x]), torch.cat([y, flat_y]))
    assert near["scale_factor"] < 0.5 * clean["scale_factor"]
    with pytest.raises(ValueError, match="windows are one value repeated"):
        StudentTControl(_GaussianBase(), joint=joint).fit(flat_x, flat_y)


def test_student_t_control_paths_share_one_scale_draw_only_when_joint():
    x = torch.randn(4, L)
    torch.manual_seed(0)
    for joint in (False, True):
        control = StudentTControl(_GaussianBase(), joint=joint, df=3.0, scale_factor=0.5)
        pred = control.predict(x, num_samples=20000)
        base = _GaussianBase().predict(x)
        assert pred.samples.shape == (20000, 4, H)
        assert_close(pred.loc, base.loc[0]) and assert_close(pred.scale, 0.5 * base.scale[0])
        z = (pred.samples - pred.loc) / pred.scale  # (S, B, H)
        # the marginal of every step is the t with df = 3
        inside = (z.abs() <= student_t_quantile(0.95, 3.0)).float().mean()
        assert abs(float(inside) - 0.9) < 0.01
        # |z| of two steps of one path are correlated through the shared mixing variable
        a, b = z[..., 0].abs().flatten(), z[..., 1].abs().flatten()
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert corr > 0.2 if joint else abs(corr) < 0.03
    assert score_prediction(pred, torch.zeros(4, H)) == pred.scores(torch.zeros(4, H))


def test_student_t_control_refuses_a_mixture_base():
    class Mixture(_GaussianBase):
        def predict(self, x, num_samples=1):
            pred = super().predict(x, num_samples)
            return ForecastPrediction(pred.samples, pred.loc.expand(3, -1, -1), pred.scale.expand(3, -1, -1))

    with pytest.raises(ValueError, match="one Gaussian per element"):
        StudentTControl(Mixture()).predict(torch.randn(2, L), 4)
    with pytest.raises(TypeError, match="predict"):
        StudentTControl(object())
    with pytest.raises(ValueError, match="df > 1"):
        crps_student_t(0.0, 1.0, 1.0, torch.zeros(3))

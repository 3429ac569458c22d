"""Tests for the forecasting harness :mod:`vdn_pyro.forecasting`."""

import math

import numpy as np
import pytest
import scoringrules as sr
import torch

from tests.common import assert_close
from vdn_pyro.data import ratio_splits
from vdn_pyro.forecasting import (
    METRICS,
    NORMS,
    PATH_METRICS,
    EarlyStopping,
    EpochDecay,
    Normalised,
    TrainConfig,
    ValidationSelector,
    _denormalise,  # the map every normalised view applies
    evaluate_forecaster,
    fit_least_squares,
    normalise_windows,
    normalised,
    score_prediction,
    train_forecaster,
    training_windows,
    window_stats,
)
from vdn_pyro.inference.fit import FitResult, FitState
from vdn_pyro.metrics import path_metrics
from vdn_pyro.models import DLinear, Forecaster, ForecastPrediction, RepeatLast


def toy_splits(lookback=16, horizon=4, n=600, channels=2):
    t = np.arange(n)[:, None]
    rng = np.random.default_rng(0)
    values = np.sin(2 * np.pi * t / 10 + np.arange(channels)) + 0.1 * rng.standard_normal((n, channels))
    return ratio_splits(values, lookback, horizon, train=0.6, val=0.2)


def test_mixture_scores_are_exact_for_the_mixture():
    torch.manual_seed(0)
    loc = torch.randn(3, 50, 4)  # (S', B, H)
    scale = 0.5 + torch.rand(3, 50, 4)
    comp = torch.randint(0, 3, (2000, 50, 4))  # a component per draw
    rows, cols = torch.arange(50)[:, None], torch.arange(4)
    samples = loc[comp, rows, cols] + scale[comp, rows, cols] * torch.randn(2000, 50, 4)  # (S, B, H)
    pred = ForecastPrediction(samples, loc, scale)
    y = torch.randn(50, 4)
    scores = score_prediction(pred, y)
    assert set(METRICS) <= set(scores)
    density = (torch.distributions.Normal(loc, scale).log_prob(y).exp()).mean(0)
    assert_close(scores["nll"], -density.log().mean(), rtol=1e-5)
    # exact coverage from the mixture CDF agrees with a large-sample estimate
    inside = ((samples.quantile(0.05, 0) <= y) & (y <= samples.quantile(0.95, 0))).float().mean()
    assert abs(scores["coverage_90"] - float(inside)) < 0.04
    # the sample CRPS agrees with scoringrules' ensemble CRPS
    ref = sr.crps_ensemble(y.numpy(), samples.permute(1, 2, 0).numpy(), estimator="pwm").mean()
    assert scores["crps"] == pytest.approx(float(ref), rel=1e-4)


def test_the_point_forecast_is_the_exact_mean_when_given():
    """MSE and MAE score the model's exact mean when the prediction carries one (``point``), the
    average of the components otherwise; the distributional scores read the components either
    way, and a normalised view maps the exact mean back like the rest."""
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 20, 3), 0.5 + torch.rand(5, 20, 3)  # (S', B, H)
    samples = loc + scale * torch.randn(5, 20, 3)
    point, y = torch.randn(20, 3), torch.randn(20, 3)
    plain = score_prediction(ForecastPrediction(samples, loc, scale), y)
    exact = score_prediction(ForecastPrediction(samples, loc, scale, point), y)
    assert_close(exact["mse"], ((point - y) ** 2).mean(), rtol=1e-6)
    assert_close(exact["mae"], (point - y).abs().mean(), rtol=1e-6)
    assert_close(plain["mse"], ((loc.mean(0) - y) ** 2).mean(), rtol=1e-6)
    for key in ("crps", "nll", "coverage_90", "width_90"):
        assert exact[key] == plain[key]
    shift, factor = torch.randn(20, 1), 1.0 + torch.rand(20, 1)
    mapped = _denormalise(ForecastPrediction(samples, loc, scale, point), shift, factor)
    assert_close(mapped.point, point * factor + shift)
    assert _denormalise(ForecastPrediction(samples, loc, scale), shift, factor).point is None


def test_one_gaussian_is_scored_in_closed_form():
    loc, scale, y = torch.zeros(1, 10, 3), torch.ones(1, 10, 3), torch.randn(10, 3)
    scores = score_prediction(ForecastPrediction(torch.zeros(2, 10, 3), loc, scale), y)
    assert_close(scores["nll"], 0.5 * math.log(2 * math.pi) + 0.5 * (y**2).mean(), rtol=1e-5)
    assert_close(scores["width_90"], 2 * 1.6448536, rtol=1e-5)


def test_training_windows_and_chunks():
    splits = toy_splits()
    x, y = training_windows(splits, TrainConfig(train_stride=3))
    ref_x, ref_y = splits.windows("train", stride=3)
    assert_close(x, ref_x) and assert_close(y, ref_y)
    xc, yc = training_windows(splits, TrainConfig(train_stride=3, chunk=4))
    assert xc.shape[1:] == (4, 16) and yc.shape[1:] == (4, 4)
    # consecutive windows of a chunk are train_stride rows apart
    assert_close(xc[0, 1, :-3], xc[0, 0, 3:])
    with pytest.raises(ValueError, match="chunk"):
        TrainConfig(chunk=0)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay=1.5)
    with pytest.raises(ValueError, match="select"):
        TrainConfig(select="accuracy")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="log_every"):
        TrainConfig(log_every=1.5)
    with pytest.raises(ValueError, match="optim"):
        TrainConfig(optim="sgd")


class _Opt:
    def __init__(self):
        self.param_groups = [{"lr": 1.0}]


class _Model:
    """Stand-in with a scripted validation score per call."""

    def __init__(self, scores):
        self.scores, self.state = list(scores), 0

    def state_dict(self):
        return {"state": self.state}

    def load_state_dict(self, state):
        self.state = state["state"]

    def train(self):
        pass

    def eval(self):
        pass


def test_validation_selector_keeps_the_best_state(monkeypatch):
    import vdn_pyro.forecasting as forecasting

    model = _Model([3.0, 1.0, 2.0, 2.5, 0.5])
    calls = []

    def fake_evaluate(m, x, y, num_samples, batch_size=512, seed=None, metrics=None, paths=False):
        assert metrics == ("crps",) and not paths  # the selection asks only for its metric
        return {"crps": m.scores.pop(0)}

    monkeypatch.setattr(forecasting, "evaluate_forecaster", fake_evaluate)
    before = lambda: calls.append(1)  # noqa: E731
    selector = ValidationSelector(model, None, None, "crps", every=10, patience=2, before=before)
    state = FitState(network=model, optimizer=None, elbo=None)
    for step in range(1, 51):
        state.step = step
        model.state = step
        selector.on_step_end(state)
        if state.stop:
            break
    assert state.step == 40 and selector.best_step == 20 and selector.best == 1.0
    assert len(calls) == 4
    selector.on_fit_end(state)
    assert model.state == 20
    with pytest.raises(ValueError, match="metric"):
        ValidationSelector(model, None, None, "accuracy")


def test_validation_selector_can_keep_the_starting_state(monkeypatch):
    import vdn_pyro.forecasting as forecasting

    model = _Model([1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(forecasting, "evaluate_forecaster", lambda m, *a, **k: {"crps": m.scores.pop(0)})
    selector = ValidationSelector(model, None, None, "crps", every=10, patience=2, score_start=True)
    state = FitState(network=model, optimizer=None, elbo=None)
    model.state = 0
    selector.on_fit_start(state)  # step 0: scored before any training
    for step in range(1, 31):
        state.step = model.state = step
        selector.on_step_end(state)
        if state.stop:
            break
    assert selector.history[0] == (0, 1.0) and selector.best_step == 0 and state.step == 20
    selector.on_fit_end(state)
    assert model.state == 0


def test_validation_selector_records_in_the_fit_result_and_resumes(monkeypatch):
    """The selection lives in the FitResult (which fit checkpoints): a selector started on a
    resumed state carries on exactly as the uninterrupted one."""
    import vdn_pyro.forecasting as forecasting

    scores = [3.0, 1.0, 2.0, 2.5, 0.5, 0.7, 0.8, 0.9]
    monkeypatch.setattr(forecasting, "evaluate_forecaster", lambda m, *a, **k: {"crps": m.scores.pop(0)})

    def run(model, selector, state, steps):
        for step in steps:
            state.step = model.state = step
            state.history.history.append({"step": step, "loss": 0.0})  # a logged row at every step
            selector.on_step_end(state)
            if state.stop:
                break

    straight = _Model(scores)
    state = FitState(network=straight, optimizer=None, elbo=None)
    state.history = FitResult(None, [], {}, {}, [], math.nan, -1, {}, 0, 0.0, {})
    selector = ValidationSelector(straight, None, None, "crps", every=10, patience=3)
    run(straight, selector, state, range(1, 101))
    assert state.step == 80 and selector.best_step == 50
    result = state.history
    assert (result.best_val_loss, result.best_step, result.best_state) == (0.5, 50, {"state": 50})
    assert [(r["step"], r["val_crps"]) for r in result.history if "val_crps" in r] == selector.history

    resumed = _Model(scores)
    first = FitState(network=resumed, optimizer=None, elbo=None)
    first.history = FitResult(None, [], {}, {}, [], math.nan, -1, {}, 0, 0.0, {})
    run(resumed, ValidationSelector(resumed, None, None, "crps", every=10, patience=3), first, range(1, 36))
    again = FitState(network=resumed, optimizer=None, elbo=None, step=35, history=first.history)
    selector = ValidationSelector(resumed, None, None, "crps", every=10, patience=3)
    selector.on_fit_start(again)
    assert (selector.best, selector.best_step, selector.waited) == (1.0, 20, 1)
    run(resumed, selector, again, range(36, 101))
    assert again.step == 80 and selector.best_step == 50 and again.history.best_state == {"state": 50}
    selector.on_fit_end(again)
    assert resumed.state == 50


def test_early_stopping_rebuilds_its_wait_on_resume():
    history = FitResult(None, [], {}, {}, [], math.nan, -1, {}, 0, 0.0, {})
    history.history = [{"step": s, "val_loss": v} for s, v in [(10, 2.0), (20, 1.0), (30, 1.5), (40, 1.2)]]
    history.best_step = 20
    state = FitState(network=None, optimizer=None, elbo=None, step=40, history=history)
    stop = EarlyStopping(3)
    stop.on_fit_start(state)
    assert stop.waited == 2
    state.step = 50
    history.history.append({"step": 50, "val_loss": 1.1})
    stop.on_step_end(state)
    assert state.stop and stop.stopped_step == 50


def test_epoch_decay_and_early_stopping_callbacks():
    state = FitState(network=None, optimizer=_Opt(), elbo=None)
    decay = EpochDecay(0.5)
    decay.on_fit_start(state)
    state.epoch = 2
    decay.on_step_end(state)
    assert state.optimizer.param_groups[0]["lr"] == 0.25
    history = FitResult(None, [], {}, {}, [], math.nan, -1, {}, 0, 0.0, {})
    state.history = history
    stop = EarlyStopping(2)
    for step, best in [(10, 10), (20, 10), (30, 10)]:
        state.step = step
        history.history.append({"step": step, "val_loss": 1.0})
        history.best_step = best
        stop.on_step_end(state)
    assert state.stop and stop.stopped_step == 30


@pytest.mark.parametrize("chunk, select", [(1, "crps"), (3, "crps"), (1, "loss")])
def test_train_and_evaluate_every_model(chunk, select):
    splits = toy_splits()
    config = TrainConfig(
        epochs=3, batch_size=64, lr=0.01, patience=2, chunk=chunk, num_samples=20, select=select
    )
    x_test, y_test = splits.windows("test")
    for model in (
        Forecaster(lookback=16, horizon=4, units=4, features=8, kernel_size=5, train_draws=4),
        Forecaster(lookback=16, horizon=4, units=4, features=8, kernel_size=5, deterministic=True),
        DLinear(16, 4, kernel_size=5),
        RepeatLast(16, 4),
    ):
        result = train_forecaster(model, splits, config, seed=0)
        if isinstance(model, RepeatLast):
            assert result is None
        else:
            assert result.best_step > 0 and math.isfinite(result.best_val_loss)
            assert all(("val_loss" in row) == (select == "loss") for row in result.history)
        for exact in (True, False):
            scores = evaluate_forecaster(model, x_test, y_test, num_samples=20, batch_size=50, exact=exact)
            assert all(math.isfinite(scores[k]) for k in METRICS)
            assert 0 <= scores["coverage_50"] <= scores["coverage_90"] <= 1


def test_training_and_scoring_leave_the_global_random_state_alone():
    splits = toy_splits()
    config = TrainConfig(epochs=2, batch_size=64, lr=0.01, patience=0, skip_fit="ridge", num_samples=10)
    model = Forecaster(lookback=16, horizon=4, units=4, features=8, kernel_size=5, train_draws=4)
    x_test, y_test = splits.windows("test")
    before = torch.get_rng_state()
    train_forecaster(model, splits, config, seed=3)
    first = evaluate_forecaster(model, x_test, y_test, num_samples=10, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)  # another state: the seeded scores do not depend on it
    second = evaluate_forecaster(model, x_test, y_test, num_samples=10, seed=3)
    assert {k: first[k] for k in METRICS} == {k: second[k] for k in METRICS}


def test_steps_cadence_and_resume_through_the_recipe(tmp_path):
    """``steps``, ``val_every`` and ``log_every`` reach fit, and a run resumed from a checkpoint
    ends where the uninterrupted one does, selection included."""
    splits = toy_splits()
    options = dict(
        batch_size=32, lr=0.01, patience=0, num_samples=10, skip_fit="ridge", val_every=2, log_every=2
    )

    def run(steps, directory, resume=False):
        torch.manual_seed(0)
        net = Forecaster(
            lookback=16,
            horizon=4,
            units=4,
            features=8,
            kernel_size=5,
            train_draws=4,
            likelihood_scale="heteroscedastic",
            mean="skip",
        )
        result = train_forecaster(
            net, splits, TrainConfig(steps=steps, **options), seed=1, checkpoint_dir=directory, resume=resume
        )
        return net, result

    straight, result = run(8, tmp_path / "a")
    assert result.steps == 8 and [row["step"] for row in result.history] == [2, 4, 6, 8]
    assert all("val_crps" in row for row in result.history) and result.best_step in (0, 2, 4, 6, 8)
    run(4, tmp_path / "b")
    resumed, again = run(8, tmp_path / "b", resume=True)
    assert again.resumed_from == 4 and (again.best_step, again.best_val_loss) == (
        result.best_step,
        result.best_val_loss,
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("skip_fit", ["sgd", "ridge"])
def test_pretrained_skip_path_stays_frozen(skip_fit):
    splits = toy_splits()
    config = TrainConfig(epochs=2, batch_size=64, lr=0.01, patience=0, skip_fit=skip_fit)
    net = Forecaster(lookback=16, horizon=4, units=4, features=8, kernel_size=5, train_draws=4)
    init = net.skip.trend.weight.detach().clone()
    train_forecaster(net, splits, config, seed=0)
    assert not any(p.requires_grad for p in net.skip.parameters())
    assert not torch.equal(net.skip.trend.weight, init)  # fitted in the first stage
    if skip_fit == "ridge":  # the closed-form fit of the same splits, exactly
        ref = DLinear(16, 4, kernel_size=5)
        fit_least_squares(ref, splits, config.ridges)
        assert_close(net.skip.trend.weight, ref.net.trend.weight)
    source = DLinear(16, 4, kernel_size=5)
    train_forecaster(source, splits, config, seed=0)
    twin = Forecaster(lookback=16, horizon=4, units=4, features=8, kernel_size=5, deterministic=True)
    train_forecaster(twin, splits, config, seed=0, skip_from=source)
    assert_close(twin.skip.trend.weight, source.net.trend.weight)  # lent, then left alone


def test_least_squares_fit_is_the_exact_minimiser_and_selects_on_validation():
    splits = toy_splits(n=800)
    model = DLinear(16, 4, kernel_size=5)
    info = fit_least_squares(model, splits, ridges=(0.0, 0.01, 0.1, 10.0))
    # the validation MSE of every penalty is reported and the smallest one is kept
    ridges, scores = zip(*info["path"])
    assert ridges == (0.0, 0.01, 0.1, 10.0)
    assert info["val_mse"] == min(scores) and info["ridge"] == ridges[scores.index(min(scores))]
    x_val, y_val = splits.windows("val")
    assert_close(((model.point(x_val) - y_val) ** 2).mean(), info["val_mse"], rtol=1e-4)
    # with ridge 0 the fit is numpy's least-squares solution of the training windows
    exact = DLinear(16, 4, kernel_size=5)
    fit_least_squares(exact, splits, ridges=(0.0,))
    x, y = splits.windows("train")
    design = np.hstack([x.double().numpy(), np.ones((x.shape[0], 1))])
    solution, *_ = np.linalg.lstsq(design, y.double().numpy(), rcond=None)
    assert_close(exact.point(x).double(), torch.from_numpy(design @ solution), atol=2e-4, rtol=1e-4)

    # ... so the gradient of the training MSE at it vanishes (relative to a random DLinear's)
    def grad_norm(m):
        m.zero_grad()
        ((m.point(x) - y) ** 2).mean().backward()
        return sum(p.grad.norm() ** 2 for p in m.parameters()).sqrt().item()

    assert grad_norm(exact) < 1e-3 * grad_norm(DLinear(16, 4, kernel_size=5))
    # the scale is calibrated on the training residuals
    assert_close(exact.scale, ((exact.point(x) - y) ** 2).mean(0).sqrt(), rtol=1e-4)


def test_least_squares_with_nlinear_normalisation_and_bad_input():
    splits = toy_splits()
    model = DLinear(16, 4, kernel_size=5, instance_norm="last")  # the last input is always 0
    info = fit_least_squares(model, splits, ridges=(0.0,))
    assert math.isfinite(info["val_mse"]) and info["val_mse"] < 0.1
    with pytest.raises(TypeError, match="DLinear"):
        fit_least_squares(RepeatLast(16, 4), splits)
    with pytest.raises(ValueError, match="lookback, horizon"):
        fit_least_squares(DLinear(12, 4, kernel_size=5), splits)
    with pytest.raises(ValueError, match="ridges"):
        fit_least_squares(model, splits, ridges=(-1.0,))
    with pytest.raises(ValueError, match="skip_fit"):
        TrainConfig(skip_fit="closed")


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("norm", NORMS)
def test_window_normalisation_round_trips(norm):
    torch.manual_seed(0)
    x, y = 3.0 + 2.0 * torch.randn(5, 3, 16), torch.randn(5, 3, 4)  # chunks too
    xn, yn = normalise_windows(x, y, norm)
    loc, scale = window_stats(x, norm)
    if norm == "none":
        assert xn is x and yn is y and loc is None
        return
    assert loc.shape == (5, 3, 1)
    factor = 1.0 if scale is None else scale
    assert_close(xn * factor + loc, x, atol=1e-5) and assert_close(yn * factor + loc, y, atol=1e-5)
    if norm == "last":
        assert_close(xn[..., -1], torch.zeros(5, 3))
    else:
        assert_close(xn.mean(-1), torch.zeros(5, 3), atol=1e-5)
        assert_close(xn.std(-1, unbiased=False), torch.ones(5, 3), atol=1e-4)
    with pytest.raises(ValueError, match="norm"):
        window_stats(x, "revin")


def test_a_normalised_model_forecasts_in_the_original_units():
    """``Normalised`` maps a prediction back (samples, means, scales), so a model fitted under
    ``mean_scale`` is equivariant to an affine change of units of the window."""
    splits = toy_splits()
    model = DLinear(16, 4, kernel_size=5)
    fit_least_squares(model, splits, ridges=(0.0,), norm="mean_scale")
    view = normalised(model, "mean_scale")
    assert normalised(model, "none") is model and view.model is model
    x, _ = splits.windows("test")
    a = view.predict(x, num_samples=3)
    b = view.predict(2.5 * x - 7.0, num_samples=3)
    assert_close(b.loc, 2.5 * a.loc - 7.0, atol=1e-4, rtol=1e-5)
    assert_close(b.scale, 2.5 * a.scale, rtol=1e-5)
    stats = window_stats(x, "mean_scale")
    inner = model.predict(normalise_windows(x, None, "mean_scale")[0], num_samples=3)
    assert_close(a.scale[0], inner.scale[0] * stats[1], rtol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        Normalised(model, "max")


def test_least_squares_under_last_value_normalisation_is_nlinear():
    """The closed-form fit of the last-value-normalised windows is the fit of a DLinear that
    normalises itself (NLinear-style): the same least-squares problem."""
    splits = toy_splits()
    outside = DLinear(16, 4, kernel_size=5)
    info = fit_least_squares(outside, splits, ridges=(0.0, 0.1), norm="last")
    inside = DLinear(16, 4, kernel_size=5, instance_norm="last")
    reference = fit_least_squares(inside, splits, ridges=(0.0, 0.1))
    assert info["ridge"] == reference["ridge"]
    assert info["val_mse"] == pytest.approx(reference["val_mse"], rel=1e-5)
    x_val, y_val = splits.windows("val")
    view = normalised(outside, "last")
    assert_close(view.predict(x_val, 2).loc[0], inside.point(x_val), atol=1e-4, rtol=1e-4)
    # the reported validation MSE is that of the forecasts in the original units
    val_mse = ((view.predict(x_val, 2).loc[0] - y_val) ** 2).mean()
    assert info["val_mse"] == pytest.approx(float(val_mse), rel=1e-5)
    with pytest.raises(ValueError, match="norm"):
        fit_least_squares(outside, splits, norm="median")
    with pytest.raises(ValueError, match="norm"):
        TrainConfig(norm="median")


def test_training_under_a_normalisation_selects_in_the_original_units():
    splits = toy_splits()
    config = TrainConfig(epochs=2, batch_size=64, lr=0.01, patience=0, skip_fit="ridge", norm="mean_scale")
    twin = Forecaster(
        lookback=16,
        horizon=4,
        units=4,
        features=8,
        kernel_size=5,
        deterministic=True,
        likelihood_scale="heteroscedastic",
        mean="skip",
    )
    result = train_forecaster(twin, splits, config, seed=0)
    x_val, y_val = splits.windows("val")
    # the twin's predictive is one Gaussian: its validation CRPS is exact, and is the selection's
    scores = evaluate_forecaster(normalised(twin, "mean_scale"), x_val, y_val, num_samples=4)
    assert result.best_val_loss == pytest.approx(scores["crps"], rel=1e-6)
    raw = evaluate_forecaster(twin, *normalise_windows(x_val, y_val, "mean_scale"), num_samples=4)
    assert raw["crps"] != pytest.approx(scores["crps"], rel=1e-3)  # not the normalised units
    # the skip path is the closed-form fit of the normalised windows
    source = DLinear(16, 4, kernel_size=5)
    fit_least_squares(source, splits, config.ridges, norm="mean_scale")
    assert_close(twin.skip.trend.weight, source.net.trend.weight)


# ----------------------------------------------------------------------------- path scores
class _Paths:
    """A model whose exact marginal draws independent steps while its predict draws paths that
    move together."""

    has_exact_marginal = True

    def eval(self):
        pass

    def predict(self, x, num_samples=100, batch_size=None):
        shift = torch.randn(num_samples, x.shape[0], 1)  # (S, B, 1): one draw per path
        loc = torch.zeros(1, x.shape[0], 4)
        return ForecastPrediction(shift.expand(-1, -1, 4), loc, torch.ones_like(loc))

    def predict_marginal(self, x, num_samples=100, batch_size=None):
        loc = torch.zeros(1, x.shape[0], 4)
        return ForecastPrediction(torch.randn(num_samples, x.shape[0], 4), loc, torch.ones_like(loc))


def test_path_scores_come_from_joint_sample_paths():
    x, y = torch.randn(30, 16), torch.randn(30, 4)
    model = _Paths()
    scores = evaluate_forecaster(model, x, y, num_samples=50, batch_size=7, seed=1, paths=True)
    assert set(METRICS) | set(PATH_METRICS) <= set(scores)
    marginal = evaluate_forecaster(model, x, y, num_samples=50, batch_size=7, seed=1)
    assert {k: scores[k] for k in METRICS} == {k: marginal[k] for k in METRICS}
    # the paths of predict, drawn after each batch's marginal: reproduce them
    torch.manual_seed(1)
    paths = []
    for xb in x.split(7):
        model.predict_marginal(xb, 50)
        paths.append(model.predict(xb, 50).samples)
    expected = path_metrics(torch.cat(paths, 1), y)
    assert {k: scores[k] for k in PATH_METRICS} == pytest.approx(expected, rel=1e-6)
    # paths that move together have a wider horizon sum than independent steps with the same
    # marginals
    independent = path_metrics(torch.randn(50, 30, 4), y)
    assert scores["width_90_sum"] > 1.5 * independent["width_90_sum"]


def test_scoring_only_the_asked_metrics():
    """``metrics=("crps",)`` returns the CRPS of the full scoring from the same draws, and skips
    the mixture's exact density; unknown names are refused."""
    splits = toy_splits()
    model = Forecaster(lookback=16, horizon=4, units=4, features=8, kernel_size=5, train_draws=4)
    x_test, y_test = splits.windows("test")
    full = evaluate_forecaster(model, x_test, y_test, num_samples=10, seed=3, exact=False)
    crps = evaluate_forecaster(model, x_test, y_test, num_samples=10, seed=3, exact=False, metrics=("crps",))
    assert set(crps) == {"crps", "seconds"} and crps["crps"] == full["crps"]
    nll = evaluate_forecaster(model, x_test, y_test, num_samples=10, seed=3, exact=False, metrics=["nll"])
    assert nll["nll"] == full["nll"]
    with pytest.raises(ValueError, match="Expected metrics among.*need paths=True"):
        evaluate_forecaster(model, x_test, y_test, num_samples=10, metrics=("energy",))
    # a path score with paths=True: the same value as the full scoring's, no marginal keys
    full = evaluate_forecaster(model, x_test, y_test, num_samples=10, seed=3, exact=False, paths=True)
    energy = evaluate_forecaster(
        model, x_test, y_test, num_samples=10, seed=3, exact=False, paths=True, metrics=("energy",)
    )
    assert energy["energy"] == full["energy"] and "crps" not in energy


@pytest.mark.parametrize("metric", ["energy", "crps_sum"])
def test_validation_selector_on_a_path_score(metric):
    """Selection on a path score reads the model's joint sample paths: the selector's score is
    the path score evaluate_forecaster gives from the same draws."""
    from vdn_pyro.models import RolloutForecaster

    splits = toy_splits()
    model = RolloutForecaster(lookback=16, horizon=4, patch=4, units=3, features=8, kernel_size=5)
    x_val, y_val = splits.windows("val")
    selector = ValidationSelector(model, x_val, y_val, metric, num_samples=12)
    torch.manual_seed(5)
    value = selector.score()
    torch.manual_seed(5)
    expected = evaluate_forecaster(
        model, x_val, y_val, num_samples=12, seed=None, paths=True, metrics=(metric,)
    )[metric]
    assert value == expected and math.isfinite(value)

"""Tests for :class:`vdn_pyro.models.Forecaster`: sites and shapes, temporal neurons (T = 1 is the
static model, the AR KL ties consecutive windows), the K-draw mixture likelihood, the deterministic
twin, predictive distributions and input validation."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from tests.common import assert_close
from vdn_pyro import LocalELBO, fit
from vdn_pyro.models import ARPrior, Forecaster, ForecasterConfig, ForecastPrediction, NormalPrior

L, H, U, B, T = 24, 6, 5, 4, 3


SMALL = dict(lookback=L, horizon=H, units=U, features=8, kernel_size=5)


def make(**options):
    return Forecaster(**{**SMALL, **options})


def latent_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], poutine.subsample_messenger._Subsample)
    }


def traces(net, x, y, **kwargs):
    guide_tr = poutine.trace(net.guide).get_trace(x, y, **kwargs)
    model_tr = poutine.trace(poutine.replay(net.model, trace=guide_tr)).get_trace(x, y, **kwargs)
    return guide_tr, model_tr


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"units": 0}, ValueError, "units >= 1"),
        ({"horizon": 2.5}, TypeError, "horizon to be an int"),
        ({"prior": "laplace"}, ValueError, "prior in"),
        ({"scale_mode": "global"}, ValueError, "scale_mode in"),
        ({"train_draws": 0}, ValueError, "train_draws >= 1"),
        ({"beta": -1.0}, ValueError, "beta > 0"),
        ({"beta": [1.0, 2.0]}, ValueError, r"shape \(5,\)"),
        ({"likelihood_scale": "wide"}, ValueError, "likelihood scale"),
        ({"activation": "swish"}, ValueError, "activation in"),
        ({"phi_range": (0.5, 1.2)}, ValueError, "phi_range"),
    ],
    ids=[
        "units",
        "horizon-type",
        "prior",
        "scale-mode",
        "draws",
        "beta",
        "beta-shape",
        "lik-scale",
        "activation",
        "phi-range",
    ],
)
def test_bad_config_is_rejected(options, error, match):
    with pytest.raises(error, match=match):
        make(**options)


def test_config_object_and_overrides():
    config = ForecasterConfig(**SMALL)
    net = Forecaster(config, units=3)
    assert net.config.units == 3 and config.units == U
    with pytest.raises(TypeError, match="ForecasterConfig"):
        Forecaster({"lookback": L})


@pytest.mark.parametrize("prior, cls", [("ar", ARPrior), ("normal", NormalPrior)])
def test_prior_choice_and_site_name(prior, cls):
    net = make(prior=prior)
    assert isinstance(net.layers[0].prior, cls)
    assert net.site_names == ["layers.0.z"]
    assert net.layers[0].beta.shape == (U,)


# ---------------------------------------------------------------------------------------------
# Sites and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [1, 2], ids=["k1", "k2"])
@pytest.mark.parametrize("draws", [1, 4], ids=["K1", "K4"])
@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_sites_and_shapes(temporal, draws, latent_dim):
    net = make(train_draws=draws, latent_dim=latent_dim)
    lead = (B, T) if temporal else (B,)
    x, y = torch.randn(lead + (L,)), torch.randn(lead + (H,))
    guide_tr, model_tr = traces(net, x, y)
    g, m = latent_sites(guide_tr), latent_sites(model_tr)
    assert list(g) == list(m) == ["layers.0.z"]
    batch = (B, U) if draws == 1 else (draws, 1, B, U)
    event = (latent_dim, T) if temporal else (latent_dim,)
    for site in (g["layers.0.z"], m["layers.0.z"]):
        assert site["fn"].batch_shape == batch
        assert site["fn"].event_shape == event
    assert model_tr.nodes["obs"]["fn"].event_shape == lead[1:] + (H,)
    # the prior is an AR process over the windows of a chunk
    base = m["layers.0.z"]["fn"].base_dist if temporal else None
    if temporal:
        assert type(base).__name__ == "ARProcess"


@pytest.mark.parametrize("draws", [1, 3])
def test_model_samples_without_y(draws):
    net = make(train_draws=draws)
    x = torch.randn(B, T, L)
    out = net.model(x)  # y=None: one draw, whatever train_draws
    assert out.shape == (B, T, H)
    tr = poutine.trace(net.guide).get_trace(x)
    assert tr.nodes["layers.0.z"]["fn"].batch_shape == (B, U)


def test_minibatch_scaling_and_unit_stats():
    net = make()
    x, y = torch.randn(B, L), torch.randn(B, H)
    elbo = LocalELBO()
    loss_full, stats = elbo.loss_and_stats(net.model, net.guide, x, y)
    assert stats["layers.0.z"].kl.shape == (U,)
    assert bool((stats["layers.0.z"].kl >= 0).all())
    pyro.set_rng_seed(1)
    small = elbo.loss_and_stats(net.model, net.guide, x, y, num_data=4 * B)[0]
    pyro.set_rng_seed(1)
    ref = elbo.loss_and_stats(net.model, net.guide, x, y)[0]
    assert_close(small, 4 * ref, rtol=1e-5)
    assert torch.isfinite(loss_full)


# ---------------------------------------------------------------------------------------------
# Temporal neurons
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", ["ar", "normal"])
@pytest.mark.parametrize("draws", [1, 4], ids=["K1", "K4"])
def test_one_window_chunk_is_the_static_model(prior, draws):
    net = make(prior=prior, train_draws=draws, phi=0.8)
    x, y = torch.randn(B, L), torch.randn(B, H)
    elbo = LocalELBO()
    pyro.set_rng_seed(3)
    static = elbo.loss_and_stats(net.model, net.guide, x, y)
    pyro.set_rng_seed(3)
    temporal = elbo.loss_and_stats(net.model, net.guide, x[:, None], y[:, None])
    assert_close(temporal[0], static[0], rtol=1e-5)
    assert_close(temporal[1]["layers.0.z"].kl, static[1]["layers.0.z"].kl, rtol=1e-5, atol=1e-6)
    # the static KL is the one against the AR prior's stationary marginal
    loc, scale = net.posterior(x)  # (B, U, 1)
    prior_fn = net.layers[0].prior((B,), None)
    expected = kl_divergence(dist.Normal(loc, scale).to_event(1), prior_fn).mean(0)  # (U,)
    assert_close(static[1]["layers.0.z"].kl, expected, rtol=1e-5, atol=1e-6)
    # predictions agree too
    pyro.set_rng_seed(4)
    a = net.predict(x, 5)
    pyro.set_rng_seed(4)
    b = net.predict(x[:, None], 5)
    assert_close(b.samples[:, :, 0], a.samples, rtol=1e-5, atol=1e-6)


def test_ar_kl_ties_consecutive_windows():
    """With a persistent AR prior the KL of a smooth posterior path is lower than the KL of the
    same posterior marginals visited in a scrambled order; a Normal prior cannot tell."""
    steps = 8
    loc = torch.linspace(-1.0, 1.0, steps).expand(1, U, 1, steps)  # (1, U, k, T)
    scrambled = loc[..., torch.tensor([0, 7, 1, 6, 2, 5, 3, 4])]
    scale = torch.full_like(loc, 0.3)

    def kl(prior, path):
        q = dist.Normal(path, scale).to_event(2)
        return kl_divergence(q, prior((1,), steps)).sum()

    ar = ARPrior(U, phi=0.95, learn_phi=False)
    normal = NormalPrior(U)
    assert kl(ar, loc) < kl(ar, scrambled) - 1.0
    assert_close(kl(normal, loc), kl(normal, scrambled), rtol=1e-6)


def test_phi_range_bounds_the_memory():
    net = make(phi=0.6, phi_range=(0.5, 0.9))
    phi = net.layers[0].prior.phi
    assert bool(((phi > 0.5) & (phi < 0.9)).all())
    with torch.no_grad():
        net.layers[0].prior.raw_phi.fill_(50.0)
    assert float(net.layers[0].prior.phi.detach().max()) <= 0.9


# ---------------------------------------------------------------------------------------------
# The K-draw mixture likelihood
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_mixture_likelihood_matches_a_hand_computation(temporal):
    draws = 3
    net = make(train_draws=draws, beta=0.3)
    lead = (B, T) if temporal else (B,)
    x, y = torch.randn(lead + (L,)), torch.randn(lead + (H,))
    pyro.set_rng_seed(5)
    loss = LocalELBO().differentiable_loss(net.model, net.guide, x, y)
    pyro.set_rng_seed(5)
    guide_tr = poutine.trace(net.guide).get_trace(x, y)
    z = guide_tr.nodes["layers.0.z"]["value"]  # (K, 1, B, U, k[, T])
    pooled = net.layers[0].pool(z, temporal)  # (K, 1, B, [T,] U)
    loc, scale = net.components(x, pooled)  # (K, 1, B, [T,] H)
    log_lik = torch.logsumexp(dist.Normal(loc, scale).log_prob(y), 0) - math.log(draws)
    q_loc, q_scale = net.posterior(x)
    q = dist.Normal(q_loc, q_scale).to_event(2 if temporal else 1)
    kl = kl_divergence(q, net.layers[0].prior((B,), T if temporal else None))  # (B, U)
    expected = -log_lik.sum() + 0.3 * kl.sum()
    assert_close(loss, expected, rtol=1e-5)


def test_one_draw_is_the_usual_elbo():
    """K = 1 is the mean-field ELBO of the plain model: Trace_ELBO agrees in expectation."""
    net = make(train_draws=1, beta=0.5)
    x, y = torch.randn(B, L), torch.randn(B, H)
    elbo = LocalELBO()
    mean_field = torch.stack([elbo.differentiable_loss(net.model, net.guide, x, y) for _ in range(200)])
    trace = pyro.infer.Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=2)
    mc = trace.differentiable_loss(net.model, net.guide, x, y)
    assert_close(mc, mean_field.mean(), rtol=0.02)


def test_mixture_lets_scales_follow_the_noise():
    """Heteroscedastic data: with the K-draw mixture, the latent scale of the noisy windows grows;
    with the usual ELBO (K = 1) it is not pulled by the error (the known weakness)."""
    torch.manual_seed(0)
    n, lookback, horizon = 256, 8, 4
    x = torch.randn(n, lookback)
    noisy = x[:, 0] > 0  # the first value says how noisy the future is
    y = 0.1 * torch.randn(n, horizon) + torch.randn(n, horizon) * noisy[:, None]
    spreads = {}
    for draws in (1, 16):
        pyro.set_rng_seed(0)
        net = Forecaster(
            lookback=lookback,
            horizon=horizon,
            units=4,
            features=8,
            kernel_size=3,
            instance_norm=None,
            skip=False,
            train_draws=draws,
            beta=1e-3,
            prior="normal",
            likelihood_scale=0.1,
            activation="relu",
            init_scale=0.3,
        )
        fit(net, x, y, steps=200, batch_size=n, lr=0.03, seed=0, progress=False)
        pred = net.predict_marginal(x)
        spreads[draws] = (pred.scale[0][noisy].mean() / pred.scale[0][~noisy].mean()).item()
    assert spreads[1] < 1.2  # K = 1: the scales ignore where the errors are
    assert spreads[16] > 2.5


# ---------------------------------------------------------------------------------------------
# Deterministic twin
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_twin_has_no_latent_and_uses_the_posterior_mean(temporal):
    net = make(deterministic=True, train_draws=4)
    lead = (B, T) if temporal else (B,)
    x, y = torch.randn(lead + (L,)), torch.randn(lead + (H,))
    assert net.guide(x, y) == {}
    tr = poutine.trace(net.model).get_trace(x, y)
    assert not latent_sites(tr)
    loc, _ = net.posterior(x)
    c_loc, c_scale = net.components(x, net.layers[0].pool(loc, temporal))
    expected = dist.Normal(c_loc, c_scale).log_prob(y).sum()
    assert_close(tr.nodes["obs"]["fn"].log_prob(y.unsqueeze(1)).sum(), expected, rtol=1e-5)
    pred = net.predict(x, 7)
    assert pred.num_components == 1 and pred.samples.shape == (7,) + lead + (H,)
    assert_close(net.predict_marginal(x).scale, pred.scale)


def test_twin_and_vdn_share_the_architecture():
    vdn, twin = make(), make(deterministic=True)
    assert [n for n, _ in vdn.named_parameters()] == [n for n, _ in twin.named_parameters()]
    twin.load_state_dict(vdn.state_dict())
    x = torch.randn(B, L)
    assert_close(twin.predict_marginal(x).loc, vdn.predict_marginal(x).loc)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_monte_carlo_prediction_tends_to_the_exact_marginal(temporal):
    net = make(latent_dim=2, init_scale=1.0)
    x = torch.randn((B, T, L) if temporal else (B, L))
    mc = net.predict(x, 20000)
    exact = net.predict_marginal(x)
    assert mc.num_components == 20000 and exact.num_components == 1
    assert_close(mc.mean, exact.mean, atol=0.03)
    assert_close(mc.stddev, exact.stddev, rtol=0.03)
    assert_close(mc.samples.std(0), exact.stddev, rtol=0.03)


def test_predict_agrees_with_pyro_predictive():
    net = make(init_scale=1.0)
    x = torch.randn(B, L)
    draws = pyro.infer.Predictive(net.model, guide=net.guide, num_samples=20000, parallel=True)(x)
    obs = draws["obs"].squeeze(-2)  # (S, B, H)
    exact = net.predict_marginal(x)
    assert_close(obs.mean(0), exact.mean, atol=0.05)
    assert_close(obs.std(0), exact.stddev, rtol=0.04)


def test_predict_in_batches_matches_one_pass():
    net = make()
    x = torch.randn(10, L)
    pyro.set_rng_seed(0)
    whole = net.predict_marginal(x)
    parts = net.predict_marginal(x, batch_size=3)
    assert_close(parts.loc, whole.loc, rtol=1e-6, atol=1e-6)
    assert net.predict(x, 4, batch_size=3).samples.shape == (4, 10, H)


def test_heteroscedastic_has_no_exact_marginal():
    net = make(likelihood_scale="heteroscedastic")
    assert not net.has_exact_marginal
    with pytest.raises(ValueError, match="heteroscedastic"):
        net.predict_marginal(torch.randn(B, L))
    pred = net.predict(torch.randn(B, L), 6)
    assert pred.loc.shape == pred.scale.shape == (6, B, H)


def test_forecast_prediction_distribution():
    loc = torch.tensor([[[0.0, 1.0]], [[2.0, 1.0]]])  # (S'=2, B=1, H=2)
    scale = torch.tensor([[[1.0, 0.5]], [[1.0, 0.5]]])
    pred = ForecastPrediction(torch.zeros(4, 1, 2), loc, scale)
    y = torch.tensor([[0.5, 1.0]])
    half = torch.tensor(0.5)
    expected = torch.log(
        0.5 * dist.Normal(0.0, 1.0).log_prob(half).exp() + 0.5 * dist.Normal(2.0, 1.0).log_prob(half).exp()
    )
    assert_close(pred.log_prob(y)[0, 0], expected, rtol=1e-6)
    assert_close(pred.log_prob(y)[0, 1], dist.Normal(1.0, 0.5).log_prob(torch.tensor(1.0)), rtol=1e-6)
    assert_close(pred.mean, torch.tensor([[1.0, 1.0]]))
    assert_close(pred.stddev, torch.tensor([[math.sqrt(2.0), 0.5]]), rtol=1e-6)
    assert_close(pred.cdf(torch.tensor([[1.0, 1.0]])), torch.tensor([[0.5, 0.5]]), rtol=1e-6)
    one = ForecastPrediction(torch.zeros(3, 1, 2), loc[:1], scale[:1])
    assert_close(one.quantile(0.5), loc[0])
    with pytest.raises(ValueError, match="level"):
        one.quantile(1.0)
    # an exact mean given by the model is the point forecast; the mixture's spread is its own
    exact = ForecastPrediction(torch.zeros(4, 1, 2), loc, scale, torch.tensor([[0.9, 1.1]]))
    assert_close(exact.mean, torch.tensor([[0.9, 1.1]]))
    assert_close(exact.stddev, pred.stddev)
    assert_close(exact.to("cpu").point, exact.point)
    with pytest.raises(ValueError, match=r"point of shape \(1, 2\)"):
        ForecastPrediction(torch.zeros(4, 1, 2), loc, scale, torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, y, error, match",
    [
        (torch.randn(B, L + 1), None, ValueError, "lookback=24"),
        (torch.randn(B, T, 2, L), None, ValueError, r"\(B, 24\) or \(B, T, 24\)"),
        (torch.ones(B, L, dtype=torch.long), None, TypeError, "floating"),
        ([[0.0] * L], None, TypeError, "torch.Tensor"),
        (torch.full((B, L), math.nan), None, ValueError, "finite x"),
        (torch.randn(B, L), torch.randn(B, H + 1), ValueError, r"y of shape \(4, 6\)"),
        (torch.randn(B, T, L), torch.randn(B, H), ValueError, r"y of shape \(4, 3, 6\)"),
        (torch.randn(B, L), torch.full((B, H), math.inf), ValueError, "finite y"),
    ],
    ids=["lookback", "ndim", "dtype", "list", "nan-x", "horizon", "chunk", "inf-y"],
)
def test_bad_inputs_are_rejected(x, y, error, match):
    net = make()
    with pytest.raises(error, match=match):
        net.model(x, y)
    with pytest.raises(error, match=match):
        net.guide(x, y)


def test_bad_predict_options():
    net = make()
    with pytest.raises(ValueError, match="num_samples"):
        net.predict(torch.randn(B, L), 0)
    with pytest.raises(ValueError, match="draws"):
        net.model(torch.randn(B, L), torch.randn(B, H), draws=0)


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_fit_learns_a_seasonal_series(temporal):
    torch.manual_seed(0)
    t = torch.arange(600.0)
    series = torch.sin(2 * math.pi * t / 12) + 0.1 * torch.randn(600)
    windows = series.unfold(0, L + H, 1)  # (N, L + H)
    x, y = windows[:, :L], windows[:, L:]
    if temporal:
        n = x.shape[0] // T
        x, y = x[: n * T].reshape(n, T, L), y[: n * T].reshape(n, T, H)
    pyro.set_rng_seed(0)
    net = make(units=4)
    before = ((net.predict_marginal(x).mean - y) ** 2).mean()
    result = fit(net, x, y, epochs=15, batch_size=64, lr=0.01, seed=0, progress=False)
    after = ((net.predict_marginal(x).mean - y) ** 2).mean()
    assert after < 0.1 < before
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert bool(torch.isfinite(net.layers[0].prior.half_life).all())


# ---------------------------------------------------------------------------------------------
# DrawMixture
# ---------------------------------------------------------------------------------------------


def test_draw_mixture_matches_mixture_same_family():
    from vdn_pyro.models.forecaster import DrawMixture

    loc = torch.randn(5, 3, 4)  # (K, *batch)
    scale = 0.5 + torch.rand(4)  # broadcasts over (K, 3, 4)
    fn = DrawMixture(loc, scale)
    assert fn.batch_shape == (3, 4) and fn.event_shape == ()
    ref = dist.MixtureSameFamily(
        dist.Categorical(logits=torch.zeros(3, 4, 5)),
        dist.Normal(loc.movedim(0, -1), scale[:, None].expand(3, 4, 5)),
    )
    y = torch.randn(2, 3, 4)
    assert_close(fn.log_prob(y), ref.log_prob(y), rtol=1e-5, atol=1e-6)
    assert_close(fn.mean, ref.mean, rtol=1e-5, atol=1e-6)
    assert_close(fn.variance, ref.variance, rtol=1e-5, atol=1e-6)
    wide = fn.expand((2, 3, 4))
    assert wide.batch_shape == (2, 3, 4)
    assert_close(wide.log_prob(y), fn.log_prob(y), rtol=1e-6)
    draws = fn.sample((20000,))  # (S, 3, 4)
    assert draws.shape == (20000, 3, 4)
    assert_close(draws.mean(0), fn.mean, atol=0.06)
    assert_close(draws.var(0), fn.variance, rtol=0.08)


def test_local_constraints_act_on_the_forecaster():
    from vdn_pyro.inference.constraints import KLBand, Persistence

    torch.manual_seed(0)
    x, y = torch.randn(64, T, L), torch.randn(64, T, H)
    net = make(phi=0.2)
    band = Persistence(half_life=(2.0, 4.0))
    thermostat = KLBand(low=1e-4, high=2e-4, rate=0.5)
    before = net.layers[0].beta.clone()
    fit(net, x, y, steps=5, batch_size=32, lr=0.01, seed=0, constraints=[band, thermostat], progress=False)
    life = net.layers[0].prior.half_life
    assert bool(((life >= 2.0 - 1e-4) & (life <= 4.0 + 1e-4)).all())
    assert not torch.equal(net.layers[0].beta, before)  # the thermostat moved beta in place


def test_sample_quantiles_match_numpy():
    samples = torch.randn(101, 2, 3)
    pred = ForecastPrediction(samples, torch.zeros(101, 2, 3), torch.ones(101, 2, 3))
    for level in (0.05, 0.5, 0.93):
        assert_close(pred.quantile(level), torch.quantile(samples, level, dim=0), rtol=1e-5, atol=1e-6)


def test_init_skip_copies_and_freezes_a_dlinear():
    from vdn_pyro.models import DLinear

    net = make()
    source = DLinear(L, H, kernel_size=5)
    net.init_skip(source)
    x = torch.randn(B, L)
    assert_close(net.offset(x), source.point(x), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in net.skip.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    with pytest.raises(ValueError, match="kernel_size"):
        make().init_skip(DLinear(L, H, kernel_size=7))
    with pytest.raises(ValueError, match="skip=True"):
        make(skip=False).init_skip(source)
    with pytest.raises(TypeError, match="DLinear"):
        net.init_skip(torch.nn.Linear(L, H))


@pytest.mark.parametrize("deterministic", [False, True])
def test_starting_at_the_source_reproduces_its_predictive(deterministic):
    from vdn_pyro.models import DLinear

    torch.manual_seed(0)
    source = DLinear(L, H, kernel_size=5)
    source.scale.copy_(0.2 + torch.rand(H))
    net = make(deterministic=deterministic)
    net.init_skip(source, start_at_source=True)
    x = torch.randn(B, L)
    pred, ref = net.predict_marginal(x), source.predict(x, num_samples=2)
    assert_close(pred.loc[0], ref.loc[0], rtol=1e-5, atol=1e-5)
    assert_close(pred.scale[0], ref.scale[0], rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in net.head.parameters())  # only the skip path is frozen


def test_mean_from_the_skip_path_leaves_the_neurons_only_the_scale():
    from vdn_pyro.models import DLinear

    torch.manual_seed(0)
    net = make(mean="skip", likelihood_scale="heteroscedastic")
    assert net.head.out_features == H and not net.has_exact_marginal
    x, y = torch.randn(B, T, L), torch.randn(B, T, H)
    pred = net.predict(x[:, 0], num_samples=50)
    assert_close(pred.loc, net.offset(x[:, 0]).expand_as(pred.loc))  # every draw: the skip path's mean
    assert pred.scale.std(0).max() > 0  # ... and its own scale
    LocalELBO().differentiable_loss(net.model, net.guide, x, y).backward()
    assert net.trunk.trend.weight.grad.abs().sum() > 0  # the neurons are trained through the scale
    source = DLinear(L, H, kernel_size=5)
    source.scale.copy_(0.3 + torch.rand(H))
    net.init_skip(source, start_at_source=True)
    pred = net.predict(x[:, 0], num_samples=4)
    assert_close(pred.scale, source.scale.expand_as(pred.scale), rtol=1e-4, atol=1e-5)
    for bad in ({"likelihood_scale": "learned"}, {"skip": False, "likelihood_scale": "heteroscedastic"}):
        with pytest.raises(ValueError, match="mean='skip'"):
            make(mean="skip", **bad)
    with pytest.raises(ValueError, match="mean"):
        make(mean="trunk")

"""Tests for :class:`vdn_pyro.models.RolloutForecaster`: sites and shapes, the roll-out of each
unit's latent by its own AR(1) conditional (exactly, in the guide), the ELBO under every stock
estimator, joint sample paths whose correlation across the horizon comes from the units' memory,
the deterministic twin, stock SVI and the training recipe, and input validation."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import MultivariateNormal

from tests.common import assert_close
from tests.test_path_posterior import dense_chain
from vdn_pyro import LocalELBO
from vdn_pyro.data import ratio_splits
from vdn_pyro.forecasting import TrainConfig, evaluate_forecaster, train_forecaster
from vdn_pyro.models import DLinear, DrawAverage, PathMixture, RolloutConfig, RolloutForecaster
from vdn_pyro.primitives import NEURONS_SAME_LAW_KEY
from vdn_pyro.state_space import PatchStateSpace

L, H, PATCH, U, B = 24, 10, 4, 3, 5  # P = 6 look-back patches, Q = 3 horizon patches (12 >= 10 steps)
SMALL = dict(lookback=L, horizon=H, patch=PATCH, units=U, features=8, kernel_size=5)


def make(**options):
    return RolloutForecaster(**{**SMALL, **options})


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


def set_prior(net, phi, constant, scale):
    """Give the units known AR(1) parameters, each ``(U,)``."""
    prior = net.prior
    with torch.no_grad():
        prior.set_phi(torch.as_tensor(phi, dtype=prior.raw_phi.dtype))
        prior.constant.copy_(torch.as_tensor(constant))
        prior.raw_scale.copy_(torch.as_tensor(scale).expm1().log())


# ---------------------------------------------------------------------------------------------
# Configuration and input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"units": 0}, ValueError, "units >= 1"),
        ({"patch": 2.5}, TypeError, "patch to be an int"),
        ({"patch": 25}, ValueError, "patch <= lookback"),
        ({"prior": "laplace"}, ValueError, "prior in"),
        ({"posterior": "full"}, ValueError, "posterior in"),
        ({"mixture": "sum"}, ValueError, "mixture in"),
        ({"likelihood_scale": 0.5}, ValueError, "likelihood_scale in"),
        ({"mean": "skip", "likelihood_scale": "learned"}, ValueError, "heteroscedastic"),
        ({"mean": "skip", "skip": False}, ValueError, "skip=True"),
        ({"mean": "centred", "skip": False}, ValueError, "mean='centred'.*skip=True"),
        ({"mean": "middle"}, ValueError, "mean in"),
        ({"train_draws": 0}, ValueError, "train_draws >= 1"),
        ({"beta": -1.0}, ValueError, "beta > 0"),
        ({"beta": [1.0, 2.0]}, ValueError, r"shape \(3,\)"),
        ({"horizon_posterior": "data"}, ValueError, "horizon_posterior in"),
        ({"horizon_beta": 0.0}, ValueError, "horizon_beta > 0"),
    ],
)
def test_bad_config_is_refused(options, error, match):
    with pytest.raises(error, match=match):
        make(**options)


def test_config_object_and_overrides():
    config = RolloutConfig(**SMALL)
    assert (config.num_patches, config.num_future) == (6, 3)
    net = RolloutForecaster(config, units=4)
    assert net.config.units == 4 and config.units == U
    with pytest.raises(TypeError, match="RolloutConfig"):
        RolloutForecaster(dict(SMALL))


@pytest.mark.parametrize(
    "x, y, error, match",
    [
        ([0.0] * L, None, TypeError, "torch.Tensor"),
        (torch.zeros(B, L, dtype=torch.long), None, TypeError, "floating dtype"),
        (torch.zeros(B, L, dtype=torch.float64), None, TypeError, "dtype torch.float32"),
        (torch.zeros(B, L + 1), None, ValueError, r"\(B, 24\)"),
        (torch.zeros(B, L), torch.zeros(B, H + 1), ValueError, r"Expected y of shape \(5, 10\)"),
        (torch.full((B, L), math.nan), None, ValueError, "finite x"),
    ],
)
def test_bad_input_is_refused(x, y, error, match):
    net = make()
    with pytest.raises(error, match=match):
        net(x, y)
    with pytest.raises(error, match=match):
        net.predict(x) if y is None else net.check_inputs(x, y)


def test_bad_call_options_are_refused():
    net, x = make(), torch.randn(B, L)
    with pytest.raises(ValueError, match="num_samples"):
        net.predict(x, num_samples=0)
    with pytest.raises(ValueError, match="draws"):
        net(x, torch.randn(B, H), draws=0)
    with pytest.raises(ValueError, match="skip path"):
        make(skip=False).init_skip(DLinear(L, H, 5))
    with pytest.raises(ValueError, match="lookback, horizon"):
        make().init_skip(DLinear(L, H + 1, 5))
    with pytest.raises(TypeError, match="DLinear"):
        make().init_skip(torch.nn.Linear(L, H))


# ---------------------------------------------------------------------------------------------
# Sites and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("draws", [1, 3])
@pytest.mark.parametrize("posterior", ["path", "diagonal"])
def test_sites_and_shapes(draws, posterior):
    net = make(posterior=posterior)
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(net, x, y, draws=draws)
    sites = latent_sites(guide_tr)
    assert list(sites) == ["layers.0.z", "rollout.z"] == net.site_names + [net.rollout_site]
    lead = (B, U) if draws == 1 else (draws, 1, B, U)
    assert sites["layers.0.z"]["fn"].batch_shape == lead
    assert sites["layers.0.z"]["fn"].event_shape == (1, 6)
    assert sites["rollout.z"]["fn"].batch_shape == lead
    assert sites["rollout.z"]["fn"].event_shape == (1, 3)
    assert model_tr.nodes["obs"]["value"].shape == (B, 1, H)
    assert set(latent_sites(model_tr)) == set(sites)
    # per-unit beta (over K draws) on both sides of both sites
    for name in sites:
        for trace in (guide_tr, model_tr):
            assert_close(trace.nodes[name]["scale"], net.layers[0].beta / draws)


def test_forward_and_predict_shapes_and_chunks():
    net = make()
    x = torch.randn(B, L)
    assert net(x).shape == (B, H)
    pred = net.predict(x, num_samples=7)
    assert pred.samples.shape == pred.loc.shape == pred.scale.shape == (7, B, H)
    assert net.predict(x, num_samples=7, batch_size=2).samples.shape == (7, B, H)
    chunks = torch.randn(2, 3, L)  # (B, T, L): read as 6 windows
    assert net(chunks).shape == (2, 3, H)
    assert net.predict(chunks, num_samples=4).samples.shape == (4, 2, 3, H)
    loss = LocalELBO().differentiable_loss(net.model, net.guide, chunks, torch.randn(2, 3, H), num_data=10)
    assert math.isfinite(loss.item())
    last, future = net.sample_latents(x, 6)
    assert last.shape == (6, B, U) and future.shape == (6, B, 3, U)


def test_chunks_are_windows():
    """A chunk of T windows is the same ELBO as its T windows, and num_data counts items."""
    torch.set_default_dtype(torch.float64)
    net = make(likelihood_scale="learned")
    x, y = torch.randn(2, 3, L), torch.randn(2, 3, H)
    pyro.set_rng_seed(1)
    chunked = LocalELBO().loss(net.model, net.guide, x, y, num_data=8, draws=2)
    pyro.set_rng_seed(1)
    flat = LocalELBO().loss(net.model, net.guide, x.flatten(0, 1), y.flatten(0, 1), num_data=24, draws=2)
    assert_close(chunked, flat, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The roll-out: each unit's own AR(1) conditional, in the model and (exactly) in the guide
# ---------------------------------------------------------------------------------------------

PHI, CONST, SCALE = [0.9, 0.5, -0.6], [0.3, -0.2, 0.0], [0.5, 1.0, 0.2]


@pytest.mark.parametrize("posterior", ["path", "diagonal"])
def test_guide_rolls_each_unit_by_its_ar_conditional(posterior):
    """Many guide draws of one window: the rolled latents' residuals are N(0, s^2) innovations,
    and their mean and covariance are the AR(1) formulas from the posterior of z_P."""
    torch.set_default_dtype(torch.float64)
    net = make(posterior=posterior, init_scale=0.7)
    set_prior(net, PHI, CONST, SCALE)
    n = 40000
    x = torch.randn(1, L).expand(n, L)
    trace = poutine.trace(net.guide).get_trace(x, torch.zeros(n, H), draws=1)
    last = trace.nodes["layers.0.z"]["value"][..., 0, -1]  # (n, U)
    future = trace.nodes["rollout.z"]["value"][..., 0, :]  # (n, U, Q)
    phi, const, s = (torch.tensor(v) for v in (PHI, CONST, SCALE))
    steps = future.shape[-1]

    # 1. conditional: z_{P+j} - c - phi z_{P+j-1} are i.i.d. N(0, s^2), independent of z_P
    prev = torch.cat([last[..., None], future[..., :-1]], -1)  # (n, U, Q)
    resid = (future - const[:, None] - phi[:, None] * prev) / s[:, None]  # (n, U, Q)
    se = 1 / math.sqrt(n)
    assert resid.mean(0).abs().max() < 5 * se
    assert (resid.var(0) - 1).abs().max() < 5 * math.sqrt(2) * se
    flat = torch.cat([resid, last[..., None]], -1)  # (n, U, Q + 1)
    for u in range(U):
        corr = torch.corrcoef(flat[:, u].T)  # (Q + 1, Q + 1)
        assert (corr - torch.eye(steps + 1)).abs().max() < 5 * se

    # 2. marginal: mean and covariance by the AR(1) formulas from q(z_P) = N(m, v)
    loc, scale = net.posterior(x[:1])  # (1, U, 1, P)
    m, v = loc[0, :, 0, -1], scale[0, :, 0, -1] ** 2  # (U,)
    for u in range(U):
        j = torch.arange(1, steps + 1, dtype=torch.float64)  # (Q,)
        power = phi[u] ** j
        mean = power * m[u] + const[u] * (1 - power) / (1 - phi[u])  # (Q,)
        var = power**2 * v[u] + s[u] ** 2 * (1 - power**2) / (1 - phi[u] ** 2)  # (Q,)
        lag = (j[:, None] - j[None, :]).abs()  # (Q, Q)
        cov = phi[u] ** lag * var[torch.minimum(j[:, None], j[None, :]).long() - 1]  # (Q, Q)
        sample = future[:, u]  # (n, Q)
        assert ((sample.mean(0) - mean).abs() / var.sqrt()).max() < 5 * se
        emp = torch.cov(sample.T)  # (Q, Q)
        norm = (var[:, None] * var[None, :]).sqrt()  # (Q, Q)
        assert ((emp - cov).abs() / norm).max() < 0.03

    # 3. the mean path (diagnostics, median) is the conditional mean from the posterior mean
    post = net.posteriors(x[:1])
    assert set(post) == {"layers.0.z", "rollout.z"}
    rolled = post["rollout.z"][0][0, :, 0]  # (U, Q)
    j = torch.arange(1, steps + 1, dtype=torch.float64)
    power = phi[:, None] ** j  # (U, Q)
    expected = power * m[:, None] + const[:, None] * (1 - power) / (1 - phi[:, None])
    assert_close(rolled, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("draws", [1, 4])
def test_rollout_site_contributes_exactly_no_kl(draws):
    """Model and guide give the roll-out site the same density at the same value, so its
    log q - log p is 0 for every draw, in value and (up to rounding) in gradient."""
    torch.set_default_dtype(torch.float64)
    net = make(beta=0.3)
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(net, x, y, draws=draws)
    lq = guide_tr.nodes["rollout.z"]["fn"].log_prob(guide_tr.nodes["rollout.z"]["value"])
    lp = model_tr.nodes["rollout.z"]["fn"].log_prob(model_tr.nodes["rollout.z"]["value"])
    assert lq.shape == guide_tr.nodes["rollout.z"]["fn"].batch_shape
    assert torch.equal(lq, lp)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad((lq - lp).sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() < 1e-12 for g in grads)  # float64 rounding at most
    # the AR parameters do reach the likelihood through the roll-out
    log_lik = model_tr.nodes["obs"]["fn"].log_prob(model_tr.nodes["obs"]["value"]).sum()
    grads = torch.autograd.grad(log_lik, [net.prior.raw_phi, net.prior.raw_scale, net.prior.constant])
    assert all(g.abs().sum() > 0 for g in grads)
    # LocalELBO charges the roll-out site nothing, and reports only the look-back units (the
    # rolled latents have no information budget of their own: no statistics, no constraint hooks)
    elbo = LocalELBO()
    loss, stats = elbo.loss_and_stats(net.model, net.guide, x, y, draws=draws)
    assert set(stats) == {"layers.0.z"}
    assert (stats["layers.0.z"].kl > 0).all()

    class Spy:  # an identity hook that notes the sites it is asked to transform
        def __init__(self):
            self.sites = []

        def transform_kl(self, site, kl):
            self.sites.append(site)
            return kl

    spy = Spy()
    LocalELBO(hooks=[spy]).loss_and_stats(net.model, net.guide, x, y, draws=draws)
    assert spy.sites == ["layers.0.z"]


@pytest.mark.parametrize("draws", [1, 3])
def test_skipping_the_same_law_site_changes_nothing(draws, monkeypatch):
    """LocalELBO skips the roll-out site (``same_law=True``) instead of evaluating its two equal
    log densities: loss and gradients are those of the evaluated version (float64)."""
    import vdn_pyro.inference.elbo as elbo_module

    torch.set_default_dtype(torch.float64)
    net = make(beta=0.3)
    x, y = torch.randn(B, L), torch.randn(B, H)
    params = [p for p in net.parameters() if p.requires_grad]

    def loss_and_grads():
        with pyro.poutine.seed(rng_seed=3):
            loss = LocalELBO().differentiable_loss(net.model, net.guide, x, y, draws=draws)
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    skipped, skipped_grads = loss_and_grads()
    monkeypatch.setattr(elbo_module, "NEURONS_SAME_LAW_KEY", "not a key")  # evaluate the site
    evaluated, evaluated_grads = loss_and_grads()
    assert_close(skipped, evaluated, atol=1e-12, rtol=0)
    for a, b in zip(skipped_grads, evaluated_grads):
        if a is None or b is None:
            assert (a if b is None else b) is None or (a if b is None else b).abs().max() < 1e-12
        else:
            assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("draws, particles", [(1, 4000), (3, 300)], ids=["K1", "K3"])
def test_local_elbo_equals_trace_elbo_in_expectation(draws, particles):
    """With the same guide draws (common random numbers) the estimators differ only by the
    look-back KL: Monte Carlo in Trace_ELBO, closed form in LocalELBO and TraceMeanField_ELBO."""
    torch.set_default_dtype(torch.float64)
    net = make(beta=1.0, likelihood_scale="learned")
    x, y = torch.randn(4, L), torch.randn(4, H)
    losses = {}
    for name, elbo in [
        ("local", LocalELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=4)),
        ("trace", Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=4)),
        (
            "mean_field",
            TraceMeanField_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=4),
        ),
    ]:
        pyro.set_rng_seed(3)
        losses[name] = elbo.loss(net.model, net.guide, x, y, draws=draws)
    # the look-back KL by hand: its closed form, and its Monte Carlo spread per particle
    guide_tr, model_tr = traces(net, x, y, draws=1)
    q, p = guide_tr.nodes["layers.0.z"]["fn"], model_tr.nodes["layers.0.z"]["fn"]
    z = q.sample((2000,))  # (2000, B, U, 1, P)
    mc = (q.log_prob(z) - p.log_prob(z)).sum((-1, -2))  # (2000,)
    assert_close(
        mc.mean(), torch.distributions.kl_divergence(q, p).sum(), atol=5 * mc.std() / math.sqrt(2000)
    )
    tolerance = 5 * mc.std().item() / math.sqrt(particles)
    assert abs(losses["local"] - losses["trace"]) < tolerance
    assert_close(losses["local"], losses["mean_field"], rtol=1e-10)  # both closed form, same draws


# ---------------------------------------------------------------------------------------------
# Joint sample paths
# ---------------------------------------------------------------------------------------------


def path_net(prior, phi=0.99):
    """Decoder that adds each unit's rolled latent to every step it reads, with small step noise."""
    net = make(prior=prior, likelihood_scale="learned", mean="head", init_scale=0.5, units=U)
    with torch.no_grad():
        if prior == "ar":
            set_prior(net, [phi] * U, [0.0] * U, [math.sqrt(1 - phi**2)] * U)
        net.loc_weight.fill_(1.0 / U)
        net.scale_bias.fill_(math.log(math.expm1(0.05)))
    return net


def horizon_correlation(samples):
    """Correlation matrix of the steps of the sample paths ``(S, 1, H)``: ``(H, H)``."""
    return torch.corrcoef(samples[:, 0].T)


def test_paths_are_coherent_when_units_remember():
    x = torch.randn(1, L)
    corr = horizon_correlation(path_net("ar").predict(x, num_samples=4000).samples)
    assert corr[0, -1] > 0.8  # first and last step move together
    assert corr.min() > 0.8
    # i.i.d. latents per patch (phi = 0): steps in different patches are uncorrelated
    corr = horizon_correlation(path_net("normal").predict(x, num_samples=4000).samples)
    assert corr[0, PATCH].abs() < 0.1 and corr[0, -1].abs() < 0.1
    assert corr[0, 1] > 0.8  # within a patch, one latent


def test_predict_matches_pyro_predictive():
    """predict draws the model/guide process: the sum over the horizon has the same mean and
    variance as pyro.infer.Predictive's draws of the obs site."""
    net = path_net("ar", phi=0.8)
    x = torch.randn(2, L)
    ours = net.predict(x, num_samples=4000).samples.sum(-1)  # (S, 2)
    theirs = net._predictive(["obs"], 4000, x)["obs"].reshape(4000, 2, H).sum(-1)  # (S, 2)
    se = ours.std(0) / math.sqrt(4000)
    assert ((ours.mean(0) - theirs.mean(0)).abs() < 6 * se).all()
    assert ((ours.var(0) / theirs.var(0) - 1).abs() < 0.1).all()


def test_path_mixture():
    torch.set_default_dtype(torch.float64)
    loc, scale = torch.randn(4, 3, 2, 5), 0.5 + torch.rand(4, 3, 2, 5)  # (K, 3, 2, H)
    fn = PathMixture(loc, scale)
    assert fn.batch_shape == (3, 2) and fn.event_shape == (5,)
    y = torch.randn(3, 2, 5)
    comps = torch.distributions.Normal(loc, scale).log_prob(y).sum(-1)  # (K, 3, 2)
    assert_close(fn.log_prob(y), torch.logsumexp(comps, 0) - math.log(4), rtol=1e-12)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(3, 2, 4)),
        torch.distributions.Independent(
            torch.distributions.Normal(loc.movedim(0, -2), scale.movedim(0, -2)), 1
        ),
    )
    assert_close(fn.log_prob(y), mix.log_prob(y), rtol=1e-12)
    wide = fn.expand((7, 3, 2))
    assert wide.batch_shape == (7, 3, 2) and wide.log_prob(y).shape == (7, 3, 2)
    draws = fn.sample((20000,))  # (S, 3, 2, H)
    assert draws.shape == (20000, 3, 2, 5)
    assert_close(draws.mean(0), fn.mean, atol=0.05)
    # a path draws one component: its steps share it, unlike a per-element mixture
    one = PathMixture(torch.tensor([[-3.0, -3.0], [3.0, 3.0]]), torch.tensor(0.1)).sample((2000,))
    assert (one[:, 0].sign() == one[:, 1].sign()).all()


# ---------------------------------------------------------------------------------------------
# The deterministic twin and the skip path
# ---------------------------------------------------------------------------------------------


def test_twin_is_the_conditional_mean_network():
    torch.set_default_dtype(torch.float64)
    twin = make(deterministic=True, likelihood_scale="learned", mean="head")
    set_prior(twin, PHI, CONST, SCALE)
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(twin, x, y)
    assert latent_sites(guide_tr) == {} and latent_sites(model_tr) == {}
    pred = twin.predict(x, num_samples=6)
    assert pred.num_components == 1 and pred.samples.shape == (6, B, H)
    # by hand: z_P = posterior mean, rolled by the conditional mean, read by each step's patch
    loc, _ = twin.posterior(x)  # (B, U, 1, P)
    m = loc[:, :, 0, -1]  # (B, U)
    phi, const = torch.tensor(PHI), torch.tensor(CONST)
    j = torch.arange(1, 4, dtype=torch.float64)  # (Q,)
    z = phi[:, None] ** j * m[..., None] + const[:, None] * (1 - phi[:, None] ** j) / (1 - phi[:, None])
    z = z.transpose(-1, -2)  # (B, Q, U)
    patch = torch.arange(H) // PATCH  # (H,)
    w = twin.loc_weight.reshape(-1, U)[:H]  # (H, U)
    expected = (z[:, patch] * w).sum(-1) + twin.loc_bias[:H] + twin.skip(x)  # skip_norm=None: no offset
    assert_close(pred.loc[0], expected, rtol=1e-10, atol=1e-12)
    # its loss is minus the Gaussian log-likelihood: no KL
    nll = -torch.distributions.Normal(pred.loc[0], pred.scale[0]).log_prob(y).sum()
    assert_close(LocalELBO().loss(twin.model, twin.guide, x, y), nll, rtol=1e-10)
    assert_close(Trace_ELBO().loss(twin.model, twin.guide, x, y), nll, rtol=1e-10)


def test_centred_mean_by_hand():
    """mean='centred': each draw's mean is the skip path plus W (z - m), with m the roll-out of
    the posterior mean of z_P; there is no bias, and the likelihood reads exactly that."""
    torch.set_default_dtype(torch.float64)
    net = make(mean="centred", likelihood_scale="learned", train_draws=1)
    set_prior(net, PHI, CONST, SCALE)
    assert net.loc_bias is None and net.loc_weight is not None
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(net, x, y)
    future = guide_tr.nodes["rollout.z"]["value"][:, :, 0]  # (B, U, Q)
    loc, _ = net.posterior(x)  # (B, U, 1, P)
    m = loc[:, :, 0, -1]  # (B, U)
    phi, const = torch.tensor(PHI), torch.tensor(CONST)
    j = torch.arange(1, 4, dtype=torch.float64)  # (Q,)
    centre = phi[:, None] ** j * m[..., None] + const[:, None] * (1 - phi[:, None] ** j) / (1 - phi[:, None])
    dev = (future - centre).transpose(-1, -2)  # (B, Q, U)
    patch = torch.arange(H) // PATCH  # (H,)
    w = net.loc_weight.reshape(-1, U)[:H]  # (H, U)
    expected = (dev[:, patch] * w).sum(-1) + net.skip(x)  # (B, H)
    obs = model_tr.nodes["obs"]["fn"]
    assert_close(obs.base_dist.loc[:, 0], expected, rtol=1e-10, atol=1e-12)


def test_centred_mean_is_the_skip_path():
    """The predictive mean of the centred roll-out is the skip path (up to Monte Carlo error),
    while the paths still move together; its twin's mean is the skip path exactly."""
    torch.manual_seed(0)
    net = make(mean="centred", likelihood_scale="learned", prior="ar")
    set_prior(net, [0.99] * U, [0.3] * U, [math.sqrt(1 - 0.99**2)] * U)
    with torch.no_grad():
        net.loc_weight.fill_(1.0 / U)
        net.scale_bias.fill_(math.log(math.expm1(0.05)))
    x = torch.randn(2, L)
    pred = net.predict(x, num_samples=8000)
    spread = pred.samples.std(0)  # (2, H)
    error = (pred.samples.mean(0) - net.skip(x)).abs()  # (2, H)
    assert (error < 5 * spread / math.sqrt(8000)).all()
    assert horizon_correlation(pred.samples[:, :1])[0, -1] > 0.8
    twin = make(mean="centred", deterministic=True)
    assert_close(twin.predict(x, num_samples=2).loc[0], twin.skip(x), rtol=0, atol=0)
    # the point forecast is that exact mean, not the average of the draws
    assert_close(pred.point, net.skip(x), rtol=0, atol=0)
    assert pred.mean is pred.point
    assert not torch.equal(pred.loc.mean(0), pred.point)


@pytest.mark.parametrize("mean", ["head", "centred", "skip"])
def test_point_forecast_is_the_exact_predictive_mean(mean):
    """The decoder's mean is affine in the rolled latents, so the predictive mean is the decoder's
    mean at the latents' mean m(x): the draws' components average to it (within 5 Monte Carlo
    standard errors), in every mean mode and however the windows are batched."""
    torch.manual_seed(1)
    net = make(mean=mean, likelihood_scale="heteroscedastic", prior="ar")
    set_prior(net, [0.9, 0.5, -0.3], [0.2, -0.1, 0.4], [0.6, 0.8, 0.5])
    if net.loc_weight is not None:
        with torch.no_grad():
            net.loc_weight.normal_()
    x = torch.randn(3, L)
    pred = net.predict(x, num_samples=6000, batch_size=2)
    centre = net.rollout_mean(x)  # (3, Q, U)
    patch = torch.arange(H) // PATCH  # (H,)
    expected = net.skip(x)  # (3, H)
    if mean != "skip":
        w = net.loc_weight.reshape(-1, U)[:H]  # (H, U)
        base = centre if mean == "head" else torch.zeros_like(centre)
        expected = expected + (base[:, patch] * w).sum(-1)
    if mean == "head":
        expected = expected + net.loc_bias[:H]
    assert_close(pred.point, expected, rtol=1e-5, atol=1e-5)
    spread = pred.loc.std(0)  # (3, H)
    error = (pred.loc.mean(0) - pred.point).abs()  # (3, H)
    assert (error <= 5 * spread / math.sqrt(6000) + 1e-6).all()
    assert pred.point.shape == (3, H)
    chunked = net.predict(x.reshape(3, 1, L), num_samples=4)
    assert_close(chunked.point, pred.point.reshape(3, 1, H), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mean", ["head", "centred"])
def test_start_at_source_is_the_dlinear_predictive(mean):
    net = make(mean=mean)
    source = DLinear(L, H, 5)
    with torch.no_grad():
        source.scale = torch.linspace(0.3, 0.8, H)
    net.init_skip(source, freeze=True, start_at_source=True)
    assert not any(p.requires_grad for p in net.skip.parameters())
    x = torch.randn(B, L)
    pred = net.predict(x, num_samples=5)
    assert_close(pred.loc, source.point(x).expand(5, B, H), atol=1e-5)
    assert_close(pred.scale, source.scale.expand(5, B, H), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Stock Pyro and the training recipe
# ---------------------------------------------------------------------------------------------


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unmoved(module, before):
    return [name for name, p in module.named_parameters() if torch.equal(p.detach(), before[name])]


BUILDS = {
    "path-K1": dict(train_draws=1),
    "path-K3": dict(train_draws=3),
    "diagonal-step-K3": dict(train_draws=3, posterior="diagonal", mixture="step"),
    "skip-mean": dict(train_draws=2, mean="skip"),
    "centred-mean": dict(train_draws=2, mean="centred"),
    "amortized-K2": dict(train_draws=2, horizon_posterior="amortized"),
    "exact": dict(horizon_posterior="exact"),
    "exact-path-head": dict(horizon_posterior="exact", posterior="path", mean="head"),
    "exact-mixture-K3": dict(horizon_posterior="exact_mixture", train_draws=3),
    "exact-mixture-K1-head": dict(horizon_posterior="exact_mixture", train_draws=1, mean="head"),
}


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO, LocalELBO], ids=lambda e: e.__name__)
@pytest.mark.parametrize("options", list(BUILDS.values()), ids=list(BUILDS))
def test_stock_svi_trains_every_parameter(options, elbo):
    assert pyro.settings.get("module_local_params") is False
    net = make(**options)
    x, y = torch.randn(B, 2, L), torch.randn(B, 2, H)
    before = snapshot(net)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), elbo())
    losses = [svi.step(x, y) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert unmoved(net, before) == []
    stored = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert {id(p) for p in net.parameters()} <= stored


def test_module_local_params_trains_every_parameter(module_local_params):
    net = make(train_draws=3)
    x, y = torch.randn(B, L), torch.randn(B, H)
    before = snapshot(net)
    elbo = Trace_ELBO()(net.model, net.guide)
    optimizer = torch.optim.Adam(elbo.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        loss = elbo(x, y)
        loss.backward()
        optimizer.step()
    assert math.isfinite(loss.item())
    assert unmoved(net, before) == []
    assert len(pyro.get_param_store()) == 0


def test_trains_with_the_shared_recipe():
    """train_forecaster (two-stage ridge skip path, chunks, validation selection) runs unchanged
    and the selected model is scored by evaluate_forecaster."""
    t = np.arange(700)[:, None]
    rng = np.random.default_rng(0)
    values = np.sin(2 * np.pi * t / 12 + np.arange(2)) + 0.2 * rng.standard_normal((700, 2))
    splits = ratio_splits(values, L, H, train=0.6, val=0.2)
    net = make(train_draws=4)
    config = TrainConfig(epochs=2, batch_size=64, chunk=2, skip_fit="ridge", num_samples=16, patience=0)
    result = train_forecaster(net, splits, config, seed=0)
    assert result is not None and result.steps > 0
    assert not any(p.requires_grad for p in net.skip.parameters())
    x_val, y_val = splits.windows("val")
    scores = evaluate_forecaster(net, x_val, y_val, num_samples=16)
    assert math.isfinite(scores["crps"]) and math.isfinite(scores["nll"])
    assert net.half_life().shape == (U,)


# ---------------------------------------------------------------------------------------------
# Amortized posterior of the horizon's latents
# ---------------------------------------------------------------------------------------------


def amortized(**options):
    """An amortized network whose posterior head is not at its (prior-equal) start."""
    net = make(horizon_posterior="amortized", **options)
    with torch.no_grad():
        net.target_head.weight.normal_(0.0, 0.3)
        net.target_head.bias.normal_(0.0, 0.3)
    return net


def chain_kl_by_hand(net, last, posterior):
    """KL of the guide's horizon chain to the AR conditional, from dense Gaussians built by
    hand: ``last`` ``(..., B, U)`` (z_P), ``posterior`` the (loc, scale, turn) of the network,
    each ``(B, U, Q)``. Returns ``(..., B, U)``."""
    loc, scale, turn = posterior
    prior, steps = net.prior, net.config.num_future
    phi, const, s = prior.phi[:, 0], prior.constant, prior.scale  # (U,) each
    lead = last.shape
    q_transition = (phi[:, None] + turn).expand(lead + (steps,))  # (..., B, U, Q)
    q_offset = (const[:, None] + s[:, None] * loc).expand(lead + (steps,)).clone()
    q_offset[..., 0] += q_transition[..., 0] * last  # (phi + d_1) z_P
    q_scale = (s[:, None] * scale).expand(lead + (steps,))
    p_transition = phi[:, None].expand(lead + (steps,))
    p_offset = const[:, None].expand(lead + (steps,)).clone()
    p_offset[..., 0] += phi * last
    p_scale = s[:, None].expand(lead + (steps,))
    q = MultivariateNormal(*dense_chain(q_transition, q_offset, q_scale))
    p = MultivariateNormal(*dense_chain(p_transition, p_offset, p_scale))
    return torch.distributions.kl_divergence(q, p)


def test_draw_average_is_the_mean_of_the_draws_log_densities():
    torch.set_default_dtype(torch.float64)
    loc, scale = torch.randn(4, 3, H), 0.5 + torch.rand(4, 3, H)  # K = 4 draws, batch 3
    y = torch.randn(2, 3, H)  # (sample, batch, H)
    expected = torch.distributions.Normal(loc, scale).log_prob(y[:, None]).sum(-1).mean(1)  # (2, 3)
    fn = DrawAverage(loc, scale)
    assert fn.batch_shape == (3,) and fn.event_shape == (H,)
    assert_close(fn.log_prob(y), expected, rtol=1e-12, atol=1e-12)
    wide = fn.expand((5, 3))
    assert isinstance(wide, DrawAverage) and wide.batch_shape == (5, 3)
    assert_close(wide.log_prob(y[0]), expected[0].expand(5, 3), rtol=1e-12, atol=1e-12)
    assert fn.sample((7,)).shape == (7, 3, H)


def test_amortized_posterior_starts_at_the_prior():
    """A fresh amortized network's posterior is the AR conditional itself (innovations N(0, 1),
    the prior's transition): the roll-out site's KL is 0."""
    torch.set_default_dtype(torch.float64)
    net = make(horizon_posterior="amortized")
    x, y = torch.randn(B, L), torch.randn(B, H)
    loc, scale, turn = net.innovation_posterior(x, y)
    assert loc.shape == scale.shape == turn.shape == (B, U, net.config.num_future)
    assert torch.equal(loc, torch.zeros_like(loc)) and torch.equal(turn, torch.zeros_like(turn))
    assert_close(scale, torch.ones_like(scale), atol=1e-12, rtol=0)
    guide_tr, model_tr = traces(net, x, y, draws=2)
    kl = torch.distributions.kl_divergence(
        guide_tr.nodes["rollout.z"]["fn"], model_tr.nodes["rollout.z"]["fn"]
    )
    assert_close(kl, torch.zeros_like(kl), atol=1e-10, rtol=0)


@pytest.mark.parametrize("draws", [1, 3])
def test_amortized_rollout_site_is_the_posterior_chain(draws):
    """The guide's horizon latents follow q(z_j | z_{j-1}) = N((phi + d_j) z_{j-1} + c + s a_j,
    s^2 b_j^2) from z_P; the site's KL to the AR conditional is the dense Gaussian KL (float64),
    per unit and draw, and its scale is horizon_beta / K."""
    torch.set_default_dtype(torch.float64)
    net = amortized()
    set_prior(net, [0.9, 0.5, -0.3], [0.2, -0.1, 0.0], [0.7, 1.3, 0.4])
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(net, x, y, draws=draws)
    q, p = guide_tr.nodes["rollout.z"]["fn"], model_tr.nodes["rollout.z"]["fn"]
    posterior = net.innovation_posterior(x, y)  # (B, U, Q) x 3
    assert posterior[2].abs().min() > 0  # the transitions moved off the prior's
    last = guide_tr.nodes["layers.0.z"]["value"][..., 0, -1]  # (..., B, U)
    kl = torch.distributions.kl_divergence(q, p)  # (K, 1, B, U) or (B, U)
    assert kl.shape == q.batch_shape
    assert_close(kl, chain_kl_by_hand(net, last, posterior), rtol=0, atol=1e-8)
    # the guide's value is the recursion of its chain on standard Normal noise
    z = guide_tr.nodes["rollout.z"]["value"][..., 0, :]  # (..., B, U, Q)
    loc, scale, turn = posterior
    prior = net.prior
    phi, const, s = prior.phi[:, :1], prior.constant[:, None], prior.scale[:, None]  # (U, 1) each
    prev = torch.cat([last.unsqueeze(-1), z[..., :-1]], -1)  # (..., B, U, Q)
    white = (z - (phi + turn) * prev - const - s * loc) / (s * scale)  # standard Normal draws
    assert 0.5 < white.std() < 1.5 and white.abs().max() < 6
    assert_close(guide_tr.nodes["rollout.z"]["scale"], net.horizon_beta / draws, rtol=0, atol=0)


def test_horizon_beta_weights_the_horizon_kl_per_unit():
    """Same draws, two per-unit horizon betas: the losses differ by (beta' - beta) . KL."""
    torch.set_default_dtype(torch.float64)
    x, y = torch.randn(B, L), torch.randn(B, H)
    losses = {}
    for name, beta in [("one", 1.0), ("mixed", [0.5, 2.0, 3.0])]:
        torch.manual_seed(0)
        net = amortized(horizon_beta=beta, train_draws=2)
        with pyro.poutine.seed(rng_seed=5):
            losses[name] = LocalELBO().differentiable_loss(net.model, net.guide, x, y)
    with pyro.poutine.seed(rng_seed=5):  # the same draws of z_P
        guide_tr, model_tr = traces(net, x, y)
    kl = torch.distributions.kl_divergence(
        guide_tr.nodes["rollout.z"]["fn"], model_tr.nodes["rollout.z"]["fn"]
    )
    per_unit = kl.reshape(2, B, U).sum((0, 1)) / 2  # (U,): the K = 2 draws averaged
    delta = torch.tensor([0.5 - 1.0, 2.0 - 1.0, 3.0 - 1.0])
    assert_close(losses["mixed"] - losses["one"], (delta * per_unit).sum(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("draws", [1, 3])
def test_amortized_elbo_is_the_same_under_local_and_mean_field(draws):
    """Both read the closed-form KLs (look-back and horizon): same draws, same loss; Trace_ELBO's
    Monte Carlo KL agrees in expectation."""
    torch.set_default_dtype(torch.float64)
    net = amortized(beta=0.5, train_draws=draws)
    x, y = torch.randn(4, L), torch.randn(4, H)
    with pyro.poutine.seed(rng_seed=1):
        local = LocalELBO().differentiable_loss(net.model, net.guide, x, y)
    with pyro.poutine.seed(rng_seed=1):
        mean_field = TraceMeanField_ELBO().differentiable_loss(net.model, net.guide, x, y)
    assert_close(local, mean_field, rtol=1e-10, atol=1e-10)
    # by hand, from the traces of the same draws: -E log p(y | z) + beta KL_past + KL_horizon
    with pyro.poutine.seed(rng_seed=1):
        guide_tr, model_tr = traces(net, x, y)
    past_q, past_p = guide_tr.nodes["layers.0.z"]["fn"], model_tr.nodes["layers.0.z"]["fn"]
    horizon_q, horizon_p = guide_tr.nodes["rollout.z"]["fn"], model_tr.nodes["rollout.z"]["fn"]
    log_lik = model_tr.nodes["obs"]["fn"].log_prob(model_tr.nodes["obs"]["value"]).sum()
    kl_past = torch.distributions.kl_divergence(past_q, past_p).sum() * 0.5 / draws
    kl_horizon = torch.distributions.kl_divergence(horizon_q, horizon_p).sum() / draws
    assert_close(local, -log_lik + kl_past + kl_horizon, rtol=1e-10, atol=1e-10)
    # with K draws the likelihood is the average of the draws' path log densities
    loc, scale = net.components(x, net.layers[0].pool(model_tr.nodes["rollout.z"]["value"], True))
    by_draw = torch.distributions.Normal(loc, scale).log_prob(y).sum(-1)  # (..., B)
    assert_close(log_lik, by_draw.reshape(-1, 4).mean(0).sum(), rtol=1e-10, atol=1e-10)


def test_amortized_forecasts_roll_the_prior():
    """The amortized posterior is a training device: with the target unseen the network forecasts
    from the prior roll-out, exactly as the same network with horizon_posterior="prior"."""
    torch.manual_seed(0)
    net = amortized(train_draws=2)
    plain = make(train_draws=2)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(("target_", "horizon_beta"))}
    plain.load_state_dict(state)
    x = torch.randn(B, L)
    torch.manual_seed(1)
    a = net.predict(x, num_samples=20)
    torch.manual_seed(1)
    b = plain.predict(x, num_samples=20)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.mean, b.mean)
    # Pyro's Predictive with the guide (no target): the horizon latents are the prior roll-out
    guide_tr = poutine.trace(net.guide).get_trace(x)
    assert guide_tr.nodes["rollout.z"]["infer"][NEURONS_SAME_LAW_KEY] is True


def test_innovation_posterior_needs_the_amortized_network():
    x, y = torch.randn(B, L), torch.randn(B, H)
    with pytest.raises(ValueError, match="horizon_posterior='amortized'"):
        make().innovation_posterior(x, y)
    with pytest.raises(ValueError, match="horizon_posterior='amortized'"):
        make(horizon_posterior="amortized", deterministic=True).innovation_posterior(x, y)
    assert make(horizon_posterior="amortized", deterministic=True).target_head is None


# ---------------------------------------------------------------------------------------------
# The exact path likelihood (horizon_posterior="exact")
# ---------------------------------------------------------------------------------------------


def obs_log_prob(net, x, y, **kwargs):
    """log p(y | ...) of the obs site in the model replayed on a guide draw: ``(B,)``."""
    _, model_tr = traces(net, x, y, **kwargs)
    site = model_tr.nodes["obs"]
    return site["fn"].log_prob(site["value"]).reshape(-1)


@pytest.mark.parametrize("posterior", ["diagonal", "path"])
def test_exact_likelihood_is_the_limit_of_the_path_mixture(posterior):
    """With a likelihood scale that does not read the latents, the K-draw path mixture estimates
    the same predictive density that the exact likelihood computes: they agree as K grows."""
    torch.set_default_dtype(torch.float64)
    options = dict(mean="centred", posterior=posterior, likelihood_scale="learned", phi=0.8)
    exact, mixed = make(horizon_posterior="exact", **options), make(**options)
    with torch.no_grad():
        exact.scale_bias.copy_(torch.linspace(0.0, 1.0, exact.scale_bias.shape[0]))
        exact.loc_weight.mul_(0.5)  # components that overlap: the mixture's error shrinks faster
    mixed.load_state_dict(exact.state_dict())
    with torch.no_grad():  # the exact decoder scales the paths' deviation by sigma: the same law
        sigma = torch.nn.functional.softplus(exact.scale_bias) + exact.config.likelihood_scale_min
        mixed.loc_weight.mul_(sigma.reshape(-1, PATCH, 1))
    x = torch.randn(3, L)
    y = exact.predict(x, num_samples=1).samples[0]  # (3, H): a path of the model itself
    want = obs_log_prob(exact, x, y)  # exact: no draw is involved
    assert_close(obs_log_prob(exact, x, y), want, atol=0, rtol=0)
    assert (obs_log_prob(mixed, x, y, draws=16) - want).abs().max() > 0.1  # K = 16 is far from it
    assert_close(obs_log_prob(mixed, x, y, draws=40000), want, atol=0.025)
    # and the exact density is the dense Gaussian of the rolled latents' linear map
    fn = exact.exact_predictive(x)
    dense = MultivariateNormal(fn.loc, fn.covariance_matrix_dense())
    assert_close(want, dense.log_prob(y), atol=1e-9)


def test_exact_sites():
    net = make(horizon_posterior="exact")
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(net, x, y)
    assert set(latent_sites(guide_tr)) == {"layers.0.z"}  # the horizon's latents are integrated out
    obs = model_tr.nodes["obs"]
    assert isinstance(obs["fn"], PatchStateSpace) and obs["fn"].batch_shape == (B, 1)
    # without a target the model draws the roll-out and the path from it, the same law
    sampled = poutine.trace(net.model).get_trace(x)
    assert net.rollout_site in latent_sites(sampled)
    assert sampled.nodes["obs"]["value"].shape == (B, 1, H)
    with pytest.raises(ValueError, match="horizon_posterior in"):
        make(horizon_posterior="closed")
    with pytest.raises(ValueError, match="mixes no draws"):
        net(x, y, draws=3)
    with pytest.raises(ValueError, match="draws"):
        net(x, y, draws=0)
    assert net(x, y, draws=1).shape == (B, H)
    for other in (make(), make(horizon_posterior="exact", deterministic=True)):
        with pytest.raises(ValueError, match="exact_predictive needs"):
            other.exact_predictive(x)


def test_exact_predict_draws_the_exact_predictive():
    torch.set_default_dtype(torch.float64)
    net = make(horizon_posterior="exact", phi=0.9)
    x = torch.randn(2, L)
    fn = net.exact_predictive(x)
    pred = net.predict(x, num_samples=100000)
    assert_close(pred.point, fn.loc, atol=1e-12)
    dev = pred.samples - fn.loc  # (S, 2, H)
    cov = fn.covariance_matrix_dense()
    emp = torch.einsum("sbh,sbk->bhk", dev, dev) / dev.shape[0]
    assert_close(emp, cov, atol=0.03 * cov.abs().max().item())
    # the scale reads the rolled latents' mean: every draw has the same per-step noise
    assert_close(pred.scale, pred.scale[:1].expand_as(pred.scale), atol=0)


@pytest.mark.parametrize("horizon_posterior", ["exact", "exact_mixture"])
def test_exact_start_at_source_keeps_small_loadings(horizon_posterior):
    """At zero loadings the exact likelihood's gradient in them is zero (a stationary point), so
    the start from a skip path shrinks them instead; the predictive is then nearly the source's."""
    net = make(horizon_posterior=horizon_posterior, train_draws=2)
    init = net.loc_weight.detach().clone()
    source = DLinear(L, H, 5)
    with torch.no_grad():
        source.scale = torch.linspace(0.3, 0.8, H)
    net.init_skip(source, freeze=True, start_at_source=True)
    assert_close(net.loc_weight, 0.01 * init, atol=0)
    assert (net.scale_weight == 0).all()
    x, y = torch.randn(B, L), torch.randn(B, H)
    if horizon_posterior == "exact":
        fn = net.exact_predictive(x)
        assert_close(fn.loc, source.point(x), atol=1e-5)
        spread = fn.covariance_matrix_dense().diagonal(dim1=-2, dim2=-1).sqrt()  # (B, H)
        assert_close(spread, source.scale.expand(B, H), atol=1e-3)
    loss = LocalELBO().differentiable_loss(net.model, net.guide, x, y)
    loss.backward()
    assert net.loc_weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The mixture over z_P of exact paths (horizon_posterior="exact_mixture")
# ---------------------------------------------------------------------------------------------


def test_exact_mixture_by_hand():
    """With the K draws of z_P fixed, the obs density is the equal-weight mixture of K dense
    Gaussians: mean mu(m) + sigma_k (mu(m_k) - mu(m)), covariance D_k (W Gamma W^T + I) D_k with
    Gamma the rolled latents' covariance given z_P, built here by a loop over the innovations."""
    torch.set_default_dtype(torch.float64)
    net = make(horizon_posterior="exact_mixture", train_draws=4, phi=0.7, mean="head")
    with torch.no_grad():
        net.scale_weight.normal_(0.0, 0.5)  # the scale reads each draw's roll-out mean
        net.loc_bias.normal_()
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(net, x, y)
    obs = model_tr.nodes["obs"]
    last = guide_tr.nodes["layers.0.z"]["value"][..., 0, -1]  # (K, 1, B, U): the K draws of z_P
    phi, innovation = net.prior.phi[:, 0], net.prior.scale  # (U,) each
    constant = net.prior.constant  # (U,)
    q = net.config.num_future
    weight = net.loc_weight.reshape(q * PATCH, U)[:H]  # (H, U)
    # rolled latents given z_P: mean by the recursion, covariance of the innovations by a loop
    means, z = [], last
    for _ in range(q):
        z = constant + phi * z
        means.append(z)
    given = torch.stack(means, -2).squeeze(1)  # (K, B, Q, U)
    gamma = torch.zeros(U, q, q)
    for j in range(q):
        for k in range(q):
            for m in range(min(j, k) + 1):  # innovation entering at patch m
                gamma[:, j, k] += phi ** (j - m) * phi ** (k - m) * innovation**2
    patch_of = torch.arange(H) // PATCH
    sigma0 = torch.einsum("hu,uhk,ku->hk", weight, gamma[:, patch_of][:, :, patch_of], weight) + torch.eye(H)
    centre = net.rollout_mean(x)  # (B, Q, U)
    off = net.offset(x)
    middle = off + (
        torch.einsum("bqu,qpu->bqp", centre, net.loc_weight).flatten(-2)[..., :H] + net.loc_bias[:H]
    )
    moved = (
        torch.einsum("kbqu,qpu->kbqp", given, net.loc_weight).flatten(-2)[..., :H] + net.loc_bias[:H] + off
    )
    raw = torch.einsum("kbqu,qpu->kbqp", given, net.scale_weight).flatten(-2)[..., :H] + net.scale_bias[:H]
    sigma = torch.nn.functional.softplus(raw) + net.config.likelihood_scale_min  # (K, B, H)
    loc = middle + sigma * (moved - middle)  # (K, B, H)
    cov = sigma.unsqueeze(-1) * sigma0 * sigma.unsqueeze(-2)  # (K, B, H, H)
    comp = MultivariateNormal(loc, cov).log_prob(y)  # (K, B)
    want = torch.logsumexp(comp, 0) - math.log(4)
    assert_close(obs["fn"].log_prob(obs["value"]).reshape(-1), want, atol=1e-9)


def test_exact_mixture_is_exact_when_the_scale_reads_no_latent():
    """With a scale that does not read the latents every component has the same covariance, and
    the mixture over K draws of z_P tends to the exact Gaussian predictive as K grows."""
    torch.set_default_dtype(torch.float64)
    options = dict(mean="centred", likelihood_scale="learned", phi=0.8)
    exact, mixed = (
        make(horizon_posterior="exact", **options),
        make(horizon_posterior="exact_mixture", **options),
    )
    with torch.no_grad():
        exact.scale_bias.copy_(torch.linspace(0.0, 1.0, exact.scale_bias.shape[0]))
    mixed.load_state_dict(exact.state_dict())
    x = torch.randn(3, L)
    y = exact.predict(x, num_samples=1).samples[0]  # (3, H)
    want = obs_log_prob(exact, x, y)
    assert (obs_log_prob(mixed, x, y, draws=1) - want).abs().max() > 0.01  # one draw of z_P is not it
    assert_close(obs_log_prob(mixed, x, y, draws=20000), want, atol=0.01)
    # predict: the same law (z_P, then the roll-out, then the path)
    fn = exact.exact_predictive(x)
    pred = mixed.predict(x[:2], num_samples=100000)
    assert_close(pred.point, fn.loc[:2], atol=1e-12)
    dev = pred.samples - fn.loc[:2]
    emp = torch.einsum("sbh,sbk->bhk", dev, dev) / dev.shape[0]
    cov = fn.covariance_matrix_dense()[:2]
    assert_close(emp, cov, atol=0.03 * cov.abs().max().item())


def test_exact_mixture_sites_and_refusals():
    from vdn_pyro.state_space import ScaledStateSpaceMixture

    net = make(horizon_posterior="exact_mixture", train_draws=3)
    x, y = torch.randn(B, L), torch.randn(B, H)
    guide_tr, model_tr = traces(net, x, y)
    assert set(latent_sites(guide_tr)) == {"layers.0.z"}  # the horizon's innovations integrated out
    assert guide_tr.nodes["layers.0.z"]["value"].shape[0] == 3  # K draws of the look-back latents
    obs = model_tr.nodes["obs"]
    assert isinstance(obs["fn"], ScaledStateSpaceMixture) and obs["fn"].num_draws == 3
    assert obs["fn"].batch_shape == (1, B, 1)
    sampled = poutine.trace(net.model).get_trace(x)  # without a target: the roll-out is drawn
    assert net.rollout_site in latent_sites(sampled)
    assert sampled.nodes["obs"]["value"].shape == (B, 1, H)
    pred = net.predict(x, num_samples=6)
    assert pred.samples.shape == (6, B, H) and torch.isfinite(pred.samples).all()
    # each draw's scale reads its own roll-out mean: the draws' scales differ once the scale reads them
    with torch.no_grad():
        net.scale_weight.normal_()
    pred = net.predict(x, num_samples=6)
    assert (pred.scale - pred.scale[:1]).abs().max() > 1e-3
    for other in (
        make(),
        make(horizon_posterior="exact"),
        make(horizon_posterior="exact_mixture", deterministic=True),
    ):
        with pytest.raises(ValueError, match="mixture_predictive needs"):
            other.mixture_predictive(x, torch.zeros(2, B, U, 1))

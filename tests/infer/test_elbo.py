"""Tests for :class:`vdn_pyro.inference.LocalELBO` against hand-written ELBOs.

Every reference value here is computed from the network's raw weights with formulas written out
in this file (Normal-Normal KL, Gaussian log density, dense-covariance Gaussian KL); only the
sampled latents are taken from a guide trace, and both sides see the same ones through
``poutine.replay``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence
from torch.nn.functional import gelu

from tests.common import assert_close
from vdn_pyro import VDN, LocalELBO

LOG_2PI = math.log(2 * math.pi)
B, D, OUT, T = 6, 5, 2, 7


# ---------------------------------------------------------------------------------------------
# Hand-written references
# ---------------------------------------------------------------------------------------------


def softplus(x):
    return torch.log1p(torch.exp(x))


def normal_kl(loc_q, scale_q, loc_p, scale_p):
    """KL(N(loc_q, scale_q^2) || N(loc_p, scale_p^2)), elementwise."""
    return torch.log(scale_p / scale_q) + (scale_q**2 + (loc_q - loc_p) ** 2) / (2 * scale_p**2) - 0.5


def normal_log_density(y, loc, scale):
    """log N(y; loc, scale^2), elementwise."""
    return -torch.log(scale) - 0.5 * LOG_2PI - (y - loc) ** 2 / (2 * scale**2)


def linear(h, module):
    return h @ module.weight.T + module.bias


def trunk_features(net, x):
    """The MLP trunk (one hidden GELU layer) by hand: ``(B, [T,] D) -> (B, [T,] F)``."""
    (lin, _act) = list(net.trunk.net)
    return gelu(linear(x, lin))


def posterior_params(layer, h, temporal):
    """loc, scale ``(B, H, k[, T])`` of one layer's unit heads (``scale_mode="unit"``)."""
    post = layer.posterior
    lead = h.shape[:-1]
    loc = linear(h, post.loc).reshape(lead + (post.units, post.latent_dim))  # (B, [T,] H, k)
    scale = softplus(post.raw_scale).clamp(post.scale_min, post.scale_max).expand_as(loc)
    if temporal:
        loc, scale = loc.movedim(-3, -1), scale.movedim(-3, -1)  # (B, H, k, T)
    return loc, scale


def pool_mean(z, temporal):
    """Mean over the k latent dims: ``(B, H, k) -> (B, H)`` or ``(B, H, k, T) -> (B, T, H)``."""
    return z.mean(-2).transpose(-1, -2) if temporal else z.mean(-1)


def hand_forward(net, x, zs):
    """Posterior parameters of every layer given the sampled latents ``zs`` (site -> value).

    :returns: list of (site, loc, scale) and the last layer's pooled output.
    """
    temporal = x.dim() == 3
    h, out = trunk_features(net, x), []
    for i, layer in enumerate(net.layers):
        if i:
            h = gelu(h)
        loc, scale = posterior_params(layer, h, temporal)
        out.append((layer.site, loc, scale))
        h = pool_mean(zs[layer.site], temporal)
    return out, h


def gaussian_log_lik(net, last, y):
    """Sum of log N(y; head(z), s^2) with the learned per-output scale."""
    loc = linear(last, net.head)  # (B, [T,] out)
    scale = softplus(net.likelihood.raw_scale) + net.likelihood.scale_min  # (out,)
    return normal_log_density(y, loc, scale).sum()


def hand_loss_normal_prior(net, x, y, zs):
    """sum_l sum_i beta_li sum_b KL(q || N(0, 1)) - log p(y | z)."""
    params, last = hand_forward(net, x, zs)
    kl_total = 0.0
    for (_, loc, scale), layer in zip(params, net.layers):
        kl = normal_kl(loc, scale, torch.zeros(()), torch.ones(()))  # (B, H, k)
        kl_total = kl_total + (layer.beta * kl.sum(-1).sum(0)).sum()
    return kl_total - gaussian_log_lik(net, last, y)


def ar_autocovariance(phi, scale, num_lags):
    """Stationary autocovariances gamma_0..gamma_{L-1} of AR(1) or AR(2), closed form, per unit.

    :param phi: ``(H, p)`` with p in {1, 2}. :param scale: ``(H,)``. :returns: ``(H, L)``.
    """
    var = scale**2
    if phi.shape[-1] == 1:
        a = phi[:, 0]
        gammas = [var / (1 - a**2)]
        for _ in range(1, num_lags):
            gammas.append(a * gammas[-1])
    else:
        a, b = phi[:, 0], phi[:, 1]
        g0 = var * (1 - b) / ((1 + b) * ((1 - b) ** 2 - a**2))
        gammas = [g0, a * g0 / (1 - b)]
        for _ in range(2, num_lags):
            gammas.append(a * gammas[-1] + b * gammas[-2])
    return torch.stack(gammas[:num_lags], -1)


def dense_gaussian_kl(loc_q, var_q, loc_p, cov_p):
    """KL(N(loc_q, diag var_q) || N(loc_p, cov_p)) over the last dim T, with dense cov_p."""
    num = loc_q.shape[-1]
    cov_p = cov_p.expand(loc_q.shape[:-1] + cov_p.shape[-2:])
    prec = torch.linalg.inv(cov_p)  # (..., T, T)
    diff = (loc_p - loc_q).unsqueeze(-1)  # (..., T, 1)
    trace = (prec.diagonal(dim1=-2, dim2=-1) * var_q).sum(-1)
    maha = (diff.transpose(-1, -2) @ prec @ diff)[..., 0, 0]
    return 0.5 * (trace + maha - num + torch.logdet(cov_p) - torch.log(var_q).sum(-1))


def guide_values(net, x, y, **kwargs):
    """Trace the guide once; return the trace and the sampled latents by site."""
    tr = poutine.trace(net.guide).get_trace(x, y, **kwargs)
    return tr, {name: tr.nodes[name]["value"] for name in net.site_names if name in tr.nodes}


def replayed(net, trace):
    return poutine.replay(net.guide, trace=trace)


# ---------------------------------------------------------------------------------------------
# Exact loss: mean-field estimator with fixed latents
# ---------------------------------------------------------------------------------------------

STATIC_NETS = {
    "one-layer": dict(units=(4,), beta=[torch.tensor([0.5, 1.0, 2.0, 3.0])]),
    "one-layer-k3": dict(units=(4,), latent_dim=3, beta=[torch.tensor([0.1, 1.0, 0.7, 5.0])]),
    "two-layers-k2": dict(
        units=(4, 3),
        latent_dim=2,
        beta=[torch.tensor([0.5, 1.0, 2.0, 3.0]), torch.tensor([0.1, 0.2, 4.0])],
    ),
    "two-layers-scalar-beta": dict(units=(4, 3), beta=0.3),
}


def make_net(**options):
    net = VDN(D, OUT, hidden=(6,), **options)
    with torch.no_grad():  # move away from the default init so every term matters
        net.likelihood.raw_scale.copy_(torch.tensor([-0.3, 0.8]))
        for layer in net.layers:
            layer.posterior.raw_scale.copy_(torch.randn_like(layer.posterior.raw_scale) * 0.5)
    return net


@pytest.mark.parametrize("options", list(STATIC_NETS.values()), ids=list(STATIC_NETS))
def test_mean_field_loss_equals_hand_written_static(options):
    torch.set_default_dtype(torch.float64)
    net = make_net(**options)
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    tr, zs = guide_values(net, x, y)
    loss, stats = LocalELBO().loss_and_stats(net.model, replayed(net, tr), x, y)
    expected = hand_loss_normal_prior(net, x, y, zs)
    assert loss.dtype == torch.float64
    assert_close(loss.detach(), expected.detach(), atol=1e-8, rtol=1e-10)
    assert set(stats) == set(net.site_names)


def test_loss_depends_on_per_unit_beta():
    """Changing one unit's beta changes the loss by exactly delta_beta * sum_b KL of that unit."""
    torch.set_default_dtype(torch.float64)
    net = make_net(**STATIC_NETS["one-layer"])
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    tr, zs = guide_values(net, x, y)
    before, stats = LocalELBO().loss_and_stats(net.model, replayed(net, tr), x, y)
    net.layers[0].beta[2] += 1.5
    after, _ = LocalELBO().loss_and_stats(net.model, replayed(net, tr), x, y)
    kl_unit = stats["layers.0.z"].kl[2] * B  # stats are the batch mean
    assert_close(after - before, 1.5 * kl_unit, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("order", [1, 2], ids=["ar1", "ar2"])
@pytest.mark.parametrize("latent_dim", [1, 2], ids=["k1", "k2"])
def test_mean_field_loss_equals_hand_written_ar_prior(order, latent_dim):
    torch.set_default_dtype(torch.float64)
    units = 3
    beta = torch.tensor([0.5, 1.0, 2.5])
    net = make_net(
        units=(units,), latent_dim=latent_dim, prior="ar", ar_order=order, learn_prior=True, beta=[beta]
    )
    prior = net.layers[0].prior
    with torch.no_grad():  # distinct per-unit persistence, level and innovation scale
        prior.raw_phi.copy_(torch.tensor([[0.3, -0.4], [1.2, 0.2], [-0.6, 0.5]])[:, :order])
        prior.constant.copy_(torch.tensor([0.4, -1.0, 0.0]))
        prior.raw_scale.copy_(torch.tensor([0.2, -0.5, 1.0]))
    x, y = torch.randn(B, T, D), torch.randn(B, T, OUT)
    guide_tr, zs = guide_values(net, x, y)
    loss, stats = LocalELBO().loss_and_stats(net.model, replayed(net, guide_tr), x, y)

    # dense reference KL per (b, unit, k) from the AR autocovariance written out above
    params, last = hand_forward(net, x, zs)
    _, loc_q, scale_q = params[0]  # (B, H, k, T)
    phi, scale_p = prior.phi.detach(), softplus(prior.raw_scale.detach())  # (H, p), (H,)
    gammas = ar_autocovariance(phi, scale_p, T)  # (H, T)
    lags = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs()  # (T, T)
    cov_p = gammas[:, lags][:, None]  # (H, 1, T, T)
    loc_p = (prior.constant.detach() / (1 - phi.sum(-1)))[:, None, None].expand(units, 1, T)  # (H, 1, T)
    kl_dense = dense_gaussian_kl(loc_q, scale_q**2, loc_p, cov_p)  # (B, H, k)

    # ... agrees with torch's kl_divergence on the two traced site distributions
    model_tr = poutine.trace(poutine.replay(net.model, trace=guide_tr)).get_trace(x, y)
    site = "layers.0.z"
    kl_torch = kl_divergence(guide_tr.nodes[site]["fn"], model_tr.nodes[site]["fn"])  # (B, H)
    assert_close(kl_torch.detach(), kl_dense.sum(-1).detach(), atol=1e-9, rtol=1e-9)

    # ... and the whole loss is sum_i beta_i sum_b KL_bi - log p(y | z)
    expected = (beta * kl_dense.sum(-1).sum(0)).sum() - gaussian_log_lik(net, last, y)
    assert_close(loss.detach(), expected.detach(), atol=1e-8, rtol=1e-10)
    # ... and the statistics are in the one KL unit: nats per time step (the KL over T steps / T)
    assert_close(stats[site].kl, kl_dense.sum(-1).mean(0).detach() / T, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Monte Carlo estimator agrees in expectation
# ---------------------------------------------------------------------------------------------


def expected_loss_one_layer(net, x, y):
    """The exact expected loss of a one-layer, k = 1, Normal-prior, Gaussian net:
    E_q[log N(y; W z + c, s^2)] = log N(y; W m + c, s^2) - sum_j W_j^2 v_j / (2 s^2)."""
    params, _ = hand_forward(net, x, {net.site_names[0]: torch.zeros(x.shape[0], net.layers[0].units, 1)})
    _, loc, scale = params[0]  # (B, H, 1)
    beta = net.layers[0].beta
    kl = (beta * normal_kl(loc, scale, torch.zeros(()), torch.ones(()))[..., 0].sum(0)).sum()
    s = softplus(net.likelihood.raw_scale) + net.likelihood.scale_min  # (out,)
    w = net.head.weight  # (out, H)
    mean_lik = normal_log_density(y, linear(loc[..., 0], net.head), s)  # (B, out)
    var_term = (scale[..., 0] ** 2) @ (w**2).T / (2 * s**2)  # (B, out)
    return kl - (mean_lik - var_term).sum()


def chunked_estimates(elbo_factory, net, x, y, chunks):
    with torch.no_grad():
        values = torch.stack(
            [elbo_factory().loss_and_stats(net.model, net.guide, x, y)[0] for _ in range(chunks)]
        )
    return values.mean(), values.std() / math.sqrt(chunks)


@pytest.mark.parametrize("estimator", ["trace", "mean_field"])
def test_estimator_unbiased_against_closed_form(estimator):
    """Both estimators, 20000 vectorised particles, land within 4 standard errors of the exact
    expected loss (closed form for a one-layer linear-Gaussian head)."""
    torch.set_default_dtype(torch.float64)
    net = make_net(units=(4,), beta=[torch.tensor([0.5, 1.0, 2.0, 3.0])])
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    exact = expected_loss_one_layer(net, x, y).detach()
    with torch.no_grad():
        big = LocalELBO(estimator, num_particles=20000, vectorize_particles=True)
        estimate = big.loss_and_stats(net.model, net.guide, x, y)[0]
    # the spread of 20 independent 1000-particle estimates gives the 20000-particle SE
    mean, se = chunked_estimates(lambda: LocalELBO(estimator, num_particles=1000), net, x, y, 20)
    assert 0 < se < 0.5  # the check below must not be vacuous
    assert abs(float(estimate - exact)) < 4 * float(se), (float(estimate), float(exact), float(se))
    assert abs(float(mean - exact)) < 4 * float(se), (float(mean), float(exact), float(se))


def test_trace_estimator_matches_mean_field_two_layers():
    """No closed form here: compare the two estimators with each other (4 combined SEs)."""
    torch.set_default_dtype(torch.float64)
    net = make_net(**STATIC_NETS["two-layers-k2"])
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    m_trace, se_trace = chunked_estimates(lambda: LocalELBO("trace", num_particles=500), net, x, y, 16)
    m_mf, se_mf = chunked_estimates(lambda: LocalELBO("mean_field", num_particles=500), net, x, y, 16)
    se = math.hypot(float(se_trace), float(se_mf))
    assert 0 < se < 0.5
    assert abs(float(m_trace - m_mf)) < 4 * se, (float(m_trace), float(m_mf), se)


def test_trace_estimator_with_fixed_latents_is_log_q_minus_log_p():
    """One particle of the trace estimator is exactly sum beta (log q - log p) - log p(y | z)."""
    torch.set_default_dtype(torch.float64)
    net = make_net(**STATIC_NETS["one-layer"])
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    tr, zs = guide_values(net, x, y)
    loss, stats = LocalELBO("trace").loss_and_stats(net.model, replayed(net, tr), x, y)
    params, last = hand_forward(net, x, zs)
    _, loc, scale = params[0]
    z = zs["layers.0.z"]
    log_q = normal_log_density(z, loc, scale)  # (B, H, 1)
    log_ratio = (log_q - normal_log_density(z, 0.0, torch.ones(()))).sum(-1)  # (B, H)
    expected = (net.layers[0].beta * log_ratio.sum(0)).sum() - gaussian_log_lik(net, last, y)
    assert_close(loss.detach(), expected.detach(), atol=1e-8, rtol=1e-10)
    assert_close(stats["layers.0.z"].kl, log_ratio.mean(0).detach(), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Per-unit statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("scale_mode", ["unit", "input"])
def test_unit_stats_first_layer(latent_dim, scale_mode):
    torch.set_default_dtype(torch.float64)
    net = VDN(D, OUT, units=(4,), latent_dim=latent_dim, hidden=(6,), scale_mode=scale_mode)
    if scale_mode == "input":  # make the scale vary with the input
        with torch.no_grad():
            net.layers[0].posterior.scale_head.weight.normal_(0, 0.5)
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    _, stats = LocalELBO().loss_and_stats(net.model, net.guide, x, y)
    loc, scale = net.posteriors(x)["layers.0.z"]  # (B, H, k); layer 0 does not depend on z
    if scale_mode == "input":
        assert float(scale.std()) > 1e-3
    s = stats["layers.0.z"]
    kl = normal_kl(loc, scale, torch.zeros(()), torch.ones(())).sum(-1)  # (B, H): KL over k
    assert s.kl.shape == s.loc_sq.shape == s.scale.shape == (4,)
    assert_close(s.kl, kl.mean(0), atol=1e-10, rtol=1e-10)
    assert_close(s.loc_sq, (loc**2).mean((0, 2)), atol=1e-10, rtol=1e-10)
    assert_close(s.scale, scale.mean((0, 2)), atol=1e-10, rtol=1e-10)
    assert not s.kl.requires_grad and not s.loc_sq.requires_grad


def test_unit_stats_second_layer_follow_the_sampled_path():
    torch.set_default_dtype(torch.float64)
    net = make_net(**STATIC_NETS["two-layers-k2"])
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    tr, zs = guide_values(net, x, y)
    _, stats = LocalELBO().loss_and_stats(net.model, replayed(net, tr), x, y)
    params, _ = hand_forward(net, x, zs)
    for site, loc, scale in params:
        kl = normal_kl(loc, scale, torch.zeros(()), torch.ones(())).sum(-1)  # (B, H)
        assert_close(stats[site].kl, kl.mean(0).detach(), atol=1e-10, rtol=1e-10, msg=site)
        assert_close(stats[site].loc_sq, (loc**2).mean((0, 2)).detach(), atol=1e-10, rtol=1e-10, msg=site)
        assert_close(stats[site].scale, scale.mean((0, 2)).detach(), atol=1e-10, rtol=1e-10, msg=site)


def test_unit_stats_are_unscaled_by_beta_and_subsampling():
    torch.set_default_dtype(torch.float64)
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    net = make_net(units=(4,), beta=1.0)
    _, base = LocalELBO().loss_and_stats(net.model, net.guide, x, y)
    net.layers[0].beta.copy_(torch.tensor([0.01, 3.0, 0.5, 7.0]))
    _, scaled = LocalELBO().loss_and_stats(net.model, net.guide, x, y, num_data=10 * B)
    assert_close(scaled["layers.0.z"].kl, base["layers.0.z"].kl, atol=1e-12, rtol=1e-12)


def test_unit_stats_average_over_particles():
    torch.set_default_dtype(torch.float64)
    net = make_net(**STATIC_NETS["two-layers-k2"])
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    elbo = LocalELBO(num_particles=4, vectorize_particles=False)
    _, stats = elbo.loss_and_stats(net.model, net.guide, x, y)
    loc, scale = net.posteriors(x)["layers.0.z"]
    kl = normal_kl(loc, scale, torch.zeros(()), torch.ones(())).sum(-1)
    assert_close(stats["layers.0.z"].kl, kl.mean(0), atol=1e-10, rtol=1e-10)
    assert elbo.last_stats is stats


# ---------------------------------------------------------------------------------------------
# Subsampling: the minibatch loss is an unbiased (here: exact) full-data estimate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_data", [B, 2 * B, 25], ids=["full", "double", "odd"])
def test_subsampled_loss_is_scaled_by_n_over_b(num_data):
    torch.set_default_dtype(torch.float64)
    net = make_net(**STATIC_NETS["two-layers-k2"])
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    tr, zs = guide_values(net, x, y)
    sub, _ = LocalELBO().loss_and_stats(net.model, replayed(net, tr), x, y, num_data=num_data)
    plain, _ = LocalELBO().loss_and_stats(net.model, replayed(net, tr), x, y)
    assert_close(sub.detach(), plain.detach() * num_data / B, atol=1e-9, rtol=1e-12)
    assert_close(plain.detach(), hand_loss_normal_prior(net, x, y, zs).detach(), atol=1e-8, rtol=1e-10)


def test_num_data_below_batch_raises():
    net = make_net(units=(4,))
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    with pytest.raises(ValueError, match=rf"Expected num_data >= batch size {B}, but got 3"):
        LocalELBO().loss_and_stats(net.model, net.guide, x, y, num_data=3)


@pytest.mark.parametrize("deterministic", [False, True], ids=["stochastic", "deterministic"])
def test_minibatch_estimates_average_to_full_loss(deterministic):
    """Over a partition into equal minibatches, the mean of the N/B-scaled minibatch losses equals
    the full-data loss, when every row keeps the same latents."""
    torch.set_default_dtype(torch.float64)
    n, batch = 12, 4
    net = make_net(**STATIC_NETS["two-layers-k2"], deterministic=deterministic)
    x, y = torch.randn(n, D), torch.randn(n, OUT)
    full_tr, full_z = guide_values(net, x, y)
    assert len(full_z) == (0 if deterministic else 2)
    full, _ = LocalELBO().loss_and_stats(net.model, replayed(net, full_tr), x, y)
    estimates = []
    for idx in torch.randperm(n).split(batch):
        tr, _ = guide_values(net, x[idx], y[idx], num_data=n)
        if not deterministic:  # the guide's data plate is subsampled: its sites carry N/B
            for layer in net.layers:
                scale = torch.as_tensor(tr.nodes[layer.site]["scale"])
                assert_close(scale, layer.beta * (n / batch), rtol=1e-12)
        for site, value in full_z.items():
            tr.nodes[site]["value"] = value[idx]
        loss, _ = LocalELBO().loss_and_stats(net.model, replayed(net, tr), x[idx], y[idx], num_data=n)
        estimates.append(loss.detach())
    assert_close(torch.stack(estimates).mean(), full.detach(), atol=1e-9, rtol=1e-12)
    # ... and not trivially: the minibatch estimates differ from each other
    assert float(torch.stack(estimates).std()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Non-reparameterised guide sites are refused
# ---------------------------------------------------------------------------------------------


def poisson_model(y):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    count = pyro.sample("count", dist.Poisson(rate))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(count, 1.0), obs=y)


def poisson_guide(y):
    shape = pyro.param("shape", torch.tensor(2.0), constraint=dist.constraints.positive)
    rate = pyro.sample("rate", dist.Gamma(shape, 1.0))
    pyro.sample("count", dist.Poisson(rate))  # no rsample: the gradient needs a score-function term


@pytest.mark.parametrize("estimator", ["mean_field", "trace"])
def test_non_reparameterised_guide_site_is_refused(estimator):
    """As TraceMeanField_ELBO refuses it: LocalELBO has no score-function term, so its gradient
    at a site without rsample would be silently wrong."""
    y = torch.tensor([1.0, 3.0, 2.0])
    with pytest.raises(ValueError) as info:
        LocalELBO(estimator).loss_and_stats(poisson_model, poisson_guide, y)
    message = str(info.value)
    assert "site 'count' draws from Poisson, which has no rsample" in message  # what and why
    assert "Use a reparameterisable distribution" in message and "Trace_ELBO" in message  # what to do
    # the same model with the discrete site observed instead: every latent is reparameterised
    conditioned = poutine.condition(poisson_model, data={"count": torch.tensor(2.0)})
    guide = poutine.block(poisson_guide, hide=["count"])
    loss, _ = LocalELBO(estimator).loss_and_stats(conditioned, guide, y)
    assert torch.isfinite(loss) and loss.requires_grad

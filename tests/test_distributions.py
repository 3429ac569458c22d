"""Tests for :mod:`vdn_pyro.distributions`: the stationary AR(p) process and its analytic KL."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import MultivariateNormal, kl_divergence

from tests.common import assert_close
from vdn_pyro.distributions import (
    ARProcess,
    BroadcastNormal,
    _ar1_quadratic,
    _kl_independent_arprocess_exact,
    coeffs_to_pacf,
    half_life,
    normal_mixture_log_prob,
    pacf_to_coeffs,
    phi_from_half_life,
)

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Independent reference: autocovariance from the companion-form Lyapunov equation.
# ---------------------------------------------------------------------------------------------


def companion(coeffs):
    """The p x p companion matrix of one AR(p) coefficient vector ``(p,)``."""
    p = coeffs.shape[-1]
    mat = torch.zeros(p, p, dtype=coeffs.dtype)
    mat[0] = coeffs
    if p > 1:
        mat[1:, :-1] = torch.eye(p - 1, dtype=coeffs.dtype)
    return mat


def reference_autocovariance(coeffs, scale, num_lags):
    """gamma_0..gamma_{L-1} via P = F P F^T + Q solved as (I - F kron F) vec P = vec Q.

    ``coeffs`` is ``(..., p)``, ``scale`` is ``(...,)``; returns ``(..., L)``. Loops over the batch
    so it shares no code path with the Yule-Walker solve under test.
    """
    batch_shape = coeffs.shape[:-1]
    p = coeffs.shape[-1]
    flat_coeffs = coeffs.reshape(-1, p)
    flat_scale = scale.expand(batch_shape).reshape(-1)
    out = []
    for phi, s in zip(flat_coeffs, flat_scale, strict=True):
        mat = companion(phi)
        noise = torch.zeros(p, p, dtype=coeffs.dtype)
        noise[0, 0] = s**2
        lhs = torch.eye(p * p, dtype=coeffs.dtype) - torch.kron(mat, mat)
        cov = torch.linalg.solve(lhs, noise.reshape(-1)).reshape(p, p)  # Cov(x_t, x_t)
        gammas, lagged = [], cov
        for _ in range(num_lags):
            gammas.append(lagged[0, 0])  # Cov(x_{t+k}, x_t) = F^k P
            lagged = mat @ lagged
        out.append(torch.stack(gammas))
    return torch.stack(out).reshape(batch_shape + (num_lags,))


def dense_toeplitz(gammas):
    """``(..., T) -> (..., T, T)`` with entry (a, b) = gammas[|a - b|]."""
    num_steps = gammas.shape[-1]
    rows = [torch.stack([gammas[..., abs(a - b)] for b in range(num_steps)], -1) for a in range(num_steps)]
    return torch.stack(rows, -2)


def random_ar(order, batch_shape, num_steps, dtype=F64, pacf_scale=1.0):
    """An ARProcess with random stationary coefficients from ``pacf_to_coeffs(tanh(raw))``."""
    batch_shape = torch.Size(batch_shape)
    constant = torch.randn(batch_shape, dtype=dtype)
    raw = pacf_scale * torch.randn(batch_shape + (order,), dtype=dtype)
    coeffs = pacf_to_coeffs(torch.tanh(raw))
    scale = 0.5 + torch.rand(batch_shape, dtype=dtype)
    return ARProcess(constant, coeffs, scale, num_steps)


def reference_mvn(ar):
    """The dense MVN of an ARProcess, built from the independent reference autocovariance."""
    gammas = reference_autocovariance(ar.coeffs, ar.scale, ar.num_steps)  # (..., T)
    loc = (ar.constant / (1 - ar.coeffs.sum(-1))).unsqueeze(-1).expand(gammas.shape)
    return MultivariateNormal(loc, dense_toeplitz(gammas))


def diag_normal(loc, scale):
    return dist.Normal(loc, scale).to_event(1)


# ---------------------------------------------------------------------------------------------
# Density and moments.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=["b()", "b(3)", "b(2,3)"])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 12], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("order", [1, 2, 3], ids=lambda p: f"p{p}")
def test_log_prob_matches_dense_mvn(order, num_steps, batch_shape):
    ar = random_ar(order, batch_shape, num_steps)
    mvn = reference_mvn(ar)
    value = mvn.sample((4,)) + 0.3 * torch.randn((4,) + mvn.batch_shape + (num_steps,), dtype=F64)
    actual = ar.log_prob(value)
    assert actual.shape == (4,) + torch.Size(batch_shape)
    assert_close(actual, mvn.log_prob(value), atol=1e-8, rtol=1e-10)
    assert_close(ar.entropy(), mvn.entropy(), atol=1e-8, rtol=1e-10)
    assert_close(ar.covariance_matrix, mvn.covariance_matrix, atol=1e-10, rtol=1e-10)
    assert_close(ar.mean, mvn.mean, atol=1e-10, rtol=1e-10)
    assert_close(ar.variance, mvn.variance, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3, 4], ids=lambda p: f"p{p}")
def test_autocovariance_matches_companion_reference(order):
    ar = random_ar(order, (5,), num_steps=3, pacf_scale=2.0)
    expected = reference_autocovariance(ar.coeffs, ar.scale, 30)
    assert_close(ar.autocovariance(30), expected, atol=1e-9, rtol=1e-9)
    assert_close(ar.autocovariance(2), expected[..., :2], atol=1e-9, rtol=1e-9)


def test_ar1_autocovariance_closed_form():
    phi = torch.tensor([-0.95, -0.3, 0.0, 0.5, 0.99], dtype=F64)
    scale = torch.tensor([0.1, 1.0, 2.0, 0.7, 1.3], dtype=F64)
    ar = ARProcess(torch.zeros(5, dtype=F64), phi.unsqueeze(-1), scale, num_steps=4)
    lags = torch.arange(20, dtype=F64)
    expected = scale.unsqueeze(-1) ** 2 * phi.unsqueeze(-1) ** lags / (1 - phi.unsqueeze(-1) ** 2)
    assert_close(ar.autocovariance(20), expected, atol=1e-10, rtol=1e-10)
    assert_close(ar.stationary_mean, torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("order", [1, 3], ids=lambda p: f"p{p}")
def test_single_step_is_stationary_marginal(order):
    ar = random_ar(order, (4,), num_steps=1)
    gamma0 = reference_autocovariance(ar.coeffs, ar.scale, 1)[..., 0]
    mean = ar.constant / (1 - ar.coeffs.sum(-1))
    marginal = dist.Normal(mean, gamma0.sqrt())
    value = torch.randn(6, 4, 1, dtype=F64)
    assert_close(ar.log_prob(value), marginal.log_prob(value[..., 0]), atol=1e-10, rtol=1e-10)
    assert ar.rsample((3,)).shape == (3, 4, 1)


def test_properties_and_shapes():
    ar = ARProcess(torch.zeros(()), torch.full((2, 3, 2), 0.2), torch.ones(3), num_steps=7)
    assert ar.batch_shape == (2, 3)
    assert ar.event_shape == (7,)
    assert ar.order == 2
    assert ar.num_steps == 7
    assert ar.stationary_mean.shape == (2, 3)
    assert ar.autocovariance(9).shape == (2, 3, 9)
    assert ar.mean.shape == ar.variance.shape == (2, 3, 7)
    assert ar.covariance_matrix.shape == (2, 3, 7, 7)
    assert ar.rsample((5,)).shape == (5, 2, 3, 7)
    assert ar.log_prob(torch.zeros(5, 1, 1, 7)).shape == (5, 2, 3)
    assert ar.has_rsample


def test_log_prob_gradcheck():
    raw = torch.randn(2, 3, dtype=F64, requires_grad=True)
    constant = torch.randn(2, dtype=F64, requires_grad=True)
    log_scale = torch.randn(2, dtype=F64, requires_grad=True)
    value = torch.randn(2, 6, dtype=F64)

    def fn(constant, raw, log_scale):
        ar = ARProcess(constant, pacf_to_coeffs(torch.tanh(raw)), log_scale.exp(), num_steps=6)
        return ar.log_prob(value)

    assert torch.autograd.gradcheck(fn, (constant, raw, log_scale))


# ---------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 3], ids=lambda p: f"p{p}")
def test_rsample_moments(order):
    num_samples = 200_000
    ar = random_ar(order, (2,), num_steps=6)
    z = ar.rsample((num_samples,))  # (N, 2, T)
    assert z.shape == (num_samples, 2, 6)
    cov = ar.covariance_matrix  # (2, T, T)
    diag = cov.diagonal(dim1=-2, dim2=-1)  # (2, T)
    mean_se = (diag / num_samples).sqrt()
    assert ((z.mean(0) - ar.mean).abs() <= 5 * mean_se).all()
    centred = z - z.mean(0)
    sample_cov = torch.einsum("nba,nbc->bac", centred, centred) / (num_samples - 1)
    cov_se = ((diag.unsqueeze(-1) * diag.unsqueeze(-2) + cov**2) / num_samples).sqrt()
    assert ((sample_cov - cov).abs() <= 5 * cov_se).all()


def test_rsample_gradients_flow():
    constant = torch.tensor([0.3, -1.0], requires_grad=True)
    raw = torch.randn(2, 2, requires_grad=True)
    scale = torch.tensor([0.5, 1.5], requires_grad=True)
    ar = ARProcess(constant, pacf_to_coeffs(torch.tanh(raw)), scale, num_steps=5)
    z = ar.rsample((64,))
    (z**2).sum().backward()
    for name, leaf in [("constant", constant), ("raw", raw), ("scale", scale)]:
        assert leaf.grad is not None, name
        assert torch.isfinite(leaf.grad).all(), name
        assert (leaf.grad != 0).all(), name


# ---------------------------------------------------------------------------------------------
# Analytic KL.
# ---------------------------------------------------------------------------------------------


def random_posterior(ar, spread=0.5):
    """A diagonal Normal posterior near the prior's marginals, same batch and event shape."""
    shape = ar.batch_shape + ar.event_shape
    loc = ar.mean + spread * torch.randn(shape, dtype=F64)
    scale = ar.variance.sqrt() * (0.3 + 0.7 * torch.rand(shape, dtype=F64))
    return diag_normal(loc, scale)


@pytest.mark.parametrize("order", [1, 2, 3], ids=lambda p: f"p{p}")
def test_kl_matches_monte_carlo(order):
    num_samples = 200_000
    ar = random_ar(order, (2,), num_steps=7)
    q = random_posterior(ar)
    z = q.sample((num_samples,))  # (N, 2, T)
    log_ratio = q.log_prob(z) - ar.log_prob(z)  # (N, 2)
    estimate = log_ratio.mean(0)
    std_err = log_ratio.std(0) / math.sqrt(num_samples)
    analytic = kl_divergence(q, ar)
    assert analytic.shape == (2,)
    assert ((analytic - estimate).abs() <= 4 * std_err).all(), (analytic, estimate, std_err)


@pytest.mark.parametrize("num_steps", [1, 2, 5], ids=lambda t: f"T{t}")
def test_kl_matches_dense_mvn_formula(num_steps):
    # Pyro's own (Independent, MultivariateNormal) KL is an exact, independent check.
    ar = random_ar(3, (4,), num_steps)
    q = random_posterior(ar)
    assert_close(kl_divergence(q, ar), kl_divergence(q, reference_mvn(ar)), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("order", [1, 2], ids=lambda p: f"p{p}")
def test_kl_zero_for_white_noise_prior(order):
    # With phi = 0 the prior is iid N(c, s^2), which a diagonal posterior can match exactly.
    constant = torch.tensor([0.0, 1.5, -2.0], dtype=F64)
    scale = torch.tensor([1.0, 0.3, 2.0], dtype=F64)
    ar = ARProcess(constant, torch.zeros(3, order, dtype=F64), scale, num_steps=6)
    q = diag_normal(constant.unsqueeze(-1).expand(3, 6), scale.unsqueeze(-1).expand(3, 6))
    assert_close(kl_divergence(q, ar), torch.zeros(3, dtype=F64), atol=1e-10, rtol=0)
    moved = diag_normal(constant.unsqueeze(-1) + 0.1, scale.unsqueeze(-1).expand(3, 6))
    assert (kl_divergence(moved, ar) > 1e-3).all()


def test_kl_nonnegative():
    for order in (1, 2, 3, 4):
        ar = random_ar(order, (50,), num_steps=9, pacf_scale=2.0)
        q = random_posterior(ar, spread=2.0)
        assert (kl_divergence(q, ar) >= 0).all()


def test_kl_through_independent_independent():
    batch, units, k, num_steps = 3, 4, 2, 6
    ar = random_ar(2, (batch, units, k), num_steps)
    loc = torch.randn(batch, units, k, num_steps, dtype=F64)
    scale = 0.5 + torch.rand(batch, units, k, num_steps, dtype=F64)
    kl = kl_divergence(dist.Normal(loc, scale).to_event(2), ar.to_event(1))
    assert kl.shape == (batch, units)
    assert_close(kl, kl_divergence(diag_normal(loc, scale), ar).sum(-1), atol=1e-12, rtol=1e-12)


def test_kl_broadcasts_batch_shapes():
    ar = random_ar(2, (4,), num_steps=5)
    loc = torch.randn(3, 1, 5, dtype=F64)
    kl = kl_divergence(diag_normal(loc, torch.ones(3, 1, 5, dtype=F64)), ar)
    assert kl.shape == (3, 4)
    expected = kl_divergence(diag_normal(loc.expand(3, 4, 5), torch.ones(3, 4, 5, dtype=F64)), ar)
    assert_close(kl, expected, atol=1e-12, rtol=1e-12)


def test_kl_unsupported_posterior_raises():
    ar = random_ar(1, (3,), num_steps=4)
    laplace = dist.Laplace(torch.zeros(3, 4, dtype=F64), 1.0).to_event(1)
    with pytest.raises(NotImplementedError):
        kl_divergence(laplace, ar)
    wrong_ndims = dist.Normal(torch.zeros(3, 4, dtype=F64), 1.0).to_event(2)
    with pytest.raises(NotImplementedError):
        kl_divergence(wrong_ndims, ar)


def test_trace_mean_field_elbo_uses_analytic_kl():
    # Under batch and unit plates the prior is expanded by Pyro; the ELBO must equal the sum of KLs.
    batch, units, num_steps = 4, 3, 5
    prior = random_ar(2, (units,), num_steps)
    loc = torch.randn(batch, units, num_steps, dtype=F64)
    scale = 0.5 + torch.rand(batch, units, num_steps, dtype=F64)

    def model():
        with pyro.plate("batch", batch, dim=-2), pyro.plate("units", units, dim=-1):
            pyro.sample("z", prior)

    def guide():
        with pyro.plate("batch", batch, dim=-2), pyro.plate("units", units, dim=-1):
            pyro.sample("z", diag_normal(loc, scale))

    loss = TraceMeanField_ELBO().differentiable_loss(model, guide)
    expected = kl_divergence(diag_normal(loc, scale), prior.expand((batch, units))).sum()
    assert_close(loss, expected, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# The AR(1) KL in few operations, against the exact general formula.
# ---------------------------------------------------------------------------------------------


def ar1_case(num_steps, learn, dtype=F64):
    """Leaves (a time-major posterior loc, posterior raw scale, prior parameters) and a builder of
    (q, p): q a diagonal Normal over time whose loc is a time-last view of (B, T, H, k) memory,
    with a per-unit scale (compact, or expanded to the loc's shape), p an AR(1) expanded to the
    batch like Pyro's plates expand it."""
    batch, units, k = 3, 4, 2
    base = torch.randn(batch, num_steps, units, k, dtype=dtype, requires_grad=True)  # (B, T, H, k)
    raw_scale = torch.randn(units, k, 1, dtype=dtype, requires_grad=True)  # (H, k, 1)
    constant = torch.randn(units, k, dtype=dtype, requires_grad=learn)
    raw_phi = torch.randn(units, k, dtype=dtype, requires_grad=learn)
    scale = (0.5 + torch.rand(units, k, dtype=dtype)).requires_grad_(learn)
    leaves = [base, raw_scale] + ([constant, raw_phi, scale] if learn else [])

    def build(compact):
        loc = base.movedim(1, -1)  # (B, H, k, T), a view of time-major memory
        post_scale = torch.nn.functional.softplus(raw_scale)  # (H, k, 1)
        if compact:
            q = BroadcastNormal(loc, post_scale).to_event(1)
        else:
            q = diag_normal(loc, post_scale.expand(loc.shape))
        p = ARProcess(constant, torch.tanh(raw_phi).unsqueeze(-1), scale, num_steps)
        return q, p.expand((batch, units, k))

    return leaves, build


@pytest.mark.parametrize("learn", [False, True], ids=["fixed-prior", "learned-prior"])
@pytest.mark.parametrize("compact", [False, True], ids=["expanded-scale", "compact-scale"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 8], ids=lambda t: f"T{t}")
def test_ar1_kl_equals_exact_formula(num_steps, compact, learn):
    leaves, build = ar1_case(num_steps, learn)
    q, p = build(compact)
    fused = kl_divergence(q, p)  # the AR(1) path
    q_ref, p_ref = build(False)
    exact = _kl_independent_arprocess_exact(q_ref, p_ref)  # the general AR(p) formula
    assert fused.shape == exact.shape == (3, 4, 2)
    assert_close(fused, exact, atol=1e-12, rtol=1e-12)
    # gradients of a nonlinear function of the KL, for every leaf
    for actual, expected in zip(
        torch.autograd.grad(fused.pow(2).sum(), leaves), torch.autograd.grad(exact.pow(2).sum(), leaves)
    ):
        assert_close(actual, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("num_steps", [1, 2, 6], ids=lambda t: f"T{t}")
def test_ar1_mean_terms_gradients(num_steps):
    # first and second derivatives of the fused operator, broadcasting every prior parameter
    def args():
        return (
            torch.randn(3, 4, 2, num_steps, dtype=F64),  # loc (..., T)
            torch.randn(4, 2, dtype=F64),  # mean
            torch.rand(4, 2, dtype=F64) + 0.5,  # 1 / sqrt(gamma_0)
            torch.randn(2, dtype=F64),  # constant, broadcast over units
            torch.rand(4, 1, dtype=F64) - 0.5,  # phi, broadcast over k
            torch.rand(4, 2, dtype=F64) + 0.5,  # 1 / s^2
        )

    inputs = tuple(t.requires_grad_() for t in args())
    assert torch.autograd.gradcheck(_ar1_quadratic, inputs)
    assert torch.autograd.gradgradcheck(_ar1_quadratic, inputs)


def test_ar1_kl_gradient_keeps_the_time_major_layout():
    # the fused backward writes loc's gradient in loc's memory order: a head's (B, T, H, k)
    # output moved to time-last gets a (B, T, H, k)-ordered gradient, with no copy
    leaves, build = ar1_case(6, learn=False, dtype=torch.float32)
    q, p = build(compact=True)
    loc = q.base_dist.loc
    (grad,) = torch.autograd.grad(kl_divergence(q, p).sum(), [loc])
    assert grad.stride() == loc.stride()


@pytest.mark.parametrize("order", [1, 2], ids=lambda p: f"p{p}")
def test_kl_with_scale_constant_in_time_at_two_steps(order):
    # T = order + 1 with a scale constant over time (an expanded, stride-0 view): the later
    # steps' variance terms must all count (a one-step window of a size-1 dim once summed to 0)
    ar = random_ar(order, (3,), num_steps=order + 1)
    loc = torch.randn(3, order + 1, dtype=F64)
    scale = 0.3 + torch.rand(3, 1, dtype=F64)
    broadcast = kl_divergence(diag_normal(loc, scale.expand(3, order + 1)), ar)
    dense = kl_divergence(diag_normal(loc, scale.repeat(1, order + 1)), reference_mvn(ar))
    assert_close(broadcast, dense, atol=1e-10, rtol=1e-10)
    assert_close(_kl_independent_arprocess_exact(diag_normal(loc, scale.expand(3, order + 1)), ar), dense)


# ---------------------------------------------------------------------------------------------
# BroadcastNormal: a Normal with a compact scale.
# ---------------------------------------------------------------------------------------------


def test_broadcast_normal_is_the_normal():
    loc = torch.randn(5, 4, 3, dtype=F64)
    scale = 0.2 + torch.rand(4, 1, dtype=F64)  # (H, 1): per unit, constant over the last dim
    d, ref = BroadcastNormal(loc, scale), dist.Normal(loc, scale.expand(loc.shape))
    assert d.batch_shape == ref.batch_shape and d.compact_scale is scale
    value = torch.randn(2, 5, 4, 3, dtype=F64)
    assert_close(d.log_prob(value), ref.log_prob(value), atol=1e-12, rtol=1e-12)
    assert_close(d.entropy(), ref.entropy(), atol=1e-12, rtol=1e-12)
    assert_close(d.mean, ref.mean)
    assert_close(d.stddev, ref.stddev)
    prior = dist.Normal(torch.randn(4, 1, dtype=F64), 0.5 + torch.rand(4, 1, dtype=F64))
    expected = kl_divergence(ref, prior.expand(loc.shape))
    assert_close(kl_divergence(d, prior.expand(loc.shape)), expected, atol=1e-12, rtol=1e-12)
    big = d.expand((2, 5, 4, 3))
    assert isinstance(big, BroadcastNormal) and big.compact_scale is scale
    assert_close(big.log_prob(value), ref.log_prob(value), atol=1e-12, rtol=1e-12)
    assert_close(BroadcastNormal(loc, 0.7).log_prob(value), dist.Normal(loc, 0.7).log_prob(value))


def test_broadcast_normal_draws_in_the_layout_of_loc():
    num = 20_000
    memory = torch.randn(num, 6, 3)  # (N, T, H), time-major as a head writes it
    loc = memory.transpose(-1, -2)  # (N, H, T): time-last view
    scale = torch.tensor([[0.5], [1.0], [2.0]])  # (H, 1)
    d = BroadcastNormal(loc, scale)
    torch.manual_seed(3)
    z = d.rsample()
    assert z.shape == loc.shape and z.stride() == loc.stride()  # no copy to a new layout
    torch.manual_seed(3)
    noise = torch.randn(num, 6, 3).transpose(-1, -2)  # the same draws, in loc's memory order
    assert_close(z, loc + noise * scale, atol=1e-6, rtol=1e-6)
    eps = (z - loc) / scale
    assert eps.mean().abs() < 0.01 and (eps.std() - 1).abs() < 0.01
    assert d.rsample((2,)).shape == (2, num, 3, 6)
    leaf = scale.clone().requires_grad_()
    (grad,) = torch.autograd.grad(BroadcastNormal(loc, leaf).rsample().sum(), [leaf])
    assert grad.shape == (3, 1)


# ---------------------------------------------------------------------------------------------
# The mixture of K Normals (the forecaster's likelihood over its posterior draws).
# ---------------------------------------------------------------------------------------------


def reference_mixture(value, loc, scale, dim):
    """log (1/K) sum_k N(value; loc_k, scale_k) through torch.logsumexp and autograd."""
    z = (value - loc) / scale
    num = torch.broadcast_shapes(value.shape, loc.shape, scale.shape)[dim]
    kernels = -0.5 * z * z - torch.log(scale)
    return torch.logsumexp(kernels, dim) - math.log(num) - 0.5 * math.log(2 * math.pi)


MIXTURES = {
    "per-draw-scale": ((1, 3, 4), (5, 1, 4), (5, 3, 4), -3),
    "shared-scale": ((2, 1, 3, 4), (5, 3, 4), (4,), -3),
    "components-inner": ((3, 1), (3, 6), (1, 6), -1),
}


@pytest.mark.parametrize("name", list(MIXTURES))
def test_normal_mixture_log_prob_equals_logsumexp(name):
    value_shape, loc_shape, scale_shape, dim = MIXTURES[name]
    value = torch.randn(value_shape, dtype=F64, requires_grad=True)
    loc = torch.randn(loc_shape, dtype=F64, requires_grad=True)
    scale = (0.3 + torch.rand(scale_shape, dtype=F64)).requires_grad_()
    actual = normal_mixture_log_prob(value, loc, scale, dim)
    expected = reference_mixture(value, loc, scale, dim)
    assert actual.shape == expected.shape
    assert_close(actual, expected, atol=1e-12, rtol=1e-12)
    leaves = (value, loc, scale)
    for a, b in zip(
        torch.autograd.grad(actual.sin().sum(), leaves), torch.autograd.grad(expected.sin().sum(), leaves)
    ):
        assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: normal_mixture_log_prob(*t, dim), leaves)
    assert torch.autograd.gradgradcheck(lambda *t: normal_mixture_log_prob(*t, dim), leaves)


def test_normal_mixture_log_prob_far_from_every_component():
    # every kernel underflows exp() unshifted; the shift by the largest keeps it finite
    loc, scale = torch.zeros(4, 3, dtype=F64), torch.full((4, 3), 0.01, dtype=F64)
    value = torch.full((1, 3), 50.0, dtype=F64)
    actual = normal_mixture_log_prob(value, loc, scale, -2)
    assert torch.isfinite(actual).all()
    expected = dist.Normal(torch.zeros((), dtype=F64), torch.full((), 0.01, dtype=F64)).log_prob(value[0])
    assert_close(actual, expected, atol=1e-8, rtol=1e-12)  # K equal components: one Normal
    with pytest.raises(ValueError, match="negative dim"):
        normal_mixture_log_prob(value, loc, scale, 0)


# ---------------------------------------------------------------------------------------------
# expand, argument checks.
# ---------------------------------------------------------------------------------------------


def test_expand():
    ar = random_ar(2, (3,), num_steps=4)
    big = ar.expand((5, 3))
    assert isinstance(big, ARProcess)
    assert big.batch_shape == (5, 3)
    assert big.event_shape == (4,)
    assert big.coeffs.shape == (5, 3, 2)
    value = torch.randn(5, 3, 4, dtype=F64)
    assert_close(big.log_prob(value), ar.log_prob(value), atol=1e-12, rtol=1e-12)
    assert_close(big.covariance_matrix[2], ar.covariance_matrix, atol=1e-12, rtol=1e-12)
    assert big.rsample((2,)).shape == (2, 5, 3, 4)
    assert isinstance(ar.expand_by((2,)), ARProcess)
    with pytest.raises(RuntimeError):
        ar.expand((4,))


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, "5"], ids=repr)
def test_bad_num_steps_raises(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        ARProcess(torch.zeros(2), torch.zeros(2, 1), torch.ones(2), num_steps=num_steps)


def test_coeffs_without_lags_raise():
    with pytest.raises(ValueError, match="at least one lag"):
        ARProcess(torch.zeros(2), torch.zeros(2, 0), torch.ones(2), num_steps=3)
    with pytest.raises(ValueError, match="at least one lag"):
        ARProcess(0.0, torch.tensor(0.5), 1.0, num_steps=3)


def test_nonstationary_coeffs_raise_under_validation():
    coeffs = torch.tensor([[0.5], [1.2]])
    with pytest.raises(ValueError, match="stationary"):
        ARProcess(torch.zeros(2), coeffs, torch.ones(2), num_steps=3)
    with pytest.raises(ValueError, match="stationary"):  # sum of coeffs = 1: a unit root
        ARProcess(0.0, torch.tensor([0.5, 0.5]), 1.0, num_steps=3)
    ARProcess(torch.zeros(2), coeffs, torch.ones(2), num_steps=3, validate_args=False)


def test_non_positive_scale_raises_under_validation():
    with pytest.raises(ValueError, match="scale"):
        ARProcess(torch.zeros(2), torch.zeros(2, 1), torch.tensor([1.0, 0.0]), num_steps=3)


# ---------------------------------------------------------------------------------------------
# Helpers: PACF map, half-life.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4], ids=lambda p: f"p{p}")
def test_pacf_to_coeffs_is_stationary(order):
    pacf = torch.tanh(1.5 * torch.randn(500, order, dtype=F64))
    pacf = torch.cat([pacf, torch.full((2, order), 0.995, dtype=F64)])  # near the boundary
    pacf[-1, ::2] = -0.995
    coeffs = pacf_to_coeffs(pacf)
    assert coeffs.shape == (502, order)
    radius = torch.stack([torch.linalg.eigvals(companion(c)).abs().max() for c in coeffs])
    assert (radius < 1).all()


@pytest.mark.parametrize("order", [1, 2, 3, 4], ids=lambda p: f"p{p}")
def test_pacf_round_trip(order):
    pacf = torch.tanh(torch.randn(2, 7, order, dtype=F64))
    assert_close(coeffs_to_pacf(pacf_to_coeffs(pacf)), pacf, atol=1e-10, rtol=1e-10)


def test_pacf_known_values():
    pacf = torch.tensor([0.3, -0.4, 0.7])
    assert_close(pacf_to_coeffs(pacf[:1]), pacf[:1])  # identity for p = 1
    # Hand-run recursion: (0.3) -> (0.3 + 0.4 * 0.3, -0.4) = (0.42, -0.4)
    # -> (0.42 - 0.7 * -0.4, -0.4 - 0.7 * 0.42, 0.7) = (0.70, -0.694, 0.7)
    assert_close(pacf_to_coeffs(pacf), torch.tensor([0.70, -0.694, 0.7]), atol=1e-6, rtol=1e-6)
    # The first PACF value of an AR(p) is its lag-1 autocorrelation gamma_1 / gamma_0.
    ar = ARProcess(0.0, pacf_to_coeffs(pacf.double()), 1.0, num_steps=2)
    gammas = ar.autocovariance(2)
    assert_close(gammas[1] / gammas[0], pacf[0].double(), atol=1e-12, rtol=1e-12)


def test_half_life_helpers():
    assert_close(half_life(0.5), torch.tensor(1.0))
    assert_close(half_life(-0.5), torch.tensor(1.0))
    assert_close(half_life(torch.tensor([0.25, 0.5**0.1])), torch.tensor([0.5, 10.0]))
    assert half_life(0.0).item() == 0.0
    assert half_life(1.0).item() == math.inf
    assert_close(phi_from_half_life(1.0), torch.tensor(0.5))
    assert phi_from_half_life(math.inf).item() == 1.0
    assert phi_from_half_life(0.0).item() == 0.0
    h = torch.tensor([0.5, 1.0, 3.0, 24.0, 500.0], dtype=F64)
    assert_close(half_life(phi_from_half_life(h)), h, atol=1e-9, rtol=1e-9)
    # The autocorrelation of an AR(1) at its half-life is one half.
    ar = ARProcess(0.0, phi_from_half_life(torch.tensor([4.0], dtype=F64)), 1.0, num_steps=2)
    gammas = ar.autocovariance(5)
    assert_close(gammas[4] / gammas[0], torch.tensor(0.5, dtype=F64), atol=1e-12, rtol=1e-12)

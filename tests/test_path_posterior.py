"""Tests for the path posterior: :class:`~vdn_pyro.distributions.GaussMarkov`, its analytic KL to
:class:`~vdn_pyro.distributions.ARProcess`, and the amortized head
:class:`~vdn_pyro.guides.path.PathPosterior`.

Every reference is built independently of the code under test: dense Gaussians from explicit
linear maps of the innovations, the AR start from a companion-form Lyapunov solve, and a Kalman
filter for the exact log-likelihood of a linear Gaussian state-space model.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import MultivariateNormal, kl_divergence

from tests.common import assert_close
from vdn_pyro.distributions import (
    ARProcess,
    GaussMarkov,
    _recurrence_loop,
    _recurrence_scan,
    linear_recurrence,
    pacf_to_coeffs,
)
from vdn_pyro.guides.path import PathPosterior

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def random_chain(batch_shape, num_steps, dtype=F64):
    """Random GaussMarkov parameters: a in (-0.9, 0.9), b ~ N(0, 1), s in (0.3, 1.3)."""
    shape = torch.Size(batch_shape) + (num_steps,)
    transition = 1.8 * torch.rand(shape, dtype=dtype) - 0.9
    offset = torch.randn(shape, dtype=dtype)
    scale = 0.3 + torch.rand(shape, dtype=dtype)
    return transition, offset, scale


def dense_chain(transition, offset, scale):
    """Mean ``(..., T)`` and covariance ``(..., T, T)`` of the chain from its innovation map:
    z = m + N eps with row t of N equal to a_t (row t-1) + s_t e_t, built step by step."""
    num_steps = offset.shape[-1]
    rows, means = [], []
    for t in range(num_steps):
        unit = torch.zeros(offset.shape, dtype=offset.dtype)
        unit[..., t] = 1.0
        row = scale[..., t : t + 1] * unit
        mean = offset[..., t]
        if t > 0:
            row = row + transition[..., t : t + 1] * rows[-1]
            mean = mean + transition[..., t] * means[-1]
        rows.append(row)
        means.append(mean)
    innov_map = torch.stack(rows, -2)  # (..., T, T)
    return torch.stack(means, -1), innov_map @ innov_map.transpose(-1, -2)


def stationary_state_cov(coeffs, scale):
    """Stationary covariance of the companion state (x_t, ..., x_{t-p+1}) of one AR(p):
    P = F P F^T + Q solved as (I - F kron F) vec P = vec Q. ``coeffs (p,)``, ``scale ()``."""
    p = coeffs.shape[-1]
    mat = torch.zeros(p, p, dtype=coeffs.dtype)
    mat[0] = coeffs
    if p > 1:
        mat[1:, :-1] = torch.eye(p - 1, dtype=coeffs.dtype)
    noise = torch.zeros(p, p, dtype=coeffs.dtype)
    noise[0, 0] = scale**2
    lhs = torch.eye(p * p, dtype=coeffs.dtype) - torch.kron(mat, mat)
    return torch.linalg.solve(lhs, noise.reshape(-1)).reshape(p, p)


def dense_ar(constant, coeffs, scale, num_steps):
    """Mean ``(..., T)`` and covariance ``(..., T, T)`` of an AR(p) path as a linear map of its
    innovations: a stationary start (Lyapunov) for the first min(p, T) steps, then the recursion
    z_t = c + sum_j phi_j z_{t-j} + s eps_t. Loops over the batch."""
    batch_shape = coeffs.shape[:-1]
    p = coeffs.shape[-1]
    head = min(p, num_steps)
    means, covs = [], []
    for c, phi, s in zip(constant.reshape(-1), coeffs.reshape(-1, p), scale.reshape(-1), strict=True):
        start_cov = stationary_state_cov(phi, s)[:head, :head]
        innov_map = torch.zeros(num_steps, num_steps, dtype=phi.dtype)
        innov_map[:head, :head] = torch.linalg.cholesky(start_cov)
        mean = torch.full((num_steps,), float(c / (1 - phi.sum())), dtype=phi.dtype)
        for t in range(head, num_steps):
            innov_map[t, t] = s
            mean[t] = c
            for j in range(1, p + 1):
                innov_map[t] += phi[j - 1] * innov_map[t - j]
                mean[t] += phi[j - 1] * mean[t - j]
        means.append(mean)
        covs.append(innov_map @ innov_map.T)
    shape = batch_shape + (num_steps,)
    return torch.stack(means).reshape(shape), torch.stack(covs).reshape(shape + (num_steps,))


def random_ar(order, batch_shape, num_steps, dtype=F64):
    batch_shape = torch.Size(batch_shape)
    constant = torch.randn(batch_shape, dtype=dtype)
    coeffs = pacf_to_coeffs(torch.tanh(torch.randn(batch_shape + (order,), dtype=dtype)))
    scale = 0.5 + torch.rand(batch_shape, dtype=dtype)
    return ARProcess(constant, coeffs, scale, num_steps)


def kalman_log_likelihood(x, constant, phi, ar_scale, gain, noise):
    """Exact log p(x_{1:T}) of z ~ stationary AR(1), x_t = gain z_t + noise eps_t (scalars)."""
    mean = constant / (1 - phi)
    var = ar_scale**2 / (1 - phi**2)
    total = 0.0
    for x_t in x:
        resid = x_t - gain * mean
        resid_var = gain**2 * var + noise**2
        total = total - 0.5 * (math.log(2 * math.pi * resid_var) + resid**2 / resid_var)
        k = var * gain / resid_var
        mean, var = mean + k * resid, (1 - k * gain) * var
        mean, var = constant + phi * mean, phi**2 * var + ar_scale**2
    return total


# ---------------------------------------------------------------------------------------------
# GaussMarkov
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2, 5, 9], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 3)], ids=lambda b: f"batch{b}")
def test_moments_log_prob_entropy_match_dense_mvn(batch_shape, num_steps):
    params = random_chain(batch_shape, num_steps)
    chain = GaussMarkov(*params, validate_args=True)
    mean, cov = dense_chain(*params)
    mvn = MultivariateNormal(mean, cov)
    assert chain.batch_shape == batch_shape and chain.event_shape == (num_steps,)
    assert_close(chain.mean, mean, atol=1e-10, rtol=0)
    assert_close(chain.variance, cov.diagonal(dim1=-2, dim2=-1), atol=1e-10, rtol=0)
    assert_close(chain.covariance_matrix, cov, atol=1e-10, rtol=0)
    lags = chain.lag_covariance(num_steps + 1)  # (..., T, T + 1)
    for t in range(num_steps):
        for j in range(num_steps + 1):
            expected = cov[..., t, t - j] if j <= t else torch.zeros(batch_shape, dtype=F64)
            assert_close(lags[..., t, j], expected, atol=1e-10, rtol=0, msg=f"t={t} j={j}")
    value = mean + 2 * torch.randn((4,) + mean.shape, dtype=F64)  # (4, ..., T)
    assert_close(chain.log_prob(value), mvn.log_prob(value), atol=1e-10, rtol=0)
    assert_close(chain.entropy(), mvn.entropy(), atol=1e-10, rtol=0)


def test_rsample_is_the_recursion_on_its_noise():
    params = random_chain((2, 3), 7)
    chain = GaussMarkov(*params)
    torch.manual_seed(1)
    sample = chain.rsample((5,))
    torch.manual_seed(1)
    noise = torch.randn(5, 2, 3, 7, dtype=F64)
    transition, offset, scale = params
    path = [offset[..., 0] + scale[..., 0] * noise[..., 0]]
    for t in range(1, 7):
        path.append(transition[..., t] * path[-1] + offset[..., t] + scale[..., t] * noise[..., t])
    assert sample.shape == (5, 2, 3, 7)
    assert_close(sample, torch.stack(path, -1), atol=1e-12, rtol=0)


def test_rsample_moments():
    params = random_chain((2,), 5)
    mean, cov = dense_chain(*params)
    num_samples = 200_000
    sample = GaussMarkov(*params).sample((num_samples,))  # (N, 2, T)
    emp_mean = sample.mean(0)
    centred = sample - emp_mean
    emp_cov = torch.einsum("nbi,nbj->bij", centred, centred) / (num_samples - 1)
    var = cov.diagonal(dim1=-2, dim2=-1)
    assert bool(((emp_mean - mean).abs() < 5 * (var / num_samples).sqrt()).all())
    cov_se = ((var[..., :, None] * var[..., None, :] + cov**2) / num_samples).sqrt()
    assert bool(((emp_cov - cov).abs() < 5 * cov_se).all())


def test_rsample_gradients_flow():
    params = [p.clone().requires_grad_() for p in random_chain((3,), 6)]
    GaussMarkov(*params).rsample((4,)).pow(2).sum().backward()
    transition, offset, scale = params
    assert bool((transition.grad[..., 1:] != 0).all()) and bool((transition.grad[..., 0] == 0).all())
    assert bool((offset.grad != 0).all()) and bool((scale.grad != 0).all())


SCHEDULES = {"public": linear_recurrence, "loop": _recurrence_loop, "scan": _recurrence_scan}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 7, 8, 13, 16, 17])
def test_linear_recurrence_matches_loop(schedule, num_steps):
    weight, value = torch.randn(3, num_steps, dtype=F64), torch.randn(2, 3, num_steps, dtype=F64)
    out = [value[..., 0]]
    for t in range(1, num_steps):
        out.append(weight[..., t] * out[-1] + value[..., t])
    actual = SCHEDULES[schedule](weight.expand(2, 3, num_steps), value)
    assert_close(actual, torch.stack(out, -1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_linear_recurrence_stable_in_float32(schedule):
    """Long chains near a unit root and near zero: no division by cumulative products."""
    weight = torch.cat([torch.full((1, 500), 0.999), torch.full((1, 500), 1e-3)], 0)  # (2, 500)
    value = torch.randn(2, 500)
    exact = [value[..., 0].double()]
    for t in range(1, 500):
        exact.append(weight[..., t].double() * exact[-1] + value[..., t].double())
    exact = torch.stack(exact, -1)
    out = SCHEDULES[schedule](weight, value)
    assert bool(torch.isfinite(out).all())
    assert_close(out, exact, atol=1e-4, rtol=1e-4)


def test_expand_and_broadcast():
    transition, offset, scale = random_chain((3,), 4)
    chain = GaussMarkov(transition, offset[0], scale)  # offset broadcasts over the batch
    assert chain.batch_shape == (3,)
    big = chain.expand((2, 3))
    assert big.batch_shape == (2, 3) and big.event_shape == (4,)
    assert chain.expand((3,)) is chain
    assert_close(big.mean, chain.mean.expand(2, 3, 4), atol=1e-12, rtol=0)
    value = torch.randn(2, 3, 4, dtype=F64)
    assert_close(big.log_prob(value), chain.log_prob(value), atol=1e-12, rtol=0)
    assert big.rsample((5,)).shape == (5, 2, 3, 4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="time dim last"):
        GaussMarkov(torch.tensor(0.5), torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="broadcastable"):
        GaussMarkov(torch.zeros(2, 3), torch.zeros(4, 3), torch.ones(3))
    with pytest.raises(ValueError):
        GaussMarkov(torch.zeros(3), torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), validate_args=True)
    with pytest.raises(ValueError, match="num_lags"):
        GaussMarkov(torch.zeros(3), torch.zeros(3), torch.ones(3)).lag_covariance(0)
    with pytest.raises(ValueError, match="event shape"):
        kl_divergence(GaussMarkov(*random_chain((), 4)), random_ar(1, (), 5))


# ---------------------------------------------------------------------------------------------
# KL(GaussMarkov || ARProcess)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 9], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)], ids=lambda b: f"batch{b}")
def test_kl_matches_dense_gaussian_kl(order, num_steps, batch_shape):
    params = random_chain(batch_shape, num_steps)
    prior = random_ar(order, batch_shape, num_steps)
    q_mean, q_cov = dense_chain(*params)
    p_mean, p_cov = dense_ar(prior.constant, prior.coeffs, prior.scale, num_steps)
    expected = kl_divergence(MultivariateNormal(q_mean, q_cov), MultivariateNormal(p_mean, p_cov))
    actual = kl_divergence(GaussMarkov(*params), prior)
    assert actual.shape == batch_shape
    assert_close(actual, expected, atol=1e-8, rtol=0)


@pytest.mark.parametrize("order", [1, 3])
def test_kl_broadcasts_against_an_expanded_prior(order):
    """Plates expand a small (H, k) prior to (B, H, k); the KL reads its unexpanded parameters."""
    params = random_chain((5, 2, 3), 6)
    prior = random_ar(order, (2, 3), 6)
    actual = kl_divergence(GaussMarkov(*params), prior.expand((5, 2, 3)))
    p_mean, p_cov = dense_ar(prior.constant, prior.coeffs, prior.scale, 6)
    q_mean, q_cov = dense_chain(*params)
    expected = kl_divergence(MultivariateNormal(q_mean, q_cov), MultivariateNormal(p_mean, p_cov))
    assert_close(actual, expected, atol=1e-8, rtol=0)
    # and a posterior smaller than the prior's batch
    small_q = GaussMarkov(*(p[0] for p in params))  # batch (2, 3)
    wide = kl_divergence(small_q, prior.expand((5, 2, 3)))
    assert wide.shape == (5, 2, 3)
    assert_close(wide, expected[0].expand(5, 2, 3), atol=1e-8, rtol=0)


def test_kl_is_zero_when_the_chain_is_the_ar1_prior():
    """A stationary AR(1) is itself a Gauss-Markov chain: a_t = phi, b_t = c, s_t = s after a
    stationary first step."""
    phi, constant, scale, num_steps = 0.8, 0.4, 0.6, 10
    prior = ARProcess(
        torch.tensor(constant, dtype=F64),
        torch.tensor([phi], dtype=F64),
        torch.tensor(scale, dtype=F64),
        num_steps,
    )
    transition = torch.full((num_steps,), phi, dtype=F64)
    offset = torch.full((num_steps,), constant, dtype=F64)
    chain_scale = torch.full((num_steps,), scale, dtype=F64)
    offset[0] = constant / (1 - phi)
    chain_scale[0] = scale / math.sqrt(1 - phi**2)
    assert_close(kl_divergence(GaussMarkov(transition, offset, chain_scale), prior), 0.0, atol=1e-12)
    # and moving one step away makes it positive
    offset[5] += 0.1
    assert float(kl_divergence(GaussMarkov(transition, offset, chain_scale), prior)) > 1e-4


@pytest.mark.parametrize("num_steps", [1, 2, 5, 9], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)], ids=lambda b: f"batch{b}")
def test_chain_to_chain_kl_matches_dense_gaussian_kl(batch_shape, num_steps):
    """KL between two Gauss-Markov chains with different transitions, offsets and scales."""
    q_params, p_params = random_chain(batch_shape, num_steps), random_chain(batch_shape, num_steps)
    expected = kl_divergence(
        MultivariateNormal(*dense_chain(*q_params)), MultivariateNormal(*dense_chain(*p_params))
    )
    actual = kl_divergence(GaussMarkov(*q_params), GaussMarkov(*p_params))
    assert actual.shape == batch_shape
    assert_close(actual, expected, atol=1e-8, rtol=0)


def test_chain_to_chain_kl_broadcasts_and_is_zero_on_itself():
    q_params, p_params = random_chain((5, 3), 6), random_chain((3,), 6)
    q, p = GaussMarkov(*q_params), GaussMarkov(*p_params)
    expected = kl_divergence(
        MultivariateNormal(*dense_chain(*q_params)),
        MultivariateNormal(*(t.expand((5,) + t.shape) for t in dense_chain(*p_params))),
    )
    actual = kl_divergence(q, p)
    assert actual.shape == (5, 3)
    assert_close(actual, expected, atol=1e-8, rtol=0)
    assert_close(kl_divergence(q, q), torch.zeros(5, 3, dtype=F64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="same steps"):
        kl_divergence(q, GaussMarkov(*random_chain((3,), 4)))


def test_kl_through_independent_wrappers():
    """Prior sites are ``ARProcess(...).to_event(1)`` expanded over the data plate; posterior sites
    ``GaussMarkov(...).to_event(1)``: the KL sums the per-dim KLs over k."""
    params = random_chain((4, 3, 2), 5)  # (B, H, k, T)
    prior = random_ar(2, (3, 2), 5)  # (H, k)
    q = GaussMarkov(*params).to_event(1)
    p = prior.to_event(1).expand((4, 3))
    assert q.batch_shape == p.batch_shape == (4, 3) and q.event_shape == p.event_shape == (2, 5)
    expected = kl_divergence(GaussMarkov(*params), prior).sum(-1)
    assert_close(kl_divergence(q, p), expected, atol=1e-12, rtol=0)


def test_family_holds_the_exact_posterior_kalman():
    """One AR(1) unit, x_t = A z_t + sigma eps_t, T = 20: a free (non-amortized) chain optimised on
    the ELBO (analytic KL + closed-form expected log-likelihood) meets the Kalman log-likelihood,
    while the best diagonal (mean-field over time) posterior does not."""
    constant, phi, ar_scale, gain, noise, num_steps = 0.2, 0.9, 0.5, 1.5, 1.0, 20
    prior = ARProcess(
        torch.tensor(constant, dtype=F64),
        torch.tensor([phi], dtype=F64),
        torch.tensor(ar_scale, dtype=F64),
        num_steps,
    )
    z = prior.sample()
    x = gain * z + noise * torch.randn(num_steps, dtype=F64)
    log_lik = kalman_log_likelihood(x.tolist(), constant, phi, ar_scale, gain, noise)

    def expected_log_lik(loc, var):
        return (
            -0.5 * math.log(2 * math.pi * noise**2) - ((x - gain * loc) ** 2 + gain**2 * var) / (2 * noise**2)
        ).sum()

    def fit(params, elbo_fn):
        optim = torch.optim.LBFGS(
            params, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
        )

        def closure():
            optim.zero_grad()
            loss = -elbo_fn()
            loss.backward()
            return loss

        for _ in range(5):
            optim.step(closure)
        with torch.no_grad():
            return float(elbo_fn())

    raw_a = torch.zeros(num_steps, dtype=F64, requires_grad=True)
    offset = (x / gain).clone().requires_grad_()
    raw_s = torch.zeros(num_steps, dtype=F64, requires_grad=True)

    def chain_elbo():
        chain = GaussMarkov(raw_a, offset, torch.nn.functional.softplus(raw_s))
        return expected_log_lik(chain.mean, chain.variance) - kl_divergence(chain, prior)

    elbo = fit([raw_a, offset, raw_s], chain_elbo)
    assert elbo <= log_lik + 1e-8  # a lower bound
    assert log_lik - elbo < 0.01 * num_steps

    loc = (x / gain).clone().requires_grad_()
    raw_diag = torch.zeros(num_steps, dtype=F64, requires_grad=True)

    def diag_elbo():
        scale = torch.nn.functional.softplus(raw_diag)
        q = dist.Normal(loc, scale).to_event(1)
        return expected_log_lik(loc, scale**2) - kl_divergence(q, prior)

    diag = fit([loc, raw_diag], diag_elbo)
    assert diag < elbo
    assert log_lik - diag > 0.01 * num_steps  # the test separates the two families


# ---------------------------------------------------------------------------------------------
# PathPosterior
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(5,), (2, 5)], ids=["B", "S,B"])
@pytest.mark.parametrize("latent_dim", [1, 2])
def test_path_posterior_shapes(lead, latent_dim):
    head = PathPosterior(in_features=6, units=4, latent_dim=latent_dim, context_dim=3, scale_max=2.0)
    assert (head.in_features, head.units, head.latent_dim) == (6, 4, latent_dim)
    h = torch.randn(lead + (7, 6))  # (..., B, T, F)
    transition, offset, scale = head(h)
    for tensor in (transition, offset, scale):
        assert tensor.shape == lead + (4, latent_dim, 7)
    assert bool((transition[..., 0] == 0).all()) and bool((transition.abs() < 1).all())
    assert bool((scale >= head.scale_min).all()) and bool((scale <= 2.0).all())
    q = head.dist(h)
    assert q.batch_shape == lead + (4,) and q.event_shape == (latent_dim, 7)
    assert q.rsample().shape == lead + (4, latent_dim, 7)
    loc, marg_scale = head.mean_and_scale(h)
    chain = GaussMarkov(transition, offset, scale)
    assert_close(loc, chain.mean, atol=1e-6, rtol=0)
    assert_close(marg_scale, chain.variance.sqrt(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("hidden", [0, 8])
def test_fresh_path_posterior_is_diagonal_with_init_scale(hidden):
    head = PathPosterior(3, 2, hidden=hidden, init_scale=0.7)
    assert (head.hidden is None) == (hidden == 0)
    transition, _, scale = head(torch.randn(4, 6, 3))
    assert bool((transition == 0).all())
    assert_close(scale, torch.full_like(scale, 0.7), atol=1e-6, rtol=0)


def test_path_posterior_reads_both_directions():
    """The parameters at the first step depend on the last features and vice versa."""
    torch.manual_seed(0)
    head = PathPosterior(3, 2, context_dim=4)
    torch.nn.init.normal_(head.head.weight)
    h = torch.randn(1, 6, 3, requires_grad=True)
    transition, offset, scale = head(h)
    first = torch.autograd.grad(offset[..., 0].sum() + scale[..., 0].sum(), h, retain_graph=True)[0]
    last = torch.autograd.grad(offset[..., -1].sum() + transition[..., -1].sum(), h)[0]
    assert float(first[0, -1].abs().sum()) > 0  # the future reaches the first step
    assert float(last[0, 0].abs().sum()) > 0  # the past reaches the last step


def test_path_posterior_bad_input_raises():
    head = PathPosterior(3, 2)
    with pytest.raises(ValueError, match="temporal=True"):
        head(torch.randn(4, 6, 3), temporal=False)
    with pytest.raises(ValueError, match=r"\(\.\.\., B, T, 3\)"):
        head(torch.randn(4, 6, 5))
    with pytest.raises(TypeError, match="units"):
        PathPosterior(3, 2.0)
    with pytest.raises(ValueError, match="scale_min"):
        PathPosterior(3, 2, init_scale=20.0)
    with pytest.raises(ValueError, match="hidden"):
        PathPosterior(3, 2, hidden=-1)


def test_path_posterior_in_a_pyro_trace_with_plates():
    """A temporal layer's site under the data plate (dim -2) and the units plate (dim -1): the
    posterior has batch (B, H) and event (k, T), TraceMeanField_ELBO uses the analytic KL against
    the expanded AR prior, and Trace_ELBO runs on its log_prob."""
    batch, units, latent_dim, num_steps, features = 5, 3, 2, 8, 4
    head = PathPosterior(features, units, latent_dim, context_dim=3)
    torch.nn.init.normal_(head.head.weight, std=0.3)
    prior = ARProcess(
        torch.zeros(units, latent_dim),
        torch.full((units, latent_dim, 2), 0.3),
        torch.ones(units, latent_dim),
        num_steps,
    )
    h = torch.randn(batch, num_steps, features)

    def model(h):
        with pyro.plate("data", batch, dim=-2), pyro.plate("units", units, dim=-1):
            pyro.sample("z", prior.to_event(1).expand((batch, units)))

    def guide(h):
        with pyro.plate("data", batch, dim=-2), pyro.plate("units", units, dim=-1):
            pyro.sample("z", head.dist(h))

    trace = poutine.trace(guide).get_trace(h)
    site = trace.nodes["z"]
    assert site["fn"].batch_shape == (batch, units)
    assert site["value"].shape == (batch, units, latent_dim, num_steps)
    expected = kl_divergence(GaussMarkov(*head(h)), prior).sum()
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, h)
    assert_close(loss, expected, atol=1e-4, rtol=1e-5)
    assert_close(TraceMeanField_ELBO().differentiable_loss(model, guide, h), loss, atol=0, rtol=0)
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert torch.isfinite(Trace_ELBO().differentiable_loss(model, guide, h))


@pytest.mark.parametrize("num_steps", [1, 2, 5, 17])
def test_recurrence_loop_gradients_exact(num_steps):
    """The loop's hand-written adjoint (one autograd node) against finite differences, to second
    order, and against autograd through the scan's ordinary operations."""
    weight = torch.randn(2, 3, num_steps, dtype=F64, requires_grad=True)
    value = torch.randn(2, 3, num_steps, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(_recurrence_loop, (weight, value))
    assert torch.autograd.gradgradcheck(_recurrence_loop, (weight, value))
    probe = torch.randn(2, 3, num_steps, dtype=F64)
    loop = torch.autograd.grad((_recurrence_loop(weight, value) * probe).sum(), (weight, value))
    scan_out = (_recurrence_scan(weight, value) * probe).sum()
    scan = torch.autograd.grad(scan_out, (weight, value), allow_unused=True)
    assert_close(loop[1], scan[1], atol=1e-12, rtol=1e-12)
    expected_weight = torch.zeros_like(weight) if scan[0] is None else scan[0]  # T = 1: w unused
    assert_close(loop[0], expected_weight, atol=1e-12, rtol=1e-12)


def test_linear_recurrence_broadcast_weight_gradient():
    """A weight broadcast over the batch gets the sum of its gradients."""
    weight = torch.randn(3, 6, dtype=F64, requires_grad=True)
    value = torch.randn(4, 3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_recurrence, (weight, value))

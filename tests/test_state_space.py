"""Tests for :class:`vdn_pyro.state_space.PatchStateSpace`: the Kalman filter's log density
against a dense Gaussian whose covariance is built here, step by step, from the linear map of the
latents' start and innovations; sampling; shapes, broadcasting and bad input."""

import pytest
import torch
from torch.distributions import MultivariateNormal

from tests.common import assert_close
from vdn_pyro.state_space import PatchStateSpace


def params(batch, horizon=11, patch=4, units=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        loc=torch.randn(batch + (horizon,), generator=gen, dtype=torch.float64),
        loading=torch.randn(horizon, units, generator=gen, dtype=torch.float64),
        patch=patch,
        phi=torch.tensor([0.95, -0.4, 0.0][:units], dtype=torch.float64),
        innovation=0.2 + torch.rand(units, generator=gen, dtype=torch.float64),
        start=0.3 + torch.rand(batch + (units,), generator=gen, dtype=torch.float64),
        noise=0.1 + torch.rand(batch + (horizon,), generator=gen, dtype=torch.float64),
    )


def linear_map(p):
    """The path's deviation from its mean as a linear map of independent standard Normals:
    ``(*batch, H, U Q)`` (unit i's start, then its Q - 1 innovations), written as a loop."""
    horizon, units = p["loading"].shape[-2:]
    q = -(-horizon // p["patch"])
    batch = torch.broadcast_shapes(p["start"].shape[:-1], p["loading"].shape[:-2])
    out = torch.zeros(batch + (horizon, units, q), dtype=torch.float64)
    for h in range(horizon):
        j = h // p["patch"]
        for i in range(units):
            w, phi = p["loading"][..., h, i], p["phi"][i]
            out[..., h, i, 0] = w * phi**j * p["start"][..., i]  # d_1 = start * N(0, 1)
            for k in range(1, j + 1):  # the innovation entering at patch k
                out[..., h, i, k] = w * phi ** (j - k) * p["innovation"][i]
    return out.flatten(-2)


def dense(p):
    m = linear_map(p)
    return m @ m.transpose(-1, -2) + torch.diag_embed(p["noise"] ** 2)


@pytest.mark.parametrize("batch", [(), (2,), (3, 2)])
@pytest.mark.parametrize("horizon, patch", [(11, 4), (12, 4), (5, 5), (7, 1)])
def test_log_prob_is_the_dense_gaussian(batch, horizon, patch):
    p = params(batch, horizon, patch)
    fn = PatchStateSpace(**p)
    assert fn.batch_shape == batch and fn.event_shape == (horizon,)
    cov = dense(p)
    assert_close(fn.covariance_matrix_dense(), cov, atol=1e-12, rtol=1e-12)
    ref = MultivariateNormal(p["loc"], cov)
    y = torch.randn((4,) + batch + (horizon,), dtype=torch.float64)  # (4, *batch, H)
    assert_close(fn.log_prob(y), ref.log_prob(y), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("batch", [(2,), (3, 2)])
def test_loadings_per_batch_element(batch):
    p = params(batch)
    p["loading"] = p["loading"] * (0.5 + torch.rand(batch + (11, 1), dtype=torch.float64))  # (*batch, H, U)
    fn = PatchStateSpace(**p)
    cov = dense(p)
    assert_close(fn.covariance_matrix_dense(), cov, atol=1e-12, rtol=1e-12)
    y = torch.randn((4,) + batch + (11,), dtype=torch.float64)
    assert_close(fn.log_prob(y), MultivariateNormal(p["loc"], cov).log_prob(y), atol=1e-10, rtol=1e-10)
    assert fn.expand((5,) + batch).log_prob(y[0]).shape == (5,) + batch
    torch.manual_seed(0)
    draws = fn.rsample((50000,))
    dev = draws - p["loc"]
    emp = torch.einsum("s...h,s...k->...hk", dev, dev) / draws.shape[0]
    assert_close(emp, cov, atol=0.05 * cov.abs().max().item())


def test_value_and_parameters_broadcast():
    p = params((3, 1))
    p["start"] = p["start"].expand(3, 2, 3)  # (3, 2, U)
    fn = PatchStateSpace(**p)
    assert fn.batch_shape == (3, 2)
    y = torch.randn(11, dtype=torch.float64)  # one path for every batch element
    ref = MultivariateNormal(fn.loc, fn.covariance_matrix_dense())
    assert_close(fn.log_prob(y), ref.log_prob(y), atol=1e-10, rtol=1e-10)
    wide = fn.expand((5, 3, 2))
    assert wide.batch_shape == (5, 3, 2) and wide.log_prob(y).shape == (5, 3, 2)


def test_samples_have_the_mean_and_covariance():
    torch.manual_seed(0)
    p = params((2,))
    fn = PatchStateSpace(**p)
    draws = fn.rsample((100000,))  # (S, 2, H)
    assert draws.shape == (100000, 2, 11)
    dev = draws - p["loc"]
    emp = torch.einsum("sbh,sbk->bhk", dev, dev) / draws.shape[0]
    cov = dense(p)
    assert_close(draws.mean(0), p["loc"], atol=0.05)
    assert_close(emp, cov, atol=0.05 * cov.abs().max().item())


def test_gradients_reach_every_parameter():
    p = params((2,))
    leaves = {k: v.clone().requires_grad_() for k, v in p.items() if k != "patch"}
    fn = PatchStateSpace(patch=p["patch"], **leaves)
    y = p["loc"] + torch.randn(2, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fn.log_prob(y).sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(loc=[0.0] * 11), TypeError, "loc to be a torch.Tensor"),
        (dict(patch=0), ValueError, "patch to be an int >= 1"),
        (dict(patch=2.0), ValueError, "patch to be an int >= 1"),
        (dict(loc=torch.zeros(2, 10, dtype=torch.float64)), ValueError, "H = 11"),
        (dict(phi=torch.zeros(2, dtype=torch.float64)), ValueError, r"phi and innovation of shape \(3,\)"),
        (dict(loading=torch.zeros(11, dtype=torch.float64)), ValueError, "loading with at least 2 dims"),
    ],
)
def test_bad_parameters_are_refused(change, error, match):
    with pytest.raises(error, match=match):
        PatchStateSpace(**{**params((2,)), **change})


def shared(horizon=11, patch=4, units=3):
    """Parameters shared by every path: start ``(U,)``, noise ``(H,)``, loading ``(H, U)``."""
    p = params((), horizon, patch, units)
    p["loc"] = torch.zeros(horizon, dtype=torch.float64)
    return p


def test_paths_that_share_the_parameters_share_one_filter():
    p = shared()
    loc = torch.randn(3, 2, 11, dtype=torch.float64)  # a mean per path, one covariance
    fn = PatchStateSpace(**{**p, "loc": loc})
    assert fn.batch_shape == (3, 2)
    y = torch.randn(4, 3, 2, 11, dtype=torch.float64)
    ref = MultivariateNormal(loc, dense(p))
    assert_close(fn.log_prob(y), ref.log_prob(y), atol=1e-10, rtol=1e-10)
    # shared start, per-path noise: the filter carries the noise's batch only
    noise = 0.1 + torch.rand(2, 11, dtype=torch.float64)
    fn = PatchStateSpace(**{**p, "loc": loc, "noise": noise})
    ref = MultivariateNormal(loc, dense({**p, "noise": noise, "start": p["start"].expand(2, 3)}))
    assert_close(fn.log_prob(y), ref.log_prob(y), atol=1e-10, rtol=1e-10)


def test_scaled_mixture_is_the_mixture_of_dense_gaussians():
    from vdn_pyro.state_space import ScaledStateSpaceMixture

    p = shared()
    base = PatchStateSpace(**p)
    gen = torch.Generator().manual_seed(3)
    loc = torch.randn(5, 2, 11, generator=gen, dtype=torch.float64)  # (K, B, H)
    scale = 0.5 + torch.rand(5, 2, 11, generator=gen, dtype=torch.float64)
    fn = ScaledStateSpaceMixture(loc, scale, base)
    assert fn.batch_shape == (2,) and fn.event_shape == (11,) and fn.num_draws == 5
    y = torch.randn(4, 2, 11, dtype=torch.float64)  # (S, B, H)
    cov = scale.unsqueeze(-1) * dense(p) * scale.unsqueeze(-2)  # (K, B, H, H)
    comp = MultivariateNormal(loc, cov).log_prob(y.unsqueeze(1))  # (S, K, B)
    ref = torch.logsumexp(comp, 1) - torch.log(torch.tensor(5.0, dtype=torch.float64))
    assert_close(fn.log_prob(y), ref, atol=1e-10, rtol=1e-10)
    assert_close(fn.mean, loc.mean(0))
    assert fn.expand((3, 2)).log_prob(y[:, None]).shape == (4, 3, 2)
    # draws: the mixture's mean and covariance (each path its own component and its own noise)
    torch.manual_seed(0)
    draws = fn.rsample((100000,))  # (S, B, H)
    assert draws.shape == (100000, 2, 11)
    centred = loc - loc.mean(0)  # (K, B, H)
    want = cov.mean(0) + torch.einsum("kbh,kbj->bhj", centred, centred) / 5  # (B, H, H)
    dev = draws - loc.mean(0)
    emp = torch.einsum("sbh,sbj->bhj", dev, dev) / draws.shape[0]
    assert_close(draws.mean(0), loc.mean(0), atol=0.05)
    assert_close(emp, want, atol=0.05 * want.abs().max().item())
    with pytest.raises(TypeError, match="base to be a PatchStateSpace"):
        ScaledStateSpaceMixture(loc, scale, "base")
    with pytest.raises(ValueError, match="H = 11 steps"):
        ScaledStateSpaceMixture(loc[..., :5], scale[..., :5], base)

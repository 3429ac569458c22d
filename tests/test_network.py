"""Tests for :class:`vdn_pyro.VDN`: sites and shapes, gradients, the deterministic twin,
parameter isolation, prediction and input validation."""

import contextlib
import copy
import math
import re

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from tests.common import assert_close
from vdn_pyro import VDN, AmortizedNormal, ARPrior, LocalELBO, fit
from vdn_pyro.primitives import module_params

B, D, OUT, T = 5, 4, 2, 6


def sample_sites(trace):
    """Non-subsample sample sites of a trace, by name."""
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not isinstance(site["fn"], poutine.subsample_messenger._Subsample)
    }


def targets(likelihood, out, lead):
    """Random valid targets of shape ``lead + (out,)`` (``lead`` for class labels)."""
    if likelihood == "categorical":
        return torch.randint(0, out, lead)
    if likelihood == "bernoulli":
        return torch.randint(0, 2, lead + (out,)).float()
    return torch.randn(lead + (out,))


# ---------------------------------------------------------------------------------------------
# Sites and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", ["normal", "ar"])
@pytest.mark.parametrize("pooling", ["mean", "sum", "sqrt"])
@pytest.mark.parametrize("latent_dim", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_model_and_guide_sites_agree(temporal, latent_dim, pooling, prior):
    units = (4, 3)
    net = VDN(D, OUT, units=units, latent_dim=latent_dim, pooling=pooling, prior=prior, hidden=(8,))
    lead = (B, T) if temporal else (B,)
    x, y = torch.randn(lead + (D,)), torch.randn(lead + (OUT,))
    guide_tr = poutine.trace(net.guide).get_trace(x, y)
    passed_on = []  # what the last layer hands to the head in the model's replay of the guide
    hook = net.head.register_forward_hook(lambda module, args, out: passed_on.append(args[0]))
    try:
        model_tr = poutine.trace(poutine.replay(net.model, trace=guide_tr)).get_trace(x, y)
    finally:
        hook.remove()
    guide_sites, model_sites = sample_sites(guide_tr), sample_sites(model_tr)

    assert list(guide_sites) == ["layers.0.z", "layers.1.z"] == net.site_names
    assert set(model_sites) == set(guide_sites) | {"obs"}
    assert model_sites["obs"]["is_observed"]
    event = (latent_dim, T) if temporal else (latent_dim,)
    for name, h in zip(net.site_names, units):
        g, m = guide_sites[name], model_sites[name]
        assert g["value"].shape == (B, h) + event, name
        assert torch.equal(g["value"], m["value"])
        assert g["fn"].batch_shape == m["fn"].batch_shape == (B, h), name
        assert g["fn"].event_shape == m["fn"].event_shape == event, name
        dims = {f.name: f.dim for f in g["cond_indep_stack"]}
        assert dims == {"data": -2, f"{name}.units": -1} == {f.name: f.dim for f in m["cond_indep_stack"]}
        assert torch.equal(torch.as_tensor(g["scale"]), torch.as_tensor(m["scale"]))

    # the guide returns {site: value}, the values its sites took
    returned = guide_tr.nodes["_RETURN"]["value"]
    assert list(returned) == net.site_names
    for name in net.site_names:
        assert returned[name] is guide_sites[name]["value"], name

    # what the last layer passes on: pooled over the k latent dims
    z = guide_sites["layers.1.z"]["value"]  # (B, H, k[, T])
    pooled = z.sum(-2 if temporal else -1)  # (B, H[, T])
    pooled = {"mean": pooled / latent_dim, "sum": pooled, "sqrt": pooled / math.sqrt(latent_dim)}[pooling]
    if temporal:
        pooled = pooled.transpose(-1, -2)  # (B, T, H)
    assert len(passed_on) == 1
    assert_close(passed_on[0], pooled, atol=1e-6, rtol=1e-6)
    assert model_tr.nodes["_RETURN"]["value"].shape == y.shape


def test_model_samples_targets_without_y():
    net = VDN(D, OUT, units=(4,), hidden=(8,))
    x = torch.randn(B, T, D)
    out = net.model(x)
    assert out.shape == (B, T, OUT)


# ---------------------------------------------------------------------------------------------
# Gradients reach every parameter
# ---------------------------------------------------------------------------------------------

LIKELIHOODS = {
    "gaussian-learned": dict(likelihood="gaussian", likelihood_scale="learned"),
    "gaussian-heteroscedastic": dict(likelihood="gaussian", likelihood_scale="heteroscedastic"),
    "student_t": dict(likelihood="student_t"),
    "bernoulli": dict(likelihood="bernoulli"),
    "categorical": dict(likelihood="categorical"),
}


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS.values()), ids=list(LIKELIHOODS))
@pytest.mark.parametrize("scale_mode", ["unit", "input"])
@pytest.mark.parametrize("prior", ["normal", "ar"])
def test_gradients_reach_every_parameter(prior, scale_mode, likelihood):
    net = VDN(
        D,
        3,
        units=(4, 3),
        latent_dim=2,
        hidden=(8,),
        prior=prior,
        learn_prior=True,
        scale_mode=scale_mode,
        **likelihood,
    )
    lead = (B, T) if prior == "ar" else (B,)  # the AR prior acts over time
    x, y = torch.randn(lead + (D,)), targets(likelihood["likelihood"], 3, lead)
    loss, _ = LocalELBO().loss_and_stats(net.model, net.guide, x, y)
    assert torch.isfinite(loss)
    loss.backward()
    params = dict(net.named_parameters())
    # the parameters the configuration promises are there
    if prior == "ar":
        expected = {"layers.0.prior.raw_phi", "layers.0.prior.constant", "layers.0.prior.raw_scale"}
    else:
        expected = {"layers.0.prior.loc_param", "layers.0.prior.raw_scale"}
    assert expected <= set(params)
    if scale_mode == "input":
        assert "layers.1.posterior.scale_head.weight" in params
    missing = [name for name, p in params.items() if p.grad is None]
    zero = [name for name, p in params.items() if p.grad is not None and not bool((p.grad != 0).any())]
    assert not missing, f"no gradient for {missing}"
    assert not zero, f"zero gradient for {zero}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in params.values())


# ---------------------------------------------------------------------------------------------
# The deterministic twin
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_deterministic_twin(temporal):
    options = dict(units=(4, 3), latent_dim=2, hidden=(8,), pooling="sqrt")
    net = VDN(D, OUT, **options)
    det = VDN(D, OUT, deterministic=True, **options)
    det.load_state_dict(net.state_dict())
    lead = (B, T) if temporal else (B,)
    x, y = torch.randn(lead + (D,)), torch.randn(lead + (OUT,))

    guide_tr = poutine.trace(det.guide).get_trace(x, y)
    assert not sample_sites(guide_tr)
    assert guide_tr.nodes["_RETURN"]["value"] == {}

    loss, stats = LocalELBO().loss_and_stats(det.model, det.guide, x, y)
    assert stats == {}

    with torch.no_grad():
        z = net.encode(x, sample=False)  # (B, [T,] H)
        loc = net.head(z)  # (B, [T,] out)
        scale = torch.nn.functional.softplus(net.likelihood.raw_scale) + net.likelihood.scale_min
    model_tr = poutine.trace(det.model).get_trace(x, y)
    obs = model_tr.nodes["obs"]["fn"].base_dist
    assert_close(obs.loc.squeeze(1), loc, atol=1e-6, rtol=1e-6)
    assert_close(obs.scale.squeeze(1), scale.expand_as(loc), atol=1e-6, rtol=1e-6)
    # no KL: the loss is exactly minus the log-likelihood at z = loc
    log_lik = torch.distributions.Normal(loc, scale).log_prob(y).sum()
    assert_close(loss.detach(), -log_lik, atol=1e-4, rtol=1e-6)
    # the stochastic twin's loss differs (it has a KL and samples z)
    stochastic = LocalELBO().loss_and_stats(net.model, net.guide, x, y)[0]
    assert float(stochastic.detach()) > float(loss.detach()) + 1e-3


def test_deterministic_twin_is_trainable():
    det = VDN(D, OUT, units=(4,), hidden=(8,), deterministic=True)
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    loss, _ = LocalELBO().loss_and_stats(det.model, det.guide, x, y)
    loss.backward()
    trained = ["trunk.net.0.weight", "layers.0.posterior.loc.weight", "head.weight", "likelihood.raw_scale"]
    grads = {name: p.grad for name, p in det.named_parameters()}
    for name in trained:
        assert grads[name] is not None and bool((grads[name] != 0).any()), name


# ---------------------------------------------------------------------------------------------
# Two networks never share parameters
# ---------------------------------------------------------------------------------------------


def seeded_loss(net, x, y, seed=1, isolated=True):
    """One seeded loss; ``isolated`` runs it as the library's own loops do, inside
    :func:`~vdn_pyro.primitives.module_params` (the global param store is left untouched)."""
    pyro.set_rng_seed(seed)
    with module_params() if isolated else contextlib.nullcontext():
        return float(LocalELBO().loss_and_stats(net.model, net.guide, x, y)[0].detach())


def test_two_networks_do_not_share_parameters():
    pyro.set_rng_seed(3)
    first = VDN(D, OUT, units=(4,), hidden=(8,))
    pyro.set_rng_seed(3)
    second = VDN(D, OUT, units=(4,), hidden=(8,))
    x, y = torch.randn(B, D), torch.randn(B, OUT)

    names = [name for name, _ in first.named_parameters()]
    assert names == [name for name, _ in second.named_parameters()]
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        assert p is not q and p.data_ptr() != q.data_ptr(), name
        assert torch.equal(p, q), name  # same seed, same init: only the storage differs
    assert seeded_loss(first, x, y) == seeded_loss(second, x, y)

    before = seeded_loss(second, x, y)
    state = copy.deepcopy(second.state_dict())
    with torch.no_grad():
        for p in first.parameters():
            p.add_(0.5)
    assert seeded_loss(first, x, y) != before
    assert seeded_loss(second, x, y) == before

    fit(first, torch.randn(20, D), torch.randn(20, OUT), steps=3, batch_size=10, seed=0)
    for key, value in second.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert len(pyro.get_param_store()) == 0
    assert list(pyro.get_param_store().keys()) == []


def test_two_networks_keep_their_parameters_under_stock_pyro():
    """Called outside the library's loops, under Pyro's default settings, a network registers its
    parameters in the global param store (Pyro's convention, so ``pyro.optim`` finds them); each
    network still computes with its own parameters."""
    pyro.set_rng_seed(3)
    first = VDN(D, OUT, units=(4,), hidden=(8,))
    pyro.set_rng_seed(3)
    second = VDN(D, OUT, units=(4,), hidden=(8,))
    x, y = torch.randn(B, D), torch.randn(B, OUT)
    before = seeded_loss(second, x, y, isolated=False)
    assert seeded_loss(first, x, y, isolated=False) == before
    stored = [p for _, p in pyro.get_param_store().named_parameters()]
    assert len(stored) == len(list(second.parameters()))
    assert {id(p) for p in stored} == {id(p) for p in second.parameters()}  # the first caller's tensors
    with torch.no_grad():
        for p in first.parameters():
            p.add_(0.5)
    assert seeded_loss(first, x, y, isolated=False) != before
    assert seeded_loss(second, x, y, isolated=False) == before
    assert seeded_loss(second, x, y, isolated=True) == before


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["stochastic", "deterministic"])
def test_predict_shapes(temporal, deterministic):
    net = VDN(D, OUT, units=(4, 3), hidden=(8,), deterministic=deterministic)
    lead = (B, T) if temporal else (B,)
    x = torch.randn(lead + (D,))
    levels = (0.1, 0.5, 0.9)
    pred = net.predict(x, num_samples=7, levels=levels)
    assert pred.samples.shape == (7,) + lead + (OUT,)
    assert pred.mean.shape == lead + (OUT,)
    assert pred.quantiles.shape == (3,) + lead + (OUT,)
    assert pred.levels == levels
    assert bool((pred.quantiles.diff(dim=0) >= 0).all())  # ordered by level
    assert torch.equal(pred.quantile(0.5), pred.quantiles[1])
    assert_close(pred.quantiles, torch.quantile(pred.samples, torch.tensor(levels), dim=0))
    with pytest.raises(ValueError, match=r"Expected a level in \(0\.1, 0\.5, 0\.9\), but got 0\.3"):
        pred.quantile(0.3)


@pytest.mark.parametrize("temporal", [False, True], ids=["static", "temporal"])
def test_predict_mean_of_deterministic_gaussian_is_head_output(temporal):
    net = VDN(D, OUT, units=(4, 3), hidden=(8,), deterministic=True, likelihood_scale=0.5)
    x = torch.randn(((B, T) if temporal else (B,)) + (D,))
    pred = net.predict(x, num_samples=4000)
    with torch.no_grad():
        head = net.head(net.encode(x, sample=False))
    assert_close(pred.mean, head, atol=1e-6, rtol=1e-6)
    # ... and the samples scatter around it with the fixed likelihood scale
    assert_close(pred.samples.mean(0), head, atol=4 * 0.5 / math.sqrt(4000) * 1.5, rtol=0)
    assert abs(float(pred.samples.std(0).mean()) - 0.5) < 0.02


def test_predict_mean_of_stochastic_gaussian_averages_the_head_over_samples():
    net = VDN(D, OUT, units=(4,), hidden=(8,), init_scale=1.0)
    x = torch.randn(B, D)
    pred = net.predict(x, num_samples=3000)
    with torch.no_grad():  # one layer, k = 1: E[head(z)] = head(E[z]) = head(loc)
        head = net.head(net.encode(x, sample=False))
    se = float(net.head.weight.detach().norm()) / math.sqrt(3000)
    assert_close(pred.mean, head, atol=5 * se, rtol=0)


def test_predict_categorical():
    net = VDN(D, 3, units=(4,), hidden=(8,), likelihood="categorical")
    pred = net.predict(torch.randn(B, D), num_samples=9)
    assert pred.samples.shape == (9, B)
    assert pred.mean.shape == (B, 3)
    assert_close(pred.mean.sum(-1), torch.ones(B))
    assert bool(((pred.samples >= 0) & (pred.samples < 3)).all())


# ---------------------------------------------------------------------------------------------
# Bad input: every error says what was expected and what came
# ---------------------------------------------------------------------------------------------


def _net():
    return VDN(D, OUT, units=(4,), hidden=(8,))


def _x():
    return torch.randn(B, D)


def _y():
    return torch.randn(B, OUT)


def _with(value, tensor, index):
    tensor = tensor.clone()
    tensor.view(-1)[index] = value
    return tensor


BAD_INPUTS = {
    "feature-count": (
        lambda: _net().model(torch.randn(B, D + 1), _y()),
        ValueError,
        r"Expected x of shape \(B, 4\) or \(B, T, 4\)",
        r"but got \(5, 5\)",
    ),
    "x-y-batch": (
        lambda: _net().model(_x(), torch.randn(B - 1, OUT)),
        ValueError,
        r"Expected y of shape \(5, 2\)",
        r"but got \(4, 2\)",
    ),
    "x-y-time": (
        lambda: _net().model(torch.randn(B, T, D), torch.randn(B, T + 1, OUT)),
        ValueError,
        r"Expected y of shape \(5, 6, 2\)",
        r"but got \(5, 7, 2\)",
    ),
    "nan-in-x": (
        lambda: _net().model(_with(math.nan, _x(), 3), _y()),
        ValueError,
        r"Expected finite x",
        r"contains NaN or inf",
    ),
    "inf-in-y": (
        lambda: _net().model(_x(), _with(math.inf, _y(), 1)),
        ValueError,
        r"Expected finite y",
        r"contains NaN or inf",
    ),
    "beta-zero": (
        lambda: VDN(D, OUT, units=(4,), beta=0),
        ValueError,
        r"Expected beta of layer 0 > 0",
        r"but got \[0\.0, 0\.0, 0\.0, 0\.0\]",
    ),
    "beta-negative": (
        lambda: VDN(D, OUT, units=(4,), beta=-1),
        ValueError,
        r"Expected beta of layer 0 > 0",
        r"but got \[-1\.0, -1\.0, -1\.0, -1\.0\]",
    ),
    "beta-one-negative-unit": (
        lambda: VDN(D, OUT, units=(4, 3), beta=[1.0, torch.tensor([1.0, -2.0, 1.0])]),
        ValueError,
        r"Expected beta of layer 1 > 0",
        r"but got \[-2\.0\] at units \[1\]",
    ),
    "beta-shape": (
        lambda: VDN(D, OUT, units=(4,), beta=[torch.ones(3)]),
        ValueError,
        r"Expected beta of layer 0 to be a number or have shape \(4,\)",
        r"but got shape \(3,\)",
    ),
    "beta-shape-second-layer": (
        lambda: VDN(D, OUT, units=(4, 3), beta=[1.0, torch.ones(4)]),
        ValueError,
        r"Expected beta of layer 1 to be a number or have shape \(3,\)",
        r"but got shape \(4,\)",
    ),
    "beta-type": (
        lambda: VDN(D, OUT, units=(4,), beta="big"),
        TypeError,
        r"Expected beta of layer 0 to be a positive number",
        r"but got str",
    ),
    "ar-order-vdn": (
        lambda: VDN(D, OUT, prior="ar", ar_order=0),
        ValueError,
        r"Expected ar_order >= 1",
        r"but got 0",
    ),
    "ar-order-prior": (
        lambda: ARPrior(4, order=0),
        ValueError,
        r"Expected AR order >= 1",
        r"but got 0",
    ),
    "units-vdn": (
        lambda: VDN(D, OUT, units=(0,)),
        ValueError,
        r"Expected units to be a non-empty tuple of ints >= 1",
        r"but got \(0,\)",
    ),
    "units-amortized": (
        lambda: AmortizedNormal(D, 0),
        ValueError,
        r"Expected units >= 1",
        r"but got 0",
    ),
    "scale-mode": (
        lambda: VDN(D, OUT, scale_mode="global"),
        ValueError,
        r"Expected scale_mode in \('unit', 'input'\)",
        r"but got 'global'",
    ),
    "likelihood": (
        lambda: VDN(D, OUT, likelihood="poisson"),
        ValueError,
        r"Expected likelihood in \[.*'gaussian'.*\]",
        r"but got 'poisson'",
    ),
    "label-too-large": (
        lambda: VDN(D, 3, likelihood="categorical").model(_x(), torch.tensor([0, 1, 2, 3, 0])),
        ValueError,
        r"Expected class labels in \[0, 3\)",
        r"but got values in \[0, 3\]",
    ),
    "label-negative": (
        lambda: VDN(D, 3, likelihood="categorical").model(_x(), torch.tensor([0, -1, 2, 1, 0])),
        ValueError,
        r"Expected class labels in \[0, 3\)",
        r"but got values in \[-1, 2\]",
    ),
    "label-float": (
        lambda: VDN(D, 3, likelihood="categorical").model(_x(), torch.zeros(B)),
        TypeError,
        r"Expected integer class labels",
        r"but got dtype torch.float32",
    ),
    "x-not-tensor": (
        lambda: _net().model(np.zeros((B, D), dtype=np.float32), _y()),
        TypeError,
        r"Expected x to be a torch.Tensor",
        r"but got ndarray",
    ),
    "x-integer": (
        lambda: _net().model(torch.zeros(B, D, dtype=torch.long), _y()),
        TypeError,
        r"Expected x to have a floating dtype",
        r"but got torch.int64",
    ),
    "fit-rows": (
        lambda: fit(_net(), torch.randn(10, D), torch.randn(9, OUT), steps=1),
        ValueError,
        r"Expected x and y with the same number of rows",
        r"but got 10 and 9",
    ),
    "fit-steps-and-epochs": (
        lambda: fit(_net(), torch.randn(10, D), torch.randn(10, OUT), steps=5, epochs=2),
        ValueError,
        r"exactly one of steps or epochs",
        r"got steps=5, epochs=2",
    ),
}


@pytest.mark.parametrize("call, error, expected, got", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_raises_with_clear_message(call, error, expected, got):
    with pytest.raises(error, match=expected) as info:
        call()
    assert info.type is error
    message = str(info.value)
    assert re.search(got, message), message

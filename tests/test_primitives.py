"""Tests for :mod:`vdn_pyro.primitives`: the ``neurons`` site and beta validation."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from tests.common import assert_close
from vdn_pyro.primitives import BETA_FLOOR, NEURONS_INFER_KEY, as_beta, neurons

B, H, K, T = 4, 3, 2, 5


def static_fn(loc_shift=0.0):
    """Batch (B, H), event (K,)."""
    return dist.Normal(torch.full((B, H, K), loc_shift), 1.0).to_event(1)


def temporal_fn():
    """Batch (B, H), event (K, T)."""
    return dist.Normal(torch.zeros(B, H, K, T), 1.0).to_event(2)


def layer(fn, beta, name="layer.z"):
    """A model or guide with one neuron site inside a data plate at dim -2."""

    def program():
        with pyro.plate("data", B, dim=-2):
            return neurons(name, fn(), beta)

    return program


@pytest.mark.parametrize("make_fn", [static_fn, temporal_fn], ids=["static", "temporal"])
def test_unit_plate_name_dim_and_size(make_fn):
    tr = poutine.trace(layer(make_fn, torch.ones(H))).get_trace()
    site = tr.nodes["layer.z"]
    frames = {f.name: f for f in site["cond_indep_stack"]}
    assert set(frames) == {"data", "layer.z.units"}
    assert frames["layer.z.units"].dim == -1
    assert frames["layer.z.units"].size == H
    assert frames["data"].dim == -2
    assert site["infer"].get(NEURONS_INFER_KEY) is True
    assert site["value"].shape == make_fn().batch_shape + make_fn().event_shape


@pytest.mark.parametrize(
    "beta",
    [torch.tensor([0.5, 1.0, 3.0]), torch.tensor([1e-3, 2.0, 7.5]), [0.25, 0.5, 4.0]],
    ids=["tensor", "small-and-large", "list"],
)
def test_site_scale_equals_beta(beta):
    tr = poutine.trace(layer(static_fn, beta)).get_trace()
    scale = tr.nodes["layer.z"]["scale"]
    assert torch.is_tensor(scale) and scale.shape == (H,)
    assert_close(scale, torch.as_tensor(beta), atol=0, rtol=1e-7)


def test_scalar_beta_broadcasts_to_units():
    tr = poutine.trace(layer(static_fn, 2.5)).get_trace()
    assert_close(tr.nodes["layer.z"]["scale"], torch.full((H,), 2.5), atol=0, rtol=0)


def test_none_beta_means_unscaled():
    tr = poutine.trace(layer(static_fn, None)).get_trace()
    assert float(torch.as_tensor(tr.nodes["layer.z"]["scale"])) == 1.0


@pytest.mark.parametrize(
    "beta", [torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3), [0.0, 0.0, 5.0]], ids=["one", "all", "list"]
)
def test_zero_beta_is_floored(beta):
    tr = poutine.trace(layer(static_fn, beta)).get_trace()
    scale = tr.nodes["layer.z"]["scale"]
    expected = torch.as_tensor(beta).clamp_min(BETA_FLOOR)
    assert_close(scale, expected, atol=0, rtol=1e-7)
    assert bool((scale > 0).all())
    assert bool((scale[torch.as_tensor(beta) == 0] == BETA_FLOOR).all())


def test_beta_is_not_modified_in_place():
    beta = torch.tensor([0.0, 1.0, 2.0])
    poutine.trace(layer(static_fn, beta)).get_trace()
    assert beta.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("make_fn", [static_fn, temporal_fn], ids=["static", "temporal"])
def test_model_and_guide_scale_identical(make_fn):
    beta = torch.tensor([0.0, 0.3, 2.0])
    model, guide = layer(make_fn, beta), layer(make_fn, beta)
    guide_tr = poutine.trace(guide).get_trace()
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace()
    g, m = guide_tr.nodes["layer.z"], model_tr.nodes["layer.z"]
    assert torch.equal(torch.as_tensor(g["scale"]), torch.as_tensor(m["scale"]))
    assert torch.equal(g["value"], m["value"])
    # the per-element log-prob is scaled per unit, identically on both sides
    guide_tr.compute_log_prob()
    site = guide_tr.nodes["layer.z"]
    assert_close(site["log_prob"], site["unscaled_log_prob"] * beta.clamp_min(BETA_FLOOR), atol=1e-12)


def test_scale_composes_with_subsampling():
    """Inside a subsampled data plate the site scale is beta * N / B."""
    beta = torch.tensor([0.5, 1.0, 2.0])

    def program():
        with pyro.plate("data", 3 * B, subsample=torch.arange(B), dim=-2):
            return neurons("layer.z", static_fn(), beta)

    tr = poutine.trace(program).get_trace()
    assert_close(tr.nodes["layer.z"]["scale"], beta * 3.0, atol=0, rtol=1e-7)


@pytest.mark.parametrize(
    "beta, match",
    [
        (torch.tensor([1.0, -1.0, 2.0]), r">= 0 for every unit, but got \[-1\.0\] at units \[1\]"),
        (torch.tensor([1.0, math.nan, 2.0]), r"to be finite, but got"),
        (torch.tensor([1.0, math.inf, 2.0]), r"to be finite, but got"),
        (torch.ones(2), r"have shape \(3,\).*but got shape \(2,\)"),
        (torch.ones(3, 1), r"have shape \(3,\).*but got shape \(3, 1\)"),
        ([1.0, 2.0], r"have shape \(3,\).*but got shape \(2,\)"),
        (-0.5, r">= 0 for every unit, but got"),
    ],
    ids=["negative", "nan", "inf", "short", "column", "short-list", "negative-number"],
)
def test_bad_beta_raises_value_error(beta, match):
    with pytest.raises(ValueError, match=match) as info:
        poutine.trace(layer(static_fn, beta)).get_trace()
    assert "layer.z" in str(info.value)  # the message names the site


@pytest.mark.parametrize("beta", ["1.0", True, {"a": 1}, object()], ids=["str", "bool", "dict", "object"])
def test_non_number_beta_raises_type_error(beta):
    with pytest.raises(TypeError, match=r"Expected beta of site 'layer.z' to be a positive number.*but got"):
        poutine.trace(layer(static_fn, beta)).get_trace()


@pytest.mark.parametrize(
    "fn",
    [dist.Normal(torch.zeros(H), 1.0).to_event(1), dist.Normal(0.0, 1.0)],
    ids=["event-only", "scalar"],
)
def test_distribution_without_batch_dims_raises(fn):
    with pytest.raises(ValueError, match=r"at least 1 batch dims.*but got batch_shape \(\)"):
        neurons("layer.z", fn, torch.ones(H))


def test_unit_plate_at_other_dim():
    """With dim=-2 the units sit at batch dim -2 and beta is reshaped to (H, 1)."""
    beta = torch.tensor([0.5, 1.0, 2.0])
    fn = dist.Normal(torch.zeros(H, B), 1.0)

    def program():
        with pyro.plate("data", B, dim=-1):
            return neurons("layer.z", fn, beta, dim=-2)

    site = poutine.trace(program).get_trace().nodes["layer.z"]
    frame = next(f for f in site["cond_indep_stack"] if f.name == "layer.z.units")
    assert frame.dim == -2 and frame.size == H
    assert_close(site["scale"], beta[:, None], atol=0, rtol=1e-7)


@pytest.mark.parametrize(
    "beta, expected",
    [
        (2.0, [2.0, 2.0, 2.0]),
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
        (torch.tensor([4.0, 5.0, 6.0]), [4.0, 5.0, 6.0]),
    ],
    ids=["number", "list", "tensor"],
)
def test_as_beta_accepts(beta, expected):
    out = as_beta(beta, 3)
    assert out.shape == (3,) and out.dtype == torch.get_default_dtype()
    assert out.tolist() == expected


def test_as_beta_zero_needs_allow_zero():
    with pytest.raises(ValueError, match=r"Expected beta > 0 for every unit, but got \[0\.0\]"):
        as_beta([1.0, 0.0], 2)
    assert as_beta([1.0, 0.0], 2, allow_zero=True).tolist() == [1.0, 0.0]


def test_as_beta_copies_input():
    beta = torch.tensor([1.0, 2.0])
    out = as_beta(beta, 2)
    out[0] = 9.0
    assert beta[0] == 1.0


def test_neurons_refuses_a_distribution_name_with_a_clear_error():
    with pytest.raises(TypeError, match=r"site 'z' to be a torch/Pyro distribution.*got str 'normal'"):
        neurons("z", "normal", torch.ones(3))

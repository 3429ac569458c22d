"""Tests for the per-unit diagnostics in :mod:`vdn_pyro.inference.diagnostics`.

The status classifier and the measures are checked on units built by hand (weights set so that
the posterior is the prior, or the scale sits at its floor, ...), the mutual information against
the closed form of a linear-Gaussian encoder, and the monitor inside a real fit.
"""

import math

import numpy as np
import pyro
import pytest
import torch
from torch.nn.functional import softplus

from tests.common import assert_close
from vdn_pyro import VDN, LocalELBO, fit
from vdn_pyro.inference.constraints import KLBand, Persistence
from vdn_pyro.inference.diagnostics import (
    STATUSES,
    StatusThresholds,
    UnitMonitor,
    classify_units,
    layer_summary,
    mutual_information,
    unit_kl,
    unit_report,
)

SITE = "layers.0.z"


def inverse_softplus(value):
    value = torch.as_tensor(value, dtype=torch.get_default_dtype())
    return value + torch.log(-torch.expm1(-value))


def constructed_network():
    """Five units reading x = (x0, x1) directly (no trunk), with hand-set heads:

    0. loc = 0, scale = 1: the posterior is the N(0, 1) prior -> dead;
    1. loc = x0, scale at the 1e-3 floor: large KL, no noise -> deterministic;
    2. loc = 10 x0, scale 0.5: loc^2 ~ 100, far above the (0.01, 1) band -> exploding;
    3. loc = 0.5 x0, scale 0.8: a healthy unit, inside every default band -> living;
    4. loc = 1 (constant), scale 1: KL = 0.5 but no dependence on x -> dead (mi = 0).
    """
    net = VDN(2, 1, units=(5,), trunk="none", scale_mode="unit", scale_min=1e-3)
    post = net.layers[0].posterior
    with torch.no_grad():
        post.loc.weight.zero_()
        post.loc.weight[:, 0] = torch.tensor([0.0, 1.0, 10.0, 0.5, 0.0])
        post.loc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
        post.raw_scale.copy_(inverse_softplus(torch.tensor([1.0, 1e-6, 0.5, 0.8, 1.0]))[:, None])
    return net


def inputs(n=1000, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- status
def test_status_of_constructed_units():
    report = unit_report(constructed_network(), inputs())
    assert report.status.tolist() == ["dead", "deterministic", "exploding", "living", "dead"]
    assert report.active.tolist() == [False, True, True, True, False]
    assert_close(report.kl[0], 0.0, atol=1e-6)
    assert_close(report.mi[[0, 4]].to_numpy(copy=True), np.zeros(2), atol=1e-6)
    assert report.kl[1] > 5  # log(1 / 1e-3) - 0.5 + 0.5 E[x^2]
    assert_close(report.kl[4], 0.5, rtol=1e-5)
    assert report.loc_sq[2] > 10 * 1.0
    assert report.in_band.tolist() == [False, False, False, True, False]
    assert_close(report.mi[3], 0.5 * math.log(1 + 0.25 / 0.64), rtol=0.1)
    assert set(report.status) <= set(STATUSES)


def test_classifier_thresholds_and_priority():
    kl = np.array([0.005, 3.0, 0.2, 0.2, np.nan, 0.2])
    mi = np.array([0.005, 2.0, 0.2, 0.2, 0.2, 0.2])
    loc_sq = np.array([0.0, 1.0, 0.3, 0.3, 0.3, 50.0])
    scale = np.array([1.0, 0.02, 0.8, 0.8, 0.8, 0.01])
    drift = np.array([0.0, 0.0, 0.1, 0.9, 0.0, 0.0])
    status = classify_units(kl, mi, loc_sq, scale, np.ones(6), loc_high=1.0, drift=drift)
    assert status.tolist() == ["dead", "deterministic", "living", "drifting", "exploding", "exploding"]
    strict = StatusThresholds(deterministic_scale=0.001, drift=1.0)
    status = classify_units(kl, mi, loc_sq, scale, np.ones(6), loc_high=1.0, drift=drift, thresholds=strict)
    assert status[1] == "living" and status[3] == "living"
    with pytest.raises(ValueError, match="dead_kl"):
        StatusThresholds(dead_kl=-1.0)


def test_drift_against_previous_report():
    net = constructed_network()
    x = inputs()
    previous = unit_report(net, x)
    same = unit_report(net, x, previous=previous)
    assert_close(same.drift.to_numpy(copy=True), np.zeros(5), atol=1e-6)
    with torch.no_grad():
        net.layers[0].posterior.loc.weight[3, 0] = 1.4  # unit 3: loc^2 x4, KL x~3
    moved = unit_report(net, x, previous=previous)
    assert moved.status[3] == "drifting" and moved.drift[3] > 1.0
    assert moved.status[0] == "dead"
    assert np.isnan(unit_report(net, x).drift).all()


# ---------------------------------------------------------------------------- measures
@pytest.mark.parametrize("a, s", [(1.0, 0.5), (2.0, 0.3), (0.5, 1.0)], ids=["a1-s0.5", "a2-s0.3", "a0.5-s1"])
def test_mutual_information_linear_gaussian(a, s):
    """x ~ N(0, 1), q(z | x) = N(a x, s^2): I(x; z) = 0.5 log(1 + a^2 / s^2)."""
    exact = 0.5 * math.log(1 + a**2 / s**2)
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    loc = (a * x)[:, None, None]  # (N, H=1, k=1)
    scale = torch.full_like(loc, s)
    generator = torch.Generator().manual_seed(1)
    mi = mutual_information(loc, scale, num_samples=8, max_points=2000, generator=generator)
    assert_close(mi, torch.tensor([exact]), rtol=0.1)
    # the same unit inside a network, through unit_report
    net = VDN(1, 1, units=(1,), trunk="none", scale_mode="unit")
    post = net.layers[0].posterior
    with torch.no_grad():
        post.loc.weight.fill_(a)
        post.loc.bias.zero_()
        post.raw_scale.fill_(float(inverse_softplus(s)))
    report = unit_report(net, x[:, None], max_points=2000)
    assert_close(report.mi[0], exact, rtol=0.1)


def test_mutual_information_leaves_global_rng_alone():
    net, x = constructed_network(), inputs(200)
    state = torch.get_rng_state()
    unit_report(net, x)
    assert torch.equal(state, torch.get_rng_state())


def test_unit_kl_matches_local_elbo():
    """The analytic per-unit KL of the first layer equals the ELBO's per-unit statistic on the
    same batch (the first layer's posterior does not depend on any sample)."""
    net = VDN(4, 1, units=(6, 3), hidden=(8,))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    _, stats = LocalELBO().loss_and_stats(net.model, net.guide, x, y)
    kl = unit_kl(net, x)
    assert_close(kl[SITE], stats[SITE].kl, rtol=1e-5, atol=1e-6)
    assert kl["layers.1.z"].shape == (3,)


def test_temporal_ar_report():
    net = VDN(3, 1, units=(4,), hidden=(8,), prior="ar", learn_prior=True)
    x, y = torch.randn(16, 10, 3), torch.randn(16, 10, 1)
    _, stats = LocalELBO().loss_and_stats(net.model, net.guide, x, y)
    report = unit_report(net, x, constraints=[Persistence(half_life=(0.5, 2.0))])
    prior = net.layers[0].prior
    assert_close(report.kl.to_numpy(copy=True), stats[SITE].kl, rtol=1e-4, atol=1e-6)
    assert_close(report.phi.to_numpy(copy=True), prior.phi[:, 0].detach(), rtol=1e-6)
    assert_close(report.half_life.to_numpy(copy=True), prior.half_life, rtol=1e-6)
    assert report.half_life_in_band.all()  # phi = 0.5 has half-life 1
    assert not unit_report(net, x, half_life_band=(2.0, 5.0)).half_life_in_band.any()
    plain = unit_report(VDN(3, 1, units=(2,)), torch.randn(8, 3))
    assert plain.phi.isna().all() and plain.half_life.isna().all()


def test_layer_summary():
    report = unit_report(constructed_network(), inputs())
    summary = layer_summary(report)
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row.units == 5
    assert_close(row.fraction_living, 0.2)
    assert_close(row.fraction_dead, 0.4)
    assert_close(row.fraction_deterministic, 0.2)
    assert_close(row.fraction_exploding, 0.2)
    assert_close(row.fraction_out_of_band, 0.8)
    assert_close(row.fraction_active, 0.6)
    assert_close(row.total_kl, report.kl.sum(), rtol=1e-6)


def test_bands_come_from_constraints():
    net = constructed_network()
    x = inputs()
    report = unit_report(net, x, constraints=[KLBand(0.4, 0.6)])
    assert report.kl_in_band.tolist() == list((report.kl >= 0.4) & (report.kl <= 0.6))
    assert report.kl_in_band[4] and not report.kl_in_band[3]  # KL 0.5 and 0.17
    default = unit_report(net, x)
    assert default.kl_in_band[3] and not default.kl_in_band[4]  # the default band is (0.05, 0.3)


def test_report_errors():
    with pytest.raises(ValueError, match="deterministic"):
        unit_report(VDN(2, 1, units=(3,), deterministic=True), inputs(8))
    with pytest.raises(TypeError, match="layers"):
        unit_report(torch.nn.Linear(2, 2), inputs(8))
    with pytest.raises(ValueError, match="kl_band"):
        unit_report(constructed_network(), inputs(8), kl_band=(0.5, 0.1))
    with pytest.raises(ValueError, match="max_points"):
        mutual_information(torch.zeros(4, 2), torch.ones(4, 2), max_points=0)


# ---------------------------------------------------------------------------- monitor
def test_unit_monitor_records_regimes_during_fit():
    pyro.set_rng_seed(0)
    net = VDN(4, 1, units=(6,), hidden=(8,))
    x, y = torch.randn(128, 4), torch.randn(128, 1)
    monitor = UnitMonitor(x, every=5, window=10, max_points=128)
    band = KLBand(0.1, 0.4)
    result = fit(
        net, x, y, steps=22, batch_size=32, seed=0, constraints=[band], callbacks=[monitor], progress=False
    )
    frame = result.monitor
    assert sorted(frame.step.unique().tolist()) == [0, 5, 10, 15, 20, 22]
    assert len(frame) == 6 * 6
    assert frame[frame.step == 0].kl_ema.isna().all() and frame[frame.step > 0].kl_ema.notna().all()
    assert frame[frame.step < 10].drift.isna().all() and frame[frame.step >= 10].drift.notna().all()
    last = frame[frame.step == 22]
    assert last.kl_in_band.tolist() == list((last.kl >= 0.1) & (last.kl <= 0.4))  # the KLBand's band
    assert_close(last.beta.to_numpy(copy=True), net.layers[0].beta)
    summary = monitor.summary()
    assert summary.step.tolist() == [0, 5, 10, 15, 20, 22]
    assert "fraction_living" in summary.columns
    with pytest.raises(ValueError, match="every"):
        UnitMonitor(x, every=0)
    with pytest.raises(TypeError, match="tensor"):
        UnitMonitor([1.0, 2.0])


def test_scale_floor_status_uses_posterior_clamp():
    """A scale pinned at a larger clamp (0.2) is deterministic though it is 20% of the prior."""
    net = VDN(2, 1, units=(1,), trunk="none", scale_mode="unit", scale_min=0.2, init_scale=0.5)
    with torch.no_grad():
        net.layers[0].posterior.loc.weight.fill_(1.0)
        net.layers[0].posterior.raw_scale.fill_(-5.0)
    report = unit_report(net, inputs())
    assert_close(report.scale[0], 0.2, rtol=1e-6)
    assert float(softplus(torch.tensor(-5.0))) < 0.2
    assert report.status[0] == "deterministic"

"""Tests for the local constraints in :mod:`vdn_pyro.inference.constraints`.

Each constraint is checked to move the quantity it claims to, against the same fit without it,
plus argument validation, scoping to sites and state round trips.
"""

import math

import pyro
import pytest
import torch
from torch.distributions import kl_divergence

from tests.common import assert_close
from vdn_pyro import VDN, ARPrior, LocalELBO, fit
from vdn_pyro.inference.constraints import FreeBits, KLBand, LocBand, Persistence, ScaleGuard
from vdn_pyro.inference.diagnostics import unit_kl

SITE = "layers.0.z"


def regression_data(n=512, d=4, seed=0):
    """y = sin(w . x) + 0.1 noise: enough signal for a few nats of useful information."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)  # (N, D)
    w = torch.randn(d, 1, generator=g)  # (D, 1)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)  # (N, 1)
    return x, y


def small_net(**options):
    options = {"units": (8,), "hidden": (16,), **options}
    return VDN(4, 1, **options)


class Recorder:
    """A fit callback that keeps ``fn(state)`` after every step."""

    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def on_step_end(self, state):
        self.seen.append(self.fn(state))


def train(net, x, y, steps, constraints=(), callbacks=(), lr=1e-2, batch_size=128):
    return fit(
        net,
        x,
        y,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=0,
        constraints=constraints,
        callbacks=callbacks,
        progress=False,
    )


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: KLBand(0.3, 0.1), "low < high"),
        (lambda: KLBand(0.1, 0.1), "low < high"),
        (lambda: KLBand(-0.1, 0.3), "low >= 0"),
        (lambda: KLBand(rate=-0.1), "rate > 0"),
        (lambda: KLBand(rate=0.0), "rate > 0"),
        (lambda: KLBand(beta_min=0.0), "beta_min > 0"),
        (lambda: KLBand(beta_min=1.0, beta_max=0.5), "beta_min < beta_max"),
        (lambda: KLBand(ema=1.0), "ema < 1"),
        (lambda: KLBand(damping=-1.0), "damping >= 0"),
        (lambda: KLBand(margin=0.5), "margin < 0.5"),
        (lambda: KLBand(granularity="neuron"), "granularity"),
        (lambda: KLBand(every=0), "every"),
        (lambda: KLBand(high=math.inf), "finite"),
        (lambda: FreeBits(-0.1), "lam >= 0"),
        (lambda: FreeBits(float("nan")), "finite"),
        (lambda: LocBand(1.0, 0.5), "low < high"),
        (lambda: LocBand(weight=-1.0), "weight >= 0"),
        (lambda: LocBand(project=2.0), "project <= 1"),
        (lambda: ScaleGuard(0.0, 1.0), "min > 0"),
        (lambda: ScaleGuard(2.0, 1.0), "min < max"),
        (lambda: Persistence(half_life=(0.0, 5.0)), "half_life lo > 0"),
        (lambda: Persistence(half_life=(-1.0, 5.0)), "half_life lo > 0"),
        (lambda: Persistence(half_life=(5.0, 2.0)), "lo < half_life hi"),
        (lambda: Persistence(half_life=(1.0, math.inf)), "finite"),
        (lambda: Persistence(), "exactly one"),
        (lambda: Persistence(half_life=(1, 2), phi=(0.1, 0.2)), "exactly one"),
        (lambda: Persistence(half_life=3.0), "band"),
        (lambda: Persistence(phi=(0.5, 1.0)), "phi hi < 1"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_sites_type():
    with pytest.raises(TypeError, match="sites"):
        KLBand(sites=[1.5])
    with pytest.raises(TypeError, match="sites"):
        FreeBits(sites=[])


@pytest.mark.parametrize(
    "constraint, match",
    [
        (KLBand(sites="layers.3.z"), "does not exist"),
        (FreeBits(0.1, sites=["layers.0.z", "encoder.z"]), "does not exist"),
        (LocBand(sites=5), "out of range"),
        (ScaleGuard(sites=-3), "out of range"),
        (Persistence(half_life=(1.0, 5.0)), "ARPrior"),
        (Persistence(half_life=(1.0, 5.0), sites=0), "ARPrior"),
    ],
    ids=[
        "klband-name",
        "freebits-name",
        "locband-index",
        "scaleguard-index",
        "persistence-all",
        "persistence-site",
    ],
)
def test_bad_site_is_an_error_at_fit_start(constraint, match):
    net = VDN(4, 1, units=(8, 4))
    x, y = regression_data(16)
    with pytest.raises(ValueError, match=match):
        fit(net, x, y, steps=1, constraints=[constraint], progress=False)


def test_deterministic_twin_is_rejected():
    net = small_net(deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
        KLBand().bind(net)


def test_sites_by_name_and_index_select_layers():
    net = VDN(4, 1, units=(8, 4, 2))
    c = KLBand(sites=["layers.2.z", 0]).bind(net)
    assert [layer.site for layer in c.layers] == ["layers.0.z", "layers.2.z"]
    assert c.covers("layers.0.z") and not c.covers("layers.1.z")
    assert FreeBits(sites="layers.1.z").covers("layers.1.z")  # names need no binding
    with pytest.raises(RuntimeError, match="bind"):
        LocBand(sites=1).covers("layers.1.z")


# ------------------------------------------------------------------------------ KLBand
def test_klband_thermostat_direction():
    """Above the band beta grows, below it shrinks, inside it stays; clipped to the range."""
    net = small_net(units=(3,))
    layer = net.layers[0]
    c = KLBand(0.1, 0.4, rate=0.5, ema=0.0, beta_min=1e-3, beta_max=10.0, damping=0.0, margin=0.0)
    c.bind(net)
    c.observe(layer, torch.tensor([1.0, 0.01, 0.2]))
    beta = layer.beta.clone()
    assert beta[0] > 1 and beta[1] < 1 and beta[2] == 1
    assert_close(beta[0], math.exp(0.5 * math.log(1.0 / 0.4)), rtol=1e-5)
    for _ in range(100):
        c.observe(layer, torch.tensor([1.0, 0.01, 0.2]))
    assert_close(layer.beta, torch.tensor([10.0, 1e-3, 1.0]), rtol=1e-5)


def test_klband_damping_and_margin():
    """log beta = u + c d with u = r d after one step, d measured from the inner band."""
    net = small_net(units=(2,))
    layer = net.layers[0]
    c = KLBand(0.1, 0.4, rate=0.1, ema=0.0, damping=2.0, margin=0.25).bind(net)
    inner = (0.1 * 4**0.25, 0.4 / 4**0.25)
    assert_close(torch.tensor(c.target), torch.tensor(inner), rtol=1e-6)
    c.observe(layer, torch.tensor([1.0, 0.12]))  # 0.12 is inside [l, h] but below l'
    d = torch.tensor([math.log(1.0 / inner[1]), math.log(0.12 / inner[0])])
    assert_close(layer.beta, torch.exp(0.1 * d + 2.0 * d), rtol=1e-5)
    assert_close(c.log_beta[SITE], 0.1 * d, rtol=1e-5)


def test_klband_layer_granularity_shares_one_beta():
    net = small_net(units=(3,))
    layer = net.layers[0]
    c = KLBand(0.1, 0.4, rate=0.5, ema=0.0, granularity="layer").bind(net)
    c.observe(layer, torch.tensor([3.0, 0.0, 0.0]))  # mean 1.0 is above the band
    assert bool((layer.beta == layer.beta[0]).all()) and layer.beta[0] > 1


def test_klband_holds_units_in_band():
    """With the thermostat >= 90% of units end inside the band; with the fixed beta it starts
    from (1.0) every unit collapses out of it."""
    x, y = regression_data()
    low, high = 0.1, 0.4
    fractions = {}
    for use in (False, True):
        pyro.set_rng_seed(0)
        net = small_net(beta=1.0)
        constraints = [KLBand(low, high)] if use else []
        train(net, x, y, 600, constraints)
        kl = unit_kl(net, x)[SITE]  # (H,)
        fractions[use] = float(((kl >= low) & (kl <= high)).float().mean())
    assert fractions[True] >= 0.9, fractions
    assert fractions[False] < fractions[True], fractions


def test_klband_state_dict_round_trip():
    net = small_net(units=(3,))
    c = KLBand(0.1, 0.4).bind(net)
    c.observe(net.layers[0], torch.tensor([1.0, 0.01, 0.2]))
    state = c.state_dict()
    other = KLBand(0.1, 0.4)
    other.load_state_dict(state)
    assert_close(other.ema[SITE], c.ema[SITE])
    assert_close(other.log_beta[SITE], c.log_beta[SITE])
    assert other.num_updates == c.num_updates
    with pytest.raises(ValueError, match="no state"):
        FreeBits().load_state_dict({"ema": 1})


# ------------------------------------------------------------------------------ FreeBits
def test_free_bits_term_is_max_of_kl_and_lambda():
    """The loss charges each unit max(KL_i, lam) (KL_i the batch mean) per observation, and no
    gradient reaches a unit's posterior below lam."""
    net = small_net(units=(4,), scale_mode="unit")
    with torch.no_grad():  # units 0, 1 near their prior (small KL), units 2, 3 far from it
        net.layers[0].posterior.loc.weight[:2].mul_(0.01)
        net.layers[0].posterior.loc.bias[:2].zero_()
        net.layers[0].posterior.loc.bias[2:].fill_(2.0)
    x, y = regression_data(64)
    lam = 0.5
    posts = net.posteriors(x)
    loc, scale = posts[SITE]  # (B, H, 1)
    q = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)
    kl_true = kl_divergence(q, net.layers[0].prior((x.shape[0],))).mean(0)  # (H,)
    assert bool((kl_true[:2] < lam).all()) and bool((kl_true[2:] > lam).all())

    def kl_part(hooks):
        net.zero_grad()
        model = pyro.poutine.block(net.model, hide=["obs"])  # the KL part of the loss only
        loss = LocalELBO(hooks=hooks).differentiable_loss(model, net.guide, x, y)
        loss.backward()
        return loss.detach(), net.layers[0].posterior.raw_scale.grad.clone()  # (H, 1)

    loss_fb, grad_fb = kl_part([FreeBits(lam)])
    loss_plain, grad_plain = kl_part([])
    n = x.shape[0]
    assert_close(loss_plain, n * kl_true.sum(), rtol=1e-4)
    assert_close(loss_fb, n * torch.clamp(kl_true, min=lam).sum(), rtol=1e-4)
    assert bool((grad_fb[:2] == 0).all()) and bool((grad_plain[:2] != 0).all())
    assert_close(grad_fb[2:], grad_plain[2:])


def test_free_bits_transform_per_unit_and_scoped():
    kl = torch.tensor([[0.05, 1.0, 0.2], [0.15, 3.0, 0.0]])  # (B=2, H=3): unit means 0.1, 2, 0.1
    out = FreeBits(0.5).transform_kl(SITE, kl)
    assert_close(out, torch.tensor([[0.5, 1.0, 0.5], [0.5, 3.0, 0.5]]))
    assert bool((out.mean(0) >= 0.5).all())
    assert FreeBits(0.5, sites="layers.1.z").transform_kl(SITE, kl) is kl


def test_free_bits_keeps_units_from_collapsing():
    """At beta = 5 every unit collapses; with free bits no KL gradient acts below lam, so every
    unit keeps a KL term >= lam and carries information."""
    x, y = regression_data()
    lam = 0.3
    results = {}
    for use in (False, True):
        pyro.set_rng_seed(0)
        net = small_net(beta=5.0)
        train(net, x, y, 200, [FreeBits(lam)] if use else [], lr=2e-2)
        results[use] = unit_kl(net, x)[SITE]  # (H,)
        if use:  # the term the loss charges is at least lam for every unit
            pyro.set_rng_seed(1)
            hooked, _ = LocalELBO(hooks=[FreeBits(lam)]).loss_and_stats(net.model, net.guide, x, y)
            pyro.set_rng_seed(1)  # same z: the two losses differ only in the KL terms
            plain, stats = LocalELBO().loss_and_stats(net.model, net.guide, x, y)
            kl = stats[SITE].kl  # (H,) the real KL, which stats report
            charged = kl.sum() + (hooked - plain).detach() / (5.0 * x.shape[0])  # sum_i term_i
            expected = torch.clamp(kl, min=lam).sum()  # sum_i max(KL_i, lam) >= H * lam
            assert abs(float(charged) - float(expected)) < 1e-3 * (1 + float(expected))
            assert bool((kl < lam).any()), "free bits never bound, so this check proves nothing"
    assert float(results[False].max()) < 0.01, results
    assert float(results[True].mean()) > 0.5 * lam, results


def test_free_bits_soft_is_no_floor_and_hard_holds_it():
    """At beta = 3 the default (soft) free bits only removes the gradient below lam: Adam carries
    every unit past the edge and nothing brings it back, so all end below lam, as documented.
    With hard=True the term below lam is 2 lam - KL, which pushes back: every unit ends at lam,
    up to the optimiser's step noise."""
    x, y = regression_data()
    lam = 0.3
    kl = {}
    for hard in (False, True):
        pyro.set_rng_seed(0)
        net = small_net(beta=3.0)
        train(net, x, y, 200, [FreeBits(lam, hard=hard)], lr=2e-2)
        kl[hard] = unit_kl(net, x)[SITE]  # (H,) nats per observation
    assert bool((kl[False] < lam).all()), kl[False]
    assert float(kl[True].min()) >= 0.95 * lam, kl[True]
    assert float(kl[True].max()) <= 1.2 * lam, kl[True]  # held at the floor, not pushed far above


def test_free_bits_hard_term_and_validation():
    kl = torch.tensor([[0.05, 1.0, 0.2], [0.15, 3.0, 0.0]])  # (B=2, H=3): unit means 0.1, 2, 0.1
    out = FreeBits(0.5, hard=True).transform_kl(SITE, kl)
    assert_close(out, torch.tensor([[0.95, 1.0, 0.8], [0.85, 3.0, 1.0]]))  # 2 lam - KL below
    assert_close(out.mean(0), torch.tensor([0.9, 2.0, 0.9]))  # >= lam: the unit is charged more
    with pytest.raises(TypeError, match="hard"):
        FreeBits(0.5, hard="yes")
    assert repr(FreeBits(0.5, hard=True)) == "FreeBits(lam=0.5, hard=True)"


# ------------------------------------------------------------------------------ LocBand
def test_loc_band_penalty_brings_loc_sq_into_band():
    x, y = regression_data()
    low, high = 2.0, 4.0  # far above where the units sit on their own
    loc_sq = {}
    for use in (False, True):
        pyro.set_rng_seed(0)
        net = small_net(beta=1e-2)
        train(net, x, y, 150, [LocBand(low, high, weight=1.0)] if use else [], lr=2e-2)
        loc, _ = net.posteriors(x)[SITE]  # (N, H, 1)
        loc_sq[use] = (loc**2).mean((0, 2))  # (H,)
    inside = (loc_sq[True] >= low * 0.95) & (loc_sq[True] <= high * 1.05)
    assert bool(inside.all()), loc_sq[True]
    assert float(loc_sq[False].max()) < low, loc_sq[False]


def test_loc_band_penalty_value_and_gradient():
    net = small_net(units=(2,))
    x, y = regression_data(32)
    with torch.no_grad():
        net.layers[0].posterior.loc.weight.zero_()
        net.layers[0].posterior.loc.bias.copy_(torch.tensor([3.0, 0.5]))  # loc^2 = 9 and 0.25
    c = LocBand(0.1, 1.0, weight=2.0)
    trace = pyro.poutine.trace(net.guide).get_trace(x, y, num_data=320)
    penalty = c.penalty(SITE, trace.nodes[SITE], None)
    assert_close(penalty, 2.0 * 320 * (9.0 - 1.0), rtol=1e-5)  # N = 320 observations
    penalty.backward()
    grad = net.layers[0].posterior.loc.bias.grad
    assert grad[0] > 0 and grad[1] == 0
    assert LocBand(0.1, 1.0, sites="layers.1.z").penalty(SITE, trace.nodes[SITE], None) == 0.0


@pytest.mark.parametrize("fraction", [1.0, 0.5], ids=["project", "homeostasis"])
def test_loc_band_projection_rescales_rows(fraction):
    net = small_net(units=(3,), latent_dim=2)
    x, _ = regression_data(64)
    with torch.no_grad():
        net.layers[0].posterior.loc.weight.mul_(10.0)
    c = LocBand(0.01, 1.0, project=fraction).bind(net)
    before = (net.posteriors(x)[SITE][0] ** 2).mean((0, 2))  # (H,)
    c.project_layer(net.layers[0], before)
    after = (net.posteriors(x)[SITE][0] ** 2).mean((0, 2))  # (H,)
    target = before.clamp(0.01, 1.0)
    expected = before * (target / before) ** fraction
    assert_close(after, expected, rtol=1e-4)
    if fraction == 1.0:
        assert bool(((after >= 0.01 * 0.999) & (after <= 1.0 * 1.001)).all())


def test_loc_band_projection_during_fit():
    x, y = regression_data()
    pyro.set_rng_seed(0)
    net = small_net(beta=1e-3)
    with torch.no_grad():
        net.layers[0].posterior.loc.weight.mul_(20.0)
    train(net, x, y, 50, [LocBand(0.01, 1.0, weight=0.0, project=True)])
    loc_sq = (net.posteriors(x)[SITE][0] ** 2).mean((0, 2))  # (H,)
    assert float(loc_sq.max()) < 1.5, loc_sq


# ------------------------------------------------------------------------------ ScaleGuard
@pytest.mark.parametrize("scale_mode", ["unit", "input"])
def test_scale_guard_holds_scale_in_range(scale_mode):
    """Tiny beta pulls scales to 0 and huge beta to the prior's 1; the guard holds [0.3, 0.6]."""
    x, y = regression_data()
    low, high = 0.3, 0.6
    for beta, init in [(1e-4, 0.32), (5.0, 0.58)]:
        scales = {}
        for use in (False, True):
            pyro.set_rng_seed(0)
            net = small_net(beta=beta, scale_mode=scale_mode, init_scale=init)
            record = Recorder(lambda state: state.stats[SITE].scale)
            train(net, x, y, 60, [ScaleGuard(low, high)] if use else [], [record], lr=2e-2)
            _, scale = net.posteriors(x)[SITE]  # (N, H, 1)
            scales[use] = (scale, torch.stack(record.seen))  # (N, H, 1), (steps, H)
        scale, seen = scales[True]
        assert float(scale.min()) >= low - 1e-6 and float(scale.max()) <= high + 1e-6
        assert float(seen.min()) >= low - 1e-6 and float(seen.max()) <= high + 1e-6
        unguarded = scales[False][0]
        assert float(unguarded.min()) < low or float(unguarded.max()) > high


def test_scale_guard_rejects_disjoint_clamp():
    net = small_net(scale_max=1.0, init_scale=0.5)
    with pytest.raises(ValueError, match="does not overlap"):
        ScaleGuard(2.0, 5.0).bind(net)


# ------------------------------------------------------------------------------ Persistence
def temporal_data(n=64, t=12, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g).cumsum(1) * 0.3  # (N, T, D)
    y = x[..., :1] + 0.1 * torch.randn(n, t, 1, generator=g)  # (N, T, 1)
    return x, y


def test_persistence_keeps_half_life_in_band():
    """Units start with half-life 1 step (phi = 0.5) and a band of [3, 10] steps: every unit is
    in band from the first step on; unconstrained they stay short."""
    x, y = temporal_data()
    band = (3.0, 10.0)
    for use in (False, True):
        pyro.set_rng_seed(0)
        net = VDN(3, 1, units=(6,), hidden=(8,), prior="ar", learn_prior=True)
        record = Recorder(lambda state: state.network.layers[0].prior.half_life)
        train(net, x, y, 60, [Persistence(half_life=band)] if use else [], [record], batch_size=32)
        half_life = torch.stack(record.seen)  # (steps, H)
        inside = (half_life >= band[0]) & (half_life <= band[1])
        if use:
            assert bool(inside.all()), half_life[-1]
        else:
            assert not bool(inside[-1].all()), half_life[-1]


def test_persistence_phi_band_and_higher_order():
    prior = ARPrior(4, order=2, phi=torch.tensor([[0.1, 0.05], [0.5, 0.3], [1.2, -0.3], [0.0, 0.0]]))
    lo, hi = 2.0, 6.0
    half_life = prior.clamp_half_life(lo, hi)
    assert bool(((half_life >= lo) & (half_life <= hi)).all()), half_life
    assert_close(prior.phi[1], torch.tensor([0.5, 0.3]), atol=1e-5)  # already inside: untouched
    c = Persistence(phi=(0.5, 0.9))
    assert_close(torch.tensor(c.half_life), torch.tensor([1.0, math.log(0.5) / math.log(0.9)]), rtol=1e-5)


def test_set_phi_keeps_parameter_object():
    prior = ARPrior(3, phi=0.2)
    param = prior.raw_phi
    prior.set_phi(torch.tensor([0.1, -0.4, 0.9]))
    assert prior.raw_phi is param
    assert_close(prior.phi[:, 0], torch.tensor([0.1, -0.4, 0.9]), atol=1e-5)
    with pytest.raises(ValueError, match="stationary"):
        prior.set_phi(torch.tensor([0.1, 1.5, 0.2]))
    bounded = ARPrior(2, phi=0.5, phi_range=(0.2, 0.8))
    bounded.set_phi(torch.tensor([0.9, 0.3]))
    assert float(bounded.phi.detach().max()) <= 0.8

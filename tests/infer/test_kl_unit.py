"""One KL unit everywhere (DESIGN.md section 12): nats per time step for temporal units, nats per
observation otherwise.

The same unit must get the same number in the ELBO's statistics, the :class:`KLBand` controller,
:class:`FreeBits`' floor, :func:`unit_report` (and its status thresholds), the fit's logs and
ArviZ; and the number must not depend on T for the same per-step information. The loss itself
still charges the KL summed over the steps (the exactness tests in ``test_elbo.py`` hold it).
"""

import copy
import math

import numpy as np
import pyro
import pytest
import torch
from torch.distributions import Normal

from tests.common import assert_close
from vdn_pyro import VDN, LocalELBO, fit
from vdn_pyro.inference.constraints import FreeBits, KLBand, layer_stats
from vdn_pyro.inference.diagnostics import UnitMonitor, unit_report
from vdn_pyro.models import Forecaster
from vdn_pyro.unit_status import StatusThresholds

SITE = "layers.0.z"
L, H = 24, 6


def windows(n, seed=0):
    """``n`` consecutive look-back windows of a noisy sine, and their horizons: ``(n, L)``, ``(n, H)``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n + L + H, dtype=torch.float32)
    series = torch.sin(0.3 * t) + 0.2 * torch.randn(t.shape, generator=g)  # (n + L + H,)
    x = torch.stack([series[i : i + L] for i in range(n)])  # (n, L)
    y = torch.stack([series[i + L : i + L + H] for i in range(n)])  # (n, H)
    return x, y


def chunks(x, steps):
    """``(n, F) -> (n / T, T, F)``: the same windows as chunks of T consecutive ones."""
    return x.reshape(x.shape[0] // steps, steps, x.shape[-1])


def forecaster(prior="normal", **options):
    options = {"lookback": L, "horizon": H, "units": 4, "features": 8, "train_draws": 2, **options}
    return Forecaster(prior=prior, **options)


def elbo_stats(net, x, y):
    with torch.no_grad():
        return LocalELBO().loss_and_stats(net.model, net.guide, x, y)


# ----------------------------------------------------------------------- one number per unit
@pytest.mark.parametrize("steps", [1, 4, 8], ids=["T1", "T4", "T8"])
def test_controller_report_and_statistics_agree_on_chunks(steps):
    """On chunks of T windows: the ELBO's statistic, KLBand's observed KL and unit_report's kl are
    one number per unit, in nats per window (per step)."""
    net = forecaster()
    x, y = windows(64)
    xc, yc = (x, y) if steps == 1 else (chunks(x, steps), chunks(y, steps))
    _, stats = elbo_stats(net, xc, yc)
    band = KLBand(0.05, 0.3, ema=0.0).bind(net)  # ema = 0: the average is the last observation
    band.observe(net.layers[0], layer_stats(band.layers, stats)[SITE].kl)
    report = unit_report(net, xc, constraints=[band])
    assert_close(report.kl.to_numpy(copy=True), stats[SITE].kl, rtol=1e-5, atol=1e-7)
    assert_close(report.kl_ema.to_numpy(copy=True), stats[SITE].kl, rtol=1e-5, atol=1e-7)
    assert_close(band.ema[SITE], stats[SITE].kl, rtol=1e-6)
    # ... and that number is the KL per window: the static windows give the same (Normal prior)
    static = unit_report(net, x)
    assert_close(report.kl.to_numpy(copy=True), static.kl.to_numpy(copy=True), rtol=1e-5, atol=1e-7)


def test_kl_per_step_is_independent_of_chunk_length():
    """A stationary posterior (each window's posterior reads that window only) under an iid prior
    has one KL per window whatever T: the per-chunk KL, which the loss charges, is T times it."""
    net = forecaster()
    x, y = windows(96)
    per_window = elbo_stats(net, x, y)[1][SITE].kl  # (U,) static windows
    assert float(per_window.min()) > 0.01  # not vacuous
    for steps in (2, 3, 6, 12):
        xc, yc = chunks(x, steps), chunks(y, steps)
        stats = elbo_stats(net, xc, yc)[1][SITE].kl
        assert_close(stats, per_window, rtol=1e-5, msg=f"T={steps}")
        # the loss still charges the KL over the T steps: beta * N_chunks * T * KL per step
        model = pyro.poutine.block(net.model, hide=["obs"])
        with torch.no_grad():
            kl_part = LocalELBO().differentiable_loss(model, net.guide, xc, yc)
        beta = net.layers[0].beta
        assert_close(kl_part, (beta * per_window).sum() * xc.shape[0] * steps, rtol=1e-5)


def test_kl_per_step_converges_under_an_ar_prior():
    """Under an AR prior the first window of a chunk pays the marginal and the others the
    conditional, so the per-step KL moves with T but settles (it does not grow like T)."""
    net = forecaster(prior="ar", phi=0.8)
    x, y = windows(240)
    kl = {steps: elbo_stats(net, chunks(x, steps), chunks(y, steps))[1][SITE].kl for steps in (4, 20, 40)}
    assert_close(kl[40], kl[20], rtol=0.1)
    assert float((kl[40] / kl[4]).max()) < 2  # per chunk it would be 10 times


def test_fit_logs_and_living_fraction_use_the_unit(tmp_path):
    """fit's logged per-unit KL and the living fraction of its log (and bar) are the per-step KL of
    the step's batch (one full batch on chunks: exactly the ELBO's statistic before the update)."""
    import pandas as pd

    net = forecaster()
    x, y = windows(64)
    xc, yc = chunks(x, 8), chunks(y, 8)
    _, stats = elbo_stats(copy.deepcopy(net), xc, yc)
    kl = stats[SITE].kl  # (U,) per window
    living_kl = float(kl.sort().values[1:3].mean())  # splits the units: the check can fail
    options = dict(steps=1, batch_size=xc.shape[0], log_every=1, seed=0, progress=False)
    result = fit(net, xc, yc, log_dir=tmp_path, living_kl=living_kl, **options)
    assert_close(torch.as_tensor(result.unit_kl[SITE][-1]), kl, rtol=1e-5)
    living = float((kl > living_kl).float().mean())
    assert 0 < living < 1
    assert_close(pd.read_csv(tmp_path / "log.csv").living.iloc[-1], living)
    # per chunk (the old unit) every unit would have counted as living
    assert bool((kl * 8 > living_kl).all())


def test_unit_monitor_ema_is_per_step():
    pyro.set_rng_seed(0)
    net = forecaster()
    x, y = windows(64)
    xc, yc = chunks(x, 8), chunks(y, 8)
    monitor = UnitMonitor(xc, every=1, ema=0.0, max_points=8)
    seen = []

    class Spy:
        def on_step_end(self, state):
            seen.append(state.stats[SITE].kl.clone())

    fit(net, xc, yc, steps=2, batch_size=xc.shape[0], seed=0, callbacks=[Spy(), monitor], progress=False)
    assert_close(monitor.ema[SITE], seen[-1])
    last = monitor.frame().query("step == 2")
    assert_close(last.kl_ema.to_numpy(copy=True), seen[-1])


# ------------------------------------------------------------- status does not depend on T
def temporal_unit_net(slopes):
    """A VDN whose units read x_t directly: q(z_{i,t} | x) = N(a_i x_t, 1) under N(0, 1), so each
    step carries KL 0.5 a_i^2 and information 0.5 log(1 + a_i^2), whatever T."""
    net = VDN(1, 1, units=(len(slopes),), trunk="none", scale_mode="unit", init_scale=1.0)
    post = net.layers[0].posterior
    with torch.no_grad():
        post.loc.weight.copy_(torch.tensor(slopes)[:, None])
        post.loc.bias.zero_()
        post.raw_scale.fill_(math.log(math.e - 1))  # softplus^-1(1)
    return net


def test_status_does_not_flip_with_sequence_length():
    """The issue's unit: 0.00045 nats per step is dead at T = 20 and at T = 50 (per sequence it
    was 0.009 -> dead and 0.0225 -> living); a unit with 0.045 nats per step is living at both."""
    slopes = [0.03, 0.3]
    net = temporal_unit_net(slopes)
    kl_step = 0.5 * torch.tensor(slopes) ** 2
    dead_kl = StatusThresholds().dead_kl
    assert float(kl_step[0]) * 20 < dead_kl < float(kl_step[0]) * 50  # the old unit straddled it
    g = torch.Generator().manual_seed(0)
    reports = {}
    for steps in (20, 50):
        x = torch.randn(256, steps, 1, generator=g)  # (N, T, 1)
        reports[steps] = report = unit_report(net, x, max_points=256)
        assert_close(report.kl.to_numpy(copy=True), kl_step, rtol=0.05)  # E x^2 = 1 over the sample
        exact_mi = 0.5 * np.log1p(np.array(slopes) ** 2)
        assert_close(report.mi[1], exact_mi[1], rtol=0.25)
        _, stats = elbo_stats(net, x, torch.randn(256, steps, 1, generator=g))
        assert_close(report.kl.to_numpy(copy=True), stats[SITE].kl, rtol=1e-5, atol=1e-8)
    assert reports[20].status.tolist() == reports[50].status.tolist() == ["dead", "living"]


# ------------------------------------------------------------------------- FreeBits per step
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_free_bits_floor_is_per_step(hard):
    """On chunks of T windows the floor is lam per window: the KL part of the loss is
    N_chunks * T * sum_i beta_i max(KL_i, lam) (soft), whatever T."""
    net = forecaster(units=4, train_draws=1)
    x, y = windows(96)
    per_window = elbo_stats(net, x, y)[1][SITE].kl  # (U,)
    lam = float(per_window.median())
    assert bool((per_window < lam).any()) and bool((per_window > lam).any())
    beta = net.layers[0].beta
    model = pyro.poutine.block(net.model, hide=["obs"])
    below = 2 * lam - per_window if hard else torch.full_like(per_window, lam)
    charged = torch.where(per_window >= lam, per_window, below)  # (U,)
    for steps in (1, 4, 12):
        xc, yc = (x, y) if steps == 1 else (chunks(x, steps), chunks(y, steps))
        with torch.no_grad():
            kl_part = LocalELBO(hooks=[FreeBits(lam, hard=hard)]).differentiable_loss(
                model, net.guide, xc, yc
            )
        n = xc.shape[0] * steps
        assert_close(kl_part, n * (beta * charged).sum(), rtol=1e-5, msg=f"T={steps}")


def test_free_bits_records_the_real_kl():
    net = forecaster(units=4, train_draws=1)
    x, y = windows(48)
    xc, yc = chunks(x, 4), chunks(y, 4)
    _, plain = elbo_stats(net, xc, yc)
    with torch.no_grad():
        _, hooked = LocalELBO(hooks=[FreeBits(10.0)]).loss_and_stats(net.model, net.guide, xc, yc)
    assert_close(hooked[SITE].kl, plain[SITE].kl, rtol=1e-6)
    assert float(plain[SITE].kl.max()) < 10.0  # the floor bound everywhere, yet stats are real


# ------------------------------------------------------------------------------- ArviZ label
def test_arviz_training_kl_names_its_unit():
    pytest.importorskip("arviz")
    from vdn_pyro.inference.arviz import to_inference_data
    from vdn_pyro.unit_status import KL_UNITS

    net = forecaster()
    x, y = windows(32)
    result = fit(net, chunks(x, 4), chunks(y, 4), steps=2, batch_size=8, log_every=1, seed=0, progress=False)
    idata = to_inference_data(net, x[:4], y[:4], num_samples=4, history=result)
    training = idata["training"] if hasattr(idata, "training") else idata.training
    assert training[f"{SITE}.kl"].attrs["units"] == KL_UNITS
    assert training.attrs["kl_units"] == KL_UNITS
    assert "per time step" in KL_UNITS and "per observation" in KL_UNITS


def test_single_input_report_warns_instead_of_calling_units_dead():
    net = temporal_unit_net([0.3, 1.0])
    x = torch.randn(1, 10, 1)
    with pytest.warns(UserWarning, match="single input"):
        report = unit_report(net, x)
    assert report.mi.isna().all() and report.var_mean.isna().all()
    assert not report.active.any()
    assert "dead" not in report.status.tolist()  # KL 0.045 and 0.5 per step: not collapsed


@pytest.mark.parametrize(
    "make", [lambda: VDN(L, H, units=(3,)), lambda: forecaster()], ids=["vdn", "forecaster"]
)
def test_float64_inputs_are_refused_with_a_clear_error(make):
    """fit casts float64 data to the default dtype; predict and unit_report do not cast, and
    refuse float64 up front with a TypeError naming the fix (not torch's matmul error)."""
    net = make()
    x, y = windows(16)
    fit(net, x.double(), y.double(), steps=1, batch_size=8, seed=0, progress=False)
    for call in (lambda: net.predict(x.double(), num_samples=2), lambda: unit_report(net, x.double())):
        with pytest.raises(TypeError, match=r"Expected x of dtype torch.float32.*x.to\(torch.float32\)"):
            call()
    with pytest.raises(TypeError, match="Expected y of dtype torch.float32"):
        LocalELBO().loss_and_stats(net.model, net.guide, x, y.double())
    units = 3 if isinstance(net, VDN) else 4
    assert net.predict(x, num_samples=2) is not None
    assert len(unit_report(net, x)) == units
    # a float64 network takes float64 inputs
    net64 = make().double()
    assert len(unit_report(net64, x.double())) == units
    with pytest.raises(TypeError, match="Expected x of dtype torch.float64"):
        net64.predict(x, num_samples=2)


def test_static_kl_stays_per_observation():
    """A static layer's unit is nats per observation: the ELBO's statistic is the batch mean of
    the analytic KL over the unit's k latent dims."""
    net = VDN(3, 1, units=(4,), latent_dim=2, trunk="none", scale_mode="unit")
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    _, stats = elbo_stats(net, x, y)
    loc, scale = net.posteriors(x)[SITE]  # (N, H, k)
    kl = torch.distributions.kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1).mean(0)  # (H,)
    assert_close(stats[SITE].kl, kl, rtol=1e-5)
    assert_close(unit_report(net, x).kl.to_numpy(copy=True), kl, rtol=1e-5)

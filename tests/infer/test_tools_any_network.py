"""Every tool on every network: a user's own PyroModule, VDN, Forecaster and RecurrentVDN.

The tools (``unit_report``, ``layer_summary``, ``unit_kl``, ``UnitMonitor``, the five
constraints, checkpoints, ``JitLocalELBO``, the distributed ELBO, ``to_inference_data``) find the
:class:`~vdn_pyro.models.Neurons` layers by walking the module tree. Each test runs them on four
networks and checks that they return the right layers, units and sites, against references
computed another way (the layers' own priors and posterior heads, the eager ELBO, the network
before a checkpoint round trip).
"""

import dataclasses
import types
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as dist_torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import kl_divergence

from tests.common import assert_close
from vdn_pyro import VDN
from vdn_pyro.guides import NeuronGuide
from vdn_pyro.inference import (
    DistributedLocalELBO,
    FreeBits,
    IncompatibleCheckpointError,
    JitLocalELBO,
    KLBand,
    LocalELBO,
    LocBand,
    Persistence,
    ScaleGuard,
    UnitMonitor,
    distributed_fit,
    fit,
    layer_summary,
    load_network,
    save_checkpoint,
    to_inference_data,
    unit_kl,
    unit_report,
)
from vdn_pyro.inference.constraints import layer_stats
from vdn_pyro.inference.distributed import find_free_port
from vdn_pyro.models import Forecaster, Neurons, TemporalNeurons
from vdn_pyro.models.base import NeuronNetwork, posteriors
from vdn_pyro.models.recurrent import RecurrentVDN
from vdn_pyro.primitives import data_plate

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    az = pytest.importorskip("arviz")

B, T, D = 12, 5, 3


class TwoLayerNet(PyroModule):
    """A user's own model: a temporal layer with per-unit AR priors over the T steps of x, and a
    static layer reading the time-average of what it passes on. The observation site is not
    called ``obs``."""

    def __init__(self, d=D, features=8):
        super().__init__()
        self.enc = nn.Linear(d, features)
        self.memory = TemporalNeurons(features, 4, beta=0.5)  # AR(1) prior over time
        self.summary = Neurons(4, 3, beta=0.2)  # standard Normal prior
        self.head = nn.Linear(3, 1)

    def forward(self, x, y=None, num_data=None):
        with data_plate(x.shape[0], num_data):
            h = torch.tanh(self.enc(x))  # (B, T, F)
            m = self.memory(h)  # (..., B, T, 4)
            z = self.summary(m.mean(-2))  # (..., B, 3)
            loc = self.head(z).unsqueeze(-2)  # (..., B, 1, 1)
            obs = None if y is None else y.unsqueeze(-2)  # (B, 1, 1)
            return pyro.sample("target", dist.Normal(loc, 0.5).to_event(1), obs=obs)


@dataclasses.dataclass
class Case:
    """A network, its data and what the tools must find in it.

    :ivar build: ``seed -> network``.
    :ivar x: what the tools take (a tensor, or a tuple of the model's positional arguments).
    :ivar y: the targets fit and the ELBO pass after ``x`` (``None``: they are in ``x``).
    :ivar list sites: the neuron layers' sites, in module-tree order.
    :ivar list units: their widths.
    :ivar list ar_sites: the sites whose prior is an ARPrior.
    """

    build: object
    x: object
    y: object
    sites: list
    units: list
    ar_sites: list

    @property
    def inputs(self):
        """The model's positional arguments without the targets: ``(*x,)``."""
        return self.x if isinstance(self.x, tuple) else (self.x,)

    @property
    def args(self):
        """The model's positional arguments for the ELBO: ``(*x, y)``."""
        return self.inputs if self.y is None else self.inputs + (self.y,)


def _seeded(make):
    def build(seed=0):
        torch.manual_seed(seed)
        return make()

    return build


def _tokens(seed=0, vocab=6):
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(1, vocab, (B, T), generator=gen)  # no padding: one length
    x = torch.cat([torch.zeros(B, 1, dtype=torch.long), body[:, :-1]], 1)  # boundary first
    return x, body


def make_case(name):
    gen = torch.Generator().manual_seed(1)
    if name == "user":
        x, y = torch.randn(B, T, D, generator=gen), torch.randn(B, 1, generator=gen)
        return Case(_seeded(TwoLayerNet), x, y, ["memory.z", "summary.z"], [4, 3], ["memory.z"])
    if name == "vdn":
        x, y = torch.randn(B, T, D, generator=gen), torch.randn(B, T, 1, generator=gen)
        build = _seeded(lambda: VDN(D, 1, units=(5, 3), hidden=(8,), prior="ar", beta=[0.5, 2.0]))
        return Case(build, x, y, ["layers.0.z", "layers.1.z"], [5, 3], ["layers.0.z", "layers.1.z"])
    if name == "forecaster":
        x, y = torch.randn(B, 12, generator=gen), torch.randn(B, 4, generator=gen)
        build = _seeded(lambda: Forecaster(lookback=12, horizon=4, units=6, features=8, train_draws=3))
        return Case(build, x, y, ["layers.0.z"], [6], ["layers.0.z"])
    x, y = _tokens()
    build = _seeded(lambda: RecurrentVDN(6, hidden=8, units=4, embed_dim=4, posterior_token_dim=4))
    return Case(build, (x, y), None, ["rnn.z"], [4], ["rnn.z"])  # RecurrentARPrior is an ARPrior


RECURRENT_PORTED = issubclass(RecurrentVDN, NeuronNetwork)
NETWORKS = [
    "user",
    "vdn",
    "forecaster",
    pytest.param(
        "recurrent",
        marks=pytest.mark.skipif(not RECURRENT_PORTED, reason="RecurrentVDN is not a NeuronNetwork yet"),
    ),
]


@pytest.fixture(params=NETWORKS)
def case(request):
    return make_case(request.param)


def model_and_guide(net):
    return (net.model, net.guide) if isinstance(net, NeuronNetwork) else (net, NeuronGuide(net))


def elbo_stats(net, case, elbo=None, seed=0):
    model, guide = model_and_guide(net)
    pyro.set_rng_seed(seed)
    return (elbo or LocalELBO()).loss_and_stats(model, guide, *case.args)


def layer_of(net, site):
    return next(layer for layer in net.modules() if isinstance(layer, Neurons) and layer.site == site)


# ---------------------------------------------------------------------------- diagnostics
def test_unit_report_has_one_row_per_unit_of_each_layer(case):
    net = case.build()
    report = unit_report(net, case.x, max_points=64)
    expected = [site for site, units in zip(case.sites, case.units) for _ in range(units)]
    assert report.site.tolist() == expected
    assert report.unit.tolist() == [u for units in case.units for u in range(units)]
    assert report.layer.tolist() == [i for i, units in enumerate(case.units) for _ in range(units)]
    for site in case.sites:
        assert_close(report[report.site == site].beta.to_numpy(copy=True), layer_of(net, site).beta)
    assert (report.kl >= -1e-6).all() and report.kl.notna().all() and report.prior_scale.notna().all()
    kls = unit_kl(net, case.x)
    assert list(kls) == case.sites
    for site in case.sites:
        assert_close(report[report.site == site].kl.to_numpy(copy=True), kls[site], rtol=1e-5)
    summary = layer_summary(report)
    assert summary.site.tolist() == case.sites and summary.units.tolist() == case.units


def test_user_model_report_reads_each_layers_own_prior_and_posterior():
    """The KL of each layer against its own prior (AR over time, standard Normal), by hand."""
    case = make_case("user")
    net = case.build()
    report = unit_report(net, case.x)
    posts = posteriors(net, case.x)
    loc, scale = posts["memory.z"]  # (B, 4, 1, T)
    q = dist.Normal(loc, scale).to_event(2)
    kl = kl_divergence(q, net.memory.prior_dist((B,), T)).mean(0) / T  # (4,) nats per step
    assert_close(report[report.site == "memory.z"].kl.to_numpy(copy=True), kl, rtol=1e-5)
    loc, scale = posts["summary.z"]  # (B, 3, 1)
    kl = kl_divergence(
        dist.Normal(loc, scale).to_event(1), dist.Normal(0.0, 1.0).expand(loc.shape).to_event(1)
    )
    assert_close(report[report.site == "summary.z"].kl.to_numpy(copy=True), kl.mean(0), rtol=1e-5)
    # the AR layer's memory is reported, the static layer has none
    memory = report[report.site == "memory.z"]
    assert_close(memory.phi.to_numpy(copy=True), net.memory.prior.phi[:, 0])
    assert report[report.site == "summary.z"].phi.isna().all()


def test_forecaster_report_reads_its_posterior_head():
    """What the CLI's private view gave: the forecaster's own posterior and prior."""
    case = make_case("forecaster")
    net = case.build()
    loc, scale = net.posterior(case.x)  # (B, U, 1)
    prior = net.layers[0].prior_dist((B,), None)
    kl = kl_divergence(dist.Normal(loc, scale).to_event(1), prior).mean(0)  # (U,)
    report = unit_report(net, case.x)
    assert_close(report.kl.to_numpy(copy=True), kl, rtol=1e-5)
    assert_close(report.scale.to_numpy(copy=True), scale.mean((0, 2)), rtol=1e-5)
    # the ArviZ dims the command line writes and plots, as with VDN
    for x, y, time in [(case.x, case.y, []), (case.x.expand(2, B, 12).transpose(0, 1), None, ["time"])]:
        idata = to_inference_data(net, x, y, num_samples=4, seed=0)
        assert idata.posterior["layers.0.z"].dims == ("chain", "draw", "obs", "layers.0.unit", *time)
        pred = idata.posterior_predictive["y"]
        assert pred.dims == ("chain", "draw", "obs", *time, "output") and pred.shape[-1] == 4


@pytest.mark.skipif(not RECURRENT_PORTED, reason="RecurrentVDN is not a NeuronNetwork yet")
def test_recurrent_report_averages_its_steps():
    """A layer called once per step: KL per step against each step's conditional prior, along
    the posterior-mean path, as the network's own scoring computes it."""
    case = make_case("recurrent")
    net = case.build()
    report = unit_report(net, case.x)
    scores = net.score(*case.x, latents="posterior_mean")  # kl: (1, B, T, H)
    assert_close(report.kl.to_numpy(copy=True), scores.kl.mean((0, 1, 2)), atol=1e-6, rtol=1e-5)
    assert_close(report.loc_sq.to_numpy(copy=True), (scores.loc**2).mean((0, 1, 2)), rtol=1e-5)
    assert_close(report.phi.to_numpy(copy=True), net.z.prior.phi.reshape(-1), rtol=1e-6)


def test_unit_monitor_records_every_layer_during_a_fit(case):
    net = case.build()
    monitor = UnitMonitor(case.x, every=2, max_points=32)
    x = case.x if case.y is not None else case.x[0]
    y = case.y if case.y is not None else case.x[1]
    fit(net, x, y, steps=2, batch_size=6, seed=0, callbacks=[monitor], progress=False)
    frame = monitor.frame()
    assert frame.step.unique().tolist() == [0, 2]
    assert len(frame) == 2 * sum(case.units)
    assert sorted(monitor.ema) == sorted(case.sites)  # per layer, also for per-step sites
    assert frame[frame.step == 2].kl_ema.notna().all()


# ---------------------------------------------------------------------------- constraints
def test_klband_binds_the_named_layer_and_steers_only_its_beta(case):
    net = case.build()
    last = case.sites[-1]
    everywhere = KLBand().bind(net)
    assert [layer.site for layer in everywhere.layers] == case.sites
    band = KLBand(1e-7, 2e-7, rate=0.5, sites=[len(case.sites) - 1])  # far below every unit's KL
    band.bind(net)
    assert [layer.site for layer in band.layers] == [last]
    assert band.covers(last) and band.covers(f"{last}.3") and not band.covers(f"{last}x")
    _, stats = elbo_stats(net, case)
    before = {site: layer_of(net, site).beta.clone() for site in case.sites}
    state = types.SimpleNamespace(network=net, stats=stats, step=1)
    band.on_fit_start(state)
    band.on_step_end(state)
    assert list(band.ema) == [last]
    steps = [s.kl for name, s in stats.items() if name == last or name.startswith(last + ".")]
    assert_close(band.ema[last], torch.stack(steps).mean(0))  # a per-step layer: mean over steps
    assert_close(layer_stats(band.layers, stats)[last].kl, torch.stack(steps).mean(0))
    assert bool((layer_of(net, last).beta > before[last]).all())  # above the band: beta rises
    for site in case.sites[:-1]:
        assert torch.equal(layer_of(net, site).beta, before[site])


def test_free_bits_and_loc_band_act_on_the_named_layer_inside_the_loss(case):
    net = case.build()
    last = case.sites[-1]
    plain, stats = elbo_stats(net, case)
    free, _ = elbo_stats(net, case, LocalELBO(hooks=[FreeBits(50.0, sites=last)]))
    # every unit of that layer is lifted to 50 nats
    assert float(free.detach()) > float(plain.detach()) + 1.0
    band = LocBand(100.0, 200.0, weight=1.0, sites=last)
    penalised, _ = elbo_stats(net, case, LocalELBO(hooks=[band]))
    assert float(penalised.detach()) > float(plain.detach())
    if case.sites != ["rnn.z"]:  # a linear loc head: the projection rescales its rows
        head = layer_of(net, last).posterior.loc.weight
        old = head.detach().clone()
        project = LocBand(100.0, 200.0, project=True, sites=last)
        state = types.SimpleNamespace(network=net, stats=stats, step=1)
        project.on_fit_start(state)
        project.on_step_end(state)
        assert not torch.equal(head, old)


def test_scale_guard_and_persistence_act_on_their_layers(case):
    net = case.build()
    state = types.SimpleNamespace(network=net, stats={}, step=0)
    guard = ScaleGuard(0.3, 0.4)
    guard.on_fit_start(state)
    with torch.no_grad():
        for site, (_, scale) in posteriors(net, *case.inputs).items():
            assert float(scale.min()) >= 0.3 - 1e-6 and float(scale.max()) <= 0.4 + 1e-6, site
    if not case.ar_sites:
        with pytest.raises(ValueError, match="ARPrior"):
            Persistence(half_life=(2.0, 3.0)).bind(net)
        return
    persistence = Persistence(half_life=(2.0, 3.0))
    persistence.on_fit_start(state)
    assert [layer.site for layer in persistence.layers] == case.ar_sites
    for site in case.ar_sites:
        half_life = layer_of(net, site).prior.half_life
        assert bool(((half_life >= 2.0 - 1e-4) & (half_life <= 3.0 + 1e-4)).all())


def test_a_module_without_neurons_is_refused():
    for tool in (lambda m: unit_report(m, torch.randn(4, 2)), lambda m: KLBand().bind(m)):
        with pytest.raises(TypeError, match="Neurons"):
            tool(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_reproduces_the_network_exactly(case, tmp_path):
    net = case.build(seed=0)
    with torch.no_grad():
        layer_of(net, case.sites[-1]).beta.mul_(1.5)  # training state lives in the state_dict
    path = save_checkpoint(tmp_path / "last.pt", {"network": net.state_dict()}, network=net)
    fresh = case.build(seed=1)
    loaded = load_network(path, fresh)
    assert loaded is fresh
    rebuilt = [loaded]
    if isinstance(net, NeuronNetwork):
        rebuilt.append(load_network(path))  # from the stored config
        assert type(rebuilt[-1]) is type(net)
    else:
        with pytest.raises(IncompatibleCheckpointError, match="cannot rebuild"):
            load_network(path)
    model, guide = model_and_guide(net)
    pyro.set_rng_seed(3)
    reference = poutine.trace(guide).get_trace(*case.args)
    for other in rebuilt:
        for (name, a), b in zip(net.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), name
        other_model, other_guide = model_and_guide(other)
        pyro.set_rng_seed(3)
        trace = poutine.trace(other_guide).get_trace(*case.args)
        for site in reference.nodes:
            if reference.nodes[site]["type"] == "sample":
                assert torch.equal(trace.nodes[site]["value"], reference.nodes[site]["value"]), site
        a, b = posteriors(net, *case.inputs), posteriors(other, *case.inputs)
        for site in a:
            assert torch.equal(a[site][0], b[site][0]) and torch.equal(a[site][1], b[site][1]), site


# ---------------------------------------------------------------------------- JIT and DDP
def test_jit_loss_and_stats_equal_the_eager_elbo(case):
    net = case.build()
    jit = JitLocalELBO()
    if isinstance(net, RecurrentVDN):  # its forward trims each batch's padding: no fixed graph
        with pytest.raises(ValueError, match="reads the values of its tensor arguments"):
            elbo_stats(net, case, jit)
        return
    for seed in (0, 1):
        eager_loss, eager_stats = elbo_stats(net, case, seed=seed)
        jit_loss, jit_stats = elbo_stats(net, case, jit, seed=seed)
        assert_close(jit_loss.detach(), eager_loss.detach(), atol=1e-5, rtol=1e-6)
        assert list(jit_stats) == list(eager_stats)
        for site, s in eager_stats.items():
            assert_close(jit_stats[site].kl, s.kl, atol=1e-6, rtol=1e-5, msg=site)
    assert jit.num_compilations == 1


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(find_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist_torch.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist_torch.destroy_process_group()


def test_distributed_elbo_and_fit_run_on_any_network(case, one_rank):
    net = case.build()
    twin = case.build()
    twin.load_state_dict(net.state_dict())
    loss, stats = elbo_stats(net, case, DistributedLocalELBO())
    reference, ref_stats = elbo_stats(twin, case)
    assert_close(loss.detach(), reference.detach(), rtol=1e-6)
    assert list(stats) == list(ref_stats)
    loss.backward()
    reference.backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)
    x = case.x if case.y is not None else case.x[0]
    y = case.y if case.y is not None else case.x[1]
    band = KLBand(1e-7, 2e-7)
    result = distributed_fit(net, x, y, steps=2, batch_size=6, seed=0, constraints=[band], progress=False)
    assert result.steps == 2 and sorted(band.ema) == sorted(case.sites)


# ---------------------------------------------------------------------------- ArviZ
def test_inference_data_has_each_layer_and_the_observed_site(case):
    net = case.build()
    idata = to_inference_data(net, case.x, case.y, num_samples=20, chains=2, seed=0)
    post = idata.posterior
    assert sorted(post.data_vars) == sorted(case.sites)
    for site, units in zip(case.sites, case.units):
        unit = site[: -len(".z")] + ".unit"
        assert post[site].dims[:4] == ("chain", "draw", "obs", unit)
        assert post[site].shape[:4] == (2, 20, B, units)
    assert list(idata.posterior_predictive.data_vars) == ["y"]
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    site = case.sites[0]
    summary = az.summary(idata, var_names=[site], coords={"obs": [0]}, kind="stats")
    assert len(summary) == case.units[0] * (post[site].size // (2 * 20 * B * case.units[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pareto k warnings on a tiny data set
        loo = az.loo(idata, pointwise=True)
    assert loo.loo_i.shape == (B,)


def test_inference_data_of_the_user_model_finds_its_observation_site():
    case = make_case("user")
    net = case.build()
    idata = to_inference_data(net, case.x, case.y, num_samples=6, seed=0)
    post = idata.posterior
    assert post["memory.z"].dims == ("chain", "draw", "obs", "memory.unit", "time")
    assert post["summary.z"].dims == ("chain", "draw", "obs", "summary.unit")
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs", "output")
    assert_close(idata.observed_data["y"].values, case.y)
    # the pointwise log-likelihood of the "target" site, from the sampled static latents
    z = torch.as_tensor(post["summary.z"].values[0])  # (6, B, 3)
    loc = net.head(z).unsqueeze(-2)  # (6, B, 1, 1)
    expected = dist.Normal(loc, 0.5).to_event(1).log_prob(case.y.unsqueeze(-2)).squeeze(-1)  # (6, B)
    assert_close(idata.log_likelihood["y"].values[0], expected, atol=1e-5, rtol=1e-5)
    assert set(idata.prior.data_vars) == {"memory.z", "summary.z"}

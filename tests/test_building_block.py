r"""``Neurons`` as a building block of any Pyro model, trained by stock Pyro.

- Under Pyro's default settings, ``SVI`` with ``pyro.optim`` and ``Trace_ELBO``,
  ``TraceMeanField_ELBO`` or ``LocalELBO`` trains every parameter of a user's ``PyroModule`` with
  two ``Neurons`` layers, of ``VDN`` and of ``Forecaster``; under ``module_local_params=True``,
  Pyro's documented path for that mode (``Trace_ELBO()(model, guide)`` and a ``torch.optim``
  optimiser) does.
- ``import vdn_pyro`` changes no global Pyro setting: an unrelated standard script trains to the
  same losses with and without it.
- The stock ``Trace_ELBO`` and ``LocalELBO`` are the same objective, with each unit's beta, by a
  hand computation in float64.
- ``NeuronGuide`` composes with ``AutoGuideList``; site names come from the module tree; the
  deterministic twin has no latent site; bad input is refused with a clear error.
"""

import json
import math
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.nn import PyroModule
from torch import nn
from torch.nn.functional import softplus

from tests.common import ROOT, assert_close
from vdn_pyro import VDN, Forecaster, LocalELBO, NeuronGuide, Neurons, TemporalNeurons
from vdn_pyro.models import ARPrior, NormalPrior, neuron_sites
from vdn_pyro.primitives import data_plate

B, D, T, OUT = 6, 3, 4, 2


def observe(loc, scale, y):
    """The observation site inside the data plate (dim -2): ``loc (..., B, out)`` becomes batch
    ``(..., B, 1)``, event ``(out,)``; ``y (B, out)`` is observed as ``(B, 1, out)``."""
    obs = None if y is None else y.unsqueeze(-2)
    return pyro.sample("obs", dist.Normal(loc.unsqueeze(-2), scale).to_event(1), obs=obs)


class UserNet(PyroModule):
    """A user's model: an encoder, temporal neurons under a learnable AR(1) prior over the time
    axis, static neurons (learnable Normal prior, per-unit beta) on their time average, a head."""

    def __init__(self, deterministic=False):
        super().__init__()
        self.enc = nn.Linear(D, 8)
        self.temporal = TemporalNeurons(8, 5, prior=ARPrior(5, 1), beta=0.5, deterministic=deterministic)
        self.static = Neurons(
            5,
            4,
            prior=NormalPrior(4, learnable=True),
            beta=torch.linspace(0.2, 1.0, 4),
            deterministic=deterministic,
        )
        self.head = nn.Linear(4, OUT)

    def forward(self, x, y=None):
        with data_plate(x.shape[0]):
            z = self.temporal(torch.tanh(self.enc(x)))  # (..., B, T, 5)
            z = self.static(z.mean(-2))  # (..., B, 4)
            return observe(self.head(z), 0.5, y)  # (..., B, 1, OUT)


def user_net():
    net = UserNet()
    return net, net, NeuronGuide(net), (torch.randn(B, T, D), torch.randn(B, OUT))


def vdn_temporal():
    net = VDN(D, OUT, units=(4, 3), hidden=(8,), prior="ar", learn_prior=True)
    return net, net.model, net.guide, (torch.randn(B, T, D), torch.randn(B, T, OUT))


def vdn_static():
    net = VDN(D, OUT, units=(4, 3), hidden=(8,), latent_dim=2, learn_prior=True, scale_mode="input")
    return net, net.model, net.guide, (torch.randn(B, D), torch.randn(B, OUT))


def forecaster(train_draws):
    def build():
        net = Forecaster(lookback=12, horizon=3, units=5, features=8, kernel_size=5, train_draws=train_draws)
        return net, net.model, net.guide, (torch.randn(B, 2, 12), torch.randn(B, 2, 3))

    return build


NETWORKS = {
    "user-model": user_net,
    "vdn-temporal-ar": vdn_temporal,
    "vdn-static-k2": vdn_static,
    "forecaster": forecaster(1),
    "forecaster-draws3": forecaster(3),
}
ELBOS = {"Trace_ELBO": Trace_ELBO, "TraceMeanField_ELBO": TraceMeanField_ELBO, "LocalELBO": LocalELBO}


def latent_sites(trace):
    """Names of the latent sample sites of a trace (plates and observations left out)."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not isinstance(site["fn"], poutine.subsample_messenger._Subsample)
    ]


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unmoved(module, before):
    """Names of the parameters that still equal their snapshot."""
    params = dict(module.named_parameters())
    assert set(params) == set(before)
    return [name for name, p in params.items() if torch.equal(p.detach(), before[name])]


# ---------------------------------------------------------------------------------------------
# Stock Pyro, both parameter modes: every parameter trains
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("elbo", list(ELBOS.values()), ids=list(ELBOS))
@pytest.mark.parametrize("build", list(NETWORKS.values()), ids=list(NETWORKS))
def test_stock_svi_trains_every_parameter(build, elbo):
    assert pyro.settings.get("module_local_params") is False  # Pyro's default
    pyro.clear_param_store()
    net, model, guide, (x, y) = build()
    before = snapshot(net)
    assert len(before) >= 8
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo())
    losses = [svi.step(x, y) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert unmoved(net, before) == []
    # pyro.optim found them through the param store: every parameter of the network is there
    stored = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    assert {id(p) for p in net.parameters()} <= stored


@pytest.mark.parametrize("build", list(NETWORKS.values()), ids=list(NETWORKS))
def test_module_local_params_trains_every_parameter(build):
    previous = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=True)  # before the modules are built, as Pyro asks
    try:
        net, model, guide, (x, y) = build()
        before = snapshot(net)
        elbo = Trace_ELBO()(model, guide)
        optimizer = torch.optim.Adam(elbo.parameters(), lr=0.01)
        assert {id(p) for p in net.parameters()} <= {id(p) for p in elbo.parameters()}
        for _ in range(3):
            optimizer.zero_grad()
            loss = elbo(x, y)
            loss.backward()
            optimizer.step()
        assert math.isfinite(loss.item())
        assert unmoved(net, before) == []
        assert len(pyro.get_param_store()) == 0  # module-local: the global store is not used
    finally:
        pyro.settings.set(module_local_params=previous)


# ---------------------------------------------------------------------------------------------
# import vdn_pyro leaves another program's Pyro alone
# ---------------------------------------------------------------------------------------------

UNRELATED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pyro, torch
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.nn import PyroModule, PyroSample

    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    if sys.argv[1] == "import":
        import vdn_pyro  # noqa: F401


    class Regression(PyroModule):
        def __init__(self):
            super().__init__()
            self.linear = PyroModule[torch.nn.Linear](3, 1)
            self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
            self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([1]).to_event(1))

        def forward(self, x, y=None):
            sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
            mean = self.linear(x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
            return mean


    x = torch.randn(100, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + 0.1 * torch.randn(100)
    model = Regression()
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(60)]
    state = {
        "settings": {k: repr(v) for k, v in pyro.settings.get().items()},
        "validation": pyro.infer.util.is_validation_enabled(),
        "dtype": str(torch.get_default_dtype()),
        "grad": torch.is_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "store": sorted(pyro.get_param_store().keys()),
    }
    print(json.dumps({"losses": losses, "state": state, "imported": "vdn_pyro" in sys.modules}))
    """
)


def run_unrelated_script(*modes):
    """Run the script once per mode, in parallel processes; return their JSON outputs."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UNRELATED_SCRIPT, mode],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in modes
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def test_import_changes_no_global_pyro_setting():
    plain, imported = run_unrelated_script("plain", "import")
    assert not plain["imported"] and imported["imported"]
    assert imported["state"] == plain["state"]
    assert imported["losses"] == plain["losses"]  # identical, step by step
    assert plain["losses"][-1] < plain["losses"][0]  # and the script does train


def test_import_in_process_leaves_settings_as_they_are():
    import vdn_pyro  # noqa: F401  (already imported by the suite; importing again is a no-op)

    assert pyro.settings.get("module_local_params") is False


# ---------------------------------------------------------------------------------------------
# The objective by hand (float64): stock Trace_ELBO == LocalELBO == sum of beta_i KL_i - E log-lik
# ---------------------------------------------------------------------------------------------

SIGMA = 0.7  # the likelihood's scale


class OneLayer(PyroModule):
    """x -> H neurons with a standard Normal prior and per-unit beta -> linear head -> Gaussian."""

    def __init__(self, features, units, out, beta):
        super().__init__()
        self.hidden = Neurons(features, units, beta=beta)
        self.head = nn.Linear(units, out)

    def forward(self, x, y=None):
        with data_plate(x.shape[0]):
            z = self.hidden(x)  # (..., B, H)
            return observe(self.head(z), SIGMA, y)  # (..., B, 1, out)


def hand_setup():
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(7)
    features, units, out, batch = 3, 4, 2, 7
    beta = torch.tensor([2.0, 1.0, 0.5, 0.1])
    net = OneLayer(features, units, out, beta)
    scale = torch.tensor([0.2, 0.5, 0.9, 1.5])  # very different KLs per unit
    with torch.no_grad():
        net.hidden.posterior.raw_scale.copy_(scale.expm1().log()[:, None])  # (H, 1)
    x = torch.randn(batch, features, generator=gen)  # (B, F)
    y = torch.randn(batch, out, generator=gen)  # (B, out)
    post = net.hidden.posterior
    loc = x @ post.loc.weight.T + post.loc.bias  # (B, H), by hand from the parameters
    s = softplus(post.raw_scale[:, 0]).clamp(post.scale_min, post.scale_max)  # (H,)
    return net, x, y, beta, loc.detach(), s.detach()


def hand_kl(loc, s):
    """KL(N(loc, s^2) || N(0, 1)) per observation and unit, (B, H)."""
    return -torch.log(s) + (s**2 + loc**2) / 2 - 0.5


def hand_objective(net, x, y, beta, loc, s):
    """Minus the ELBO in closed form: the expected Gaussian log-likelihood through the linear head
    under q, minus sum_i beta_i KL_i."""
    w, b = net.head.weight.detach(), net.head.bias.detach()  # (out, H), (out,)
    mean = loc @ w.T + b  # (B, out)
    extra_var = (w**2) @ s**2  # (out,): Var of w_o . z under q
    squared = (y - mean) ** 2 + extra_var  # (B, out): E_q (y - w . z - b)^2
    expected_log_lik = (-0.5 * math.log(2 * math.pi * SIGMA**2) - squared / (2 * SIGMA**2)).sum()
    return float(-expected_log_lik + (beta * hand_kl(loc, s)).sum())


def hand_particles(net, y, beta, loc, s, eps, analytic_kl):
    """Per-particle minus-ELBO for draws z = loc + s * eps, ``eps (N, B, H)``: the Trace_ELBO
    particle (``analytic_kl=False``) or the LocalELBO (mean-field) particle."""
    w, b = net.head.weight.detach(), net.head.bias.detach()
    z = loc + s * eps  # (N, B, H)
    log_lik = torch.distributions.Normal(z @ w.T + b, SIGMA).log_prob(y).sum((-1, -2))  # (N,)
    if analytic_kl:
        kl = (beta * hand_kl(loc, s)).sum()
    else:
        log_q = torch.distributions.Normal(loc, s).log_prob(z)  # (N, B, H)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z)  # (N, B, H)
        kl = (beta * (log_q - log_p)).sum((-1, -2))  # (N,)
    return kl - log_lik


def test_one_particle_losses_equal_the_hand_computation():
    """Given the guide's draw z, Trace_ELBO and LocalELBO compute exactly the hand formulas."""
    net, x, y, beta, loc, s = hand_setup()
    guide = NeuronGuide(net)
    pyro.set_rng_seed(11)
    z = guide(x, y)["hidden.z"].squeeze(-1)  # (B, H)
    eps = ((z - loc) / s).unsqueeze(0)  # (1, B, H)
    pyro.set_rng_seed(11)
    trace_loss = Trace_ELBO().differentiable_loss(net, guide, x, y)
    pyro.set_rng_seed(11)
    elbo = LocalELBO()
    local_loss = elbo.differentiable_loss(net, guide, x, y)
    assert trace_loss.dtype == local_loss.dtype == torch.float64
    trace_hand = hand_particles(net, y, beta, loc, s, eps, analytic_kl=False)[0]
    local_hand = hand_particles(net, y, beta, loc, s, eps, analytic_kl=True)[0]
    assert_close(trace_loss.detach(), trace_hand, atol=1e-10, rtol=1e-12)
    assert_close(local_loss.detach(), local_hand, atol=1e-10, rtol=1e-12)
    # LocalELBO's per-unit statistics: the unscaled analytic KL, averaged over the batch
    assert_close(elbo.last_stats["hidden.z"].kl, hand_kl(loc, s).mean(0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("estimator", ["Trace_ELBO", "LocalELBO"])
def test_stock_loss_equals_the_local_elbo_in_expectation(estimator):
    """20000 vectorised particles of each ELBO average to the closed-form objective, within Monte
    Carlo error, and that objective weights each unit's KL by its own beta."""
    net, x, y, beta, loc, s = hand_setup()
    num = 20000
    exact = hand_objective(net, x, y, beta, loc, s)
    analytic = estimator == "LocalELBO"
    # the Monte Carlo error of a mean of `num` particles, from the spread of hand-drawn particles
    eps = torch.randn((num,) + loc.shape, generator=torch.Generator().manual_seed(3))  # (N, B, H)
    particles = hand_particles(net, y, beta, loc, s, eps, analytic)
    tol = 5 * float(particles.std()) / math.sqrt(num)
    assert abs(float(particles.mean()) - exact) < tol  # the hand particles agree with the closed form
    if analytic:
        elbo = LocalELBO(num_particles=num, vectorize_particles=True)
    else:
        elbo = Trace_ELBO(num_particles=num, vectorize_particles=True, max_plate_nesting=2)
    pyro.set_rng_seed(0)
    loss = elbo.differentiable_loss(net, NeuronGuide(net), x, y).item()
    assert abs(loss - exact) < tol, (loss, exact, tol)
    # per-unit beta is honoured: the same objective with beta averaged over units is far away
    uniform = hand_objective(net, x, y, beta.mean().expand_as(beta), loc, s)
    assert abs(uniform - exact) > 20 * tol


# ---------------------------------------------------------------------------------------------
# NeuronGuide composes with Pyro's autoguides
# ---------------------------------------------------------------------------------------------


class WithGlobalScale(UserNet):
    """The user model plus a non-neuron latent: a global observation scale ``w``."""

    def forward(self, x, y=None):
        w = pyro.sample("w", dist.LogNormal(0.0, 1.0))
        with data_plate(x.shape[0]):
            z = self.temporal(torch.tanh(self.enc(x)))  # (..., B, T, 5)
            z = self.static(z.mean(-2))  # (..., B, 4)
            return observe(self.head(z), w, y)  # (B, 1, OUT)


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO], ids=["Trace_ELBO", "TraceMeanField_ELBO"])
def test_neuron_guide_composes_with_auto_guide_list(elbo):
    net = WithGlobalScale()
    x, y = torch.randn(B, T, D), torch.randn(B, OUT)
    guide = AutoGuideList(net)  # parts in the model's site order, as TraceMeanField_ELBO likes
    guide.append(AutoNormal(poutine.block(net, expose=["w"])))
    guide.append(NeuronGuide(poutine.block(net, hide=["w"])))
    guide(x, y)  # AutoNormal creates its parameters on the first call

    latent = ["static.z", "temporal.z", "w"]
    assert sorted(latent_sites(poutine.trace(net).get_trace(x, y))) == latent
    guide_tr = poutine.trace(guide).get_trace(x, y)
    sites = [name for name in latent_sites(guide_tr) if not guide_tr.nodes[name]["infer"].get("is_auxiliary")]
    assert sorted(sites) == latent  # every latent site of the model, each once

    auto_params = dict(guide.named_parameters())
    assert sorted(auto_params) == ["0.locs.w_unconstrained", "0.scales.w_unconstrained"]  # AutoNormal's
    before_net, before_guide = snapshot(net), snapshot(guide)
    svi = SVI(net, guide, pyro.optim.Adam({"lr": 0.01}), elbo())
    for _ in range(3):
        svi.step(x, y)
    assert unmoved(net, before_net) == []
    assert unmoved(guide, before_guide) == []


# ---------------------------------------------------------------------------------------------
# Site names
# ---------------------------------------------------------------------------------------------


class Stack(PyroModule):
    def __init__(self, container, names=(None, None)):
        super().__init__()
        self.layers = container([Neurons(3, 4, name=names[0]), Neurons(4, 2, name=names[1])])

    def forward(self, x, y=None):
        with data_plate(x.shape[0]):
            h = x
            for layer in self.layers:
                h = layer(h)  # (B, H_l)
            return observe(h, 1.0, y)  # (B, 1, 2)


def test_site_names_follow_the_pyro_module_tree():
    net = Stack(PyroModule[nn.ModuleList])
    assert neuron_sites(net) == ["layers.0.z", "layers.1.z"]
    x, y = torch.randn(B, 3), torch.randn(B, 2)
    assert sorted(NeuronGuide(net)(x, y)) == ["layers.0.z", "layers.1.z"]
    tr = poutine.trace(net).get_trace(x, y)
    assert {"layers.0.z", "layers.1.z"} <= set(tr.nodes)


def test_explicit_names_win():
    net = Stack(PyroModule[nn.ModuleList], names=("encoder", "decoder.z"))
    assert neuron_sites(net) == ["encoder", "decoder.z"]
    x, y = torch.randn(B, 3), torch.randn(B, 2)
    assert sorted(NeuronGuide(net)(x, y)) == ["decoder.z", "encoder"]
    # in a plain container too: the names are the user's, so nothing is lost
    assert neuron_sites(Stack(nn.ModuleList, names=("a", "b"))) == ["a", "b"]


def test_plain_module_list_is_refused_with_the_fix():
    net = Stack(nn.ModuleList)
    with pytest.raises(ValueError, match=r"share the site name 'z'.*PyroModule\[nn.ModuleList\].*name="):
        neuron_sites(net)
    x, y = torch.randn(B, 3), torch.randn(B, 2)
    with pytest.raises(ValueError, match=r"PyroModule\[nn.ModuleList\]"):
        NeuronGuide(net)(x, y)


# ---------------------------------------------------------------------------------------------
# Deterministic twin
# ---------------------------------------------------------------------------------------------


def test_deterministic_twin_of_a_user_model():
    net = UserNet(deterministic=True)
    x, y = torch.randn(B, T, D), torch.randn(B, OUT)
    guide = NeuronGuide(net)
    assert guide(x, y) == {}
    assert latent_sites(poutine.trace(guide).get_trace(x, y)) == []
    model_tr = poutine.trace(net).get_trace(x, y)
    assert latent_sites(model_tr) == []
    # the forward pass with z = loc, by hand
    with torch.no_grad():
        h = torch.tanh(x @ net.enc.weight.T + net.enc.bias)  # (B, T, 8)
        post = net.temporal.posterior.loc
        z = (h @ post.weight.T + post.bias).mean(-2)  # (B, 5)
        post = net.static.posterior.loc
        z = z @ post.weight.T + post.bias  # (B, 4)
        loc = z @ net.head.weight.T + net.head.bias  # (B, OUT)
    assert_close(model_tr.nodes["obs"]["fn"].base_dist.loc, loc.unsqueeze(-2), atol=1e-6, rtol=1e-6)
    # no KL: the stock loss is exactly minus the log-likelihood at z = loc
    loss = Trace_ELBO().differentiable_loss(net, guide, x, y)
    assert_close(loss.detach(), -torch.distributions.Normal(loc, 0.5).log_prob(y).sum(), atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(units=0), ValueError, "units >= 1"),
        (dict(units=2.5), TypeError, "units to be an int"),
        (dict(units=True), TypeError, "units to be an int"),
        (dict(in_features="8"), TypeError, "in_features to be an int"),
        (dict(latent_dim=0), ValueError, "latent_dim >= 1"),
        (dict(pooling="max"), ValueError, "pooling in"),
        (dict(prior="laplace"), (TypeError, ValueError), "prior to be None, 'normal', 'ar'"),
        (dict(prior=NormalPrior(3)), ValueError, "prior for 4 units"),
        (dict(beta=-1.0), ValueError, "beta > 0"),
        (dict(beta=torch.ones(3)), ValueError, r"shape \(4,\)"),
        (dict(beta="big"), TypeError, "beta to be a positive number"),
        (dict(name=""), TypeError, "name to be None or a non-empty str"),
    ],
    ids=[
        "units-0",
        "units-float",
        "units-bool",
        "in-features-str",
        "latent-dim",
        "pooling",
        "prior-name",
        "prior-units",
        "beta-negative",
        "beta-shape",
        "beta-str",
        "name-empty",
    ],
)
def test_bad_layer_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        Neurons(**{"in_features": 8, "units": 4, **options})


def test_bad_features_are_refused():
    layer = Neurons(8, 4)
    with pytest.raises(TypeError, match="features h to be a torch.Tensor, but got list"):
        layer([[0.0] * 8])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., B, 8\), but got \(5, 7\)"):
        layer(torch.randn(5, 7))
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(8))
    temporal = TemporalNeurons(8, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., B, T, 8\).*time axis"):
        temporal(torch.randn(5, 8))
    # also as the guide runs it
    with pytest.raises(ValueError, match="in_features=3"):
        NeuronGuide(Stack(PyroModule[nn.ModuleList]))(torch.randn(B, 5), torch.randn(B, 2))


def test_a_copied_network_gets_a_guide_of_its_own():
    import copy
    import pickle

    net = VDN(3, 1, units=(4,))
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    net.guide(x, y)  # builds and caches the original's guide
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone.guide.model is clone and net.guide.model is net
        assert sorted(clone.guide(x, y)) == ["layers.0.z"]

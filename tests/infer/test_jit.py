"""Tests for :class:`vdn_pyro.inference.JitLocalELBO`: one capture, eager-equal losses, beta as input.

The reference for every JIT value is the eager :class:`~vdn_pyro.inference.LocalELBO` run from
the same random state (the JIT graph draws its noise with the same operations, in the same
order); the eager estimator itself is checked against hand-written ELBOs in ``test_elbo.py``.
"""

import copy

import pyro
import pytest
import torch
from pyro.nn import PyroModule

from tests.common import assert_close
from vdn_pyro import VDN, Forecaster, NeuronGuide, RecurrentVDN, TemporalNeurons
from vdn_pyro.inference import JitLocalELBO, KLBand, LocalELBO, fit
from vdn_pyro.inference import elbo as elbo_module
from vdn_pyro.primitives import current_neuron_mode, data_plate, module_params

B, D, OUT, T = 6, 4, 2, 5

CONFIGS = {
    "static-normal": dict(units=(5, 3), prior="normal", beta=[0.5, 2.0]),
    "temporal-ar1": dict(units=(5, 3), prior="ar", ar_order=1, beta=[0.5, 2.0]),
    "temporal-ar2-k2": dict(units=(4,), prior="ar", ar_order=2, latent_dim=2, learn_prior=True),
    "deterministic": dict(units=(5, 3), prior="ar", deterministic=True),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    options = CONFIGS[name]
    net = VDN(D, OUT, hidden=(7,), **options)
    steps = () if name.startswith("static") else (T,)
    x = torch.randn((B,) + steps + (D,))  # (B, [T,] D)
    y = torch.randn((B,) + steps + (OUT,))  # (B, [T,] out)
    return net, x, y


def run(elbo, net, x, y, seed, **kwargs):
    """Loss, stats and gradients of one evaluation from a fixed random state."""
    net.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss, stats = elbo.loss_and_stats(net.model, net.guide, x, y, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach(), stats, grads


def assert_same(jit_out, eager_out):
    (jl, js, jg), (el, es, eg) = jit_out, eager_out
    assert_close(jl, el, atol=1e-6, rtol=1e-6, msg="loss")
    assert list(js) == list(es)
    for site in es:
        for field in ("kl", "loc_sq", "scale"):
            assert_close(getattr(js[site], field), getattr(es[site], field), msg=f"{site}.{field}")
    assert set(jg) == set(eg)
    for name in eg:
        assert_close(jg[name], eg[name], atol=1e-5, rtol=1e-5, msg=f"grad {name}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiles_once_and_equals_eager(name):
    net, x, y = make(name)
    jit, eager = JitLocalELBO(), LocalELBO()
    for seed in range(2):
        assert_same(run(jit, net, x, y, seed, num_data=24), run(eager, net, x, y, seed, num_data=24))
        with torch.no_grad():  # a parameter update between steps, as in training
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
    assert jit.num_compilations == 1
    assert len(jit.compile_seconds) == 1


def test_beta_is_read_each_call_not_frozen():
    net, x, y = make("temporal-ar1")
    jit, eager = JitLocalELBO(), LocalELBO()
    first = run(jit, net, x, y, 0)[0]
    net.layers[0].beta.mul_(3.0)  # in place, as a thermostat does
    assert_same(run(jit, net, x, y, 0), run(eager, net, x, y, 0))
    net.layers[1].beta = torch.full((3,), 0.25)  # a new buffer tensor altogether
    changed = run(jit, net, x, y, 0)
    assert_same(changed, run(eager, net, x, y, 0))
    assert not torch.allclose(first, changed[0])
    assert jit.num_compilations == 1


def test_recompiles_only_when_the_graph_must_change():
    net, x, y = make("temporal-ar1")
    jit = JitLocalELBO(max_graphs=3)
    run(jit, net, x, y, 0, num_data=24)
    run(jit, net, x, y, 1, num_data=24)
    assert jit.num_compilations == 1
    run(jit, net, x[:4], y[:4], 0, num_data=24)  # a new batch shape
    assert jit.num_compilations == 2
    run(jit, net, x, y, 0, num_data=48)  # a new plate scale (a constant of the graph)
    assert jit.num_compilations == 3
    run(jit, net, x, y, 0, num_data=24)  # cached
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="max_graphs=3"):  # grad mode is in the key
        jit.loss_and_stats(net.model, net.guide, x, y, num_data=24)
    assert jit.num_compilations == 4 and len(jit._graphs) == 3
    jit.reset()
    assert jit.num_compilations == 4 and not jit._graphs


def test_trace_estimator_equals_eager():
    net, x, y = make("temporal-ar1")
    jit, eager = JitLocalELBO(estimator="trace"), LocalELBO(estimator="trace")
    assert_same(run(jit, net, x, y, 5), run(eager, net, x, y, 5))


def test_fit_with_jit_equals_eager_fit_and_thermostat():
    net, x, y = make("temporal-ar1")
    x, y = torch.cat([x] * 4), torch.cat([y] * 4)  # N = 24, batches of 8: one shape
    twin = copy.deepcopy(net)
    options = dict(steps=4, batch_size=8, lr=0.02, seed=1, progress=False, log_every=1)
    jit = JitLocalELBO()
    fit(net, x, y, elbo=jit, constraints=[KLBand(0.01, 0.02, rate=0.3)], **options)
    fit(twin, x, y, constraints=[KLBand(0.01, 0.02, rate=0.3)], **options)
    assert jit.num_compilations == 1
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)
    for a, b in zip(net.layers, twin.layers):
        assert_close(a.beta, b.beta, msg="beta")
    assert not torch.allclose(net.layers[0].beta, torch.tensor(0.5))  # the thermostat moved it


def test_needs_module_methods():
    net, x, y = make("temporal-ar1")
    with pytest.raises(TypeError, match="methods of one torch.nn.Module"):
        JitLocalELBO().loss_and_stats(lambda *a, **k: net.model(*a, **k), net.guide, x, y)
    # naming the module explicitly works for any callables
    jit = JitLocalELBO(module=net)
    loss, _ = jit.loss_and_stats(lambda *a, **k: net.model(*a, **k), lambda *a, **k: net.guide(*a, **k), x, y)
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="inside a container"):
        JitLocalELBO().loss_and_stats(net.model, net.guide, [x], y)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        JitLocalELBO(module="net")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_eager():
    net, x, y = make("temporal-ar1")
    net, x, y = net.cuda(), x.cuda(), y.cuda()
    jit, eager = JitLocalELBO(), LocalELBO()
    for seed in range(2):
        assert_same(run(jit, net, x, y, seed, num_data=24), run(eager, net, x, y, seed, num_data=24))
    assert jit.num_compilations == 1


# ---------------------------------------------------------------------------------------------
# One pass for model and guide (what LocalELBO evaluates, and JitLocalELBO captures, for a
# NeuronGuide of the model), and the priors it reuses.
# ---------------------------------------------------------------------------------------------


class UserNet(PyroModule):
    """A user's model: two temporal layers, optionally reading the neuron mode itself."""

    def __init__(self, read_mode=False):
        super().__init__()
        self.first = TemporalNeurons(D, 5, beta=0.5)
        self.second = TemporalNeurons(5, 3, prior="normal")
        self.head = torch.nn.Linear(3, OUT)
        self.read_mode = read_mode

    def forward(self, x, y=None, num_data=None):
        if self.read_mode:
            current_neuron_mode()  # branching on it makes a single pass unsound
        with data_plate(x.shape[0], num_data):
            z = self.second(self.first(x))  # (B, T, 3)
            loc = self.head(z).unsqueeze(-3)  # (B, 1, T, out)
            obs = None if y is None else y.unsqueeze(-3)
            return pyro.sample("obs", pyro.distributions.Normal(loc, 1.0).to_event(2), obs=obs)


def one_pass_cases():
    torch.manual_seed(0)
    x, y = torch.randn(B, T, D), torch.randn(B, T, OUT)
    forecaster = Forecaster(lookback=12, horizon=3, units=4, features=5, train_draws=3, prior="ar")
    return {
        "vdn-ar1": (make("temporal-ar1")[0], (x, y), {"num_data": 24}),
        "vdn-static-normal": (make("static-normal")[0], (x[:, 0], y[:, 0]), {}),
        "vdn-ar2-learned": (make("temporal-ar2-k2")[0], (x, y), {}),
        "twin": (make("deterministic")[0], (x, y), {}),
        "forecaster-draws": (forecaster, (torch.randn(B, 2, 12), torch.randn(B, 2, 3)), {"num_data": 30}),
        "user": (UserNet(), (x, y), {"num_data": 24}),
    }


def evaluate(net, guide, args, kwargs, seed, single_pass):
    """Loss, gradients and statistics of one LocalELBO evaluation, in one or two passes."""
    guide.__dict__[elbo_module._VERDICT] = single_pass
    net.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    with module_params():
        loss, stats = LocalELBO().loss_and_stats(net, guide, *args, **kwargs)
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    return loss.detach(), grads, stats


@pytest.mark.parametrize(
    "name", ["vdn-ar1", "vdn-static-normal", "vdn-ar2-learned", "twin", "forecaster-draws", "user"]
)
def test_one_pass_equals_two_passes(name):
    net, args, kwargs = one_pass_cases()[name]
    guide = NeuronGuide(net)
    # the first evaluation runs model and guide separately and finds a single pass sound
    with module_params():
        LocalELBO().loss_and_stats(net, guide, *args, **kwargs)
    assert guide.__dict__[elbo_module._VERDICT] is True
    one, two = evaluate(net, guide, args, kwargs, 3, True), evaluate(net, guide, args, kwargs, 3, False)
    assert torch.equal(one[0], two[0])  # the same draws, the same arithmetic
    for a, b in zip(one[1], two[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert list(one[2]) == list(two[2])
    for site in one[2]:
        for field in ("kl", "loc_sq", "scale"):
            assert torch.equal(getattr(one[2][site], field), getattr(two[2][site], field))


def test_models_that_read_the_mode_keep_two_passes():
    net, args, kwargs = one_pass_cases()["user"]
    reader = UserNet(read_mode=True)
    reader.load_state_dict(net.state_dict())
    guide = NeuronGuide(reader)
    with module_params():
        LocalELBO().loss_and_stats(reader, guide, *args, **kwargs)
    assert guide.__dict__[elbo_module._VERDICT] is False
    # a model found sound that reads the mode later is caught in the single pass, which is
    # dropped for two passes (and not tried again)
    guide = NeuronGuide(reader)
    reader.read_mode = False
    with module_params():
        LocalELBO().loss_and_stats(reader, guide, *args, **kwargs)
    assert guide.__dict__[elbo_module._VERDICT] is True
    reader.read_mode = True
    with module_params():
        loss = LocalELBO().loss_and_stats(reader, guide, *args, **kwargs)[0]
    assert guide.__dict__[elbo_module._VERDICT] is False
    assert torch.isfinite(loss)
    # RecurrentVDN branches on the mode (its guide stops at the latents): never one pass
    rnn = RecurrentVDN(6, hidden=8, units=4, embed_dim=4, posterior_token_dim=4)
    tokens = torch.tensor([[0, 1, 2, 3], [0, 3, 1, -1]])
    targets = torch.tensor([[1, 2, 3, 0], [3, 1, 0, -1]])
    with module_params():
        LocalELBO().loss_and_stats(rnn.model, rnn.guide, tokens, targets)
    assert rnn.guide.__dict__[elbo_module._VERDICT] is False


def test_jit_records_the_fused_kl_as_one_node():
    net, x, y = make("temporal-ar1")
    jit = JitLocalELBO()
    jit.loss_and_stats(net.model, net.guide, x, y)
    graph = next(iter(jit._graphs.values())).graph
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count("vdn_pyro.ar1_kl_mean_terms.default") == 2  # one per layer


def test_fixed_priors_are_reused_until_their_buffers_change():
    net, x, y = make("temporal-ar1")
    prior = net.layers[0].prior
    first = prior((B,), T)
    assert prior((B,), T) is first  # built once while nothing changed
    assert prior((B + 1,), T) is not first
    prior.set_phi(torch.full((5,), 0.8))  # in place: the version counter moves
    rebuilt = prior((B,), T)
    assert rebuilt is not first
    assert_close(rebuilt.base_dist.coeffs[..., 0], torch.full((B, 5, 1), 0.8))
    learned = make("temporal-ar2-k2")[0].layers[0].prior
    assert learned((B,), T) is not learned((B,), T)  # a prior being trained is never reused


def test_jit_reads_prior_buffers_each_call():
    net, x, y = make("temporal-ar1")
    jit, eager = JitLocalELBO(), LocalELBO()
    run(jit, net, x, y, 0)
    net.layers[0].prior.set_phi(torch.full((5,), -0.6))  # after the capture
    assert_same(run(jit, net, x, y, 1), run(eager, net, x, y, 1))
    assert jit.num_compilations == 1

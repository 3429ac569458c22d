"""Tests for :class:`vdn_pyro.inference.JitLocalELBO`: one capture, eager-equal losses, beta as input.

The reference for every JIT value is the eager :class:`~vdn_pyro.inference.LocalELBO` run from
the same random state (the JIT graph draws its noise with the same operations, in the same
order); the eager estimator itself is checked against hand-written ELBOs in ``test_elbo.py``.
"""

import copy

import pyro
import pytest
import torch

from tests.common import assert_close
from vdn_pyro import VDN
from vdn_pyro.inference import JitLocalELBO, KLBand, LocalELBO, fit

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

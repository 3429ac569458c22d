"""Tests for data-parallel training (:mod:`vdn_pyro.inference.distributed`).

The main check launches 2 processes on loopback (Gloo) and compares them with one process that
trains on the same global batches. To make that comparison exact, the network's guide passes on
each unit's posterior mean instead of a sample (the KL stays analytic): with sampling, P shards
cannot draw the same noise as one process does, though the gradient is the same in expectation.
A second run with sampling checks that the ranks stay identical (parameters and betas) and draw
different noise.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

from tests.common import assert_close
from vdn_pyro import VDN
from vdn_pyro.inference import (
    DistributedLocalELBO,
    JitLocalELBO,
    KLBand,
    LocalELBO,
    distributed_fit,
    fit,
    launch,
)
from vdn_pyro.inference.distributed import find_free_port, init_distributed, shard
from vdn_pyro.primitives import NEURONS_INFER_KEY

N, D, OUT, T = 24, 4, 2, 3
STEPS, GLOBAL_BATCH = 5, 8


class _MeanPath(Messenger):
    """Replace every neuron site's draw by its posterior mean."""

    def _pyro_sample(self, msg):
        if msg["infer"].get(NEURONS_INFER_KEY):
            msg["value"] = msg["fn"].mean


class MeanPathVDN(VDN):
    """A VDN whose guide passes on posterior means (deterministic given the parameters)."""

    def guide(self, x, y=None, *, num_data=None):
        with _MeanPath():
            return super().guide(x, y, num_data=num_data)


def _thermostat():
    # initial unit KLs are 0.88 to 1.06 nats per sequence of T steps, 0.29 to 0.35 per step (the
    # band's unit): every unit sits above the band, by its own distance
    return KLBand(0.1 / T, 0.5 / T, rate=0.2, ema=0.5)


def _fit_options(**extra):
    return dict(steps=STEPS, batch_size=GLOBAL_BATCH, lr=0.03, seed=7, progress=False, log_every=1, **extra)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, D, generator=gen), torch.randn(N, T, OUT, generator=gen)


def _state(net):
    params = torch.cat([p.detach().flatten() for p in net.parameters()])
    betas = torch.cat([layer.beta.flatten() for layer in net.layers])
    return params, betas


class _SharedState:
    """At the end of a fit, inside its random state (the shared one that rank 0 checkpoints; fit
    restores the caller's own state on return), draws once from the rank's own noise stream and
    records the shared state after that draw."""

    def on_fit_end(self, state):
        own = state.elbo._forward_own_stream(
            lambda: torch.randn(4), dist.get_rank(), (), {}, torch.device("cpu")
        )
        self.noise, self.rng = own, torch.get_rng_state()


def _worker(exact_net, noisy_net, x, y, checkpoint_dir):
    """Runs in every rank; rank 0's return value comes back to the test."""
    world = dist.get_world_size()
    report = {}
    # 1. the exact comparison, with a thermostat and rank-0 checkpoints
    result = distributed_fit(
        exact_net, x, y, constraints=[_thermostat()], **_fit_options(checkpoint_dir=checkpoint_dir)
    )
    report["exact"] = (_state(exact_net), result.checkpoint_path, [h["loss"] for h in result.history])
    # 2. one step on a global batch that does not split evenly (7 rows over 2 ranks)
    elbo = DistributedLocalELBO()
    exact_net.zero_grad(set_to_none=True)
    loss, stats = elbo.loss_and_stats(exact_net.model, exact_net.guide, x[:7], y[:7], num_data=N)
    loss.backward()
    report["uneven"] = (
        float(loss.detach()),
        {n: p.grad.clone() for n, p in exact_net.named_parameters()},
        {k: s.kl for k, s in stats.items()},
    )
    # 3. sampling: ranks stay identical, noise differs between them, shared RNG stays in sync
    probe = _SharedState()
    distributed_fit(noisy_net, x, y, constraints=[_thermostat()], callbacks=[probe], **_fit_options())
    report["noisy"] = (_state(noisy_net), probe.noise, probe.rng)
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    return gathered


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    torch.manual_seed(0)
    exact = MeanPathVDN(D, OUT, units=(5, 3), hidden=(6,), prior="ar", beta=0.5)
    torch.manual_seed(1)
    noisy = VDN(D, OUT, units=(5, 3), hidden=(6,), prior="ar", beta=0.5)
    x, y = _data()
    checkpoint_dir = tmp_path_factory.mktemp("ddp_checkpoints")
    reports = launch(_worker, 2, copy.deepcopy(exact), copy.deepcopy(noisy), x, y, str(checkpoint_dir))
    return exact, noisy, x, y, checkpoint_dir, reports


def test_two_ranks_match_one_process_on_the_global_batch(two_ranks):
    exact, _, x, y, _, reports = two_ranks
    single = copy.deepcopy(exact)
    result = fit(single, x, y, constraints=[_thermostat()], **_fit_options())
    params, betas = _state(single)
    for rank, report in enumerate(reports):
        (rank_params, rank_betas), _, losses = report["exact"]
        assert_close(rank_params, params, atol=1e-5, rtol=0, msg=f"rank {rank} parameters")
        assert_close(rank_betas, betas, atol=1e-6, rtol=1e-5, msg=f"rank {rank} betas")
        assert_close(torch.tensor(losses), torch.tensor([h["loss"] for h in result.history]), rtol=1e-5)
    # the thermostat really moved the betas, unit by unit
    assert (betas - 0.5).abs().max() > 1e-2 and betas.unique().numel() > 2
    assert torch.equal(reports[0]["exact"][0][1], reports[1]["exact"][0][1])


def test_uneven_global_batch_gives_the_single_process_gradient(two_ranks):
    exact, _, x, y, _, reports = two_ranks
    # the network after the run: rank 0's final parameters
    net = copy.deepcopy(exact)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(reports[0]["exact"][0][0], net.parameters())
        for layer, beta in zip(net.layers, reports[0]["exact"][0][1].split([5, 3])):
            layer.beta.copy_(beta)
    loss, stats = LocalELBO().loss_and_stats(net.model, net.guide, x[:7], y[:7], num_data=N)
    loss.backward()
    for rank, report in enumerate(reports):
        rank_loss, grads, kls = report["uneven"]
        assert_close(rank_loss, loss.item(), rtol=1e-5, msg=f"rank {rank} loss")
        for name, p in net.named_parameters():
            assert_close(grads[name], p.grad, atol=1e-4, rtol=1e-4, msg=f"rank {rank} grad {name}")
        for site, s in stats.items():
            assert_close(kls[site], s.kl, atol=1e-6, rtol=1e-5, msg=f"rank {rank} {site} kl")


def test_sampling_ranks_stay_identical_and_draw_their_own_noise(two_ranks):
    *_, reports = two_ranks
    (p0, b0), noise0, rng0 = reports[0]["noisy"]
    (p1, b1), noise1, rng1 = reports[1]["noisy"]
    assert torch.equal(p0, p1) and torch.equal(b0, b1)
    assert not torch.allclose(b0, torch.tensor(0.5))
    assert not torch.allclose(noise0, noise1)  # independent noise per rank
    assert torch.equal(rng0, rng1)  # the shared state (checkpointed by rank 0) is the same


def test_checkpoints_come_from_rank_zero_only(two_ranks):
    *_, checkpoint_dir, reports = two_ranks
    path0, path1 = reports[0]["exact"][1], reports[1]["exact"][1]
    assert path0 is not None and os.path.exists(path0)
    assert os.path.dirname(path0) == str(checkpoint_dir)
    assert path1 is None
    assert sorted(os.listdir(checkpoint_dir)) == [os.path.basename(path0)]


def test_shard_is_a_partition():
    rows = torch.arange(11)
    parts = [shard(rows, r, 3) for r in range(3)]
    assert [p.numel() for p in parts] == [4, 4, 3]
    assert torch.equal(torch.sort(torch.cat(parts)).values, rows)


def test_needs_a_process_group():
    net = VDN(D, OUT, units=(3,))
    x, y = _data()
    with pytest.raises(RuntimeError, match="initialised process group"):
        DistributedLocalELBO().loss_and_stats(net.model, net.guide, x[:, 0], y[:, 0])
    with pytest.raises(TypeError, match="DistributedLocalELBO"):
        DistributedLocalELBO(DistributedLocalELBO())


def test_init_explains_a_missing_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()
    with pytest.raises(ValueError, match="backend"):
        init_distributed(backend="mpi")
    with pytest.raises(ValueError, match="nproc"):
        launch(print, 0)


def test_one_rank_equals_local_elbo(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(find_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = VDN(D, OUT, units=(4,), hidden=(6,), prior="ar")
        twin = copy.deepcopy(net)
        x, y = _data()
        elbo = DistributedLocalELBO()
        with pytest.raises(TypeError, match="methods of one torch.nn.Module"):
            elbo.loss_and_stats(lambda *a: None, net.guide, x, y)
        torch.manual_seed(3)
        loss, stats = elbo.loss_and_stats(net.model, net.guide, x, y, num_data=4 * N)
        loss.backward()
        torch.manual_seed(3)
        ref, ref_stats = LocalELBO().loss_and_stats(twin.model, twin.guide, x, y, num_data=4 * N)
        ref.backward()
        assert_close(loss.detach(), ref.detach(), rtol=1e-6)
        assert_close(stats["layers.0.z"].kl, ref_stats["layers.0.z"].kl)
        for p, q in zip(net.parameters(), twin.parameters()):
            assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
        # the JIT estimator runs under DDP too: same loss, gradients reach the parameters
        net.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        jit_elbo = DistributedLocalELBO(JitLocalELBO())
        jit_loss, _ = jit_elbo.loss_and_stats(net.model, net.guide, x, y, num_data=4 * N)
        jit_loss.backward()
        assert_close(jit_loss.detach(), ref.detach(), rtol=1e-6)
        for p, q in zip(net.parameters(), twin.parameters()):
            assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
def test_two_cuda_ranks_with_nccl():
    torch.manual_seed(0)
    net = MeanPathVDN(D, OUT, units=(5, 3), hidden=(6,), prior="ar")
    x, y = _data()
    state = launch(_fit_state_worker, 2, copy.deepcopy(net), x, y, backend="nccl")
    single = copy.deepcopy(net).cuda()
    fit(single, x, y, device="cuda", **_fit_options())
    assert_close(state[0].cpu(), _state(single)[0].cpu(), atol=1e-5, rtol=0)


def _fit_state_worker(net, x, y):
    distributed_fit(net, x, y, **_fit_options())
    return _state(net)


def _resume_worker(net, x, y, straight_dir, split_dir):
    options = dict(_fit_options(), steps=6)
    straight = copy.deepcopy(net)
    distributed_fit(straight, x, y, constraints=[_thermostat()], checkpoint_dir=straight_dir, **options)
    first = copy.deepcopy(net)
    half = dict(options, steps=3)
    distributed_fit(first, x, y, constraints=[_thermostat()], checkpoint_dir=split_dir, **half)
    resumed = copy.deepcopy(net)
    result = distributed_fit(
        resumed, x, y, constraints=[_thermostat()], checkpoint_dir=split_dir, resume=True, **options
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (_state(straight), _state(resumed), result.resumed_from))
    return gathered


@pytest.mark.slow
def test_every_rank_resumes_from_rank_zero_checkpoint(tmp_path):
    torch.manual_seed(1)
    net = VDN(D, OUT, units=(5, 3), hidden=(6,), prior="ar", beta=0.5)  # sampling: the RNG matters
    x, y = _data()
    reports = launch(_resume_worker, 2, net, x, y, str(tmp_path / "straight"), str(tmp_path / "split"))
    for rank, ((p_straight, b_straight), (p_resumed, b_resumed), resumed_from) in enumerate(reports):
        assert resumed_from == 3, rank
        assert torch.equal(p_straight, p_resumed), f"rank {rank}: the resumed run is not the original"
        assert torch.equal(b_straight, b_resumed)

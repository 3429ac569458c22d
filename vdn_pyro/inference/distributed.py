r"""Data-parallel training on :mod:`torch.distributed`: one process per device, one global batch.

Each of the P processes (ranks) holds the whole network and the whole data set. Every step,
:func:`~vdn_pyro.inference.fit` draws the same global minibatch of B indices on every rank (the
same seed gives the same permutation); :class:`DistributedLocalELBO` keeps rank r's share,
rows ``r, r + P, r + 2P, ...`` of it (what :class:`torch.utils.data.DistributedSampler` gives a
rank from a shared permutation), and evaluates the ELBO on those rows inside
:class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients over the ranks
during ``backward``.

**Scaling.** One process on the global batch minimises
:math:`\frac{N}{B}\sum_{n \in \text{batch}} \ell_n` (the plate's subsample scale). Rank r computes
its share with the plate scale :math:`N / B_r` and multiplies the loss by
:math:`f_r = P B_r / B`, so that the average of the P gradients, which is what DDP applies, is
exactly the gradient of the global-batch loss (also when B is not a multiple of P). The loss
value returned is the global one; its gradient is the rank's own.

**Statistics.** The per-unit KL, ``loc_sq`` and ``scale`` of every rank are all-reduced (weighted
by the rows each rank holds) in one collective per step, so every rank sees the statistics of
the global batch and a beta thermostat (e.g. :class:`~vdn_pyro.inference.KLBand`) moves each
rank's ``beta`` identically. No buffer broadcast is needed, or done.

**Noise.** Each rank draws its reparametrisation noise from its own stream, derived from the
shared random state and the rank, so the shards are independent and a run is reproducible and
resumable from rank 0's checkpoint.

**Launching.** With ``torchrun`` (one script, one process per rank)::

    # train.py
    from vdn_pyro import VDN
    from vdn_pyro.inference import distributed_fit
    net = VDN(64, 1, units=(128, 128), prior="ar")
    result = distributed_fit(net, x, y, steps=1000, batch_size=256, seed=0, checkpoint_dir="ckpt")

    torchrun --standalone --nproc_per_node=4 train.py          # 4 processes on this machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 train.py   # 2 machines

or from Python (and a ``vdn fit --nproc N`` command line) with :func:`launch`::

    result = launch(distributed_fit, 4, net, x, y, steps=1000, batch_size=256, seed=0)

Gloo is used on CPU and NCCL on CUDA (one device per rank, ``cuda:LOCAL_RANK``). Only rank 0
writes checkpoints, logs and the progress bar.
"""

import dataclasses
import datetime
import inspect
import io
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vdn_pyro.guides.builder import NeuronGuide
from vdn_pyro.inference.checkpoint import LAST_CHECKPOINT
from vdn_pyro.inference.elbo import LocalELBO, UnitStats
from vdn_pyro.inference.fit import fit
from vdn_pyro.models.neurons import find_neurons

__all__ = [
    "DistributedContext",
    "DistributedLocalELBO",
    "ELBOModule",
    "distributed_fit",
    "find_free_port",
    "init_distributed",
    "launch",
    "shard",
]

#: fit() options that only rank 0 acts on (the other ranks get ``None``/``False``)
RANK_ZERO_OPTIONS = ("checkpoint_dir", "log_dir", "progress")


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the process group.

    :ivar int rank: global rank in ``[0, world_size)``.
    :ivar int world_size: number of processes P.
    :ivar int local_rank: rank on this machine (selects the CUDA device).
    :ivar torch.device device: this rank's device.
    :ivar str backend: ``"gloo"`` or ``"nccl"``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self):
        """Whether this is rank 0, the one that writes files."""
        return self.rank == 0


def _env_int(name, default=None):
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(
                f"Expected the environment variable {name} of a distributed launch. Start the "
                "script with torchrun (torchrun --nproc_per_node=N script.py) or call it through "
                "vdn_pyro.inference.launch(fn, N, ...)."
            )
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"Expected {name} to be an integer, but got {value!r}.") from e


def init_distributed(backend=None, device=None, timeout_s=600):
    """Join (or describe) the default process group.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as set by
    ``torchrun`` or :func:`launch`. If the group is already initialised, only describes it.

    :param str backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when the device is CUDA, else
        Gloo).
    :param device: this rank's device (default: ``cuda:LOCAL_RANK`` when CUDA is available and
        the backend is not Gloo, else CPU).
    :param float timeout_s: collective timeout in seconds.
    :returns: a :class:`DistributedContext`.
    """
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"Expected backend 'gloo', 'nccl' or None, but got {backend!r}.")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        backend = dist.get_backend()
    else:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK", rank)
    if device is None:
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"Asked for device {device}, but CUDA is not available here.")
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("The NCCL backend needs CUDA devices; use backend='gloo' on CPU.")
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistributedContext(rank, world, local_rank, device, backend)


def shard(tensor, rank, world_size):
    """Rank ``rank``'s share of a batch: rows ``rank, rank + P, ...`` (``(B, ...) -> (B_r, ...)``,
    with :math:`B_r = \\lceil (B - r) / P \\rceil`)."""
    return tensor[rank::world_size]


def _network_of(model, guide):
    """The module DDP wraps: the model itself (a :class:`torch.nn.Module`, e.g. ``net.model``)
    or the module whose method it is; the guide must run on it (its
    :class:`~vdn_pyro.guides.NeuronGuide`, a method of it, or a guide module)."""
    network = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    guide_owner = guide if isinstance(guide, nn.Module) else getattr(guide, "__self__", None)
    if not isinstance(network, nn.Module) or guide_owner is None:
        raise TypeError(
            "DistributedLocalELBO wraps the network in DistributedDataParallel, so it expects the "
            "model to be a torch.nn.Module (a PyroModule with Neurons layers, e.g. net.model) and "
            "the guide a module or method that runs on it (net.guide), or both to be methods of "
            f"one torch.nn.Module, but got {getattr(model, '__qualname__', type(model).__name__)} "
            f"and {getattr(guide, '__qualname__', type(guide).__name__)}."
        )
    return network


class ELBOModule(nn.Module):
    """The ELBO of a network as a :class:`torch.nn.Module`, so that
    :class:`~torch.nn.parallel.DistributedDataParallel` can wrap it: its parameters are the
    network's (and those of a guide module with parameters of its own), and
    ``forward(*args, **kwargs)`` returns ``elbo.loss_and_stats(model, guide, *args, **kwargs)``,
    i.e. ``(loss, {site: UnitStats})``.

    :param network: any module that contains :class:`~vdn_pyro.models.Neurons` layers.
    :param elbo: a :class:`~vdn_pyro.inference.LocalELBO` (or its JIT version).
    :param model: the model (default ``network.model`` if it has one, else the network).
    :param guide: the guide (default ``network.guide`` if it has one, else a
        :class:`~vdn_pyro.guides.NeuronGuide` of the network).
    """

    def __init__(self, network, elbo=None, *, model=None, guide=None):
        super().__init__()
        self.network = network
        self.elbo = elbo if elbo is not None else LocalELBO()
        if model is None:
            model = getattr(network, "model", network)
        if guide is None:
            guide = getattr(network, "guide", None)
            guide = NeuronGuide(network) if guide is None else guide
        # held outside the module tree (the model is the network); a guide module with
        # parameters of its own is registered, so that DDP averages its gradients too
        self.__dict__["_calls"] = (model, guide)
        if isinstance(guide, nn.Module) and guide is not network and any(True for _ in guide.parameters()):
            self.guide_module = guide

    def forward(self, *args, **kwargs):
        model, guide = self._calls
        return self.elbo.loss_and_stats(model, guide, *args, **kwargs)


class DistributedLocalELBO:
    r"""A data-parallel :class:`~vdn_pyro.inference.LocalELBO` for use with
    :func:`~vdn_pyro.inference.fit` in every rank of a process group (see the module notes).

    ``loss_and_stats(model, guide, *args, num_data=N)`` takes the **global** minibatch (the same on
    every rank): tensors in ``args`` with the batch first, and an optional ``num_data`` keyword,
    the model's convention for the subsample scale N/B. It evaluates the rank's rows under
    :class:`~torch.nn.parallel.DistributedDataParallel` (built on the first call, which
    broadcasts rank 0's parameters and buffers), and returns the global loss value and the
    all-reduced statistics. Without ``num_data`` the loss is the global batch's sum, as in one
    process.

    Hook penalties (``LocBand`` and the like) are evaluated on each rank's own statistics; their
    gradients are averaged like the rest.

    :param elbo: the per-rank estimator (default :class:`~vdn_pyro.inference.LocalELBO`; a
        :class:`~vdn_pyro.inference.JitLocalELBO` works too).
    :param process_group: the group to run in (default: the default group).
    :param bool find_unused_parameters: as in DDP; needed when some parameters get no gradient
        (the deterministic twin's posterior scales).
    :param bool decorrelate_noise: give each rank its own noise stream (on by default).
    :param ddp_options: further keyword arguments for DDP.
    """

    def __init__(
        self,
        elbo=None,
        *,
        process_group=None,
        find_unused_parameters=False,
        decorrelate_noise=True,
        **ddp_options,
    ):
        if isinstance(elbo, DistributedLocalELBO):
            raise TypeError("Expected a per-rank LocalELBO to wrap, but got a DistributedLocalELBO.")
        self.elbo = elbo if elbo is not None else LocalELBO()
        self.process_group = process_group
        self.find_unused_parameters = find_unused_parameters
        self.decorrelate_noise = decorrelate_noise
        self.ddp_options = ddp_options
        self.last_stats = {}
        self._ddp, self._network = None, None

    @property
    def hooks(self):
        """The wrapped estimator's hooks (``fit`` adds its constraints here)."""
        return self.elbo.hooks

    @hooks.setter
    def hooks(self, value):
        self.elbo.hooks = value

    @property
    def ddp(self):
        """The :class:`~torch.nn.parallel.DistributedDataParallel` module (after the first call)."""
        return self._ddp

    def _wrap(self, network, model, guide, device):
        if self._network is network and self._ddp.module._calls == (model, guide):
            return self._ddp
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # buffers (beta) are synced once at construction; afterwards the all-reduced statistics
        # keep them identical, so no per-step broadcast (the flag was renamed in torch 2.13)
        accepted = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
        options = {no_sync: False, "find_unused_parameters": self.find_unused_parameters}
        options.update(self.ddp_options)
        self._ddp = DistributedDataParallel(
            ELBOModule(network, self.elbo, model=model, guide=guide),
            device_ids=device_ids,
            process_group=self.process_group,
            **options,
        )
        self._network = network
        return self._ddp

    def loss_and_stats(self, model, guide, *args, **kwargs):
        """Loss (value: the global batch's; gradient: this rank's share, scaled for DDP's average)
        and the global batch's per-unit statistics, ``site -> UnitStats`` of ``(H,)`` tensors.

        :param model: ``network.model``: the network DDP wraps (any module that contains
            :class:`~vdn_pyro.models.Neurons` layers), or a method of it.
        :param guide: ``network.guide`` (a :class:`~vdn_pyro.guides.NeuronGuide` of it, a method
            of it, or a guide module).
        :param args: the global minibatch, tensors ``(B, ...)`` (non-tensors pass through).
        :param kwargs: passed through (``num_data``: the full data-set size N).
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "DistributedLocalELBO needs an initialised process group; call "
                "init_distributed() first (or use distributed_fit / launch)."
            )
        network = _network_of(model, guide)
        group = self.process_group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        batched = [a for a in args if torch.is_tensor(a) and a.dim() > 0]
        if not batched:
            raise ValueError("Expected at least one batched tensor argument (B, ...) to shard.")
        batch = batched[0].shape[0]
        if any(a.shape[0] != batch for a in batched):
            raise ValueError(
                "Expected every tensor argument to have the same batch size, but got "
                f"{[tuple(a.shape) for a in batched]}."
            )
        local = -(-(batch - rank) // world) if batch > rank else 0  # rows this rank holds
        # a rank without rows still runs the step (DDP needs every rank) on one row, weighted 0
        rows = slice(rank, None, world) if local else slice(0, 1)
        local_args = tuple(a[rows] if torch.is_tensor(a) and a.dim() > 0 else a for a in args)
        if local:
            # plate scale N / B_r here; one process would use N / B, and DDP averages over P
            factor = world * local / batch if kwargs.get("num_data") is not None else float(world)
        else:
            factor = 0.0
        ddp = self._wrap(network, model, guide, batched[0].device)
        if self.decorrelate_noise and world > 1:
            loss, stats = self._forward_own_stream(ddp, rank, local_args, kwargs, batched[0].device)
        else:
            loss, stats = ddp(*local_args, **kwargs)
        if not torch.is_tensor(loss):
            raise TypeError("Expected the ELBO to return a tensor loss.")
        loss = loss * factor if factor != 1.0 else loss
        sites = list(stats)
        weight = float(local)
        flat = [loss.detach().reshape(1) / world]
        for s in stats.values():
            flat += [weight * s.kl, weight * s.loc_sq, weight * s.scale]
        packed = torch.cat([t.reshape(-1).to(loss.dtype) for t in flat])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        total = packed[0]
        out, offset = {}, 1
        for name in sites:
            units = stats[name].kl.numel()
            parts = packed[offset : offset + 3 * units].reshape(3, units) / batch
            out[name] = UnitStats(*(p.to(stats[name].kl.dtype) for p in parts.unbind(0)))
            offset += 3 * units
        loss = loss + (total - loss.detach())  # global value, this rank's gradient
        self.last_stats = out
        return loss, out

    def _forward_own_stream(self, ddp, rank, args, kwargs, device):
        # one draw from the shared state (it advances alike on every rank) seeds this rank's step
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((seed + 0x9E3779B97F4A7C15 * (rank + 1)) % 2**63)
            return ddp(*args, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The loss of :meth:`loss_and_stats`."""
        return self.loss_and_stats(model, guide, *args, **kwargs)[0]

    def loss(self, model, guide, *args, **kwargs):
        """The global loss as a float (no gradient)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


def _shared_seed(seed, device):
    """Rank 0's seed on every rank (drawn on rank 0 when ``seed`` is None)."""
    value = torch.tensor([-1 if seed is None else int(seed)], dtype=torch.int64, device=device)
    if seed is None and dist.get_rank() == 0:
        value[0] = int(torch.randint(0, 2**31 - 1, ()))
    dist.broadcast(value, src=0)
    return int(value.item())


def distributed_fit(
    network,
    x,
    y,
    *,
    elbo=None,
    seed=None,
    device=None,
    backend=None,
    find_unused_parameters=None,
    handle_signals=False,
    **fit_options,
):
    """:func:`~vdn_pyro.inference.fit` in one rank of a data-parallel run (call it on every rank,
    e.g. from a ``torchrun`` script, or through :func:`launch`).

    ``batch_size`` is the **global** minibatch; each step every rank takes its
    ``batch_size / P`` rows of it. The process group is initialised from the environment if it
    is not yet. Options in :data:`RANK_ZERO_OPTIONS` (``checkpoint_dir``, ``log_dir``,
    ``progress``) act on rank 0 only; every rank reads a checkpoint to ``resume`` from.

    :param network: the network (each rank's copy; DDP starts them all from rank 0's values):
        any module that contains :class:`~vdn_pyro.models.Neurons` layers that
        :func:`~vdn_pyro.inference.fit` trains.
    :param x: all inputs ``(N, ...)`` (every rank holds them). :param y: all targets.
    :param elbo: the per-rank estimator (default :class:`~vdn_pyro.inference.LocalELBO`), or a
        :class:`DistributedLocalELBO`.
    :param int seed: seeds the shared minibatch order (default: drawn on rank 0, broadcast).
    :param device: this rank's device (default: see :func:`init_distributed`).
    :param str backend: ``"gloo"`` or ``"nccl"``.
    :param find_unused_parameters: DDP's flag (default: on when the network has deterministic
        neuron layers, such as the twin's, whose posterior scales get no gradient).
    :param bool handle_signals: fit's SIGINT/SIGTERM handling (off: a signal stops all ranks
        at once; resume from the last checkpoint).
    :param fit_options: everything else :func:`~vdn_pyro.inference.fit` takes (``steps``,
        ``batch_size``, ``lr``, ``constraints``, ``callbacks``, ...).
    :returns: this rank's :class:`~vdn_pyro.inference.FitResult` (identical networks on every
        rank; rank 0's holds the checkpoint path).
    """
    context = init_distributed(backend=backend, device=device)
    accepted = inspect.signature(fit).parameters
    unknown = sorted(set(fit_options) - set(accepted))
    if unknown:
        raise TypeError(f"distributed_fit got options that fit() does not take: {unknown}.")
    seed = _shared_seed(seed, context.device if context.backend == "nccl" else torch.device("cpu"))
    if not isinstance(elbo, DistributedLocalELBO):
        if find_unused_parameters is None:  # the deterministic layers' scales get no gradient
            find_unused_parameters = any(layer.deterministic for layer in find_neurons(network))
        elbo = DistributedLocalELBO(elbo, find_unused_parameters=find_unused_parameters)
    if not context.is_main:
        fit_options["resume"] = _resume_for_other_ranks(
            fit_options.get("resume", False), fit_options.get("checkpoint_dir")
        )
        for name in RANK_ZERO_OPTIONS:
            if name in accepted:
                fit_options[name] = False if name == "progress" else None
    if "handle_signals" in accepted:
        fit_options["handle_signals"] = handle_signals
    return fit(network, x, y, elbo=elbo, seed=seed, device=context.device, **fit_options)


def _resume_for_other_ranks(resume, checkpoint_dir):
    """What a rank other than 0 (which gets no ``checkpoint_dir``) passes as ``resume``: the file
    rank 0 resumes from, ``False``, or ``resume`` itself (so fit raises rank 0's error)."""
    if (resume is True or resume == "auto") and checkpoint_dir is not None:
        path = Path(checkpoint_dir) / LAST_CHECKPOINT
        if resume == "auto" and not path.exists():
            return False
        return str(path)
    return resume


def find_free_port(host="127.0.0.1"):
    """A TCP port that is free on ``host`` right now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _launch_worker(rank, payload, world, backend, address, port, threads, results):
    # a private copy per process: tensors handed to spawn() directly would be moved to shared
    # memory, and every rank would then step the same parameters
    fn, args, kwargs = torch.load(io.BytesIO(payload), weights_only=False)
    os.environ.update(
        MASTER_ADDR=address,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    init_distributed(backend=backend)
    try:
        out = fn(*args, **kwargs)
        if rank == 0:
            buffer = io.BytesIO()
            torch.save(out, buffer)  # plain bytes: nothing in shared memory outlives this process
            results.put(buffer.getvalue())
    finally:
        dist.destroy_process_group()


def launch(fn, nproc, *args, backend=None, master_addr="127.0.0.1", master_port=None, threads=None, **kwargs):
    """Run ``fn(*args, **kwargs)`` in ``nproc`` new processes on this machine, each a rank of one
    process group, and return rank 0's result (what ``vdn fit --nproc N`` does).

    ``fn`` and its arguments must be picklable (a module-level function such as
    :func:`distributed_fit`). Each process gets its own copy of the arguments (serialised with
    :func:`torch.save`, not shared memory, so that no two ranks share parameter storage), and
    rank 0's result comes back the same way.

    :param fn: the per-rank function.
    :param int nproc: number of processes P.
    :param str backend: ``"gloo"`` (CPU) or ``"nccl"`` (one CUDA device per rank); default: NCCL
        if there are at least ``nproc`` CUDA devices, else Gloo.
    :param str master_addr: rendezvous address (loopback).
    :param int master_port: rendezvous port (default: a free one).
    :param int threads: torch threads per process (default on CPU: cores // nproc, at least 1).
    :returns: rank 0's return value.
    :raises torch.multiprocessing.ProcessRaisedException: if a rank raises (the others are
        terminated).
    """
    import torch.multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"Expected nproc to be an int >= 1, but got {nproc!r}.")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    if threads is None and backend == "gloo":
        threads = max(1, (os.cpu_count() or 1) // nproc)
    port = master_port or find_free_port(master_addr)
    buffer = io.BytesIO()
    torch.save((fn, args, kwargs), buffer)
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    procs = mp.start_processes(
        _launch_worker,
        args=(buffer.getvalue(), nproc, backend, master_addr, port, threads, results),
        nprocs=nproc,
        join=False,
        start_method="spawn",
    )
    payload = None
    while not procs.join(timeout=0.2):
        if payload is None and not results.empty():
            payload = results.get()
    if payload is None and not results.empty():
        payload = results.get()
    return None if payload is None else torch.load(io.BytesIO(payload), weights_only=False)

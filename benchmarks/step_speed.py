r"""Step speed: our training step against a hand-written PyTorch step and the deterministic twin.

One process, one network architecture, five ways to take the same training step:

(a) **eager**: what :func:`~vdn_pyro.inference.fit` does each step, ``LocalELBO.loss_and_stats`` +
    ``backward`` + ``Adam.step``, inside :func:`~vdn_pyro.primitives.module_params` as ``fit``
    runs it;
(b) **jit**: the same with :class:`~vdn_pyro.inference.JitLocalELBO` (captured once, replayed);
(c) **hand**: a hand-written pure-PyTorch step of the same math, reading the *same parameters*
    from the network's modules, with the KL from ``torch.distributions.kl_divergence``; its loss
    (and gradient) is checked against (a) before timing;
(d) **twin**: the ``deterministic=True`` twin through the eager step (z = loc, no KL);
(e) **user**: the same architecture written as a user's own :class:`~pyro.nn.PyroModule` with
    :class:`~vdn_pyro.TemporalNeurons` layers (:class:`UserModel`, holding the network's
    parameter values), trained by stock Pyro: ``SVI(model, NeuronGuide(model),
    pyro.optim.Adam, TraceMeanField_ELBO())`` under Pyro's default settings (parameters in the
    global param store, one ``torch.optim.Adam`` per parameter, as ``pyro.optim`` does). Its loss
    and gradient are checked against (c) too;
(f) **forecaster**: the training step of the forecaster of ``vdn fit --preset ett`` (the ETTh1
    benchmark's recipe: 64 units, AR(1) priors over chunks of 4 windows, K = 16 posterior draws
    mixed in the likelihood, frozen skip path; 64 items per step), eager LocalELBO, and
(g) **forecaster_twin**: its deterministic twin; (f) and (g) are timed as a group of their own;
(h) **floor**: :func:`floor_loss`, the twin's operations plus only the noise draw, ``z = m + s
    eps`` and the closed-form AR(1) KL, hand-fused in plain PyTorch (no Pyro, no statistics):
    the least any step of this math costs with these kernels on this device, so floor / twin is
    what the eager / twin bound can at best reach here.

Targets (issue 14): the floor is the deterministic twin, the same network plus only what being
distributional needs. Eager / twin <= 1.5 and JIT / twin <= 1.3 with validation off (the cost of
validation is reported), ``_to_copy`` per step at most twice the twin's, memory / twin reported;
the ratios against the hand-written step (issues 6 and 11) are kept.

Reference configuration (issue 6): batch 256, input 64, two neuron layers of 128 units, T = 8
time steps under an AR(1) prior, Gaussian likelihood, per-unit beta. Repetitions are interleaved
(a, b, c, d, a, b, ...) so background load hits every variant alike; the tables give medians of
wall time and of the thread's CPU time, and the ratios the issue asks for. CPU time is the
steadier of the two on a shared machine.

**Peak memory** is measured in a separate process started with ``MALLOC_MMAP_THRESHOLD_=65536``,
so that glibc serves every block of 64 KiB or more with its own ``mmap`` and returns it on free:
the resident set then follows the live tensors. For each variant, after warm-up steps the
kernel's high-water mark is reset (``/proc/self/clear_refs``), and the peak is ``VmHWM`` during
one step minus ``VmRSS`` just before it: activations, gradients and temporaries, not the
parameters, optimizer state or data. (``tracemalloc`` does not see torch's allocations.) On CUDA
it is ``torch.cuda.max_memory_allocated`` over the step.

**Syncs**: a ``torch.profiler`` run counts ``aten::_local_scalar_dense`` (a host read of a
tensor value, i.e. a device sync on an accelerator) and ``aten::_to_copy`` per step.

    python benchmarks/step_speed.py                    # reference config, validation off and on
    python benchmarks/step_speed.py --threads 2 --reps 60
    python benchmarks/step_speed.py --tiny             # seconds; what the test runs
    python benchmarks/step_speed.py --profile          # where the eager step spends its time
"""

import argparse
import copy
import cProfile
import dataclasses
import io
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.nn.functional import gelu, linear, softplus

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vdn_pyro import VDN, LocalELBO, NeuronGuide, TemporalNeurons  # noqa: E402
from vdn_pyro.files import write_text  # noqa: E402
from vdn_pyro.inference.jit import JitLocalELBO  # noqa: E402
from vdn_pyro.models import ARPrior  # noqa: E402
from vdn_pyro.primitives import data_plate, module_params  # noqa: E402

VARIANTS = ("eager", "jit", "hand", "twin", "user", "floor")
#: The forecaster's training step (the ETTh1 recipe: K posterior draws mixed in the likelihood)
#: and its deterministic twin, timed as a group of their own.
FORECASTER_VARIANTS = ("forecaster", "forecaster_twin")
LABELS = {
    "eager": "(a) eager LocalELBO step",
    "jit": "(b) JitLocalELBO step",
    "hand": "(c) hand-written PyTorch",
    "twin": "(d) deterministic twin",
    "user": "(e) user PyroModule, stock SVI",
    "inductor": "(b') JitLocalELBO + inductor",
    "forecaster": "(f) Forecaster, K draws, eager LocalELBO",
    "forecaster_twin": "(g) Forecaster twin",
    "floor": "(h) floor: twin + noise, z, KL only",
}
#: (numerator, denominator, quantity, bound): issue 14's floor is the deterministic twin; the
#: bounds against the hand-written step are issue 6's and 11's. ``None``: reported, no bound.
TARGETS = (
    ("eager", "twin", "time", 1.5),
    ("jit", "twin", "time", 1.3),
    ("user", "twin", "time", None),
    ("eager", "hand", "time", 1.3),
    ("jit", "hand", "time", 1.1),
    ("user", "hand", "time", 1.3),
    ("eager", "twin", "memory", None),
    ("jit", "twin", "memory", None),
    ("user", "twin", "memory", None),
    ("eager", "hand", "memory", 1.3),
    ("forecaster", "forecaster_twin", "time", None),
    ("forecaster", "forecaster_twin", "memory", None),
    ("floor", "twin", "time", None),
    ("eager", "floor", "time", None),
    ("jit", "floor", "time", None),
)
#: ``_to_copy`` per loss + backward, at most this many times the twin's (issue 14).
TO_COPY_BOUND = 2.0


@dataclasses.dataclass
class StepConfig:
    """The benchmarked network and data.

    :ivar int batch: minibatch size B.
    :ivar int input: input width D.
    :ivar int units: neurons H per layer.
    :ivar int layers: number of neuron layers.
    :ivar int steps: time steps T (AR(1) prior over them).
    :ivar int hidden: width of the trunk's hidden layer.
    :ivar int out: outputs per time step.
    :ivar int data_factor: the full data set is N = data_factor * B (plate scale N / B).
    """

    batch: int = 256
    input: int = 64
    units: int = 128
    layers: int = 2
    steps: int = 8
    hidden: int = 64
    out: int = 1
    data_factor: int = 4

    @property
    def num_data(self):
        return self.data_factor * self.batch


TINY = StepConfig(batch=8, input=4, units=6, layers=2, steps=3, hidden=5, out=2)


def build(config, deterministic=False, seed=0, device="cpu", dtype=torch.float32):
    """The network (per-unit beta drawn in [0.1, 1.1]) and one minibatch ``x (B, T, D)``,
    ``y (B, T, out)``."""
    gen = torch.Generator().manual_seed(seed)
    betas = [0.1 + torch.rand(config.units, generator=gen) for _ in range(config.layers)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = VDN(
            config.input,
            config.out,
            units=(config.units,) * config.layers,
            hidden=(config.hidden,),
            prior="ar",
            ar_order=1,
            likelihood="gaussian",
            beta=betas,
            deterministic=deterministic,
        )
    x = torch.randn(config.batch, config.steps, config.input, generator=gen)  # (B, T, D)
    y = torch.randn(config.batch, config.steps, config.out, generator=gen)  # (B, T, out)
    return net.to(device=device, dtype=dtype), x.to(device, dtype), y.to(device, dtype)


def hand_loss(net, x, y, num_data):
    r"""Minus the ELBO of ``net`` written out in plain PyTorch, from the network's own parameters.

    Same math as the network under :class:`~vdn_pyro.inference.LocalELBO`: MLP trunk, per layer
    an amortized Normal posterior over T steps (its noise drawn in the memory order of the head's
    time-major output, as the layer's posterior draws it, so the same seed gives the same draws)
    and an AR(1) prior with a stationary start. The
    AR(1) KL uses the chain rule of the prior, :math:`p(z_1) \prod_t p(z_t \mid z_{t-1})`:

    .. math:: \mathrm{KL} = \mathrm{KL}(q_1 \| p_1) + \sum_{t>1} \Big[\mathrm{KL}\big(q_t \,\|\,
              \mathcal N(c + \phi m_{t-1}, s^2)\big) + \frac{\phi^2 v_{t-1}}{2 s^2}\Big],

    each term a ``torch.distributions.kl_divergence`` between Normals.

    :param net: a :class:`~vdn_pyro.VDN` built by :func:`build` (MLP trunk, AR(1), k = 1).
    :param x: ``(B, T, D)``. :param y: ``(B, T, out)``. :param int num_data: N.
    :returns: scalar loss.
    """
    cfg = net.config
    if cfg.prior != "ar" or cfg.ar_order != 1 or cfg.latent_dim != 1 or cfg.scale_mode != "unit":
        raise ValueError("hand_loss covers AR(1) priors, latent_dim=1 and scale_mode='unit' only.")
    scale_factor = num_data / x.shape[0]
    trunk = net.trunk.net[0]
    h = gelu(linear(x, trunk.weight, trunk.bias))  # (B, T, F)
    kl_total = 0.0
    for i, layer in enumerate(net.layers):
        if i:
            h = gelu(h)
        post, prior = layer.posterior, layer.prior
        loc = linear(h, post.loc.weight, post.loc.bias).transpose(-1, -2).unsqueeze(-2)  # (B, H, 1, T)
        scale = softplus(post.raw_scale).clamp(post.scale_min, post.scale_max)  # (H, 1)
        q = Normal(loc, scale.unsqueeze(-1).expand_as(loc))  # (B, H, 1, T)
        # the draws the guide makes: noise in the memory order of loc, (B, T, H)
        noise = torch.randn(
            loc.shape[0], loc.shape[-1], loc.shape[1], 1, dtype=loc.dtype, device=loc.device
        )  # (B, T, H, 1)
        eps = noise.permute(0, 2, 3, 1)  # (B, H, 1, T)
        z = q.loc + eps * q.scale  # (B, H, 1, T)
        phi = torch.tanh(prior.raw_phi).clamp(-1 + 1e-6, 1 - 1e-6)  # (H, 1)
        c, s = prior.constant[:, None], softplus(prior.raw_scale)[:, None]  # (H, 1)
        start_loc = (c / (1 - phi)).unsqueeze(-1).expand(loc.shape[:-1] + (1,))  # (B, H, 1, 1)
        prior_loc = torch.cat([start_loc, c.unsqueeze(-1) + phi.unsqueeze(-1) * loc[..., :-1]], -1)
        start_scale = (s / (1 - phi**2).sqrt()).unsqueeze(-1)  # (H, 1, 1)
        prior_scale = torch.cat([start_scale, s.unsqueeze(-1).expand(-1, -1, loc.shape[-1] - 1)], -1)
        kl = kl_divergence(q, Normal(prior_loc, prior_scale)).sum(-1)  # (B, H, 1)
        kl = kl + (loc.shape[-1] - 1) * phi**2 * scale**2 / (2 * s**2)  # (B, H, 1)
        kl_total = kl_total + (kl.sum(-1) * layer.beta).sum()
        h = z.squeeze(-2).transpose(-1, -2)  # (B, T, H)
    out = linear(h, net.head.weight, net.head.bias)  # (B, T, out)
    lik = net.likelihood
    obs_scale = softplus(lik.raw_scale) + lik.scale_min  # (out,)
    log_lik = Normal(out, obs_scale).log_prob(y).sum()
    return scale_factor * (kl_total - log_lik)


#: The pieces :func:`floor_loss` adds to the twin's operations, in the order of the ablation.
FLOOR_PARTS = ("noise", "reparam", "kl")


def floor_loss(net, x, y, num_data, parts=FLOOR_PARTS):
    r"""The floor of a distributional step: the twin's operations plus only what the math of
    being distributional needs, in plain PyTorch from the network's own parameters. Per layer:
    one noise draw (in the layer's memory order, so the same seed gives the same draws as (a) and
    (c)), :math:`z = m + s\,\epsilon` as one ``addcmul``, and the AR(1) KL in closed form with
    the posterior scale per unit (``scale_mode="unit"``),

    .. math:: \mathrm{KL} = \tfrac12\Big[\frac{(m_1 - \mu)^2}{\gamma_0}
              + \frac{1}{s^2}\sum_{t>1} r_t^2\Big]
              + \tfrac12\Big[\frac{v}{\gamma_0} + \frac{(T-1)(1+\phi^2) v}{s^2}\Big]
              - \tfrac{T}{2}\log v + \tfrac12\log\gamma_0 + (T-1)\log s - \tfrac{T}{2},

    with :math:`r_t = m_t - c - \phi m_{t-1}`, :math:`\mu = c/(1-\phi)` and
    :math:`\gamma_0 = s^2/(1-\phi^2)`; the terms in the means are the library's fused operator
    (one pass forward, one backward), the rest per-unit arithmetic. No Pyro, no per-unit
    statistics, no distribution objects: the least a step of this math costs with these kernels
    on this device. With every part it is the loss of :func:`hand_loss` (checked in
    :func:`check_same_math`).

    :param net: a :class:`~vdn_pyro.VDN` built by :func:`build`.
    :param x: ``(B, T, D)``. :param y: ``(B, T, out)``. :param int num_data: N.
    :param parts: the subset of :data:`FLOOR_PARTS` to include (the ablation: none of them is
        the twin's math written the same way, z = m).
    :returns: scalar loss.
    """
    from vdn_pyro.distributions import _ar1_quadratic

    cfg = net.config
    if cfg.prior != "ar" or cfg.ar_order != 1 or cfg.latent_dim != 1 or cfg.scale_mode != "unit":
        raise ValueError("floor_loss covers AR(1) priors, latent_dim=1 and scale_mode='unit' only.")
    batch, steps = x.shape[0], x.shape[1]
    trunk = net.trunk.net[0]
    h = gelu(linear(x, trunk.weight, trunk.bias))  # (B, T, F)
    kl_total = 0.0
    for i, layer in enumerate(net.layers):
        if i:
            h = gelu(h)
        post, prior = layer.posterior, layer.prior
        m = linear(h, post.loc.weight, post.loc.bias)  # (B, T, H)
        scale = softplus(post.raw_scale).clamp(post.scale_min, post.scale_max)[:, 0]  # (H,)
        z = m  # (B, T, H)
        if "noise" in parts:
            eps = torch.randn(m.shape, dtype=m.dtype, device=m.device)  # (B, T, H)
            if "reparam" in parts:
                z = torch.addcmul(m, eps, scale)  # (B, T, H)
        if "kl" in parts:
            phi = torch.tanh(prior.raw_phi).clamp(-1 + 1e-6, 1 - 1e-6)[:, 0]  # (H,)
            c, s2 = prior.constant, softplus(prior.raw_scale) ** 2  # (H,) each
            gamma0 = s2 / (1 - phi * phi)  # (H,)
            means = m.transpose(-1, -2)  # (B, H, T) view
            quad = _ar1_quadratic(means, c / (1 - phi), gamma0.rsqrt(), c, phi, 0.5 / s2).sum(0)  # (H,)
            var = scale * scale  # (H,)
            rest = 0.5 * (var / gamma0 + (steps - 1) * (1 + phi * phi) * var / s2)  # (H,)
            logs = 0.5 * gamma0.log() + 0.5 * (steps - 1) * s2.log() - 0.5 * steps * var.log()  # (H,)
            rest = rest + logs - 0.5 * steps  # (H,)
            kl_total = kl_total + ((quad + batch * rest) * layer.beta).sum()
        h = z
    out = linear(h, net.head.weight, net.head.bias)  # (B, T, out)
    lik = net.likelihood
    obs_scale = softplus(lik.raw_scale) + lik.scale_min  # (out,)
    log_lik = Normal(out, obs_scale).log_prob(y).sum()
    return num_data / batch * (kl_total - log_lik)


def training_step(optimizer, loss_fn):
    """A zero-argument training step: zero the gradients, ``loss_fn()``, backward, optimizer step;
    returns the loss."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    return step


def floor_ablation(config, reps, device="cpu"):
    """CPU milliseconds per step (median, interleaved) of :func:`floor_loss` with its parts added
    one at a time, next to the twin's eager step: what each piece of the distributional math costs
    on its own. :returns: list of ``(label, ms)``."""
    net, x, y = build(config, device=device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def make(parts):
        return training_step(optimizer, lambda: floor_loss(net, x, y, config.num_data, parts))

    steps = {"twin's math, plain PyTorch (z = m)": make(())}
    for i in range(len(FLOOR_PARTS)):
        steps[" + ".join(("plain", *FLOOR_PARTS[: i + 1]))] = make(FLOOR_PARTS[: i + 1])
    steps["(d) deterministic twin, eager"] = make_step("twin", config, device)
    times = {k: [] for k in steps}
    for step in steps.values():
        step()
        step()
    for _ in range(reps):
        for k, step in steps.items():
            _sync(device)
            start = time.thread_time()
            step()
            _sync(device)
            times[k].append(1000 * (time.thread_time() - start))
    return [(k, statistics.median(v)) for k, v in times.items()]


class UserModel(PyroModule):
    """The benchmarked architecture as a user writes it: a :class:`~pyro.nn.PyroModule` whose
    ``forward`` is the model, with one :class:`~vdn_pyro.TemporalNeurons` layer (fixed AR(1)
    prior, per-unit beta) per neuron layer. Its module names differ from :class:`~vdn_pyro.VDN`'s,
    so the two never meet in Pyro's param store.

    :param StepConfig config: the architecture.
    :param list betas: one ``(H,)`` tensor per layer.
    :param float scale_min: floor of the likelihood scale.
    """

    def __init__(self, config, betas, scale_min=1e-3):
        super().__init__()
        self.encoder = nn.Linear(config.input, config.hidden)
        width, layers = config.hidden, []
        for beta in betas:
            prior = ARPrior(config.units, 1, learn_phi=False, learn_constant=False, learn_scale=False)
            layers.append(TemporalNeurons(width, config.units, prior=prior, beta=beta))
            width = config.units
        self.neurons = PyroModule[nn.ModuleList](layers)
        self.readout = nn.Linear(width, config.out)
        self.raw_obs_scale = nn.Parameter(torch.zeros(config.out))
        self.scale_min = scale_min

    def forward(self, x, y, num_data=None):
        """``x (B, T, D)``, ``y (B, T, out)``: the model, each layer sampling its prior (its
        posterior when run by the guide)."""
        with data_plate(x.shape[0], num_data, x.device):
            h = gelu(self.encoder(x))  # (B, T, F)
            for i, layer in enumerate(self.neurons):
                h = layer(gelu(h) if i else h)  # (B, T, H)
            loc = self.readout(h).unsqueeze(-3)  # (B, 1, T, out)
            scale = softplus(self.raw_obs_scale) + self.scale_min  # (out,)
            return pyro.sample("obs", dist.Normal(loc, scale).to_event(2), obs=y.unsqueeze(-3))


#: How :class:`UserModel` names what :class:`~vdn_pyro.VDN` calls (prefix -> prefix).
USER_NAMES = (
    ("trunk.net.0.", "encoder."),
    ("layers.", "neurons."),
    ("head.", "readout."),
    ("likelihood.raw_scale", "raw_obs_scale"),
)


def user_from_vdn(net, config):
    """A :class:`UserModel` holding ``net``'s parameter and buffer values.

    :returns: ``(model, params)``: ``params`` are the model's parameters in the order of
        ``net.parameters()`` (so gradients line up).
    """
    user = UserModel(config, [layer.beta for layer in net.layers], net.likelihood.scale_min)
    user = user.to(device=net.head.weight.device, dtype=net.head.weight.dtype)
    own = dict(user.named_parameters())
    own.update(user.named_buffers())
    params = []
    with torch.no_grad():
        for kind, items in (("param", net.named_parameters()), ("buffer", net.named_buffers())):
            for name, value in items:
                mapped = next((new + name[len(a) :] for a, new in USER_NAMES if name.startswith(a)), None)
                if mapped not in own:
                    raise KeyError(f"no counterpart in UserModel for the VDN {kind} {name!r}")
                own[mapped].copy_(value)
                if kind == "param":
                    params.append(own[mapped])
    if len(params) != len(list(user.parameters())):
        raise KeyError("UserModel has parameters the VDN lacks")
    return user, params


def make_step(variant, config, device="cpu", seed=0):
    """A zero-argument training step (loss, backward, Adam step) for one variant, on its own copy
    of the network (all copies start from the same parameters)."""
    if variant not in LABELS:
        raise ValueError(f"Expected a variant in {list(LABELS)}, but got {variant!r}.")
    if variant in FORECASTER_VARIANTS:
        return _forecaster_step(config, variant == "forecaster_twin", device, seed)
    net, x, y = build(config, deterministic=variant == "twin", seed=seed, device=device)
    num_data = config.num_data
    if variant == "user":
        return _user_step(net, config, x, y, num_data)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    if variant in ("hand", "floor"):
        written = hand_loss if variant == "hand" else floor_loss

        def loss_fn():
            return written(net, x, y, num_data)

    else:
        if variant == "inductor":
            elbo = JitLocalELBO(backend="inductor")
        else:
            elbo = JitLocalELBO() if variant == "jit" else LocalELBO()

        def loss_fn():
            with module_params():  # as fit runs it: the network's own parameters, no param store
                return elbo.loss_and_stats(net.model, net.guide, x, y, num_data=num_data)[0]

    step = training_step(optimizer, loss_fn)
    step.network, step.optimizer, step.loss_fn = net, optimizer, loss_fn
    step.elbo = None if variant in ("hand", "floor") else elbo
    return step


class _ZeroGrad:
    """The part of an optimiser the measurements call: ``zero_grad`` (``pyro.optim`` has none)."""

    def __init__(self, module):
        self.module = module

    def zero_grad(self, set_to_none=True):
        self.module.zero_grad(set_to_none=set_to_none)


def _user_step(net, config, x, y, num_data):
    """Variant (e): stock ``SVI`` on :class:`UserModel` under Pyro's default settings."""
    user, _ = user_from_vdn(net, config)
    guide = NeuronGuide(user)
    elbo = TraceMeanField_ELBO()
    svi = SVI(user, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)

    def step():
        return svi.step(x, y, num_data)

    def loss_fn():
        return elbo.differentiable_loss(user, guide, x, y, num_data)

    step.network, step.optimizer, step.loss_fn, step.elbo = user, _ZeroGrad(user), loss_fn, elbo
    return step


def forecaster_setup(config):
    """The forecaster of the ETTh1 recipe (``vdn fit --preset ett``: 64 units under AR(1) priors
    over chunks of 4 windows, input-dependent posterior scales, K = 16 draws mixed in the
    likelihood, frozen skip path), or a small one for ``--tiny``; and its minibatch shape.

    :returns: ``(ForecasterConfig, items per step, chunk, num_data)``.
    """
    from vdn_pyro.config import PRESETS, validate_config

    run = validate_config(PRESETS["ett"])
    changes = {}
    if config.batch < 64:  # the tiny configuration
        changes = dict(lookback=24, horizon=8, units=4, features=8, kernel_size=5, train_draws=2)
    fc = run.forecaster_config(**changes)
    items = min(run.fit.batch_size, config.batch)
    return fc, items, run.data.chunk, 4 * items


def _forecaster_step(config, deterministic, device="cpu", seed=0):
    """Variants (f), (g): one training step of the recipe's forecaster (eager LocalELBO inside
    module_params, as ``fit`` runs it), the skip path frozen as after the ridge fit."""
    from vdn_pyro.models import Forecaster

    fc, items, chunk, num_data = forecaster_setup(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = Forecaster(fc, deterministic=deterministic)
        net.init_skip(copy.deepcopy(net.skip))  # frozen: buffers, as the two-stage recipe has it
    x = torch.randn(items, chunk, fc.lookback, generator=gen)  # (B, T, L)
    y = torch.randn(items, chunk, fc.horizon, generator=gen)  # (B, T, H)
    net, x, y = net.to(device), x.to(device), y.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    elbo = LocalELBO()

    def loss_fn():
        with module_params():
            return elbo.loss_and_stats(net.model, net.guide, x, y, num_data=num_data)[0]

    step = training_step(optimizer, loss_fn)
    step.network, step.optimizer, step.loss_fn, step.elbo = net, optimizer, loss_fn, elbo
    return step


def check_same_math(config, device="cpu"):
    """Loss and gradients of (a), (e) and (c), in float32 and float64, and of (b), in float32,
    from one random state.

    :returns: dict of the largest differences relative to (c) (the benchmark fails above 1e-6).
    """
    out = {}
    for dtype in (torch.float32, torch.float64):
        net, x, y = build(config, device=device, dtype=dtype)
        user, user_params = user_from_vdn(net, config)
        losses, grads = {}, {}
        names = ("eager", "jit", "user", "floor", "hand")
        if dtype == torch.float64:
            names = ("eager", "user", "floor", "hand")
        for name in names:
            net.zero_grad(set_to_none=True)
            user.zero_grad(set_to_none=True)
            pyro.set_rng_seed(123)
            params = net.parameters()
            if name in ("hand", "floor"):
                loss = (hand_loss if name == "hand" else floor_loss)(net, x, y, config.num_data)
            elif name == "user":
                stock = TraceMeanField_ELBO()
                loss = stock.differentiable_loss(user, NeuronGuide(user), x, y, config.num_data)
                params = user_params
            else:
                elbo = JitLocalELBO() if name == "jit" else LocalELBO()
                with module_params():
                    loss = elbo.loss_and_stats(net.model, net.guide, x, y, num_data=config.num_data)[0]
            loss.backward()
            losses[name] = loss.item()
            grads[name] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        tag = "f32" if dtype == torch.float32 else "f64"
        ours = names[:-1]
        scale = max(1.0, abs(losses["hand"]))
        out[f"loss_rel_{tag}"] = max(abs(losses[k] - losses["hand"]) for k in ours) / scale
        out[f"loss_abs_{tag}"] = max(abs(losses[k] - losses["hand"]) for k in ours)
        gscale = grads["hand"].abs().max().item()
        out[f"grad_rel_{tag}"] = max((grads[k] - grads["hand"]).abs().max().item() / gscale for k in ours)
    out["ok"] = out["loss_abs_f64"] <= 1e-6 and out["loss_rel_f32"] <= 1e-6 and out["grad_rel_f64"] <= 1e-6
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(config, reps, warmup=3, device="cpu", validation=False, variants=VARIANTS):
    """Interleaved timings of every variant: medians of wall and CPU milliseconds per step."""
    pyro.enable_validation(validation)
    steps = {v: make_step(v, config, device) for v in variants}
    compile_s = {}
    for v, step in steps.items():
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        if v == "jit":
            compile_s[v] = sum(step.elbo.compile_seconds)
            if step.elbo.num_compilations != 1:
                raise RuntimeError(f"JitLocalELBO compiled {step.elbo.num_compilations} times, not once.")
        compile_s.setdefault(v, time.perf_counter() - start)
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for _ in range(reps):
        for v, step in steps.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            step()
            _sync(device)
            cpu[v].append(time.thread_time() - c0)
            wall[v].append(time.perf_counter() - w0)
    if "jit" in steps and steps["jit"].elbo.num_compilations != 1:
        raise RuntimeError("JitLocalELBO recompiled during timing.")
    timing = {
        "wall_ms": {v: 1e3 * statistics.median(t) for v, t in wall.items()},
        "cpu_ms": {v: 1e3 * statistics.median(t) for v, t in cpu.items()},
        "jit_capture_s": compile_s.get("jit", math.nan),
        "load_avg": os.getloadavg(),
    }
    return timing, steps


# ------------------------------------------------------------------------------------- memory
def _rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def peak_step_memory(step, device="cpu", warmup=2):
    """Bytes of memory the step needs on top of what exists before it (see the module notes)."""
    for _ in range(warmup):
        step()
    step.optimizer.zero_grad(set_to_none=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss()["VmRSS"]
    step()
    return _rss()["VmHWM"] - before


def memory_probe(config, device="cpu", variants=VARIANTS + FORECASTER_VARIANTS):
    """Run in a fresh process (see :func:`measure_memory`): peak step memory per variant."""
    pyro.enable_validation(False)
    return {v: peak_step_memory(make_step(v, config, device), device) for v in variants}


def measure_memory(config, device="cpu", threads=1):
    """Peak step memory of each variant, measured in a child process (``MALLOC_MMAP_THRESHOLD_``
    set on CPU). :returns: dict variant -> bytes."""
    if torch.device(device).type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        return {v: math.nan for v in VARIANTS + FORECASTER_VARIANTS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-probe",
        json.dumps(dataclasses.asdict(config)),
        "--device",
        str(device),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- sync audit
def count_syncs(steps, validation=False):
    """Counts of host reads (``aten::_local_scalar_dense``) and ``aten::_to_copy`` in one loss +
    backward of each (warmed-up) step, from :mod:`torch.profiler` (the optimizer, the same for
    all, is left out: Adam reads its step counters on the host)."""
    from torch.profiler import ProfilerActivity, profile

    pyro.enable_validation(validation)
    out = {}
    for v, step in steps.items():
        step.optimizer.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step.loss_fn().backward()
        names = [e.name for e in prof.events()]
        out[v] = {
            "host_reads": names.count("aten::_local_scalar_dense"),
            "to_copy": names.count("aten::_to_copy"),
        }
    return out


def profile_eager(config, device="cpu", steps=20, top=25):
    """cProfile (thread CPU time) of the eager step: the report of where Python time goes."""
    pyro.enable_validation(False)
    step = make_step("eager", config, device)
    for _ in range(3):
        step()
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_ops(config, device="cpu", steps=10, top=12):
    """Self CPU time per aten operator and step (torch.profiler), for every variant: where the
    time goes once Python is out of the way. :returns: dict variant -> [(op, ms per step)]."""
    from torch.profiler import ProfilerActivity, profile

    pyro.enable_validation(False)
    out = {}
    for v in VARIANTS:
        step = make_step(v, config, device)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        rows = [
            (e.key, e.self_cpu_time_total / 1e3 / steps)
            for e in prof.key_averages()
            if e.key.startswith("aten::")
        ]
        rows.sort(key=lambda r: -r[1])
        total = sum(ms for _, ms in rows)
        out[v] = {"aten_total_ms": total, "top": rows[:top]}
    return out


# ----------------------------------------------------------------------------------- report
def ratios(timing, memory):
    """One row per :data:`TARGETS` entry whose variants were measured."""
    rows = []
    for num, den, quantity, bound in TARGETS:
        if num not in timing["cpu_ms"] or den not in timing["cpu_ms"]:
            continue
        if quantity == "time":
            value = timing["cpu_ms"][num] / timing["cpu_ms"][den]
            wall = timing["wall_ms"][num] / timing["wall_ms"][den]
        else:
            value = wall = memory[num] / memory[den] if memory.get(den) else math.nan
        rows.append(
            {
                "ratio": f"{num}/{den}",
                "quantity": quantity,
                "cpu": value,
                "wall": wall,
                "target": bound,
                "met": None if bound is None else bool(value <= bound),
            }
        )
    return rows


def to_copy_ratio(syncs):
    """``_to_copy`` per loss + backward of the eager step against the twin's, and the bound."""
    eager, twin = syncs["eager"]["to_copy"], syncs["twin"]["to_copy"]
    ratio = eager / twin if twin else math.inf
    return {
        "eager": eager,
        "twin": twin,
        "ratio": ratio,
        "target": TO_COPY_BOUND,
        "met": ratio <= TO_COPY_BOUND,
    }


def format_report(config, results):
    lines = [
        (
            f"step_speed: B={config.batch}, D={config.input}, layers={config.layers}x{config.units} "
            f"units, T={config.steps}, AR(1), Gaussian; {results['cores']} CPU cores, torch "
            f"threads={results['threads']}, device={results['device']}, reps={results['reps']}"
        ),
        f"same math (vs hand-written): {json.dumps({k: v for k, v in results['check'].items()})}",
        "",
    ]
    memory = results["memory_bytes"]
    timings = results["timing"]
    for mode, timing in timings.items():
        load = ", ".join(f"{x:.2f}" for x in timing["load_avg"])
        lines += [
            (
                f"Pyro validation {mode} (JIT capture {timing['jit_capture_s']:.1f} s, once; "
                f"load average {load} at the end)"
            ),
            "",
            "| variant | wall ms (median) | CPU ms (median) | CPU / twin | CPU / hand | peak memory MiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for v in timing["cpu_ms"]:
            twin = "forecaster_twin" if v in FORECASTER_VARIANTS else "twin"
            hand = "" if v in FORECASTER_VARIANTS else f"{timing['cpu_ms'][v] / timing['cpu_ms']['hand']:.2f}"
            lines.append(
                f"| {LABELS[v]} | {timing['wall_ms'][v]:.2f} | {timing['cpu_ms'][v]:.2f} | "
                f"{timing['cpu_ms'][v] / timing['cpu_ms'][twin]:.2f} | {hand} | "
                f"{memory.get(v, math.nan) / 2**20:.2f} |"
            )
        lines += ["", "| ratio | of | CPU | wall | target | met |", "|---|---|---:|---:|---:|---|"]
        for row in ratios(timing, memory):
            target = "" if row["target"] is None else f"<= {row['target']}"
            met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
            numbers = f"{row['cpu']:.2f} | {row['wall']:.2f}"
            lines.append(f"| {row['ratio']} | {row['quantity']} | {numbers} | {target} | {met} |")
        syncs = results.get("syncs", {}).get(mode)
        if syncs and "twin" in syncs:
            copies = to_copy_ratio(syncs)
            lines.append(
                f"| eager/twin | `_to_copy` per loss + backward ({copies['eager']} / {copies['twin']}) | "
                f"{copies['ratio']:.2f} | | <= {copies['target']} | {'yes' if copies['met'] else 'NO'} |"
            )
        lines.append("")
    if "on" in timings and "off" in timings:
        on, off = timings["on"]["cpu_ms"], timings["off"]["cpu_ms"]
        cost = ", ".join(f"{v} {on[v] / off[v]:.2f}x" for v in on if v in off)
        lines += [f"cost of Pyro validation (CPU, on / off): {cost}", ""]
    if results.get("ablation"):
        base = results["ablation"][0][1]
        lines += [
            (
                "What each piece of the distributional math costs (validation off; the floor, (h), "
                "built up one piece at a time; CPU ms per step, median, interleaved):"
            ),
            "",
            "| step | CPU ms | vs the first row | added by this piece |",
            "|---|---:|---:|---:|",
        ]
        previous = base
        for i, (label, ms) in enumerate(results["ablation"]):
            added = "" if i == 0 or label.startswith("(d)") else f"{ms - previous:+.2f}"
            lines.append(f"| {label} | {ms:.2f} | {ms / base:.2f} | {added} |")
            previous = ms if not label.startswith("(d)") else previous
        lines.append("")
    if results.get("syncs"):
        lines.append(
            "host reads (syncs) / _to_copy in loss + backward (torch.profiler): "
            + json.dumps(results["syncs"])
        )
    return "\n".join(lines)


def main(args):
    """Run the benchmark as ``args`` (see :func:`parse_args`) asks; print and return the results
    (``check``, ``timing``, ``memory_bytes``, ``syncs``, ``ratios``), or ``None`` in the probe and
    profile modes. Restores torch's thread count on return."""
    previous = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(previous)


def _main(args):
    torch.set_num_threads(args.threads)
    config = (
        TINY
        if args.tiny
        else StepConfig(
            batch=args.batch, input=args.input, units=args.units, layers=args.layers, steps=args.steps
        )
    )
    if args.memory_probe:
        config = StepConfig(**json.loads(args.memory_probe))
        print(json.dumps(memory_probe(config, args.device)))
        return None
    if args.profile:
        print(profile_eager(config, args.device))
        for variant, prof in profile_ops(config, args.device).items():
            print(f"{LABELS[variant]}: aten self CPU {prof['aten_total_ms']:.2f} ms/step")
            for op, ms in prof["top"]:
                print(f"    {op:40s} {ms:7.3f} ms")
        return None
    reps = args.reps if args.reps is not None else (3 if args.tiny else 30)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.validation]
    results = {
        "config": dataclasses.asdict(config),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(args.device),
        "reps": reps,
        "check": check_same_math(config, args.device),
    }
    if not results["check"]["ok"]:
        raise AssertionError(f"the steps do not compute the same loss: {results['check']}")
    results["timing"], results["syncs"] = {}, {}
    variants = VARIANTS + (("inductor",) if args.inductor else ())
    for validation in modes:
        mode = "on" if validation else "off"
        timing, steps = time_steps(config, reps, device=args.device, validation=validation, variants=variants)
        syncs = count_syncs(steps, validation=validation)
        del steps
        # the forecaster and its twin: a group of their own, timed right after
        extra, steps = time_steps(
            config, reps, device=args.device, validation=validation, variants=FORECASTER_VARIANTS
        )
        syncs.update(count_syncs(steps, validation=validation))
        del steps
        for key in ("cpu_ms", "wall_ms"):
            timing[key].update(extra[key])
        timing["load_avg"] = extra["load_avg"]
        results["timing"][mode], results["syncs"][mode] = timing, syncs
    pyro.enable_validation(False)
    results["ablation"] = floor_ablation(config, reps, args.device)
    results["memory_bytes"] = measure_memory(config, args.device, args.threads)
    results["ratios"] = {mode: ratios(t, results["memory_bytes"]) for mode, t in results["timing"].items()}
    pyro.enable_validation(True)
    report = format_report(config, results)
    print(report)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "step_speed.json", json.dumps(results, indent=1, default=str))
        write_text(out / "step_speed.md", report + "\n")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="time steps T")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 30)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steadiest on a shared machine)",
    )
    parser.add_argument("--validation", choices=("off", "on", "both"), default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the eager step")
    parser.add_argument(
        "--inductor",
        action="store_true",
        help="also time JitLocalELBO(backend='inductor') (needs a C++ compiler; compiles for minutes)",
    )
    parser.add_argument("--out-dir", default=None, help="write step_speed.json and .md here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

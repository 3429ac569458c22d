r"""``VDN``: a stack of :class:`~vdn_pyro.models.Neurons` layers between a trunk and a head.

The forward pass is written once: a trunk encodes ``x``, each layer of H neurons passes on a
(pooled) sample to the next, and a linear head on the last layer feeds the likelihood. In the
model each layer samples its per-unit prior; in the guide (the same pass, through
:class:`~vdn_pyro.guides.NeuronGuide`) its per-unit amortized posterior
:math:`z \sim q(z \mid h)`. Each layer is one sample site ``"layers.<l>.z"`` with the units as a
plate (batch dim -1) inside the data plate (batch dim -2).
"""

import dataclasses
import numbers
from typing import Any

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

from vdn_pyro.guides.amortized import SCALE_MODES
from vdn_pyro.guides.trunks import DLinearTrunk, MLPTrunk, make_activation
from vdn_pyro.models.base import NeuronNetwork
from vdn_pyro.models.likelihoods import Likelihood, make_likelihood
from vdn_pyro.models.neurons import POOLINGS, Neurons
from vdn_pyro.models.priors import ARPrior, NormalPrior
from vdn_pyro.primitives import as_beta, data_plate, neuron_mode

__all__ = ["POOLINGS", "Prediction", "VDN", "VDNConfig"]
PRIORS = ("normal", "ar")
POSTERIORS = ("diagonal", "path")
TRUNKS = ("mlp", "dlinear", "none")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass
class VDNConfig:
    """Everything that defines a :class:`VDN`; every option has a default that runs.

    :ivar int in_features: input width D (the look-back L for the ``dlinear`` trunk).
    :ivar int out_features: number of outputs (classes for ``categorical``).
    :ivar tuple units: number of neurons H per layer, e.g. ``(32,)`` or ``(128, 128)``.
    :ivar int latent_dim: latent dims k per neuron.
    :ivar str pooling: how a neuron's k dims are pooled into what it passes on: ``mean``,
        ``sum`` or ``sqrt`` (sum / sqrt(k)).
    :ivar str trunk: ``mlp``, ``dlinear`` or ``none``.
    :ivar tuple hidden: hidden widths of the ``mlp`` trunk (feature width of ``dlinear`` is
        ``hidden[-1]``).
    :ivar str activation: activation of the trunk and between neuron layers.
    :ivar instance_norm: ``None``, ``"last"`` or ``"mean"``: subtract a per-window offset in the
        trunk and add it back at the head (forecasting).
    :ivar str prior: ``normal`` or ``ar``.
    :ivar int ar_order: order p of the ``ar`` prior.
    :ivar bool learn_prior: learn the prior's parameters.
    :ivar str posterior: ``diagonal`` (independent over time steps) or ``path`` (a Gauss-Markov
        chain over the time steps of temporal inputs, read from bidirectional context; needs
        ``x`` of shape ``(B, T, D)``).
    :ivar str scale_mode: ``unit`` or ``input`` (see :class:`AmortizedNormal`).
    :ivar float scale_min: posterior scale lower clamp.
    :ivar float scale_max: posterior scale upper clamp.
    :ivar float init_scale: initial posterior scale.
    :ivar str likelihood: ``gaussian``, ``student_t``, ``bernoulli`` or ``categorical``.
    :ivar likelihood_scale: ``learned``, ``heteroscedastic`` or a fixed positive number.
    :ivar beta: KL coefficient: a positive number, or one entry per layer (each a number or a
        sequence of length H_l).
    :ivar bool deterministic: the same architecture with z = loc and no KL (the baseline twin).
    """

    in_features: int
    out_features: int
    units: tuple = (32,)
    latent_dim: int = 1
    pooling: str = "mean"
    trunk: str = "mlp"
    hidden: tuple = (64,)
    activation: str = "gelu"
    instance_norm: Any = None
    prior: str = "normal"
    ar_order: int = 1
    learn_prior: bool = False
    posterior: str = "diagonal"
    scale_mode: str = "unit"
    scale_min: float = 1e-3
    scale_max: float = 10.0
    init_scale: float = 0.5
    likelihood: str = "gaussian"
    likelihood_scale: Any = "learned"
    beta: Any = 1.0
    deterministic: bool = False

    def __post_init__(self):
        if _is_int(self.units):
            self.units = (self.units,)
        self.units = tuple(self.units)
        self.hidden = tuple(self.hidden)
        for name in ("in_features", "out_features", "latent_dim", "ar_order"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"Expected {name} to be an int >= 1, got {value!r}.")
            if value < 1:
                raise ValueError(f"Expected {name} >= 1, but got {value}.")
        if not self.units or not all(_is_int(h) and h >= 1 for h in self.units):
            raise ValueError(
                f"Expected units to be a non-empty tuple of ints >= 1 (one per layer), "
                f"but got {self.units!r}."
            )
        for name, allowed in [
            ("pooling", POOLINGS),
            ("trunk", TRUNKS),
            ("prior", PRIORS),
            ("scale_mode", SCALE_MODES),
            ("posterior", POSTERIORS),
        ]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"Expected {name} in {allowed}, but got {getattr(self, name)!r}.")
        if self.trunk == "dlinear" and not self.hidden:
            raise ValueError("The dlinear trunk needs hidden=(F,) to set its feature width.")
        self.betas = self.layer_betas()

    def layer_betas(self):
        """One validated beta tensor of shape ``(H_l,)`` per layer."""
        beta = self.beta
        per_layer = (
            isinstance(beta, (list, tuple))
            and len(beta) == len(self.units)
            and (len(self.units) > 1 or not isinstance(beta[0], numbers.Real))
        )
        if not per_layer:
            beta = [beta] * len(self.units)
        return [as_beta(b, h, name=f"beta of layer {i}") for i, (b, h) in enumerate(zip(beta, self.units))]


@dataclasses.dataclass
class Prediction:
    """Posterior predictive summary returned by :meth:`VDN.predict`.

    :ivar torch.Tensor samples: ``(S, B, out)`` (or ``(S, B, T, out)``; labels drop ``out``).
    :ivar torch.Tensor mean: mean over the samples of the likelihood mean, shaped like one sample
        (class probabilities ``(B, C)`` for ``categorical``).
    :ivar torch.Tensor quantiles: ``(Q, ...)`` sample quantiles at :attr:`levels`.
    :ivar tuple levels: the quantile levels.
    """

    samples: torch.Tensor
    mean: torch.Tensor
    quantiles: torch.Tensor
    levels: tuple

    def quantile(self, level):
        """The quantile at one of :attr:`levels`."""
        if level not in self.levels:
            raise ValueError(f"Expected a level in {self.levels}, but got {level}.")
        return self.quantiles[self.levels.index(level)]


class VDN(NeuronNetwork):
    r"""A network of variational distributional neurons.

    The ELBO it defines, with per-unit KL coefficients :math:`\beta_{l,i}`, is

    .. math:: \mathcal{L} = \sum_n \mathbb{E}_q[\log p(y_n \mid z_{L,n})]
              - \sum_{l,i} \beta_{l,i} \sum_n \mathrm{KL}(q(z_{l,i,n} \mid \cdot)\,\|\,p(z_{l,i})).

    Inputs are ``x`` of shape ``(B, D)`` (static latents) or ``(B, T, D)`` (temporal latents
    over T steps, under the layer's prior over time); targets ``y`` are ``(B, out)`` or
    ``(B, T, out)`` (integer labels ``(B,)``/``(B, T)`` for ``categorical``).

    :param int in_features: input width D.
    :param int out_features: number of outputs.
    :param options: any other :class:`VDNConfig` field.

    >>> net = VDN(8, 1, units=(16,))
    >>> x, y = torch.randn(4, 8), torch.randn(4, 1)
    >>> tr = pyro.poutine.trace(net.guide).get_trace(x, y)
    >>> tr.nodes["layers.0.z"]["value"].shape
    torch.Size([4, 16, 1])
    """

    def __init__(self, in_features, out_features, **options):
        super().__init__()
        config = options.pop("config", None) or VDNConfig(in_features, out_features, **options)
        self.config = config
        if config.trunk == "mlp":
            self.trunk = MLPTrunk(in_features, config.hidden, config.activation, config.instance_norm)
        elif config.trunk == "dlinear":
            self.trunk = DLinearTrunk(
                in_features, config.hidden[-1], instance_norm=config.instance_norm or "last"
            )
        else:
            self.trunk = MLPTrunk(in_features, (), config.activation, config.instance_norm)
        width = self.trunk.out_features
        layers = []
        for h, beta in zip(config.units, config.betas):
            if config.prior == "ar":
                prior = ARPrior(
                    h,
                    config.ar_order,
                    config.latent_dim,
                    learn_phi=config.learn_prior,
                    learn_constant=config.learn_prior,
                    learn_scale=config.learn_prior,
                )
            else:
                prior = NormalPrior(h, config.latent_dim, learnable=config.learn_prior)
            layer = Neurons(
                width,
                h,
                prior=prior,
                beta=beta,
                latent_dim=config.latent_dim,
                pooling=config.pooling,
                temporal=config.posterior == "path",
                posterior=config.posterior,
                scale_mode=config.scale_mode,
                scale_min=config.scale_min,
                scale_max=config.scale_max,
                init_scale=config.init_scale,
                deterministic=config.deterministic,
            )
            layers.append(layer)
            width = h
        self.layers = PyroModule[nn.ModuleList](layers)
        self.act = make_activation(config.activation)
        if isinstance(config.likelihood, Likelihood):
            self.likelihood = config.likelihood
        elif config.likelihood in ("gaussian", "student_t"):
            self.likelihood = make_likelihood(config.likelihood, out_features, scale=config.likelihood_scale)
        else:
            self.likelihood = make_likelihood(config.likelihood, out_features)
        self.head = nn.Linear(width, self.likelihood.head_features)

    def check_inputs(self, x, y=None, *, check_finite=True):
        """Raise ``TypeError``/``ValueError`` before any computation if ``x``/``y`` are unusable.

        :param torch.Tensor x: ``(B, D)`` or ``(B, T, D)``.
        :param y: ``None`` or targets matching ``x`` (see the class docstring).
        :param bool check_finite: also scan ``x`` and ``y`` for NaN/inf. This reads every value
            (and syncs with an accelerator), so :meth:`model` and :meth:`guide` only ask for it
            while Pyro's validation is enabled.
        :raises TypeError: if ``x`` (or a floating ``y``) does not have the dtype of the network's
            parameters: the network never casts its inputs (only :func:`~vdn_pyro.inference.fit`
            casts float64 data to the default dtype), so ``predict``, the diagnostics and the
            model refuse float64 inputs to a float32 network up front.
        """
        if not torch.is_tensor(x):
            raise TypeError(f"Expected x to be a torch.Tensor, but got {type(x).__name__}.")
        if not x.dtype.is_floating_point:
            raise TypeError(f"Expected x to have a floating dtype, but got {x.dtype}; use x.float().")
        dtype, stack = None, [self]  # the first parameter's dtype (a plain walk: cheap per call)
        while stack and dtype is None:
            module = stack.pop()
            dtype = next((p.dtype for p in module._parameters.values() if p is not None), None)
            stack.extend(m for m in reversed(module._modules.values()) if m is not None)
        if dtype is not None and x.dtype != dtype:  # never cast silently (fit casts float64 data)
            raise TypeError(
                f"Expected x of dtype {dtype} (the network's parameters), but got {x.dtype}; "
                f"convert it with x.to({dtype}), or the network with net.to({x.dtype})."
            )
        d = self.config.in_features
        if x.dim() not in (2, 3) or x.shape[-1] != d:
            raise ValueError(
                f"Expected x of shape (B, {d}) or (B, T, {d}), but got {tuple(x.shape)}. "
                f"The network was built with in_features={d}."
            )
        if x.shape[0] < 1:
            raise ValueError("Expected a non-empty batch, but x has 0 rows.")
        if self.config.posterior == "path" and x.dim() != 3:
            raise ValueError(
                f"Expected x of shape (B, T, {d}): the network was built with posterior='path', a "
                f"posterior over a time axis, but got {tuple(x.shape)}."
            )
        if check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"Expected finite x, but got {bad} NaN or inf value(s) (x contains NaN or inf); "
                "clean or impute them first."
            )
        if y is not None:
            if dtype is not None and torch.is_tensor(y) and y.dtype.is_floating_point and y.dtype != dtype:
                raise TypeError(
                    f"Expected y of dtype {dtype} (the network's parameters), but got {y.dtype}; "
                    f"convert it with y.to({dtype})."
                )
            self.likelihood.check_target(y, x.shape[:-1])
            if check_finite and y.dtype.is_floating_point and not bool(torch.isfinite(y).all()):
                bad = int((~torch.isfinite(y)).sum())
                raise ValueError(
                    f"Expected finite y, but got {bad} NaN or inf value(s) (y contains NaN or inf); "
                    "clean them first."
                )

    # --------------------------------------------------------------- forward
    def encode(self, x, sample=True):
        """The trunk and the neuron layers: what the last layer passes on.

        :param torch.Tensor x: ``(B, D)`` or ``(B, T, D)``.
        :param bool sample: each layer samples (its prior in the model, its posterior in the
            guide; inside the data plate); ``False`` passes on the posterior means, no sites.
        :returns: ``(..., B, H_L)`` or ``(..., B, T, H_L)``.
        """
        if not sample:
            with neuron_mode("mean"):
                return self.encode(x)
        temporal = x.dim() == 3
        h = self.trunk(x)  # (B, [T,] F)
        for i, layer in enumerate(self.layers):
            if i:
                h = self.act(h)
            h = layer(h, temporal=temporal)  # (..., B, [T,] H)
        return h

    def output_dist(self, x, z):
        """The likelihood given the last layer's output.

        :param x: ``(B, D)`` or ``(B, T, D)`` (for the instance-normalisation offset).
        :param z: ``(..., B, H_L)`` or ``(..., B, T, H_L)``.
        :returns: distribution with batch ``(..., B, 1)`` and event ``(out,)`` or ``(T, out)``.
        """
        raw = self.head(z)  # (..., B, [T,] out * m)
        offset = self.trunk.offset(x) if self.likelihood.has_location else None
        event_dims = 1 if x.dim() == 2 else 2
        raw = raw.unsqueeze(-1 - event_dims)  # (..., B, 1, [T,] out * m)
        if offset is not None:
            offset = offset.unsqueeze(-1 - event_dims)  # (B, 1, [T,] 1)
        return self.likelihood(raw, offset, event_dims)

    def forward(self, x, y=None, *, num_data=None):
        """The model: trunk, per-unit priors (posteriors when run as the guide), head, likelihood.

        :param torch.Tensor x: ``(B, D)`` or ``(B, T, D)``.
        :param y: targets or ``None`` (sample them).
        :param int num_data: full data-set size N when ``x`` is a minibatch (scales by N/B).
        :returns: the observations ``(B, ...)``.
        """
        self.check_inputs(x, y, check_finite=pyro.infer.is_validation_enabled())
        with data_plate(x.shape[0], num_data, x.device):
            z = self.encode(x)  # (..., B, [T,] H_L)
            fn = self.output_dist(x, z)
            obs = None if y is None else y.unsqueeze(1)  # (B, 1, ...)
            out = pyro.sample("obs", fn, obs=obs)
        return out.squeeze(1) if out.dim() > 1 else out

    # ------------------------------------------------------------- analysis
    @torch.no_grad()
    def posteriors(self, x):
        """Per-layer posterior parameters along the mean path (z = loc, no sampling).

        :param torch.Tensor x: ``(B, D)`` or ``(B, T, D)``.
        :returns: dict ``site -> (loc, scale)``, each ``(B, H, k[, T])``.
        """
        self.check_inputs(x)
        return super().posteriors(x)

    @torch.no_grad()
    def predict(self, x, num_samples=100, levels=(0.05, 0.25, 0.5, 0.75, 0.95)):
        """Posterior predictive samples and summaries via :class:`pyro.infer.Predictive`.

        :param torch.Tensor x: ``(B, D)`` or ``(B, T, D)``.
        :param int num_samples: S.
        :param tuple levels: quantile levels in (0, 1).
        :returns: a :class:`Prediction`.
        """
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, got {num_samples!r}.")
        if not all(0 < q < 1 for q in levels):
            raise ValueError(f"Expected quantile levels in (0, 1), but got {levels}.")
        self.check_inputs(x)
        last = self.layers[-1].site
        sites = ("obs",) if self.deterministic else ("obs", last)
        draws = self._predictive(sites, num_samples, x)
        lead = (num_samples,) + tuple(x.shape[:-1])  # (S, B[, T])
        tail = () if self.likelihood.categorical else (self.config.out_features,)
        samples = draws["obs"].reshape(lead + tail)  # (S, B, [T,] out)
        if self.deterministic:
            z = self.encode(x, sample=False)  # (B, [T,] H)
        else:
            z = self.layers[-1].pool(draws[last], x.dim() == 3)  # (S, B, [T,] H)
        fn = self.output_dist(x, z)
        base = fn.base_dist if isinstance(fn, pyro.distributions.Independent) else fn
        point = base.probs if self.likelihood.categorical else base.mean  # (..., B, 1, [T,] out)
        point = point.squeeze(-2 - (x.dim() == 3))  # (..., B, [T,] out)
        mean = point.mean(0) if point.dim() > x.dim() else point  # (B, [T,] out)
        q = torch.tensor(levels, dtype=torch.get_default_dtype(), device=samples.device)
        quantiles = torch.quantile(samples.to(q.dtype), q, dim=0)  # (Q, B, [T,] out)
        return Prediction(samples, mean, quantiles, tuple(levels))

    def extra_repr(self):
        kind = "deterministic" if self.deterministic else "distributional"
        return f"{kind}, units={self.config.units}, k={self.config.latent_dim}"

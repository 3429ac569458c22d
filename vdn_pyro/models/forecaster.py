r"""``Forecaster``: a DLinear skip path plus one layer of temporal distributional neurons.

The forecast of a look-back window :math:`x \in \mathbb{R}^L` for the next H steps is

.. math::

    y \mid z, x \sim \mathcal{N}\big(\mathrm{DLinear}(x) + W z + b,\; \mathrm{diag}\,\sigma^2\big),

where the DLinear skip path (moving-average trend plus remainder, each mapped linearly to the
horizon) is deterministic and lives on the model side, and :math:`z \in \mathbb{R}^U` are the
latents of U distributional neurons that model the residual. Each neuron has an amortized
posterior :math:`q(z_i \mid x)` (loc and an input-dependent scale) read from a DLinear-like trunk
on the instance-normalised window (the window minus its last value), a prior (an
:class:`~vdn_pyro.models.ARPrior` over the windows of a chunk, or a
:class:`~vdn_pyro.models.NormalPrior`) and its own KL coefficient :math:`\beta_i`.
:math:`\sigma` is one learned scale per horizon step, or heteroscedastic (a second head on z).
Without the skip path the trunk's offset is added back instead.

**Temporal neurons.** A training item may be a chunk of T consecutive windows, ``x`` of shape
``(B, T, L)``; each unit's latent over the chunk is then one draw of its AR prior, so the KL ties
the unit's posterior at window t to the one at window t - 1. With T = 1 (or static ``x`` of shape
``(B, L)``) the prior is the stationary marginal and the model is the static one.

**How latent uncertainty reaches the forecast.** With ``train_draws = K > 1`` the likelihood of
an observed ``y`` is the equal-weight mixture of K posterior draws, per element,

.. math::

    \mathcal{L} = \sum_n \sum_{t,h} \mathbb{E}_{z^{1:K} \sim q}\Big[\log \frac1K \sum_{k=1}^K
    \mathcal{N}(y_{n,t,h} \mid \mu_{t,h}(z^k, x_n), \sigma^2_{t,h}(z^k))\Big]
    - \sum_i \beta_i \sum_n \mathrm{KL}\big(q(z_{i,n} \mid x_n)\,\|\,p(z_i)\big).

This is the ELBO of a model in which y is drawn from K independent latent draws (each with prior
p and the KL of each draw weighted by :math:`\beta_i / K`); for K = 1 it is the usual ELBO.
The usual ELBO scores :math:`\mathbb{E}_q \log p(y \mid z)`, which penalises every unit of
posterior variance whatever the error, so the units' scales cannot learn where the forecast is
uncertain; the mixture tends to the predictive log-likelihood :math:`\log \mathbb{E}_q p(y \mid
z)` as K grows, so they can. When sampling (``y=None``) a single draw is used, which gives the
same predictive distribution.

**Mean from the skip path.** With ``mean="skip"`` (and ``likelihood_scale="heteroscedastic"``)
the forecast mean is the skip path alone and the head maps z to the scale only,

.. math:: y \mid z, x \sim \mathcal{N}\big(\mathrm{DLinear}(x),\;
          \mathrm{diag}\,\mathrm{softplus}(W z + b)^2\big),

so the predictive is a scale mixture around the skip path. With the skip path fitted first in
closed form and frozen (:meth:`Forecaster.init_skip`, :func:`vdn_pyro.forecasting.fit_least_squares`)
this is the recipe of the ETTh1 benchmark: the least-squares mean, and neurons that learn where
and how much it is uncertain.

The deterministic twin (``deterministic=True``) is the same network with :math:`z = \mathbb{E}_q
z` and no KL.
"""

import dataclasses
import math
import numbers
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import constraints

from vdn_pyro.distributions import normal_mixture_log_prob
from vdn_pyro.guides.amortized import SCALE_MODES
from vdn_pyro.guides.trunks import DLinearTrunk, make_activation
from vdn_pyro.models.base import NeuronNetwork
from vdn_pyro.models.likelihoods import GaussianLikelihood, _inv_softplus
from vdn_pyro.models.neurons import Neurons
from vdn_pyro.models.priors import ARPrior, NormalPrior
from vdn_pyro.primitives import as_beta, data_plate

__all__ = [
    "DrawMixture",
    "EqualDrawMixture",
    "ForecastPrediction",
    "Forecaster",
    "ForecasterConfig",
    "SkipPathForecaster",
    "check_forecast_inputs",
]

FORECAST_PRIORS = ("ar", "normal")
SITE = "layers.0.z"


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_forecast_inputs(x, y, lookback, horizon, check_finite=True, dtype=None):
    """Raise a clear ``TypeError``/``ValueError`` if ``x``/``y`` are not forecasting windows.

    :param torch.Tensor x: look-back windows ``(B, L)`` or chunks ``(B, T, L)``.
    :param y: ``None`` or horizons ``(B, H)`` / ``(B, T, H)`` matching ``x``.
    :param int lookback: expected L.
    :param int horizon: expected H.
    :param bool check_finite: also scan ``x`` and ``y`` for NaN/inf (reads every value; the
        model asks for it only while Pyro's validation is enabled).
    :param torch.dtype dtype: the dtype ``x`` and ``y`` must have (the network's parameters');
        ``None`` accepts any floating dtype. Inputs are never cast silently.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"Expected x to be a torch.Tensor, but got {type(x).__name__}.")
    if not x.dtype.is_floating_point:
        raise TypeError(f"Expected x to have a floating dtype, but got {x.dtype}; use x.float().")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"Expected x of dtype {dtype} (the network's parameters), but got {x.dtype}; "
            f"convert it with x.to({dtype}), or the network with net.to({x.dtype})."
        )
    if x.dim() not in (2, 3) or x.shape[-1] != lookback:
        raise ValueError(
            f"Expected x of shape (B, {lookback}) or (B, T, {lookback}) (look-back windows or "
            f"chunks of windows), but got {tuple(x.shape)}. The model was built with "
            f"lookback={lookback}; cut windows with vdn_pyro.data.sliding_windows/window_chunks."
        )
    if x.shape[0] < 1 or (x.dim() == 3 and x.shape[1] < 1):
        raise ValueError(f"Expected at least one window, but got x of shape {tuple(x.shape)}.")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("Expected finite x, but it contains NaN or inf; clean or impute it.")
    if y is None:
        return
    if not torch.is_tensor(y):
        raise TypeError(f"Expected y to be a torch.Tensor, but got {type(y).__name__}.")
    if dtype is not None and y.dtype != dtype:
        raise TypeError(
            f"Expected y of dtype {dtype} (the network's parameters), but got {y.dtype}; "
            f"convert it with y.to({dtype})."
        )
    expected = tuple(x.shape[:-1]) + (horizon,)
    if tuple(y.shape) != expected:
        raise ValueError(
            f"Expected y of shape {expected} (x's windows times horizon {horizon}), but got {tuple(y.shape)}."
        )
    if check_finite and not bool(torch.isfinite(y).all()):
        raise ValueError("Expected finite y, but it contains NaN or inf; clean it first.")


class EqualDrawMixture(dist.TorchDistribution):
    """Base of the equal-weight mixtures of K Gaussian components, one per posterior draw,
    stacked along the leading dim of ``loc`` and ``scale``: their count, mean and variance
    (:class:`DrawMixture` mixes per element,
    :class:`~vdn_pyro.models.rollout.PathMixture` per path; the moments are the same)."""

    arg_constraints = {}
    has_rsample = False

    @property
    def num_draws(self):
        """K, the number of components."""
        return self.loc.shape[0]

    @property
    def mean(self):
        return self.loc.mean(0)

    @property
    def variance(self):
        second = (self.scale**2 + self.loc**2).mean(0)
        return second - self.mean**2


class DrawMixture(EqualDrawMixture):
    r"""Equal-weight mixture of K Gaussians, one per posterior draw, elementwise:

    .. math:: p(y) = \frac1K \sum_{k=1}^K \mathcal{N}(y \mid \mu_k, \sigma_k^2).

    A lighter stand-in for ``MixtureSameFamily(Categorical(uniform), Normal)`` over the leading
    draw dim (no mixture logits, and a scale that may broadcast, e.g. one per horizon step).

    :param torch.Tensor loc: component means ``(K, *batch)``.
    :param torch.Tensor scale: component scales (> 0), broadcastable to ``loc``.
    """

    support = constraints.real

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = loc, scale
        super().__init__(loc.shape[1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        shape = (self.num_draws,) + batch_shape  # (K, *new batch)
        extra = len(batch_shape) - len(self.batch_shape)

        def pad(t):  # new batch dims go between the draw dim and the old batch dims
            if t.dim() == self.loc.dim() and extra > 0:
                t = t.reshape(t.shape[:1] + (1,) * extra + t.shape[1:])
            return t.expand(shape)

        return DrawMixture(pad(self.loc), pad(self.scale))

    def log_prob(self, value):
        """Per-element log density of ``value`` of shape ``(*sample, *batch)`` (or broadcasting
        with ``batch``)."""
        dims = len(self.batch_shape)
        if value.dim() < dims:
            value = value.reshape((1,) * (dims - value.dim()) + value.shape)
        value = value.unsqueeze(-dims - 1)  # (*sample, 1, *batch)
        # logsumexp over the K draws of N(value; loc_k, scale_k), with a fused backward
        return normal_mixture_log_prob(value, self.loc, self.scale, -dims - 1)  # (*sample, *batch)

    def sample(self, sample_shape=()):
        """Draw a component per element, then a Gaussian draw from it."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            wide = self.expand(shape)  # components (K, *sample, *batch)
            pick = torch.randint(self.num_draws, (1,) + shape, device=self.loc.device)  # (1, *shape)
            loc = torch.gather(wide.loc, 0, pick)[0]  # (*shape)
            scale = torch.gather(wide.scale, 0, pick)[0]  # (*shape)
            return loc + scale * torch.randn_like(loc)


def _set_frozen(module, frozen):
    """Freeze a submodule by turning its parameters into buffers (and back): a frozen path holds
    constants, not parameters, so no optimiser and no Pyro param store sees it (Pyro's store would
    make a registered tensor trainable again). ``state_dict`` keys do not change."""
    for sub in module.modules():
        names = sub.__dict__.setdefault("_frozen_parameters", set())
        if frozen:
            for name, param in list(sub._parameters.items()):
                if param is not None:
                    del sub._parameters[name]
                    sub.register_buffer(name, param.detach())
                    names.add(name)
        else:
            for name in sorted(names):
                sub.register_parameter(name, nn.Parameter(sub._buffers.pop(name)))
            names.clear()


@dataclasses.dataclass
class ForecasterConfig:
    """Everything that defines a :class:`Forecaster`; every option has a default that runs.

    :ivar int lookback: look-back length L.
    :ivar int horizon: forecast horizon H.
    :ivar int units: number of distributional neurons U.
    :ivar int latent_dim: latent dims k per neuron (pooled by their mean).
    :ivar int features: width F of the DLinear-like trunk read by the neurons' posteriors.
    :ivar int kernel_size: moving-average length of the trunk and skip path (odd).
    :ivar instance_norm: ``"last"``, ``"mean"`` or ``None``: the trunk's instance normalisation
        (the offset subtracted from each window before the neurons read it). Without a skip path
        the offset is added back to the forecast.
    :ivar bool skip: add a deterministic DLinear path (model side); the neurons then model the
        residual.
    :ivar skip_norm: instance normalisation of the skip path: ``None`` (plain DLinear, default),
        ``"last"`` (NLinear-style) or ``"mean"``; its offset is added back to the forecast.
    :ivar str activation: activation applied to the trunk's features before the neurons read
        them (default ``"gelu"``; ``"identity"`` makes the posteriors linear in the window).
    :ivar str prior: ``"ar"`` (AR(p) over the windows of a chunk) or ``"normal"``.
    :ivar int ar_order: order p of the AR prior.
    :ivar float phi: initial lag-1 AR coefficient.
    :ivar phi_range: ``None`` or ``(lo, hi)`` bounding phi (the persistence band, p = 1).
    :ivar bool learn_prior: learn the prior's parameters (phi, constant, innovation scale; loc
        and scale for ``normal``).
    :ivar str scale_mode: posterior scale ``"input"`` (input-dependent) or ``"unit"``.
    :ivar float scale_min: posterior scale lower clamp.
    :ivar float scale_max: posterior scale upper clamp.
    :ivar float init_scale: initial posterior scale.
    :ivar likelihood_scale: ``"learned"`` (one scale per horizon step), ``"heteroscedastic"``
        (a second head on z) or a fixed positive number.
    :ivar float likelihood_scale_min: lower bound added to the likelihood scale.
    :ivar str mean: where the forecast mean comes from: ``"head"`` (skip path plus the head on z,
        default) or ``"skip"`` (the skip path alone; the neurons then reach the forecast only
        through a heteroscedastic likelihood scale, :math:`\\sigma(z)`, and the predictive is a
        scale mixture around the skip path; needs ``skip=True`` and
        ``likelihood_scale="heteroscedastic"``).
    :ivar beta: KL coefficient, a positive number or a sequence of length U.
    :ivar int train_draws: K posterior draws mixed in the likelihood of an observed y (1: the
        usual ELBO, which on ETTh1 only matches the twin; 16 is the validated default).
    :ivar bool deterministic: the twin: z = posterior mean, no KL, no sampling.
    """

    lookback: int = 336
    horizon: int = 96
    units: int = 64
    latent_dim: int = 1
    features: int = 64
    kernel_size: int = 25
    instance_norm: Any = "last"
    skip: bool = True
    skip_norm: Any = None
    activation: str = "gelu"
    prior: str = "ar"
    ar_order: int = 1
    phi: float = 0.5
    phi_range: Any = None
    learn_prior: bool = True
    scale_mode: str = "input"
    scale_min: float = 1e-3
    scale_max: float = 10.0
    init_scale: float = 0.5
    likelihood_scale: Any = "learned"
    likelihood_scale_min: float = 1e-3
    mean: str = "head"
    beta: Any = 1e-3
    train_draws: int = 16
    deterministic: bool = False

    def __post_init__(self):
        for name in ("lookback", "horizon", "units", "latent_dim", "features", "ar_order", "train_draws"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"Expected {name} to be an int >= 1, but got {value!r}.")
            if value < 1:
                raise ValueError(f"Expected {name} >= 1, but got {value}.")
        if self.prior not in FORECAST_PRIORS:
            raise ValueError(f"Expected prior in {FORECAST_PRIORS}, but got {self.prior!r}.")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"Expected scale_mode in {SCALE_MODES}, but got {self.scale_mode!r}.")
        if self.phi_range is not None:
            self.phi_range = tuple(float(v) for v in self.phi_range)
        if self.mean not in ("head", "skip"):
            raise ValueError(f"Expected mean 'head' or 'skip', but got {self.mean!r}.")
        if self.mean == "skip" and (not self.skip or self.likelihood_scale != "heteroscedastic"):
            raise ValueError(
                "mean='skip' takes the forecast mean from the skip path and lets the neurons set the "
                "scale, so it needs skip=True and likelihood_scale='heteroscedastic'; got "
                f"skip={self.skip!r} and likelihood_scale={self.likelihood_scale!r}."
            )
        self.betas = as_beta(self.beta, self.units, name="beta")  # (U,)


@dataclasses.dataclass
class ForecastPrediction:
    r"""A predictive distribution over the horizon: an equal-weight mixture of S' Gaussians.

    Monte Carlo forecasts have one component per posterior draw (S' = S); deterministic models
    have one (S' = 1), an exact Gaussian.

    A model that knows its predictive mean exactly (the mean of the distribution the components
    are drawn from, not of the S' draws) gives it as ``point``; :attr:`mean`, the point
    forecast the harness scores with MSE and MAE, is then that exact mean instead of the
    average of the components, which carries their Monte Carlo error.

    :ivar torch.Tensor samples: predictive draws ``(S, B, [T,] H)``, one per component draw.
    :ivar torch.Tensor loc: component means ``(S', B, [T,] H)``.
    :ivar torch.Tensor scale: component scales ``(S', B, [T,] H)``.
    :ivar point: the model's exact predictive mean ``(B, [T,] H)``, or ``None`` (unknown).
    """

    samples: torch.Tensor
    loc: torch.Tensor
    scale: torch.Tensor
    point: torch.Tensor | None = None

    def __post_init__(self):
        if self.point is not None and self.point.shape != self.loc.shape[1:]:
            raise ValueError(
                f"Expected point of shape {tuple(self.loc.shape[1:])} (loc without its component "
                f"dim), but got {tuple(self.point.shape)}."
            )

    @property
    def num_components(self):
        """S', the number of mixture components."""
        return self.loc.shape[0]

    @property
    def mean(self):
        """Predictive mean ``(B, [T,] H)``: ``point`` when the model gave it, else the
        components' average."""
        return self.loc.mean(0) if self.point is None else self.point

    @property
    def stddev(self):
        """Standard deviation of the mixture ``(B, [T,] H)`` (law of total variance over its
        components)."""
        centre = self.loc.mean(0)  # (B, [T,] H)
        second = (self.scale**2 + self.loc**2).mean(0)  # (B, [T,] H)
        return (second - centre**2).clamp_min(0).sqrt()

    def cdf(self, y):
        """Predictive CDF at ``y`` (the PIT), shape of ``y`` = ``(B, [T,] H)``."""
        return torch.special.ndtr((y - self.loc) / self.scale).mean(0)

    def log_prob(self, y):
        """Predictive log density of each element of ``y`` ``(B, [T,] H)``."""
        lp = dist.Normal(self.loc, self.scale).log_prob(y)  # (S', B, [T,] H)
        return torch.logsumexp(lp, 0) - math.log(self.num_components)

    def quantile(self, level):
        """Sample quantile at ``level`` ``(B, [T,] H)`` (exact for one component)."""
        if not 0 < level < 1:
            raise ValueError(f"Expected a level in (0, 1), but got {level}.")
        if self.num_components == 1:
            q = torch.special.ndtri(torch.tensor(float(level), dtype=self.loc.dtype))
            return self.loc[0] + q * self.scale[0]
        ordered = self.samples.sort(0).values  # (S, B, [T,] H)
        position = level * (ordered.shape[0] - 1)  # linear interpolation, as numpy's default
        lo = math.floor(position)
        hi = min(lo + 1, ordered.shape[0] - 1)
        return ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])

    def to(self, device):
        """Move every tensor to ``device``."""
        point = None if self.point is None else self.point.to(device)
        return ForecastPrediction(*(t.to(device) for t in (self.samples, self.loc, self.scale)), point)


class SkipPathForecaster(NeuronNetwork):
    """What the forecasters share: a DLinear skip path (``self.skip``, or ``None``) beside a trunk
    (``self.trunk``), and K training draws (``config.train_draws``)."""

    def _draws(self, y, draws):
        if self.deterministic:
            return 1
        if draws is None:
            return self.config.train_draws if y is not None else 1
        if not _is_int(draws) or draws < 1:
            raise ValueError(f"Expected draws to be None or an int >= 1, but got {draws!r}.")
        return draws

    def _load_skip(self, source, freeze):
        """Copy a fitted DLinear into the skip path and (un)freeze it; the first half of
        ``init_skip``."""
        if self.skip is None:
            raise ValueError(f"init_skip needs a skip path; build the {type(self).__name__} with skip=True.")
        trunk = getattr(source, "net", source)
        if not isinstance(trunk, DLinearTrunk):
            raise TypeError(f"Expected a DLinear or DLinearTrunk, but got {type(source).__name__}.")
        mine = (self.skip.in_features, self.skip.out_features, self.skip.kernel_size, self.skip.instance_norm)
        theirs = (trunk.in_features, trunk.out_features, trunk.kernel_size, trunk.instance_norm)
        if mine != theirs:
            raise ValueError(
                f"Expected a DLinear with (lookback, horizon, kernel_size, instance_norm) = {mine}, "
                f"but got {theirs}."
            )
        self.skip.load_state_dict(trunk.state_dict())
        _set_frozen(self.skip, freeze)

    def offset(self, x):
        """Deterministic part of the forecast: the skip path with its offset added back, or the
        trunk's instance-normalisation offset without a skip path.

        :param x: ``(B, [T,] L)``.
        :returns: ``(B, [T,] H)``, ``(B, [T,] 1)`` (offset only) or ``None``.
        """
        if self.skip is None:
            return self.trunk.offset(x)  # (B, [T,] 1) or None
        out = self.skip(x)  # (B, [T,] H)
        offset = self.skip.offset(x)  # (B, [T,] 1) or None
        return out if offset is None else out + offset


class Forecaster(SkipPathForecaster):
    r"""A long-horizon forecaster: DLinear skip path plus a layer of (temporal) neurons.

    See the module docstring for the model. Inputs are look-back windows ``x`` of shape
    ``(B, L)`` or chunks of T consecutive windows ``(B, T, L)``; targets ``y`` are ``(B, H)`` or
    ``(B, T, H)``. The neuron site is ``"layers.0.z"`` with batch ``(B, U)`` (``(K, 1, B, U)``
    with K training draws) and event ``(k,)`` or ``(k, T)``.

    :param ForecasterConfig config: the configuration (or pass its fields as keywords).

    >>> from vdn_pyro import LocalELBO
    >>> net = Forecaster(lookback=48, horizon=12, units=8, features=16)
    >>> x, y = torch.randn(4, 3, 48), torch.randn(4, 3, 12)  # 4 chunks of T = 3 windows
    >>> loss = LocalELBO().differentiable_loss(net.model, net.guide, x, y)
    >>> net.predict(x[:, 0], num_samples=10).samples.shape
    torch.Size([10, 4, 12])
    """

    def __init__(self, config=None, **options):
        super().__init__()
        if config is None:
            config = ForecasterConfig(**options)
        elif options:
            config = dataclasses.replace(config, **options)
        if not isinstance(config, ForecasterConfig):
            raise TypeError(f"Expected a ForecasterConfig, but got {type(config).__name__}.")
        self.config = c = config
        self.trunk = DLinearTrunk(c.lookback, c.features, c.kernel_size, c.instance_norm)
        self.act = make_activation(c.activation)
        self.skip = DLinearTrunk(c.lookback, c.horizon, c.kernel_size, c.skip_norm) if c.skip else None
        if c.prior == "ar":
            learn = c.learn_prior
            prior = ARPrior(
                c.units,
                c.ar_order,
                c.latent_dim,
                phi=c.phi,
                phi_range=c.phi_range,
                learn_phi=learn,
                learn_constant=learn,
                learn_scale=learn,
            )
        else:
            prior = NormalPrior(c.units, c.latent_dim, learnable=c.learn_prior)
        layer = Neurons(
            c.features,
            c.units,
            prior=prior,
            beta=c.betas,
            latent_dim=c.latent_dim,
            scale_mode=c.scale_mode,
            scale_min=c.scale_min,
            scale_max=c.scale_max,
            init_scale=c.init_scale,
            deterministic=c.deterministic,
        )
        self.layers = PyroModule[nn.ModuleList]([layer])
        self.likelihood = GaussianLikelihood(
            c.horizon, scale=c.likelihood_scale, scale_min=c.likelihood_scale_min, init_scale=0.5
        )
        out = c.horizon if c.mean == "skip" else self.likelihood.head_features
        self.head = nn.Linear(c.units, out)  # (U -> H * m), or H scales for mean="skip"

    # ------------------------------------------------------------------ checks
    def check_inputs(self, x, y=None, *, check_finite=True):
        """Raise ``TypeError``/``ValueError`` before any computation if ``x``/``y`` are unusable.

        :param torch.Tensor x: ``(B, L)`` or ``(B, T, L)``.
        :param y: ``None`` or ``(B, H)`` / ``(B, T, H)``.
        :param bool check_finite: also scan for NaN/inf (the model asks for it only while Pyro's
            validation is enabled).
        :raises TypeError: if ``x``/``y`` do not have the dtype of the network's parameters: the
            network never casts its inputs (only :func:`~vdn_pyro.inference.fit` casts float64
            data to the default dtype), so ``predict`` and the diagnostics refuse float64 inputs
            to a float32 network up front.
        """
        dtype, stack = None, [self]  # the first parameter's dtype (a plain walk: cheap per call)
        while stack and dtype is None:
            module = stack.pop()
            dtype = next((p.dtype for p in module._parameters.values() if p is not None), None)
            stack.extend(m for m in reversed(module._modules.values()) if m is not None)
        check_forecast_inputs(x, y, self.config.lookback, self.config.horizon, check_finite, dtype)

    def init_skip(self, source, freeze=True, start_at_source=False):
        """Copy a fitted DLinear into the skip path (and freeze it): the two-stage recipe in
        which the skip path is the least-squares DLinear and the neurons model its residual.

        :param source: a :class:`~vdn_pyro.models.DLinear` (or its ``DLinearTrunk``) with the
            same look-back, horizon, kernel size and instance normalisation as the skip path.
        :param bool freeze: stop training the skip path.
        :param bool start_at_source: also zero the head and, with a learned likelihood scale, set
            it to the source's calibrated ``scale``: the forecaster then starts as exactly the
            source's Gaussian predictive, and training moves away from it only where the ELBO
            (and validation selection) finds a gain.
        :raises ValueError: without a skip path, or if the shapes differ.
        """
        self._load_skip(source, freeze)
        if start_at_source:
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.bias.zero_()
                scale = getattr(source, "scale", None)
                if scale is not None:
                    raw = _inv_softplus((scale - self.likelihood.scale_min).clamp_min(1e-6))  # (H,)
                    if self.likelihood.scale_mode == "learned":
                        self.likelihood.raw_scale.copy_(raw)
                    elif self.config.mean == "skip":
                        self.head.bias.copy_(raw)
                    else:  # heteroscedastic head: (loc, raw scale) halves
                        self.head.bias[self.config.horizon :].copy_(raw)

    # ----------------------------------------------------------------- pieces
    def posterior(self, x):
        """The neurons' posterior parameters.

        :param x: ``(B, [T,] L)``.
        :returns: ``(loc, scale)``, each ``(B, U, k)`` or ``(B, U, k, T)``.
        """
        features = self.act(self.trunk(x))  # (B, [T,] F)
        return self.layers[0].posterior(features, x.dim() == 3)

    def components(self, x, z, expand=True):
        """Per-draw Gaussian likelihood parameters of the horizon.

        :param x: ``(B, [T,] L)``.
        :param z: pooled latents ``(..., B, [T,] U)``.
        :param bool expand: expand the scale to the shape of ``loc`` (else it may be a smaller
            tensor that broadcasts, e.g. ``(H,)``).
        :returns: ``(loc, scale)``, each ``(..., B, [T,] H)``.
        """
        raw = self.head(z)  # (..., B, [T,] H * m)
        off = self.offset(x)  # (B, [T,] H or 1)
        if self.config.mean == "skip":  # the head sets only the (raw) scale
            raw = torch.cat([torch.zeros_like(raw), raw], -1)  # (..., B, [T,] 2 H)
        if self.likelihood.head_multiplier == 1:  # learned or fixed scale per step
            loc = raw if off is None else raw + off  # (..., B, [T,] H)
            scale = self.likelihood(raw.new_zeros(1, raw.shape[-1]), None, 1).base_dist.scale[0]  # (H,)
            return loc, (scale.expand_as(loc) if expand else scale)
        base = self.likelihood(raw, off, 1).base_dist
        return base.loc, base.scale  # (..., B, [T,] H) each

    def _obs_dist(self, x, z, draws):
        """Likelihood with batch ``(..., B, 1)`` and event ``(H,)`` or ``(T, H)``."""
        loc, scale = self.components(x, z, expand=False)  # (..., B, [T,] H), scale broadcasts
        event_dims = x.dim() - 1
        loc = loc.unsqueeze(-1 - event_dims)  # (..., B, 1, [T,] H)
        if scale.dim() > 1:
            scale = scale.unsqueeze(-1 - event_dims)  # (..., B, 1, [T,] H)
        if draws == 1:
            return dist.Normal(loc, scale.expand_as(loc)).to_event(event_dims)
        # loc: (K, P, B, 1, [T,] H); the mixture runs over the leading draw dim
        return DrawMixture(loc, scale).to_event(event_dims)

    # ------------------------------------------------------------- the model
    def forward(self, x, y=None, *, num_data=None, draws=None):
        """The model: the neurons' priors (posteriors when run as the guide), the skip path, the
        head and the likelihood.

        :param torch.Tensor x: ``(B, L)`` or ``(B, T, L)``.
        :param y: ``(B, H)`` / ``(B, T, H)`` or ``None`` (sample them).
        :param int num_data: full data-set size N when ``x`` is a minibatch (scales by N/B).
        :param int draws: posterior draws K mixed in the likelihood (default: ``train_draws``
            when ``y`` is given, else 1).
        :returns: the observations ``(..., B, [T,] H)``.
        """
        self.check_inputs(x, y, check_finite=pyro.infer.is_validation_enabled())
        draws = self._draws(y, draws)
        temporal = x.dim() == 3
        with data_plate(x.shape[0], num_data, x.device):
            features = self.act(self.trunk(x))  # (B, [T,] F)
            z = self.layers[0](features, temporal=temporal, draws=draws)  # (.., B, [T,] U)
            obs = None if y is None else y.unsqueeze(1)  # (B, 1, [T,] H)
            out = pyro.sample("obs", self._obs_dist(x, z, draws), obs=obs)
        return out.squeeze(-1 - (x.dim() - 1))  # (..., B, [T,] H)

    # -------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(self, x, num_samples=100, batch_size=None):
        r"""Monte Carlo predictive distribution: S posterior draws, one Gaussian each.

        Equivalent to ``pyro.infer.Predictive(model, guide, num_samples=S)`` on the ``obs`` site,
        but it also returns each draw's Gaussian (for exact mixture NLL and PIT). The twin returns
        one component and S draws from it.

        :param torch.Tensor x: ``(B, L)`` or ``(B, T, L)``.
        :param int num_samples: S.
        :param int batch_size: windows per forward pass (default all).
        :returns: a :class:`ForecastPrediction` with samples ``(S, B, [T,] H)``.
        """
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, but got {num_samples!r}.")
        self.check_inputs(x)
        if batch_size is not None and batch_size < x.shape[0]:
            parts = [self.predict(xb, num_samples) for xb in x.split(batch_size)]
            return ForecastPrediction(
                torch.cat([p.samples for p in parts], 1),  # (S, B, [T,] H)
                torch.cat([p.loc for p in parts], 1),  # (S', B, [T,] H)
                torch.cat([p.scale for p in parts], 1),  # (S', B, [T,] H)
            )
        layer, temporal = self.layers[0], x.dim() == 3
        loc, scale = self.posterior(x)  # (B, U, k[, T])
        if self.deterministic:
            z = layer.pool(loc, temporal)[None]  # (1, B, [T,] U)
        else:
            eps = torch.randn((num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device)
            z = layer.pool(loc + scale * eps, temporal)  # (S, B, [T,] U)
        c_loc, c_scale = self.components(x, z)  # (S', B, [T,] H)
        reps = num_samples // c_loc.shape[0]
        noise = torch.randn((reps,) + c_loc.shape, dtype=loc.dtype, device=loc.device)
        samples = (c_loc + c_scale * noise).reshape((num_samples,) + c_loc.shape[1:])  # (S, B, [T,] H)
        return ForecastPrediction(samples, c_loc, c_scale)

    @property
    def has_exact_marginal(self):
        """Whether the predictive distribution of one element is exactly Gaussian: the head is
        linear in z and the likelihood scale does not depend on z (not heteroscedastic)."""
        return self.likelihood.head_multiplier == 1

    @torch.no_grad()
    def predict_marginal(self, x, num_samples=100, batch_size=None):
        r"""The exact predictive marginal of each element, as one Gaussian.

        With a linear head and a likelihood scale that does not depend on z, integrating the
        Gaussian posterior out gives, per horizon step h,

        .. math:: y_h \mid x \sim \mathcal{N}\Big(\mu_h(\bar m) ,\; \sigma_h^2 + \sum_u W_{hu}^2
                  \,\mathrm{Var}_q[\bar z_u]\Big),

        where :math:`\bar m` is the posterior mean of the pooled latents and :math:`\bar z_u`
        the pooled latent of unit u. This is the :math:`S \to \infty` limit of :meth:`predict`.

        :param torch.Tensor x: ``(B, L)`` or ``(B, T, L)``.
        :param int num_samples: draws S from the marginal.
        :param int batch_size: windows per forward pass (default all).
        :returns: a one-component :class:`ForecastPrediction`.
        :raises ValueError: if :attr:`has_exact_marginal` is false.
        """
        if not self.has_exact_marginal:
            raise ValueError(
                "predict_marginal needs a likelihood scale that does not depend on z, but this "
                "model is heteroscedastic; use predict(x, num_samples) (Monte Carlo) instead."
            )
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, but got {num_samples!r}.")
        self.check_inputs(x)
        parts = x.split(batch_size) if batch_size else (x,)
        locs, scales = [], []
        layer, temporal = self.layers[0], x.dim() == 3
        for xb in parts:
            loc, scale = self.posterior(xb)  # (b, U, k[, T])
            c_loc, c_scale = self.components(xb, layer.pool(loc, temporal))  # (b, [T,] H)
            var = c_scale**2
            if not self.deterministic:
                z_var = layer.pool(scale**2, temporal) / layer.latent_dim  # (b, [T,] U)
                var = var + z_var @ (self.head.weight**2).T  # (b, [T,] H)
            locs.append(c_loc)
            scales.append(var.sqrt())
        loc, scale = torch.cat(locs)[None], torch.cat(scales)[None]  # (1, B, [T,] H)
        noise = torch.randn((num_samples,) + loc.shape[1:], dtype=loc.dtype, device=loc.device)
        return ForecastPrediction(loc + scale * noise, loc, scale)

    def extra_repr(self):
        c = self.config
        kind = "deterministic" if c.deterministic else "distributional"
        return f"{kind}, L={c.lookback}, H={c.horizon}, units={c.units}, prior={c.prior}"

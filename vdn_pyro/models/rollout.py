r"""``RolloutForecaster``: temporal neurons whose latents run over the forecast horizon.

The look-back window :math:`x \in \mathbb{R}^L` is cut into P patches of ``patch`` steps (the
oldest ``L mod patch`` steps are dropped). A trunk encodes each patch (a linear map of the
patch, a learned position and a DLinear-like summary of the whole window), and a layer of U
temporal neurons under a learnable AR(1) prior per unit gives the posterior of each unit's
latent path over the patches, :math:`q(z_{1:P} \mid x)` (a Gauss-Markov path posterior read from
bidirectional context, or a diagonal one). The Q = ceil(H / patch) patches of the horizon get
latents rolled forward from :math:`z_P` by each unit's own AR dynamics,

.. math::

    z_{P+j} = c_i + \phi_i z_{P+j-1} + s_i \varepsilon_j, \qquad \varepsilon_j \sim \mathcal{N}(0, 1),
    \qquad j = 1, \dots, Q,

and the decoder reads the rolled latent of each step's patch,

.. math::

    y_h \mid z, x \sim \mathcal{N}\big(\mathrm{DLinear}(x)_h + W_h z_{P + \lceil h / \mathrm{patch}
    \rceil} + b_h,\; \mathrm{softplus}(V_h z_{P + \lceil h / \mathrm{patch} \rceil} + d_h)^2\big),

with a loading :math:`W_h, V_h \in \mathbb{R}^U` per horizon step (``mean="skip"`` drops
:math:`W_h z`, ``likelihood_scale="learned"`` drops :math:`V_h z`). With ``mean="centred"`` the
decoder reads the rolled latents' deviation from their mean under the posterior,
:math:`W_h (z_{P+j} - m_{P+j}(x))` with :math:`m_{P+1} = c + \phi\,\mu_P(x)`,
:math:`m_{P+j} = c + \phi\, m_{P+j-1}` and :math:`\mu_P(x)` the posterior mean of
:math:`z_P` (no bias :math:`b_h`): the predictive mean is then exactly the skip path, and the
units add only zero-mean deviations that move the path together. Every sample path of the
forecast draws one :math:`z_P` and one roll-out, so the steps of a path move together, and the
correlation across the horizon comes from the units' memory: a unit with :math:`\phi_i` near 1
shifts the whole path; one with :math:`\phi_i` near 0 only the patch it is read at.

**Pyro sites.** The look-back latents are the site ``"layers.0.z"`` (batch ``(B, U)``, event
``(1, P)``), the horizon's latents the site ``"rollout.z"`` (batch ``(B, U)``, event ``(1, Q)``),
both made by :func:`~vdn_pyro.primitives.neurons` under the unit plate and the per-unit beta. In
the model the roll-out site's distribution is the AR conditional
:math:`p(z_{P+1:P+Q} \mid z_P)`, a :class:`~vdn_pyro.distributions.GaussMarkov` chain with
transition :math:`\phi_i`, offset :math:`(c_i + \phi_i z_P, c_i, \dots, c_i)` and scale
:math:`s_i`; **in the guide it is the same conditional**, given the guide's own :math:`z_P`. Model
and guide then evaluate the same density at the same value, so the site's KL term
:math:`\log q - \log p` is exactly 0 for every draw, with zero gradient, under every stock Pyro
ELBO (``Trace_ELBO``; ``TraceMeanField_ELBO``, whose closed form for two chains gives 0; and
:class:`~vdn_pyro.LocalELBO`, which skips the site), and the ELBO is

.. math::

    \mathbb{E}_{q(z_{1:P} \mid x)\, p(z_{P+1:P+Q} \mid z_P)} \log p(y \mid z_{P+1:P+Q}, x)
    - \sum_i \beta_i\, \mathrm{KL}\big(q(z_{i,1:P} \mid x) \,\|\, p(z_{i,1:P})\big),

the ELBO of the joint model :math:`z_{1:P+Q} \sim \mathrm{AR}(1)`, :math:`y \sim p(y \mid
z_{P+1:P+Q}, x)` under the guide :math:`q(z_{1:P} \mid x)\,p(z_{P+1:P+Q} \mid z_P)`. (The
alternative, a standard-Normal noise site :math:`\varepsilon_{1:Q}` shared by model and guide and
a deterministic roll-out, is the same objective; a latent site keeps the rolled latents
themselves in every trace, so Pyro's ``Predictive`` and the tools read them.) The AR parameters
receive gradients from the look-back KL and, through the reparametrised roll-out, from the
forecast's likelihood.

**An amortized posterior of the horizon** (``horizon_posterior="amortized"``, an alternative
objective, not the default). Instead of mixing K prior roll-outs in the likelihood, training can
maximise the plain ELBO of the same model with a posterior of the horizon's latents that reads the
target: while ``y`` is observed, the guide draws each unit's horizon latents from a Gauss-Markov
chain started at :math:`z_P`,

.. math::

    q(z_{P+j} \mid z_{P+j-1}, x, y) = \mathcal{N}\big((\phi_i + d_{ij})\, z_{P+j-1} + c_i + s_i
    a_{ij},\; s_i^2 b_{ij}^2\big),

with :math:`(a, b, d)` from :meth:`RolloutForecaster.innovation_posterior` (:math:`a = d = 0`,
:math:`b = 1` is the AR conditional itself, where it starts; a free transition lets it hold the
exact posterior of a linear Gaussian decoder). Its KL to the AR conditional is closed form (the
KL of two :class:`~vdn_pyro.distributions.GaussMarkov` chains), weighted by ``horizon_beta`` (1:
the ELBO of the predictive model), and the K draws are averaged (:class:`DrawAverage`). Forecasts
never see the target: they roll the prior, as above. Measured (``benchmarks/path_calibration.py``,
a stationary series with a Kalman oracle; selection on the validation energy score): it gets
marginal and path scores a little better than the mixture's (energy 2.296 against 2.313, oracle
2.285), but its paths move together less than the data do (the horizon sum's 90% interval holds
0.84 of the test sums, the mixture's 0.92, the oracle's 0.90). Under a selection on the marginal
CRPS it kept its untrained start on 2 of 3 series, and on ETTh1 (H = 192, one seed, CRPS
selection) it lost to the mixture on the validation energy, CRPS-sum, CRPS and NLL, so the mixture
stays the default.

**The exact likelihood of the horizon** (``horizon_posterior="exact"``). The decoder's mean is
affine in the rolled latents, and given x they are Gaussian: :math:`z_P` from its posterior
marginal, then the AR roll-out. When the likelihood scale does not read them (here it reads their
mean :math:`m(x)`, and multiplies the paths' deviation as well as the noise, see
:meth:`RolloutForecaster.components`), the forecast path is exactly Gaussian, and training scores
an observed path by its exact density (:meth:`RolloutForecaster.exact_predictive`, a Kalman filter
over the Q patches, :class:`~vdn_pyro.state_space.PatchStateSpace`): the K-draw mixture below with
K infinite (for the same decoder), no Monte Carlo in the likelihood, at the cost of one K = 16
mixture step or less. With y observed the roll-out site is integrated out (the model has no
``"rollout.z"`` site); without y the model draws it and the path from it, the same law. Measured:
on the stationary series of ``benchmarks/path_calibration.py``, where the K = 16 mixture's
marginal variance is about a third too large in sample, it is better than the mixture on every
proper score (energy 2.297 against 2.313, oracle 2.285); on ETTh1 (4 horizons, 3 seeds) validation
rejects it at every horizon (energy +0.009 to +0.045, NLL 2.9-5.4 against 1.1-1.6: a Gaussian path
is overconfident on the volatile validation months), so the mixture stays the default.

**A mixture of exact paths** (``horizon_posterior="exact_mixture"``). Between the two: K draws of
the last look-back latent :math:`z_P`, and given each the horizon's innovations integrated out
exactly, with the likelihood scale read at that draw's roll-out mean, so the K Gaussian components
differ in mean and in scale (a scale mixture, heavier-tailed than one Gaussian):
:meth:`RolloutForecaster.mixture_predictive`. Every component of every window whitens to one
shared Gaussian (the innovations' law given :math:`z_P` does not depend on the window), so one
Kalman filter serves them all (:class:`~vdn_pyro.state_space.ScaledStateSpaceMixture`). With a
scale that reads no latent it tends to the exact likelihood as K grows. On the stationary series
it is the best of the three likelihoods on every proper score (energy 2.294, CRPS-sum 9.30),
with intervals a little narrow.

**Likelihood of the horizon.** With ``train_draws = K > 1`` the likelihood of an observed path is
a mixture over K draws of :math:`(z_P, z_{P+1:P+Q})`, per path (``mixture="path"``, default:
:class:`PathMixture`), which tends to the joint predictive log-likelihood
:math:`\log \mathbb{E}_q p(y_{1:H} \mid z, x)` as K grows and so rewards paths that move together
where the data do, or per element as the :class:`~vdn_pyro.models.Forecaster` does
(``mixture="step"``: :class:`~vdn_pyro.models.forecaster.DrawMixture`, blind to the correlation
across the horizon). Each draw's KL is weighted by :math:`\beta_i / K`.

**Chunks.** ``x`` of shape ``(B, T, L)`` (the training items of
:func:`~vdn_pyro.forecasting.train_forecaster` with ``chunk > 1``) is read as B T independent
windows: the latents' time axis is the patches of one window.

The deterministic twin (``deterministic=True``) is the same network with :math:`z_{1:P}` the
posterior mean, the conditional mean of the roll-out, and no KL: its forecast has independent
steps.
"""

import dataclasses
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import constraints
from torch.nn.functional import softplus

from vdn_pyro.distributions import GaussMarkov
from vdn_pyro.guides.amortized import SCALE_MODES
from vdn_pyro.guides.trunks import DLinearTrunk, make_activation
from vdn_pyro.models.forecaster import (
    DrawMixture,
    EqualDrawMixture,
    ForecastPrediction,
    SkipPathForecaster,
    _is_int,
    check_forecast_inputs,
)
from vdn_pyro.models.likelihoods import _inv_softplus
from vdn_pyro.models.neurons import Neurons
from vdn_pyro.models.priors import ARPrior
from vdn_pyro.primitives import as_beta, current_neuron_mode, data_plate, neurons, record_posterior
from vdn_pyro.state_space import PatchStateSpace, ScaledStateSpaceMixture

__all__ = ["DrawAverage", "PathMixture", "RolloutConfig", "RolloutForecaster"]

ROLLOUT_PRIORS = ("ar", "normal")
POSTERIORS = ("path", "diagonal")
MIXTURES = ("path", "step")
#: How training draws the horizon's latents (see :class:`RolloutConfig`).
HORIZON_POSTERIORS = ("prior", "amortized", "exact", "exact_mixture")
LIKELIHOOD_SCALES = ("heteroscedastic", "learned")
#: Lower bound of the amortized posterior's innovation scales.
INNOVATION_SCALE_MIN = 1e-3
#: ``horizon_posterior="exact"``: the mean's loadings at the start from a skip path, as a fraction
#: of their initial values (see :meth:`RolloutForecaster.init_skip`).
EXACT_START = 0.01
#: How the forecast mean reads the rolled latents (see :class:`RolloutConfig`).
MEANS = ("head", "centred", "skip")


class PathMixture(EqualDrawMixture):
    r"""Equal-weight mixture of K diagonal Gaussians over a path, one per posterior draw:

    .. math:: p(y_{1:H}) = \frac1K \sum_{k=1}^K \prod_{h=1}^H \mathcal{N}(y_h \mid \mu_{k,h},
              \sigma_{k,h}^2).

    Unlike :class:`~vdn_pyro.models.forecaster.DrawMixture` (a mixture per element) the K
    components are mixed per path, so the density sees how the steps of a path move together.

    :param torch.Tensor loc: component means ``(K, *batch, H)``.
    :param torch.Tensor scale: component scales (> 0), broadcastable to ``loc``.
    """

    support = constraints.independent(constraints.real, 1)

    def __init__(self, loc, scale, validate_args=None):
        if loc.dim() < 2:
            raise ValueError(f"Expected loc of shape (K, *batch, H), but got {tuple(loc.shape)}.")
        self.loc, self.scale = loc, torch.as_tensor(scale, dtype=loc.dtype).expand_as(loc)
        super().__init__(loc.shape[1:-1], loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        extra = len(batch_shape) - len(self.batch_shape)
        shape = (self.num_draws,) + batch_shape + self.event_shape  # (K, *new batch, H)

        def pad(t):  # new batch dims go between the draw dim and the old batch dims
            return t.reshape(t.shape[:1] + (1,) * extra + t.shape[1:]).expand(shape)

        return PathMixture(pad(self.loc), pad(self.scale))

    def _component_log_prob(self, value):
        r"""Each component's log density of paths ``value`` ``(*sample, *batch, H)``, without
        its constant :math:`-\tfrac H2 \log 2\pi`: ``(*sample, K, *batch)``."""
        dims = len(self.batch_shape)
        if value.dim() < dims + 1:  # broadcasts with the batch: pad it to its dims
            value = value.reshape((1,) * (dims + 1 - value.dim()) + value.shape)
        value = value.unsqueeze(-dims - 2)  # (*sample, 1, *batch, H)
        white = (value - self.loc) / self.scale  # (*sample, K, *batch, H)
        return (-0.5 * white * white - torch.log(self.scale)).sum(-1)  # (*sample, K, *batch)

    def log_prob(self, value):
        """Log density of paths ``value`` of shape ``(*sample, *batch, H)``: ``(*sample, *batch)``."""
        lp = self._component_log_prob(value)  # (*sample, K, *batch)
        num_steps = self.event_shape[0]
        lp = torch.logsumexp(lp, -len(self.batch_shape) - 1)  # (*sample, *batch)
        return lp - math.log(self.num_draws) - 0.5 * num_steps * math.log(2 * math.pi)

    def sample(self, sample_shape=()):
        """Draw a component per path, then a Gaussian path from it."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            wide = self.expand(shape)  # components (K, *sample, *batch, H)
            pick = torch.randint(self.num_draws, (1,) + shape + (1,), device=self.loc.device)
            pick = pick.expand((1,) + shape + self.event_shape)  # (1, *shape, H)
            loc = torch.gather(wide.loc, 0, pick)[0]  # (*shape, H)
            scale = torch.gather(wide.scale, 0, pick)[0]  # (*shape, H)
            return loc + scale * torch.randn_like(loc)


class DrawAverage(PathMixture):
    r"""The K draws of a path's Gaussian likelihood, averaged in log space: the Monte Carlo
    estimate of :math:`\mathbb{E}_q \log p(y_{1:H} \mid z)` in an ELBO whose K posterior draws
    sit in the event (so the likelihood site needs no plate of its own),

    .. math:: \log p(y_{1:H}) := \frac1K \sum_{k=1}^K \sum_{h=1}^H \log \mathcal{N}(y_h \mid
              \mu_{k,h}, \sigma_{k,h}^2).

    It is not a normalised density of y (the average of log densities); :meth:`sample` draws from
    the equal-weight mixture of the K components, as :class:`PathMixture` does.

    :param torch.Tensor loc: component means ``(K, *batch, H)``.
    :param torch.Tensor scale: component scales (> 0), broadcastable to ``loc``.
    """

    def expand(self, batch_shape, _instance=None):
        wide = super().expand(batch_shape)
        return DrawAverage(wide.loc, wide.scale)

    def log_prob(self, value):
        """The average over the K draws of the path's log density: ``(*sample, *batch)``."""
        lp = self._component_log_prob(value).mean(-len(self.batch_shape) - 1)  # (*sample, *batch)
        return lp - 0.5 * self.event_shape[0] * math.log(2 * math.pi)


@dataclasses.dataclass
class RolloutConfig:
    r"""Everything that defines a :class:`RolloutForecaster`; every option has a default that runs.

    :ivar int lookback: look-back length L.
    :ivar int horizon: forecast horizon H.
    :ivar int patch: steps per patch (1: one latent per step); the look-back gives
        P = L // patch patches, the horizon Q = ceil(H / patch).
    :ivar int units: number of temporal neurons U (one latent dim each).
    :ivar int features: width F of the patch features read by the posterior.
    :ivar int kernel_size: moving-average length of the window summary and the skip path (odd).
    :ivar instance_norm: ``"last"``, ``"mean"`` or ``None``: offset subtracted from each window
        before the trunk reads it.
    :ivar bool skip: add the deterministic DLinear skip path to the forecast mean (else the
        trunk's instance-normalisation offset).
    :ivar skip_norm: instance normalisation of the skip path (``None``, ``"last"``, ``"mean"``).
    :ivar str activation: activation of the patch features.
    :ivar str prior: ``"ar"`` (a learnable AR(1) per unit, rolled over the horizon) or
        ``"normal"`` (the control: phi fixed at 0, i.e. i.i.d. Normal latents per patch with a
        learnable mean and scale, so the horizon's patches are independent given x).
    :ivar float phi: initial AR coefficient (per patch). Learning moves it slowly, so the start
        matters: in a short ETTh1 probe (H = 96, 24-step patches, validation split) 0.9 beat 0.5
        on every score (energy 4.880 vs 4.910, CRPS of the horizon sum 25.6 vs 27.1, its 90%
        coverage 0.77 vs 0.63, marginal CRPS 0.4023 vs 0.4044), and both starts drifted upwards.
    :ivar phi_range: ``None`` or ``(lo, hi)`` bounding phi.
    :ivar bool learn_prior: learn c, phi and s.
    :ivar str posterior: ``"path"`` (Gauss-Markov over the patches, bidirectional context) or
        ``"diagonal"`` (independent over patches). Only :math:`z_P` reaches the forecast, and
        with K training draws the path posterior costs several times more per step on a CPU
        (about 4x at K = 16, U = 32, P = 14); the ETTh1 probe used ``"diagonal"``.
    :ivar str scale_mode: diagonal posterior's scale, ``"input"`` or ``"unit"``.
    :ivar float scale_min: posterior scale lower clamp.
    :ivar float scale_max: posterior scale upper clamp.
    :ivar float init_scale: initial posterior scale.
    :ivar str likelihood_scale: ``"heteroscedastic"`` (softplus of a head on the rolled latents) or
        ``"learned"`` (one scale per horizon step).
    :ivar float likelihood_scale_min: lower bound added to the likelihood scale.
    :ivar str mean: ``"centred"`` (default: skip path plus :math:`W (z - m(x))`, the deviation of
        the rolled latents from their posterior mean: the predictive mean is the skip path and
        the latents move each path around it; needs ``skip=True``), ``"head"`` (skip path plus
        :math:`W z + b`: the rolled latents move the path and its mean; in a one-seed ETTh1 probe
        at H = 336 and 720 its trained mean drifted from the skip path's, and it lost to
        ``"centred"`` on every validation score) or ``"skip"`` (the skip path
        alone; the latents set only the scale, needs ``skip=True`` and a heteroscedastic scale).
    :ivar beta: KL coefficient, a positive number or a sequence of length U.
    :ivar int train_draws: K draws mixed in the likelihood of an observed path (with
        ``horizon_posterior="amortized"``: averaged in the ELBO).
    :ivar str mixture: ``"path"`` (mix the K draws per path) or ``"step"`` (per element); not
        used with ``horizon_posterior="amortized"``.
    :ivar str horizon_posterior: how training draws the horizon's latents. ``"prior"`` (the
        guide rolls the AR conditional, the site's KL is 0 and the K draws are mixed in the
        likelihood) or ``"amortized"`` (while the target is observed, the guide draws them from
        an amortized Gauss-Markov posterior that reads it, with the closed-form KL to the AR
        conditional weighted by ``horizon_beta``; forecasts still roll the prior) or ``"exact"``
        (the horizon's latents, and the last look-back latent's posterior spread, integrated out in
        closed form: the likelihood of an observed path is the forecast's exact Gaussian
        predictive, :meth:`RolloutForecaster.exact_predictive`, no Monte Carlo and no
        ``train_draws``; the likelihood scale reads the rolled latents' mean) or
        ``"exact_mixture"`` (a mixture over ``train_draws`` draws of the last look-back latent
        :math:`z_P`, each component's horizon latents integrated out in closed form given its
        :math:`z_P`; the likelihood scale reads that draw's roll-out mean, so the components
        differ in scale as well as mean: :meth:`RolloutForecaster.mixture_predictive`). See the
        module docstring for what each measured.
    :ivar float horizon_beta: KL weight of the horizon's latents under ``"amortized"`` (1: the
        ELBO of the predictive model, whose marginal is what the forecast draws from).
    :ivar bool deterministic: the twin: posterior means, conditional-mean roll-out, no KL.
    """

    lookback: int = 336
    horizon: int = 96
    patch: int = 24
    units: int = 32
    features: int = 64
    kernel_size: int = 25
    instance_norm: object = "last"
    skip: bool = True
    skip_norm: object = None
    activation: str = "gelu"
    prior: str = "ar"
    phi: float = 0.9
    phi_range: object = None
    learn_prior: bool = True
    posterior: str = "path"
    scale_mode: str = "input"
    scale_min: float = 1e-3
    scale_max: float = 10.0
    init_scale: float = 0.5
    likelihood_scale: str = "heteroscedastic"
    likelihood_scale_min: float = 1e-3
    mean: str = "centred"
    beta: object = 1e-3
    train_draws: int = 16
    mixture: str = "path"
    horizon_posterior: str = "prior"
    horizon_beta: float = 1.0
    deterministic: bool = False

    def __post_init__(self):
        for name in ("lookback", "horizon", "patch", "units", "features", "kernel_size", "train_draws"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"Expected {name} to be an int >= 1, but got {value!r}.")
            if value < 1:
                raise ValueError(f"Expected {name} >= 1, but got {value}.")
        if self.patch > self.lookback:
            raise ValueError(
                f"Expected patch <= lookback so that the look-back has at least one patch, but got "
                f"patch={self.patch} and lookback={self.lookback}; use a shorter patch."
            )
        for name, allowed in [
            ("prior", ROLLOUT_PRIORS),
            ("posterior", POSTERIORS),
            ("scale_mode", SCALE_MODES),
            ("likelihood_scale", LIKELIHOOD_SCALES),
            ("mean", MEANS),
            ("mixture", MIXTURES),
            ("horizon_posterior", HORIZON_POSTERIORS),
        ]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"Expected {name} in {allowed}, but got {getattr(self, name)!r}.")
        if self.phi_range is not None:
            self.phi_range = tuple(float(v) for v in self.phi_range)
        if self.mean == "skip" and (not self.skip or self.likelihood_scale != "heteroscedastic"):
            raise ValueError(
                "mean='skip' takes the forecast mean from the skip path and lets the neurons set the "
                "scale, so it needs skip=True and likelihood_scale='heteroscedastic'; got "
                f"skip={self.skip!r} and likelihood_scale={self.likelihood_scale!r}."
            )
        if self.mean == "centred" and not self.skip:
            raise ValueError(
                "mean='centred' takes the forecast mean from the skip path and lets the neurons move "
                "each path around it, so it needs skip=True; got skip=False."
            )
        self.betas = as_beta(self.beta, self.units, name="beta")  # (U,)
        self.horizon_betas = as_beta(self.horizon_beta, self.units, name="horizon_beta")  # (U,)

    @property
    def num_patches(self):
        """P, the look-back's patches."""
        return self.lookback // self.patch

    @property
    def num_future(self):
        """Q, the horizon's patches."""
        return -(-self.horizon // self.patch)


class RolloutForecaster(SkipPathForecaster):
    r"""A forecaster whose temporal neurons roll their latents over the horizon.

    See the module docstring for the model. Inputs are look-back windows ``x`` of shape
    ``(B, L)`` (or chunks ``(B, T, L)``, read as B T windows); targets ``y`` are ``(B, H)`` (or
    ``(B, T, H)``). Sites: ``"layers.0.z"`` (look-back latents, batch ``(B, U)``, event
    ``(1, P)``) and ``"rollout.z"`` (horizon latents, event ``(1, Q)``), each with
    ``(K, 1)`` in front with K training draws.

    :param RolloutConfig config: the configuration (or pass its fields as keywords).

    >>> from vdn_pyro import LocalELBO
    >>> net = RolloutForecaster(lookback=48, horizon=12, patch=6, units=4, features=8, kernel_size=5)
    >>> x, y = torch.randn(5, 48), torch.randn(5, 12)
    >>> loss = LocalELBO().differentiable_loss(net.model, net.guide, x, y)
    >>> net.predict(x, num_samples=10).samples.shape  # 10 joint sample paths per window
    torch.Size([10, 5, 12])
    """

    def __init__(self, config=None, **options):
        super().__init__()
        if config is None:
            config = RolloutConfig(**options)
        elif options:
            config = dataclasses.replace(config, **options)
        if not isinstance(config, RolloutConfig):
            raise TypeError(f"Expected a RolloutConfig, but got {type(config).__name__}.")
        self.config = c = config
        self.trunk = DLinearTrunk(c.lookback, c.features, c.kernel_size, c.instance_norm)
        self.patch_map = nn.Linear(c.patch, c.features)  # (patch -> F), shared by the patches
        self.position = nn.Parameter(torch.zeros(c.num_patches, c.features))  # (P, F)
        self.act = make_activation(c.activation)
        self.skip = DLinearTrunk(c.lookback, c.horizon, c.kernel_size, c.skip_norm) if c.skip else None
        if c.prior == "ar":
            learn = c.learn_prior
            prior = ARPrior(
                c.units,
                1,
                phi=c.phi,
                phi_range=c.phi_range,
                learn_phi=learn,
                learn_constant=learn,
                learn_scale=learn,
            )
        else:  # i.i.d. Normal per patch: AR(1) with phi fixed at 0
            learn = c.learn_prior
            prior = ARPrior(
                c.units, 1, phi=0.0, scale=1.0, learn_phi=False, learn_constant=learn, learn_scale=learn
            )
        layer = Neurons(
            c.features,
            c.units,
            prior=prior,
            beta=c.betas,
            temporal=True,
            posterior=c.posterior if c.posterior == "path" else "diagonal",
            scale_mode=c.scale_mode,
            scale_min=c.scale_min,
            scale_max=c.scale_max,
            init_scale=c.init_scale,
            deterministic=c.deterministic,
        )
        self.layers = PyroModule[nn.ModuleList]([layer])
        steps = c.num_future * c.patch
        self.loc_weight = self.loc_bias = None
        if c.mean != "skip":
            self.loc_weight = nn.Parameter(torch.randn(c.num_future, c.patch, c.units) / math.sqrt(c.units))
        if c.mean == "head":
            self.loc_bias = nn.Parameter(torch.zeros(steps))  # (Q patch,)
        if c.likelihood_scale == "heteroscedastic":
            self.scale_weight = nn.Parameter(torch.randn(c.num_future, c.patch, c.units) / math.sqrt(c.units))
        else:
            self.scale_weight = None
        init = _inv_softplus(torch.tensor(0.5 - c.likelihood_scale_min))
        self.scale_bias = nn.Parameter(init.expand(steps).clone())  # (Q patch,)
        self.target_map = self.target_position = self.target_mix = self.target_head = None
        if self.amortized:  # the guide's innovations of the roll-out read the target
            self.target_map = nn.Linear(c.patch, c.features)  # (patch -> F), shared by the patches
            self.target_position = nn.Parameter(torch.zeros(c.num_future, c.features))  # (Q, F)
            self.target_mix = nn.Parameter(torch.eye(c.num_future))  # (Q, Q): context across patches
            self.target_head = nn.Linear(c.features, 3 * c.units)  # (F -> U offsets, scales, transitions)
            with torch.no_grad():  # q starts as the prior: a = 0, b = 1, d = 0
                self.target_head.weight.zero_()
                self.target_head.bias[: c.units].zero_()
                unit_scale = _inv_softplus(torch.tensor(1.0 - INNOVATION_SCALE_MIN))
                self.target_head.bias[c.units : 2 * c.units].fill_(unit_scale)
                self.target_head.bias[2 * c.units :].zero_()
            self.register_buffer("horizon_beta", c.horizon_betas.clone())  # (U,)

    # ------------------------------------------------------------------ checks
    def check_inputs(self, x, y=None, *, check_finite=True):
        """Raise ``TypeError``/``ValueError`` before any computation if ``x``/``y`` are unusable.

        :param torch.Tensor x: ``(B, L)`` or ``(B, T, L)``.
        :param y: ``None`` or ``(B, H)`` / ``(B, T, H)``.
        :param bool check_finite: also scan for NaN/inf.
        :raises TypeError: if ``x``/``y`` do not have the dtype of the network's parameters (the
            network never casts its inputs).
        """
        c, dtype = self.config, self._parameters["position"].dtype
        check_forecast_inputs(x, y, c.lookback, c.horizon, check_finite, dtype=dtype)

    @property
    def amortized(self):
        """Whether training draws the horizon's innovations from an amortized posterior that
        reads the target (``horizon_posterior="amortized"``; never in the twin)."""
        return self.config.horizon_posterior == "amortized" and not self.config.deterministic

    @property
    def exact(self):
        """Whether an observed path is scored by the exact Gaussian predictive, the horizon's
        latents integrated out (``horizon_posterior="exact"``; never in the twin)."""
        return self.config.horizon_posterior == "exact" and not self.config.deterministic

    @property
    def exact_mixture(self):
        """Whether an observed path is scored by the mixture over draws of :math:`z_P` of exact
        Gaussian paths (``horizon_posterior="exact_mixture"``; never in the twin)."""
        return self.config.horizon_posterior == "exact_mixture" and not self.config.deterministic

    @property
    def integrated(self):
        """Whether the horizon's innovations are integrated out when the path is observed
        (:attr:`exact` or :attr:`exact_mixture`): the scale then multiplies the whole deviation
        from the mean path (:meth:`components`)."""
        return self.exact or self.exact_mixture

    @property
    def rollout_site(self):
        """The site of the horizon's latents: ``"rollout.z"``, under the network's own path."""
        path = self._pyro_name
        return f"{path}.rollout.z" if path else "rollout.z"

    @property
    def prior(self):
        """The units' :class:`~vdn_pyro.models.ARPrior` (phi fixed at 0 for ``prior="normal"``)."""
        return self.layers[0].prior

    def half_life(self):
        """Each unit's memory in time steps, ``(U,)``: the prior's half-life in patches times the
        patch length (infinite-like for phi near 1, 0-like for ``prior="normal"``)."""
        return self.prior.half_life * self.config.patch

    def init_skip(self, source, freeze=True, start_at_source=False):
        """Copy a fitted DLinear into the skip path (and freeze it), as
        :meth:`~vdn_pyro.models.Forecaster.init_skip` does.

        :param source: a :class:`~vdn_pyro.models.DLinear` (or its ``DLinearTrunk``) with the
            same look-back, horizon, kernel size and instance normalisation as the skip path.
        :param bool freeze: stop training the skip path.
        :param bool start_at_source: zero the decoder's loadings on the latents (and its mean
            bias) and set the scale bias to the source's calibrated ``scale``: the forecaster
            then starts as exactly the source's Gaussian predictive. With
            ``horizon_posterior="exact"`` or ``"exact_mixture"`` the mean's loadings are shrunk to
            :data:`EXACT_START` of their initial values instead of zeroed: the exact likelihood's
            gradient in them is linear in them, so zero loadings are a stationary point it never
            leaves (the K-draw mixture leaves it through its Monte Carlo noise).
        :raises ValueError: without a skip path, or if the shapes differ.
        """
        self._load_skip(source, freeze)
        if start_at_source:
            with torch.no_grad():
                for param in (self.loc_weight, self.scale_weight):
                    if param is not None:
                        param.mul_(EXACT_START if self.integrated and param is self.loc_weight else 0.0)
                if self.loc_bias is not None:
                    self.loc_bias.zero_()
                scale = getattr(source, "scale", None)
                if scale is not None:
                    h = self.config.horizon
                    raw = _inv_softplus((scale - self.config.likelihood_scale_min).clamp_min(1e-6))  # (H,)
                    self.scale_bias[:h].copy_(raw)

    # ----------------------------------------------------------------- pieces
    def features(self, x):
        """Patch features read by the posterior.

        :param x: windows ``(B, L)``. :returns: ``(B, P, F)``.
        """
        c = self.config
        off = self.trunk.offset(x)
        rel = x if off is None else x - off  # (B, L)
        patches = rel[..., c.lookback - c.num_patches * c.patch :]  # (B, P patch)
        patches = patches.reshape(patches.shape[:-1] + (c.num_patches, c.patch))  # (B, P, patch)
        summary = self.trunk(x).unsqueeze(-2)  # (B, 1, F)
        return self.act(self.patch_map(patches) + self.position + summary)  # (B, P, F)

    def posterior(self, x, features=None):
        """Marginal posterior of the look-back latents.

        :param x: ``(B, L)``.
        :param features: :meth:`features` of ``x`` when already computed, ``(B, P, F)``.
        :returns: ``(loc, scale)``, each ``(B, U, 1, P)``.
        """
        head = self.layers[0].posterior
        return head.moments(*head(self.features(x) if features is None else features, True))

    def rollout_dist(self, last, innovations=None):
        r"""Each unit's AR conditional of the horizon's latents given the last look-back latent:
        a :class:`~vdn_pyro.distributions.GaussMarkov` chain with transition :math:`\phi`, offset
        :math:`(c + \phi z_P, c, \dots, c)` and scale :math:`s`. With ``innovations`` =
        :math:`(a, b, d)` (the amortized posterior, :meth:`innovation_posterior`) the chain has
        transitions :math:`\phi + d_j`, offsets :math:`c + s a_j` (plus :math:`(\phi + d_1) z_P`
        at the first patch) and scales :math:`s b_j`.

        :param torch.Tensor last: :math:`z_P`, ``(..., B, U, 1)``.
        :param innovations: ``None`` or ``(loc, scale, turn)``, each ``(B, U, Q)``.
        :returns: a distribution with batch ``(..., B, U)`` and event ``(1, Q)``.
        """
        prior, steps = self.prior, self.config.num_future
        phi = prior.phi[:, :1]  # (U, 1)
        const = prior.constant[:, None]  # (U, 1)
        first = const + phi * last  # (..., B, U, 1)
        offset = torch.cat([first, const.expand(last.shape[:-1] + (steps - 1,))], -1)  # (..., B, U, Q)
        transition = phi[:, :, None].expand(phi.shape[0], 1, steps)  # (U, 1, Q)
        scale = prior.scale[:, None, None].expand(transition.shape)  # (U, 1, Q)
        if innovations is not None:
            loc, spread, turn = innovations  # (B, U, Q) each
            transition = transition + turn.unsqueeze(-2)  # (B, U, 1, Q)
            start = torch.nn.functional.pad(turn[..., :1] * last, (0, steps - 1))  # (..., B, U, Q)
            offset = offset + start  # the first step's z_P term: (phi + d_1) z_P
            offset = offset + prior.scale[:, None] * loc  # (..., B, U, Q)
            scale = (prior.scale[:, None] * spread).unsqueeze(-2)  # (B, U, 1, Q)
        chain = GaussMarkov(transition, offset.unsqueeze(-2), scale)  # batch (..., B, U, 1), event (Q,)
        return chain.to_event(1)  # batch (..., B, U), event (1, Q)

    def innovation_posterior(self, x, y):
        r"""The amortized posterior of the horizon's latents given the target
        (``horizon_posterior="amortized"``): per unit i and horizon patch j, the offset
        :math:`a_{ij}` and scale :math:`b_{ij}` of the chain's innovation and the shift
        :math:`d_{ij}` of its transition (see :meth:`rollout_dist`). It reads the target's
        residual from the forecast offset (the skip path), cut into the horizon's Q patches: a
        linear map of each patch, a learned position and the look-back's summary, mixed across
        the patches (a latent at patch j moves every later patch, so its posterior reads them all).

        :param torch.Tensor x: ``(B, L)``. :param torch.Tensor y: ``(B, H)``.
        :returns: ``(loc, scale, turn)``, each ``(B, U, Q)``.
        :raises ValueError: if the network has no amortized horizon posterior.
        """
        if not self.amortized:
            raise ValueError(
                "innovation_posterior needs a distributional network with horizon_posterior='amortized', "
                f"but this one has horizon_posterior={self.config.horizon_posterior!r} and "
                f"deterministic={self.config.deterministic!r}."
            )
        c = self.config
        off = self.offset(x)  # (B, H or 1) or None
        resid = y if off is None else y - off  # (B, H)
        resid = torch.nn.functional.pad(resid, (0, c.num_future * c.patch - c.horizon))  # (B, Q patch)
        resid = resid.reshape(resid.shape[:-1] + (c.num_future, c.patch))  # (B, Q, patch)
        summary = self.trunk(x).unsqueeze(-2)  # (B, 1, F)
        feats = self.act(self.target_map(resid) + self.target_position + summary)  # (B, Q, F)
        feats = torch.einsum("jk,...kf->...jf", self.target_mix, feats)  # (B, Q, F)
        loc, raw, turn = self.target_head(feats).chunk(3, -1)  # (B, Q, U) each
        scale = softplus(raw) + INNOVATION_SCALE_MIN  # (B, Q, U)
        return loc.transpose(-1, -2), scale.transpose(-1, -2), turn.transpose(-1, -2)  # (B, U, Q) each

    def rollout_mean(self, x, features=None):
        r"""The rolled latents' mean under the posterior, :math:`m(x)`: the AR roll-out of the
        posterior mean :math:`\mu_P(x)` of the last look-back latent (``mean="centred"`` reads
        the deviation from it).

        :param torch.Tensor x: ``(B, L)``.
        :param features: :meth:`features` of ``x`` when already computed, ``(B, P, F)``.
        :returns: pooled latents ``(B, Q, U)``.
        """
        loc, _ = self.posterior(x, features)  # (B, U, 1, P)
        return self._conditional_mean(loc[..., -1:].squeeze(-1))  # (B, Q, U)

    def _conditional_mean(self, last):
        """The roll-out's conditional mean given :math:`z_P` ``(..., B, U, 1)``: ``(..., B, Q, U)``."""
        return self.layers[0].pool(self.rollout_dist(last).base_dist.mean, True)

    def _rollout(self, last, draws, x=None, y=None):
        """Sample (or, in the twin and in ``"mean"`` mode, average) the horizon's latents.

        :param last: ``(..., B, U, 1)``.
        :param x: ``(B, L)`` and :param y: ``(B, H)`` or ``None``: with an observed target and
            ``horizon_posterior="amortized"`` the guide draws the site from
            :meth:`innovation_posterior`.
        :returns: pooled latents ``(..., B, Q, U)``.
        """
        mode = current_neuron_mode()
        layer = self.layers[0]
        if self.deterministic or mode == "mean":  # the conditional mean, no site
            chain = self.rollout_dist(last).base_dist
            mean = chain.mean  # (..., B, U, 1, Q)
            record_posterior(self.rollout_site, mean, chain.variance.sqrt(), self)
            return layer.pool(mean, True)  # (..., B, Q, U)
        if self.amortized and y is not None:
            # the model's site is the AR conditional, the guide's the amortized posterior; the
            # KL between the two chains is closed form (registered for GaussMarkov pairs)
            innovations = self.innovation_posterior(x, y) if mode == "guide" else None  # (B, U, Q) x 3
            fn = self.rollout_dist(last, innovations)
            beta, same_law = self.horizon_beta, False
        else:  # model and guide: the same conditional, so log q - log p = 0 for every draw
            fn = self.rollout_dist(last)
            beta, same_law = layer.beta, True
        if draws == 1:
            site = neurons(self.rollout_site, fn, beta, report=False, same_law=same_law)  # (..., B, U, 1, Q)
            return layer.pool(site, True)  # (..., B, Q, U)
        with pyro.plate(f"{self.rollout_site}.draws", draws, dim=-4):
            site = neurons(self.rollout_site, fn, beta / draws, report=False, same_law=same_law)
            # site: (K, 1, B, U, 1, Q)
            return layer.pool(site, True)  # (K, 1, B, Q, U)

    def components(self, x, z, expand=True, centre=None, at=None):
        r"""Per-draw Gaussian parameters of each horizon step.

        With ``horizon_posterior="exact"`` the scale :math:`\sigma(x)` reads the rolled latents'
        mean :math:`m(x)` and sets the units of the whole deviation from the mean path,
        :math:`y = \mu(m) + \sigma(x) \odot (\mu(z) - \mu(m) + \varepsilon)`, so the paths'
        spread follows the window's volatility as the noise does. With ``"exact_mixture"`` the
        same, with the scale read at ``at``: the roll-out's conditional mean given the draw's
        :math:`z_P`.

        :param x: ``(B, L)``.
        :param z: the horizon's pooled latents ``(..., B, Q, U)``.
        :param bool expand: expand the scale to ``loc``'s shape (else it may be ``(H,)``).
        :param centre: :meth:`rollout_mean` of ``x``, ``(B, Q, U)`` (computed when needed and
            ``None``; read by ``mean="centred"`` and ``horizon_posterior="exact"``).
        :param at: under ``"exact_mixture"``, the latents the scale reads, broadcastable to ``z``:
            each draw's conditional roll-out mean given its :math:`z_P` (default ``z`` itself).
        :returns: ``(loc, scale)``, each ``(..., B, H)``.
        """
        c = self.config
        h = c.horizon
        if centre is None and (c.mean == "centred" or self.integrated):
            centre = self.rollout_mean(x)  # (B, Q, U)
        off = self.offset(x)  # (B, H or 1) or None
        loc = self._decoder_mean(z, centre, off)  # (..., B, H)
        if self.exact:  # the latents the scale reads
            at = centre
        elif not self.exact_mixture or at is None:
            at = z
        if self.scale_weight is not None:
            raw = torch.einsum("...qu,qpu->...qp", at, self.scale_weight)  # (..., B, Q, patch)
            raw = raw.flatten(-2)[..., :h] + self.scale_bias[:h]  # (..., B, H)
        else:
            raw = self.scale_bias[:h]  # (H,)
        scale = softplus(raw) + c.likelihood_scale_min
        if self.integrated:
            middle = self._decoder_mean(centre, centre, off)  # (B, H)
            loc = middle + scale * (loc - middle)  # (..., B, H)
        if expand:
            scale = scale.expand_as(loc)
        return loc, scale

    def _decoder_mean(self, z, centre, off):
        """The decoder's mean at the latents ``z`` ``(..., B, Q, U)``, given the rolled latents'
        mean ``centre`` ``(B, Q, U)`` and the skip path's ``off`` (:meth:`offset`): ``(..., B, H)``."""
        c = self.config
        h = c.horizon
        if self.loc_weight is None:
            return off.expand(z.shape[:-2] + (h,))  # (..., B, H)
        if c.mean == "centred":
            loc = torch.einsum("...qu,qpu->...qp", z - centre, self.loc_weight)  # (..., B, Q, patch)
            loc = loc.flatten(-2)[..., :h]  # (..., B, H)
        else:
            loc = torch.einsum("...qu,qpu->...qp", z, self.loc_weight)  # (..., B, Q, patch)
            loc = loc.flatten(-2)[..., :h] + self.loc_bias[:h]  # (..., B, H)
        return loc if off is None else loc + off

    def exact_predictive(self, x, features=None):
        r"""The forecast's exact predictive when the likelihood scale does not read the rolled
        latents (``horizon_posterior="exact"``): the decoder's mean is affine in them and they are
        Gaussian given x, so the path is Gaussian,

        .. math:: y_{1:H} \mid x \sim \mathcal{N}\big(\mu(x),\; D_\sigma \big(\textstyle\sum_i
                  w_i \Gamma_i(x) w_i^\top + I\big) D_\sigma\big), \qquad D_\sigma =
                  \mathrm{diag}\,\sigma(x),

        with :math:`w_i \in \mathbb{R}^H` unit i's loadings (each step reads its patch's latent),
        :math:`\Gamma_i(x)` the covariance of its rolled latents over the Q patches,

        .. math:: \Gamma_{i,jk} = \phi_i^{j+k} \tau_i(x)^2 + s_i^2 \sum_{l=1}^{\min(j,k)}
                  \phi_i^{j+k-2l},

        (:math:`\tau_i(x)` the posterior scale of :math:`z_P`, :math:`s_i` the prior's innovation
        scale) and :math:`\mu(x)`, :math:`\sigma(x)` the decoder's mean and scale at the rolled
        latents' mean :math:`m(x)`. It is the limit of the K-draw path mixture as K grows, and
        its density is computed exactly by a Kalman filter over the patches
        (:class:`~vdn_pyro.state_space.PatchStateSpace`).

        :param torch.Tensor x: ``(B, L)``.
        :param features: :meth:`features` of ``x`` when already computed, ``(B, P, F)``.
        :returns: a :class:`~vdn_pyro.state_space.PatchStateSpace` with batch ``(B,)``, event ``(H,)``.
        :raises ValueError: if the network's likelihood is not the exact one.
        """
        if not self.exact:
            raise ValueError(
                "exact_predictive needs a distributional network with horizon_posterior='exact' (elsewhere "
                "the likelihood scale reads each draw of the rolled latents and the path is not Gaussian), "
                f"but this one has horizon_posterior={self.config.horizon_posterior!r} and "
                f"deterministic={self.config.deterministic!r}."
            )
        c = self.config
        h = c.horizon
        loc_p, scale_p = self.posterior(x, features)  # (B, U, 1, P) each
        centre = self._conditional_mean(loc_p[..., -1:].squeeze(-1))  # (B, Q, U)
        loc, sigma = self.components(x, centre, centre=centre)  # (B, H) each
        prior = self.prior
        phi, innovation = prior.phi[:, 0], prior.scale  # (U,) each
        if self.loc_weight is None:  # the latents move no mean: independent steps
            weight = loc.new_zeros(h, c.units)  # (H, U)
        else:
            weight = self.loc_weight.reshape(c.num_future * c.patch, c.units)[:h]  # (H, U)
        tau = scale_p[..., 0, -1]  # (B, U): posterior scale of z_P
        start = (phi * phi * tau * tau + innovation * innovation).sqrt()  # (B, U): first patch's spread
        # the scale sets the units of the whole deviation: loadings sigma_h w_h, noise sigma_h
        return PatchStateSpace(loc, sigma.unsqueeze(-1) * weight, c.patch, phi, innovation, start, sigma)

    def mixture_predictive(self, x, last, features=None):
        r"""The forecast's predictive under ``horizon_posterior="exact_mixture"``, given K draws of
        the last look-back latent: an equal-weight mixture of K Gaussian paths,

        .. math:: y_{1:H} \mid x, z_P^{(k)} \sim \mathcal{N}\big(\mu(m) + \sigma_k \odot
                  (\mu(m_k) - \mu(m)),\; D_{\sigma_k} \big(\textstyle\sum_i w_i \Gamma_i
                  w_i^\top + I\big) D_{\sigma_k}\big),

        with :math:`m_k` the roll-out's conditional mean given :math:`z_P^{(k)}`, :math:`m(x)`
        its mean under the posterior, :math:`\sigma_k` the scale read at :math:`m_k`, and
        :math:`\Gamma_i` the covariance of unit i's rolled latents given :math:`z_P` (its AR
        innovations only, the same for every window). All K components of every window share one
        Kalman filter (:class:`~vdn_pyro.state_space.ScaledStateSpaceMixture`); as K grows with a
        scale that does not read the latents it tends to :meth:`exact_predictive`.

        :param torch.Tensor x: ``(B, L)``.
        :param torch.Tensor last: K draws of :math:`z_P`, ``(K, ..., B, U, 1)``.
        :param features: :meth:`features` of ``x`` when already computed, ``(B, P, F)``.
        :returns: a :class:`~vdn_pyro.state_space.ScaledStateSpaceMixture` with batch
            ``(..., B)``, event ``(H,)``.
        :raises ValueError: if the network's likelihood is not this one.
        """
        if not self.exact_mixture:
            raise ValueError(
                "mixture_predictive needs a distributional network with horizon_posterior='exact_mixture', "
                f"but this one has horizon_posterior={self.config.horizon_posterior!r} and "
                f"deterministic={self.config.deterministic!r}."
            )
        c = self.config
        h = c.horizon
        centre = self.rollout_mean(x, features)  # (B, Q, U)
        given = self._conditional_mean(last)  # (K, ..., B, Q, U)
        loc, sigma = self.components(x, given, centre=centre, at=given)  # (K, ..., B, H) each
        if self.loc_weight is None:  # the latents move no mean: independent steps
            weight = loc.new_zeros(h, c.units)  # (H, U)
        else:
            weight = self.loc_weight.reshape(c.num_future * c.patch, c.units)[:h]  # (H, U)
        prior = self.prior
        phi, innovation = prior.phi[:, 0], prior.scale  # (U,) each
        base = PatchStateSpace(
            loc.new_zeros(h), weight, c.patch, phi, innovation, innovation, loc.new_ones(h)
        )
        return ScaledStateSpaceMixture(loc, sigma, base)

    def _obs_dist(self, x, z, draws, centre=None, at=None):
        """Likelihood of the horizon: batch ``(..., B, 1)``, event ``(H,)``."""
        # loc (..., B, H); the scale broadcasts with it
        loc, scale = self.components(x, z, expand=False, centre=centre, at=at)
        loc = loc.unsqueeze(-2)  # (..., B, 1, H)
        scale = scale.unsqueeze(-2) if scale.dim() > 1 else scale  # (..., B, 1, H) or (H,)
        if draws == 1:
            return dist.Normal(loc, scale.expand_as(loc)).to_event(1)
        if self.amortized:  # K draws of the amortized posterior, averaged in the ELBO: no mixture
            return DrawAverage(loc, scale)
        if self.config.mixture == "path":
            return PathMixture(loc, scale)  # K draws mixed per path
        return DrawMixture(loc, scale).to_event(1)  # K draws mixed per element

    @staticmethod
    def _flat(x, y=None):
        """Chunks ``(B, T, L)`` as windows ``(B T, L)``."""
        if x.dim() == 3:
            x = x.flatten(0, 1)  # (B T, L)
            y = None if y is None else y.flatten(0, 1)  # (B T, H)
        return x, y

    # ------------------------------------------------------------- the model
    def forward(self, x, y=None, *, num_data=None, draws=None):
        """The model: the look-back latents' AR prior (posterior when run as the guide), their
        roll-out over the horizon, the skip path, the decoder and the likelihood.

        :param torch.Tensor x: ``(B, L)`` or ``(B, T, L)``.
        :param y: ``(B, H)`` / ``(B, T, H)`` or ``None`` (sample them).
        :param int num_data: full data-set size N when ``x`` is a minibatch (scales by N/B).
        :param int draws: draws K mixed in the likelihood (default: ``train_draws`` when ``y``
            is given, else 1).
        :returns: the observations ``(..., B, [T,] H)``; ``None`` when run as the guide.
        """
        self.check_inputs(x, y, check_finite=pyro.infer.is_validation_enabled())
        exact = self.exact
        if exact and self._draws(y, draws) > 1 and draws is not None:
            raise ValueError(
                "horizon_posterior='exact' integrates the horizon's latents out and mixes no draws: expected "
                f"draws=None or 1, but got {draws!r}."
            )
        draws = 1 if exact else self._draws(y, draws)
        lead = x.shape[:-1]  # (B,) or (B, T)
        per_item = x.shape[1] if x.dim() == 3 else 1
        x, y = self._flat(x, y)  # (B', L), (B', H)
        num_data = None if num_data is None else num_data * per_item
        with data_plate(x.shape[0], num_data, x.device):
            features = self.features(x)  # (B', P, F)
            past = self.layers[0](features, temporal=True, draws=draws)  # (.., B', P, U)
            if exact and y is not None:
                # the horizon's latents integrated out: no roll-out site, the exact predictive
                if current_neuron_mode() == "guide":
                    return None
                fn = self.exact_predictive(x, features)  # batch (B',), event (H,)
                loc, start, noise = (t.unsqueeze(-2) for t in (fn.loc, fn.start, fn.noise))  # (B', 1, .)
                loading = fn.loading.unsqueeze(-3)  # (B', 1, H, U)
                fn = PatchStateSpace(loc, loading, fn.patch, fn.phi, fn.innovation, start, noise)
                out = pyro.sample("obs", fn, obs=y.unsqueeze(-2))  # (B', 1, H)
                return out.squeeze(-2).reshape(lead + out.shape[-1:])  # (B, [T,] H)
            last = past[..., -1, :].unsqueeze(-1)  # (.., B', U, 1)
            if self.exact_mixture and y is not None:
                # the horizon's innovations integrated out given each of the K draws of z_P
                if current_neuron_mode() == "guide":
                    return None
                draws_last = last if draws > 1 else last[None]  # (K, 1, B', U, 1) or (1, B', U, 1)
                fn = self.mixture_predictive(x, draws_last, features)  # batch (.., B'), event (H,)
                fn = ScaledStateSpaceMixture(fn.loc.unsqueeze(-2), fn.scale.unsqueeze(-2), fn.base)
                out = pyro.sample("obs", fn, obs=y.unsqueeze(-2))  # (.., B', 1, H)
                return out.squeeze(-2).reshape(lead + out.shape[-1:])  # (B, [T,] H)
            future = self._rollout(last, draws, x, y)  # (.., B', Q, U)
            if current_neuron_mode() == "guide":  # the guide has no observation: it stops at the latents
                return None
            # mean="centred": the roll-out's posterior mean, from the features computed above
            needs_centre = self.config.mean == "centred" or self.integrated
            centre = self.rollout_mean(x, features) if needs_centre else None  # (B', Q, U)
            at = self._conditional_mean(last) if self.exact_mixture else None  # (.., B', Q, U)
            obs = None if y is None else y.unsqueeze(-2)  # (B', 1, H)
            out = pyro.sample("obs", self._obs_dist(x, future, draws, centre, at), obs=obs)
        out = out.squeeze(-2)  # (..., B', H)
        return out.reshape(out.shape[:-2] + lead + out.shape[-1:])  # (..., B, [T,] H)

    # -------------------------------------------------------------- prediction
    @torch.no_grad()
    def sample_latents(self, x, num_samples=1):
        """Draws of the horizon's latents from the guide's process: :math:`z_P` from its
        posterior marginal, then the AR roll-out.

        :param torch.Tensor x: ``(B, L)``.
        :param int num_samples: S.
        :returns: ``(last, future)``: ``(S, B, U)`` and ``(S, B, Q, U)`` (the twin: S = 1,
            posterior mean and conditional mean).
        """
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, but got {num_samples!r}.")
        last, _, future = self._sample_latents(x, num_samples)
        return last, future

    def _sample_latents(self, x, num_samples):
        """:meth:`sample_latents` and the roll-out's mean under the posterior: ``(last, centre,
        future)``, ``(S, B, U)``, ``(B, Q, U)`` and ``(S, B, Q, U)``."""
        loc, scale = self.posterior(x)  # (B, U, 1, P) each
        last = loc[..., -1:].squeeze(-1)[None]  # (1, B, U, 1)
        centre = self._conditional_mean(last[0])  # (B, Q, U)
        if self.deterministic:  # the posterior mean, rolled by the conditional mean
            return last.squeeze(-1), centre, centre[None]  # (1, B, U), (B, Q, U), (1, B, Q, U)
        eps = torch.randn((num_samples,) + last.shape[1:], dtype=loc.dtype, device=loc.device)
        last = last + scale[..., -1] * eps  # (S, B, U, 1)
        future = self.rollout_dist(last).sample()  # (S, B, U, 1, Q)
        return last.squeeze(-1), centre, self.layers[0].pool(future, True)  # (S, B, U), (S, B, Q, U)

    @torch.no_grad()
    def predict(self, x, num_samples=100, batch_size=None):
        r"""Monte Carlo predictive distribution with joint sample paths: each of the S draws
        takes one :math:`z_P` from its posterior, rolls it over the horizon and draws one path
        from the decoder's Gaussian. The twin returns one Gaussian component (independent steps)
        and S draws from it. The decoder's mean is affine in the rolled latents, so the
        predictive mean is exact (``point``: the decoder's mean at the latents' mean
        :math:`m(x)`; with ``mean="centred"`` the skip path), not the average of the S draws.

        :param torch.Tensor x: ``(B, L)`` or ``(B, T, L)``.
        :param int num_samples: S.
        :param int batch_size: windows per forward pass (default all).
        :returns: a :class:`~vdn_pyro.models.ForecastPrediction` with samples ``(S, B, [T,] H)``
            (joint paths over H) and components ``(S', B, [T,] H)``.
        """
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, but got {num_samples!r}.")
        self.check_inputs(x)
        lead = x.shape[:-1]
        x, _ = self._flat(x)  # (B', L)
        parts = x.split(batch_size) if batch_size else (x,)
        out = []
        for xb in parts:
            last, centre, future = self._sample_latents(xb, num_samples)  # (S', b, Q, U)
            # one decoder pass: the draws and, first, the latents' mean, where the (affine) decoder
            # mean is the exact predictive mean
            at = None
            if self.exact_mixture:  # each draw's scale reads its conditional roll-out mean
                given = self._conditional_mean(last.unsqueeze(-1))  # (S', b, Q, U)
                at = torch.cat([centre[None], given])  # (1 + S', b, Q, U)
            c_loc, c_scale = self.components(xb, torch.cat([centre[None], future]), centre=centre, at=at)
            point, c_loc, c_scale = c_loc[:1], c_loc[1:], c_scale[1:]  # (1, b, H), (S', b, H) x 2
            reps = num_samples // c_loc.shape[0]
            noise = torch.randn((reps,) + c_loc.shape, dtype=c_loc.dtype, device=c_loc.device)
            samples = (c_loc + c_scale * noise).reshape((num_samples,) + c_loc.shape[1:])  # (S, b, H)
            out.append((samples, c_loc, c_scale, point))
        samples, loc, scale, point = (torch.cat(t, 1) for t in zip(*out))  # (S | S' | 1, B', H)
        shape = lead + samples.shape[-1:]  # (B, [T,] H)
        return ForecastPrediction(
            samples.reshape(samples.shape[:1] + shape),
            loc.reshape(loc.shape[:1] + shape),
            scale.reshape(scale.shape[:1] + shape),
            point.reshape(shape),
        )

    @property
    def has_exact_marginal(self):
        """``False``: the predictive is scored from :meth:`predict`'s joint paths."""
        return False

    def extra_repr(self):
        c = self.config
        kind = "deterministic" if c.deterministic else "distributional"
        return (
            f"{kind}, L={c.lookback}, H={c.horizon}, patch={c.patch} (P={c.num_patches}, "
            f"Q={c.num_future}), units={c.units}, prior={c.prior}, posterior={c.posterior}, "
            f"mean={c.mean}, mixture={c.mixture}"
        )

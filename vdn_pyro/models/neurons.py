r"""``Neurons``: a layer of distributional neurons as one building block of a Pyro model.

A :class:`Neurons` layer owns everything that makes its H units distributional: each unit's prior
(:class:`~vdn_pyro.models.NormalPrior` or a learnable :class:`~vdn_pyro.models.ARPrior`), its
amortized posterior head (:class:`~vdn_pyro.guides.AmortizedNormal`), its KL coefficient
:math:`\beta_i` (a buffer, so constraints update it and checkpoints keep it), the latent dims k
and how they are pooled, and its site name.

The user writes the forward pass once. Inside a model, ``z = self.layer(h)``

- samples each unit's **prior** when the model runs (the default),
- samples each unit's **amortized posterior** q(z | h) when it runs as the guide
  (:class:`~vdn_pyro.guides.NeuronGuide` sets :func:`~vdn_pyro.primitives.neuron_mode`),
- passes on the posterior **mean** without a sample site in ``"mean"`` mode (diagnostics), and
  always in the deterministic twin (``deterministic=True``: z = loc, no KL),
- samples its posterior **and** hands over its prior when :class:`~vdn_pyro.inference.LocalELBO`
  evaluates model and guide in one pass (a model whose guide is its own
  :class:`~vdn_pyro.guides.NeuronGuide`),

as one sample site with the units as a plate (dim -1) and per-unit ``poutine.scale(beta)`` on
both sides (:func:`~vdn_pyro.primitives.neurons`). The layer returns what its units pass on,
pooled over k: ``(..., B, H)``, or ``(..., B, T, H)`` for a temporal layer, whose units carry a
latent over the T steps of the input's time axis under their prior over time (the AR prior).

The site name is ``"<path>.z"``, where ``<path>`` is the layer's place in the tree of
:class:`~pyro.nn.PyroModule` s (``self.z = Neurons(...)`` gives ``"z.z"``; the second layer of a
``PyroModule[nn.ModuleList]`` called ``layers`` gives ``"layers.1.z"``), unless ``name`` is given.
"""

import math
import numbers

import pyro
import torch
from pyro.nn import PyroModule

from vdn_pyro.guides.amortized import AmortizedNormal
from vdn_pyro.guides.path import PathPosterior
from vdn_pyro.models.priors import ARPrior, NormalPrior
from vdn_pyro.primitives import (
    _SINGLE,
    _layer_mode,
    _module_params_active,
    _record_prior,
    as_beta,
    neurons,
    record_posterior,
)

__all__ = ["POOLINGS", "Neurons", "TemporalNeurons", "find_neurons", "neuron_sites"]

#: How a unit's k latent dims are pooled into what it passes on.
POOLINGS = ("mean", "sum", "sqrt")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected {name} to be an int >= 1, but got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"Expected {name} >= 1, but got {value}.")


def _make_prior(prior, units, latent_dim):
    if prior is None or prior == "normal":
        return NormalPrior(units, latent_dim)
    if prior == "ar":
        return ARPrior(units, 1, latent_dim)
    if isinstance(prior, (NormalPrior, ARPrior)):
        if (prior.units, prior.latent_dim) != (units, latent_dim):
            raise ValueError(
                f"Expected a prior for {units} units with latent_dim={latent_dim}, but got one for "
                f"{prior.units} units with latent_dim={prior.latent_dim}; build it as "
                f"{type(prior).__name__}({units}, latent_dim={latent_dim}, ...)."
            )
        return prior
    if isinstance(prior, torch.nn.Module) and hasattr(prior, "units") and callable(prior):
        return prior
    raise TypeError(
        "Expected prior to be None, 'normal', 'ar', or a prior module such as NormalPrior(H) or "
        f"ARPrior(H, order), but got {type(prior).__name__} {prior!r}."
    )


class Neurons(PyroModule):
    r"""A layer of H distributional neurons: one Pyro sample site with the units as a plate.

    :param int in_features: width F of the features ``h`` the posterior heads read.
    :param int units: number of neurons H.
    :param prior: ``None`` or ``"normal"`` (a fixed standard Normal per unit), ``"ar"`` (a learnable
        AR(1) per unit), or a prior module (:class:`~vdn_pyro.models.NormalPrior`,
        :class:`~vdn_pyro.models.ARPrior`) for H units and k latent dims.
    :param beta: KL coefficient per unit: a positive number or a tensor of shape ``(H,)``.
    :param int latent_dim: latent dims k per neuron.
    :param str pooling: how the k dims are pooled into what a neuron passes on: ``"mean"``,
        ``"sum"`` or ``"sqrt"`` (sum / sqrt(k)).
    :param bool temporal: the input has a time axis, ``h`` of shape ``(..., B, T, F)``, and each
        unit's latent runs over its T steps (under the prior over time). Can be overridden per call.
    :param str scale_mode: posterior scale ``"unit"`` or ``"input"`` (see
        :class:`~vdn_pyro.guides.AmortizedNormal`).
    :param float scale_min: posterior scale lower clamp.
    :param float scale_max: posterior scale upper clamp.
    :param float init_scale: initial posterior scale.
    :param posterior: ``"diagonal"`` (default: an :class:`~vdn_pyro.guides.AmortizedNormal`,
        independent over steps), ``"path"`` (temporal layers: a
        :class:`~vdn_pyro.guides.PathPosterior`, a Gauss-Markov chain over the T steps read from
        bidirectional context, whose KL against the AR prior is analytic), or a ready head of
        either kind for H units and k dims.
    :param bool deterministic: the twin: pass on the posterior loc, no sample site, no KL.
    :param str name: the site name (default ``"<path>.z"`` from the module tree).

    >>> import pyro
    >>> from vdn_pyro.primitives import data_plate
    >>> layer = Neurons(8, 4, prior="ar", beta=0.1)
    >>> h = torch.randn(5, 8)
    >>> with data_plate(5):
    ...     z = layer(h)                       # the model side: a draw of each unit's prior
    >>> z.shape
    torch.Size([5, 4])
    """

    def __init__(
        self,
        in_features,
        units,
        *,
        prior=None,
        beta=1.0,
        latent_dim=1,
        pooling="mean",
        temporal=False,
        scale_mode="unit",
        scale_min=1e-3,
        scale_max=10.0,
        init_scale=0.5,
        posterior=None,
        deterministic=False,
        name=None,
    ):
        super().__init__()
        _check_int("units", units)
        _check_int("latent_dim", latent_dim)
        if pooling not in POOLINGS:
            raise ValueError(f"Expected pooling in {POOLINGS}, but got {pooling!r}.")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"Expected name to be None or a non-empty str, but got {name!r}.")
        self.units, self.latent_dim, self.pooling = units, latent_dim, pooling
        self.temporal, self.deterministic, self.name = bool(temporal), bool(deterministic), name
        self.prior = _make_prior(prior, units, latent_dim)
        if posterior is None or posterior == "diagonal":
            _check_int("in_features", in_features)
            posterior = AmortizedNormal(
                in_features, units, latent_dim, scale_mode, scale_min, scale_max, init_scale
            )
        elif posterior == "path":
            if not temporal:
                raise ValueError(
                    "posterior='path' is a Gauss-Markov posterior over a time axis; build the layer "
                    "with temporal=True (or use TemporalNeurons)."
                )
            _check_int("in_features", in_features)
            posterior = PathPosterior(
                in_features,
                units,
                latent_dim,
                scale_min=scale_min,
                scale_max=scale_max,
                init_scale=init_scale,
            )
        elif not isinstance(posterior, (AmortizedNormal, PathPosterior)) or (
            posterior.units,
            posterior.latent_dim,
        ) != (units, latent_dim):
            raise ValueError(
                "Expected posterior to be 'diagonal', 'path', or an AmortizedNormal/PathPosterior for "
                f"{units} units and latent_dim={latent_dim}, but got {posterior!r}."
            )
        self.posterior = posterior
        self.in_features = posterior.in_features
        self.register_buffer("beta", as_beta(beta, units, name="beta"))

    # ------------------------------------------------------------------ naming
    @property
    def site(self):
        """The sample site name: ``name`` if given, else ``"<path>.z"``."""
        if self.name is not None:
            return self.name
        path = self._pyro_name
        return f"{path}.z" if path else "z"

    def owns(self, site):
        """Whether ``site`` is this layer's site (or one of its per-step sites ``"<site>.<t>"``)."""
        mine = self.site
        return site == mine or (site.startswith(mine + ".") and site[len(mine) + 1 :].isdigit())

    # ---------------------------------------------------------------- pieces
    def pool(self, z, temporal=None):
        """Pool the k latent dims of what the layer passes on.

        :param z: ``(..., B, H, k)`` or, if temporal, ``(..., B, H, k, T)``.
        :returns: ``(..., B, H)`` or ``(..., B, T, H)``.
        """
        temporal = self.temporal if temporal is None else temporal
        if self.latent_dim == 1:  # every pooling is the identity: a view, no copy
            out = z.squeeze(-2 if temporal else -1)  # (..., B, H[, T])
            return out.transpose(-1, -2) if temporal else out  # (..., B, [T,] H)
        out = z.sum(-2 if temporal else -1)  # (..., B, H[, T])
        if self.pooling == "mean":
            out = out / self.latent_dim
        elif self.pooling == "sqrt":
            out = out / math.sqrt(self.latent_dim)
        return out.transpose(-1, -2) if temporal else out  # (..., B, [T,] H)

    def _check_features(self, h, temporal):
        if not torch.is_tensor(h):
            raise TypeError(
                f"Neurons '{self.site}': expected the features h to be a torch.Tensor, but got "
                f"{type(h).__name__}."
            )
        need = 3 if temporal else 2
        if h.dim() < need or h.shape[-1] != self.in_features:
            shape = f"(..., B, T, {self.in_features})" if temporal else f"(..., B, {self.in_features})"
            raise ValueError(
                f"Neurons '{self.site}': expected features of shape {shape}, but got "
                f"{tuple(h.shape)}. The layer was built with in_features={self.in_features}"
                f"{' and a time axis' if temporal else ''}."
            )

    def prior_dist(self, batch_shape, num_steps=None):
        """Each unit's prior: batch ``batch_shape + (H,)``, event ``(k,)`` or ``(k, T)``."""
        return self.prior(tuple(batch_shape), num_steps)

    def posterior_dist(self, h, temporal=None):
        """Each unit's posterior: batch ``(..., B, H)``, event ``(k,)`` or ``(k, T)``."""
        temporal = self.temporal if temporal is None else temporal
        return self.posterior.dist(h, temporal)

    # ---------------------------------------------------------------- forward
    def forward(self, h, *, temporal=None, draws=1, step=None, prior=None, posterior=None):
        """Sample the layer (prior in the model, posterior in the guide) and pass it on.

        :param torch.Tensor h: features ``(..., B, F)``, or ``(..., B, T, F)`` if temporal. Not
            read (nor checked) where the call's ``prior`` (model) or ``posterior`` (guide, mean)
            gives the layer all it needs.
        :param bool temporal: override the layer's ``temporal`` for this call.
        :param int draws: K independent draws per observation, batch ``(K, 1, ..., B, H)``, each
            with KL weight beta / K (the forecaster's mixture likelihood), under a plate
            ``"<site>.draws"``.
        :param int step: for a layer called once per time step, the step index t; the site is
            then ``"<site>.<t>"``.
        :param prior: this call's prior, a distribution with batch ``(..., B, H)`` (a conditional
            prior, e.g. one that reads the previous step); default: the layer's prior module.
        :param posterior: this call's posterior parameters in the head's parametrisation
            (``(loc, scale)`` for the diagonal head, each ``(..., B, H, k[, T])``; e.g. a residual
            around a conditional prior); default: the layer's amortized head on ``h``.
        :returns: ``(..., B, H)`` or ``(..., B, T, H)`` (``(K, 1, ...)`` in front with draws).
        """
        temporal = self.temporal if temporal is None else bool(temporal)
        mode = _layer_mode()
        deterministic = self.deterministic
        if posterior is None and (prior is None or deterministic or mode != "model"):
            self._check_features(h, temporal)  # checked where the layer reads h
        site = self.site if step is None else f"{self.site}.{step}"
        # under module_params() parameter statements are no-ops: read the head without them
        quiet = _module_params_active()
        if deterministic or mode != "model":
            head = self._modules["posterior"] if quiet else self.posterior  # statements if not quiet
            if posterior is not None:
                params = posterior  # each (..., B, H, k[, T])
            elif isinstance(head, AmortizedNormal):  # a per-unit scale stays (H, k[, 1])
                params = head(h, temporal, expand=False)
            else:
                params = head(h, temporal)
            loc, scale = head.moments(*params)  # marginal, (..., B, H, k[, T]) each
            record_posterior(site, loc, scale, self)
            if deterministic or mode == "mean":
                return self.pool(loc, temporal)
            fn = head.dist_from(*params, temporal=temporal)  # batch (..., B, H)
            if draws > 1:
                fn = fn.expand((draws, 1) + tuple(fn.batch_shape))  # batch (K, 1, ..., B, H)
            if mode == _SINGLE:  # model and guide in one pass: the model side's prior, too
                _record_prior(site, self._model_prior(h, temporal, draws, prior))
        else:
            fn = self._model_prior(h, temporal, draws, prior)  # batch (..., B, H)
        beta = self._buffers["beta"] if quiet else self.beta  # (H,)
        if draws == 1:
            return self.pool(neurons(site, fn, beta), temporal)
        # the K draws are a plate two dims left of the observations' (a size-1 dim between them
        # keeps room for vectorised particles), so any Pyro ELBO sees a well-shaped site
        with pyro.plate(f"{site}.draws", draws, dim=-len(fn.batch_shape)):
            return self.pool(neurons(site, fn, beta / draws), temporal)

    def _model_prior(self, h, temporal, draws, prior):
        """The model side's distribution: the call's ``prior`` or the layer's prior module,
        batch ``(..., B, H)`` (``(K, 1, ..., B, H)`` with K draws)."""
        if prior is not None:
            return prior if draws == 1 else prior.expand((draws, 1) + tuple(prior.batch_shape))
        lead = h.shape[:-2] if temporal else h.shape[:-1]  # (..., B)
        steps = h.shape[-2] if temporal else None
        if draws > 1:
            lead = (draws, 1) + tuple(lead)  # (K, 1, ..., B)
        return self.prior_dist(lead, steps)  # batch (..., B, H)

    def extra_repr(self):
        kind = "deterministic" if self.deterministic else "distributional"
        prior = type(self.prior).__name__
        return (
            f"{kind}, in_features={self.in_features}, units={self.units}, k={self.latent_dim}, "
            f"prior={prior}, temporal={self.temporal}"
        )


class TemporalNeurons(Neurons):
    r"""A :class:`Neurons` layer over a time axis: ``h`` is ``(..., B, T, F)`` and each unit's
    latent runs over the T steps under its prior over time (``prior="ar"`` by default: a learnable
    AR(1) per unit, so each unit's memory is its own). Returns ``(..., B, T, H)``."""

    def __init__(self, in_features, units, *, prior="ar", **options):
        options.setdefault("temporal", True)
        super().__init__(in_features, units, prior=prior, **options)


def find_neurons(module):
    """Every :class:`Neurons` layer in a module tree, in registration order.

    :param torch.nn.Module module: any module (a user's model, :class:`~vdn_pyro.VDN`, ...).
    :returns: a list of the layers (empty if there are none).
    :raises TypeError: if ``module`` is not a :class:`torch.nn.Module`.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"Expected a torch.nn.Module that contains Neurons layers, but got {type(module).__name__}."
        )
    return [m for m in module.modules() if isinstance(m, Neurons)]


def neuron_sites(module):
    """The site names of the :class:`Neurons` layers in ``module``; raises ``ValueError`` if two
    layers share one (give them distinct ``name`` s, or hold them in a ``PyroModule[nn.ModuleList]``
    so that their paths differ)."""
    sites = [layer.site for layer in find_neurons(module)]
    seen = set()
    for site in sites:
        if site in seen:
            raise ValueError(
                f"Two Neurons layers share the site name {site!r}. A layer is named after its place "
                "in the tree of PyroModules; inside a plain nn.ModuleList or nn.Sequential that path "
                "is lost. Use PyroModule[nn.ModuleList] (or PyroModule[nn.Sequential]), or pass "
                "name=... to each layer."
            )
        seen.add(site)
    return sites

r"""Local constraints: per-unit controls on how much a neuron carries and how long it remembers.

Each constraint is a small object handed to :func:`~vdn_pyro.inference.fit` in
``constraints=[...]``. ``fit`` adds it both to the :class:`~vdn_pyro.inference.LocalELBO`'s hooks
and to its callbacks, so a constraint acts through whichever of these it defines:

- ``transform_kl(site, kl)``: rewrite the unscaled per-element KL ``(..., B, H)``, in nats per
  step, inside the loss (:class:`FreeBits`);
- ``penalty(site, guide_site, stats)``: a differentiable scalar added to the loss
  (:class:`LocBand`);
- ``on_fit_start(state)`` / ``on_step_end(state)``: act on the network outside the gradient,
  e.g. move each unit's KL coefficient :math:`\beta_i` (:class:`KLBand`), rescale a unit's encoder
  rows (:class:`LocBand` with ``project``), project parameters back into a band
  (:class:`ScaleGuard`, :class:`Persistence`).

Every constraint works per unit, on every distributional :class:`~vdn_pyro.models.Neurons` layer
of the network or only on those named in ``sites`` (site names such as ``"layers.0.z"`` or layer
indices). The network is any module that contains ``Neurons`` layers (a user's
:class:`~pyro.nn.PyroModule`, :class:`~vdn_pyro.VDN`, :class:`~vdn_pyro.models.Forecaster`, ...):
the layers are found by walking its module tree (:func:`~vdn_pyro.models.neurons.find_neurons`).
Site names are checked against the network when the fit starts (or on :meth:`Constraint.bind`),
and a name that does not exist is a ``ValueError``. Constraints that keep state (such as
:class:`KLBand`'s KL moving averages) expose it through ``state_dict()``/``load_state_dict()`` so
that checkpoints can hold it.

**One KL unit.** Every KL a constraint reads, bounds or steers is in the library's one unit
(:class:`~vdn_pyro.inference.UnitStats`): nats per time step for a temporal unit (its KL over the
T steps of a sequence, or of a chunk of T windows, divided by T), nats per observation for a
static one. So :class:`KLBand`'s band and moving average, :class:`FreeBits`' floor, the
diagnostics' ``kl``, ``kl_ema`` and status thresholds, and the fit's logs and progress bar all
give the same unit the same number, whatever T. The loss still charges the KL summed over the
steps; only what is measured and steered is per step.

A layer called once per time step (sites ``"<site>.<t>"``, see
:meth:`~vdn_pyro.models.Neurons.owns`) is one layer here: its site is ``"<site>"``, what acts on
the ELBO's statistics (:class:`KLBand`'s average, :class:`LocBand`'s projection) reads their mean
over the steps (:func:`layer_stats`), and what acts inside the loss (:class:`FreeBits`,
:class:`LocBand`'s penalty) acts on each step's site.

>>> from vdn_pyro import VDN, fit
>>> net = VDN(4, 1, units=(8,))
>>> x, y = torch.randn(64, 4), torch.randn(64, 1)
>>> bands = [KLBand(0.05, 0.3), ScaleGuard(0.15, 5.0)]
>>> result = fit(net, x, y, steps=5, constraints=bands, progress=False)
>>> float(net.posteriors(x)["layers.0.z"][1].min()) >= 0.15
True
"""

import math
import numbers

import torch
from torch.nn.functional import relu, softplus

from vdn_pyro.distributions import half_life as ar_half_life
from vdn_pyro.distributions import phi_from_half_life
from vdn_pyro.inference.elbo import UnitStats
from vdn_pyro.models.neurons import find_neurons
from vdn_pyro.models.priors import ARPrior

__all__ = [
    "Constraint",
    "FreeBits",
    "KLBand",
    "LocBand",
    "Persistence",
    "ScaleGuard",
    "distributional_layers",
    "layer_stats",
]

GRANULARITIES = ("unit", "layer")
#: Name of the plate Pyro adds for vectorised particles; it is not a data plate.
_PARTICLE_PLATE = "num_particles_vectorized"
_TINY = 1e-12


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real(owner, name, value, *, low=None, high=None, low_open=False, high_open=False):
    """Raise a ``ValueError`` unless ``value`` is a finite real number in the given range."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{owner}: expected {name} to be a finite number, but got {value!r}.")
    if low is not None and (value <= low if low_open else value < low):
        need = ">" if low_open else ">="
        raise ValueError(f"{owner}: expected {name} {need} {low}, but got {value}.")
    if high is not None and (value >= high if high_open else value > high):
        need = "<" if high_open else "<="
        raise ValueError(f"{owner}: expected {name} {need} {high}, but got {value}.")
    return float(value)


def _check_band(owner, names, low, high, *, floor=0.0, floor_open=False):
    """Validate a band ``floor <= low < high < inf`` (``floor < low`` with ``floor_open``)."""
    low = _check_real(owner, names[0], low, low=floor, low_open=floor_open)
    high = _check_real(owner, names[1], high)
    if not low < high:
        raise ValueError(
            f"{owner}: expected {names[0]} < {names[1]}, but got {names[0]}={low} and "
            f"{names[1]}={high}. Give the band as (low, high) with low < high."
        )
    return low, high


def _per_unit_mean(value, unit_axis):
    """Mean over every dim but ``unit_axis``: ``(..., H, ...) -> (H,)``."""
    value = torch.movedim(value, unit_axis, 0)  # (H, ...)
    return value.reshape(value.shape[0], -1).mean(1)  # (H,)


def _base_normal(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


def _num_observations(site, guide_site):
    """Full data-set size seen by a site: the product of its plates' full sizes, leaving out the
    unit plate, the plate of a layer's K draws and the vectorised-particle plate."""
    n = 1
    for frame in guide_site["cond_indep_stack"]:
        if frame.name in (f"{site}.units", f"{site}.draws", _PARTICLE_PLATE):
            continue
        n *= frame.full_size if frame.full_size is not None else frame.size
    return n


def _step_owner(site):
    """``"<site>.<t>" -> "<site>"`` for a per-step site name, else ``None``."""
    head, _, tail = site.rpartition(".")
    return head if head and tail.isdigit() else None


def distributional_layers(network, owner="This tool"):
    """The distributional :class:`~vdn_pyro.models.Neurons` layers of any module, in the order of
    its module tree (deterministic layers carry no distribution and are left out).

    :param network: a :class:`torch.nn.Module` that contains ``Neurons`` layers.
    :param str owner: who asks, for the error messages.
    :returns: a non-empty list of layers.
    :raises TypeError: if ``network`` is not a module or contains no ``Neurons`` layer.
    :raises ValueError: if every layer is deterministic (the twin).
    """
    if not isinstance(network, torch.nn.Module):
        raise TypeError(
            f"{owner}: expected a torch.nn.Module that contains Neurons layers (a PyroModule of "
            f"your own, VDN, Forecaster, ...), but got {type(network).__name__}."
        )
    layers = find_neurons(network)
    if not layers:
        raise TypeError(
            f"{owner}: expected a module that contains Neurons layers, but {type(network).__name__} "
            "has none. Build the model's latent layers with vdn_pyro.models.Neurons."
        )
    layers = [layer for layer in layers if not layer.deterministic]
    if not layers:
        raise ValueError(
            f"{owner}: every Neurons layer of the network is deterministic (the twin, "
            "deterministic=True); its units carry no distribution, so there is no KL, scale or "
            "status to report or constrain."
        )
    return layers


def layer_stats(layers, stats):
    """The ELBO's per-unit statistics gathered per layer.

    A layer called once (site ``"<site>"``) keeps its :class:`~vdn_pyro.inference.UnitStats`; a
    layer called once per time step (sites ``"<site>.<t>"``) gets the mean over its steps.

    :param layers: :class:`~vdn_pyro.models.Neurons` layers.
    :param dict stats: ``site -> UnitStats`` (each field ``(H,)``), keyed by the sites that ran,
        as :attr:`~vdn_pyro.inference.LocalELBO.last_stats`.
    :returns: dict ``layer.site -> UnitStats`` for the layers that have statistics.
    """
    out = {}
    for layer in layers:
        mine = [s for name, s in stats.items() if layer.owns(name)]
        if len(mine) == 1:
            out[layer.site] = mine[0]
        elif mine:
            out[layer.site] = UnitStats(
                *(torch.stack([getattr(s, f) for s in mine]).mean(0) for f in ("kl", "loc_sq", "scale"))
            )  # (H,) each
    return out


class Constraint:
    """Base class of the local constraints: scoping to sites, binding to a network, state.

    :param sites: ``None`` (every distributional neuron layer of the network), or a site name, a
        layer index (into the network's distributional layers, in module-tree order), or a
        sequence of them, e.g. ``"layers.0.z"`` or ``[0, 2]``.
    :raises TypeError: if ``sites`` holds something other than strings and ints.
    """

    def __init__(self, sites=None):
        if sites is None:
            self.sites = None
        else:
            if isinstance(sites, (str, numbers.Integral)) and not isinstance(sites, bool):
                sites = (sites,)
            sites = tuple(sites)
            bad = [s for s in sites if isinstance(s, bool) or not isinstance(s, (str, numbers.Integral))]
            if bad or not sites:
                raise TypeError(
                    f"{type(self).__name__}: expected sites to be None, a site name, a layer "
                    f"index, or a non-empty sequence of them, but got {sites!r}."
                )
            self.sites = sites
        self.network = None
        self.layers = []
        has_index = self.sites is not None and any(not isinstance(s, str) for s in self.sites)
        self._names = None if self.sites is None or has_index else set(self.sites)

    # ------------------------------------------------------------ scoping
    def bind(self, network):
        """Resolve ``sites`` against a network and check that the constraint fits it.

        Has no side effect on the network (side effects belong in :meth:`on_fit_start`).

        :param network: any :class:`torch.nn.Module` that contains
            :class:`~vdn_pyro.models.Neurons` layers (each with ``site``, ``prior``,
            ``posterior`` and a ``beta`` buffer of shape ``(H,)``); they are found by walking its
            module tree.
        :returns: ``self``.
        :raises TypeError: if the network contains no ``Neurons`` layer.
        :raises ValueError: if a named site or layer index does not exist, or the network is the
            deterministic twin.
        """
        layers = distributional_layers(network, type(self).__name__)
        names = [layer.site for layer in layers]
        if self.sites is None:
            chosen = set(names)
        else:
            chosen = set()
            for s in self.sites:
                if isinstance(s, str):
                    if s not in names:
                        raise ValueError(
                            f"{type(self).__name__}: site {s!r} does not exist; the network's "
                            f"neuron sites are {names}."
                        )
                    chosen.add(s)
                else:
                    if not -len(names) <= s < len(names):
                        raise ValueError(
                            f"{type(self).__name__}: layer index {s} is out of range; the network "
                            f"has {len(names)} neuron layer(s): {names}."
                        )
                    chosen.add(names[s])
        self.network = network
        self._names = chosen
        self.layers = [layer for layer in layers if layer.site in chosen]
        self._check_layers(self.layers)
        return self

    def _check_layers(self, layers):
        """Subclass hook: raise if a layer in scope cannot be handled."""

    def covers(self, site):
        """Whether the constraint acts on ``site``.

        :param str site: a neuron site name: a layer's ``"<site>"`` or one of its per-step sites
            ``"<site>.<t>"``.
        :rtype: bool
        """
        if self.sites is None:
            return True
        if self._names is None:
            raise RuntimeError(
                f"{type(self).__name__} names layers by index; call bind(network) (fit does it "
                "at start) before using it."
            )
        return site in self._names or _step_owner(site) in self._names

    # ------------------------------------------------------------- callbacks
    def on_fit_start(self, state):
        """Bind to ``state.network`` (see :meth:`bind`)."""
        self.bind(state.network)

    # ----------------------------------------------------------------- state
    def state_dict(self):
        """The constraint's mutable state (tensors and numbers); empty by default."""
        return {}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but got keys {sorted(state)}.")

    def _scope_repr(self):
        return "" if self.sites is None else f", sites={list(self.sites)!r}"


class KLBand(Constraint):
    r"""Homeostatic thermostat on each unit's KL coefficient :math:`\beta_i`.

    After every optimisation step it updates an exponential moving average of each unit's
    unscaled KL (from the ELBO's statistics, in nats per time step for a temporal unit and nats
    per observation otherwise, the unit of :class:`~vdn_pyro.inference.UnitStats`)
    :math:`\bar k_i \leftarrow \gamma \bar k_i + (1 - \gamma) \mathrm{KL}_i` and, outside the
    gradient, moves :math:`\log \beta_i` by ``rate`` times the log-distance :math:`d_i` of
    :math:`\bar k_i` from the band:

    .. math:: d_i = \big[\log(\bar k_i / h')\big]_+ - \big[\log(l' / \bar k_i)\big]_+, \qquad
              u_i \leftarrow \mathrm{clip}(u_i + r\, d_i), \qquad
              \log \beta_i = \mathrm{clip}(u_i + c\, d_i),

    clipped to :math:`[\log \beta_{\min}, \log \beta_{\max}]`, with :math:`u_i` starting at the
    unit's current :math:`\log\beta_i`. A unit above the band pays more for its rate, a unit
    below pays less, a unit inside is left alone.

    Two additions to the plain integral rule (``damping=0, margin=0``) make it settle instead of
    oscillate. A unit's KL answers a change of :math:`\beta` only after the optimiser has moved
    its encoder (hundreds of steps), so a pure integral rule overshoots; the proportional term
    :math:`c\, d_i` (``damping``) damps that. And a unit held only at a band edge sits outside the
    band half the time by noise, so the rule steers to the inner band
    :math:`[l', h'] = [l\, m, h / m]`, :math:`m = (h / l)^{\text{margin}}`, leaving a margin
    inside :math:`[l, h]` on each side (in log space). The defaults hold >= 90% of units inside
    the band after a few hundred steps, from any initial :math:`\beta` in [1e-4, 10], in the
    tests and the collapse study.

    With ``granularity="layer"`` the band applies to the layer's mean unit KL and one shared
    :math:`\beta` moves for the whole layer (the same total budget, coarser control).

    The new :math:`\beta_i` is written in place into the layer's ``beta`` buffer, so the network's
    ``state_dict`` holds it; the moving averages and integrals are in :meth:`state_dict`.

    :param float low: lower edge :math:`l` of the band, nats per step (per observation for a
        static unit), ``>= 0``.
    :param float high: upper edge :math:`h`, ``> low``.
    :param float rate: integral step :math:`r > 0` of :math:`\log\beta` per unit of
        log-distance.
    :param float beta_min: lower clip of :math:`\beta`, ``> 0``.
    :param float beta_max: upper clip, ``> beta_min``.
    :param float ema: decay :math:`\gamma \in [0, 1)` of the KL moving average.
    :param str granularity: ``"unit"`` (one thermostat per unit) or ``"layer"``.
    :param float damping: proportional gain :math:`c \ge 0`.
    :param float margin: fraction of the band's log-width kept free on each side, in
        ``[0, 0.5)``.
    :param int every: update :math:`\beta` every this many steps (the EMA updates every step).
    :param sites: see :class:`Constraint`.
    """

    def __init__(
        self,
        low=0.05,
        high=0.3,
        rate=0.03,
        beta_min=1e-4,
        beta_max=100.0,
        ema=0.9,
        *,
        granularity="unit",
        damping=2.0,
        margin=0.25,
        every=1,
        sites=None,
    ):
        super().__init__(sites)
        owner = "KLBand"
        self.low, self.high = _check_band(owner, ("low", "high"), low, high)
        self.rate = _check_real(owner, "rate", rate, low=0.0, low_open=True)
        self.beta_min, self.beta_max = _check_band(
            owner, ("beta_min", "beta_max"), beta_min, beta_max, floor=0.0, floor_open=True
        )
        self.decay = _check_real(owner, "ema", ema, low=0.0, high=1.0, high_open=True)
        if granularity not in GRANULARITIES:
            raise ValueError(f"{owner}: expected granularity in {GRANULARITIES}, but got {granularity!r}.")
        self.granularity = granularity
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"{owner}: expected every to be an int >= 1, but got {every!r}.")
        self.every = int(every)
        self.damping = _check_real(owner, "damping", damping, low=0.0)
        self.margin = _check_real(owner, "margin", margin, low=0.0, high=0.5, high_open=True)
        self.ema = {}  # site -> (H,) moving average of the unit KL
        self.log_beta = {}  # site -> (H,) integral part of log beta
        self.num_updates = 0

    @property
    def target(self):
        """The inner band ``(l', h')`` the thermostat steers to (see ``margin``)."""
        if self.low <= 0:
            return self.low, self.high
        width = math.log(self.high / self.low)
        return self.low * math.exp(self.margin * width), self.high * math.exp(-self.margin * width)

    def log_distance(self, kl):
        r"""Signed log-distance of a KL from the inner band :math:`[l', h']`:
        :math:`\log(k/h')` above it, :math:`\log(k/l')` below it, 0 inside.

        :param torch.Tensor kl: ``(...)`` nats.
        :returns: a tensor of the same shape.
        """
        low, high = self.target
        kl = kl.clamp_min(_TINY)
        above = torch.log(kl / high).clamp_min(0.0)
        below = torch.log(kl / low).clamp_max(0.0) if low > 0 else torch.zeros_like(kl)
        return above + below

    @torch.no_grad()
    def observe(self, layer, kl, update_beta=True):
        """Fold one step's per-unit KL into the moving average and move the layer's beta.

        :param layer: a neuron layer with ``site`` and a ``beta`` buffer ``(H,)``.
        :param torch.Tensor kl: the unscaled KL per unit ``(H,)`` in nats per step (per
            observation for a static unit), as :attr:`~vdn_pyro.inference.UnitStats.kl`.
        :param bool update_beta: also move beta (else only the average).
        :returns: the layer's beta ``(H,)`` after the update.
        """
        site = layer.site
        kl = kl.detach().to(layer.beta)  # (H,)
        previous = self.ema.get(site)
        ema = kl.clone() if previous is None else self.decay * previous + (1 - self.decay) * kl  # (H,)
        self.ema[site] = ema
        if not update_beta:
            return layer.beta
        lo, hi = math.log(self.beta_min), math.log(self.beta_max)
        integral = self.log_beta.get(site)
        if integral is None:  # start from the layer's current beta
            integral = layer.beta.clamp_min(_TINY).log().clamp(lo, hi)  # (H,)
            if self.granularity == "layer":
                integral = integral.mean().expand_as(layer.beta).clone()  # (H,)
        if self.granularity == "layer":
            distance = self.log_distance(ema.mean()).expand_as(layer.beta)  # (H,)
        else:
            distance = self.log_distance(ema)  # (H,)
        integral = (integral + self.rate * distance).clamp(lo, hi)  # (H,)
        self.log_beta[site] = integral
        layer.beta.copy_((integral + self.damping * distance).clamp(lo, hi).exp())
        return layer.beta

    def on_step_end(self, state):
        """Update the averages from ``state.stats`` and, every ``every`` steps, the betas."""
        update = state.step % self.every == 0
        stats = layer_stats(self.layers, state.stats)  # per layer; the mean over a layer's steps
        for layer in self.layers:
            if layer.site in stats:
                self.observe(layer, stats[layer.site].kl, update_beta=update)
        self.num_updates += 1

    def state_dict(self):
        """``{"ema": {site: (H,)}, "log_beta": {site: (H,)}, "num_updates": int}``."""
        return {
            "ema": {k: v.clone() for k, v in self.ema.items()},
            "log_beta": {k: v.clone() for k, v in self.log_beta.items()},
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state):
        """Restore the moving averages and integrals from :meth:`state_dict`."""
        self.ema = {k: torch.as_tensor(v).clone() for k, v in state.get("ema", {}).items()}
        self.log_beta = {k: torch.as_tensor(v).clone() for k, v in state.get("log_beta", {}).items()}
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self):
        return (
            f"KLBand(low={self.low}, high={self.high}, rate={self.rate}, beta_min={self.beta_min}, "
            f"beta_max={self.beta_max}, ema={self.decay}, granularity={self.granularity!r}, "
            f"damping={self.damping}, margin={self.margin}{self._scope_repr()})"
        )


class FreeBits(Constraint):
    r"""Free bits per unit: the KL term of unit i in the loss is :math:`\max(\mathrm{KL}_i,
    \lambda)` nats per step, where :math:`\mathrm{KL}_i` is the unit's KL averaged over the batch
    (and particles), in nats per time step for a temporal unit and per observation otherwise (the
    unit of :class:`~vdn_pyro.inference.UnitStats`).

    Acts through ``transform_kl`` on the per-element, per-step KL ``(..., B, H)``: the elements of a
    unit under the floor are replaced by :math:`\lambda`, so the loss charges that unit
    :math:`\lambda` per step, :math:`T \lambda` per sequence of T steps (still scaled by its
    :math:`\beta_i` and the subsample factor); above the floor the term is the unit's KL unchanged.
    The floor is per step, so the same per-step information is floored the same way whatever T.

    **The default is a soft objective, not a floor on the KL.** Below :math:`\lambda` the term is
    a constant and sends no gradient, so nothing *in the KL term* pushes a unit's rate further
    down; but nothing pushes it back up either. An optimiser with momentum (Adam) carries a unit
    whose KL is being pushed down past :math:`\lambda`, and a unit the likelihood has no use for
    then stays wherever it stopped: at a large :math:`\beta` units end below :math:`\lambda`.

    With ``hard=True`` the floor holds: below :math:`\lambda` the term becomes
    :math:`2\lambda - \mathrm{KL}_i` (charged at least :math:`\lambda`), whose gradient pushes the
    unit's KL back up with the same force :math:`\beta_i` that pushes it down above the floor.
    A unit can dip below :math:`\lambda` by what the optimiser's momentum carries for a few steps
    and comes back, so at the end of a fit every unit's KL is at :math:`\lambda` or above, up to
    that step noise. The price: a unit is made to spend :math:`\lambda` nats per step even where
    it carries nothing useful (it may then show as ``dead`` by its mutual information, see
    :func:`~vdn_pyro.inference.unit_report`).

    The ELBO's recorded :attr:`~vdn_pyro.inference.UnitStats.kl` is always the unit's real KL, not
    this term.

    :param float lam: the floor :math:`\lambda \ge 0`, nats per step (per observation for a
        static unit).
    :param bool hard: hold the floor (see above) instead of only removing the gradient below it.
    :param sites: see :class:`Constraint`.
    """

    def __init__(self, lam=0.1, *, hard=False, sites=None):
        super().__init__(sites)
        self.lam = _check_real("FreeBits", "lam", lam, low=0.0)
        if not isinstance(hard, bool):
            raise TypeError(f"FreeBits: expected hard to be True or False, but got {hard!r}.")
        self.hard = hard

    def transform_kl(self, site, kl):
        """:param str site: site name. :param torch.Tensor kl: unscaled KL ``(..., B, H)`` in nats
        per step. :returns: the free-bits term, same shape."""
        if not self.covers(site):
            return kl
        unit_kl = kl.reshape(-1, kl.shape[-1]).mean(0)  # (H,)
        below = 2 * self.lam - kl if self.hard else torch.full_like(kl, self.lam)  # (..., B, H)
        return torch.where(unit_kl >= self.lam, kl, below)  # (..., B, H)

    def __repr__(self):
        hard = ", hard=True" if self.hard else ""
        return f"FreeBits(lam={self.lam}{hard}{self._scope_repr()})"


class LocBand(Constraint):
    r"""Keep each unit's posterior-mean energy :math:`\overline{\mu_i^2}` (the mean of loc^2 over
    the batch, latent dims and steps) inside a band :math:`[l, h]`.

    The hinge penalty added to the loss is

    .. math:: w\, N \sum_i \big([l - \overline{\mu_i^2}]_+ + [\overline{\mu_i^2} - h]_+\big),

    differentiable through the guide site's loc; N is the full data-set size, so ``weight`` is
    per observation, comparable with the per-observation negative log-likelihood.

    With ``project`` the unit's encoder rows (rows ``i*k:(i+1)*k`` of the posterior's ``loc``
    linear head, weight and bias) are also rescaled after a step whenever the batch's
    :math:`\overline{\mu_i^2}` left the band: by :math:`c_i = (\mathrm{clip}(\overline{\mu_i^2},
    l, h) / \overline{\mu_i^2})^{\rho/2}` which, since loc is linear in those rows, moves
    :math:`\log \overline{\mu_i^2}` the fraction :math:`\rho` of the way to the band
    (``project=True`` means :math:`\rho = 1`: straight to its edge; a number below 1 nudges
    gradually, "homeostasis").

    :param float low: lower edge of the band, ``>= 0``.
    :param float high: upper edge, ``> low``.
    :param float weight: penalty weight ``>= 0`` per observation.
    :param project: ``False``, ``True``, or a fraction :math:`\rho \in (0, 1]`.
    :param int every: project every this many steps.
    :param sites: see :class:`Constraint`.
    """

    def __init__(self, low=0.01, high=1.0, weight=1.0, project=False, *, every=1, sites=None):
        super().__init__(sites)
        owner = "LocBand"
        self.low, self.high = _check_band(owner, ("low", "high"), low, high)
        self.weight = _check_real(owner, "weight", weight, low=0.0)
        if project is True:
            project = 1.0
        elif project is False or project is None:
            project = 0.0
        else:
            project = _check_real(owner, "project", project, low=0.0, high=1.0, low_open=True)
        self.project = float(project)
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"{owner}: expected every to be an int >= 1, but got {every!r}.")
        self.every = int(every)

    def _check_layers(self, layers):
        if self.project:
            for layer in layers:
                post = layer.posterior
                if not isinstance(getattr(post, "loc", None), torch.nn.Linear):
                    raise ValueError(
                        f"LocBand(project=...) rescales encoder rows, so it needs a posterior "
                        f"with a linear `loc` head (AmortizedNormal); site {layer.site!r} has "
                        f"{type(post).__name__}."
                    )

    def hinge(self, loc_sq):
        """Distance outside the band, ``(H,) -> (H,)``."""
        return relu(self.low - loc_sq) + relu(loc_sq - self.high)

    def penalty(self, site, guide_site, stats):
        """The hinge penalty of one site (a scalar tensor, 0 for sites out of scope)."""
        if not self.covers(site) or self.weight == 0:
            return 0.0
        fn = guide_site["fn"]
        base = _base_normal(fn)
        loc = getattr(base, "loc", None)
        if loc is None:
            loc = fn.mean
        unit_axis = len(fn.batch_shape) - 1
        loc_sq = _per_unit_mean(loc.expand(base.batch_shape) ** 2, unit_axis)  # (H,)
        return self.weight * _num_observations(site, guide_site) * self.hinge(loc_sq).sum()

    @torch.no_grad()
    def project_layer(self, layer, loc_sq):
        """Rescale the encoder rows of the layer's units whose ``loc_sq`` is out of band.

        :param layer: a neuron layer whose posterior has a linear ``loc`` head.
        :param torch.Tensor loc_sq: the units' mean loc^2 ``(H,)`` measured on a batch.
        :returns: the factors ``(H,)`` the rows were multiplied by.
        """
        post = layer.posterior
        loc_sq = loc_sq.detach().to(post.loc.weight)  # (H,)
        target = loc_sq.clamp(self.low, self.high)  # (H,)
        ratio = target / loc_sq.clamp_min(_TINY)  # (H,)
        factor = torch.where(loc_sq > _TINY, ratio ** (0.5 * self.project), torch.ones_like(ratio))  # (H,)
        rows = factor.repeat_interleave(post.latent_dim)  # (H * k,)
        post.loc.weight.mul_(rows[:, None])
        if post.loc.bias is not None:
            post.loc.bias.mul_(rows)
        return factor

    def on_step_end(self, state):
        """Project the out-of-band units (when ``project``)."""
        if not self.project or state.step % self.every:
            return
        stats = layer_stats(self.layers, state.stats)  # per layer; the mean over a layer's steps
        for layer in self.layers:
            if layer.site in stats:
                self.project_layer(layer, stats[layer.site].loc_sq)

    def __repr__(self):
        return (
            f"LocBand(low={self.low}, high={self.high}, weight={self.weight}, "
            f"project={self.project}{self._scope_repr()})"
        )


class ScaleGuard(Constraint):
    r"""Keep every unit's posterior scale inside ``[min, max]``.

    At fit start it narrows the clamp of each guarded layer's posterior
    (:class:`~vdn_pyro.guides.AmortizedNormal`'s ``scale_min``/``scale_max``) to the intersection
    with ``[min, max]``, so every scale the guide produces, during and after the fit, lies in the
    range. The narrowing stays with the network; apply the guard again (``bind`` then
    ``on_fit_start``, or :meth:`apply`) after loading a checkpoint into a fresh network. With
    ``scale_mode="unit"`` it also projects the raw scale parameters back into the range after
    every step, so a scale pushed against a bound keeps its gradient.

    :param float min: lower bound, ``> 0``.
    :param float max: upper bound, ``> min``.
    :param sites: see :class:`Constraint`.
    """

    def __init__(self, min=0.15, max=5.0, *, sites=None):
        super().__init__(sites)
        self.min, self.max = _check_band("ScaleGuard", ("min", "max"), min, max, floor_open=True)

    def _check_layers(self, layers):
        for layer in layers:
            post = layer.posterior
            if not (hasattr(post, "scale_min") and hasattr(post, "scale_max")):
                raise ValueError(
                    f"ScaleGuard needs a posterior with scale_min/scale_max clamps "
                    f"(AmortizedNormal); site {layer.site!r} has {type(post).__name__}."
                )
            if max(post.scale_min, self.min) >= min(post.scale_max, self.max):
                raise ValueError(
                    f"ScaleGuard [{self.min}, {self.max}] does not overlap the posterior clamp "
                    f"[{post.scale_min}, {post.scale_max}] of site {layer.site!r}."
                )

    @torch.no_grad()
    def apply(self):
        """Narrow the clamps and project the raw unit scales (after :meth:`bind`)."""
        for layer in self.layers:
            post = layer.posterior
            post.scale_min = max(float(post.scale_min), self.min)
            post.scale_max = min(float(post.scale_max), self.max)
            raw = getattr(post, "raw_scale", None)
            if isinstance(raw, torch.Tensor):
                low = torch.as_tensor(post.scale_min, dtype=raw.dtype)
                high = torch.as_tensor(post.scale_max, dtype=raw.dtype)
                inside = softplus(raw).clamp(low, high)  # (H, k)
                raw.copy_(inside + torch.log(-torch.expm1(-inside)))

    def on_fit_start(self, state):
        """Bind, then :meth:`apply`."""
        self.bind(state.network)
        self.apply()

    def on_step_end(self, state):
        """Project the raw unit scales back into the range."""
        self.apply()

    def __repr__(self):
        return f"ScaleGuard(min={self.min}, max={self.max}{self._scope_repr()})"


class Persistence(Constraint):
    r"""Keep each unit's AR memory inside a band of half-lives (in time steps).

    The half-life of an AR(1) coefficient is :math:`\log 0.5 / \log|\phi|` (for AR(p), of the
    largest root modulus :math:`\rho`), so the band :math:`[h_{lo}, h_{hi}]` is the band
    :math:`0.5^{1/h_{lo}} \le \rho \le 0.5^{1/h_{hi}}`. After every step (and once at fit start)
    each guarded unit's coefficients are projected into it with
    :meth:`~vdn_pyro.models.ARPrior.clamp_half_life` (its roots are scaled radially, which keeps
    the sign and shape of its autocorrelation), so every forward pass of the fit sees a memory in
    band.

    Give the band either as ``half_life=(lo, hi)`` with ``0 < lo < hi < inf``, or as
    ``phi=(lo, hi)`` with ``0 < lo < hi < 1`` (a band on :math:`\rho`).

    :param tuple half_life: half-life band in steps.
    :param tuple phi: coefficient band (alternative to ``half_life``).
    :param sites: see :class:`Constraint`; with ``None`` every layer whose prior is an
        :class:`~vdn_pyro.models.ARPrior`.
    """

    def __init__(self, half_life=None, *, phi=None, sites=None):
        super().__init__(sites)
        owner = "Persistence"
        if (half_life is None) == (phi is None):
            raise ValueError(f"{owner}: give exactly one of half_life=(lo, hi) or phi=(lo, hi).")
        band = half_life if half_life is not None else phi
        if not isinstance(band, (tuple, list)) or len(band) != 2:
            raise ValueError(f"{owner}: expected a band (lo, hi), but got {band!r}.")
        if half_life is not None:
            lo, hi = _check_band(owner, ("half_life lo", "half_life hi"), *band, floor_open=True)
        else:
            lo, hi = _check_band(owner, ("phi lo", "phi hi"), *band, floor_open=True)
            if hi >= 1:
                raise ValueError(f"{owner}: expected phi hi < 1 (stationarity), but got {hi}.")
            lo, hi = float(ar_half_life(lo)), float(ar_half_life(hi))
        self.half_life = (lo, hi)
        self.phi = (float(phi_from_half_life(lo)), float(phi_from_half_life(hi)))

    def _check_layers(self, layers):
        if self.sites is None:
            layers[:] = [layer for layer in layers if isinstance(layer.prior, ARPrior)]
            self._names = {layer.site for layer in layers}
            if not layers:
                raise ValueError(
                    "Persistence bounds AR memory, but no neuron layer of the network has an "
                    "ARPrior; build it with prior='ar'."
                )
        for layer in layers:
            if not isinstance(layer.prior, ARPrior):
                raise ValueError(
                    f"Persistence needs an ARPrior, but site {layer.site!r} has "
                    f"{type(layer.prior).__name__}; build the network with prior='ar'."
                )

    def apply(self):
        """Project every guarded unit's half-life into the band."""
        lo, hi = self.half_life
        for layer in self.layers:
            layer.prior.clamp_half_life(lo, hi)

    def on_fit_start(self, state):
        """Bind, then project."""
        self.bind(state.network)
        self.apply()

    def on_step_end(self, state):
        """Project after the optimiser step."""
        self.apply()

    def __repr__(self):
        return f"Persistence(half_life={self.half_life}{self._scope_repr()})"

r"""Diagnostics: the measures that show each distributional neuron's regime.

For every unit i of every distributional :class:`~vdn_pyro.models.Neurons` layer of any module
that contains them (found by walking its module tree), on a data set ``x`` (training or held
out), along the network's mean path (each layer reads the previous layer's posterior mean, as
:func:`~vdn_pyro.models.base.posteriors` computes it):

- ``kl``: :math:`\mathbb{E}_x\, \mathrm{KL}(q(z_i \mid x) \,\|\, p(z_i))` in the library's one
  KL unit: **nats per time step** for a temporal unit (its KL over the T steps of the input's
  time axis divided by T) and **nats per observation** for a static one (summed over the unit's k
  latent dims), analytic, from the posterior and the prior modules with
  :func:`torch.distributions.kl_divergence`. It is the unit of the ELBO's
  :attr:`~vdn_pyro.inference.UnitStats.kl`, of :class:`~vdn_pyro.inference.KLBand`'s band and
  of the fit's logs, so the same unit gets the same number in each, whatever T (give the report
  inputs shaped as in training, e.g. chunks of T windows, to compare with them). ``kl_ema``: its
  moving average over training steps when a :class:`~vdn_pyro.inference.KLBand` or a
  :class:`UnitMonitor` keeps one;
- ``var_mean``: :math:`\mathrm{Var}_x\, \mathbb{E}_q[z_i]` (mean over latent dims and steps);
  ``active`` is ``var_mean > 0.01`` (the active-unit measure of Burda et al., 2016);
- ``mi``: the mutual information :math:`I(x; z_i)` under the aggregate posterior, see
  :func:`mutual_information`; for a temporal unit the mean over steps of
  :math:`I(x; z_{i,t})`, nats per step like ``kl`` (the information of the whole path would grow
  with T, and saturate at :math:`\log N`);
- ``loc_sq`` and ``scale``: the mean over inputs (and dims, steps) of the posterior loc squared
  and of the posterior scale, with ``kl_in_band``, ``loc_in_band``, ``scale_in_band`` (and
  ``in_band`` for all of them); ``prior_scale`` is the prior's marginal scale;
- ``phi`` (lag-1 coefficient) and ``half_life`` where the prior is an
  :class:`~vdn_pyro.models.ARPrior` (``NaN`` otherwise);
- ``drift``: the largest relative change of ``kl``, ``loc_sq`` and ``scale`` against an earlier
  report (a window of steps earlier, see :class:`UnitMonitor`), each relative to
  :math:`\max(|\text{old}|, \text{band low})` so that noise on near-zero statistics does not
  count;
- ``status``, the first that applies of (thresholds in :class:`StatusThresholds`):

  1. ``exploding``: ``loc_sq > explode_factor * loc_band[1]`` (default 10 times the top of the
     loc^2 band), or a non-finite statistic;
  2. ``deterministic`` (variance collapse): ``scale < deterministic_scale * prior_scale``
     (default 5% of the prior's scale), or the scale sits at the posterior's lower clamp
     (within ``floor_tolerance``, 1%), while the KL is above ``dead_kl``;
  3. ``dead`` (posterior collapse): ``kl < dead_kl`` (0.01 nats per step, q is the prior) or
     ``mi < dead_mi`` (0.01 nats, q does not depend on the input);
  4. ``drifting``: ``drift > drift`` (0.5: a statistic moved by more than half over the window);
  5. ``living``: none of the above.

With a single input there is no variance over inputs and no mutual information:
:func:`unit_report` then warns, and ``mi`` and ``var_mean`` are ``NaN`` (``active`` is false), so
the status rests on the KL, loc^2 and scale alone instead of calling every unit dead.

:func:`unit_report` returns these as a tidy :class:`pandas.DataFrame` (one row per site and
unit) and :func:`layer_summary` aggregates it per layer. :class:`UnitMonitor` records them every
n steps of :func:`~vdn_pyro.inference.fit` into ``result.monitor``.

The data are what the model is called with: a tensor ``x`` (``model(x)``) or a tuple of its
positional arguments (``model(*args)``; e.g. ``(x, y)`` for a model whose posterior reads the
targets). A layer called once per time step (sites ``"<site>.<t>"``) is reported as one layer:
its steps form a time axis of the posterior (as a temporal layer's do), its ``kl`` is the mean
over steps of each step's KL against that step's (conditional) prior, in nats per step, and
``prior_scale`` is the mean scale of those priors.
"""

import dataclasses
import math
import numbers
import warnings

import numpy as np
import torch
from pyro import poutine
from torch.distributions import kl_divergence

import vdn_pyro.distributions  # noqa: F401  (registers the ARProcess KL)
from vdn_pyro.inference.constraints import (
    Constraint,
    KLBand,
    LocBand,
    Persistence,
    ScaleGuard,
    distributional_layers,
    layer_stats,
)
from vdn_pyro.models.base import posteriors
from vdn_pyro.models.priors import ARPrior, NormalPrior
from vdn_pyro.primitives import module_params
from vdn_pyro.unit_status import STATUSES, StatusThresholds, classify_units, mutual_information

__all__ = [
    "STATUSES",
    "StatusThresholds",
    "UnitMonitor",
    "classify_units",
    "layer_summary",
    "mutual_information",
    "unit_kl",
    "unit_report",
]

_LOG_2PI = math.log(2 * math.pi)


def _check_band(name, band):
    if band is None:
        return None
    if not isinstance(band, (tuple, list)) or len(band) != 2:
        raise ValueError(f"Expected {name} to be a pair (low, high), but got {band!r}.")
    low, high = (float(v) for v in band)
    if not (0 <= low < high):
        raise ValueError(f"Expected {name} with 0 <= low < high, but got {band!r}.")
    return low, high


def _as_args(x, owner="unit_report"):
    """The model's positional arguments: ``(x,)`` for a tensor, the tuple itself for a tuple."""
    if torch.is_tensor(x):
        return (x,)
    if isinstance(x, tuple) and x:
        return x
    raise TypeError(
        f"{owner}: expected x to be a tensor (the model is called as model(x)) or a non-empty "
        f"tuple of the model's positional arguments (model(*x)), but got {type(x).__name__}."
    )


def _device(network):
    param = next(iter(network.parameters()), None)
    return torch.device("cpu") if param is None else param.device


def _flat(value):
    """``(N, H, ...) -> (N, H, D)`` with D the product of the trailing dims."""
    return value.reshape(value.shape[0], value.shape[1], -1)


def _base_normal(fn):
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn


def _per_unit(value, units):
    """Mean over every dim but the last (the units): ``(..., H) -> (H,)``."""
    return value.reshape(-1, units).mean(0)


@dataclasses.dataclass
class _LayerPosterior:
    """One layer along the mean path: ``loc``/``scale`` ``(N, H, k[, T])``, ``kl`` and
    ``prior_scale`` ``(H,)`` (``None`` where the prior has no Normal scale)."""

    layer: object
    loc: torch.Tensor
    scale: torch.Tensor
    kl: torch.Tensor
    prior_scale: object


@torch.no_grad()
def _mean_path(network, args, layers):
    """Each layer's posterior and its KL against the prior it is sampled under, along the mean
    path: :func:`~vdn_pyro.models.base.posteriors`, then one pass of the model conditioned on
    those posterior means, which gives every site's (possibly conditional) prior. Draws of other
    sites (the observations) come from a forked random state: the global one is left as it was.
    """
    device = _device(network)
    call = getattr(network, "model", network)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        posts = posteriors(network, *args)
        means = {site: loc for site, (loc, _) in posts.items()}
        with module_params(), poutine.block():
            trace = poutine.trace(poutine.condition(call, data=means)).get_trace(*args)
    out = []
    for layer in layers:
        sites = [site for site in posts if layer.owns(site)]
        if not sites:
            raise ValueError(
                f"Neurons layer {layer.site!r} was not called when the model ran on these "
                "inputs; pass what the model takes (a tensor x, or a tuple of its positional "
                "arguments)."
            )
        sites.sort(key=lambda site: -1 if site == layer.site else int(site.rpartition(".")[2]))
        kls, scales = [], []
        for site in sites:
            loc, scale = posts[site]  # (N, H, k[, T])
            q = torch.distributions.Independent(torch.distributions.Normal(loc, scale), loc.dim() - 2)
            p = trace.nodes[site]["fn"]
            steps = math.prod(loc.shape[3:])  # T of a temporal site, else 1
            kls.append(_per_unit(kl_divergence(q, p), layer.units) / steps)  # (H,) nats per step
            base = _base_normal(p)
            if isinstance(base, torch.distributions.Normal):
                prior_scale = base.scale.expand(base.batch_shape)  # (..., N, H[, k[, T]])
                unit_axis = len(p.batch_shape) - 1
                scales.append(torch.movedim(prior_scale, unit_axis, -1).reshape(-1, layer.units).mean(0))
        if len(sites) == 1:
            loc, scale = posts[sites[0]]  # (N, H, k[, T])
        else:  # one site per step: the steps become a time axis
            loc = torch.stack([posts[site][0] for site in sites], -1)  # (N, H, k, T)
            scale = torch.stack([posts[site][1].expand_as(posts[site][0]) for site in sites], -1)
        if isinstance(layer.prior, (NormalPrior, ARPrior)):  # the stationary marginal
            marginal = _base_normal(layer.prior((), None))
            prior_scale = marginal.scale.reshape(layer.units, -1).mean(-1)  # (H,)
        elif len(scales) == len(sites):
            prior_scale = torch.stack(scales).mean(0)  # (H,)
        else:
            prior_scale = None
        out.append(_LayerPosterior(layer, loc, scale, torch.stack(kls).mean(0), prior_scale))
    return out


def _mutual_information_per_step(loc, scale, num_samples, max_points, generator):
    """:func:`mutual_information` per unit, for a temporal unit the mean over its T steps of each
    step's information: ``loc``/``scale`` ``(N, H, k[, T]) -> (H,)`` nats (per step)."""
    if loc.dim() < 4:
        return mutual_information(loc, scale, num_samples, max_points, generator)  # (H,)
    n, units = loc.shape[:2]
    steps = math.prod(loc.shape[3:])

    def per_step(value):  # (N, H, k, T...) -> (N, H * T, k): each (unit, step) a column
        value = value.expand_as(loc).reshape(n, units, loc.shape[2], steps)  # (N, H, k, T)
        return value.movedim(2, -1).reshape(n, units * steps, loc.shape[2])  # (N, H * T, k)

    mi = mutual_information(per_step(loc), per_step(scale), num_samples, max_points, generator)
    return mi.reshape(units, steps).mean(-1)  # (H,)


def _memory(prior, units):
    """Lag-1 coefficient and half-life per unit ``(H,)`` each, or ``None`` if the prior has none."""
    phi, half_life = getattr(prior, "phi", None), getattr(prior, "half_life", None)
    if torch.is_tensor(phi) and torch.is_tensor(half_life) and half_life.numel() == units:
        return phi.reshape(units, -1)[:, 0], half_life.reshape(units)
    return None


@torch.no_grad()
def unit_kl(network, x):
    """Analytic KL per unit on ``x``, along the mean path.

    :param network: any module that contains :class:`~vdn_pyro.models.Neurons` layers (a user's
        :class:`~pyro.nn.PyroModule`, :class:`~vdn_pyro.VDN`, ...), not the deterministic twin.
    :param x: the model's input, a tensor ``(N, ...)`` (``model(x)``), or a tuple of its
        positional arguments.
    :returns: dict ``site -> (H,)`` tensor of KL in nats per time step for a temporal layer (its
        KL over the T steps divided by T, or the mean over the steps of a layer called once per
        step) and nats per observation for a static one, averaged over the N inputs, one entry
        per distributional layer.
    """
    layers = distributional_layers(network, "unit_kl")
    return {p.layer.site: p.kl for p in _mean_path(network, _as_args(x, "unit_kl"), layers)}


def _site_bands(site, constraints, kl_band, loc_band, scale_band, half_life_band):
    """Bands for one site: the defaults, overridden by the constraints that cover it."""
    bands = {"kl": kl_band, "loc": loc_band, "scale": scale_band, "half_life": half_life_band}
    for c in constraints:
        if not c.covers(site):
            continue
        if isinstance(c, KLBand):
            bands["kl"] = (c.low, c.high)
        elif isinstance(c, LocBand):
            bands["loc"] = (c.low, c.high)
        elif isinstance(c, ScaleGuard):
            bands["scale"] = (c.min, c.max)
        elif isinstance(c, Persistence):
            bands["half_life"] = c.half_life
    return bands


def _in_band(value, band):
    return (value >= band[0]) & (value <= band[1])


@torch.no_grad()
def unit_report(
    network,
    x,
    *,
    kl_band=(0.05, 0.3),
    loc_band=(0.01, 1.0),
    scale_band=(0.15, 5.0),
    half_life_band=None,
    constraints=(),
    thresholds=None,
    previous=None,
    kl_ema=None,
    num_samples=8,
    max_points=512,
    seed=0,
):
    """Per-unit diagnostics of a network on inputs ``x``, one row per site and unit.

    Columns: ``site``, ``layer``, ``unit``, ``beta``, ``kl``, ``kl_ema``, ``mi``, ``var_mean``,
    ``active``, ``loc_sq``, ``scale``, ``prior_scale``, ``phi``, ``half_life``, ``kl_in_band``,
    ``loc_in_band``, ``scale_in_band``, ``half_life_in_band`` (``True`` where no band is set),
    ``in_band``, ``drift``, ``status``. ``kl`` and ``kl_ema`` are in nats per time step for a
    temporal unit, per observation otherwise. Definitions and thresholds are in the module
    docstring.

    :param network: any module that contains :class:`~vdn_pyro.models.Neurons` layers (a user's
        :class:`~pyro.nn.PyroModule`, :class:`~vdn_pyro.VDN`,
        :class:`~vdn_pyro.models.Forecaster`, ...), not the deterministic twin. One row per unit
        of each distributional layer; ``layer`` is its index among them (module-tree order).
    :param x: the model's input, a tensor ``(N, ...)`` such as ``(N, D)`` or ``(N, T, D)``
        (``model(x)``), or a tuple of its positional arguments.
    :param tuple kl_band: default KL band (nats per step, per observation for a static unit).
    :param tuple loc_band: default loc^2 band.
    :param tuple scale_band: default scale band.
    :param tuple half_life_band: default half-life band (``None``: no band).
    :param constraints: constraints whose bands replace the defaults on the sites they cover
        (:class:`KLBand`, :class:`LocBand`, :class:`ScaleGuard`, :class:`Persistence`); a
        :class:`KLBand` also supplies ``kl_ema``.
    :param StatusThresholds thresholds: classifier thresholds.
    :param previous: an earlier report of the same network (for ``drift``), or ``None``.
    :param dict kl_ema: ``site -> (H,)`` KL moving averages (overrides a KLBand's).
    :param int num_samples: draws per input of the mutual-information estimate.
    :param int max_points: inputs used by the mutual-information estimate.
    :param int seed: seed of the mutual-information draws (the global RNG is not touched).
    :returns: a :class:`pandas.DataFrame`.
    :warns UserWarning: with a single input (``mi``, ``var_mean`` are then ``NaN``).

    >>> from vdn_pyro import VDN
    >>> report = unit_report(VDN(4, 1, units=(3,)), torch.randn(32, 4))
    >>> report[["site", "unit"]].values.tolist()
    [['layers.0.z', 0], ['layers.0.z', 1], ['layers.0.z', 2]]
    """
    import pandas as pd

    layers = distributional_layers(network, "unit_report")
    args = _as_args(x)
    kl_band = _check_band("kl_band", kl_band)
    loc_band = _check_band("loc_band", loc_band)
    scale_band = _check_band("scale_band", scale_band)
    half_life_band = _check_band("half_life_band", half_life_band)
    constraints = list(constraints)
    for c in constraints:
        if c.sites is not None and c._names is None:
            c.bind(network)
    thresholds = thresholds or StatusThresholds()
    generator = torch.Generator().manual_seed(int(seed))
    posts = _mean_path(network, args, layers)
    if any(post.loc.shape[0] < 2 for post in posts):
        warnings.warn(
            "unit_report: got a single input; the variance over inputs and the mutual information "
            "need at least 2, so var_mean and mi are NaN and each unit's status rests on its KL, "
            "loc^2 and scale alone. Pass more inputs for a full report.",
            UserWarning,
            stacklevel=2,
        )
    frames = []
    for index, post in enumerate(posts):
        layer, site, kl = post.layer, post.layer.site, post.kl  # kl: (H,)
        loc, scale = post.loc, post.scale  # (N, H, k[, T])
        flat_loc, flat_scale = _flat(loc), _flat(scale.expand_as(loc))  # (N, H, D)
        var_mean = flat_loc.var(0, unbiased=False).mean(-1)  # (H,)
        mi = _mutual_information_per_step(loc, scale, num_samples, max_points, generator)  # (H,)
        if loc.shape[0] < 2:  # no spread over one input: unknown, not zero
            var_mean, mi = torch.full_like(var_mean, math.nan), torch.full_like(mi, math.nan)
        loc_sq = (flat_loc**2).mean((0, 2))  # (H,)
        scale_u = flat_scale.mean((0, 2))  # (H,)
        nan = torch.full_like(kl, math.nan)  # (H,)
        prior_scale = nan if post.prior_scale is None else post.prior_scale  # (H,)
        phi, half_life = _memory(layer.prior, layer.units) or (nan, nan)  # (H,) each
        bands = _site_bands(site, constraints, kl_band, loc_band, scale_band, half_life_band)
        ema = None
        for c in constraints:
            if isinstance(c, KLBand) and c.covers(site) and site in c.ema:
                ema = c.ema[site]
        if kl_ema is not None and site in kl_ema:
            ema = kl_ema[site]
        frame = pd.DataFrame(
            {
                "site": site,
                "layer": index,
                "unit": np.arange(layer.units),
                "beta": layer.beta.detach().cpu().numpy(),
                "kl": kl.cpu().numpy(),
                "kl_ema": np.full(layer.units, np.nan) if ema is None else torch.as_tensor(ema).cpu().numpy(),
                "mi": mi.cpu().numpy(),
                "var_mean": var_mean.cpu().numpy(),
                "loc_sq": loc_sq.cpu().numpy(),
                "scale": scale_u.cpu().numpy(),
                "prior_scale": prior_scale.detach().cpu().numpy(),
                "phi": phi.detach().cpu().numpy(),
                "half_life": half_life.detach().cpu().numpy(),
            }
        )
        frame["active"] = frame.var_mean > thresholds.active_var
        frame["kl_in_band"] = _in_band(frame.kl, bands["kl"])
        frame["loc_in_band"] = _in_band(frame.loc_sq, bands["loc"])
        frame["scale_in_band"] = _in_band(frame.scale, bands["scale"])
        hl_band = bands["half_life"]
        frame["half_life_in_band"] = True if hl_band is None else _in_band(frame.half_life, hl_band)
        frame["in_band"] = (
            frame.kl_in_band & frame.loc_in_band & frame.scale_in_band & frame.half_life_in_band
        )
        frame["drift"] = _drift(frame, previous, site, bands)
        frame["status"] = classify_units(
            frame.kl,
            frame.mi,
            frame.loc_sq,
            frame.scale,
            frame.prior_scale,
            loc_high=bands["loc"][1],
            scale_floor=float(getattr(layer.posterior, "scale_min", 0.0)),
            drift=frame.drift,
            thresholds=thresholds,
        )
        frames.append(frame)
    columns = [
        "site", "layer", "unit", "beta", "kl", "kl_ema", "mi", "var_mean", "active", "loc_sq",
        "scale", "prior_scale", "phi", "half_life", "kl_in_band", "loc_in_band", "scale_in_band",
        "half_life_in_band", "in_band", "drift", "status",
    ]  # fmt: skip
    return pd.concat(frames, ignore_index=True)[columns]


def _drift(frame, previous, site, bands):
    """Largest relative change of kl, loc_sq, scale against ``previous`` (NaN without one)."""
    if previous is None:
        return np.full(len(frame), np.nan)
    old = previous[previous.site == site].set_index("unit").reindex(frame.unit)
    change = np.zeros(len(frame))
    for column, band in [("kl", bands["kl"]), ("loc_sq", bands["loc"]), ("scale", bands["scale"])]:
        before = old[column].to_numpy(dtype=float)
        floor = band[0] if band[0] > 0 else 1e-3
        rel = np.abs(frame[column].to_numpy(dtype=float) - before) / np.maximum(np.abs(before), floor)
        change = np.fmax(change, rel)
    return np.where(np.isnan(old.kl.to_numpy(dtype=float)), np.nan, change)


def layer_summary(report):
    """Aggregate a :func:`unit_report` (or a :class:`UnitMonitor` frame) per layer.

    Columns (per ``site``, and per ``step`` when the report has one): ``units``,
    ``fraction_living``, ``fraction_dead``, ``fraction_deterministic``, ``fraction_exploding``,
    ``fraction_drifting``, ``fraction_active``, ``fraction_out_of_band`` (any of the unit's bands
    missed), ``fraction_kl_out_of_band`` (the KL band missed), ``total_kl`` (the layer's rate:
    the sum of its units' ``kl``, nats per time step for a temporal layer and per observation
    otherwise), ``total_mi`` and ``mean_beta``.

    :param pandas.DataFrame report: the per-unit table.
    :returns: a :class:`pandas.DataFrame`, one row per layer (and step).
    """
    import pandas as pd

    keys = (["step"] if "step" in report.columns else []) + ["layer", "site"]
    rows = []
    for key, group in report.groupby(keys, sort=True):
        row = dict(zip(keys, key))
        row["units"] = len(group)
        for status in ("living", "dead", "deterministic", "exploding", "drifting"):
            row[f"fraction_{status}"] = float((group.status == status).mean())
        row["fraction_active"] = float(group.active.mean())
        row["fraction_out_of_band"] = float((~group.in_band.astype(bool)).mean())
        row["fraction_kl_out_of_band"] = float((~group.kl_in_band.astype(bool)).mean())
        row["total_kl"] = float(group.kl.sum())
        row["total_mi"] = float(group.mi.sum())
        row["mean_beta"] = float(group.beta.mean())
        rows.append(row)
    return pd.DataFrame(rows)


class UnitMonitor:
    """A :func:`~vdn_pyro.inference.fit` callback that records :func:`unit_report` every
    ``every`` steps (and at steps 0 and the last), so each unit's regime can be followed.

    The records go to ``result.monitor`` of the fit's :class:`~vdn_pyro.inference.FitResult`
    (a :class:`pandas.DataFrame`: the report's columns plus ``step``; updated at every record)
    and to :meth:`frame`. ``kl_ema`` is this monitor's moving average of each unit's per-step KL
    from the ELBO's statistics (decay ``ema``), and ``drift`` compares with the record taken
    ``window`` steps earlier. The bands come from the fit's constraints (those in the ELBO's
    hooks) unless given. Any module that contains :class:`~vdn_pyro.models.Neurons` layers can be
    monitored; a layer called once per step averages its steps' statistics (see
    :func:`~vdn_pyro.inference.constraints.layer_stats`).

    :param x: what to diagnose on (e.g. held-out data): a tensor such as ``(N, D)`` or
        ``(N, T, D)`` (``model(x)``), or a tuple of the model's positional arguments.
    :param int every: record every this many steps.
    :param int window: drift window in steps (default ``every``: each record is compared with
        the one before it).
    :param float ema: decay of the KL moving average, in ``[0, 1)``.
    :param report_options: keyword arguments for :func:`unit_report` (bands, thresholds,
        ``num_samples``, ``max_points``, ``constraints``).

    >>> from vdn_pyro import VDN, fit
    >>> net, x, y = VDN(4, 1, units=(3,)), torch.randn(64, 4), torch.randn(64, 1)
    >>> result = fit(net, x, y, steps=4, callbacks=[UnitMonitor(x, every=2)], progress=False)
    >>> result.monitor.step.unique().tolist()
    [0, 2, 4]
    """

    def __init__(self, x, every=50, *, window=None, ema=0.9, **report_options):
        args = _as_args(x, "UnitMonitor")
        for name, value in [("every", every), ("window", window)]:
            if value is None and name == "window":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        if not (isinstance(ema, numbers.Real) and 0 <= ema < 1):
            raise ValueError(f"Expected ema in [0, 1), but got {ema!r}.")
        self.args, self.every = args, int(every)
        self.window = int(window) if window is not None else self.every
        self.decay = float(ema)
        self.report_options = report_options
        self.reports = []  # (step, DataFrame)
        self.ema = {}
        self._layers = None

    def frame(self):
        """All records as one :class:`pandas.DataFrame` with a ``step`` column."""
        import pandas as pd

        if not self.reports:
            return pd.DataFrame()
        return pd.concat([r for _, r in self.reports], ignore_index=True)

    def summary(self):
        """:func:`layer_summary` of every record (one row per step and layer)."""
        return layer_summary(self.frame())

    def record(self, state):
        """Take one report now (called by the fit hooks)."""
        previous = None
        for step, report in reversed(self.reports):
            if step <= state.step - self.window:
                previous = report
                break
        options = dict(self.report_options)
        if "constraints" not in options:
            hooks = getattr(state.elbo, "hooks", [])
            options["constraints"] = [h for h in hooks if isinstance(h, Constraint)]
        device = _device(state.network)
        args = tuple(a.to(device) if torch.is_tensor(a) else a for a in self.args)
        report = unit_report(state.network, args, previous=previous, kl_ema=self.ema or None, **options)
        report.insert(0, "step", state.step)
        self.reports.append((state.step, report))
        if state.history is not None:
            state.history.monitor = self.frame()
        return report

    def on_fit_start(self, state):
        """Check the network and take the step-0 record."""
        self._layers = distributional_layers(state.network, "UnitMonitor")
        self.reports, self.ema = [], {}
        self.record(state)

    def on_step_end(self, state):
        """Update the KL averages; record every ``every`` steps."""
        layers = self._layers or distributional_layers(state.network, "UnitMonitor")
        for site, stats in layer_stats(layers, state.stats).items():
            kl = stats.kl.detach()
            old = self.ema.get(site)
            self.ema[site] = kl.clone() if old is None else self.decay * old + (1 - self.decay) * kl
        if state.step % self.every == 0:
            self.record(state)

    def on_fit_end(self, state):
        """Record the final step if it was not just recorded."""
        if not self.reports or self.reports[-1][0] != state.step:
            self.record(state)

    def state_dict(self):
        """``{"ema": {site: (H,)}}`` (the records themselves live in the fit result)."""
        return {"ema": {k: v.clone() for k, v in self.ema.items()}}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`."""
        self.ema = {k: torch.as_tensor(v).clone() for k, v in state.get("ema", {}).items()}

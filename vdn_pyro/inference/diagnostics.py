r"""Diagnostics: the measures that show each distributional neuron's regime.

For every unit i of every neuron layer, on a data set ``x`` (training or held out), along the
network's mean path (each layer reads the previous layer's posterior mean, as
:meth:`~vdn_pyro.VDN.posteriors` computes it):

- ``kl``: :math:`\mathbb{E}_x\, \mathrm{KL}(q(z_i \mid x) \,\|\, p(z_i))` in nats per
  observation (summed over the unit's k latent dims and T steps), analytic, from the posterior
  and the prior modules with :func:`torch.distributions.kl_divergence`; ``kl_ema``: its moving
  average over training steps when a :class:`~vdn_pyro.inference.KLBand` or a
  :class:`UnitMonitor` keeps one;
- ``var_mean``: :math:`\mathrm{Var}_x\, \mathbb{E}_q[z_i]` (mean over latent dims and steps);
  ``active`` is ``var_mean > 0.01`` (the active-unit measure of Burda et al., 2016);
- ``mi``: the mutual information :math:`I(x; z_i)` under the aggregate posterior, see
  :func:`mutual_information`;
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
  3. ``dead`` (posterior collapse): ``kl < dead_kl`` (0.01 nats, q is the prior) or
     ``mi < dead_mi`` (0.01 nats, q does not depend on the input);
  4. ``drifting``: ``drift > drift`` (0.5: a statistic moved by more than half over the window);
  5. ``living``: none of the above.

:func:`unit_report` returns these as a tidy :class:`pandas.DataFrame` (one row per site and
unit) and :func:`layer_summary` aggregates it per layer. :class:`UnitMonitor` records them every
n steps of :func:`~vdn_pyro.inference.fit` into ``result.monitor``.
"""

import dataclasses
import math
import numbers

import numpy as np
import torch
from torch.distributions import kl_divergence

import vdn_pyro.distributions  # noqa: F401  (registers the ARProcess KL)
from vdn_pyro.inference.constraints import Constraint, KLBand, LocBand, Persistence, ScaleGuard
from vdn_pyro.models.priors import ARPrior

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

#: The regimes a unit can be in, in the order :func:`classify_units` tests them (living last).
STATUSES = ("exploding", "deterministic", "dead", "drifting", "living")

_LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass
class StatusThresholds:
    """Thresholds of the status classifier (see the module docstring for the rules).

    :ivar float dead_kl: KL (nats) below which a unit's posterior is its prior.
    :ivar float dead_mi: mutual information (nats) below which a unit ignores its input.
    :ivar float active_var: variance over inputs of the posterior mean above which a unit is
        active.
    :ivar float deterministic_scale: posterior scale, as a fraction of the prior's marginal
        scale, below which a unit is deterministic.
    :ivar float floor_tolerance: a scale within this relative distance of the posterior's lower
        clamp is at its floor (deterministic).
    :ivar float explode_factor: loc^2 above this many times the top of the loc^2 band is
        exploding.
    :ivar float drift: relative change over the window above which a unit is drifting.
    """

    dead_kl: float = 0.01
    dead_mi: float = 0.01
    active_var: float = 0.01
    deterministic_scale: float = 0.05
    floor_tolerance: float = 0.01
    explode_factor: float = 10.0
    drift: float = 0.5

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"Expected StatusThresholds.{field.name} >= 0, but got {value!r}.")


def _check_band(name, band):
    if band is None:
        return None
    if not isinstance(band, (tuple, list)) or len(band) != 2:
        raise ValueError(f"Expected {name} to be a pair (low, high), but got {band!r}.")
    low, high = (float(v) for v in band)
    if not (0 <= low < high):
        raise ValueError(f"Expected {name} with 0 <= low < high, but got {band!r}.")
    return low, high


def _check_network(network):
    layers = getattr(network, "layers", None)
    if not layers or not hasattr(network, "posteriors"):
        raise TypeError(
            "Expected a network with `layers` (neuron layers) and `posteriors(x)`, such as "
            f"vdn_pyro.VDN, but got {type(network).__name__}."
        )
    if getattr(network, "deterministic", False):
        raise ValueError(
            "The network is the deterministic twin (deterministic=True): its units carry no "
            "distribution, so there is no KL, scale or status to report."
        )
    return list(layers)


def _flat(value):
    """``(N, H, ...) -> (N, H, D)`` with D the product of the trailing dims."""
    return value.reshape(value.shape[0], value.shape[1], -1)


def _posterior_and_prior(layer, loc, scale):
    """The posterior and prior of one layer as distributions with batch ``(B, H)``."""
    temporal = loc.dim() == 4  # (B, H, k, T)
    q = torch.distributions.Independent(torch.distributions.Normal(loc, scale), loc.dim() - 2)
    p = layer.prior((loc.shape[0],), loc.shape[-1] if temporal else None)
    return q, p


@torch.no_grad()
def unit_kl(network, x):
    """Analytic KL per unit on ``x``, along the mean path.

    :param network: a :class:`~vdn_pyro.VDN` (or any network with ``layers`` and
        ``posteriors``).
    :param torch.Tensor x: inputs ``(N, D)`` or ``(N, T, D)``.
    :returns: dict ``site -> (H,)`` tensor of KL in nats, averaged over the N inputs.
    """
    layers = _check_network(network)
    posts = network.posteriors(x)
    out = {}
    for layer in layers:
        loc, scale = posts[layer.site]  # (N, H, k[, T])
        q, p = _posterior_and_prior(layer, loc, scale)
        out[layer.site] = kl_divergence(q, p).mean(0)  # (H,)
    return out


@torch.no_grad()
def mutual_information(loc, scale, num_samples=8, max_points=512, generator=None):
    r"""Monte Carlo estimate of :math:`I(x; z_i)` per unit from the aggregate posterior.

    With :math:`q(z) = \frac1N \sum_m q(z \mid x_m)` over the data,

    .. math:: I(x; z_i) = \mathbb{E}_{n}\, \mathbb{E}_{z \sim q(z_i \mid x_n)}
              \Big[\log q(z \mid x_n) - \log \frac1N \sum_{m} q(z \mid x_m)\Big],

    where each :math:`q(z_i \mid x)` is a diagonal Normal over the unit's latent dims (and
    steps). The estimate lies in :math:`[0, \log N]`: a unit whose posterior does not depend on
    the input gives exactly 0, and a nearly deterministic one saturates at :math:`\log N`.

    :param torch.Tensor loc: posterior locs ``(N, H, ...)``.
    :param torch.Tensor scale: posterior scales, broadcastable to ``loc``.
    :param int num_samples: draws of z per input.
    :param int max_points: use at most this many inputs (a random subset; N in the formula).
    :param torch.Generator generator: source of the draws (keeps the global RNG untouched).
    :returns: ``(H,)`` nats.
    """
    if loc.dim() < 2:
        raise ValueError(f"Expected loc of shape (N, H, ...), but got {tuple(loc.shape)}.")
    for name, value in [("num_samples", num_samples), ("max_points", max_points)]:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
    scale = scale.expand_as(loc)
    loc, scale = _flat(loc), _flat(scale)  # (N, H, D)
    n = loc.shape[0]
    if n > max_points:
        idx = torch.randperm(n, generator=generator)[:max_points].to(loc.device)
        loc, scale, n = loc[idx], scale[idx], max_points  # (M, H, D)
    _, units, dims = loc.shape
    log_scale = scale.log()  # (M, H, D)
    chunk = max(1, 2**22 // (num_samples * n * units * dims))
    total = torch.zeros(units, dtype=loc.dtype, device=loc.device)
    for start in range(0, n, chunk):
        own_loc, own_scale = loc[start : start + chunk], scale[start : start + chunk]  # (C, H, D)
        eps = torch.randn((num_samples,) + own_loc.shape, generator=generator).to(loc)  # (S, C, H, D)
        z = own_loc + own_scale * eps  # (S, C, H, D)
        log_own = (-0.5 * eps**2 - own_scale.log()).sum(-1)  # (S, C, H)
        diff = (z[:, :, None] - loc) / scale  # (S, C, M, H, D)
        log_all = (-0.5 * diff**2 - log_scale).sum(-1)  # (S, C, M, H)
        log_agg = torch.logsumexp(log_all, dim=2) - math.log(n)  # (S, C, H)
        total += (log_own - log_agg).sum((0, 1))
    return (total / (num_samples * n)).clamp_min(0.0)  # (H,)


def classify_units(kl, mi, loc_sq, scale, prior_scale, *, loc_high, scale_floor=0.0, drift=None,
                   thresholds=None):
    """Status of each unit from its statistics (rules in the module docstring).

    :param kl: ``(H,)`` KL in nats. :param mi: ``(H,)`` mutual information (``NaN``: unknown).
    :param loc_sq: ``(H,)`` mean loc^2. :param scale: ``(H,)`` mean posterior scale.
    :param prior_scale: ``(H,)`` marginal prior scale.
    :param float loc_high: top of the loc^2 band.
    :param float scale_floor: the posterior's lower scale clamp.
    :param drift: ``(H,)`` relative drift, or ``None``.
    :param StatusThresholds thresholds: default :class:`StatusThresholds`.
    :returns: a numpy array ``(H,)`` of status strings.
    """
    t = thresholds or StatusThresholds()
    kl, mi, loc_sq, scale, prior_scale = (
        np.asarray(v, dtype=float) for v in (kl, mi, loc_sq, scale, prior_scale)
    )
    finite = np.isfinite(kl) & np.isfinite(loc_sq) & np.isfinite(scale)
    exploding = ~finite | (loc_sq > t.explode_factor * loc_high)
    at_floor = scale <= scale_floor * (1 + t.floor_tolerance)
    deterministic = ((scale < t.deterministic_scale * prior_scale) | at_floor) & (kl >= t.dead_kl)
    dead = (kl < t.dead_kl) | (mi < t.dead_mi)  # NaN mi compares False
    drifting = np.zeros_like(dead) if drift is None else np.asarray(drift, dtype=float) > t.drift
    status = np.full(kl.shape, "living", dtype=object)
    for name, mask in reversed(
        [("exploding", exploding), ("deterministic", deterministic), ("dead", dead), ("drifting", drifting)]
    ):
        status[mask] = name
    return status


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
    ``in_band``, ``drift``, ``status``. Definitions and thresholds are in the module docstring.

    :param network: a :class:`~vdn_pyro.VDN` (not the deterministic twin).
    :param torch.Tensor x: inputs ``(N, D)`` or ``(N, T, D)``.
    :param tuple kl_band: default KL band (nats per unit).
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

    >>> from vdn_pyro import VDN
    >>> report = unit_report(VDN(4, 1, units=(3,)), torch.randn(32, 4))
    >>> report[["site", "unit"]].values.tolist()
    [['layers.0.z', 0], ['layers.0.z', 1], ['layers.0.z', 2]]
    """
    import pandas as pd

    layers = _check_network(network)
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
    posts = network.posteriors(x)
    frames = []
    for index, layer in enumerate(layers):
        site = layer.site
        loc, scale = posts[site]  # (N, H, k[, T])
        q, p = _posterior_and_prior(layer, loc, scale)
        kl = kl_divergence(q, p).mean(0)  # (H,)
        flat_loc, flat_scale = _flat(loc), _flat(scale.expand_as(loc))  # (N, H, D)
        var_mean = flat_loc.var(0, unbiased=False).mean(-1)  # (H,)
        mi = mutual_information(loc, scale, num_samples, max_points, generator)  # (H,)
        loc_sq = (flat_loc**2).mean((0, 2))  # (H,)
        scale_u = flat_scale.mean((0, 2))  # (H,)
        marginal = layer.prior((), None)
        while isinstance(marginal, torch.distributions.Independent):
            marginal = marginal.base_dist
        prior_scale = marginal.scale.reshape(layer.units, -1).mean(-1)  # (H,)
        if isinstance(layer.prior, ARPrior):
            phi, half_life = layer.prior.phi[:, 0], layer.prior.half_life  # (H,) each
        else:
            phi = half_life = torch.full_like(kl, math.nan)  # (H,)
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
    missed), ``fraction_kl_out_of_band`` (the KL band missed), ``total_kl`` (the layer's rate,
    nats per observation), ``total_mi`` and ``mean_beta``.

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
    hooks) unless given.

    :param torch.Tensor x: inputs to diagnose on ``(N, D)`` or ``(N, T, D)`` (e.g. held-out
        data).
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
        if not torch.is_tensor(x):
            raise TypeError(f"Expected x to be a tensor, but got {type(x).__name__}.")
        for name, value in [("every", every), ("window", window)]:
            if value is None and name == "window":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        if not (isinstance(ema, numbers.Real) and 0 <= ema < 1):
            raise ValueError(f"Expected ema in [0, 1), but got {ema!r}.")
        self.x, self.every = x, int(every)
        self.window = int(window) if window is not None else self.every
        self.decay = float(ema)
        self.report_options = report_options
        self.reports = []  # (step, DataFrame)
        self.ema = {}

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
        x = self.x.to(next(iter(state.network.parameters())).device)
        report = unit_report(state.network, x, previous=previous, kl_ema=self.ema or None, **options)
        report.insert(0, "step", state.step)
        self.reports.append((state.step, report))
        if state.history is not None:
            state.history.monitor = self.frame()
        return report

    def on_fit_start(self, state):
        """Check the network and take the step-0 record."""
        _check_network(state.network)
        self.reports, self.ema = [], {}
        self.record(state)

    def on_step_end(self, state):
        """Update the KL averages; record every ``every`` steps."""
        for site, stats in state.stats.items():
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

r"""The status of a distributional unit: its regime from its statistics, and the mutual
information between the input and the unit's latent under the aggregate posterior.

Pure functions of tensors (no network): the diagnostics in :mod:`vdn_pyro.inference` and the
sequence evaluation of :class:`~vdn_pyro.models.RecurrentVDN` both use them. The rules are in
:mod:`vdn_pyro.inference.diagnostics`.
"""

import dataclasses
import math
import numbers

import numpy as np
import torch

__all__ = ["KL_UNITS", "STATUSES", "StatusThresholds", "classify_units", "mutual_information"]

#: The one unit of every per-unit KL the library reports, controls and thresholds (the ELBO's
#: statistics, KLBand, FreeBits, unit_report, the fit's logs, ArviZ's ``units`` attrs).
KL_UNITS = "nats per time step (temporal units); nats per observation (static units)"

#: The regimes a unit can be in, in the order :func:`classify_units` tests them (living last).
STATUSES = ("exploding", "deterministic", "dead", "drifting", "living")


@dataclasses.dataclass
class StatusThresholds:
    """Thresholds of the status classifier (see the module docstring for the rules).

    :ivar float dead_kl: KL below which a unit's posterior is its prior, in nats per time step
        for a temporal unit and nats per observation otherwise (the unit of every reported KL).
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


def _flat(value):
    """``(N, H, ...) -> (N, H, D)`` with D the product of the trailing dims."""
    return value.reshape(value.shape[0], value.shape[1], -1)


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


def classify_units(
    kl, mi, loc_sq, scale, prior_scale, *, loc_high, scale_floor=0.0, drift=None, thresholds=None
):
    """Status of each unit from its statistics (rules in the module docstring).

    :param kl: ``(H,)`` KL in nats per time step (per observation for a static unit).
    :param mi: ``(H,)`` mutual information (``NaN``: unknown, e.g. from a single input).
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

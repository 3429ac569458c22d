r"""
Point and probabilistic forecast metrics.

Every function accepts tensors or numpy arrays (integer inputs become the default
float dtype; mixed dtypes are promoted) and returns a 0-dim tensor averaged over all
elements (``reduction="mean"``, the default), summed (``"sum"``), or the per-element
scores with the shape of ``y`` (``"none"``). Shapes: ``y`` has any shape ``B``;
point forecasts, ``loc`` and ``scale`` broadcast to ``B``; samples have shape
``(S,) + B`` with the ``S`` draws along dim 0.

Scores that see paths (:func:`energy_score`, :func:`variogram_score`, :func:`crps_sum`,
:func:`sum_coverage`, :func:`sum_interval_width`, :func:`path_metrics`) score each
window's whole horizon at once: ``y`` has shape ``B + (H,)`` with the horizon along the
last dim, ``samples`` has shape ``(S,) + B + (H,)`` and holds ``S`` *joint* sample paths,
and the per-window scores (``reduction="none"``) have shape ``B``; the mean is over
windows. Unlike the marginal scores, they see how the steps of a path move together:
forecasts with the same marginals but a different dependence across the horizon get
different path scores.

>>> y = torch.tensor([0.0, 1.0])
>>> mse(torch.tensor([1.0, 1.0]), y)
tensor(0.5000)
"""

import math
import numbers
from functools import reduce
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "Interval",
    "crps_gaussian",
    "crps_samples",
    "crps_sum",
    "energy_score",
    "forecast_metrics",
    "gaussian_interval",
    "gaussian_interval_coverage",
    "gaussian_interval_width",
    "gaussian_nll",
    "interval_coverage",
    "interval_width",
    "mae",
    "mse",
    "path_metrics",
    "sample_interval",
    "sum_coverage",
    "sum_interval",
    "sum_interval_width",
    "variogram_score",
]

_REDUCTIONS = ("mean", "sum", "none")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


class Interval(NamedTuple):
    """A central prediction interval; both bounds have the shape of ``y``."""

    #: lower bound, the :math:`(1 - \mathrm{level}) / 2` quantile.
    lower: torch.Tensor
    #: upper bound, the :math:`(1 + \mathrm{level}) / 2` quantile.
    upper: torch.Tensor


def _tensors(fn, **named):
    """Convert named inputs to float tensors of one dtype on one device."""
    device = next((v.device for v in named.values() if isinstance(v, torch.Tensor)), None)
    out = {}
    for name, value in named.items():
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
        else:
            try:
                array = np.asarray(value)
                if not array.flags.writeable:  # e.g. pandas copy-on-write views
                    array = array.copy()
                tensor = torch.as_tensor(array)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(
                    f"{fn}: expected {name} to be a tensor or numeric array but got {type(value).__name__}"
                ) from e
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.get_default_dtype())
        out[name] = tensor if device is None else tensor.to(device)
    dtype = reduce(torch.promote_types, (t.dtype for t in out.values()))
    return [t.to(dtype) for t in out.values()]


def _reduce(value, reduction):
    if reduction == "mean":
        return value.mean()
    if reduction == "sum":
        return value.sum()
    if reduction == "none":
        return value
    raise ValueError(f"Expected reduction in {_REDUCTIONS} but got {reduction!r}")


def _check_same(fn, name, value, y):
    if value.shape != y.shape:
        raise ValueError(
            f"{fn}: expected {name} of the shape of y {tuple(y.shape)} but got {tuple(value.shape)}"
        )


def _check_broadcast(fn, name, value, y):
    try:
        shape = torch.broadcast_shapes(value.shape, y.shape)
    except RuntimeError:
        shape = None
    if shape != y.shape:
        raise ValueError(
            f"{fn}: expected {name} broadcastable to the shape of y {tuple(y.shape)} "
            f"but got {tuple(value.shape)}"
        )


def _check_scale(fn, scale):
    if not bool((scale > 0).all()):
        raise ValueError(f"{fn}: expected scale > 0 but got min scale {scale.min().item():.3g}")


def _check_samples(fn, samples, y):
    if samples.dim() < 1 or samples.shape[1:] != y.shape:
        raise ValueError(
            f"{fn}: expected samples of shape (S,) + y.shape = (S, {', '.join(map(str, y.shape))}) "
            f"but got {tuple(samples.shape)}; stack the S draws along dim 0"
        )
    if samples.shape[0] == 0:
        raise ValueError(f"{fn}: expected at least one sample but got samples of shape (0, ...)")


def _normal_quantile(q):
    """Standard normal quantile of a float, as a float."""
    return torch.special.ndtri(torch.tensor(q, dtype=torch.float64)).item()


def _check_level(fn, level):
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise TypeError(
            f"{fn}: expected level to be a float in (0, 1) but got {type(level).__name__}; "
            "note the argument order (interval_width takes no y)"
        )
    if not 0 < level < 1:
        raise ValueError(f"{fn}: expected 0 < level < 1 but got level={level}")
    return float(level)


def mse(pred, y, reduction="mean"):
    r"""
    Mean squared error :math:`\overline{(\hat y - y)^2}`.

    :param pred: point forecast, shape ``B`` (the shape of ``y``).
    :param y: observations, shape ``B``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    pred, y = _tensors("mse", pred=pred, y=y)
    _check_same("mse", "pred", pred, y)
    return _reduce((pred - y).pow(2), reduction)


def mae(pred, y, reduction="mean"):
    r"""
    Mean absolute error :math:`\overline{|\hat y - y|}`.

    :param pred: point forecast, shape ``B``.
    :param y: observations, shape ``B``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    pred, y = _tensors("mae", pred=pred, y=y)
    _check_same("mae", "pred", pred, y)
    return _reduce((pred - y).abs(), reduction)


def crps_gaussian(loc, scale, y, reduction="mean"):
    r"""
    Closed-form CRPS of a normal forecast :math:`\mathcal N(\mathrm{loc}, \mathrm{scale}^2)`:

    .. math:: \mathrm{CRPS} = \sigma\left[z\,(2\Phi(z) - 1) + 2\varphi(z)
        - \frac{1}{\sqrt\pi}\right], \qquad z = \frac{y - \mu}{\sigma}.

    Lower is better; it has the units of ``y``.

    :param loc: forecast mean, broadcastable to ``B``.
    :param scale: forecast standard deviation > 0, broadcastable to ``B``.
    :param y: observations, shape ``B``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    loc, scale, y = _tensors("crps_gaussian", loc=loc, scale=scale, y=y)
    _check_broadcast("crps_gaussian", "loc", loc, y)
    _check_broadcast("crps_gaussian", "scale", scale, y)
    _check_scale("crps_gaussian", scale)
    z = (y - loc) / scale  # B
    pdf = torch.exp(-0.5 * z * z - _HALF_LOG_2PI)
    cdf = torch.special.ndtr(z)
    crps = scale * (z * (2 * cdf - 1) + 2 * pdf - _INV_SQRT_PI)  # B
    return _reduce(crps, reduction)


def _sort_samples(samples):
    """``samples`` sorted along dim 0, shape ``(S,) + B``; sorts along a contiguous last dim,
    about twice as fast as sorting along dim 0 in place."""
    return samples.movedim(0, -1).contiguous().sort(dim=-1).values.movedim(-1, 0)


def _crps_sorted(sorted_samples, y, fair):
    """Per-element sample CRPS from samples sorted along dim 0, shape ``(S,) + B``."""
    num_samples = sorted_samples.shape[0]
    abs_err = (sorted_samples - y).abs().mean(0)  # B
    # sum_{i<j} |x_i - x_j| = sum_k (2k - S - 1) x_(k) for sorted x, k = 1..S
    weight = torch.arange(
        1 - num_samples, num_samples, 2, dtype=sorted_samples.dtype, device=sorted_samples.device
    )  # (S,)
    weight = weight.reshape((num_samples,) + (1,) * (sorted_samples.dim() - 1))
    pair_sum = (weight * sorted_samples).sum(0)  # B, = sum_{i<j} |x_i - x_j|
    denom = num_samples * (num_samples - 1) if fair else num_samples**2
    return abs_err - pair_sum / denom  # B


def crps_samples(samples, y, fair=True, reduction="mean"):
    r"""
    Sample (ensemble) CRPS in the energy form

    .. math:: \mathrm{CRPS} = \mathbb E|X - y| - \tfrac12\,\mathbb E|X - X'|,

    with :math:`\mathbb E|X - X'|` from the ``S`` samples in :math:`O(S \log S)` by
    sorting: :math:`\sum_{i<j}|x_i - x_j| = \sum_{k=1}^S (2k - S - 1)\,x_{(k)}`.

    ``fair=True`` (default) divides the pair sum by :math:`S(S-1)`: an unbiased
    estimate of the CRPS of the distribution the samples were drawn from, whatever
    ``S``, comparable with :func:`crps_gaussian` (scoringrules' ``"fair"`` estimator).
    ``fair=False`` divides by :math:`S^2`: the exact CRPS of the empirical
    distribution of the samples, which is biased upwards by
    :math:`\mathbb E|X - X'| / (2S)` (scoringrules' ``"nrg"``, equal to its default
    ``"qd"``).

    :param samples: forecast draws, shape ``(S,) + B``.
    :param y: observations, shape ``B``.
    :param bool fair: unbiased (``True``, needs ``S >= 2``) or empirical (``False``).
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    samples, y = _tensors("crps_samples", samples=samples, y=y)
    _check_samples("crps_samples", samples, y)
    if fair and samples.shape[0] < 2:
        raise ValueError("crps_samples: fair=True needs at least 2 samples; pass fair=False")
    sorted_samples = _sort_samples(samples)  # (S,) + B
    return _reduce(_crps_sorted(sorted_samples, y, fair), reduction)


def gaussian_nll(loc, scale, y, reduction="mean"):
    r"""
    Negative log density of ``y`` under :math:`\mathcal N(\mathrm{loc}, \mathrm{scale}^2)`:

    .. math:: \tfrac12\log(2\pi) + \log\sigma + \frac{(y - \mu)^2}{2\sigma^2}.

    :param loc: forecast mean, broadcastable to ``B``.
    :param scale: forecast standard deviation > 0, broadcastable to ``B``.
    :param y: observations, shape ``B``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    loc, scale, y = _tensors("gaussian_nll", loc=loc, scale=scale, y=y)
    _check_broadcast("gaussian_nll", "loc", loc, y)
    _check_broadcast("gaussian_nll", "scale", scale, y)
    _check_scale("gaussian_nll", scale)
    z = (y - loc) / scale  # B
    return _reduce(_HALF_LOG_2PI + torch.log(scale) + 0.5 * z * z, reduction)


def _quantile_sorted(sorted_samples, q):
    """Quantile ``q`` of samples sorted along dim 0, linear interpolation (numpy's default)."""
    position = q * (sorted_samples.shape[0] - 1)
    lo = math.floor(position)
    hi = min(lo + 1, sorted_samples.shape[0] - 1)
    frac = position - lo
    return sorted_samples[lo] + frac * (sorted_samples[hi] - sorted_samples[lo])  # B


def _interval_sorted(sorted_samples, level):
    return Interval(
        _quantile_sorted(sorted_samples, (1 - level) / 2),
        _quantile_sorted(sorted_samples, (1 + level) / 2),
    )


def _covered(interval, y):
    return ((interval.lower <= y) & (y <= interval.upper)).to(y.dtype)  # B


def sample_interval(samples, level):
    r"""
    Central interval from sample quantiles at :math:`(1 \mp \mathrm{level})/2`,
    interpolated linearly between order statistics (as :func:`numpy.quantile`).

    :param samples: forecast draws, shape ``(S,) + B``.
    :param float level: nominal coverage in ``(0, 1)``, e.g. 0.9.
    :returns: ``Interval(lower, upper)``, each of shape ``B``.
    :rtype: Interval
    """
    level = _check_level("sample_interval", level)
    (samples,) = _tensors("sample_interval", samples=samples)
    if samples.dim() < 1 or samples.shape[0] == 0:
        raise ValueError(
            f"sample_interval: expected samples of shape (S, ...) with S >= 1 but got {tuple(samples.shape)}"
        )
    return _interval_sorted(_sort_samples(samples), level)


def interval_coverage(samples, y, level, reduction="mean"):
    """
    Fraction of observations inside the central ``level`` interval of the samples
    (bounds included); a calibrated forecast gives about ``level``.

    :param samples: forecast draws, shape ``(S,) + B``.
    :param y: observations, shape ``B``.
    :param float level: nominal coverage in ``(0, 1)``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"`` (0/1 indicators).
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    level = _check_level("interval_coverage", level)
    samples, y = _tensors("interval_coverage", samples=samples, y=y)
    _check_samples("interval_coverage", samples, y)
    interval = _interval_sorted(_sort_samples(samples), level)
    return _reduce(_covered(interval, y), reduction)


def interval_width(samples, level, reduction="mean"):
    """
    Width ``upper - lower`` of the central ``level`` interval of the samples.

    :param samples: forecast draws, shape ``(S,) + B``.
    :param float level: nominal coverage in ``(0, 1)``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    lower, upper = sample_interval(samples, _check_level("interval_width", level))
    return _reduce(upper - lower, reduction)


def gaussian_interval(loc, scale, level):
    r"""
    Central interval of :math:`\mathcal N(\mathrm{loc}, \mathrm{scale}^2)`:
    :math:`\mu \pm \Phi^{-1}\!\left(\frac{1 + \mathrm{level}}{2}\right)\sigma`.

    :param loc: forecast mean, shape ``B``.
    :param scale: forecast standard deviation > 0, broadcastable with ``loc``.
    :param float level: nominal coverage in ``(0, 1)``.
    :returns: ``Interval(lower, upper)`` of the broadcast shape.
    :rtype: Interval
    """
    level = _check_level("gaussian_interval", level)
    loc, scale = _tensors("gaussian_interval", loc=loc, scale=scale)
    _check_scale("gaussian_interval", scale)
    half = _normal_quantile((1 + level) / 2) * scale
    return Interval(loc - half, loc + half)


def gaussian_interval_coverage(loc, scale, y, level, reduction="mean"):
    """
    Fraction of observations inside :func:`gaussian_interval` (bounds included).

    :param loc: forecast mean, broadcastable to ``B``.
    :param scale: forecast standard deviation > 0, broadcastable to ``B``.
    :param y: observations, shape ``B``.
    :param float level: nominal coverage in ``(0, 1)``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"`` (0/1 indicators).
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    loc, scale, y = _tensors("gaussian_interval_coverage", loc=loc, scale=scale, y=y)
    _check_broadcast("gaussian_interval_coverage", "loc", loc, y)
    _check_broadcast("gaussian_interval_coverage", "scale", scale, y)
    return _reduce(_covered(gaussian_interval(loc, scale, level), y), reduction)


def gaussian_interval_width(scale, level, reduction="mean"):
    r"""
    Width :math:`2\,\Phi^{-1}\!\left(\frac{1 + \mathrm{level}}{2}\right)\sigma` of
    :func:`gaussian_interval`.

    :param scale: forecast standard deviation > 0, shape ``B``.
    :param float level: nominal coverage in ``(0, 1)``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    level = _check_level("gaussian_interval_width", level)
    (scale,) = _tensors("gaussian_interval_width", scale=scale)
    _check_scale("gaussian_interval_width", scale)
    return _reduce(2 * _normal_quantile((1 + level) / 2) * scale, reduction)


#: Elements in one chunk of the path scores' temporaries (32 MiB in float64): windows, and for
#: the variogram score also samples, are processed in chunks of at most this many elements.
_CHUNK_ELEMENTS = 2**22


def _check_finite(fn, name, value):
    bad = (~torch.isfinite(value)).sum().item()
    if bad:
        raise ValueError(
            f"{fn}: expected finite {name} but got {bad} NaN or infinite values of {value.numel()}; "
            "drop or impute them before scoring"
        )


def _path_tensors(fn, samples, y, min_samples=1):
    """Validated ``samples`` ``(S,) + B + (H,)`` and ``y`` ``B + (H,)`` of one float dtype."""
    samples, y = _tensors(fn, samples=samples, y=y)
    if y.dim() < 1 or y.shape[-1] == 0:
        raise ValueError(
            f"{fn}: expected y of shape B + (H,) with H >= 1 horizon steps along the last dim but got "
            f"{tuple(y.shape)}; a path score needs the whole horizon of each window"
        )
    _check_samples(fn, samples, y)
    if samples.shape[0] < min_samples:
        raise ValueError(
            f"{fn}: fair=True needs at least {min_samples} samples but got {samples.shape[0]}; "
            "pass fair=False"
        )
    _check_finite(fn, "samples", samples)
    _check_finite(fn, "y", y)
    return samples, y


def _path_samples(fn, samples):
    """Validated ``samples`` ``(S,) + B + (H,)`` (no observations)."""
    (samples,) = _tensors(fn, samples=samples)
    if samples.dim() < 2 or 0 in samples.shape[:1] + samples.shape[-1:]:
        raise ValueError(
            f"{fn}: expected samples of shape (S,) + B + (H,) with S >= 1 draws along dim 0 and H >= 1 "
            f"horizon steps along the last dim but got {tuple(samples.shape)}"
        )
    _check_finite(fn, "samples", samples)
    return samples


def _flat_paths(samples, y):
    """``samples`` as ``(S, N, H)`` and ``y`` as ``(N, H)``, with ``N`` the number of windows."""
    horizon = y.shape[-1]
    return samples.reshape(samples.shape[0], -1, horizon), y.reshape(-1, horizon)  # (S, N, H), (N, H)


def _energy_chunk(x, obs, fair):
    """Energy score of ``n`` windows: paths ``x`` ``(n, S, H)``, observations ``obs`` ``(n, H)``."""
    num_samples = x.shape[1]
    err = (x - obs[:, None]).norm(dim=-1).mean(-1)  # (n,)
    # distances are translation invariant: centring keeps the Gram form accurate
    centred = x - x.mean(1, keepdim=True)  # (n, S, H)
    sq_norm = centred.pow(2).sum(-1)  # (n, S)
    dist_sq = sq_norm[:, :, None] + sq_norm[:, None, :] - 2 * centred @ centred.transpose(1, 2)  # (n, S, S)
    dist_sq.diagonal(dim1=1, dim2=2).zero_()
    pair_sum = dist_sq.clamp_min_(0).sqrt_().sum((1, 2))  # (n,), over ordered pairs i != j
    denom = num_samples * (num_samples - 1) if fair else num_samples**2
    return err - 0.5 * pair_sum / denom  # (n,)


def energy_score(samples, y, fair=True, reduction="mean"):
    r"""
    Energy score of the horizon path, the multivariate CRPS:

    .. math:: \mathrm{ES} = \mathbb E\|X - y\| - \tfrac12\,\mathbb E\|X - X'\|,

    with :math:`\|\cdot\|` the Euclidean norm over the ``H`` steps and :math:`X, X'`
    independent sample paths. Lower is better; a strictly proper score of the joint law of
    the path, so it rewards the right dependence across steps as well as the right
    marginals; for ``H = 1`` it is the CRPS.

    ``fair=True`` (default, as :func:`crps_samples`) divides the sum of the
    :math:`S(S-1)` pairwise distances by :math:`S(S-1)`: an unbiased estimate of the score
    of the distribution the paths were drawn from, whatever ``S`` (scoringrules'
    ``estimator="fair"``). ``fair=False`` divides by :math:`S^2`: the exact score of the
    empirical distribution of the paths (scoringrules' default ``estimator="nrg"``).

    Cost :math:`O(S^2 H)` per window through the Gram matrix of the centred paths, computed
    in float64 in chunks of windows, so the memory beyond the inputs stays bounded
    (``S = 100``, ``H = 720``: about 60 windows a chunk).

    >>> samples = torch.tensor([[[0.0, 0.0]], [[3.0, 4.0]]])  # (S=2, B=1, H=2)
    >>> energy_score(samples, torch.zeros(1, 2))  # 0.5 * (0 + 5) - 0.5 * 10 / 2
    tensor(0.)
    >>> energy_score(samples, torch.zeros(1, 2), fair=False)  # 2.5 - 0.5 * 10 / 4
    tensor(1.2500)

    :param samples: joint sample paths, shape ``(S,) + B + (H,)``.
    :param y: observed paths, shape ``B + (H,)``.
    :param bool fair: unbiased (``True``, needs ``S >= 2``) or empirical (``False``).
    :param str reduction: ``"mean"`` or ``"sum"`` over windows, or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` (one score per window) for ``"none"``.
    """
    samples, y = _path_tensors("energy_score", samples, y, min_samples=2 if fair else 1)
    flat, obs = _flat_paths(samples, y)  # (S, N, H), (N, H)
    num_samples, _, horizon = flat.shape
    chunk = max(1, _CHUNK_ELEMENTS // (num_samples * max(num_samples, horizon)))
    scores = [
        _energy_chunk(x.transpose(0, 1).to(torch.float64), o.to(torch.float64), fair)  # (n,)
        for x, o in zip(flat.split(chunk, 1), obs.split(chunk, 0))
    ]
    return _reduce(torch.cat(scores).reshape(y.shape[:-1]).to(y.dtype), reduction)  # B


def variogram_score(samples, y, p=0.5, fair=True, reduction="mean"):
    r"""
    Variogram score of order ``p`` of the horizon path (Scheuerer and Hamill, 2015), with
    unit weights:

    .. math:: \mathrm{VS}_p = \sum_{i=1}^H \sum_{j=1}^H
        \left(\mathbb E|X_i - X_j|^p - |y_i - y_j|^p\right)^2.

    Lower is better. It compares the forecast's and the observation's increments between
    every pair of steps, so it is sensitive to the dependence across the horizon, and
    blind to a shift of the whole path.

    ``fair=True`` (default) estimates :math:`\mathbb E|X_i - X_j|^p` without bias, by
    subtracting the sample variance of :math:`|X_i - X_j|^p` divided by ``S``
    (scoringrules' ``estimator="fair"``); ``fair=False`` plugs in the sample mean
    (scoringrules' default ``estimator="nrg"``).

    Cost :math:`O(S H^2)` per window (about 5e7 terms at ``S = 100``, ``H = 720``, some
    0.5 s on one CPU core), one lag at a time over chunks of windows, so the memory beyond
    the inputs stays bounded: far dearer than :func:`energy_score` at long horizons.

    :param samples: joint sample paths, shape ``(S,) + B + (H,)``.
    :param y: observed paths, shape ``B + (H,)``.
    :param float p: order, > 0 (0.5 is the usual choice).
    :param bool fair: unbiased (``True``, needs ``S >= 2``) or plug-in (``False``).
    :param str reduction: ``"mean"`` or ``"sum"`` over windows, or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` (one score per window) for ``"none"``.
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
        raise ValueError(f"variogram_score: expected an order p > 0 (e.g. 0.5) but got p={p!r}")
    samples, y = _path_tensors("variogram_score", samples, y, min_samples=2 if fair else 1)
    flat, obs = _flat_paths(samples, y)  # (S, N, H), (N, H)
    num_samples, _, horizon = flat.shape
    power = torch.sqrt if p == 0.5 else (lambda t: t.pow(p))
    windows = max(1, _CHUNK_ELEMENTS // (num_samples * horizon))
    scores = []
    for x, o in zip(flat.split(windows, 1), obs.split(windows, 0)):
        x, o = x.to(torch.float64), o.to(torch.float64)  # (S, n, H), (n, H)
        score = torch.zeros(o.shape[0], dtype=torch.float64, device=o.device)  # (n,)
        for lag in range(1, horizon):  # the pairs (i, i + lag), contiguous slices
            var = power((x[..., lag:] - x[..., :-lag]).abs())  # (S, n, H - lag)
            obs_var = power((o[:, lag:] - o[:, :-lag]).abs())  # (n, H - lag)
            mean = var.mean(0)  # (n, H - lag)
            sq_err = (mean - obs_var).pow(2)  # (n, H - lag)
            if fair:  # minus the unbiased sample variance of the mean
                sample_var = (var.pow(2).sum(0) - num_samples * mean.pow(2)) / (num_samples - 1)
                sq_err = sq_err - sample_var / num_samples
            score += sq_err.sum(-1)
        scores.append(2 * score)  # (n,), ordered pairs: i < j and i > j
    return _reduce(torch.cat(scores).reshape(y.shape[:-1]).to(y.dtype), reduction)  # B


def crps_sum(samples, y, fair=True, reduction="mean"):
    r"""
    CRPS of the horizon sum (CRPS-sum): :func:`crps_samples` of the sums
    :math:`\sum_{h=1}^H X_h` of the sample paths against :math:`\sum_{h=1}^H y_h`.

    The sum's spread depends on the correlation of the steps: paths that draw the steps
    (nearly) independently understate the uncertainty of the total when errors persist
    across the horizon. Lower is better; it has the units of ``y`` times ``H``.

    :param samples: joint sample paths, shape ``(S,) + B + (H,)``.
    :param y: observed paths, shape ``B + (H,)``.
    :param bool fair: unbiased (``True``, needs ``S >= 2``) or empirical (``False``); see
        :func:`crps_samples`.
    :param str reduction: ``"mean"`` or ``"sum"`` over windows, or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` (one score per window) for ``"none"``.
    """
    samples, y = _path_tensors("crps_sum", samples, y, min_samples=2 if fair else 1)
    sums = _sort_samples(samples.sum(-1))  # (S,) + B
    return _reduce(_crps_sorted(sums, y.sum(-1), fair), reduction)  # B


def sum_interval(samples, level):
    r"""
    Central ``level`` interval of the horizon sum :math:`\sum_h X_h`, from the sample
    quantiles of the path sums (as :func:`sample_interval`).

    :param samples: joint sample paths, shape ``(S,) + B + (H,)``.
    :param float level: nominal coverage in ``(0, 1)``, e.g. 0.9.
    :returns: ``Interval(lower, upper)``, each of shape ``B``.
    :rtype: Interval
    """
    return _sum_interval("sum_interval", samples, level)


def _sum_interval(fn, samples, level):
    level = _check_level(fn, level)
    samples = _path_samples(fn, samples)
    return _interval_sorted(_sort_samples(samples.sum(-1)), level)  # B


def sum_coverage(samples, y, level, reduction="mean"):
    r"""
    Fraction of windows whose horizon sum :math:`\sum_h y_h` lies inside
    :func:`sum_interval` (bounds included). A calibrated forecast gives about
    ``level`` (for sample quantiles of ``S`` draws, about
    :math:`\mathrm{level}\,(S-1)/(S+1)` in expectation: 0.88 for 90% at ``S = 100``).

    :param samples: joint sample paths, shape ``(S,) + B + (H,)``.
    :param y: observed paths, shape ``B + (H,)``.
    :param float level: nominal coverage in ``(0, 1)``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"`` (0/1 indicators of shape ``B``).
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    level = _check_level("sum_coverage", level)
    samples, y = _path_tensors("sum_coverage", samples, y)
    interval = _interval_sorted(_sort_samples(samples.sum(-1)), level)  # B
    return _reduce(_covered(interval, y.sum(-1)), reduction)


def sum_interval_width(samples, level, reduction="mean"):
    """
    Width ``upper - lower`` of :func:`sum_interval`, the central ``level`` interval of the
    horizon sum.

    :param samples: joint sample paths, shape ``(S,) + B + (H,)``.
    :param float level: nominal coverage in ``(0, 1)``.
    :param str reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    :returns: 0-dim tensor, or shape ``B`` for ``"none"``.
    """
    lower, upper = _sum_interval("sum_interval_width", samples, level)
    return _reduce(upper - lower, reduction)


def path_metrics(samples, y, *, fair=True, variogram=False):
    """
    All path scores of one forecast, averaged over windows:

    - ``energy``: :func:`energy_score`;
    - ``crps_sum``: :func:`crps_sum`;
    - ``coverage_50_sum``, ``width_50_sum``, ``coverage_90_sum``, ``width_90_sum``:
      :func:`sum_coverage` and :func:`sum_interval_width` of the central 50% and 90%
      intervals of the horizon sum;
    - ``variogram``: :func:`variogram_score` with ``p = 0.5``, only with ``variogram=True``
      (:math:`O(S H^2)` per window).

    :param samples: joint sample paths, shape ``(S,) + B + (H,)``.
    :param y: observed paths, shape ``B + (H,)`` (keyword only).
    :param bool fair: estimator of the energy score, CRPS-sum and variogram score.
    :param bool variogram: also compute the variogram score.
    :returns: metric name to value.
    :rtype: dict(str, float)
    """
    samples, y = _path_tensors("path_metrics", samples, y, min_samples=2 if fair else 1)
    sums = _sort_samples(samples.sum(-1))  # (S,) + B
    y_sum = y.sum(-1)  # B
    out = {
        "energy": energy_score(samples, y, fair=fair).item(),
        "crps_sum": _crps_sorted(sums, y_sum, fair).mean().item(),
    }
    for lvl in (0.5, 0.9):
        interval = _interval_sorted(sums, lvl)  # B
        pct = round(100 * lvl)
        out[f"coverage_{pct}_sum"] = _covered(interval, y_sum).mean().item()
        out[f"width_{pct}_sum"] = (interval.upper - interval.lower).mean().item()
    if variogram:
        out["variogram"] = variogram_score(samples, y, p=0.5, fair=fair).item()
    return out


def forecast_metrics(samples=None, loc=None, scale=None, *, y, fair=True, paths=False):
    """
    All metrics of one forecast, averaged over every element of ``y``.

    Give ``samples``, or ``loc`` and ``scale``, or all three:

    - ``mse``, ``mae``: of the point forecast ``loc`` if given, else the sample mean;
    - ``crps``, ``coverage_50``, ``width_50``, ``coverage_90``, ``width_90``: from the
      samples if given (:func:`crps_samples` with ``fair``, sample quantiles), else
      in closed form from the Gaussian ``loc``, ``scale``;
    - ``nll``: :func:`gaussian_nll`, only when ``loc`` and ``scale`` are given;
    - with ``paths=True``, after those, the path scores of :func:`path_metrics` (averaged
      over windows, the last dim of ``y`` being the horizon): ``energy``, ``crps_sum``,
      ``coverage_50_sum``, ``width_50_sum``, ``coverage_90_sum``, ``width_90_sum``. They
      need ``samples`` that are joint sample paths.

    :param samples: forecast draws, shape ``(S,) + B``.
    :param loc: forecast mean, shape ``B``.
    :param scale: forecast standard deviation > 0, broadcastable to ``B``.
    :param y: observations, shape ``B`` (keyword only).
    :param bool fair: estimator for the sample CRPS (and the path scores), see
        :func:`crps_samples`.
    :param bool paths: also return the path scores (needs ``samples``).
    :returns: metric name to value.
    :rtype: dict(str, float)
    """
    if samples is None and (loc is None or scale is None):
        raise ValueError("forecast_metrics: expected samples, or loc and scale, but got neither")
    if paths and samples is None:
        raise ValueError(
            "forecast_metrics: paths=True needs joint sample paths; pass samples of shape (S,) + y.shape"
        )
    if scale is not None and loc is None:
        raise ValueError("forecast_metrics: got scale without loc; pass loc too")
    named = {"y": y}
    for name, value in (("samples", samples), ("loc", loc), ("scale", scale)):
        if value is not None:
            named[name] = value
    tensors = dict(zip(named, _tensors("forecast_metrics", **named)))
    y = tensors["y"]
    if samples is not None:
        samples = tensors["samples"]
        _check_samples("forecast_metrics", samples, y)
        if fair and samples.shape[0] < 2:
            raise ValueError("forecast_metrics: fair=True needs at least 2 samples; pass fair=False")
    if loc is not None:
        loc = tensors["loc"]
        _check_same("forecast_metrics", "loc", loc, y)
    if scale is not None:
        scale = tensors["scale"]
        _check_broadcast("forecast_metrics", "scale", scale, y)
        _check_scale("forecast_metrics", scale)

    point = loc if loc is not None else samples.mean(0)  # B
    out = {"mse": mse(point, y).item(), "mae": mae(point, y).item()}
    if samples is not None:
        sorted_samples = _sort_samples(samples)  # (S,) + B
        out["crps"] = _crps_sorted(sorted_samples, y, fair).mean().item()
        intervals = {lvl: _interval_sorted(sorted_samples, lvl) for lvl in (0.5, 0.9)}
    else:
        out["crps"] = crps_gaussian(loc, scale, y).item()
        intervals = {lvl: gaussian_interval(loc, scale, lvl) for lvl in (0.5, 0.9)}
    if scale is not None:
        out["nll"] = gaussian_nll(loc, scale, y).item()
    for lvl, interval in intervals.items():
        pct = round(100 * lvl)
        out[f"coverage_{pct}"] = _covered(interval, y).mean().item()
        out[f"width_{pct}"] = (interval.upper - interval.lower).expand(y.shape).mean().item()
    if paths:
        out.update(path_metrics(samples, y, fair=fair))
    return out

r"""Recalibrating the spread of a sampled forecast on held-out windows, two numbers at a time.

A Monte Carlo forecast (a :class:`~vdn_pyro.models.ForecastPrediction` with one Gaussian
component per draw and an exact predictive mean :math:`\mu(x)`) has two sources of spread: the
components' means :math:`m_s(x)` around :math:`\mu(x)` (in the roll-out forecaster, the rolled
latents: they move every step of a path together) and each component's own noise (independent
per step). :class:`SpreadRecalibration` scales the two separately,

.. math:: y_s = \mu(x) + a\,(m_s(x) - \mu(x)) + b\,(y^{\text{base}}_s - m_s(x)),

so the component means become :math:`\mu + a (m_s - \mu)` and the component scales
:math:`b\,\sigma_s`; the predictive mean stays :math:`\mu(x)`. The path factor :math:`a` sets
the spread of the horizon's total (the noise averages out of it), and each is fitted on
validation windows by the proper score that sees it: :math:`a` by the CRPS of the horizon sum,
then :math:`b` by the marginal CRPS (:meth:`SpreadRecalibration.fit`). A step's spread holds
both, so :math:`b` is what makes the marginals right once :math:`a` has set the sum's spread; it
recovers the true noise only where the paths' spread does not dominate a step's.

Where the paths' spread does dominate, the marginal CRPS of the draws barely changes as
:math:`b` shrinks, while the density the forecast reports (a mixture of S Gaussians) turns into
S narrow spikes and its log score grows. ``noise_score="nll"`` fits :math:`b` by that log score
instead; it errs the other way, because an S-component mixture needs wide components to fill the
gaps between them. On a synthetic 15-minute file made from ETTh1 (H = 96, a short smoke run,
validation) the roll-out's NLL / CRPS / energy were 1.064 / 0.315 / 3.794; the CRPS fit gave
1.412 / 0.314 / 3.788, the log-score fit 0.946 / 0.326 / 3.936. The CRPS is the default.

The energy score does not do for :math:`a`: on ETTh1 (H = 96, one seed, validation) it moved by
0.0003 between :math:`a = 1` and :math:`a = 1.25` while the 90% coverage of the horizon sum went
from 0.75 to 0.82. It is dominated by the marginal spread.
"""

import math

import torch

from vdn_pyro.metrics import crps_samples
from vdn_pyro.models.baselines import PostHocForecaster, drop_flat_windows
from vdn_pyro.models.forecaster import ForecastPrediction

#: The search of :meth:`SpreadRecalibration.fit`: factors 1.25**k (k = -6..6, 0.26 to 3.8), then
#: 1.025**j times the best of those (j = -9..9).
COARSE, FINE = 1.25, 1.025


def _search(score):
    """The factor that minimises ``score(factor)``, coarse then fine (32 evaluations)."""
    best = min((COARSE**k for k in range(-6, 7)), key=score)
    return min((best * FINE**j for j in range(-9, 10)), key=score)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_factor(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Expected {name} to be a finite number > 0, but got {value!r}.")
    return float(value)


class SpreadRecalibration(PostHocForecaster):
    r"""A trained Monte Carlo forecaster with its path spread and its per-step noise rescaled
    by two numbers fitted on held-out windows (see the module docstring).

    The base must answer ``predict(x, num_samples, batch_size)`` with one component per draw
    (``loc`` and ``scale`` of shape ``(S, B, H)``, ``samples`` drawn from them) and its exact
    predictive mean (``point``), as :class:`~vdn_pyro.models.RolloutForecaster` does. A model
    with one Gaussian component (a deterministic twin) has no path spread to scale: use
    :class:`~vdn_pyro.models.baselines.StudentTControl`.

    :param base: the trained model (left as it is).
    :param float path_factor: :math:`a` until :meth:`fit`.
    :param float noise_factor: :math:`b` until :meth:`fit`.
    """

    def __init__(self, base, path_factor=1.0, noise_factor=1.0):
        super().__init__(base)
        self.path_factor = _check_factor("path_factor", path_factor)
        self.noise_factor = _check_factor("noise_factor", noise_factor)

    def __repr__(self):
        return (
            f"SpreadRecalibration(path_factor={self.path_factor:.4g}, noise_factor={self.noise_factor:.4g}, "
            f"{self.base!r})"
        )

    @property
    def has_exact_marginal(self):
        """``False``: scored from the draws, like the base."""
        return False

    @torch.no_grad()
    def parts(self, x, num_samples=100, batch_size=None):
        r"""The base forecast split into its three parts: ``(point, spread, noise)`` with
        ``point`` :math:`\mu(x)` ``(B, H)``, ``spread`` :math:`m_s(x) - \mu(x)` and ``noise``
        :math:`y_s - m_s(x)`, each ``(S, B, H)``; and the base's component scales ``(S, B, H)``.

        :raises ValueError: when the base's prediction is not one component per draw with an
            exact mean.
        """
        pred = self.base.predict(x, num_samples, batch_size)
        if pred.point is None or pred.loc.shape != pred.samples.shape:
            raise ValueError(
                f"Expected a base prediction with one Gaussian component per draw and an exact mean, "
                f"but got {pred.loc.shape[0]} component(s) for {pred.samples.shape[0]} draws"
                f"{' and no exact mean' if pred.point is None else ''}; recalibrate a Monte Carlo "
                "forecaster such as RolloutForecaster (a one-Gaussian model: StudentTControl)."
            )
        point = pred.point  # (B, H)
        return point, pred.loc - point, pred.samples - pred.loc, pred.scale  # (B, H), (S, B, H) x 3

    @torch.no_grad()
    def fit(
        self, x, y, num_samples=100, batch_size=None, max_windows=1024, rounds=2, seed=0, noise_score="crps"
    ):
        r"""Fit :math:`a` and :math:`b` on the windows ``(x, y)`` by coordinate descent: :math:`a`
        minimises the CRPS of the horizon sum with :math:`b` held, then :math:`b` the marginal
        ``noise_score`` with :math:`a` held, ``rounds`` times, from :math:`a = b = 1`; each a search over
        factors 0.26 to 3.8, to 2.5% (:data:`COARSE`, :data:`FINE`). Every candidate is scored on
        the same ``num_samples`` base draws per window (common random numbers), drawn on a fork
        of torch's random state seeded with ``seed`` (the caller's stream is left as it was).

        Flat windows (look-back and target each one repeated value: a constant channel, a
        stretch of zeros) are left out, as :class:`~vdn_pyro.models.baselines.StudentTControl`
        leaves them out: a model forecasts them almost exactly, so their CRPS only grows with
        either factor and would pull both down for every other window.

        :param x: windows ``(N, L)``. :param y: targets ``(N, H)``.
        :param int num_samples: base draws per window (at least 2).
        :param int batch_size: windows per base prediction (default all).
        :param int max_windows: fit on at most this many windows, evenly spaced (the draws are
            held in memory: ``3 * num_samples * max_windows * H`` numbers).
        :param int rounds: coordinate-descent rounds.
        :param int seed: seed of the base draws.
        :param str noise_score: ``"crps"``, the marginal CRPS of the draws, or ``"nll"``, the
            negative log density of the ``num_samples``-component mixture per element.
        :returns: dict with ``path_factor``, ``noise_factor``, the fitted forecast's ``crps_sum``,
            ``crps`` and ``nll`` on the windows fitted, ``crps_sum_base``, ``crps_base`` and
            ``nll_base`` (at
            :math:`a = b = 1`), ``windows`` (how many were fitted) and ``flat`` (how many flat
            windows were left out).
        :raises ValueError: for bad arguments, when every window is flat, or when the base's
            draws are not finite.
        """
        if noise_score not in ("crps", "nll"):
            raise ValueError(f"Expected noise_score 'crps' or 'nll', but got {noise_score!r}.")
        if not _is_int(num_samples) or num_samples < 2:
            raise ValueError(f"Expected num_samples to be an int >= 2, but got {num_samples!r}.")
        for name, value in (("rounds", rounds), ("max_windows", max_windows)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        if (
            not (torch.is_tensor(x) and torch.is_tensor(y))
            or x.dim() != 2
            or y.dim() != 2
            or x.shape[0] != y.shape[0]
        ):
            raise ValueError(
                f"Expected windows x (N, L) and targets y (N, H) with the same N, but got "
                f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}."
            )
        x, y, left_out = drop_flat_windows(x, y, "recalibrate on")
        if x.shape[0] > max_windows:  # evenly spaced, first and last included
            keep = torch.linspace(0, x.shape[0] - 1, max_windows).round().long()  # (max_windows,)
            x, y = x[keep], y[keep]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            point, spread, noise, scale = self.parts(x, num_samples, batch_size)  # (N, H), (S, N, H) x 3
        if not (torch.isfinite(spread).all() and torch.isfinite(noise).all()):
            raise ValueError(
                "Expected finite base draws to recalibrate, but the base forecast has NaN or inf."
            )
        y_sum, point_sum = y.sum(-1), point.sum(-1)  # (N,) x 2
        spread_sum, noise_sum = spread.sum(-1), noise.sum(-1)  # (S, N) x 2

        def crps_sum(a, b):
            return crps_samples(point_sum + a * spread_sum + b * noise_sum, y_sum).item()

        def crps(a, b):
            total = 0.0
            for i in range(0, y.shape[0], 256):  # windows in blocks: the sort is (S, 256, H)
                s = slice(i, i + 256)
                draws = point[s] + a * spread[:, s] + b * noise[:, s]  # (S, n, H)
                total += crps_samples(draws, y[s], reduction="sum").item()
            return total / y.numel()

        def nll(a, b):
            total = 0.0
            for i in range(0, y.shape[0], 256):
                s = slice(i, i + 256)
                loc = point[s] + a * spread[:, s]  # (S, n, H)
                mixture = ForecastPrediction(loc, loc, b * scale[:, s])  # the reported density
                total -= mixture.log_prob(y[s]).sum().item()
            return total / y.numel()

        marginal = nll if noise_score == "nll" else crps
        a, b = 1.0, 1.0
        base = {"crps_sum_base": crps_sum(a, b), "crps_base": crps(a, b), "nll_base": nll(a, b)}
        for _ in range(rounds):
            a = _search(lambda f, b=b: crps_sum(f, b))
            b = _search(lambda f, a=a: marginal(a, f))
        self.path_factor, self.noise_factor = a, b
        fitted = {"crps_sum": crps_sum(a, b), "crps": crps(a, b), "nll": nll(a, b)}
        return {
            "path_factor": a,
            "noise_factor": b,
            **fitted,
            **base,
            "windows": x.shape[0],
            "flat": left_out,
        }

    @torch.no_grad()
    def predict(self, x, num_samples=100, batch_size=None):
        r"""The recalibrated forecast: the base's draws with their spread scaled by :math:`a` and
        their noise by :math:`b`, so the components are :math:`N(\mu + a(m_s - \mu), b\,\sigma_s)`.

        :param x: ``(B, L)``. :param int num_samples: S.
        :param int batch_size: windows per base prediction (default all).
        :returns: a :class:`~vdn_pyro.models.ForecastPrediction` with samples, loc and scale
            ``(S, B, H)`` and the base's exact mean ``(B, H)``.
        """
        point, spread, noise, scale = self.parts(x, num_samples, batch_size)
        loc = point + self.path_factor * spread  # (S, B, H)
        return ForecastPrediction(loc + self.noise_factor * noise, loc, self.noise_factor * scale, point)

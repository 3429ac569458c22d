r"""Point-forecast baselines with a Gaussian predictive, in the same interface as
:class:`~vdn_pyro.models.Forecaster`.

Both baselines produce a point forecast :math:`\hat y(x)` and a per-step predictive scale
:math:`\sigma_h`, so they are scored by the same harness (CRPS, NLL, coverage) as the
distributional forecaster. The scale is fitted after training by :meth:`calibrate`: the root mean
squared residual of each horizon step on the data passed (the training windows in the benchmark),
which is the maximum-likelihood scale of a Gaussian with that mean.

- :class:`DLinear`: a re-implementation of DLinear (Zeng et al., "Are Transformers Effective for
  Time Series Forecasting?", AAAI 2023): moving-average trend plus remainder, each mapped to the
  horizon by one linear layer shared across channels; trained on the mean squared error (a
  Gaussian likelihood with unit scale).
- :class:`RepeatLast`: repeat the last observed value over the horizon; nothing to train.
- :class:`StudentTControl`: a Student-t on top of a trained model with one Gaussian per element
  (the deterministic twin): its mean, its scale times c, and nu degrees of freedom, with one
  chi-square mixing variable per step or one per path (a multivariate t over the horizon, whose
  paths move their whole scale together); nu and c fitted by maximum likelihood. Its
  :class:`StudentTPrediction` is scored exactly (:func:`crps_student_t`, the t log density and
  quantiles, :func:`student_t_cdf`).

DLinear is linear in the (instance-normalised) window: since
:math:`W_t\,\mathrm{MA}_k(x) + W_s\,(x - \mathrm{MA}_k(x)) = W x` when :math:`W_t = W_s = W`,
every DLinear is a linear map :math:`\mathbb{R}^L \to \mathbb{R}^H` plus a bias and every such map is
a DLinear. So its least-squares fit has a closed form (:meth:`DLinear.fit_least_squares`, with an
optional ridge penalty), the minimiser that gradient training only approaches.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from vdn_pyro.guides.trunks import DLinearTrunk
from vdn_pyro.models.forecaster import ForecastPrediction, _is_int, check_forecast_inputs

__all__ = [
    "DF_RANGE",
    "DLinear",
    "PointForecaster",
    "RepeatLast",
    "StudentTControl",
    "StudentTPrediction",
    "crps_student_t",
    "normal_equations",
    "solve_ridge",
    "student_t_cdf",
    "student_t_quantile",
]


class PointForecaster(PyroModule):
    """Base class: a point forecast :meth:`point` with a Gaussian of per-step scale ``scale``
    (a buffer of shape ``(H,)``, 1 until :meth:`calibrate` is called).

    ``model(x, y)`` scores ``y ~ Normal(point(x), scale)``, so :func:`~vdn_pyro.fit` with unit
    scale minimises half the sum of squared errors. The guide is empty.

    :param int lookback: look-back length L.
    :param int horizon: horizon H.
    """

    deterministic = True

    def __init__(self, lookback, horizon):
        super().__init__()
        for name, value in (("lookback", lookback), ("horizon", horizon)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        self.lookback, self.horizon = lookback, horizon
        self.register_buffer("scale", torch.ones(horizon))  # (H,)

    def check_inputs(self, x, y=None):
        """See :func:`~vdn_pyro.models.forecaster.check_forecast_inputs`."""
        check_forecast_inputs(x, y, self.lookback, self.horizon)

    def point(self, x):
        """Point forecast ``(B, [T,] L) -> (B, [T,] H)``."""
        raise NotImplementedError

    def model(self, x, y=None, *, num_data=None):
        """``y ~ Normal(point(x), scale)`` under the data plate (dim -2).

        :param x: ``(B, [T,] L)``. :param y: ``(B, [T,] H)`` or ``None``.
        :returns: observations ``(B, [T,] H)``.
        """
        self.check_inputs(x, y)
        batch = x.shape[0]
        size = batch if num_data is None else int(num_data)
        subsample = None if size == batch else torch.arange(batch, device=x.device)
        event_dims = x.dim() - 1
        loc = self.point(x).unsqueeze(-1 - event_dims)  # (B, 1, [T,] H)
        fn = dist.Normal(loc, self.scale.expand_as(loc)).to_event(event_dims)
        with pyro.plate("data", size, subsample=subsample, dim=-2):
            obs = None if y is None else y.unsqueeze(1)  # (B, 1, [T,] H)
            out = pyro.sample("obs", fn, obs=obs)
        return out.squeeze(-1 - event_dims)

    def guide(self, x, y=None, *, num_data=None):
        """Empty: a point forecaster has no latent variables."""
        self.check_inputs(x, y)

    @torch.no_grad()
    def calibrate(self, x, y, batch_size=4096):
        """Set ``scale`` to the root mean squared residual of each horizon step.

        :param x: windows ``(N, [T,] L)``. :param y: ``(N, [T,] H)``.
        :returns: the new scale ``(H,)``.
        """
        self.check_inputs(x, y)
        total = torch.zeros(self.horizon, dtype=self.scale.dtype, device=self.scale.device)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            err = (yb - self.point(xb)) ** 2  # (b, [T,] H)
            total += err.reshape(-1, self.horizon).sum(0)  # (H,)
        count = y.numel() // self.horizon
        self.scale.copy_((total / count).sqrt().clamp_min(1e-6))
        return self.scale.clone()

    @torch.no_grad()
    def predict(self, x, num_samples=100, batch_size=None):
        """Gaussian predictive: one component, ``num_samples`` draws.

        :param x: ``(B, [T,] L)``. :param int num_samples: S.
        :param int batch_size: windows per forward pass (default all).
        :returns: a :class:`~vdn_pyro.models.ForecastPrediction`.
        """
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, but got {num_samples!r}.")
        self.check_inputs(x)
        parts = x.split(batch_size) if batch_size else (x,)
        loc = torch.cat([self.point(xb) for xb in parts])[None]  # (1, B, [T,] H)
        scale = self.scale.expand_as(loc)  # (1, B, [T,] H)
        noise = torch.randn((num_samples,) + loc.shape[1:], dtype=loc.dtype, device=loc.device)
        return ForecastPrediction(loc + scale * noise, loc, scale)  # samples (S, B, [T,] H)


class DLinear(PointForecaster):
    r"""DLinear: :math:`\hat y = W_t\,\mathrm{MA}_k(x) + W_s\,(x - \mathrm{MA}_k(x)) + b`,
    shared across channels (channel-independent windows).

    :param int lookback: L.
    :param int horizon: H.
    :param int kernel_size: moving-average length (25 in the paper).
    :param instance_norm: ``None`` (the paper's DLinear) or ``"last"`` (subtract the last value
        first and add it back, as NLinear).
    """

    def __init__(self, lookback, horizon, kernel_size=25, instance_norm=None):
        super().__init__(lookback, horizon)
        self.net = DLinearTrunk(lookback, horizon, kernel_size, instance_norm)

    def point(self, x):
        out = self.net(x)  # (B, [T,] H)
        offset = self.net.offset(x)  # (B, [T,] 1) or None
        return out if offset is None else out + offset

    def normalise(self, x):
        """The window the linear maps see: ``x`` minus its instance-normalisation offset.

        :param x: ``(..., L)``. :returns: ``(..., L)``.
        """
        off = self.net.offset(x)  # (..., 1) or None
        return x if off is None else x - off

    def target(self, x, y):
        """The target the linear maps fit: ``y`` minus the instance-normalisation offset of ``x``.

        :param x: ``(..., L)``. :param y: ``(..., H)``. :returns: ``(..., H)``.
        """
        off = self.net.offset(x)
        return y if off is None else y - off

    @torch.no_grad()
    def set_linear(self, weight, bias):
        r"""Make this DLinear the linear map ``weight @ x' + bias`` of the normalised window
        ``x'``: :math:`W_t = W_s = W`, the bias on the trend layer.

        :param weight: ``(H, L)``. :param bias: ``(H,)``.
        """
        weight = torch.as_tensor(weight)
        bias = torch.as_tensor(bias)
        expected = (self.horizon, self.lookback)
        if tuple(weight.shape) != expected or tuple(bias.shape) != (self.horizon,):
            raise ValueError(
                f"Expected weight {expected} and bias ({self.horizon},), but got "
                f"{tuple(weight.shape)} and {tuple(bias.shape)}."
            )
        dtype = self.net.trend.weight.dtype
        for layer in (self.net.trend, self.net.season):
            layer.weight.copy_(weight.to(dtype))
            layer.bias.zero_()
        self.net.trend.bias.copy_(bias.to(dtype))

    @torch.no_grad()
    def fit_least_squares(self, x, y, ridge=0.0, batch_size=8192):
        r"""Closed-form (ridge) least-squares fit, then :meth:`calibrate` on the same data.

        Minimises :math:`\frac1N \sum_n \lVert y'_n - W x'_n - b\rVert^2 + \lambda \lVert W
        \rVert_F^2` over the normalised windows (the bias is not penalised), in float64.

        :param x: windows ``(N, [T,] L)``. :param y: targets ``(N, [T,] H)``.
        :param float ridge: :math:`\lambda \ge 0`, per observation.
        :returns: ``self``.
        """
        self.check_inputs(x, y)
        gram, cross, count = normal_equations(self, x, y, batch_size)
        self.set_linear(*solve_ridge(gram, cross, count, ridge))
        self.calibrate(x, y)
        return self


@torch.no_grad()
def normal_equations(model, x, y, batch_size=8192):
    r"""Sufficient statistics of a least-squares fit of a :class:`DLinear`, in float64.

    :param DLinear model: gives the instance normalisation.
    :param x: windows ``(N, [T,] L)``. :param y: targets ``(N, [T,] H)``.
    :returns: ``(gram, cross, count)``: :math:`\sum [x';1][x';1]^T` ``(L + 1, L + 1)``,
        :math:`\sum [x';1]\,y'^T` ``(L + 1, H)`` and the number of windows.
    """
    x = x.reshape(-1, x.shape[-1])  # (N', L)
    y = y.reshape(-1, y.shape[-1])  # (N', H)
    length = x.shape[-1]
    gram = torch.zeros(length + 1, length + 1, dtype=torch.float64)
    cross = torch.zeros(length + 1, y.shape[-1], dtype=torch.float64)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        design = model.normalise(xb).double()  # (b, L)
        design = torch.cat([design, design.new_ones(design.shape[0], 1)], -1)  # (b, L + 1)
        gram += design.T @ design
        cross += design.T @ model.target(xb, yb).double()
    return gram, cross, x.shape[0]


def solve_ridge(gram, cross, count, ridge=0.0):
    r"""Solve the ridge normal equations of :func:`normal_equations`.

    :param float ridge: penalty :math:`\lambda \ge 0` per observation on the weights (not the
        bias); a relative floor of 1e-10 keeps a rank-deficient design (e.g. the last value of an
        NLinear window, always 0) solvable.
    :returns: ``(weight, bias)`` of shapes ``(H, L)`` and ``(H,)``, float64.
    """
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"Expected ridge to be a finite number >= 0, but got {ridge!r}.")
    length = gram.shape[0] - 1
    penalty = torch.full((length + 1,), float(ridge) * count, dtype=gram.dtype)
    penalty[-1] = 0.0
    floor = 1e-10 * gram.diagonal()[:-1].mean()
    penalty[:-1] += floor
    solution = torch.linalg.solve(gram + torch.diag(penalty), cross)  # (L + 1, H)
    return solution[:-1].T.contiguous(), solution[-1].clone()


class RepeatLast(PointForecaster):
    """Repeat the last observed value over the whole horizon (nothing to train)."""

    def point(self, x):
        return x[..., -1:].expand(x.shape[:-1] + (self.horizon,))  # (B, [T,] H)


# ----------------------------------------------------------------------------- Student-t controls
def _continued_fraction(a, b, x, iterations):
    """The continued fraction of :math:`I_x(a, b)` (modified Lentz), for ``x < (a + 1) / (a + b +
    2)``, where it converges fast and no denominator vanishes; each element stops changing once
    its relative step is below 1e-14."""
    c = torch.ones_like(x)
    d = 1 / (1 - (a + b) * x / (a + 1))
    fraction = d.clone()  # (n,)
    alive = torch.ones_like(x, dtype=torch.bool)
    for m in range(1, iterations + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 / (1 + even * d)
        c = 1 + even / c
        step = d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 / (1 + odd * d)
        c = 1 + odd / c
        step = step * d * c
        fraction = torch.where(alive, fraction * step, fraction)
        alive = alive & ((d * c - 1).abs() > 1e-14)
        if not bool(alive.any()):
            break
    return fraction


def _betainc(a, b, x, x1m=None, iterations=500, chunk=1 << 16):
    r"""Regularised incomplete beta :math:`I_x(a, b)`, elementwise, in float64; ``x`` in [0, 1]
    and ``x1m`` = 1 - x (pass it when it is known more accurately than ``1 - x``). By the
    continued fraction, on :math:`I_x(a, b) = 1 - I_{1-x}(b, a)` above ``(a + 1) / (a + b +
    2)``, in chunks of ``chunk`` elements (some 15 terms for a t with 4 degrees of freedom, 65
    for 1000)."""
    x1m = 1 - torch.as_tensor(x, dtype=torch.float64) if x1m is None else x1m
    tensors = torch.broadcast_tensors(*(torch.as_tensor(t, dtype=torch.float64) for t in (a, b, x, x1m)))
    shape = tensors[0].shape
    a, b, x, x1m = (t.reshape(-1) for t in tensors)  # (n,) each
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = torch.where(flip, b, a), torch.where(flip, a, b), torch.where(flip, x1m, x)
    log_front = a * torch.log(x) + b * torch.log1p(-x) - torch.log(a)
    log_front = log_front - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))  # (n,)
    parts = zip(a.split(chunk), b.split(chunk), x.split(chunk))
    fraction = torch.cat([x[:0]] + [_continued_fraction(*part, iterations) for part in parts])  # (n,)
    out = torch.where(x > 0, torch.exp(log_front) * fraction, torch.zeros_like(x))
    return torch.where(flip, 1 - out, out).reshape(shape)


def student_t_cdf(z, df):
    r"""CDF of the standard Student-t with ``df`` degrees of freedom,
    :math:`F_\nu(z) = 1 - \tfrac12 I_{\nu / (\nu + z^2)}(\nu/2, 1/2)` for :math:`z \ge 0`, in
    float64.

    :param z: standardised values, any shape. :param df: :math:`\nu > 0`, broadcasting.
    :returns: float64 tensor of the broadcast shape.
    """
    z = torch.as_tensor(z, dtype=torch.float64)
    df = torch.as_tensor(df, dtype=torch.float64)
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + z * z), z * z / (df + z * z))  # P(|T| > |z|) / 2
    return torch.where(z >= 0, 1 - tail, tail)


def student_t_quantile(level, df):
    r"""Quantile of the standard Student-t at ``level`` (one number, by bisection on
    :func:`student_t_cdf` to 1e-12).

    :param float level: in (0, 1). :param float df: :math:`\nu > 0`.
    :rtype: float
    """
    level, df = float(level), float(df)
    if not 0 < level < 1 or not df > 0:
        raise ValueError(f"Expected 0 < level < 1 and df > 0, but got level={level}, df={df}.")
    if level < 0.5:
        return -student_t_quantile(1 - level, df)
    lo, hi = 0.0, 1.0
    while float(student_t_cdf(hi, df)) < level:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(student_t_cdf(mid, df)) < level else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _t_log_density(z, df):
    """Log density of the standard Student-t at ``z`` (float64)."""
    half = (df + 1) / 2
    norm = torch.lgamma(half) - torch.lgamma(df / 2) - 0.5 * torch.log(df * math.pi)
    return norm - half * torch.log1p(z * z / df)


def crps_student_t(loc, scale, df, y):
    r"""CRPS of a location-scale Student-t, in closed form (:math:`\nu > 1`):

    .. math:: \mathrm{CRPS} = \sigma\Big[z\,(2F_\nu(z) - 1) + 2 f_\nu(z)\,\frac{\nu + z^2}{\nu - 1}
              - \frac{2\sqrt\nu\,B(\frac12, \nu - \frac12)}{(\nu - 1)\,B(\frac12, \frac\nu2)^2}\Big],
              \qquad z = \frac{y - \mu}{\sigma}.

    :param loc: :math:`\mu`. :param scale: :math:`\sigma > 0`. :param df: :math:`\nu > 1`.
    :param y: observations; all four broadcast.
    :returns: float64 tensor of the broadcast shape.
    """
    loc, scale, y = (torch.as_tensor(t, dtype=torch.float64) for t in (loc, scale, y))
    df = torch.as_tensor(df, dtype=torch.float64)
    if not bool((df > 1).all()):
        raise ValueError(f"Expected df > 1 for a finite CRPS, but got {df}.")
    z = (y - loc) / scale
    density = torch.exp(_t_log_density(z, df))
    half = torch.tensor(0.5, dtype=torch.float64)
    log_b1 = torch.lgamma(half) + torch.lgamma(df - 0.5) - torch.lgamma(df)  # log B(1/2, nu - 1/2)
    log_b2 = torch.lgamma(half) + torch.lgamma(df / 2) - torch.lgamma(df / 2 + 0.5)  # log B(1/2, nu/2)
    const = 2 * torch.sqrt(df) * torch.exp(log_b1 - 2 * log_b2) / (df - 1)
    cdf = student_t_cdf(z, df)
    return scale * (z * (2 * cdf - 1) + 2 * density * (df + z * z) / (df - 1) - const)


class StudentTPrediction:
    r"""A predictive with a location-scale Student-t marginal per element,
    :math:`y_h = \mu_h + \sigma_h\, \varepsilon_h \sqrt{\nu / W}`, :math:`\varepsilon_h \sim
    \mathcal N(0, 1)`, :math:`W \sim \chi^2_\nu`, and its joint sample paths: one mixing
    variable W per element (``joint=False``: independent steps) or one per path
    (``joint=True``: the multivariate t over the horizon, whose marginals are the same
    univariate t).

    :ivar torch.Tensor samples: sample paths ``(S, B, H)``.
    :ivar torch.Tensor loc: :math:`\mu` ``(B, H)``.
    :ivar torch.Tensor scale: :math:`\sigma` ``(B, H)``.
    :ivar float df: :math:`\nu > 1`.
    :ivar bool joint: one mixing variable per path.
    """

    def __init__(self, samples, loc, scale, df, joint):
        self.samples, self.loc, self.scale = samples, loc, scale
        self.df, self.joint = float(df), bool(joint)

    @property
    def mean(self):
        """Predictive mean ``(B, H)``."""
        return self.loc

    @property
    def stddev(self):
        r"""Predictive standard deviation ``(B, H)``: :math:`\sigma \sqrt{\nu / (\nu - 2)}`
        (infinite for :math:`\nu \le 2`)."""
        if self.df <= 2:
            return torch.full_like(self.scale, math.inf)
        return self.scale * math.sqrt(self.df / (self.df - 2))

    def _z(self, y):
        return (y.to(torch.float64) - self.loc.to(torch.float64)) / self.scale.to(torch.float64)

    def log_prob(self, y):
        """Exact marginal log density of each element of ``y`` ``(B, H)`` (float64)."""
        df = torch.tensor(self.df, dtype=torch.float64)
        return _t_log_density(self._z(y), df) - torch.log(self.scale.to(torch.float64))

    def path_log_prob(self, y):
        r"""Exact joint log density of each path ``y`` ``(B, H)``: the sum of the marginals
        (``joint=False``) or the multivariate t,

        .. math:: \log\Gamma(\tfrac{\nu + H}2) - \log\Gamma(\tfrac\nu2) - \tfrac H2 \log(\nu\pi)
                  - \sum_h \log\sigma_h
                  - \tfrac{\nu + H}2 \log\big(1 + \tfrac1\nu \textstyle\sum_h z_h^2\big).

        :returns: ``(B,)`` float64.
        """
        if not self.joint:
            return self.log_prob(y).sum(-1)
        df = torch.tensor(self.df, dtype=torch.float64)
        return _mvt_log_density(self._z(y), df) - torch.log(self.scale.to(torch.float64)).sum(-1)

    def cdf(self, y):
        """Marginal CDF at ``y`` (the PIT) ``(B, H)``."""
        return student_t_cdf(self._z(y), self.df).to(self.loc.dtype)

    def quantile(self, level):
        """Marginal quantile at ``level`` ``(B, H)`` (exact)."""
        return self.loc + student_t_quantile(level, self.df) * self.scale

    def affine(self, shift, factor):
        """The prediction of ``shift + factor * y`` (``factor > 0``; both broadcast to ``(B, 1)``
        or ``(B, H)``)."""
        return StudentTPrediction(
            self.samples * factor + shift, self.loc * factor + shift, self.scale * factor, self.df, self.joint
        )

    def scores(self, y):
        """The marginal metrics of the forecasting harness, exact for the t: MSE and MAE of the
        mean, closed-form CRPS (:func:`crps_student_t`), NLL (exact t log density), coverage
        and width of the central 50% and 90% intervals from the t quantiles.

        :param y: ``(B, H)``. :returns: dict of floats.
        """
        y64, loc = y.to(torch.float64), self.loc.to(torch.float64)
        scale = self.scale.to(torch.float64)
        out = {
            "mse": ((loc - y64) ** 2).mean().item(),
            "mae": (loc - y64).abs().mean().item(),
            "crps": crps_student_t(loc, scale, self.df, y64).mean().item(),
            "nll": -self.log_prob(y).mean().item(),
        }
        z = self._z(y).abs()
        for level in (0.5, 0.9):
            q = student_t_quantile((1 + level) / 2, self.df)
            pct = round(100 * level)
            out[f"coverage_{pct}"] = (z <= q).double().mean().item()
            out[f"width_{pct}"] = (2 * q * scale).mean().item()
        return out


def _mvt_log_density(z, df):
    """Log density of the standard multivariate t (identity scale) at paths ``z`` ``(..., H)``."""
    horizon = z.shape[-1]
    norm = torch.lgamma((df + horizon) / 2) - torch.lgamma(df / 2) - horizon / 2 * torch.log(df * math.pi)
    return norm - (df + horizon) / 2 * torch.log1p((z * z).sum(-1) / df)  # (...,)


#: Bounds of the degrees of freedom fitted by :meth:`StudentTControl.fit`.
DF_RANGE = (1.05, 1000.0)


def drop_flat_windows(x, y, purpose):
    """The windows ``(x, y)`` without the flat ones (look-back and target each one repeated
    value: a constant channel, a stretch of zeros), which a model forecasts almost exactly and
    which say nothing about the spread of the others.

    :param x: windows ``(N, L)``. :param y: targets ``(N, H)``.
    :param str purpose: what the windows are for, to name it in the error.
    :returns: ``(x, y, left_out)``: the windows that are not flat ``(N', L)``, ``(N', H)`` and
        how many were left out.
    :raises ValueError: when every window is flat.
    """
    flat = (x.amax(-1) == x.amin(-1)) & (y.amax(-1) == y.amin(-1))  # (N,)
    if bool(flat.all()):
        raise ValueError(
            f"Expected some windows that are not flat to {purpose}, but all {x.shape[0]} windows "
            "are one value repeated (constant channels?); drop constant channels from the data."
        )
    left_out = int(flat.sum())
    if left_out:
        x, y = x[~flat], y[~flat]  # (N', L), (N', H)
    return x, y, left_out


class PostHocForecaster:
    """A forecaster fitted on top of a trained one, ``base``, which it leaves as it is: ``eval``
    reaches the base, ``train`` does nothing (there is nothing of its own to train by SGD).

    :param base: the trained model, with ``predict(x, num_samples)``.
    :raises TypeError: when ``base`` has no ``predict``.
    """

    def __init__(self, base):
        if not callable(getattr(base, "predict", None)):
            raise TypeError(
                f"Expected a base model with predict(x, num_samples), but got {type(base).__name__}."
            )
        self.base = base

    def eval(self):
        if hasattr(self.base, "eval"):
            self.base.eval()
        return self

    def train(self, mode=True):
        return self


class StudentTControl(PostHocForecaster):
    r"""A Student-t control on top of a trained model whose predictive is one Gaussian per
    element (the deterministic twin, a point baseline): the same mean :math:`\mu(x)` and the
    scale :math:`c\,\sigma(x)` of that Gaussian, with :math:`\nu` degrees of freedom,

    .. math:: y_h = \mu_h(x) + c\,\sigma_h(x)\, \varepsilon_h \sqrt{\nu / W},

    with one :math:`W \sim \chi^2_\nu` per element (``joint=False``: a Student-t per step) or
    one per path (``joint=True``: a multivariate t over the horizon, every step of a path sharing
    one scale draw; its per-step marginal is the same univariate t). :math:`\nu` and :math:`c`
    are two numbers fitted by maximum likelihood (:meth:`fit`; the harness fits them on the
    validation windows): of the per-step t, or of the multivariate t's joint density of the
    paths.

    The base model is left as it is; it must answer ``predict(x, num_samples)`` with a
    one-component prediction (``loc``, ``scale`` of shape ``(1, B, H)``).

    :param base: the trained model.
    :param bool joint: one mixing variable per path.
    :param float df: :math:`\nu` until :meth:`fit`.
    :param float scale_factor: :math:`c` until :meth:`fit`.
    """

    def __init__(self, base, joint=False, df=10.0, scale_factor=1.0):
        super().__init__(base)
        self.joint = bool(joint)
        self.df, self.scale_factor = float(df), float(scale_factor)

    @torch.no_grad()
    def base_gaussian(self, x):
        """The base model's Gaussian ``(loc, scale)``, each ``(B, H)``, drawn on a fork of the
        random state (the caller's stream is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            pred = self.base.predict(x, 1)
        if pred.loc.shape[0] != 1:
            raise ValueError(
                f"Expected a base model with one Gaussian per element (a deterministic model), but its "
                f"prediction has {pred.loc.shape[0]} components; use the deterministic twin or a point "
                "baseline."
            )
        return pred.loc[0], pred.scale[0]  # (B, H) each

    def _nll(self, params, residuals):
        r"""Mean negative log-likelihood per element of the standardised residuals ``(N, H)`` at
        ``params = (a, log c)``, :math:`\nu` = ``DF_RANGE`` mapped through a sigmoid of a."""
        lo, hi = DF_RANGE
        df = lo + (hi - lo) * torch.sigmoid(params[0])
        log_c = params[1]
        z = residuals / torch.exp(log_c)
        if self.joint:
            return -_mvt_log_density(z, df).mean() / residuals.shape[-1] + log_c
        return -_t_log_density(z, df).mean() + log_c

    @torch.no_grad()
    def fit(self, x, y, batch_size=4096):
        r"""Fit :math:`\nu` and :math:`c` by maximum likelihood on the windows ``(x, y)`` (L-BFGS
        on two numbers, float64, :math:`\nu` kept in :data:`DF_RANGE`).

        Flat windows (look-back and target each one repeated value: a constant channel, a
        stretch of zeros) are left out of the fit. A model forecasts them almost exactly, and
        with a share of such near-zero residual paths the likelihood grows without bound as
        :math:`c \to 0` and :math:`\nu` falls to its floor, which ruins every other forecast (the
        multivariate t, whose one mixing variable per path can shrink a whole path, is hit
        first). They say nothing about the spread of the others.

        :param x: windows ``(N, L)``. :param y: targets ``(N, H)``.
        :param int batch_size: windows per base prediction.
        :returns: dict with ``df``, ``scale_factor`` and ``nll`` (mean negative log-likelihood per
            element of the fitted model: of the marginals, or of the joint density divided by H,
            over the windows that are not flat).
        :raises ValueError: when every window is flat.
        """
        x, y, _ = drop_flat_windows(x, y, "fit the t's degrees of freedom and scale")
        parts, log_base = [], 0.0
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            loc, scale = self.base_gaussian(xb)  # (b, H) each
            parts.append(((yb - loc) / scale).to(torch.float64))  # (b, H)
            log_base += torch.log(scale.to(torch.float64)).sum().item()
        residuals = torch.cat(parts)  # (N, H)
        log_base /= residuals.numel()
        lo, hi = DF_RANGE
        start = (10.0 - lo) / (hi - lo)
        params = torch.tensor(
            [math.log(start / (1 - start)), math.log(residuals.pow(2).mean().sqrt().item() * math.sqrt(0.8))],
            dtype=torch.float64,
            requires_grad=True,
        )
        optimizer = torch.optim.LBFGS(
            [params], lr=1, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
        )

        def closure():
            optimizer.zero_grad()
            with torch.enable_grad():
                loss = self._nll(params, residuals)
                loss.backward()
            return loss

        optimizer.step(closure)
        params = params.detach()
        self.df = float(lo + (hi - lo) * torch.sigmoid(params[0]))
        self.scale_factor = float(torch.exp(params[1]))
        nll = float(self._nll(params, residuals)) + log_base
        return {"df": self.df, "scale_factor": self.scale_factor, "nll": nll}

    @torch.no_grad()
    def predict(self, x, num_samples=100, batch_size=None):
        r"""The t predictive with ``num_samples`` joint sample paths.

        :param x: ``(B, L)``. :param int num_samples: S.
        :param int batch_size: windows per base prediction (default all).
        :returns: a :class:`StudentTPrediction` with samples ``(S, B, H)``.
        """
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, but got {num_samples!r}.")
        parts = [self.base_gaussian(xb) for xb in (x.split(batch_size) if batch_size else (x,))]
        loc = torch.cat([p[0] for p in parts])  # (B, H)
        scale = torch.cat([p[1] for p in parts]) * self.scale_factor  # (B, H)
        mixing_shape = (num_samples,) + (loc.shape[:-1] + (1,) if self.joint else loc.shape)  # (S, B, 1|H)
        df = torch.tensor(self.df, dtype=loc.dtype, device=loc.device)
        mixing = torch.distributions.Chi2(df).sample(mixing_shape)  # (S, B, 1|H)
        noise = torch.randn((num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device)  # (S, B, H)
        samples = loc + scale * noise * torch.sqrt(df / mixing)  # (S, B, H)
        return StudentTPrediction(samples, loc, scale, self.df, self.joint)

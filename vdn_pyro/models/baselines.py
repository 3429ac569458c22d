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

__all__ = ["DLinear", "PointForecaster", "RepeatLast", "normal_equations", "solve_ridge"]


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

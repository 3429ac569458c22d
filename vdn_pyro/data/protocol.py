r"""
The long-horizon forecasting protocol: chronological splits and a train-only scaler.

Splits follow the convention of the published ETT benchmarks: the validation and
test splits start ``L = lookback`` rows before their first target row, so the first
window of each split forecasts the first row after the previous split, and every
window (stride 1) is evaluated. Values are standardised with a scaler fitted on
the training rows only, and metrics are computed on the scaled values.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .datasets import TimeSeries
from .windows import _check_positive_int, sliding_windows

__all__ = ["ForecastSplits", "StandardScaler", "ett_hourly_splits", "ratio_splits"]

#: ETT-hourly borders: 12 months train, 4 validation, 4 test, 30-day months of 24 hours.
ETT_HOURLY_TRAIN_END = 12 * 30 * 24  # 8640
ETT_HOURLY_VAL_END = ETT_HOURLY_TRAIN_END + 4 * 30 * 24  # 11520
ETT_HOURLY_TEST_END = ETT_HOURLY_VAL_END + 4 * 30 * 24  # 14400


class StandardScaler:
    r"""
    Per-channel standardisation :math:`(x - \mathrm{loc}) / \mathrm{scale}`.

    ``loc`` is the column mean and ``scale`` the population standard deviation
    (``ddof=0``) of the rows passed to :meth:`fit`. A constant column (``scale``
    below :math:`10\,\epsilon\max(1, |\mathrm{loc}|)`) gets ``scale = 1.0``, so it is
    centred but not divided by zero; :attr:`constant` marks such columns.

    Channels are the last dimension: :meth:`transform` and :meth:`inverse_transform`
    accept numpy arrays or tensors of shape ``(..., C)`` and return the same type.
    For channel-independent windows of shape ``(W * C, H)``, reshape to
    ``(W, C, H)`` and transpose to ``(W, H, C)`` first.

    >>> scaler = StandardScaler().fit(np.array([[0.0, 5.0], [2.0, 5.0]]))
    >>> scaler.loc, scaler.scale
    (array([1., 5.]), array([1., 1.]))
    """

    def __init__(self):
        self.loc = None
        self.scale = None
        self.constant = None

    def fit(self, values):
        """
        Fit ``loc`` and ``scale`` on training rows.

        :param values: finite array of shape ``(N, C)``.
        :returns: ``self``.
        """
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise ValueError(f"Expected values of shape (N, C) with N > 0 but got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("Expected finite values to fit the scaler but found NaN/inf")
        self.loc = values.mean(axis=0)  # (C,)
        scale = values.std(axis=0)  # (C,)
        self.constant = scale <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(self.loc))
        self.scale = np.where(self.constant, 1.0, scale)  # (C,)
        return self

    def _params(self, values):
        if self.loc is None:
            raise RuntimeError("StandardScaler is not fitted; call fit(train_values) first")
        num_channels = values.shape[-1] if values.ndim else None
        if num_channels != self.loc.shape[0]:
            raise ValueError(
                f"Expected values of shape (..., {self.loc.shape[0]}) but got shape "
                f"{tuple(values.shape)}; channels must be the last dimension"
            )
        if isinstance(values, torch.Tensor):
            dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
            as_tensor = lambda a: torch.as_tensor(a, dtype=dtype, device=values.device)
            return values.to(dtype), as_tensor(self.loc), as_tensor(self.scale)
        return np.asarray(values, dtype=np.float64), self.loc, self.scale

    def transform(self, values):
        """
        :param values: array or tensor of shape ``(..., C)``.
        :returns: standardised values, same shape and type.
        """
        if not isinstance(values, torch.Tensor):
            values = np.asarray(values)
        values, loc, scale = self._params(values)
        return (values - loc) / scale

    def inverse_transform(self, values):
        """
        :param values: standardised array or tensor of shape ``(..., C)``.
        :returns: values in the original units, same shape and type.
        """
        if not isinstance(values, torch.Tensor):
            values = np.asarray(values)
        values, loc, scale = self._params(values)
        return values * scale + loc

    def fit_transform(self, values):
        """Fit on ``values`` and return them standardised."""
        return self.fit(values).transform(values)


@dataclass
class ForecastSplits:
    """
    Scaled train/validation/test rows for one forecasting task.

    :ivar numpy.ndarray train: scaled rows ``borders["train"]``, shape ``(N_train, C)``.
    :ivar numpy.ndarray val: scaled rows ``borders["val"]``, shape ``(N_val, C)``; the
        first ``lookback`` rows overlap the end of ``train``.
    :ivar numpy.ndarray test: scaled rows ``borders["test"]``, shape ``(N_test, C)``; the
        first ``lookback`` rows overlap the end of ``val``.
    :ivar StandardScaler scaler: fitted on the training rows only.
    :ivar int lookback: look-back length ``L``.
    :ivar int horizon: forecast horizon ``H``.
    :ivar dict borders: ``{"train": (start, stop), "val": ..., "test": ...}``, half-open
        row ranges into the original series.
    :ivar list columns: channel names, length ``C``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    scaler: StandardScaler
    lookback: int
    horizon: int
    borders: dict
    columns: list

    def windows(self, split, stride=1, channel_independent=True):
        """
        Every look-back/horizon window of one split; see :func:`sliding_windows`.

        :param str split: ``"train"``, ``"val"`` or ``"test"``.
        :returns: float32 tensors ``(x, y)`` of shapes ``(W * C, L)``, ``(W * C, H)``
            (or ``(W, L, C)``, ``(W, H, C)``).
        """
        if split not in self.borders:
            raise ValueError(f"Expected split in {list(self.borders)} but got {split!r}")
        return sliding_windows(getattr(self, split), self.lookback, self.horizon, stride, channel_independent)


def _split(values, borders, lookback, horizon, columns):
    for split, (start, stop) in borders.items():
        if stop - start < lookback + horizon:
            raise ValueError(
                f"The {split} split has rows [{start}, {stop}) = {stop - start} rows but needs "
                f"lookback + horizon = {lookback} + {horizon} = {lookback + horizon} for one "
                "window; shorten lookback/horizon or enlarge the split"
            )
    train_start, train_stop = borders["train"]
    scaler = StandardScaler().fit(values[train_start:train_stop])
    parts = {k: scaler.transform(values[start:stop]) for k, (start, stop) in borders.items()}
    return ForecastSplits(
        **parts,
        scaler=scaler,
        lookback=lookback,
        horizon=horizon,
        borders=borders,
        columns=columns,
    )


def _unpack(series):
    if isinstance(series, TimeSeries):
        return series.values, list(series.columns)
    values = np.asarray(series, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"Expected a TimeSeries or values of shape (N, C) but got {values.shape}")
    return values, [str(i) for i in range(values.shape[1])]


def ett_hourly_splits(series, lookback=336, horizon=96):
    """
    The standard ETT-hourly protocol (Zhou et al. 2021; Zeng et al. 2023).

    Rows ``[0, 8640)`` train, ``[8640 - L, 11520)`` validation and
    ``[11520 - L, 14400)`` test (12/4/4 months of 30 days); rows after 14400 are
    unused. The scaler is fitted on the training rows only. With ``L = 336`` and
    ``H = 96`` the test split has ``2880 + L - L - H + 1 = 2785`` windows.

    :param series: ETTh1 or ETTh2 as a :class:`TimeSeries` (or an array ``(N, C)``),
        with at least 14400 rows.
    :param int lookback: look-back length ``L``, at most 8640.
    :param int horizon: horizon ``H``.
    :rtype: ForecastSplits
    """
    lookback = _check_positive_int(lookback, "lookback")
    horizon = _check_positive_int(horizon, "horizon")
    values, columns = _unpack(series)
    if values.shape[0] < ETT_HOURLY_TEST_END:
        raise ValueError(
            f"Expected at least {ETT_HOURLY_TEST_END} hourly rows for the ETT-hourly protocol "
            f"but got {values.shape[0]}; use ratio_splits for other series"
        )
    if lookback > ETT_HOURLY_TRAIN_END:
        raise ValueError(f"Expected lookback <= {ETT_HOURLY_TRAIN_END} but got {lookback}")
    borders = {
        "train": (0, ETT_HOURLY_TRAIN_END),
        "val": (ETT_HOURLY_TRAIN_END - lookback, ETT_HOURLY_VAL_END),
        "test": (ETT_HOURLY_VAL_END - lookback, ETT_HOURLY_TEST_END),
    }
    return _split(values, borders, lookback, horizon, columns)


def ratio_splits(series, lookback, horizon, train=0.7, val=0.1):
    """
    A chronological train/validation/test split by fractions of the rows.

    With ``N`` rows, ``n_train = floor(train * N)``, ``n_val = floor(val * N)`` and
    the test split takes the remaining ``N - n_train - n_val`` rows. As in
    :func:`ett_hourly_splits`, validation and test start ``L`` rows early:
    rows ``[0, n_train)``, ``[n_train - L, n_train + n_val)``,
    ``[n_train + n_val - L, N)``. The scaler is fitted on the training rows only.

    :param series: a :class:`TimeSeries` or an array ``(N, C)``.
    :param int lookback: look-back length ``L``.
    :param int horizon: horizon ``H``.
    :param float train: fraction of rows for training, in ``(0, 1)``.
    :param float val: fraction of rows for validation, in ``(0, 1)``, with ``train + val < 1``.
    :rtype: ForecastSplits
    """
    lookback = _check_positive_int(lookback, "lookback")
    horizon = _check_positive_int(horizon, "horizon")
    if not (0 < train < 1 and 0 < val < 1 and train + val < 1):
        raise ValueError(
            f"Expected fractions 0 < train, 0 < val, train + val < 1 but got train={train}, val={val}"
        )
    values, columns = _unpack(series)
    num_rows = values.shape[0]
    n_train = int(train * num_rows)
    n_val = int(val * num_rows)
    if lookback > n_train:
        raise ValueError(
            f"Expected lookback <= {n_train} training rows (train={train} of {num_rows}) but "
            f"got {lookback}; shorten lookback or raise train"
        )
    borders = {
        "train": (0, n_train),
        "val": (n_train - lookback, n_train + n_val),
        "test": (n_train + n_val - lookback, num_rows),
    }
    return _split(values, borders, lookback, horizon, columns)

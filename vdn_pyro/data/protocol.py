r"""
The long-horizon forecasting protocol: chronological splits and a train-only scaler.

Splits follow the convention of the published ETT benchmarks: the validation and
test splits start ``L = lookback`` rows before their first target row, so the first
window of each split forecasts the first row after the previous split, and every
window (stride 1) is evaluated. Values are standardised with a scaler fitted on
the training rows only, and metrics are computed on the scaled values. A series whose
standardised values would not be usable numbers (a value more than :data:`MAX_STANDARDISED`
training standard deviations from the training mean, or a training column whose standard
deviation overflows) is refused with a :class:`DataRangeError` that names the row and column.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .datasets import TimeSeries
from .windows import _check_positive_int, sliding_windows

__all__ = [
    "MAX_STANDARDISED",
    "DataRangeError",
    "ForecastSplits",
    "StandardScaler",
    "ett_hourly_splits",
    "ratio_splits",
]

#: Largest magnitude a standardised value may take: a value this many training standard
#: deviations from the training mean is a sentinel or a unit error, not data, and would turn
#: every metric into noise (and overflow float32 sooner or later).
MAX_STANDARDISED = 1e4


class DataRangeError(ValueError):
    """The values of a series cannot be standardised into usable numbers (an extreme value, or
    a column whose scale makes the standardised values non-finite)."""


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
        self._names = None  # " ('column')" per channel, for messages

    def fit(self, values):
        """
        Fit ``loc`` and ``scale`` on training rows.

        :param values: finite array of shape ``(N, C)``.
        :returns: ``self``.
        :raises DataRangeError: if a column's mean or standard deviation is not finite (a value
            near the float64 limit).
        """
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] == 0:
            raise ValueError(f"Expected values of shape (N, C) with N > 0 but got {values.shape}")
        if not np.isfinite(values).all():
            raise ValueError("Expected finite values to fit the scaler but found NaN/inf")
        with np.errstate(over="ignore", invalid="ignore"):
            self.loc = values.mean(axis=0)  # (C,)
            scale = values.std(axis=0)  # (C,)
        bad = ~(np.isfinite(self.loc) & np.isfinite(scale))
        if bad.any():
            channel = int(np.flatnonzero(bad)[0])
            row = int(np.abs(values[:, channel]).argmax())
            raise DataRangeError(
                f"Expected training values whose mean and standard deviation are finite, but channel "
                f"{channel}{self._names[channel] if self._names else ''} has mean {self.loc[channel]:g} "
                f"and standard deviation {scale[channel]:g} "
                f"(its largest value, {values[row, channel]:g} at training row {row}, overflows "
                "float64 when squared); check the data for an extreme value or a unit error"
            )
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

    def num_windows(self, split, stride=1):
        """W, the number of windows :meth:`windows` cuts from one split (per channel), without
        cutting them.

        :param str split: ``"train"``, ``"val"`` or ``"test"``.
        """
        if split not in self.borders:
            raise ValueError(f"Expected split in {list(self.borders)} but got {split!r}")
        rows = getattr(self, split).shape[0]
        return max(0, (rows - self.lookback - self.horizon) // stride + 1)


def _split(values, borders, lookback, horizon, columns):
    for split, (start, stop) in borders.items():
        if stop - start < lookback + horizon:
            raise ValueError(
                f"The {split} split has rows [{start}, {stop}) = {stop - start} rows but needs "
                f"lookback + horizon = {lookback} + {horizon} = {lookback + horizon} for one "
                "window; shorten lookback/horizon or enlarge the split"
            )
    train_start, train_stop = borders["train"]
    scaler = StandardScaler()
    scaler._names = [f" ({name!r})" for name in columns]
    scaler.fit(values[train_start:train_stop])
    parts = {k: scaler.transform(values[start:stop]) for k, (start, stop) in borders.items()}
    for split, (start, _) in borders.items():
        _check_range(split, start, values, parts[split], scaler, columns)
    return ForecastSplits(
        **parts,
        scaler=scaler,
        lookback=lookback,
        horizon=horizon,
        borders=borders,
        columns=columns,
    )


def _check_range(split, start, values, scaled, scaler, columns):
    """Raise :class:`DataRangeError` if a standardised value is beyond :data:`MAX_STANDARDISED`
    (or not finite, in float64 or in the float32 of the windows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~(np.abs(scaled) <= MAX_STANDARDISED)  # (N, C); NaN counts as bad
    if not bad.any():
        return
    row, channel = (int(i) for i in np.argwhere(bad)[0])
    raise DataRangeError(
        f"Expected standardised values within +-{MAX_STANDARDISED:g}, but {columns[channel]!r} at row "
        f"{start + row} ({split} split) is {values[start + row, channel]:g}, which is "
        f"{scaled[row, channel]:.3g} training standard deviations (scale {scaler.scale[channel]:.3g}) "
        "from the training mean; check the data for an extreme value or a unit error"
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


# ----------------------------------------------------------------------------- any long-horizon CSV
#: The ETT protocol in 30-day months: train, validation, test (rows after them are unused).
ETT_MONTHS = (12, 4, 4)
#: The chronological protocol of the other long-horizon sets (Weather, Exchange, ECL, Traffic in
#: the Autoformer/DLinear code): fractions of the rows for train and test, validation the rest.
LONG_HORIZON_FRACTIONS = (0.7, 0.2)
#: Protocols of :func:`protocol_splits`, by name.
PROTOCOLS = ("ett", "long_horizon")


def rows_per_hour(index):
    """
    Rows per hour of a regularly sampled series whose step divides one hour.

    :param pandas.DatetimeIndex index: the series' time stamps, at least two.
    :returns: ``3600 / step`` in seconds (1 for hourly rows, 4 for 15-minute rows).
    :rtype: int
    :raises ValueError: without time stamps, for an irregular step, or for a step that does not
        divide one hour.
    """
    import pandas as pd

    if not isinstance(index, pd.DatetimeIndex) or len(index) < 2:
        raise ValueError(
            "Expected at least two time stamps (a pandas.DatetimeIndex) to find the rows per hour, but got "
            f"{type(index).__name__} of length {len(index)}; load the CSV with its date column, or pass "
            "the rate"
        )
    steps = np.diff(index.to_numpy().astype("datetime64[s]").astype(np.int64))  # (N - 1,) seconds
    step = int(np.median(steps))
    irregular = np.flatnonzero(steps != step)
    if irregular.size:
        row = int(irregular[0]) + 1
        raise ValueError(
            f"Expected a regular series for a protocol counted in months of rows, but the step is {step} s "
            f"except at row {row} ({index[row - 1]} -> {index[row]}) and {irregular.size - 1} other rows; "
            "fill the missing time stamps, or use the long_horizon protocol (fractions of the rows)"
        )
    if step <= 0 or 3600 % step:
        raise ValueError(
            f"Expected a step that divides one hour (e.g. 1 h or 15 min) for the ETT protocol, but got "
            f"{step} s; use the long_horizon protocol"
        )
    return 3600 // step


def ett_splits(series, lookback=336, horizon=96, rate=None):
    """
    The ETT protocol at any sampling rate that divides an hour: 12/4/4 months of 30 days.

    With ``rate`` rows an hour (1 for ETTh, 4 for ETTm), ``month = 30 * 24 * rate`` rows: train rows
    ``[0, 12 month)``, validation ``[12 month - L, 16 month)``, test ``[16 month - L,
    20 month)``; rows after ``20 month`` are unused, and the scaler is fitted on the training
    rows only. For hourly rows this is :func:`ett_hourly_splits`.

    :param series: a :class:`TimeSeries` with a :class:`pandas.DatetimeIndex` (or an array
        ``(N, C)`` with ``rate`` given).
    :param int lookback: look-back length ``L``.
    :param int horizon: horizon ``H``.
    :param int rate: rows an hour; default: found from the time stamps (:func:`rows_per_hour`).
    :rtype: ForecastSplits
    """
    lookback = _check_positive_int(lookback, "lookback")
    horizon = _check_positive_int(horizon, "horizon")
    if rate is None:
        if not isinstance(series, TimeSeries):
            raise ValueError(
                "Expected a TimeSeries with time stamps, or the rate (rows an hour), for the ETT protocol, "
                f"but got {type(series).__name__} and no rate"
            )
        rate = rows_per_hour(series.index)
    else:
        rate = _check_positive_int(rate, "rate")
    values, columns = _unpack(series)
    month = 30 * 24 * rate
    train_end, val_end, test_end = np.cumsum(ETT_MONTHS) * month
    train_end, val_end, test_end = int(train_end), int(val_end), int(test_end)
    if values.shape[0] < test_end:
        raise ValueError(
            f"Expected at least {test_end} rows ({sum(ETT_MONTHS)} months of 30 days at {rate} rows an "
            f"hour) for the ETT protocol, but got {values.shape[0]}; use the long_horizon protocol for "
            "shorter series"
        )
    if lookback > train_end:
        raise ValueError(f"Expected lookback <= {train_end} training rows, but got {lookback}")
    borders = {
        "train": (0, train_end),
        "val": (train_end - lookback, val_end),
        "test": (val_end - lookback, test_end),
    }
    return _split(values, borders, lookback, horizon, columns)


def long_horizon_splits(series, lookback=336, horizon=96):
    """
    The 7:1:2 chronological protocol of the long-horizon sets other than ETT (the data loader
    of Autoformer, FEDformer, DLinear and PatchTST).

    With ``N`` rows: ``n_train = floor(0.7 N)``, ``n_test = floor(0.2 N)`` and ``n_val = N -
    n_train - n_test``; train rows ``[0, n_train)``, validation ``[n_train - L, n_train +
    n_val)``, test ``[N - n_test - L, N)``. The scaler is fitted on the training rows only. (The
    rounding differs from :func:`ratio_splits` with ``train=0.7, val=0.1``, whose test split
    takes the rest, by at most one row.)

    :param series: a :class:`TimeSeries` or an array ``(N, C)``; any columns.
    :param int lookback: look-back length ``L``.
    :param int horizon: horizon ``H``.
    :rtype: ForecastSplits
    """
    lookback = _check_positive_int(lookback, "lookback")
    horizon = _check_positive_int(horizon, "horizon")
    values, columns = _unpack(series)
    num_rows = values.shape[0]
    train, test = LONG_HORIZON_FRACTIONS
    n_train, n_test = int(num_rows * train), int(num_rows * test)
    n_val = num_rows - n_train - n_test
    if lookback > n_train:
        raise ValueError(
            f"Expected lookback <= {n_train} training rows (70% of {num_rows}), but got {lookback}; "
            "shorten it"
        )
    borders = {
        "train": (0, n_train),
        "val": (n_train - lookback, n_train + n_val),
        "test": (num_rows - n_test - lookback, num_rows),
    }
    return _split(values, borders, lookback, horizon, columns)


def detect_protocol(series):
    """
    The protocol of a series, from its shape: ``"ett"`` for an ETT-format series (time stamps and
    value columns among the seven ETT columns ``HUFL`` .. ``OT``, any subset), else
    ``"long_horizon"``.

    :param series: a :class:`TimeSeries` (an array has no column names: ``"long_horizon"``).
    :rtype: str
    """
    from .datasets import ETT_COLUMNS

    if not isinstance(series, TimeSeries):
        return "long_horizon"
    import pandas as pd

    ett = set(series.columns) <= set(ETT_COLUMNS) and isinstance(series.index, pd.DatetimeIndex)
    return "ett" if ett else "long_horizon"


def protocol_splits(series, lookback=336, horizon=96, protocol="auto"):
    """
    Split a series by a protocol of :data:`PROTOCOLS`: :func:`ett_splits` or
    :func:`long_horizon_splits`; ``"auto"`` picks one with :func:`detect_protocol`.

    :param series: a :class:`TimeSeries` or an array ``(N, C)``.
    :param int lookback: look-back length ``L``.
    :param int horizon: horizon ``H``.
    :param str protocol: ``"auto"``, ``"ett"`` or ``"long_horizon"``.
    :rtype: ForecastSplits
    """
    if protocol == "auto":
        protocol = detect_protocol(series)
    if protocol == "ett":
        return ett_splits(series, lookback, horizon)
    if protocol == "long_horizon":
        return long_horizon_splits(series, lookback, horizon)
    raise ValueError(f"Expected protocol 'auto' or one of {PROTOCOLS}, but got {protocol!r}")

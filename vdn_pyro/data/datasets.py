"""Loaders that turn a CSV file or a bundled data set into a :class:`TimeSeries`."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["ETT_COLUMNS", "TimeSeries", "load_csv", "load_default", "load_ett"]

#: The seven ETT columns, in file order; ``OT`` (oil temperature) is the usual target.
ETT_COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]

_FILLS = ("ffill", "interpolate")


@dataclass
class TimeSeries:
    """
    A regularly sampled multichannel series with its labels.

    :ivar numpy.ndarray values: float64 values of shape ``(N, C)``: ``N`` time steps,
        ``C`` channels.
    :ivar list columns: the ``C`` channel names, in column order.
    :ivar index: the ``N`` time stamps, a :class:`pandas.DatetimeIndex`, or a
        :class:`pandas.RangeIndex` when the source has no date column.
    :ivar str name: a short name for reports (the file stem for CSVs).
    """

    values: np.ndarray
    columns: list
    index: pd.Index
    name: str

    def __post_init__(self):
        if self.values.ndim != 2:
            raise ValueError(f"Expected values of shape (N, C) but got shape {self.values.shape}")
        if len(self.columns) != self.values.shape[1]:
            raise ValueError(
                f"Expected {self.values.shape[1]} column names for values of shape "
                f"{self.values.shape} but got {len(self.columns)}: {self.columns}"
            )
        if len(self.index) != self.values.shape[0]:
            raise ValueError(
                f"Expected an index of length {self.values.shape[0]} for values of shape "
                f"{self.values.shape} but got length {len(self.index)}"
            )

    def __len__(self):
        return self.values.shape[0]


def _first_row(mask):
    """Position of the first True in a boolean Series."""
    return int(np.flatnonzero(mask.to_numpy())[0])


def _check_increasing(index, raw_dates, date_column, path):
    """Raise unless the time stamps strictly increase (a series read backwards, or with a
    repeated row, would be forecast in the wrong direction)."""
    stamps = index.asi8  # (N,) nanoseconds
    bad = np.flatnonzero(stamps[1:] <= stamps[:-1])
    if bad.size:
        row = int(bad[0]) + 1
        repeated = stamps[row] == stamps[row - 1]
        order = "repeats the date of" if repeated else "is earlier than"
        hint = "remove the repeated row" if repeated else "sort the file by date (oldest first)"
        raise ValueError(
            f"Expected dates in column {date_column!r} of {path} in increasing order but row {row} "
            f"({raw_dates.iloc[row]}) {order} row {row - 1} ({raw_dates.iloc[row - 1]}); {hint}"
        )


def _fill_missing(frame, fill):
    if fill == "ffill":
        return frame.ffill().bfill()
    return frame.interpolate(method="linear", limit_direction="both")


def load_csv(path, date_column="date", target_columns=None, fill=None):
    """
    Read a CSV file with one row per time step into a :class:`TimeSeries`.

    Row numbers in error messages count data rows from 0 (file line = row + 2,
    after the header).

    :param path: path to the CSV file; the first line is the header.
    :param str date_column: name of the time stamp column, parsed into a
        :class:`pandas.DatetimeIndex`; ``None`` if the file has none (the index
        is then a :class:`pandas.RangeIndex`).
    :param target_columns: names of the value columns to keep, in this order
        (a single name is allowed); default every column except ``date_column``.
    :param str fill: how to fill missing values; by default they are refused.
        ``"ffill"`` carries the last valid value forward (leading gaps take the
        first valid value); ``"interpolate"`` interpolates linearly in row
        position (leading and trailing gaps take the nearest valid value).
    :returns: the series, named after the file stem, with values of shape ``(N, C)``.
    :rtype: TimeSeries
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: for an empty file, missing columns, unparsable dates, dates that do
        not strictly increase, non-numeric or infinite values, or missing values without
        ``fill``.
    """
    if fill is not None and fill not in _FILLS:
        raise ValueError(f"Expected fill to be None, 'ffill' or 'interpolate' but got {fill!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected a CSV file at {path} (resolved: {path.resolve()}) but none exists; check the path"
        )
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError as e:
        raise ValueError(
            f"Expected a CSV with a header and data rows but {path} is empty; "
            "check the file was written completely"
        ) from e
    if len(frame) == 0:
        raise ValueError(
            f"Expected data rows in {path} but it has only a header ({list(frame.columns)}); "
            "check the file was written completely"
        )
    available = [str(c) for c in frame.columns]

    if date_column is not None:
        if date_column not in frame.columns:
            raise ValueError(
                f"Expected a date column {date_column!r} in {path} but the columns are "
                f"{available}; pass date_column=<name>, or date_column=None if there is none"
            )
        raw_dates = frame[date_column]
        dates = pd.to_datetime(raw_dates, errors="coerce")
        bad = dates.isna()
        if bool(bad.any()):
            row = _first_row(bad)
            raise ValueError(
                f"Expected dates in column {date_column!r} of {path} but row {row} holds "
                f"{raw_dates.iloc[row]!r}; fix that row (all dates must share the format of the first "
                "row) or pass date_column=None"
            )
        index = pd.DatetimeIndex(dates, name=date_column)
        _check_increasing(index, raw_dates, date_column, path)
    else:
        index = pd.RangeIndex(len(frame))

    if target_columns is None:
        target_columns = [c for c in frame.columns if c != date_column]
        if not target_columns:
            raise ValueError(
                f"Expected at least one value column in {path} besides {date_column!r} "
                f"but the columns are {available}"
            )
    elif isinstance(target_columns, str):
        target_columns = [target_columns]
    else:
        target_columns = list(target_columns)
    missing = [c for c in target_columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"Expected target columns {missing} in {path} but the columns are {available}; fix target_columns"
        )

    values = {}
    for column in target_columns:
        raw = frame[column]
        numeric = pd.to_numeric(raw, errors="coerce")
        bad = numeric.isna() & raw.notna()
        if bool(bad.any()):
            row = _first_row(bad)
            raise ValueError(
                f"Expected numbers in column {column!r} of {path} but row {row} "
                f"(line {row + 2}) holds {raw.iloc[row]!r}; fix or remove that value"
            )
        infinite = numeric.isin([np.inf, -np.inf])
        if bool(infinite.any()):
            row = _first_row(infinite)
            raise ValueError(
                f"Expected finite numbers in column {column!r} of {path} but row {row} "
                f"(line {row + 2}) holds {raw.iloc[row]}, which is infinite as a float64; fix or "
                "remove that value"
            )
        values[column] = numeric.astype("float64")
    data = pd.DataFrame(values)
    missing_mask = data.isna()
    if bool(missing_mask.to_numpy().any()):
        if fill is None:
            counts = {c: int(n) for c, n in missing_mask.sum().items() if n}
            column = next(iter(counts))
            row = _first_row(missing_mask[column])
            raise ValueError(
                f"Expected no missing values in {path} but found {counts} "
                f"(first in column {column!r} at row {row}); "
                "pass fill='ffill' or fill='interpolate' to fill them"
            )
        data = _fill_missing(data, fill)
        empty = [c for c in data.columns if data[c].isna().any()]
        if empty:
            raise ValueError(
                f"Column(s) {empty} of {path} have no valid value to fill from; drop them from target_columns"
            )
    return TimeSeries(
        values=data.to_numpy(dtype=np.float64, copy=True),
        columns=[str(c) for c in target_columns],
        index=index,
        name=path.stem,
    )


def load_default():
    """
    The embedded default data set: weekly atmospheric CO2 at Mauna Loa.

    The series ships with statsmodels (``statsmodels.api.datasets.co2``), so it
    needs no download: 2284 weekly means (ppm) from 1958-03-29 to 2001-12-29, one
    channel named ``"co2"``. Source: Keeling, C.D. and T.P. Whorf (2004), SIO flask
    samples, Carbon Dioxide Information Analysis Center, Oak Ridge National
    Laboratory; public domain, as stated in the statsmodels data set's
    ``COPYRIGHT``. The raw series has 59 missing weeks; they are filled here by
    linear interpolation in time (the weekly index is regular), so the result has
    no NaN.

    :returns: the series, named ``"co2"``, values of shape ``(2284, 1)``, weekly
        :class:`pandas.DatetimeIndex`.
    :rtype: TimeSeries
    """
    try:
        from statsmodels.datasets import co2
    except ImportError as e:
        raise ImportError("load_default needs statsmodels: pip install statsmodels") from e
    frame = co2.load_pandas().data  # (2284, 1), NaN in 59 weeks
    frame = frame.interpolate(method="linear", limit_direction="both")
    return TimeSeries(
        values=frame.to_numpy(dtype=np.float64, copy=True),
        columns=["co2"],
        index=pd.DatetimeIndex(frame.index, name="date"),
        name="co2",
    )


def _default_ett_path():
    return Path.cwd() / ".." / "shared" / "data" / "ETT-small" / "ETTh1.csv"


def load_ett(path=None):
    """
    Read ETTh1 (Electricity Transformer Temperature, hourly) with its 7 columns.

    The file is looked up at ``path``, else at the environment variable
    ``VDN_ETT_PATH``, else at ``../shared/data/ETT-small/ETTh1.csv`` relative to
    the current working directory. The data set (Zhou et al., Informer, AAAI
    2021) is licensed CC BY-ND 4.0 and is not shipped with this package.

    :param path: path to ``ETTh1.csv`` (optional).
    :returns: the series named ``"ETTh1"``, values of shape ``(17420, 7)`` with columns
        :data:`ETT_COLUMNS` (``HUFL`` .. ``OT``), hourly :class:`pandas.DatetimeIndex`.
    :rtype: TimeSeries
    :raises FileNotFoundError: if the file is not found, with where it was looked for.
    """
    if path is not None:
        source = "the path argument"
    elif os.environ.get("VDN_ETT_PATH"):
        path, source = os.environ["VDN_ETT_PATH"], "VDN_ETT_PATH"
    else:
        path, source = _default_ett_path(), "the default location"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected ETTh1.csv at {path.resolve()} (from {source}) but it is not there; "
            "pass load_ett(path=...) or set VDN_ETT_PATH to the file"
        )
    series = load_csv(path, date_column="date", target_columns=ETT_COLUMNS)
    series.name = "ETTh1"
    return series

"""Data: sliding windows, loaders and the long-horizon forecasting protocol."""

from .datasets import ETT_COLUMNS, TimeSeries, load_csv, load_default, load_ett
from .protocol import ForecastSplits, StandardScaler, ett_hourly_splits, ratio_splits
from .windows import sliding_windows, window_chunks

__all__ = [
    "ETT_COLUMNS",
    "ForecastSplits",
    "StandardScaler",
    "TimeSeries",
    "ett_hourly_splits",
    "load_csv",
    "load_default",
    "load_ett",
    "ratio_splits",
    "sliding_windows",
    "window_chunks",
]

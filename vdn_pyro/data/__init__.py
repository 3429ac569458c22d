"""Data: sliding windows, loaders and the long-horizon forecasting protocol."""

from .datasets import ETT_COLUMNS, TimeSeries, load_csv, load_default, load_ett
from .protocol import ForecastSplits, StandardScaler, ett_hourly_splits, ratio_splits
from .text import (
    CharCorpus,
    Vocabulary,
    encode_texts,
    load_names,
    load_names_corpus,
    ragged_batches,
    split_texts,
    trim_padding,
)
from .windows import sliding_windows, window_chunks

__all__ = [
    "CharCorpus",
    "ETT_COLUMNS",
    "ForecastSplits",
    "StandardScaler",
    "TimeSeries",
    "Vocabulary",
    "encode_texts",
    "ett_hourly_splits",
    "load_csv",
    "load_default",
    "load_ett",
    "load_names",
    "load_names_corpus",
    "ragged_batches",
    "ratio_splits",
    "sliding_windows",
    "split_texts",
    "trim_padding",
    "window_chunks",
]

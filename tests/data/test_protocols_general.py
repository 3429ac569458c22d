"""The protocols of any long-horizon CSV: ETT at its own rate (hourly, 15-minute) and the 7:1:2
chronological split of Weather, Exchange, ECL and Traffic, on synthetic files."""

import numpy as np
import pandas as pd
import pytest

from tests.common import assert_close
from vdn_pyro.data import ETT_COLUMNS, ett_hourly_splits, load_csv
from vdn_pyro.data.protocol import (
    detect_protocol,
    ett_splits,
    long_horizon_splits,
    protocol_splits,
    rows_per_hour,
)


def write_csv(path, num_rows, columns, freq="1h", seed=0):
    """A CSV with a date column of ``num_rows`` regular stamps and random-walk columns."""
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2016-07-01", periods=num_rows, freq=freq)
    values = rng.normal(size=(num_rows, len(columns))).cumsum(0)
    frame = pd.DataFrame(values, columns=columns)
    frame.insert(0, "date", dates.strftime("%Y-%m-%d %H:%M:%S"))
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "freq, rate, ends",
    [("1h", 1, (8640, 11520, 14400)), ("15min", 4, (34560, 46080, 57600))],
    ids=["ETTh", "ETTm"],
)
def test_ett_protocol_counts_months_at_the_files_rate(tmp_path, freq, rate, ends):
    train_end, val_end, test_end = ends
    path = write_csv(tmp_path / "ett.csv", test_end + 37, ETT_COLUMNS, freq)
    series = load_csv(path)
    assert rows_per_hour(series.index) == rate and detect_protocol(series) == "ett"
    lookback, horizon = 96, 24
    splits = protocol_splits(series, lookback, horizon)
    assert splits.borders == {
        "train": (0, train_end),
        "val": (train_end - lookback, val_end),
        "test": (val_end - lookback, test_end),
    }
    assert splits.columns == ETT_COLUMNS
    # the scaler sees the training rows only; every split is scaled by it
    assert_close(splits.scaler.loc, series.values[:train_end].mean(0))
    assert_close(
        splits.test, (series.values[val_end - lookback : test_end] - splits.scaler.loc) / splits.scaler.scale
    )
    # every test window forecasts a test row: 4 months of rows minus the horizon, plus one
    x, _ = splits.windows("test")
    assert x.shape[0] == (test_end - val_end - horizon + 1) * len(ETT_COLUMNS)
    if rate == 1:  # hourly: the ETT-hourly protocol itself
        reference = ett_hourly_splits(series, lookback, horizon)
        assert reference.borders == splits.borders
        assert all(
            np.array_equal(getattr(reference, k), getattr(splits, k)) for k in ("train", "val", "test")
        )


@pytest.mark.parametrize("num_rows", [1000, 1003, 52696])
def test_long_horizon_protocol_is_seven_one_two(tmp_path, num_rows):
    columns = ["p (mbar)", "T (degC)", "rh (%)", "OT"]  # any other format: the 7:1:2 protocol
    series = load_csv(write_csv(tmp_path / "weather.csv", num_rows, columns, "10min"))
    assert detect_protocol(series) == "long_horizon"
    lookback, horizon = 48, 12
    splits = protocol_splits(series, lookback, horizon)
    n_train, n_test = int(0.7 * num_rows), int(0.2 * num_rows)
    n_val = num_rows - n_train - n_test
    assert splits.borders == {
        "train": (0, n_train),
        "val": (n_train - lookback, n_train + n_val),
        "test": (num_rows - n_test - lookback, num_rows),
    }
    assert splits.test.shape[0] == n_test + lookback and splits.val.shape[0] == n_val + lookback
    assert_close(splits.scaler.loc, series.values[:n_train].mean(0))
    assert splits.borders == long_horizon_splits(series, lookback, horizon).borders
    # any subset of columns, and a file without dates, split the same way
    subset = load_csv(tmp_path / "weather.csv", target_columns=["OT", "rh (%)"])
    assert protocol_splits(subset, lookback, horizon).borders == splits.borders
    plain = load_csv(tmp_path / "weather.csv", date_column=None, target_columns=columns[1:3])
    assert detect_protocol(plain) == "long_horizon"
    assert protocol_splits(plain, lookback, horizon).borders == splits.borders


def test_a_subset_of_the_ett_columns_is_still_ett_and_the_protocol_can_be_forced(tmp_path):
    path = write_csv(tmp_path / "ETTm2.csv", 57600, ETT_COLUMNS, "15min")
    series = load_csv(path, target_columns=["OT"])
    assert detect_protocol(series) == "ett"
    assert protocol_splits(series, 336, 96).borders["test"] == (46080 - 336, 57600)
    forced = protocol_splits(series, 336, 96, protocol="long_horizon")
    assert forced.borders["train"] == (0, int(0.7 * 57600))
    assert detect_protocol(series.values) == "long_horizon"  # an array has no column names


def test_bad_input_is_refused_with_the_fix(tmp_path):
    short = load_csv(write_csv(tmp_path / "short.csv", 2000, ETT_COLUMNS))
    with pytest.raises(ValueError, match="long_horizon protocol for shorter series"):
        protocol_splits(short, 96, 24)
    with pytest.raises(ValueError, match="protocol 'auto' or one of"):
        protocol_splits(short, 96, 24, protocol="ettm")
    gappy = pd.read_csv(tmp_path / "short.csv").drop(index=[500])
    gappy.to_csv(tmp_path / "gappy.csv", index=False)
    with pytest.raises(ValueError, match="except at row 500"):
        ett_splits(load_csv(tmp_path / "gappy.csv"), 96, 24)
    daily = load_csv(write_csv(tmp_path / "daily.csv", 500, ["a", "b"], "1D"))
    with pytest.raises(ValueError, match="divides one hour"):
        rows_per_hour(daily.index)
    with pytest.raises(ValueError, match="time stamps"):
        ett_splits(daily.values, 96, 24)
    values = np.arange(28800.0).reshape(14400, 2)  # no time stamps: the rate is given
    assert ett_splits(values, 96, 24, rate=1).borders["val"] == (8544, 11520)
    with pytest.raises(ValueError, match="lookback <= 350"):
        long_horizon_splits(daily, 351, 24)

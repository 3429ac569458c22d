import numpy as np
import pandas as pd
import pytest
import torch

from tests.common import ETT_PATH, assert_close, requires_ett
from vdn_pyro.data import (
    StandardScaler,
    TimeSeries,
    ett_hourly_splits,
    load_default,
    load_ett,
    ratio_splits,
    sliding_windows,
)
from vdn_pyro.data.protocol import MAX_STANDARDISED, DataRangeError
from vdn_pyro.metrics import mae, mse


def random_series(num_rows, num_channels=3, seed=0):
    rng = np.random.default_rng(seed)
    # a drifting series, so statistics of the train rows differ from those of all rows
    return rng.normal(size=(num_rows, num_channels)).cumsum(0) + np.arange(num_channels) * 5.0


def test_scaler_matches_numpy_and_round_trips():
    values = random_series(50)
    scaler = StandardScaler().fit(values)
    assert_close(scaler.loc, values.mean(0))
    assert_close(scaler.scale, values.std(0))
    scaled = scaler.transform(values)
    assert_close(scaled.mean(0), np.zeros(3), atol=1e-12)
    assert_close(scaled.std(0), np.ones(3))
    assert_close(scaler.inverse_transform(scaled), values)
    # tensors of shape (..., C) keep their type and dtype
    tensor = torch.as_tensor(values[:12].reshape(3, 4, 3), dtype=torch.float32)
    out = scaler.transform(tensor)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert_close(out, scaled[:12].reshape(3, 4, 3), atol=1e-5)
    assert_close(scaler.inverse_transform(out), tensor, atol=1e-4)


def test_scaler_guards_constant_columns():
    values = np.stack([np.arange(5.0), np.full(5, 7.0)], axis=1)
    scaler = StandardScaler().fit(values)
    assert scaler.constant.tolist() == [False, True]
    assert scaler.scale[1] == 1.0
    assert_close(scaler.transform(values)[:, 1], np.zeros(5))


def test_scaler_errors():
    with pytest.raises(RuntimeError, match="call fit"):
        StandardScaler().transform(np.zeros((2, 2)))
    scaler = StandardScaler().fit(np.random.default_rng(0).normal(size=(4, 2)))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\) but got shape \(4, 3\)"):
        scaler.transform(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="finite"):
        StandardScaler().fit(np.array([[1.0], [np.nan]]))


def test_ratio_splits_borders_and_train_only_scaler():
    values = random_series(1000)
    series = TimeSeries(values, ["a", "b", "c"], pd.RangeIndex(1000), "toy")
    splits = ratio_splits(series, lookback=24, horizon=12)
    assert splits.borders == {"train": (0, 700), "val": (676, 800), "test": (776, 1000)}
    assert splits.columns == ["a", "b", "c"]
    assert (splits.lookback, splits.horizon) == (24, 12)
    assert_close(splits.scaler.loc, values[:700].mean(0))
    assert_close(splits.scaler.scale, values[:700].std(0))
    assert not np.allclose(splits.scaler.loc, values.mean(0), atol=0.1)  # not fitted on all rows
    scaled = (values - values[:700].mean(0)) / values[:700].std(0)
    assert_close(splits.train, scaled[:700])
    assert_close(splits.val, scaled[676:800])
    assert_close(splits.test, scaled[776:1000])
    # the first val/test targets are the first rows after the previous split
    x, y = splits.windows("test", channel_independent=False)
    assert x.shape == (1000 - 776 - 24 - 12 + 1, 24, 3)
    assert_close(y[0], scaled[800:812], atol=1e-5)
    _, y_val = splits.windows("val", channel_independent=False)
    assert_close(y_val[0], scaled[700:712], atol=1e-5)


def test_ratio_splits_plain_array_and_fractions():
    splits = ratio_splits(random_series(200), lookback=10, horizon=5, train=0.5, val=0.25)
    assert splits.borders == {"train": (0, 100), "val": (90, 150), "test": (140, 200)}
    assert splits.columns == ["0", "1", "2"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"train": 0.8, "val": 0.2}, "train \\+ val < 1"),
        ({"train": 0.0}, "0 < train"),
        ({"lookback": 150}, "lookback <= 140 training rows"),
        ({"horizon": 40}, r"val split has rows \[130, 160\) = 30 rows.*10 \+ 40"),
    ],
    ids=["fractions-sum", "zero-train", "lookback-too-long", "horizon-too-long"],
)
def test_ratio_splits_errors(kwargs, match):
    args = {"lookback": 10, "horizon": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        ratio_splits(random_series(200), **args)


def test_default_series_splits():
    splits = ratio_splits(load_default(), lookback=104, horizon=52)
    assert splits.borders == {"train": (0, 1598), "val": (1494, 1826), "test": (1722, 2284)}
    x, y = splits.windows("test")
    assert x.shape == (2284 - 1722 - 104 - 52 + 1, 104)
    assert torch.isfinite(x).all() and torch.isfinite(y).all()


def test_windows_unknown_split():
    splits = ratio_splits(random_series(200), lookback=10, horizon=5)
    with pytest.raises(ValueError, match="'valid'"):
        splits.windows("valid")


def test_ett_splits_need_enough_rows():
    with pytest.raises(ValueError, match="at least 14400.*got 1000.*ratio_splits"):
        ett_hourly_splits(random_series(1000))


@pytest.fixture(scope="module")
def ett():
    return load_ett(ETT_PATH)


@requires_ett()
@pytest.mark.parametrize("lookback", [96, 336])
def test_ett_borders_and_scaler(ett, lookback):
    splits = ett_hourly_splits(ett, lookback=lookback, horizon=96)
    assert splits.borders == {
        "train": (0, 8640),
        "val": (8640 - lookback, 11520),
        "test": (11520 - lookback, 14400),
    }
    raw = ett.values
    assert_close(splits.scaler.loc, raw[:8640].mean(0))
    assert_close(splits.scaler.scale, raw[:8640].std(0))
    assert not np.allclose(splits.scaler.loc, raw[:14400].mean(0), rtol=1e-3)
    scaled = (raw - raw[:8640].mean(0)) / raw[:8640].std(0)
    assert_close(splits.test, scaled[11520 - lookback : 14400])
    assert_close(splits.val, scaled[8640 - lookback : 11520])
    x, y = splits.windows("test")
    assert x.shape == ((2880 - 96 + 1) * 7, lookback)  # every window, 7 channels
    assert_close(y[:7], scaled[11520:11616].T, atol=1e-5)  # first target: rows after val


@requires_ett()
@pytest.mark.parametrize("horizon,expected_mse,expected_mae", [(96, 1.295, 0.713), (192, 1.325, 0.733)])
def test_ett_repeat_baseline_matches_published(ett, horizon, expected_mse, expected_mae):
    # Zeng et al. (2023), Table 2, "Repeat": forecast the last look-back value
    splits = ett_hourly_splits(ett, lookback=336, horizon=horizon)
    x, y = sliding_windows(splits.test, 336, horizon)
    pred = x[:, -1:].expand_as(y)  # (W * C, H)
    assert abs(mse(pred, y).item() - expected_mse) < 0.005
    assert abs(mae(pred, y).item() - expected_mae) < 0.005


def test_a_training_value_whose_square_overflows_is_refused():
    """1e300 is a float64, but its square is not: the standard deviation would be inf and every
    standardised value 0."""
    values = random_series(200, 2)
    values[10, 1] = 1e300
    with pytest.raises(
        DataRangeError, match=r"channel 1 \('1'\) .* standard deviation inf .* 1e\+300 at training row 10"
    ):
        ratio_splits(values, 10, 5)


@pytest.mark.parametrize("value", [1e30, -1e20, 1e6])
def test_an_extreme_value_outside_the_training_rows_is_refused(value):
    values = random_series(200, 2)
    values[190, 0] = value
    with pytest.raises(
        DataRangeError, match=r"'0' at row 190 \(test split\) .* training standard deviations"
    ):
        ratio_splits(values, 10, 5)


def test_ordinary_series_pass_the_range_check():
    series = load_default()
    splits = ratio_splits(series, 104, 52)
    largest = max(np.abs(getattr(splits, name)).max() for name in ("train", "val", "test"))
    assert largest < MAX_STANDARDISED / 100

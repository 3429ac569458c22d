import numpy as np
import pytest
import torch

from tests.common import assert_close
from vdn_pyro.data import sliding_windows, window_chunks


def make_series(num_rows=10, num_channels=2):
    # value = 10 * row + channel, so every entry names its own position
    rows = np.arange(num_rows)[:, None]
    return 10.0 * rows + np.arange(num_channels)[None, :]  # (N, C)


def test_hand_built_example():
    # N=7, C=2, L=3, H=2, stride=2: windows start at rows 0 and 2 -> W = (7 - 5) // 2 + 1 = 2
    x, y = sliding_windows(make_series(7, 2), lookback=3, horizon=2, stride=2)
    expected_x = [
        [0.0, 10.0, 20.0],  # window 0, channel 0
        [1.0, 11.0, 21.0],  # window 0, channel 1
        [20.0, 30.0, 40.0],  # window 1, channel 0
        [21.0, 31.0, 41.0],  # window 1, channel 1
    ]
    expected_y = [[30.0, 40.0], [31.0, 41.0], [50.0, 60.0], [51.0, 61.0]]
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert_close(x, expected_x)
    assert_close(y, expected_y)


@pytest.mark.parametrize(
    "num_rows,lookback,horizon,stride",
    [(5, 3, 2, 1), (10, 3, 2, 1), (10, 3, 2, 2), (10, 3, 2, 3), (50, 7, 4, 5), (11, 1, 1, 10)],
    ids=["exact-fit", "stride1", "stride2", "stride3-uneven", "long", "stride-past-end"],
)
@pytest.mark.parametrize("channel_independent", [True, False], ids=["ci", "multivariate"])
def test_counts_and_contents(num_rows, lookback, horizon, stride, channel_independent):
    series = make_series(num_rows, 3)
    x, y = sliding_windows(series, lookback, horizon, stride, channel_independent)
    num_windows = (num_rows - lookback - horizon) // stride + 1
    starts = list(range(0, num_rows - lookback - horizon + 1, stride))
    assert len(starts) == num_windows  # every window that fits, none dropped
    if channel_independent:
        assert x.shape == (num_windows * 3, lookback)
        assert y.shape == (num_windows * 3, horizon)
        for w, start in enumerate(starts):
            for c in range(3):
                assert_close(x[w * 3 + c], series[start : start + lookback, c])
                assert_close(y[w * 3 + c], series[start + lookback : start + lookback + horizon, c])
    else:
        assert x.shape == (num_windows, lookback, 3)
        assert y.shape == (num_windows, horizon, 3)
        for w, start in enumerate(starts):
            assert_close(x[w], series[start : start + lookback])
            assert_close(y[w], series[start + lookback : start + lookback + horizon])


def test_tensor_input_and_layouts_agree():
    series = torch.randn(40, 4, dtype=torch.float64)
    x_ci, y_ci = sliding_windows(series, 6, 3)
    x_mv, y_mv = sliding_windows(series, 6, 3, channel_independent=False)
    assert_close(x_ci, x_mv.transpose(1, 2).reshape(-1, 6))
    assert_close(y_ci, y_mv.transpose(1, 2).reshape(-1, 3))


@pytest.mark.parametrize(
    "num_windows,window_stride,chunk_stride",
    [(4, 1, None), (3, 2, None), (3, 2, 1), (2, 5, 3)],
    ids=["T4-default", "T3-ws2-default", "overlapping", "sparse"],
)
def test_chunk_shapes_and_contents(num_windows, window_stride, chunk_stride):
    num_rows, lookback, horizon = 30, 4, 2
    series = make_series(num_rows, 2)
    x, y = window_chunks(series, lookback, horizon, num_windows, window_stride, chunk_stride)
    step = num_windows * window_stride if chunk_stride is None else chunk_stride
    span = (num_windows - 1) * window_stride + lookback + horizon
    num_items = (num_rows - span) // step + 1
    assert x.shape == (num_items * 2, num_windows, lookback)
    assert y.shape == (num_items * 2, num_windows, horizon)
    for i in range(num_items):
        for c in range(2):
            for t in range(num_windows):
                start = i * step + t * window_stride
                assert_close(x[i * 2 + c, t], series[start : start + lookback, c])
                assert_close(y[i * 2 + c, t], series[start + lookback : start + lookback + horizon, c])
    # the last item's last window ends inside the series, and one more item would not fit
    assert (num_items - 1) * step + span <= num_rows < num_items * step + span


def test_chunk_multivariate_layout():
    series = make_series(30, 3)
    x, y = window_chunks(series, 4, 2, num_windows=3, window_stride=2, channel_independent=False)
    x_ci, y_ci = window_chunks(series, 4, 2, num_windows=3, window_stride=2)
    assert x.shape == (x_ci.shape[0] // 3, 3, 4, 3)
    assert_close(x_ci, x.permute(0, 3, 1, 2).reshape(-1, 3, 4))
    assert_close(y_ci, y.permute(0, 3, 1, 2).reshape(-1, 3, 2))


@pytest.mark.parametrize("stride", [1, 2, 5])
@pytest.mark.parametrize("channel_independent", [True, False], ids=["ci", "multivariate"])
def test_single_window_chunks_equal_sliding_windows(stride, channel_independent):
    series = np.random.default_rng(0).normal(size=(37, 3))
    x, y = window_chunks(series, 5, 3, 1, stride, channel_independent=channel_independent)
    x_ref, y_ref = sliding_windows(series, 5, 3, stride, channel_independent=channel_independent)
    assert_close(x.squeeze(1), x_ref, atol=0, rtol=0)
    assert_close(y.squeeze(1), y_ref, atol=0, rtol=0)


def test_short_series_error_names_sizes():
    with pytest.raises(ValueError, match=r"has 4 rows.*lookback \+ horizon = 3 \+ 2.*shorten"):
        sliding_windows(make_series(4, 1), 3, 2)
    with pytest.raises(ValueError, match=r"has 10 rows.*at least 11 rows"):
        window_chunks(make_series(10, 1), 3, 2, num_windows=4, window_stride=2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"lookback": 0}, ValueError, "lookback > 0"),
        ({"horizon": -1}, ValueError, "horizon > 0"),
        ({"stride": 0}, ValueError, "stride > 0"),
        ({"lookback": 2.5}, TypeError, "lookback to be a positive int"),
        ({"horizon": True}, TypeError, "horizon to be a positive int"),
    ],
    ids=["lookback0", "horizon-neg", "stride0", "lookback-float", "horizon-bool"],
)
def test_bad_sizes(kwargs, error, match):
    args = {"lookback": 3, "horizon": 2, "stride": 1, **kwargs}
    with pytest.raises(error, match=match):
        sliding_windows(make_series(), **args)


def test_bad_chunk_sizes():
    with pytest.raises(ValueError, match="num_windows > 0"):
        window_chunks(make_series(), 3, 2, num_windows=0, window_stride=1)
    with pytest.raises(ValueError, match="chunk_stride > 0"):
        window_chunks(make_series(), 3, 2, num_windows=1, window_stride=1, chunk_stride=0)


@pytest.mark.parametrize("shape", [(10,), (10, 2, 1)], ids=["1d", "3d"])
def test_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"shape \(N, C\) with 2 dims"):
        sliding_windows(np.zeros(shape), 3, 2)


def test_univariate_hint():
    with pytest.raises(ValueError, match=r"reshape\(-1, 1\)"):
        sliding_windows(np.zeros(10), 3, 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite(bad):
    series = make_series(10, 2)
    series[6, 1] = bad
    with pytest.raises(ValueError, match=r"1 NaN/inf values \(first at row 6, column 1\)"):
        sliding_windows(series, 3, 2)
    with pytest.raises(ValueError, match="NaN/inf"):
        window_chunks(series, 3, 2, 2, 1)


def test_non_numeric_series():
    with pytest.raises(TypeError, match="numeric"):
        sliding_windows(np.array([["a"], ["b"]] * 5), 3, 2)

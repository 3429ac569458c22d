import numpy as np
import pandas as pd
import pytest

from tests.common import ETT_PATH, assert_close, requires_ett
from vdn_pyro.data import ETT_COLUMNS, TimeSeries, load_csv, load_default, load_ett

CSV = """date,a,b
2020-01-01 00:00:00,1.0,10
2020-01-01 01:00:00,2.0,20
2020-01-01 02:00:00,3.5,30
"""


def write(tmp_path, text, name="series.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_csv(tmp_path):
    series = load_csv(write(tmp_path, CSV))
    assert isinstance(series, TimeSeries)
    assert series.values.dtype == np.float64
    assert_close(series.values, [[1.0, 10.0], [2.0, 20.0], [3.5, 30.0]])
    assert series.columns == ["a", "b"]
    assert isinstance(series.index, pd.DatetimeIndex)
    assert series.index[2] == pd.Timestamp("2020-01-01 02:00:00")
    assert series.name == "series"
    assert len(series) == 3


def test_target_columns_order_and_single_name(tmp_path):
    path = write(tmp_path, CSV)
    assert_close(load_csv(path, target_columns=["b", "a"]).values[0], [10.0, 1.0])
    single = load_csv(path, target_columns="b")
    assert single.columns == ["b"] and single.values.shape == (3, 1)


def test_no_date_column(tmp_path):
    series = load_csv(write(tmp_path, "x,y\n1,2\n3,4\n"), date_column=None)
    assert isinstance(series.index, pd.RangeIndex)
    assert_close(series.values, [[1.0, 2.0], [3.0, 4.0]])


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv.*check the path"):
        load_csv(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "text,match",
    [("", "is empty"), ("date,a\n", r"only a header \(\['date', 'a'\]\)")],
    ids=["empty", "header-only"],
)
def test_empty_file(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_csv(write(tmp_path, text))


def test_missing_date_column(tmp_path):
    with pytest.raises(ValueError, match=r"date column 'time'.*\['date', 'a', 'b'\].*date_column=None"):
        load_csv(write(tmp_path, CSV), date_column="time")


def test_missing_target_columns(tmp_path):
    with pytest.raises(ValueError, match=r"\['c', 'd'\].*columns are \['date', 'a', 'b'\]"):
        load_csv(write(tmp_path, CSV), target_columns=["a", "c", "d"])


def test_bad_date(tmp_path):
    text = CSV.replace("2020-01-01 01:00:00", "yesterday")
    with pytest.raises(ValueError, match="column 'date'.*row 1 holds 'yesterday'"):
        load_csv(write(tmp_path, text))


def test_non_numeric_value(tmp_path):
    text = CSV.replace("3.5,30", "3.5,thirty")
    with pytest.raises(ValueError, match=r"column 'b'.*row 2 \(line 4\) holds 'thirty'"):
        load_csv(write(tmp_path, text))


MISSING = """date,a,b
2020-01-01,,1
2020-01-02,2,2
2020-01-03,,4
2020-01-04,6,
"""


def test_missing_values_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"\{'a': 2, 'b': 1\}.*column 'a' at row 0.*fill='ffill' or fill='interpolate'"
    ):
        load_csv(write(tmp_path, MISSING))


@pytest.mark.parametrize(
    "fill,expected",
    [
        ("ffill", [[2.0, 1.0], [2.0, 2.0], [2.0, 4.0], [6.0, 4.0]]),
        ("interpolate", [[2.0, 1.0], [2.0, 2.0], [4.0, 4.0], [6.0, 4.0]]),
    ],
)
def test_fill(tmp_path, fill, expected):
    series = load_csv(write(tmp_path, MISSING), fill=fill)
    assert_close(series.values, expected)


def test_bad_fill(tmp_path):
    with pytest.raises(ValueError, match="fill to be None, 'ffill' or 'interpolate'"):
        load_csv(write(tmp_path, CSV), fill="zero")


def test_fill_all_missing_column(tmp_path):
    with pytest.raises(ValueError, match=r"\['a'\].*no valid value"):
        load_csv(write(tmp_path, "date,a,b\n2020-01-01,,1\n2020-01-02,,2\n"), fill="ffill")


def test_time_series_checks_shapes():
    with pytest.raises(ValueError, match="2 column names"):
        TimeSeries(np.zeros((3, 2)), ["a"], pd.RangeIndex(3), "x")
    with pytest.raises(ValueError, match="index of length 3"):
        TimeSeries(np.zeros((3, 2)), ["a", "b"], pd.RangeIndex(4), "x")


def test_load_default():
    from statsmodels.datasets import co2

    series = load_default()
    raw = co2.load_pandas().data["co2"].to_numpy()
    assert series.values.shape == (2284, 1)
    assert series.columns == ["co2"]
    assert np.isfinite(series.values).all()
    assert isinstance(series.index, pd.DatetimeIndex)
    assert series.index[0] == pd.Timestamp("1958-03-29")
    observed = ~np.isnan(raw)
    assert (~observed).sum() > 0  # the raw data has gaps, so the filling is exercised
    assert_close(series.values[observed, 0], raw[observed], atol=0, rtol=0)
    # an isolated missing week is the mean of its neighbours
    gaps = np.flatnonzero(~observed)
    isolated = [i for i in gaps if 0 < i < len(raw) - 1 and observed[i - 1] and observed[i + 1]]
    i = isolated[0]
    assert_close(series.values[i, 0], (raw[i - 1] + raw[i + 1]) / 2)


@requires_ett()
def test_load_ett_from_path_and_env(monkeypatch):
    series = load_ett(ETT_PATH)
    assert series.values.shape == (17420, 7)
    assert series.columns == ETT_COLUMNS
    assert series.name == "ETTh1"
    assert series.index[1] - series.index[0] == pd.Timedelta(hours=1)
    monkeypatch.setenv("VDN_ETT_PATH", str(ETT_PATH))
    assert_close(load_ett().values[:5], series.values[:5], atol=0, rtol=0)


def test_load_ett_default_location(tmp_path, monkeypatch):
    # <cwd>/../shared/data/ETT-small/ETTh1.csv, with a tiny stand-in file
    data_dir = tmp_path / "shared" / "data" / "ETT-small"
    data_dir.mkdir(parents=True)
    header = "date," + ",".join(ETT_COLUMNS)
    write(data_dir, f"{header}\n2016-07-01 00:00:00,1,2,3,4,5,6,7\n", name="ETTh1.csv")
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("VDN_ETT_PATH", raising=False)
    assert_close(load_ett().values, [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])


def test_load_ett_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDN_ETT_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="default location.*VDN_ETT_PATH"):
        load_ett()
    monkeypatch.setenv("VDN_ETT_PATH", str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match="missing.csv.*from VDN_ETT_PATH"):
        load_ett()
    with pytest.raises(FileNotFoundError, match="from the path argument"):
        load_ett(tmp_path / "other.csv")


@pytest.mark.parametrize("text", ["1e400", "inf", "-Infinity"])
def test_infinite_values_are_refused(tmp_path, text):
    path = write(tmp_path, f"date,a\n2020-01-01,1\n2020-01-02,{text}\n2020-01-03,3\n")
    with pytest.raises(
        ValueError, match=r"finite numbers in column 'a' .* row 1 \(line 3\) holds -?inf, which is infinite"
    ):
        load_csv(path)


def test_dates_in_reverse_order_are_refused(tmp_path):
    path = write(tmp_path, "date,a\n2020-01-03,1\n2020-01-02,2\n2020-01-01,3\n")
    with pytest.raises(
        ValueError, match=r"increasing order but row 1 \(2020-01-02\) is earlier than row 0.*sort"
    ):
        load_csv(path)


def test_repeated_dates_are_refused(tmp_path):
    path = write(tmp_path, "date,a\n2020-01-01,1\n2020-01-02,2\n2020-01-02,3\n")
    with pytest.raises(ValueError, match=r"row 2 \(2020-01-02\) repeats the date of row 1.*remove"):
        load_csv(path)

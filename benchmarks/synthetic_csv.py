"""Two synthetic long-horizon CSVs in the formats of the harness's other data sets, for runs on
series that no choice of the harness was tuned on.

- ``ettm_like.csv``: the ETT format at 15 minutes (a ``date`` column and 4 numeric columns,
  69,680 rows, the size of ETTm1, so the harness's ETT protocol applies: 12/4/4 months at four
  rows an hour). Each channel is a daily cycle (96 rows) whose amplitude drifts over a month, a
  slow random-walk level, a persistent AR(1) component (phi 0.97 per row) driven by Student-t
  innovations (4 degrees of freedom: heavy tails) and white noise.
- ``weather_like.csv``: the 7:1:2 format at 10 minutes (30,000 rows, 4 columns): three channels of
  a daily cycle (144 rows), a random-walk level and Student-t noise (3 degrees of freedom), and a
  bursty ``rain`` channel (rare exponential bursts of 5-60 rows on a near-zero floor of uniform
  noise of width 0.01, so its dry windows are nearly flat but not exactly).

    python benchmarks/synthetic_csv.py --out-dir /tmp/synthetic
    python benchmarks/forecast_ett.py --data /tmp/synthetic/ettm_like.csv --horizons 96 --seeds 0

The files are drawn from ``--seed`` (numpy's generator), so they are the same on every machine.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def ettm_like(rng, rows=69680, columns=("HUFL", "HULL", "MUFL", "OT")):
    """The ETT-format frame: ``date`` then ``columns``, ``rows`` rows 15 minutes apart."""
    t = np.arange(rows)[:, None]  # (N, 1)
    c = len(columns)
    amplitude = 1 + 0.3 * np.sin(2 * np.pi * t / (96 * 30))  # (N, 1): a monthly drift
    cycle = np.sin(2 * np.pi * t / 96 + np.arange(c)) * amplitude  # (N, C)
    level = np.cumsum(rng.normal(0, 0.02, (rows, c)), 0)  # (N, C)
    shocks = rng.standard_t(4, (rows, c)) * 0.15  # (N, C)
    persistent = np.zeros((rows, c))
    for i in range(1, rows):
        persistent[i] = 0.97 * persistent[i - 1] + shocks[i]
    values = cycle + level + persistent + 0.1 * rng.normal(size=(rows, c))  # (N, C)
    frame = pd.DataFrame(values, columns=list(columns))
    frame.insert(0, "date", pd.date_range("2016-07-01", periods=rows, freq="15min").astype(str))
    return frame


def weather_like(rng, rows=30000, columns=("p", "T", "rh", "rain")):
    """The 7:1:2-format frame: ``date`` then ``columns`` (the last one bursty), 10 minutes apart."""
    t = np.arange(rows)[:, None]  # (N, 1)
    c = len(columns)
    cycle = np.sin(2 * np.pi * t / 144 + np.arange(c))  # (N, C)
    level = np.cumsum(rng.normal(0, 0.03, (rows, c)), 0)  # (N, C)
    values = cycle + level + 0.1 * rng.standard_t(3, (rows, c))  # (N, C)
    rain = np.zeros(rows)
    for start in np.flatnonzero(rng.random(rows) < 0.003):
        rain[start : start + rng.integers(5, 60)] += rng.exponential(2.0)
    values[:, -1] = rain + 0.01 * rng.random(rows)
    frame = pd.DataFrame(values, columns=list(columns))
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=rows, freq="10min").astype(str))
    return frame


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="folder for ettm_like.csv and weather_like.csv")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    paths = []
    for name, make in (("ettm_like", ettm_like), ("weather_like", weather_like)):
        path = out / f"{name}.csv"
        make(rng).to_csv(path, index=False)
        paths.append(path)
    print("written:", ", ".join(map(str, paths)))
    return paths


if __name__ == "__main__":
    main()

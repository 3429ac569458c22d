"""Wider candidate families for the closed-form skip path (the forecast mean of every trained model
in ``forecast_ett.py``), each chosen on the validation MSE: does any lower it?

The harness's skip path is one linear map from the look-back to the horizon, shared by every
channel, with its ridge penalty chosen on validation (:func:`vdn_pyro.forecasting.fit_least_squares`;
the row ``shared, L' = L``). Candidate families, each with its penalty chosen on validation among
:data:`vdn_pyro.forecasting.RIDGES`:

- ``shared, L' = 96 / 192``: the same map reading only the last L' values of the window;
- ``per channel``: one map per channel (DLinear's ``individual`` variant);
- ``shrunk to last value``: the ridge penalty pulls the map towards repeating the last value (a
  soft unit root, between the plain fit and the last-value normalisation of NLinear) instead of
  towards zero.

Every fit reads the training windows (stride 1, as the harness's); the validation MSE chooses;
the test MSE is printed beside it only to record what the choice would give, never to choose.

    python benchmarks/skip_candidates.py                       # ETTh1, 4 horizons, ~1 minute
    python benchmarks/skip_candidates.py --data ETTm1.csv --horizons 96 --out-dir /tmp/skip
"""

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vdn_pyro.data import load_csv  # noqa: E402
from vdn_pyro.data.protocol import PROTOCOLS, protocol_splits  # noqa: E402
from vdn_pyro.files import atomic_path, write_text  # noqa: E402
from vdn_pyro.forecasting import RIDGES  # noqa: E402


def design(x, length):
    """``[x_{L-L'+1:L}; 1]`` in float64: ``(N, L' + 1)`` from windows ``(N, L)``."""
    x = x[:, -length:].double()
    return torch.cat([x, x.new_ones(x.shape[0], 1)], -1)


def ridge_solve(gram, cross, count, ridge, towards=None):
    """The ridge solution ``(L' + 1, H)`` of the normal equations, penalty ``ridge`` per observation
    on the weights (not the bias), shrunk towards ``towards`` ``(L' + 1, H)`` (default zero); the
    same relative floor of 1e-10 as :func:`vdn_pyro.models.baselines.solve_ridge`."""
    penalty = torch.full((gram.shape[0],), ridge * count, dtype=gram.dtype)
    penalty[-1] = 0.0
    penalty[:-1] += 1e-10 * gram.diagonal()[:-1].mean()
    rhs = cross if towards is None else cross + penalty[:, None] * towards
    return torch.linalg.solve(gram + torch.diag(penalty), rhs)


def squared_error(solution, x, y, length):
    """Sum of squared errors of the map ``solution`` on windows ``(N, L)``, targets ``(N, H)``."""
    return ((design(x, length) @ solution - y.double()) ** 2).sum().item()


def choose(fits, val, test, channels=1):
    """The fit with the lowest validation MSE among ``fits`` (``{ridge: [(solution, length,
    channel or None), ...]}``; a part with a channel c scores only that channel's windows, every
    ``channels``-th row from row c, the windows being ordered (window, channel)):
    ``(ridge, val_mse, test_mse)``."""
    best = None
    for ridge, parts in fits.items():
        scores = []
        for x, y in (val, test):
            err = 0.0
            for solution, length, channel in parts:
                rows = slice(None) if channel is None else slice(channel, None, channels)
                err += squared_error(solution, x[rows], y[rows], length)
            scores.append(err / y.numel())
        if best is None or scores[0] < best[1]:
            best = (ridge, *scores)
    return best


def candidates(splits):
    """Each family's validation-chosen member on ``splits``: ``{family: (ridge, val, test)}``."""
    x, y = splits.windows("train")  # (N, L), (N, H)
    val, test = splits.windows("val"), splits.windows("test")
    lookback, horizon, channels = splits.lookback, splits.horizon, splits.train.shape[1]
    out = {}
    for length in sorted({96, 192, lookback} & set(range(1, lookback + 1))):
        d = design(x, length)
        gram, cross = d.T @ d, d.T @ y.double()
        fits = {r: [(ridge_solve(gram, cross, d.shape[0], r), length, None)] for r in RIDGES}
        out[f"shared, L' = {length}"] = choose(fits, val, test)
    d = design(x, lookback)
    gram, cross = d.T @ d, d.T @ y.double()
    last = torch.zeros(lookback + 1, horizon, dtype=torch.float64)
    last[lookback - 1] = 1.0  # repeat the last value
    fits = {r: [(ridge_solve(gram, cross, d.shape[0], r, last), lookback, None)] for r in RIDGES}
    out["shrunk to last value"] = choose(fits, val, test)
    fits = {r: [] for r in RIDGES}
    for c in range(channels):
        dc, yc = d[c::channels], y[c::channels].double()  # channel c's windows
        gram, cross = dc.T @ dc, dc.T @ yc
        for r in RIDGES:
            fits[r].append((ridge_solve(gram, cross, dc.shape[0], r), lookback, c))
    out["per channel"] = choose(fits, val, test, channels)
    return out


def main(argv=None):
    default_data = os.environ.get(
        "VDN_ETT_PATH", str(ROOT.parent / "shared" / "data" / "ETT-small" / "ETTh1.csv")
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=default_data, help="a long-horizon CSV (default ETTh1.csv)")
    parser.add_argument("--date-column", default="date")
    parser.add_argument("--protocol", default="auto", choices=("auto",) + tuple(PROTOCOLS))
    parser.add_argument("--lookback", type=int, default=336)
    parser.add_argument("--horizons", type=int, nargs="+", default=[96, 192, 336, 720])
    out_dir = ROOT / "benchmarks" / "results" / "paths" / "skip_candidates"
    parser.add_argument("--out-dir", default=str(out_dir))
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        parser.exit(2, f"skip_candidates.py: error: expected a CSV at {args.data}, but there is none\n")
    series = load_csv(args.data, date_column=args.date_column)
    rows = []
    for horizon in args.horizons:
        splits = protocol_splits(series, args.lookback, horizon, args.protocol)
        found = candidates(splits)
        base = found[f"shared, L' = {args.lookback}"][1]
        for family, (ridge, val, test) in found.items():
            rows.append(
                {
                    "horizon": horizon,
                    "family": family,
                    "ridge": ridge,
                    "val_mse": val,
                    "val_change": val / base - 1.0,
                    "test_mse": test,
                }
            )
            change = 100 * (val / base - 1)
            head = f"H={horizon} {family:22s} ridge={ridge:<6g}"
            print(head, f"val {val:.4f} ({change:+.2f}%) test {test:.4f}", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    with atomic_path(out / "skip_candidates.csv") as tmp:
        frame.to_csv(tmp, index=False)
    lines = [f"{Path(args.data).name}, L = {args.lookback}", ""]
    lines += ["| H | family | ridge | val MSE | val change | test MSE (not used) |", "|---" * 6 + "|"]
    lines += [
        f"| {r.horizon} | {r.family} | {r.ridge:g} | {r.val_mse:.4f} | {100 * r.val_change:+.2f}% "
        f"| {r.test_mse:.4f} |"
        for r in frame.itertuples()
    ]
    write_text(out / "skip_candidates.md", "\n".join(lines) + "\n")
    print("written:", out / "skip_candidates.md")
    return frame


if __name__ == "__main__":
    main()

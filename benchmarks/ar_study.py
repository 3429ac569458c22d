"""AR study on ETTh1: temporal neurons with an AR prior against a static Normal prior, and a
Persistence band on the AR memory against a free phi.

Every variant is the benchmark's VDN forecaster (the recipe of ``forecast_ett.py`` and of
``vdn fit --preset ett``, including the closed-form skip path of ``--skip-fit ridge``, the data and
protocol options, and the input normalisation chosen on the skip path's validation MSE), trained on
chunks of ``--chunk`` consecutive windows ``--train-stride`` rows apart, and scored like the
benchmark's models (marginal and path scores, validation and test); a variant changes keys of the
run configuration only (:func:`variant_options`):

- ``normal``: a Normal N(0, 1) prior per unit: the windows of a chunk are independent a priori;
- ``ar-free``: a learned AR(1) prior per unit over the windows of a chunk, phi free in (-1, 1);
- ``ar-band``: the same with :class:`~vdn_pyro.inference.constraints.Persistence` keeping each
  unit's half-life inside ``--band`` (in windows);
- ``static``: the AR prior on single windows (T = 1, the stationary marginal), for reference.

Writes ``ar_study_runs.csv``, ``ar_study.csv``, ``ar_study.md``, ``ar_half_lives.csv`` and
``ar_half_lives.png`` (the learned per-unit half-lives in rows, i.e. hours for hourly data, free vs
band) to ``--out-dir`` (default ``benchmarks/results``; with ``--quick``, a new temporary
directory).

    python benchmarks/ar_study.py --horizons 96 --seeds 0 1 2 --jobs 2
    python benchmarks/ar_study.py --quick
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import forecast_ett  # noqa: E402

from vdn_pyro.files import atomic_path  # noqa: E402

VARIANTS = ("normal", "ar-free", "ar-band", "static")


def variant_options(name, args):
    """``(overrides, chunk)`` of one variant: dotted keys of the run configuration -> values, and
    the windows per training item."""
    if name == "normal":
        return {"neurons.prior.kind": "normal"}, args.chunk
    if name == "ar-free":
        return {"neurons.prior.kind": "ar"}, args.chunk
    if name == "ar-band":
        lo, hi = args.band
        band = {
            "neurons.prior.kind": "ar",
            "neurons.prior.phi": 0.5 ** (2 / (lo + hi)),
            "constraints.persistence.enabled": True,
            "constraints.persistence.half_life": [lo, hi],
        }
        return band, args.chunk
    if name == "static":
        return {"neurons.prior.kind": "ar"}, 1
    raise ValueError(f"Expected a variant in {VARIANTS}, but got {name!r}.")


def half_life_figure(path, half_lives, band_hours):
    """Histogram of the learned per-unit half-lives (hours), one panel per AR variant, on shared
    bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("ar-free", "ar-band") if half_lives.get(n)]
    values = {n: np.concatenate(half_lives[n]) for n in names}
    everything = np.concatenate(list(values.values()) + [np.asarray(band_hours, dtype=float)])
    lo, hi = float(everything.min()), float(everything.max())
    bins = np.linspace(max(lo - 0.5, 0.0), hi + 0.5, 41)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(5 * max(1, len(names)), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.hist(values[name], bins=bins, color="tab:blue" if name == "ar-free" else "tab:orange")
        if name == "ar-band":
            for edge in band_hours:
                ax.axvline(edge, color="black", ls="--", lw=1)
        ax.set_title(f"{name}: {len(values[name])} units, median {np.median(values[name]):.1f} h")
        ax.set_xlabel("half-life of the unit's AR prior (hours)")
        ax.set_ylabel("units")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def study_task(horizon, seed, args, series, cache=None):
    """Every variant at one horizon and seed; returns their rows, each with its units'
    half-lives in rows, hours for hourly data (``"half_lives"``, a list; absent for the Normal
    prior)."""
    torch.set_num_threads(args.threads)
    splits = forecast_ett.task_splits(series, args, horizon)
    test = splits.windows("test", stride=args.test_stride)
    val = splits.windows("val", stride=args.val_stride)
    cache = {} if cache is None else cache  # the skip path lent to every variant (--skip-fit)
    norm, norm_scores = forecast_ett.skip_norm(splits, seed, args, cache)
    skip = forecast_ett.lend_skip(splits, seed, args, norm, cache)
    hours = args.train_stride  # one window step in rows
    rows = []
    for name in args.variants:
        overrides, chunk = variant_options(name, args)
        variant_args = argparse.Namespace(**{**vars(args), "chunk": chunk})
        fitted = forecast_ett.run_one(
            "vdn", splits, seed, variant_args, norm, cache, overrides=overrides, skip_from=skip
        )
        val_scores = forecast_ett.score(fitted.view, *val, args, seed)
        row = forecast_ett.score_row("vdn", fitted, splits, seed, args, val_scores, test, norm_scores)
        row["model"] = name
        prior = fitted.model.layers[0].prior
        if hasattr(prior, "half_life"):
            life = prior.half_life.cpu().numpy() * hours  # (U,) hours
            row["half_lives"] = [float(v) for v in life]
            row["half_life_median_h"] = float(np.median(life))
            row["phi_mean"] = float(prior.phi.detach()[:, 0].mean())
        rows.append(row)
        life = row.get("half_life_median_h", float("nan"))
        print(forecast_ett.format_row(row, f"half-life={life:.1f}h"), flush=True)
    return rows


def prepare(args):
    """The study's options (``--quick`` applied) and series, refusing bad options, bad data and a
    run whose windows would not fit in memory, before any work: ``(args, series)``."""
    if args.quick:
        args = forecast_ett.apply_quick(args)
        args.chunk = 2
        args.train_stride = 24
    if args.norm_select != "skip":
        raise ValueError(
            "Expected --norm-select skip: the AR study chooses one normalisation for every variant on "
            f"the skip path's validation MSE, but got --norm-select {args.norm_select}."
        )
    forecast_ett.check_args(args)
    series = forecast_ett.load_series(args)
    forecast_ett.check_memory(series, args)
    return args, series


def main(args, prepared=None):
    """Run the study; return the summary :class:`pandas.DataFrame`.

    :param prepared: :func:`prepare` of ``args`` when already done.
    """
    args, series = prepare(args) if prepared is None else prepared
    torch.set_num_threads(args.threads)
    out_dir = forecast_ett.resolve_out_dir(args, "ar_study")
    hours = args.train_stride  # one window step in rows
    note = (
        f"AR study, {series.name} ({forecast_ett.protocol_of(series, args)[1]}), L={args.lookback}; chunks "
        f"of {args.chunk} windows {args.train_stride} rows apart; Persistence band {args.band} windows = "
        f"{[b * hours for b in args.band]} rows; options: "
        + json.dumps({k: v for k, v in vars(args).items() if k not in ("data", "out_dir")})
    )
    order = {
        key: i
        for i, key in enumerate((h, s, v) for h in args.horizons for s in args.seeds for v in args.variants)
    }
    runs, half_lives = [], {}
    for rows in forecast_ett.run_tasks(args, series, task=study_task):
        runs = sorted(runs + rows, key=lambda r: order[(r["horizon"], r["seed"], r["model"])])
    for row in runs:
        if "half_lives" in row:
            half_lives.setdefault(row["model"], []).append(np.asarray(row.pop("half_lives")))
    summary, table = forecast_ett.write_outputs(runs, out_dir, stem="ar_study", note=note)
    band_hours = [b * hours for b in args.band]
    half_life_figure(Path(out_dir) / "ar_half_lives.png", half_lives, band_hours)
    rows = [
        {"variant": name, "run": i, "unit": u, "half_life_h": float(v)}
        for name, lives in half_lives.items()
        for i, life in enumerate(lives)
        for u, v in enumerate(life)
    ]
    with atomic_path(Path(out_dir) / "ar_half_lives.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    print(note)
    print(table)
    print(f"written to {out_dir}")
    return summary


def parse_args(argv=None):
    parser = forecast_ett.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(horizons=[96], chunk=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--band", type=float, nargs=2, default=[2.0, 6.0], help="half-life band (windows)")
    return forecast_ett.fill_defaults(parser.parse_args(argv))


if __name__ == "__main__":
    forecast_ett.run_script(main, prepare, parse_args())

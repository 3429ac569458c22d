"""Long-horizon forecasting on ETTh1: the VDN forecaster against its deterministic twin, DLinear
and repeat-last-value, beside the published DLinear and NLinear numbers.

Protocol (../shared/data/README.md): look-back L = 336, horizons 96/192/336/720, train rows
[0, 8640), validation [8640 - L, 11520), test [11520 - L, 14400), a scaler fitted on the training
rows, channel-independent windows of all 7 channels, metrics on the scaled values averaged over
every test window (stride 1), channel and horizon step. Models are selected by validation only
(early stopping on the validation CRPS, best state restored); the test split is scored once.

Every model is trained by the recipe of ``vdn fit``: the run configuration of the ``ett`` preset
(:data:`vdn_pyro.config.PRESETS`), turned into a :class:`~vdn_pyro.forecasting.TrainConfig` and
run by :func:`~vdn_pyro.forecasting.train_forecaster`, the VDN built by
:meth:`~vdn_pyro.config.RunConfig.forecaster_config`. Each option below sets one key of that
configuration (:data:`CONFIG_KEYS`; its default is the preset's) and ``--set KEY=VALUE`` sets any
other, so ``vdn fit --preset ett --set fit.seed=S --set data.horizon=H`` trains the row of seed S at
horizon H. The recipe: Adam (lr 5e-3, x0.6 per epoch), at most 10 epochs, items of ``--chunk`` = 4
consecutive windows (the VDN's AR prior runs over them), 256 windows per step, selection on the
validation CRPS with patience 3 and the best state restored. To keep a full run on a 2-core CPU,
the training windows are subsampled with ``--train-stride`` rows between them (default 2: half of
the windows, every training row still seen); validation and test windows are all used
(``--quick`` subsamples them).

``linear`` is DLinear fitted in closed form (ridge least squares on every training window, the
penalty chosen on the validation MSE; DLinear is linear in the window, so this is its exact
least-squares fit); it has no seed. With ``--skip-fit ridge`` (default) the VDN and its twin are
trained in two stages: this fit is their frozen skip path and the neurons and head are fitted by
the ELBO on top of it (``sgd``: the gradient-trained DLinear of the same seed is lent instead;
``joint``: the skip path is trained with the rest).

The VDN forecaster is a :class:`~vdn_pyro.models.Forecaster` with 64 neurons under an AR(1) prior
over the windows of a chunk, input-dependent posterior scales, beta = 1e-3 and K = 16 posterior
draws mixed in the likelihood. With ``--mean skip`` and ``--likelihood-scale heteroscedastic``
(the defaults, chosen on the validation split: at H = 192 validation CRPS 0.469 and NLL 1.27
against 0.471 and 1.49 for ``--mean head``) the forecast mean is the frozen closed-form skip path
and the neurons set the predictive scale: the predictive is a scale mixture around the
least-squares forecast. It is scored by ``--num-samples`` = 100 Monte Carlo draws per test window
(exact mixture NLL and coverage, sample CRPS) and selected with ``--val-samples`` = 32; with
``--mean head --likelihood-scale learned`` its predictive is exactly Gaussian and scored in closed
form (``--mc``: by Monte Carlo anyway). The twin is the same network with ``deterministic=True``
(z = its posterior mean: a deterministic heteroscedastic scale).

``--jobs 2`` runs the (horizon, seed) tasks in two worker processes, one torch thread each.

    python benchmarks/forecast_ett.py --jobs 2         # 4 horizons x 5 models x 3 seeds
    python benchmarks/forecast_ett.py --horizons 96 --seeds 0
    python benchmarks/forecast_ett.py --quick          # a smoke run, < 3 minutes

Writes ``forecast_ett_runs.csv`` (one row per horizon, model and seed), ``forecast_ett.csv`` and
``forecast_ett.md`` (mean and standard deviation over seeds) to ``--out-dir``.
"""

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vdn_pyro.cli import build_constraints  # noqa: E402
from vdn_pyro.config import PRESETS, load_config, merge_dicts, parse_overrides, validate_config  # noqa: E402
from vdn_pyro.data import ett_hourly_splits, load_ett  # noqa: E402
from vdn_pyro.forecasting import (  # noqa: E402
    METRICS,
    SELECTIONS,
    SKIP_FITS,
    evaluate_forecaster,
    fit_least_squares,
    train_forecaster,
    training_windows,
)
from vdn_pyro.models import DLinear, Forecaster, RepeatLast  # noqa: E402

MODELS = ("vdn", "twin", "dlinear", "linear", "repeat")
LABELS = {
    "vdn": "VDN forecaster",
    "twin": "deterministic twin",
    "dlinear": "DLinear (ours, SGD)",
    "linear": "DLinear (ours, closed form)",
    "repeat": "repeat-last (ours)",
}
#: Zeng et al. (AAAI 2023), Table 2, ETTh1, L = 336: (MSE, MAE).
PUBLISHED = {
    "DLinear (published)": {
        96: (0.375, 0.399),
        192: (0.405, 0.416),
        336: (0.439, 0.443),
        720: (0.472, 0.490),
    },
    "NLinear (published)": {
        96: (0.374, 0.394),
        192: (0.408, 0.415),
        336: (0.429, 0.427),
        720: (0.440, 0.453),
    },
}
COLUMNS = ("mse", "mae", "crps", "nll", "coverage_90")
LOOKBACK = PRESETS["ett"]["data"]["lookback"]


#: Command-line options that set a key of the run configuration (default: the ``ett`` preset's).
CONFIG_KEYS = {
    "epochs": "fit.epochs",
    "patience": "fit.patience",
    "select": "fit.select",
    "skip_fit": "fit.skip_fit",
    "lr": "fit.lr",
    "lr_decay": "fit.lr_decay",
    "val_samples": "fit.val_samples",
    "threads": "fit.threads",
    "train_stride": "data.train_stride",
    "chunk": "data.chunk",
    "val_stride": "data.val_stride",
    "test_stride": "data.test_stride",
    "units": "neurons.units",
    "features": "neurons.features",
    "prior": "neurons.prior.kind",
    "phi": "neurons.prior.phi",
    "beta": "neurons.beta",
    "train_draws": "neurons.train_draws",
    "init_scale": "neurons.init_scale",
    "likelihood_scale": "neurons.likelihood_scale",
    "mean": "neurons.mean",
    "activation": "neurons.activation",
    "num_samples": "evaluate.num_samples",
}


def _nested(dotted, value):
    """``{"a": {"b": value}}`` for ``"a.b"``."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _lookup(config, dotted):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def fill_defaults(args):
    """Give every configuration option left unset on the command line the ``ett`` preset's
    value (``--batch-size``: the preset's windows per step, batch size x chunk)."""
    preset = load_config(preset="ett")
    for dest, key in CONFIG_KEYS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, _lookup(preset, key))
    if args.batch_size is None:
        args.batch_size = preset.fit.batch_size * preset.data.chunk
    return args


def run_config(args, horizon, seed, overrides=None):
    """The run configuration of one (horizon, seed) task: the ``ett`` preset, then the
    command-line options, then ``--set``, then ``overrides`` (dotted key -> value).

    ``--batch-size`` counts windows: the configuration's ``fit.batch_size`` counts items of
    ``--chunk`` windows.
    """
    values = {key: getattr(args, dest) for dest, key in CONFIG_KEYS.items()}
    values.update(
        {
            "data.path": args.data,
            "data.horizon": horizon,
            "fit.seed": seed,
            "fit.batch_size": max(1, args.batch_size // args.chunk),
            "evaluate.exact": not args.mc,
        }
    )
    data = PRESETS["ett"]
    for key, value in values.items():
        data = merge_dicts(data, _nested(key, value))
    data = merge_dicts(data, parse_overrides(args.set))
    for key, value in (overrides or {}).items():
        data = merge_dicts(data, _nested(key, value))
    return validate_config(data)


def build_model(name, config):
    """A fresh model by name, one of :data:`MODELS`, for the look-back and horizon of
    ``config`` (the VDN and its twin: its forecaster)."""
    if name == "vdn":
        return Forecaster(config.forecaster_config())
    if name == "twin":
        return Forecaster(config.forecaster_config(deterministic=True))
    if name in ("dlinear", "linear"):
        return DLinear(config.data.lookback, config.data.horizon)
    if name == "repeat":
        return RepeatLast(config.data.lookback, config.data.horizon)
    raise ValueError(f"Expected a model in {MODELS}, but got {name!r}.")


def run_one(name, splits, seed, args, test=None, overrides=None, skip_from=None):
    """Train one model on ``splits`` with the recipe of its run configuration
    (:func:`run_config`) and score it on the test windows.

    :param dict overrides: dotted configuration keys -> values for this model.
    :param skip_from: a fitted DLinear to copy, frozen, into the skip path of ``vdn``/``twin``.
    :returns: ``(row, model)``; the row holds horizon, model, seed, the metrics, best validation
        score, epochs, training and scoring seconds.
    """
    config = run_config(args, splits.horizon, seed, overrides)
    pyro.set_rng_seed(seed)
    model = build_model(name, config)
    start = time.perf_counter()
    if name not in ("vdn", "twin"):
        skip_from = None
    if name == "linear":
        result = fit_least_squares(model, splits, config.fit.ridges)
        best, epochs = result["val_mse"], 0
    else:
        recipe = config.train_config()
        constraints = build_constraints(config) if name == "vdn" else []
        result = train_forecaster(
            model, splits, recipe, seed=seed, constraints=constraints, skip_from=skip_from
        )
        best = result.best_val_loss if result is not None else float("nan")
        items = training_windows(splits, recipe)[0].shape[0]
        per_epoch = math.ceil(items / min(recipe.batch_size, items))
        epochs = math.ceil(result.steps / per_epoch) if result is not None else 0
    fit_seconds = time.perf_counter() - start
    stride = config.data.test_stride
    x_test, y_test = test if test is not None else splits.windows("test", stride=stride)
    evaluate = config.evaluate
    scores = evaluate_forecaster(
        model, x_test, y_test, evaluate.num_samples, evaluate.batch_size, seed=seed, exact=evaluate.exact
    )
    row = {"horizon": splits.horizon, "model": name, "seed": seed}
    row.update({k: scores[k] for k in METRICS})
    row["best_val_loss"], row["epochs"] = best, epochs
    row["fit_seconds"], row["score_seconds"] = fit_seconds, scores["seconds"]
    row["test_windows"] = x_test.shape[0]
    lent = config.fit.skip_fit if skip_from is not None else "joint"
    row["skip"] = lent if name in ("vdn", "twin") else ""
    return row, model


def baseline_key(name, seed):
    """Key of a fitted DLinear in the per-horizon cache: the closed-form fit is seed-free."""
    return "linear" if name == "linear" else (name, seed)


def fitted_baseline(name, splits, seed, args, fitted, test):
    """``(row, model)`` of ``linear`` or ``dlinear``, fitted on first use and kept in ``fitted``
    (one closed-form fit per horizon, one SGD fit per seed); a reused row gets this seed."""
    key = baseline_key(name, seed)
    if key not in fitted:
        fitted[key] = run_one(name, splits, seed, args, test=test)
    row, model = fitted[key]
    return dict(row, seed=seed), model


def lend_skip(name, splits, seed, args, fitted, test):
    """The DLinear lent to ``vdn``/``twin`` under ``--skip-fit``: the closed-form fit (``ridge``)
    or the SGD DLinear of this seed (``sgd``); ``None`` under ``joint`` and for other models."""
    if args.skip_fit == "joint" or name not in ("vdn", "twin"):
        return None
    source = "linear" if args.skip_fit == "ridge" else "dlinear"
    return fitted_baseline(source, splits, seed, args, fitted, test)[1]


def summarise(runs, published=True):
    """Mean and standard deviation over seeds, one row per (horizon, model), plus the published
    rows."""
    frame = pd.DataFrame(runs)
    keys = list(METRICS) + ["fit_seconds"]
    grouped = frame.groupby(["horizon", "model"], sort=False)
    mean = grouped[keys].mean()
    std = grouped[keys].std(ddof=1).fillna(0.0).add_suffix("_std")
    out = pd.concat([mean, std], axis=1)
    out["seeds"] = grouped.size()
    out = out.reset_index()
    if published:
        rows = [
            {"horizon": h, "model": label, "mse": mse, "mae": mae, "seeds": 0}
            for label, table in PUBLISHED.items()
            for h, (mse, mae) in table.items()
            if h in set(out["horizon"])
        ]
        out = pd.concat([out, pd.DataFrame(rows)], ignore_index=True)
    names = list(dict.fromkeys(list(MODELS) + list(PUBLISHED) + list(out["model"])))
    order = {m: i for i, m in enumerate(names)}
    out = out.sort_values(["horizon", "model"], key=lambda c: c.map(order) if c.name == "model" else c)
    return out.reset_index(drop=True)


def format_table(summary):
    """One Markdown table: MSE, MAE, CRPS, NLL and 90% coverage, mean ± std over seeds."""
    head = ["H", "model", "MSE", "MAE", "CRPS", "NLL", "cov 90%", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [str(int(r["horizon"])), LABELS.get(r["model"], r["model"])]
        for key in COLUMNS:
            value = r.get(key)
            if value is None or pd.isna(value):
                cells.append("")
            elif r["seeds"] > 1:
                cells.append(f"{value:.3f} ± {r[key + '_std']:.3f}")
            else:
                cells.append(f"{value:.3f}")
        cells.append(str(int(r["seeds"])) if r["seeds"] else "published")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(runs, out_dir, stem="forecast_ett", note="", published=True):
    """Write the per-run CSV, the summary CSV and the Markdown table; return the summary and
    the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(runs).to_csv(out_dir / f"{stem}_runs.csv", index=False)
    summary = summarise(runs, published)
    summary.to_csv(out_dir / f"{stem}.csv", index=False)
    table = format_table(summary)
    (out_dir / f"{stem}.md").write_text(f"{note}\n\n{table}\n" if note else f"{table}\n")
    return summary, table


def apply_quick(args):
    """Shrink a run to a smoke test (< 3 minutes on 2 cores)."""
    args.horizons, args.seeds = [96], [0]
    args.epochs, args.patience = 2, 0
    args.train_stride, args.val_stride, args.test_stride = 48, 24, 12
    args.units, args.features, args.num_samples, args.val_samples = 16, 16, 16, 16
    return args


def run_task(horizon, seed, args, series, fitted=None):
    """Every model of ``args.models`` at one horizon and seed, in order; returns their rows.

    :param dict fitted: per-horizon cache of fitted DLinears (see :func:`fitted_baseline`),
        shared across the seeds of a serial run; a worker process starts with its own.
    """
    torch.set_num_threads(args.threads)
    splits = ett_hourly_splits(series, LOOKBACK, horizon)
    test = splits.windows("test", stride=args.test_stride)
    fitted = {} if fitted is None else fitted
    rows = []
    for name in args.models:
        if name in ("linear", "dlinear"):
            row, _ = fitted_baseline(name, splits, seed, args, fitted, test)
        else:
            skip = lend_skip(name, splits, seed, args, fitted, test)
            row, _ = run_one(name, splits, seed, args, test=test, skip_from=skip)
        rows.append(row)
        print(format_row(row, f"epochs={row['epochs']} fit={row['fit_seconds']:.0f}s"), flush=True)
    return rows


def format_row(row, extra=""):
    """One progress line: horizon, seed, model and the table's metrics, then ``extra``."""
    metrics = " ".join(f"{k}={row[k]:.4f}" for k in COLUMNS)
    return f"H={row['horizon']} seed={row['seed']} {row['model']:8s} {metrics} {extra}".rstrip()


def run_tasks(args, series, task=run_task):
    """Run every (horizon, seed) task, serially or in ``args.jobs`` worker processes (longest
    horizons first), and yield each task's rows as it finishes."""
    tasks = [(h, s) for h in args.horizons for s in args.seeds]
    if args.jobs == 1:
        caches = {}
        for horizon, seed in tasks:
            yield task(horizon, seed, args, series, caches.setdefault(horizon, {}))
        return
    tasks.sort(key=lambda t: -t[0])
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # the workers import this module by name
        sys.path.append(here)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(tasks)), mp_context=context) as pool:
        futures = [pool.submit(task, horizon, seed, args, series) for horizon, seed in tasks]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def main(args):
    """Run the benchmark and return the summary :class:`pandas.DataFrame`."""
    if args.quick:
        args = apply_quick(args)
    if args.jobs < 1:
        raise ValueError(f"Expected --jobs >= 1, but got {args.jobs}.")
    torch.set_num_threads(args.threads)
    series = load_ett(args.data)
    note = (
        f"ETTh1, L={LOOKBACK}; train stride {args.train_stride}, test stride {args.test_stride}"
        f"{' (every test window)' if args.test_stride == 1 else ''}; options: "
        + json.dumps({k: v for k, v in vars(args).items() if k not in ("data", "out_dir")})
        + "; every other key: the ett preset of vdn_pyro.config"
    )
    order = {
        (h, s, m): i
        for i, (h, s, m) in enumerate(
            (h, s, m) for h in args.horizons for s in args.seeds for m in args.models
        )
    }
    runs = []
    start = time.perf_counter()
    for rows in run_tasks(args, series):
        runs = sorted(runs + rows, key=lambda r: order[(r["horizon"], r["seed"], r["model"])])
        write_outputs(runs, args.out_dir, note=note)  # after every task: nothing lost on a stop
    summary, table = write_outputs(runs, args.out_dir, note=note)
    print(note)
    print(table)
    print(f"wall time {time.perf_counter() - start:.0f} s with {args.jobs} job(s)")
    return summary


def build_parser(description):
    """The command-line options shared with ``ar_study.py``."""
    parser = argparse.ArgumentParser(description=description)
    default_data = os.environ.get(
        "VDN_ETT_PATH", str(ROOT.parent / "shared" / "data" / "ETT-small" / "ETTh1.csv")
    )
    parser.add_argument("--data", default=default_data, help="path to ETTh1.csv (or set VDN_ETT_PATH)")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--horizons", type=int, nargs="+", default=[96, 192, 336, 720])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--quick", action="store_true", help="smoke run: H=96, 1 seed, tiny")
    # the training recipe (shared by every model): keys of the run configuration, default the
    # ett preset's (see CONFIG_KEYS)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--select", choices=SELECTIONS, help="validation criterion")
    parser.add_argument(
        "--skip-fit",
        choices=SKIP_FITS,
        help="vdn/twin skip path: closed-form DLinear (ridge), the SGD DLinear (sgd), or trained jointly",
    )
    parser.add_argument("--batch-size", type=int, help="windows per step (default 256)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr-decay", type=float)
    parser.add_argument("--train-stride", type=int)
    parser.add_argument("--chunk", type=int, help="windows per training item T")
    parser.add_argument("--val-stride", type=int)
    parser.add_argument("--test-stride", type=int)
    # forecaster
    parser.add_argument("--units", type=int)
    parser.add_argument("--features", type=int)
    parser.add_argument("--prior", choices=["ar", "normal"])
    parser.add_argument("--phi", type=float)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--train-draws", type=int)
    parser.add_argument("--init-scale", type=float)
    parser.add_argument("--likelihood-scale", choices=["learned", "heteroscedastic"])
    parser.add_argument("--mean", choices=["head", "skip"], help="forecast mean: skip + head, or skip alone")
    parser.add_argument("--activation", help="on the trunk features read by the neurons")
    # scoring
    parser.add_argument("--num-samples", type=int, help="predictive draws per test window")
    parser.add_argument("--val-samples", type=int, help="predictive draws per validation window (selection)")
    parser.add_argument(
        "--mc", action="store_true", help="score the Monte Carlo mixture, not the exact marginal"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any other key of the run configuration, e.g. --set fit.ridges=[0.1] (repeatable)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes, one (horizon, seed) task each (2 on 2 cores)"
    )
    return parser


def parse_args(argv=None):
    return fill_defaults(build_parser(__doc__.splitlines()[0]).parse_args(argv))


if __name__ == "__main__":
    main(parse_args())

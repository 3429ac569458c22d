"""One test window's joint sample paths: the roll-out VDN against its controls, as a picture.

Fits the models of the forecasting harness (``benchmarks/forecast_ett.py``, same options, same
recipe, same validation choice of the normalisation) at the first of ``--horizons`` and the first
of ``--seeds``, draws ``--plot-samples`` joint sample paths of one test window from each, and
writes :func:`vdn_pyro.plots.plot_sample_paths`: each model's step-wise 90% band and a few whole
paths, and below, the distribution of its horizon sums against the sum that happened. The window
is the middle test window unless ``--window`` says otherwise (not chosen by its scores).

    python benchmarks/plot_paths.py --horizons 96 --seeds 0 --models twin_mvt rollout

Values are in the harness's scaled units (each channel standardised on the training months).
"""

import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import forecast_ett as harness  # noqa: E402

from vdn_pyro.plots import plot_sample_paths  # noqa: E402

DEFAULT_MODELS = ("twin", "twin_mvt", "rollout")


def parse_args(argv=None):
    parser = harness.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, help="test window index (default the middle one)")
    parser.add_argument("--paths", type=int, default=4, help="whole sample paths drawn per model")
    parser.add_argument("--plot-samples", type=int, default=2000, help="sample paths per model")
    parser.add_argument("--context", type=int, default=168, help="history steps drawn")
    parser.add_argument("--plot", default=str(harness.ROOT / "docs" / "rollout_paths.png"))
    args = harness.fill_defaults(parser.parse_args(argv))
    if "--models" not in (argv if argv is not None else sys.argv[1:]):
        args.models = list(DEFAULT_MODELS)
    return args


def prepare(args):
    """The options and series, refusing bad options, bad data or a window that is not there,
    before any work: ``(args, series)``."""
    harness.check_args(args)
    if args.plot_samples < 2:
        raise ValueError(f"Expected --plot-samples >= 2, but got {args.plot_samples}.")
    series = harness.load_series(args)
    splits = harness.task_splits(series, args, args.horizons[0])
    count = splits.num_windows("test", args.test_stride) * len(splits.columns)  # test windows N
    if args.window is not None and not 0 <= args.window < count:
        raise ValueError(f"Expected --window in [0, {count}), but got {args.window}.")
    return args, series


def main(args, prepared=None):
    """Fit, draw and plot; returns ``(path, {label: (S, H) samples}, truth)``.

    :param prepared: :func:`prepare` of ``args`` when already done.
    """
    args, series = prepare(args) if prepared is None else prepared
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)
    horizon, seed = args.horizons[0], args.seeds[0]
    splits = harness.task_splits(series, args, horizon)
    x, y = splits.windows("test", stride=args.test_stride)  # (N, L), (N, H)
    index = x.shape[0] // 2 if args.window is None else args.window
    cache = {}  # the fitted models of this horizon and seed (the skip path is fitted once)
    norm, _ = harness.skip_norm(splits, seed, args, cache)
    samples = {}
    for name in args.models:
        fitted = harness.fitted_model(name, splits, seed, args, norm, cache)
        torch.manual_seed(seed)
        pred = fitted.view.predict(x[index : index + 1], args.plot_samples)
        samples[harness.MODELS[name].label] = pred.samples[:, 0].detach().cpu().numpy()  # (S, H)
        print(f"{name}: fitted in {fitted.fit_seconds:.0f} s", flush=True)
    title = (
        f"{series.name}, test window {index} of {x.shape[0]}, H = {horizon}, seed {seed} "
        f"({args.plot_samples} sample paths per model)"
    )
    path = plot_sample_paths(
        args.plot,
        x[index].cpu().numpy(),
        y[index].cpu().numpy(),
        samples,
        num_paths=args.paths,
        context=args.context,
        title=title,
        ylabel="value (scaled)",
    )
    print(f"written to {path}")
    return path, samples, y[index].cpu().numpy()


if __name__ == "__main__":
    harness.run_script(main, prepare, parse_args())

"""A small probe: does rolling the units' latents over the horizon help the forecast's paths?

ETTh1, L = 336, H = 96, the ETT protocol (:func:`vdn_pyro.data.ett_hourly_splits`), one seed,
reduced training (``--epochs``, ``--train-stride``). Every model gets the same frozen closed-form
DLinear skip path (:func:`vdn_pyro.forecasting.fit_least_squares`, ridge chosen on validation MSE)
and is trained by :func:`vdn_pyro.forecasting.train_forecaster` (selection on the validation CRPS
of every ``--select-stride``-th validation window). Scores are on the VALIDATION split only (every
``--eval-stride``-th window; the test split is never read), from ``--samples`` joint sample paths
per window: marginal CRPS and mixture NLL (:func:`vdn_pyro.forecasting.score_prediction`) and the
path scores of :func:`vdn_pyro.metrics.path_metrics` (energy score, CRPS of the horizon sum, 90%
coverage of the horizon sum).

Models: ``forecaster`` (today's recipe: the ``ett`` preset's :class:`~vdn_pyro.models.Forecaster`,
mean from the skip path, neurons set the scale), ``twin`` (its deterministic twin), and
:class:`~vdn_pyro.models.RolloutForecaster` variants (``rollout-*``, see :data:`VARIANTS`).

    nice python benchmarks/rollout_probe.py --models forecaster rollout-diag
"""

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vdn_pyro.config import load_config  # noqa: E402
from vdn_pyro.data import ett_hourly_splits, load_ett  # noqa: E402
from vdn_pyro.forecasting import TrainConfig, fit_least_squares, score_prediction, train_forecaster  # noqa: E402
from vdn_pyro.metrics import path_metrics  # noqa: E402
from vdn_pyro.models import DLinear, Forecaster, RolloutForecaster  # noqa: E402

LOOKBACK = 336
#: RolloutForecaster variants by name: options on top of :data:`ROLLOUT_BASE` (which starts phi at
#: the Forecaster preset's 0.5; ``rollout-diag-phi9`` at the RolloutConfig default 0.9).
ROLLOUT_BASE = dict(units=32, features=64, patch=24, beta=1e-3, phi=0.5, train_draws=16)
VARIANTS = {
    "rollout-diag": dict(posterior="diagonal"),
    "rollout-diag-step": dict(posterior="diagonal", mixture="step"),
    "rollout-diag-normal": dict(posterior="diagonal", prior="normal"),
    "rollout-diag-phi9": dict(posterior="diagonal", phi=0.9),
    "rollout-diag-skipmean": dict(posterior="diagonal", mean="skip"),
    "rollout-diag-p12": dict(posterior="diagonal", patch=12),
    "rollout-path-k4": dict(posterior="path", train_draws=4),
    "rollout-twin": dict(posterior="diagonal", deterministic=True),
}
COLUMNS = ("crps", "nll", "mse", "coverage_90", "energy", "crps_sum", "coverage_90_sum")


def build(name, horizon):
    if name in ("forecaster", "twin"):
        config = load_config(preset="ett")
        return Forecaster(config.forecaster_config(horizon=horizon, deterministic=name == "twin"))
    if name not in VARIANTS:
        raise ValueError(f"Expected a model in {['forecaster', 'twin', *VARIANTS]}, but got {name!r}.")
    return RolloutForecaster(lookback=LOOKBACK, horizon=horizon, **{**ROLLOUT_BASE, **VARIANTS[name]})


@torch.no_grad()
def score(model, x, y, num_samples, batch_size=256, seed=0):
    """Marginal and path scores on windows ``(N, L)``, ``(N, H)``, averaged over windows."""
    model.eval()
    totals, count = {}, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            pred = model.predict(xb, num_samples)
            if pred.num_components == 1:  # a twin: S draws of its Gaussian (independent steps)
                pred.samples = pred.loc + pred.scale * torch.randn((num_samples,) + yb.shape)
            scores = {**score_prediction(pred, yb), **path_metrics(pred.samples, yb)}
            for key in COLUMNS:
                totals[key] = totals.get(key, 0.0) + scores[key] * yb.shape[0]
            count += yb.shape[0]
    return {key: value / count for key, value in totals.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="ETTh1.csv (default: the shared copy)")
    parser.add_argument("--horizon", type=int, default=96)
    parser.add_argument("--models", nargs="+", default=["forecaster", "rollout-diag"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-stride", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--select-stride", type=int, default=24)
    parser.add_argument("--eval-stride", type=int, default=4)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    series = load_ett(args.data)
    splits = ett_hourly_splits(series, LOOKBACK, args.horizon)
    source = DLinear(LOOKBACK, args.horizon)
    fit_least_squares(source, splits)
    x_val, y_val = splits.windows("val", stride=args.eval_stride)
    rows = {"dlinear (closed form)": score(_Gaussian(source), x_val, y_val, args.samples)}
    print(f"validation windows scored: {x_val.shape[0]}", flush=True)
    for name in args.models:
        pyro.set_rng_seed(args.seed)
        model = build(name, args.horizon)
        chunk = 4 if name in ("forecaster", "twin") else 1  # the ett preset's chunks of 4 windows
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=max(1, args.batch_size // chunk),
            lr=args.lr,
            lr_decay=0.6,
            patience=2,
            train_stride=args.train_stride,
            chunk=chunk,
            val_stride=args.select_stride,
            num_samples=32,
            skip_fit="ridge",
        )
        start = time.perf_counter()
        train_forecaster(model, splits, config, seed=args.seed, skip_from=source)
        seconds = time.perf_counter() - start
        rows[name] = score(model, x_val, y_val, args.samples)
        extra = ""
        if isinstance(model, RolloutForecaster):
            half = model.half_life()
            extra = (
                f" half-lives (h): median {half.median():.1f}, quartiles {half.quantile(0.25):.1f}-"
                f"{half.quantile(0.75):.1f}, max {half.max():.1f}; phi "
                f"{[round(v, 3) for v in model.prior.phi[:, 0].tolist()]}"
            )
        print(
            f"{name}: fit {seconds:.0f}s " + " ".join(f"{k}={v:.4f}" for k, v in rows[name].items()) + extra
        )
        sys.stdout.flush()
    print("\n| model | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in COLUMNS) + " |")


class _Gaussian:
    """A fitted DLinear's Gaussian predictive (its calibrated scale) as a predict()-able model."""

    def __init__(self, dlinear):
        self.dlinear = dlinear

    def eval(self):
        return self

    def predict(self, x, num_samples):
        from vdn_pyro.models import ForecastPrediction

        loc = self.dlinear.point(x)[None]  # (1, B, H)
        scale = self.dlinear.scale.expand_as(loc)  # (1, B, H)
        return ForecastPrediction(loc.expand((num_samples,) + loc.shape[1:]), loc, scale)


if __name__ == "__main__":
    main()

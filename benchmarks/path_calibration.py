"""Path scores against an exact answer: a stationary series whose predictive is known in closed form.

The series is a slow AR(1) level seen through white noise,

    s_t = phi s_{t-1} + q eta_t,    y_t = s_t + r eps_t,    eta_t, eps_t ~ N(0, 1),

a linear Gaussian state-space model, so the exact joint predictive of a window's next H steps
given its L-step look-back is Gaussian and comes from a Kalman filter: the oracle. Its forecast
errors are strongly correlated across the horizon (the level persists), the situation where a
forecaster whose steps are independent gets the horizon's sum wrong.

Every model is trained and selected on the training and validation windows of the 7:1:2
chronological protocol (:func:`vdn_pyro.data.ratio_splits`, scaled on the training rows) and
scored on every test window from ``--samples`` joint sample paths, with the harness's scores
(:func:`vdn_pyro.forecasting.evaluate_forecaster`): the oracle (exact mean and covariance), the
deterministic twin of the roll-out (independent steps), the
:class:`~vdn_pyro.models.RolloutForecaster` trained as in the harness (K prior roll-outs mixed in
the path's likelihood, ``rollout``), the same network trained by the plain ELBO with an
amortized posterior of the horizon's latents (``rollout_amortized``) and on the exact likelihood of
the observed path, its rolled latents integrated out by a Kalman filter (``rollout_exact``), on
a mixture over draws of the last look-back latent of such exact paths (``rollout_exmix``), and
``rollout`` with its spread recalibrated on the validation windows (``rollout_cal``,
:class:`~vdn_pyro.models.SpreadRecalibration`: on a series where the roll-out is calibrated its two
factors should stay near 1; the same training seed's ``rollout`` is reused when it ran). As in
``forecast_ett.py``
the roll-out models select their epoch on the validation energy score (``--select``) and the
twin on the CRPS; ``--train-seeds`` trains each model under several seeds (initialisation,
minibatch order) on the same series. On stationary data a calibrated forecaster covers 90% of the
test windows' sums with its 90% interval, and the oracle's CRPS-sum and energy are the floor.
The test windows overlap and the level persists for hundreds of steps, so even the oracle's
coverage moves by a few points from one series to the next.

    python benchmarks/path_calibration.py            # 3 series, a few minutes on one core
    python benchmarks/path_calibration.py --seeds 2 --models rollout --select crps --train-seeds 0 1 2 3 4 5
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from forecast_ett import run_script  # noqa: E402

from vdn_pyro.data import ratio_splits  # noqa: E402
from vdn_pyro.files import write_text  # noqa: E402
from vdn_pyro.forecasting import TrainConfig, evaluate_forecaster, train_forecaster  # noqa: E402
from vdn_pyro.models import ForecastPrediction, RolloutForecaster, SpreadRecalibration  # noqa: E402

MODELS = ("oracle", "twin", "rollout", "rollout_amortized", "rollout_exact", "rollout_exmix", "rollout_cal")
SCORES = ("mse", "crps", "nll", "coverage_90", "energy", "crps_sum", "coverage_90_sum")


def simulate(num_rows, phi, level_scale, noise_scale, seed):
    """The series ``(N, 1)`` (float64), its level started from the stationary law."""
    rng = np.random.default_rng(seed)
    level = np.empty(num_rows)
    level[0] = level_scale / math.sqrt(1 - phi**2) * rng.standard_normal()
    shocks = level_scale * rng.standard_normal(num_rows)
    for t in range(1, num_rows):
        level[t] = phi * level[t - 1] + shocks[t]
    return (level + noise_scale * rng.standard_normal(num_rows))[:, None]


class Oracle:
    """The exact Gaussian predictive of the state-space model, in the splits' scaled units.

    :param splits: the :class:`~vdn_pyro.data.ForecastSplits` (its scaler maps units).
    """

    def __init__(self, splits, phi, level_scale, noise_scale):
        self.loc, self.unit = float(splits.scaler.loc[0]), float(splits.scaler.scale[0])
        self.phi, self.q2, self.r2 = phi, level_scale**2, noise_scale**2
        L, H = splits.lookback, splits.horizon
        # the filter's gains do not depend on the data: one pass gives them for every window
        var, gains = self.q2 / (1 - phi**2), []
        for _ in range(L):
            gain = var / (var + self.r2)
            gains.append(gain)
            var = phi**2 * (1 - gain) * var + self.q2  # predicted variance of the next level
        self.gains, self.last_var = torch.tensor(gains, dtype=torch.float64), (var - self.q2) / phi**2
        # joint covariance of the next H observations given the filtered level (variance P_L)
        steps = torch.arange(1, H + 1, dtype=torch.float64)
        level_var = phi ** (2 * steps) * self.last_var + self.q2 * (1 - phi ** (2 * steps)) / (1 - phi**2)
        lag = (steps[None, :] - steps[:, None]).clamp_min(0)  # (H, H): h' - h for h <= h'
        upper = phi**lag * level_var[:, None]  # Cov(s_h, s_h') = phi^(h'-h) Var(s_h), h <= h'
        cov = torch.where(lag > 0, upper, torch.diag(level_var))
        cov = torch.triu(cov) + torch.triu(cov, 1).T + self.r2 * torch.eye(H, dtype=torch.float64)
        self.cov = cov / self.unit**2  # (H, H), scaled units
        self.tril = torch.linalg.cholesky(self.cov)
        self.powers = phi**steps  # (H,)

    def filtered_level(self, x):
        """The filtered level at the end of each look-back ``(B, L)`` (scaled): ``(B,)``, raw units."""
        raw = x.double() * self.unit + self.loc  # (B, L)
        mean = torch.zeros(raw.shape[0], dtype=torch.float64)
        for t, gain in enumerate(self.gains):
            mean = mean + gain * (raw[:, t] - mean)  # update with y_t
            if t + 1 < raw.shape[1]:
                mean = self.phi * mean  # predict the next level
        return mean

    def predict(self, x, num_samples=100):
        mean = (self.filtered_level(x)[:, None] * self.powers - self.loc) / self.unit  # (B, H)
        noise = torch.randn((num_samples,) + mean.shape, dtype=torch.float64)  # (S, B, H)
        samples = mean + noise @ self.tril.T  # (S, B, H)
        scale = self.cov.diagonal().sqrt().expand_as(mean)  # (B, H)
        dtype = x.dtype
        return ForecastPrediction(
            samples.to(dtype), mean[None].to(dtype), scale[None].to(dtype), mean.to(dtype)
        )


def build(name, args):
    options = dict(
        lookback=args.lookback,
        horizon=args.horizon,
        patch=args.patch,
        units=args.units,
        features=32,
        kernel_size=25,
        posterior="diagonal",
        mean="centred",
        train_draws=args.train_draws,
    )
    if name == "twin":
        options["deterministic"] = True
    if name == "rollout_amortized":
        options["horizon_posterior"] = "amortized"
    if name == "rollout_exact":
        options["horizon_posterior"] = "exact"
    if name == "rollout_exmix":
        options["horizon_posterior"] = "exact_mixture"
    return RolloutForecaster(**options)


def train_recipe(args, select, **changes):
    """The training recipe of every trained model here: ``--epochs`` epochs of 64 windows a step,
    the closed-form skip path, selection on the validation score ``select`` (32 draws per window,
    patience 2); ``changes`` replace any other :class:`~vdn_pyro.forecasting.TrainConfig` key."""
    options = dict(epochs=args.epochs, batch_size=64, chunk=1, skip_fit="ridge", num_samples=32, patience=2)
    return TrainConfig(**{**options, "select": select, **changes})


def run(args, seed):
    """Every model of ``--models`` on the series of ``seed``: one row per model and training seed."""
    values = simulate(args.rows, args.phi, args.level_scale, args.noise_scale, seed)
    splits = ratio_splits(values, args.lookback, args.horizon)
    x, y = splits.windows("test")
    rows, trained = [], {}
    for name in args.models:
        for train_seed in [seed] if name == "oracle" else args.train_seeds or [seed]:
            pyro.set_rng_seed(train_seed)  # torch, numpy and random: each run is reproducible alone
            start = time.perf_counter()
            select, info = "", {}
            if name == "oracle":
                model, select = Oracle(splits, args.phi, args.level_scale, args.noise_scale), "exact"
            elif name == "rollout_cal" and ("rollout", train_seed) in trained:
                select = args.select
                model = SpreadRecalibration(trained[("rollout", train_seed)])
            else:
                model = build("rollout" if name == "rollout_cal" else name, args)
                select = "crps" if name == "twin" else args.select  # as in forecast_ett.py
                recipe = train_recipe(args, select)
                train_forecaster(model, splits, recipe, seed=train_seed)
                trained[(name, train_seed)] = model
                if name == "rollout_cal":
                    model = SpreadRecalibration(model)
            if name == "rollout_cal":
                fit = model.fit(*splits.windows("val"), num_samples=args.samples, seed=train_seed)
                info = {"path_factor": fit["path_factor"], "noise_factor": fit["noise_factor"]}
            scores = evaluate_forecaster(model, x, y, args.samples, seed=seed, paths=True)
            row = {"model": name, "seed": seed, "train_seed": train_seed, "select": select}
            row.update({k: float(scores[k]) for k in SCORES})
            row.update(info)
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(
                " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                flush=True,
            )
    return rows


def table(runs):
    frame = pd.DataFrame(runs)
    lines = ["| model | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
    for name in dict.fromkeys(frame.model):
        part = frame[frame.model == name]
        cells = [
            f"{part[k].mean():.4f} ± {part[k].std(ddof=1) if len(part) > 1 else 0.0:.4f}" for k in SCORES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prepare(args):
    """Refuse bad options before any work."""
    if args.horizon % args.patch or args.lookback < args.patch:
        raise ValueError(
            f"Expected --horizon a multiple of --patch and --lookback >= --patch, but got horizon "
            f"{args.horizon}, lookback {args.lookback}, patch {args.patch}."
        )
    if not 0 < args.phi < 1 or args.level_scale <= 0 or args.noise_scale <= 0:
        raise ValueError(
            f"Expected 0 < --phi < 1 and positive scales, but got phi {args.phi}, level scale "
            f"{args.level_scale}, noise scale {args.noise_scale}."
        )
    if args.train_draws < 1:
        raise ValueError(f"Expected --train-draws >= 1, but got {args.train_draws}.")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise ValueError(f"Expected --models among {list(MODELS)}, but got {unknown}.")
    return None


def main(args, prepared=None):
    torch.set_num_threads(args.threads)
    runs = [row for seed in args.seeds for row in run(args, seed)]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = json.dumps({k: v for k, v in vars(args).items() if k != "out_dir"})
    head = f"Path scores on a stationary state-space series, test windows (options: {options})"
    text = f"{head}\n\n{table(runs)}\n"
    write_text(out / "path_calibration.md", text)
    write_text(out / "path_calibration_runs.csv", pd.DataFrame(runs).to_csv(index=False))
    print(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--phi", type=float, default=0.995, help="persistence of the level per step")
    parser.add_argument("--level-scale", type=float, default=0.1, help="the level's innovation scale q")
    parser.add_argument("--noise-scale", type=float, default=0.3, help="the observation noise scale r")
    parser.add_argument("--lookback", type=int, default=96)
    parser.add_argument("--horizon", type=int, default=48)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument(
        "--train-draws", type=int, default=16, help="prior roll-outs K mixed in the training likelihood"
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument(
        "--select",
        default="energy",
        choices=("crps", "energy", "crps_sum", "nll", "mse"),
        help="the validation score that selects the roll-out models' epoch (the twin's: the CRPS)",
    )
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        help="training seeds (initialisation, minibatch order, draws) per series; default its seed",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main, prepare, parse_args())

"""Where the roll-out's marginal width comes from, on the stationary series of
``path_calibration.py`` (its defaults, one series): per step, the variance of the draws' means (the
rolled paths' spread) and the mean squared noise scale, their sum, the oracle's marginal variance
and the empirical MSE of the roll-out's mean, on training (every 7th), validation and test windows.

    python benchmarks/results/paths/trcal_probe/variance_probe.py --train-draws 16
    python benchmarks/results/paths/trcal_probe/variance_probe.py --epochs 20 --lr-decay 1 --patience 4
"""

import argparse
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/

import path_calibration as pc  # noqa: E402

from vdn_pyro.data import ratio_splits  # noqa: E402
from vdn_pyro.forecasting import train_forecaster  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-draws", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr-decay", type=float, default=0.5)
    parser.add_argument("--patience", type=int, default=2)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    args = pc.parse_args(["--train-draws", str(opts.train_draws)])
    values = pc.simulate(args.rows, args.phi, args.level_scale, args.noise_scale, opts.seed)
    splits = ratio_splits(values, args.lookback, args.horizon)
    oracle = pc.Oracle(splits, args.phi, args.level_scale, args.noise_scale).cov.diagonal().float()  # (H,)
    pyro.set_rng_seed(opts.seed)
    model = pc.build("rollout", args)
    changes = dict(epochs=opts.epochs, lr_decay=opts.lr_decay, patience=opts.patience)
    recipe = pc.train_recipe(args, "energy", **changes)
    result = train_forecaster(model, splits, recipe, seed=opts.seed)
    print(f"K={opts.train_draws} epochs={opts.epochs} lr_decay={opts.lr_decay}: step {result.best_step} kept")
    steps = [0, 11, 23, args.horizon - 1]
    for split in ("train", "val", "test"):
        x, y = splits.windows(split, stride=7 if split == "train" else 1)
        with torch.no_grad():
            pred = model.predict(x, num_samples=200)
        path = pred.loc.var(0).mean(0)  # (H,): spread of the draws' means
        noise = (pred.scale**2).mean((0, 1))  # (H,)
        total = path + noise
        mse = ((y - pred.point) ** 2).mean(0)  # (H,)
        print(f"{split}, steps {[s + 1 for s in steps]}")
        for name, v in (("path", path), ("noise", noise), ("total", total), ("oracle", oracle), ("MSE", mse)):
            print(f"  {name:6s}", [round(v[s].item(), 3) for s in steps])
        print(f"  mean over H: total {total.mean():.3f}, oracle {oracle.mean():.3f}, MSE {mse.mean():.3f}")


if __name__ == "__main__":
    main()

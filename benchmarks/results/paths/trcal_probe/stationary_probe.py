"""The roll-out recalibrated on training or on validation windows, on the stationary series of
``path_calibration.py`` (its defaults): test scores against the oracle, one series per seed.

    python benchmarks/results/paths/trcal_probe/stationary_probe.py 0   # seed 0; also 1, 2
"""

import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/

import path_calibration as pc  # noqa: E402

from vdn_pyro.data import ratio_splits  # noqa: E402
from vdn_pyro.forecasting import evaluate_forecaster, train_forecaster  # noqa: E402
from vdn_pyro.models.recalibration import SpreadRecalibration  # noqa: E402


def main(seed):
    torch.set_num_threads(1)
    args = pc.parse_args([])
    values = pc.simulate(args.rows, args.phi, args.level_scale, args.noise_scale, seed)
    splits = ratio_splits(values, args.lookback, args.horizon)
    x, y = splits.windows("test")
    pyro.set_rng_seed(seed)
    model = pc.build("rollout", args)
    train_forecaster(model, splits, pc.train_recipe(args, "energy"), seed=seed)
    out = {"oracle": pc.Oracle(splits, args.phi, args.level_scale, args.noise_scale), "plain": model}
    for split in ("val", "train"):
        wrapper = SpreadRecalibration(model)
        fit = wrapper.fit(*splits.windows(split), num_samples=args.samples, seed=seed)
        print(split, "factors", round(fit["path_factor"], 3), round(fit["noise_factor"], 3), flush=True)
        out[split] = wrapper
    for name, forecaster in out.items():
        scores = evaluate_forecaster(forecaster, x, y, args.samples, seed=seed, paths=True)
        print(seed, name, *(f"{k}={float(scores[k]):.4f}" for k in pc.SCORES), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))

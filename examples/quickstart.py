"""Quick start: a layer of distributional neurons on scikit-learn's bundled diabetes data.

Defines a network, fits it by SVI, prints a per-unit table (KL, loc^2, scale) on held-out data and
held-out metrics beside its deterministic twin. Runs in well under a minute on 2 CPU cores::

    python examples/quickstart.py
"""

import argparse

import pandas as pd
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

from vdn_pyro import VDN, LocalELBO, fit
from vdn_pyro.metrics import crps_samples, gaussian_nll, interval_coverage


def load_data(seed):
    """Standardised diabetes regression data: x (N, 10), y (N, 1), split 80/20."""
    data = load_diabetes()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=seed
    )
    x_mean, x_std = x_train.mean(0), x_train.std(0)
    y_mean, y_std = y_train.mean(), y_train.std()

    def prep(x, y):
        x = torch.as_tensor((x - x_mean) / x_std, dtype=torch.float32)  # (N, 10)
        y = torch.as_tensor((y - y_mean) / y_std, dtype=torch.float32)[:, None]  # (N, 1)
        return x, y

    return prep(x_train, y_train), prep(x_test, y_test)


def unit_table(network, x, y):
    """Per-unit statistics on (x, y): unscaled KL (nats), mean loc^2 and mean scale."""
    _, stats = LocalELBO(num_particles=8).loss_and_stats(network.model, network.guide, x, y)
    rows = []
    for site, s in stats.items():
        for unit in range(s.kl.shape[0]):
            rows.append(
                {
                    "site": site,
                    "unit": unit,
                    "kl": float(s.kl[unit]),
                    "loc_sq": float(s.loc_sq[unit]),
                    "scale": float(s.scale[unit]),
                }
            )
    return pd.DataFrame(rows)


def held_out_metrics(network, x, y, num_samples):
    """MSE, MAE, CRPS, Gaussian NLL and 90% coverage of the posterior predictive."""
    pred = network.predict(x, num_samples=num_samples)
    loc, scale = pred.samples.mean(0), pred.samples.std(0)  # (N, 1) each
    return {
        "mse": float(((pred.mean - y) ** 2).mean()),
        "mae": float((pred.mean - y).abs().mean()),
        "crps": float(crps_samples(pred.samples, y)),
        "nll": float(gaussian_nll(loc, scale, y)),
        "coverage_90": float(interval_coverage(pred.samples, y, 0.9)),
    }


def main(args):
    torch.set_num_threads(args.threads)  # tiny networks: extra threads only add contention
    torch.manual_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    results = {}
    for deterministic in (False, True):
        network = VDN(
            x_train.shape[1],
            1,
            units=(args.units,),
            hidden=(args.hidden,),
            beta=args.beta,
            scale_mode="input",
            deterministic=deterministic,
        )
        fit(
            network,
            x_train,
            y_train,
            steps=args.steps,
            batch_size=64,
            lr=args.lr,
            seed=args.seed,
            progress=False,
        )
        name = "deterministic twin" if deterministic else "VDN"
        results[name] = held_out_metrics(network, x_test, y_test, args.num_samples)
        if not deterministic:
            table = unit_table(network, x_test, y_test)
            with pd.option_context("display.float_format", "{:.4f}".format):
                print(f"Per-unit statistics on {len(x_test)} held-out rows:")
                print(table.to_string(index=False))
                print(f"total KL {table.kl.sum():.3f} nats per observation\n")
    print("Held-out metrics (standardised target):")
    with pd.option_context("display.float_format", "{:.4f}".format):
        print(pd.DataFrame(results).T.to_string())
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

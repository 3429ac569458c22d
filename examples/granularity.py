"""Granularity study: at one total KL budget, where should the information budget be controlled?

On scikit-learn's bundled diabetes regression data (442 patients, 10 features, split 80/20 anew
for every seed), four networks of the same size share one total KL budget (nats per observation)
and are compared on the validation split:

- ``unit``: two layers of H distributional neurons, each unit with its own beta steered by a
  per-unit :class:`~vdn_pyro.inference.KLBand` (band around ``budget / 2H`` per unit);
- ``layer``: the same network, with one beta per layer steered by ``KLBand(granularity="layer")``
  (each layer's mean unit KL held in the same band: the same budget, coarser control);
- ``global``: one global latent vector of H dims (a single stochastic layer whose one beta holds
  the whole budget, band around ``budget / H`` per dim) feeding a deterministic layer of H, then
  the head, as in a classic VAE-style latent bottleneck;
- ``deterministic``: the deterministic twin of ``unit``/``layer`` (z = loc, no KL, no budget).

The thermostats start from ``--init-beta`` (a small beta: starting high collapses the units of
this weak-signal data set into a plateau they leave only after many steps). Every network is
trained on 80% of the training split and keeps the state with the best predictive NLL on the other
20% (checked every ``--select-every`` steps from ``--select-after`` on): the deterministic twin
overfits these 283 rows within a few hundred steps, so without this selection it would be judged
on an overfitted state.

For each, over ``--seeds`` seeds: validation NLL (of the posterior predictive mixture,
``-log mean_s p(y | z_s)``), MSE of the predictive mean, fraction of living units
(:func:`~vdn_pyro.inference.unit_report`), and the measured total KL, to check the budgets match.
Writes, under ``--out`` (default ``runs/granularity``): ``granularity.csv`` (one row per
config and seed, with the selected step), ``granularity_summary.csv`` (mean and standard
deviation over seeds) and ``granularity.png``.

Full run (a few minutes on 2 CPU cores)::

    python examples/granularity.py

Smoke test (seconds)::

    python examples/granularity.py --tiny --out /tmp/granularity
"""

import argparse
import copy
import math
import time
from pathlib import Path

import pandas as pd
import pyro
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import nn

from vdn_pyro import VDN, fit
from vdn_pyro.guides.trunks import make_activation
from vdn_pyro.inference.constraints import KLBand
from vdn_pyro.inference.diagnostics import layer_summary, unit_report

CONFIGS = ("unit", "layer", "global", "deterministic")


def load_data(seed):
    """Standardised diabetes data: x ``(N, 10)``, y ``(N, 1)``, split 80/20 with ``seed``."""
    data = load_diabetes()
    x_train, x_val, y_train, y_val = train_test_split(
        data.data, data.target, test_size=0.2, random_state=seed
    )
    x_loc, x_scale = x_train.mean(0), x_train.std(0)
    y_loc, y_scale = y_train.mean(), y_train.std()

    def prep(x, y):
        x = torch.as_tensor((x - x_loc) / x_scale, dtype=torch.float32)  # (N, 10)
        y = torch.as_tensor((y - y_loc) / y_scale, dtype=torch.float32)[:, None]  # (N, 1)
        return x, y

    return prep(x_train, y_train), prep(x_val, y_val)


def build(config, args, in_features):
    """The network and its constraints for one configuration."""
    h = args.units
    per_unit = args.budget / (2 * h)  # the budget spread over the 2H units of unit/layer
    width = args.band_width  # band = [c / width, c * width] around the per-unit target c
    common = {"hidden": (args.hidden,), "beta": args.init_beta}
    if config == "deterministic":
        return VDN(in_features, 1, units=(h, h), deterministic=True, **common), []
    if config in ("unit", "layer"):
        network = VDN(in_features, 1, units=(h, h), **common)
        band = KLBand(per_unit / width, per_unit * width, granularity=config)
        return network, [band]
    # global: one stochastic layer of H dims with the whole budget, then a deterministic layer
    network = VDN(in_features, 1, units=(h,), **common)
    act = make_activation(network.config.activation)
    network.head = nn.Sequential(nn.Linear(h, h), act, nn.Linear(h, network.likelihood.head_features))
    target = args.budget / h
    return network, [KLBand(target / width, target * width, granularity="layer")]


@torch.no_grad()
def predictive_scores(network, x, y, num_samples):
    """Validation NLL of the predictive mixture over ``num_samples`` latent draws, and the MSE of
    its mean.

    :param x: ``(N, D)``. :param y: ``(N, 1)``.
    :returns: ``(nll, mse)`` per observation.
    """
    if network.deterministic:
        z = network.encode(x, sample=False)[None]  # (1, N, H)
    else:
        last = network.layers[-1].site
        draws = pyro.infer.Predictive(
            network.guide, num_samples=num_samples, parallel=True, return_sites=[last]
        )(x)
        z = network.layers[-1].pool(draws[last])  # (S, N, H)
    fn = network.output_dist(x, z)  # batch (S, N, 1), event (1,)
    log_p = fn.log_prob(y[:, None])  # (S, N, 1)
    nll = -(torch.logsumexp(log_p, 0) - math.log(log_p.shape[0])).mean()
    mean = fn.mean.mean(0).squeeze(-2)  # (N, 1)
    return float(nll), float(((mean - y) ** 2).mean())


class SelectBest:
    """A fit callback that keeps the network state with the best predictive NLL on a selection
    split, checked every ``every`` steps from step ``start`` on, and restores it at the end."""

    def __init__(self, x, y, every, start, num_samples):
        self.x, self.y, self.every, self.start, self.num_samples = x, y, every, start, num_samples
        self.best, self.step, self.state = math.inf, -1, None

    def on_step_end(self, state):
        if state.step < self.start or state.step % self.every:
            return
        with torch.random.fork_rng():  # selection must not change the training trajectory
            nll, _ = predictive_scores(state.network, self.x, self.y, self.num_samples)
        if nll < self.best:
            self.best, self.step = nll, state.step
            self.state = copy.deepcopy(state.network.state_dict())

    def on_fit_end(self, state):
        if self.state is not None:
            state.network.load_state_dict(self.state)


def run_one(config, seed, args):
    (x_train, y_train), (x_val, y_val) = load_data(seed)
    x_fit, x_sel, y_fit, y_sel = train_test_split(x_train, y_train, test_size=0.2, random_state=seed)
    pyro.set_rng_seed(seed)
    network, constraints = build(config, args, x_train.shape[1])
    select = SelectBest(x_sel, y_sel, args.select_every, args.select_after, args.num_samples)
    start = time.perf_counter()
    fit(
        network,
        x_fit,
        y_fit,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        constraints=constraints,
        callbacks=[select],
        progress=False,
    )
    seconds = time.perf_counter() - start
    nll, mse = predictive_scores(network, x_val, y_val, args.num_samples)
    row = {"config": config, "seed": seed, "val_nll": nll, "val_mse": mse, "selected_step": select.step}
    if network.deterministic:
        row.update(fraction_living=math.nan, total_kl=math.nan, units=0)
    else:
        report = unit_report(network, x_val, constraints=constraints, max_points=args.max_points)
        summary = layer_summary(report)
        row.update(
            fraction_living=float((report.status == "living").mean()),
            total_kl=float(summary.total_kl.sum()),
            units=len(report),
        )
    row["seconds"] = seconds
    return row


def summarise(table):
    """Mean and standard deviation over seeds, per configuration (in :data:`CONFIGS` order)."""
    metrics = ["val_nll", "val_mse", "fraction_living", "total_kl"]
    grouped = table.groupby("config")[metrics]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_sd"))
    summary["seeds"] = table.groupby("config").seed.count()
    order = [c for c in CONFIGS if c in summary.index]
    columns = [f"{m}_{s}" for m in metrics for s in ("mean", "sd")] + ["seeds"]
    return summary.loc[order, columns].reset_index()


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    labels = summary.config.tolist()
    panels = [
        ("val_nll", "validation NLL"),
        ("val_mse", "validation MSE"),
        ("fraction_living", "fraction living"),
    ]
    for ax, (metric, title) in zip(axes, panels):
        ax.bar(
            labels,
            summary[f"{metric}_mean"],
            yerr=summary[f"{metric}_sd"].fillna(0),
            capsize=4,
            color=["tab:blue", "tab:orange", "tab:green", "tab:gray"][: len(labels)],
        )
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Granularity of the KL budget on diabetes (mean +- sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    if args.tiny:
        args.steps, args.units, args.hidden, args.seeds = 20, 4, 8, 2
        args.num_samples, args.max_points, args.select_every, args.select_after = 8, 64, 5, 5
    if args.seeds < 1:
        raise ValueError(f"Expected --seeds >= 1, but got {args.seeds}.")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(args.seeds):
        for config in CONFIGS:
            row = run_one(config, seed, args)
            rows.append(row)
            print(
                f"seed={seed} {config:<13} NLL={row['val_nll']:.3f} MSE={row['val_mse']:.3f} "
                f"living={row['fraction_living']:.2f} KL={row['total_kl']:.3f} ({row['seconds']:.1f}s)",
                flush=True,
            )
    table = pd.DataFrame(rows)
    summary = summarise(table)
    table.to_csv(out / "granularity.csv", index=False)
    summary.to_csv(out / "granularity_summary.csv", index=False)
    plot(summary, out / "granularity.png")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 160):
        print(
            f"\nGranularity study on diabetes: total KL budget {args.budget} nats/observation, "
            f"{args.seeds} seeds (mean and sd):"
        )
        print(summary.to_string(index=False))
    print(f"wrote {out / 'granularity.csv'}, {out / 'granularity_summary.csv'}, {out / 'granularity.png'}")
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3.2, help="total KL, nats per observation")
    parser.add_argument(
        "--band-width", type=float, default=1.5, help="band [c / w, c * w] around each controlled target c"
    )
    parser.add_argument(
        "--init-beta", type=float, default=0.01, help="initial beta, before the thermostat moves it"
    )
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--select-every", type=int, default=50)
    parser.add_argument("--select-after", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=64, help="posterior samples for the NLL")
    parser.add_argument("--max-points", type=int, default=512, help="points for the MI estimate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny nets: 1 is fastest)")
    parser.add_argument("--out", default="runs/granularity")
    parser.add_argument("--tiny", action="store_true", help="a few steps and two seeds, for smoke tests")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

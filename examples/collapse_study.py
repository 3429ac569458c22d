"""Collapse study: sweep one global beta from 1e-4 to 10, with and without the KLBand thermostat.

On scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes, split 80/20), a layer
of distributional neurons reads an MLP trunk and feeds a linear softmax head. For every beta the
network is fitted twice from the same seed: once with that beta fixed for every unit, and once with
a :class:`~vdn_pyro.inference.KLBand` thermostat that starts from it and steers each unit's own beta
so that its KL stays in a band. After the fit every unit is diagnosed on the validation split
(:func:`~vdn_pyro.inference.unit_report`), and the posterior predictive is scored.

Without the controller, raising beta kills the units one after the other (posterior collapse:
KL -> 0, the prediction falls back to the class prior); with it, every unit stays alive across
the whole sweep. Writes, under ``--out`` (default ``runs/collapse_study``):

- ``collapse.csv``: one row per (beta, controller): fraction of living / dead / deterministic /
  exploding units, fraction whose KL is inside the band (the same band judges both arms), total
  KL (nats per observation), total mutual information, mean final beta, validation NLL and
  accuracy, seconds;
- ``collapse.png``: fraction living, total KL and validation NLL against beta;
- ``monitor.csv``: every unit's statistics and status every ``--monitor-every`` steps of every fit
  (:class:`~vdn_pyro.inference.UnitMonitor`; ``global_beta`` and ``controller`` name the fit), to
  follow each regime as it evolves.

Full run (a few minutes on 2 CPU cores)::

    python examples/collapse_study.py

Smoke test (seconds)::

    python examples/collapse_study.py --tiny --out /tmp/collapse
"""

import argparse
import time
from pathlib import Path

import pandas as pd
import pyro
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from vdn_pyro import VDN, fit
from vdn_pyro.inference.constraints import KLBand
from vdn_pyro.inference.diagnostics import UnitMonitor, layer_summary, unit_report

CONTROLLERS = ("fixed", "klband")


def load_data(seed):
    """Standardised digits: x ``(N, 64)`` float, y ``(N,)`` int labels; stratified 80/20 split.

    Pixels that are constant on the training split keep scale 1 (they are not blown up).
    """
    data = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        data.data, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    loc, scale = x_train.mean(0), x_train.std(0)
    scale[scale == 0] = 1.0

    def prep(x, y):
        x = torch.as_tensor((x - loc) / scale, dtype=torch.float32)  # (N, 64)
        return x, torch.as_tensor(y, dtype=torch.long)  # (N,)

    return prep(x_train, y_train), prep(x_val, y_val)


def predictive_scores(network, x, y, num_samples):
    """Validation NLL ``-log mean_s p(y | z_s)`` per observation, and accuracy."""
    pred = network.predict(x, num_samples=num_samples)
    probs = pred.mean  # (N, C): class probabilities averaged over the posterior samples
    nll = -torch.log(probs.gather(1, y[:, None]).clamp_min(1e-12)).mean()
    accuracy = (probs.argmax(1) == y).float().mean()
    return float(nll), float(accuracy)


def run_one(beta, controller, args, data):
    """Fit one network; return its summary row and its monitor frame."""
    (x_train, y_train), (x_val, y_val) = data
    pyro.set_rng_seed(args.seed)
    network = VDN(
        x_train.shape[1],
        10,
        units=(args.units,),
        hidden=(args.hidden,),
        likelihood="categorical",
        beta=beta,
    )
    band = KLBand(args.band[0], args.band[1])
    constraints = [band] if controller == "klband" else []
    monitor = UnitMonitor(x_val, every=args.monitor_every, max_points=args.max_points, constraints=[band])
    start = time.perf_counter()
    fit(
        network,
        x_train,
        y_train,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        constraints=constraints,
        callbacks=[monitor],
        progress=False,
    )
    seconds = time.perf_counter() - start
    # the same band judges both arms, so "in band" means the same thing with and without control
    report = unit_report(network, x_val, constraints=[band], max_points=args.max_points)
    summary = layer_summary(report).iloc[0]
    nll, accuracy = predictive_scores(network, x_val, y_val, args.num_samples)
    row = {
        "beta": beta,
        "controller": controller,
        "fraction_living": summary.fraction_living,
        "fraction_dead": summary.fraction_dead,
        "fraction_deterministic": summary.fraction_deterministic,
        "fraction_exploding": summary.fraction_exploding,
        "fraction_kl_in_band": 1.0 - summary.fraction_kl_out_of_band,
        "total_kl": summary.total_kl,
        "total_mi": summary.total_mi,
        "mean_beta": summary.mean_beta,
        "val_nll": nll,
        "val_accuracy": accuracy,
        "seconds": seconds,
    }
    frame = monitor.frame()
    frame.insert(0, "controller", controller)
    frame.insert(0, "global_beta", beta)
    return row, frame


def plot(table, path, band):
    """Three panels against beta: fraction living, total KL, validation NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = {"fixed": ("tab:red", "fixed beta (no controller)"), "klband": ("tab:blue", "KLBand")}
    panels = [
        ("fraction_living", "fraction of living units"),
        ("total_kl", "total KL (nats / observation)"),
        ("val_nll", "validation NLL (nats / observation)"),
    ]
    for ax, (column, label) in zip(axes, panels):
        for controller, (color, name) in styles.items():
            part = table[table.controller == controller].sort_values("beta")
            ax.plot(part.beta, part[column], "o-", color=color, label=name)
            if column == "fraction_living":
                ax.plot(
                    part.beta,
                    part.fraction_dead,
                    "x--",
                    color=color,
                    alpha=0.6,
                    label=f"{name}: fraction dead",
                )
        ax.set_xscale("log")
        if column == "total_kl":
            ax.set_yscale("log")
        ax.set_xlabel("global beta (initial beta for KLBand)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    units = int(table.attrs.get("units", 0))
    axes[1].axhspan(band[0] * units, band[1] * units, color="tab:blue", alpha=0.08, label="band x units")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("Posterior collapse on digits: fixed beta vs the KLBand thermostat")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    if args.tiny:
        args.steps, args.units, args.hidden = 20, 4, 16
        args.betas = [1e-4, 1.0, 10.0]
        args.num_samples, args.monitor_every, args.max_points = 4, 10, 64
    if len(args.betas) < 1 or min(args.betas) <= 0:
        raise ValueError(f"Expected positive betas, but got {args.betas}.")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.seed)
    rows, frames = [], []
    for beta in sorted(args.betas):
        for controller in CONTROLLERS:
            row, frame = run_one(beta, controller, args, data)
            rows.append(row)
            frames.append(frame)
            print(
                f"beta={beta:<8g} {controller:<6} living={row['fraction_living']:.2f} "
                f"KL={row['total_kl']:.3f} NLL={row['val_nll']:.3f} ({row['seconds']:.1f}s)",
                flush=True,
            )
    table = pd.DataFrame(rows)
    table.attrs["units"] = args.units
    table.to_csv(out / "collapse.csv", index=False)
    pd.concat(frames, ignore_index=True).to_csv(out / "monitor.csv", index=False)
    plot(table, out / "collapse.png", args.band)

    columns = [
        "beta",
        "controller",
        "fraction_living",
        "fraction_dead",
        "fraction_kl_in_band",
        "total_kl",
        "mean_beta",
        "val_nll",
        "val_accuracy",
    ]
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 140):
        print(f"\nCollapse study on digits, {args.units} units, KL band {tuple(args.band)} nats per unit:")
        print(table[columns].to_string(index=False))
    fixed, held = table[table.controller == "fixed"], table[table.controller == "klband"]
    print(
        f"\nfixed beta: fraction living {fixed.fraction_living.iloc[0]:.2f} at beta={fixed.beta.iloc[0]:g} "
        f"-> {fixed.fraction_living.iloc[-1]:.2f} at beta={fixed.beta.iloc[-1]:g}; "
        f"KLBand: fraction living >= {held.fraction_living.min():.2f} and KL in band >= "
        f"{held.fraction_kl_in_band.min():.2f} at every beta."
    )
    print(f"wrote {out / 'collapse.csv'}, {out / 'collapse.png'}, {out / 'monitor.csv'}")
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--betas", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
    )
    parser.add_argument(
        "--band",
        type=float,
        nargs=2,
        default=[0.2, 1.0],
        metavar=("LOW", "HIGH"),
        help="KLBand band, nats per unit",
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--num-samples", type=int, default=32, help="posterior samples for the NLL")
    parser.add_argument("--monitor-every", type=int, default=250)
    parser.add_argument("--max-points", type=int, default=360, help="points for the MI estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny nets: 1 is fastest)")
    parser.add_argument("--out", default="runs/collapse_study")
    parser.add_argument("--tiny", action="store_true", help="a few steps and betas, for smoke tests")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

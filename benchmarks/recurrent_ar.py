"""AR against no-AR priors in the distributional recurrent network, with the step and the path posterior.

Trains :class:`~vdn_pyro.models.RecurrentVDN` on the US first names of the ``names`` package
(the corpus and the training recipe of ``examples/generate_names.py``, whose ``train`` function
this script calls: per-unit KL thermostat, best-on-validation parameters) in four variants,
{AR prior, phi = 0} x {posterior "step", posterior "path"}, plus the deterministic GRU of the same
width, for several seeds on one fixed train/validation/test split, and reports on the test split:

- the negative ELBO (every beta = 1) in bits per character, and the importance-sampled NLL;
- the latent share (KL / negative ELBO) and the living units (KL per char above a threshold);
- the learned phi of the AR variants (median, quartiles, min, max over the units);
- mean and standard deviation over seeds, and the paired differences AR minus no-AR (and path
  minus step) per seed with their spread.

Writes ``recurrent_ar.md`` and ``recurrent_ar.csv`` (one row per run) to ``benchmarks/results``
(``--quick``: a temporary directory unless ``--out-dir`` is given)::

    python benchmarks/recurrent_ar.py            # ~10 minutes on one thread
    python benchmarks/recurrent_ar.py --quick    # smoke run, under a minute
"""

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import generate_names  # noqa: E402  (the example's training recipe, reused as is)

from vdn_pyro.data.text import load_names_corpus  # noqa: E402
from vdn_pyro.files import atomic_path, write_text  # noqa: E402
from vdn_pyro.models.recurrent import evaluate_sequences  # noqa: E402

#: variant -> (the example's model kind, posterior)
VARIANTS = {
    "ar / step": ("vdn", "step"),
    "no-ar / step": ("vdn-no-ar", "step"),
    "ar / path": ("vdn", "path"),
    "no-ar / path": ("vdn-no-ar", "path"),
    "gru": ("gru", "step"),
}
LN2 = math.log(2)


def run_one(variant, seed, corpus, args):
    """Train and evaluate one variant at one seed; returns a dict (one CSV row)."""
    kind, posterior = VARIANTS[variant]
    example_args = generate_names.parse_args(
        [
            "--hidden", str(args.hidden), "--units", str(args.units), "--embed", str(args.embed),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--val-every", str(args.val_every), "--seed", str(seed), "--posterior", posterior,
        ]
    )  # fmt: skip
    network, seconds, best_step, best_val = generate_names.train(kind, corpus, example_args)
    x_test, y_test = corpus.tensors("test")
    ev = evaluate_sequences(
        network,
        x_test,
        y_test,
        num_samples=args.num_samples,
        replace_samples=2,
        kl_threshold=args.kl_threshold,
    )
    row = {
        "variant": variant,
        "kind": kind,
        "posterior": posterior if kind != "gru" else "",
        "seed": seed,
        "steps": args.steps,
        "train_s": seconds,
        "best_step": best_step,
        "val_bound_bits": best_val / LN2,
        "test_bound_bits": ev.nll_bound / LN2,
        "test_is_bits": ev.nll / LN2,
        "kl_bits": ev.kl / LN2,
        "latent_share": ev.latent_share,
        "living": int(ev.living(args.kl_threshold).sum()) if ev.units else 0,
        "units": ev.units,
    }
    phi = ev.phi if ev.units else np.zeros(0)
    for name, value in [("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0)]:
        row[f"phi_{name}"] = float(np.quantile(phi, value)) if phi.size else math.nan
    return row


def mean_std(values):
    """``"mean ± std"`` over seeds (std with ddof=1; ``±nan`` for one seed)."""
    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if values.size > 1 else math.nan
    return f"{values.mean():.4f} ± {std:.4f}"


def summary_tables(runs):
    """The per-variant table and the paired-difference table (markdown strings)."""
    rows = []
    for variant in VARIANTS:
        part = runs[runs["variant"] == variant]
        if part.empty:
            continue
        latent = VARIANTS[variant][0] != "gru"
        rows.append(
            {
                "variant": variant,
                "seeds": len(part),
                "test -ELBO (bits/char)": mean_std(part["test_bound_bits"]),
                "test IS NLL (bits/char)": mean_std(part["test_is_bits"]),
                "latent share": mean_std(part["latent_share"]) if latent else "",
                "living units": (
                    f"{part['living'].mean():.1f} / {int(part['units'].iloc[0])}" if latent else ""
                ),
                "phi median [q25, q75] (min, max)": (
                    f"{part['phi_median'].mean():+.3f} [{part['phi_q25'].mean():+.3f}, "
                    f"{part['phi_q75'].mean():+.3f}] ({part['phi_min'].min():+.3f}, "
                    f"{part['phi_max'].max():+.3f})"
                    if VARIANTS[variant][0] == "vdn"
                    else ""
                ),
                "train s": f"{part['train_s'].mean():.0f}",
            }
        )
    diffs = []
    pairs = [
        ("AR - no-AR, step posterior", "ar / step", "no-ar / step"),
        ("AR - no-AR, path posterior", "ar / path", "no-ar / path"),
        ("path - step, AR", "ar / path", "ar / step"),
        ("path - step, no-AR", "no-ar / path", "no-ar / step"),
    ]
    for label, a, b in pairs:
        left = runs[runs["variant"] == a].set_index("seed")
        right = runs[runs["variant"] == b].set_index("seed")
        seeds = left.index.intersection(right.index)
        if len(seeds) == 0:
            continue

        def diff(col, left=left, right=right, seeds=seeds):
            return (left.loc[seeds, col] - right.loc[seeds, col]).to_numpy()

        diffs.append(
            {
                "difference (paired by seed)": label,
                "seeds": len(seeds),
                "test -ELBO (bits/char)": mean_std(diff("test_bound_bits")),
                "test IS NLL (bits/char)": mean_std(diff("test_is_bits")),
                "latent share": mean_std(diff("latent_share")),
                "per-seed -ELBO diffs": " ".join(f"{v:+.4f}" for v in diff("test_bound_bits")),
            }
        )
    return markdown(pd.DataFrame(rows)), markdown(pd.DataFrame(diffs))


def markdown(frame):
    """A pipe table of string cells (no optional dependency)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_results(runs, out_dir, args, corpus, seconds):
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "recurrent_ar.csv") as tmp:
        runs.to_csv(tmp, index=False, float_format="%.6g")
    table, diffs = summary_tables(runs)
    text = f"""# RecurrentVDN: AR against no-AR prior, step against path posterior

Command: `python benchmarks/recurrent_ar.py {" ".join(args.argv)}`; total wall time {seconds / 60:.1f} min on
one torch thread ({os.cpu_count()} CPUs visible, shared with other jobs: times vary).

What was run: US first names from the `names` package, one fixed split (split seed 0:
{len(corpus.train)} train / {len(corpus.val)} validation / {len(corpus.test)} test names,
{corpus.num_chars("test")} test positions); `RecurrentVDN` with embed {args.embed}, hidden {args.hidden},
{args.units} units, GRU cell; the recipe of `examples/generate_names.py` (its `train`: Adam lr 3e-3, batch
{args.batch_size}, {args.steps} steps, per-unit KL thermostat holding each unit's KL in 0.08-0.16 nats per
name, parameters kept at the best validation bound checked every {args.val_every} steps); training seeds
{", ".join(map(str, args.seeds))}. The example's default run trains 1500 steps; this budget run trains
{args.steps}.

- **step** posterior: q(z_t | h_t, y_t), residual on the prior mean (today's default).
- **path** posterior: a Gauss-Markov chain q(z_t | z_(t-1), h_t, g_t) = N(a_t z_(t-1) + b_t, s_t^2), with
  g_t a backward GRU over the name's characters y_t..y_(L-1), residual on the prior mean
  (a_t = phi + tanh(.), b_t = W h_t + c + shift).
- **ar**: each unit's prior N(phi_i z_(t-1) + W h_t + c, s_i^2) with learned phi_i; **no-ar**: phi = 0.

Test scores, mean ± std over seeds. -ELBO is the negative ELBO with every beta = 1 (an upper
bound on the NLL); IS NLL the importance-sampled estimate with K = {args.num_samples}; for the GRU both
are its exact NLL. Latent share = KL / -ELBO; living units have KL > {args.kl_threshold} nats per
character. phi: the mean over seeds of each seed's median and quartiles over the units, and the
min and max over all seeds' units.

{table}

Paired differences (same seed: same batches, same initial draws up to the posterior head),
mean ± std over seeds; negative = the first variant is better:

{diffs}
"""
    write_text(out_dir / "recurrent_ar.md", text)
    return text


def main(argv=None):
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(1)
    pyro.enable_validation(False)  # as in the example: the per-step checks cost time; tests run them
    start = time.perf_counter()
    corpus = load_names_corpus("first", seed=0, limit=args.limit)
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            row = run_one(variant, seed, corpus, args)
            rows.append(row)
            print(
                f"[{time.perf_counter() - start:6.0f} s] seed {seed} {variant:<13} -ELBO "
                f"{row['test_bound_bits']:.4f} bits/char, IS {row['test_is_bits']:.4f}, share "
                f"{row['latent_share']:.3f}, living {row['living']}/{row['units']}, phi median "
                f"{row['phi_median']:+.3f} ({row['train_s']:.0f} s)",
                flush=True,
            )
    runs = pd.DataFrame(rows)
    out_dir = args.out_dir
    if out_dir is None:
        out_dir = (
            Path(tempfile.mkdtemp(prefix="recurrent_ar_")) if args.quick else ROOT / "benchmarks/results"
        )
    text = write_results(runs, Path(out_dir), args, corpus, time.perf_counter() - start)
    print(text)
    print(f"written to {out_dir}")
    return runs, Path(out_dir)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--embed", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=16, help="K importance samples per name")
    parser.add_argument("--kl-threshold", type=float, default=0.01)
    parser.add_argument("--limit", type=int, default=None, help="use only this many names")
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, few names, temp dir")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.limit = 20, args.seeds[:2], args.limit or 300
        args.hidden, args.units, args.embed, args.val_every, args.num_samples = 16, 4, 8, 10, 4
    return args


if __name__ == "__main__":
    main()

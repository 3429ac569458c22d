r"""phi recovery: two hidden AR(1) causes seen through a linear Gaussian emission.

The data are the case of issue #12: two AR(1) causes with :math:`\phi = (0.9, 0.3)` and unit
stationary variance, observed as

.. math:: z_{j,1} \sim \mathcal{N}(0, 1), \quad
          z_{j,t} = \phi_j z_{j,t-1} + \sqrt{1 - \phi_j^2}\,\epsilon_{j,t}, \quad
          x_t = A z_t + \sigma \eta_t,

with D = 6, T = 20 and A a fixed 6 x 2 matrix of standard normal entries (``--data-seed``). The
same latent paths and noise draws serve both noise levels (common random numbers), so the two
sigmas differ in sigma only.

The model is ``VDN(6, 6, units=(2,), trunk="none", prior="ar", learn_prior=True,
posterior=..., likelihood="gaussian", likelihood_scale="learned", beta=1)`` with x as input and
target, fitted with :func:`vdn_pyro.fit` (mean-field :class:`~vdn_pyro.LocalELBO`, analytic KL),
once with the diagonal posterior (independent over steps, q(z_t | x_t)) and once with the
Gauss-Markov path posterior (:class:`~vdn_pyro.guides.PathPosterior`), per noise level and seed.

Reported per run, all on held-out test sequences:

- the learned phi of the two units, matched to the causes by the permutation whose head columns
  best align (largest summed absolute cosine) with the columns of A, and the largest error;
- the test ELBO per sequence (nats; analytic KL, ``--particles`` draws for the expected
  log-likelihood), the exact log-likelihood of the true model (a Kalman filter in float64,
  :func:`kalman_log_lik`), the log-likelihood of the best model iid over time (the true
  marginal :math:`\mathcal{N}(0, AA^\top + \sigma^2 I)` per step, :func:`iid_log_lik`), and the
  fraction of the iid-to-exact gap the ELBO captures, :math:`(\text{ELBO} - \text{iid}) /
  (\text{exact} - \text{iid})`.

Nothing is chosen on the test sequences. The stopping step (the best of every ``--val-every``
steps, :class:`Validator`) is chosen on the validation split by its ELBO, and so is the
learning rate when ``--lrs`` lists several. The default learning rates (:data:`LEARNING_RATES`)
were chosen that way, on seed 0 from 0.003, 0.01 and 0.03 (``--seeds 0 --lrs 0.003 0.01
0.03``): 0.01 for the path posterior at both noise levels, 0.03 for the diagonal one at both.

Writes ``phi_recovery.csv`` (one row per run) and ``phi_recovery.md`` to ``--out-dir``
(default ``benchmarks/results``; ``--quick`` writes to a temporary directory unless
``--out-dir`` is given).

    python benchmarks/phi_recovery.py            # the study (about 10 minutes on one core)
    python benchmarks/phi_recovery.py --quick    # a smoke run (seconds)
"""

import argparse
import copy
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.functional import softplus

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vdn_pyro import VDN, LocalELBO, fit  # noqa: E402
from vdn_pyro.files import atomic_path, write_text  # noqa: E402
from vdn_pyro.inference.fit import evaluate_loss  # noqa: E402

PHI = (0.9, 0.3)
NUM_FEATURES, NUM_STEPS, NUM_CAUSES = 6, 20, len(PHI)
SIGMAS = (0.3, 1.0)
POSTERIORS = ("diagonal", "path")
#: issue #12: phi within 0.05; the test ELBO captures this fraction of the iid-to-exact gap
PHI_TOLERANCE = 0.05
GAP_TARGETS = {0.3: 0.93, 1.0: 0.88}
LOG_2PI = math.log(2 * math.pi)
#: default learning rate per posterior, chosen by validation ELBO (see the module docstring)
LEARNING_RATES = {"diagonal": 0.03, "path": 0.01}
F64 = torch.float64


# ------------------------------------------------------------------------------ the data
def loading_matrix(seed, num_features=NUM_FEATURES, num_causes=NUM_CAUSES):
    """The fixed loadings A, ``(D, K)`` float64, standard normal entries."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_features, num_causes, generator=generator, dtype=F64)


def simulate_paths(num_seqs, num_steps, phi, generator):
    """Stationary AR(1) paths with unit marginal variance, ``(N, T, K)`` float64."""
    phi = torch.as_tensor(phi, dtype=F64)  # (K,)
    innovation = (1 - phi**2).sqrt()  # (K,)
    noise = torch.randn(num_seqs, num_steps, phi.shape[0], generator=generator, dtype=F64)
    steps = [noise[:, 0]]  # z_1 ~ N(0, 1)
    for t in range(1, num_steps):
        steps.append(phi * steps[-1] + innovation * noise[:, t])
    return torch.stack(steps, 1)  # (N, T, K)


def make_splits(sizes, loadings, sigmas, seed, phi=PHI, num_steps=NUM_STEPS):
    """Train, validation and test sequences at every noise level, from one set of latent paths
    and noise draws.

    :param dict sizes: split name -> number of sequences.
    :param torch.Tensor loadings: A, ``(D, K)``.
    :param sigmas: the noise levels.
    :param int seed: seeds the paths and the noise.
    :returns: dict sigma -> dict split -> x, ``(N, T, D)`` float64.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {sigma: {} for sigma in sigmas}
    for split, num_seqs in sizes.items():
        paths = simulate_paths(num_seqs, num_steps, phi, generator)  # (N, T, K)
        noise = torch.randn(num_seqs, num_steps, loadings.shape[0], generator=generator, dtype=F64)
        for sigma in sigmas:
            out[sigma][split] = paths @ loadings.T + sigma * noise  # (N, T, D)
    return out


# ------------------------------------------------------------------- exact references
def kalman_log_lik(x, loadings, phi, noise_scale, innovation_scale=None, constant=None, bias=None):
    r"""Exact :math:`\log p(x_{1:T})` per sequence of a linear Gaussian state-space model with
    independent AR(1) states, by the Kalman filter in float64:

    .. math:: z_{j,t} = c_j + \phi_j z_{j,t-1} + s_j \epsilon_{j,t}, \quad
              z_{j,1} \sim \mathcal{N}\big(\tfrac{c_j}{1 - \phi_j}, \tfrac{s_j^2}{1 - \phi_j^2}\big),
              \quad x_t = A z_t + b + r \odot \eta_t.

    The defaults (:math:`c = 0`, :math:`s = \sqrt{1 - \phi^2}`, :math:`b = 0`) are the true model
    of the study: unit stationary variance, zero mean.

    :param torch.Tensor x: ``(N, T, D)``.
    :param torch.Tensor loadings: A, ``(D, K)``.
    :param phi: the K coefficients, ``(K,)``.
    :param noise_scale: r, a number or ``(D,)``.
    :param innovation_scale: s, ``(K,)`` (default :math:`\sqrt{1 - \phi^2}`).
    :param constant: c, ``(K,)`` (default 0).
    :param bias: b, ``(D,)`` (default 0).
    :returns: ``(N,)`` float64.
    """
    x, loadings = x.to(F64), loadings.to(F64)
    num_seqs, num_steps, num_features = x.shape
    phi = torch.as_tensor(phi, dtype=F64)  # (K,)
    innovation_scale = (
        (1 - phi**2).sqrt() if innovation_scale is None else torch.as_tensor(innovation_scale, dtype=F64)
    )
    constant = torch.zeros_like(phi) if constant is None else torch.as_tensor(constant, dtype=F64)
    bias = torch.zeros(num_features, dtype=F64) if bias is None else torch.as_tensor(bias, dtype=F64)
    noise_var = torch.as_tensor(noise_scale, dtype=F64).expand(num_features) ** 2  # (D,)
    transition = torch.diag(phi)  # (K, K)
    innovation = torch.diag(innovation_scale**2)  # (K, K)
    loc = (constant / (1 - phi)).expand(num_seqs, -1)  # (N, K) predicted state mean
    cov = torch.diag(innovation_scale**2 / (1 - phi**2))  # (K, K) predicted covariance, shared
    log_lik = torch.zeros(num_seqs, dtype=F64)
    for t in range(num_steps):
        innov_cov = loadings @ cov @ loadings.T + torch.diag(noise_var)  # (D, D)
        chol = torch.linalg.cholesky(innov_cov)  # (D, D)
        innov = x[:, t] - loc @ loadings.T - bias  # (N, D)
        white = torch.linalg.solve_triangular(chol, innov.T, upper=False).T  # (N, D)
        log_det = 2 * torch.log(torch.diagonal(chol)).sum()
        log_lik = log_lik - 0.5 * (num_features * LOG_2PI + log_det + (white**2).sum(-1))
        gain = torch.cholesky_solve(loadings @ cov, chol).T  # (K, D): cov A^T S^-1
        loc = loc + innov @ gain.T  # (N, K) update
        cov = cov - gain @ loadings @ cov  # (K, K)
        cov = 0.5 * (cov + cov.T)
        loc = constant + loc * phi  # (N, K) predict
        cov = transition @ cov @ transition.T + innovation  # (K, K)
    return log_lik


def model_log_lik(network, x):
    """The exact log-likelihood per sequence of a fitted network's own generative model (its AR
    priors, head and noise scales) by :func:`kalman_log_lik`: the ELBO's upper bound, so
    ``model_log_lik - ELBO`` is the inference gap of the posterior.

    :param network: a network from :func:`build_network`.
    :param torch.Tensor x: ``(N, T, D)``.
    :returns: ``(N,)`` float64.
    """
    prior = network.layers[0].prior
    with torch.no_grad():
        noise = softplus(network.likelihood.raw_scale) + network.likelihood.scale_min  # (D,)
        return kalman_log_lik(
            x,
            network.head.weight.to(F64),
            prior.phi[:, 0].to(F64),
            noise.to(F64),
            innovation_scale=prior.scale.to(F64),
            constant=prior.constant.to(F64),
            bias=network.head.bias.to(F64),
        )


def iid_log_lik(x, loadings, sigma):
    r"""Log-likelihood per sequence of the best model iid over time: each :math:`x_t` from the
    true marginal :math:`\mathcal{N}(0, AA^\top + \sigma^2 I)`.

    :param torch.Tensor x: ``(N, T, D)``.
    :returns: ``(N,)`` float64.
    """
    x, loadings = x.to(F64), loadings.to(F64)
    cov = loadings @ loadings.T + sigma**2 * torch.eye(loadings.shape[0], dtype=F64)  # (D, D)
    marginal = torch.distributions.MultivariateNormal(torch.zeros(loadings.shape[0], dtype=F64), cov)
    return marginal.log_prob(x).sum(-1)  # (N,)


# ----------------------------------------------------------------------- the model
def build_network(posterior, num_features=NUM_FEATURES, num_causes=NUM_CAUSES):
    """The VDN of the study: K AR(1) units read straight from x, a linear head, a Gaussian
    likelihood with a learned scale per output, beta = 1."""
    return VDN(
        num_features,
        num_features,
        units=(num_causes,),
        trunk="none",
        prior="ar",
        learn_prior=True,
        posterior=posterior,
        likelihood="gaussian",
        likelihood_scale="learned",
        beta=1.0,
    )


class CosineDecay:
    """A :func:`fit` callback: the learning rate follows a half cosine from ``lr`` to
    ``lr * final`` over ``steps`` steps."""

    def __init__(self, lr, steps, final=0.1):
        self.lr, self.steps, self.final = lr, steps, final

    def on_step_end(self, state):
        progress = min(state.step / self.steps, 1.0)
        factor = self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in state.optimizer.param_groups:
            group["lr"] = self.lr * factor


class Validator:
    """A :func:`fit` callback: every ``every`` steps (and at the last), the validation ELBO with
    ``particles`` draws (far less noisy than :func:`fit`'s one-particle validation); the best
    state is loaded back at the end. It draws on a fork of the random state, so it never changes
    the training trajectory.

    :ivar list history: ``(step, loss)`` of every validation, loss = minus the ELBO per sequence.
    :ivar float best_loss: minus the best validation ELBO per sequence.
    :ivar int best_step: the step it was reached at.
    """

    def __init__(self, x, every, steps, particles=16):
        self.x, self.every, self.steps = x, every, steps
        self.elbo = LocalELBO(num_particles=particles)
        self.best_loss, self.best_step, self.best_state = math.inf, -1, None
        self.history = []

    def on_step_end(self, state):
        if state.step % self.every and state.step != self.steps:
            return
        with torch.random.fork_rng():
            loss = evaluate_loss(state.network, self.x, self.x, elbo=self.elbo)
        self.history.append((state.step, loss))
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, state.step
            self.best_state = copy.deepcopy(state.network.state_dict())

    def on_fit_end(self, state):
        if self.best_state is not None:
            state.network.load_state_dict(self.best_state)


def learned_phi(network, loadings):
    """The units' phi matched to the causes.

    Units are assigned to causes by the permutation that maximises the summed absolute cosine
    between the head's columns (a unit's loadings) and the columns of A; phi is compared
    directly (its sign does not flip with the loading's).

    :returns: ``(phi, cosines)``: the matched phi per cause ``(K,)`` and the absolute cosines of
        the matched pairs ``(K,)``, numpy arrays.
    """
    phi = network.layers[0].prior.phi.detach().to(F64)[:, 0]  # (K,)
    weight = network.head.weight.detach().to(F64)  # (D, K)
    cos = torch.nn.functional.cosine_similarity(
        weight[:, :, None], loadings[:, None, :], dim=0
    ).abs()  # (K, K)
    num = loadings.shape[1]
    best = max(itertools.permutations(range(num)), key=lambda p: sum(cos[p[j], j] for j in range(num)))
    order = list(best)  # unit matched to cause j
    return phi[order].numpy(), cos[order, list(range(num))].numpy()


def elbo_per_sequence(network, x, particles, batch_size=500):
    """The ELBO per sequence (nats): analytic KL, ``particles`` draws for the expected
    log-likelihood, evaluated in float64 on a copy of the network."""
    net = build_network(network.config.posterior)
    net.load_state_dict(network.state_dict())
    net.double()
    elbo = LocalELBO(num_particles=particles)
    return -evaluate_loss(net, x.double(), x.double(), elbo=elbo, batch_size=batch_size)


def train_one(posterior, data, lr, seed, args):
    """Fit one network; return it, in its best validation state, with its :class:`Validator`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = build_network(posterior)
    x_train, x_val = data["train"].float(), data["val"].float()
    validator = Validator(x_val, args.val_every, args.steps, args.val_particles)
    fit(
        network,
        x_train,
        x_train,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=lr,
        seed=seed,
        log_every=args.val_every,
        callbacks=[CosineDecay(lr, args.steps, args.final_lr), validator],
        progress=False,
    )
    return network, validator


def run_case(sigma, posterior, seed, data, loadings, references, args):
    """One (sigma, posterior, seed): fit at every learning rate of ``args.lrs`` (default
    :data:`LEARNING_RATES` of the posterior), keep the best
    on validation, and score it on the test split."""
    start = time.time()
    candidates = []
    for lr in args.lrs or [LEARNING_RATES[posterior]]:
        network, validator = train_one(posterior, data, lr, seed, args)
        candidates.append((validator.best_loss, lr, network, validator))
    val_loss, lr, network, validator = min(candidates, key=lambda c: c[0])
    phi, cosines = learned_phi(network, loadings)
    test_elbo = elbo_per_sequence(network, data["test"], args.particles)
    val_elbo = elbo_per_sequence(network, data["val"], args.particles)
    test_model = float(model_log_lik(network, data["test"]).mean())
    raw_phi = network.layers[0].prior.phi.detach().to(F64)[:, 0].numpy()  # (K,)
    phi_err_by_phi = min(
        float(np.abs(raw_phi[list(p)] - np.asarray(PHI)).max())
        for p in itertools.permutations(range(len(PHI)))
    )
    ref = references
    row = {
        "sigma": sigma,
        "posterior": posterior,
        "seed": seed,
        "lr": lr,
        "best_step": validator.best_step,
        "phi_1": float(phi[0]),
        "phi_2": float(phi[1]),
        "phi_err": float(np.abs(phi - np.asarray(PHI)).max()),
        "phi_err_by_phi": phi_err_by_phi,
        "cos_1": float(cosines[0]),
        "cos_2": float(cosines[1]),
        "test_elbo": test_elbo,
        "test_exact": ref["test"]["exact"],
        "test_iid": ref["test"]["iid"],
        "gap_fraction": (test_elbo - ref["test"]["iid"]) / (ref["test"]["exact"] - ref["test"]["iid"]),
        "test_model_ll": test_model,
        "inference_gap": test_model - test_elbo,
        "val_elbo": val_elbo,
        "val_gap_fraction": (val_elbo - ref["val"]["iid"]) / (ref["val"]["exact"] - ref["val"]["iid"]),
        "noise_scale": float(
            (softplus(network.likelihood.raw_scale.detach()) + network.likelihood.scale_min).mean()
        ),
        "seconds": time.time() - start,
    }
    print(
        f"sigma={sigma} {posterior:8s} seed={seed} lr={lr:g} step={row['best_step']}: "
        f"phi=({row['phi_1']:.3f}, {row['phi_2']:.3f}) test ELBO {test_elbo:.3f} "
        f"(iid {ref['test']['iid']:.3f}, exact {ref['test']['exact']:.3f}) "
        f"fraction {row['gap_fraction']:.3f}  [{row['seconds']:.0f} s]",
        flush=True,
    )
    return row


# ------------------------------------------------------------------------- outputs
def summarise(runs):
    """One row per (sigma, posterior): means, spreads, worst seeds and whether the targets hold
    (every seed must meet them)."""
    rows = []
    for (sigma, posterior), group in runs.groupby(["sigma", "posterior"], sort=True):
        target = GAP_TARGETS.get(sigma, math.nan)
        rows.append(
            {
                "sigma": sigma,
                "posterior": posterior,
                "seeds": len(group),
                "phi_1": group["phi_1"].mean(),
                "phi_1_std": group["phi_1"].std(ddof=1) if len(group) > 1 else 0.0,
                "phi_2": group["phi_2"].mean(),
                "phi_2_std": group["phi_2"].std(ddof=1) if len(group) > 1 else 0.0,
                "phi_err_max": group["phi_err"].max(),
                "test_elbo": group["test_elbo"].mean(),
                "test_exact": group["test_exact"].iloc[0],
                "test_iid": group["test_iid"].iloc[0],
                "gap_fraction": group["gap_fraction"].mean(),
                "gap_fraction_std": group["gap_fraction"].std(ddof=1) if len(group) > 1 else 0.0,
                "gap_fraction_min": group["gap_fraction"].min(),
                "gap_target": target,
                "phi_ok": bool(group["phi_err"].max() <= PHI_TOLERANCE),
                "gap_ok": bool(group["gap_fraction"].min() >= target),
            }
        )
    return pd.DataFrame(rows)


def markdown(summary, runs, note):
    """The results page."""

    def pm(mean, std, digits=3):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = [
        "# phi recovery: two AR(1) causes behind a linear Gaussian emission",
        "",
        (
            "Generated by `benchmarks/phi_recovery.py` (issue #12). True phi = (0.9, 0.3), unit stationary "
            "variance, D = 6, T = 20, A a fixed 6 x 2 standard normal matrix. ELBO, exact (Kalman) and iid "
            "log-likelihoods are per test sequence, in nats; fraction = (ELBO - iid) / (exact - iid). "
            "Mean ± standard deviation over seeds; a target holds when every seed meets it."
        ),
        "",
        note,
        "",
        (
            "| sigma | posterior | phi_1 (0.9) | phi_2 (0.3) | max abs phi error (worst seed) | test ELBO | "
            "exact | iid | fraction of gap | worst seed | target | phi ok | gap ok |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        lines.append(
            f"| {row.sigma:g} | {row.posterior} | {pm(row.phi_1, row.phi_1_std)} | "
            f"{pm(row.phi_2, row.phi_2_std)} | {row.phi_err_max:.3f} | {row.test_elbo:.3f} | "
            f"{row.test_exact:.3f} | {row.test_iid:.3f} | {pm(row.gap_fraction, row.gap_fraction_std)} | "
            f"{row.gap_fraction_min:.3f} | {row.gap_target:.2f} | {'yes' if row.phi_ok else 'no'} | "
            f"{'yes' if row.gap_ok else 'no'} |"
        )
    differ = runs[runs["phi_err_by_phi"] < runs["phi_err"] - 1e-12]
    if differ.empty:
        lines += ["", "In every run the units' match by loadings is also the permutation closest in phi."]
    else:
        lines += [
            "",
            "Runs where the permutation closest in phi differs from the match by loadings (its error "
            "in brackets): "
            + ", ".join(
                f"sigma {r.sigma:g} {r.posterior} seed {r.seed} ({r.phi_err_by_phi:.3f})"
                for r in differ.itertuples()
            )
            + ".",
        ]
    lines += [
        "",
        "## Runs",
        "",
        (
            "Per run: the absolute cosine between each matched unit's head column and its cause's column of "
            "A; the learned model's own exact log-likelihood on the test sequences (Kalman filter with the "
            "learned AR priors, head and noise scales) and its gap to the ELBO (the posterior's inference "
            "gap, >= 0 up to Monte Carlo error); the learned noise scale (mean over outputs)."
        ),
        "",
        (
            "| sigma | posterior | seed | lr | best step | phi_1 | phi_2 | abs cos (unit, cause) | "
            "test ELBO | fraction | val fraction | learned model log-lik | inference gap | noise scale | "
            "seconds |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in runs.itertuples():
        lines.append(
            f"| {row.sigma:g} | {row.posterior} | {row.seed} | {row.lr:g} | {row.best_step} | "
            f"{row.phi_1:.3f} | {row.phi_2:.3f} | {row.cos_1:.3f}, {row.cos_2:.3f} | {row.test_elbo:.3f} | "
            f"{row.gap_fraction:.3f} | {row.val_gap_fraction:.3f} | {row.test_model_ll:.3f} | "
            f"{row.inference_gap:.3f} | {row.noise_scale:.3f} | {row.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def output_dir(args):
    """Where the study writes: ``--out-dir`` if given, else a fresh temporary directory for
    ``--quick`` (a smoke run never overwrites the committed results) and
    ``benchmarks/results`` for the study."""
    if args.out_dir is not None:
        return Path(args.out_dir)
    if args.quick:
        return Path(tempfile.mkdtemp(prefix="phi_recovery_"))
    return ROOT / "benchmarks" / "results"


def main(args):
    """Run the study; write the CSV and the page; return ``(summary, runs)`` data frames."""
    torch.set_num_threads(args.threads)
    out_dir = Path(output_dir(args))
    out_dir.mkdir(parents=True, exist_ok=True)
    loadings = loading_matrix(args.data_seed)
    sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    splits = make_splits(sizes, loadings, args.sigmas, args.data_seed + 1)
    start = time.time()
    rows = []
    for sigma in args.sigmas:
        data = splits[sigma]
        references = {
            split: {
                "exact": float(kalman_log_lik(data[split], loadings, PHI, sigma).mean()),
                "iid": float(iid_log_lik(data[split], loadings, sigma).mean()),
            }
            for split in ("val", "test")
        }
        for posterior in args.posteriors:
            for seed in args.seeds:
                rows.append(run_case(sigma, posterior, seed, data, loadings, references, args))
    runs = pd.DataFrame(rows)
    summary = summarise(runs)
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out_dir",)
    }
    if args.lrs:
        lr_note = f"lr from {args.lrs}, kept per run by validation ELBO"
    else:
        chosen = ", ".join(f"{LEARNING_RATES[p]:g} ({p})" for p in args.posteriors)
        lr_note = f"lr {chosen}, chosen by validation ELBO on seed 0 from 0.003, 0.01, 0.03"
    note = (
        f"Training: {args.num_train} train / {args.num_val} validation / {args.num_test} test sequences "
        f"(paths and noise from seed {args.data_seed + 1}); `vdn_pyro.fit`, Adam, {args.steps} steps, "
        f"batch {args.batch_size}, {lr_note}, cosine decay to {args.final_lr} x lr; the state kept is the "
        f"best of every {args.val_every} steps by validation ELBO ({args.val_particles} particles); "
        f"seeds {args.seeds} (initialisation and minibatch order); test ELBO with analytic KL and "
        f"{args.particles} particles, float64. A = loading_matrix({args.data_seed}). Total "
        f"{time.time() - start:.0f} s on {args.threads} thread(s). Options: {json.dumps(settings)}"
    )
    with atomic_path(out_dir / "phi_recovery.csv") as tmp:
        runs.to_csv(tmp, index=False)
    write_text(out_dir / "phi_recovery.md", markdown(summary, runs, note))
    print(note)
    print(summary.to_string(index=False))
    print(f"wrote {out_dir / 'phi_recovery.md'} and {out_dir / 'phi_recovery.csv'}")
    return summary, runs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, few steps, one seed")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    parser.add_argument("--posteriors", nargs="+", default=list(POSTERIORS), choices=POSTERIORS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="learning rates, the best by validation ELBO kept (default: LEARNING_RATES per posterior)",
    )
    parser.add_argument("--final-lr", type=float, default=0.1, help="final lr as a fraction of lr")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-particles", type=int, default=16, help="particles of the validation ELBO")
    parser.add_argument("--particles", type=int, default=64, help="particles of the reported ELBOs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.num_train, args.num_val, args.num_test = 256, 128, 256
        args.steps, args.val_every, args.particles, args.val_particles = 40, 20, 8, 4
    return args


if __name__ == "__main__":
    main(parse_args())

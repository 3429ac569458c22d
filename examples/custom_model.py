r"""Your own Pyro model with distributional neurons, trained by a plain SVI loop.

The model is an ordinary :class:`~pyro.nn.PyroModule` whose ``forward`` the user writes. Two
layers of neurons sit in it:

- ``dynamics``, a :class:`~vdn_pyro.TemporalNeurons` layer: each unit carries a latent over the T
  steps of a sequence under its own learnable AR(1) prior
  :math:`z_t = c + \phi z_{t-1} + s \epsilon_t`;
- ``context``, a static :class:`~vdn_pyro.Neurons` layer: one latent per unit and sequence, read
  from the sequence's time-averaged features.

:class:`~vdn_pyro.NeuronGuide` builds the guide from the model (the same forward pass, each layer
sampling its amortized posterior), so training is stock Pyro: ``SVI(net, guide, pyro.optim.Adam,
TraceMeanField_ELBO())``. Afterwards :func:`~vdn_pyro.unit_report` gives one row per unit (KL,
status, the AR memory of each temporal unit) and :func:`~vdn_pyro.to_inference_data` hands the
fitted model to ArviZ (``az.summary``, ``az.loo``).

The data are synthetic with real temporal structure: three latent AR(1) causes with
:math:`\phi = 0.9, 0.5, -0.5` and one static cause per sequence, seen through linear maps plus
noise in the inputs ``x`` and in the targets ``y``. The AR prior has something to learn: each
living temporal unit takes up one cause and its learned :math:`\phi` moves towards that cause's
(a slow cause shows a smaller :math:`\phi`: the static context units take up its per-sequence
mean, and the posterior's noise shortens the memory it sees); the units the data do not need die
(KL about 0) and their :math:`\phi` falls to 0, the memory of a posterior that is independent over
time. Runs in about a minute on 2 CPU cores::

    python examples/custom_model.py
    python examples/custom_model.py --tiny      # seconds (what the test runs)
"""

import argparse
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.nn import PyroModule
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import vdn_pyro  # noqa: E402
from vdn_pyro import Neurons, TemporalNeurons  # noqa: E402
from vdn_pyro.primitives import data_plate  # noqa: E402

#: AR(1) coefficients of the latent temporal causes of the synthetic data.
TRUE_PHI = (0.9, 0.5, -0.5)
#: Scale of the noise on the inputs.
X_NOISE = 0.1


def make_data(num_sequences, num_steps, x_dim=6, y_dim=4, seed=0):
    r"""Sequences driven by latent AR(1) causes and one static cause, observed with noise.

    Each sequence n has causes :math:`c_{n,t,j}`, stationary AR(1) with unit variance and
    coefficient ``TRUE_PHI[j]``, and a static cause :math:`g_n \sim \mathcal N(0, 1)`;
    :math:`x_{n,t} = A c_{n,t} + a g_n + 0.1\,\epsilon` and
    :math:`y_{n,t} = C c_{n,t} + e g_n + 0.2\,\epsilon'`.

    :returns: ``x (N, T, x_dim)``, ``y (N, T, y_dim)`` (float32).
    """
    gen = torch.Generator().manual_seed(seed)
    phi = torch.tensor(TRUE_PHI)  # (J,)
    innovation = (1 - phi**2).sqrt()  # (J,): unit stationary variance
    causes = torch.empty(num_sequences, num_steps, len(TRUE_PHI))  # (N, T, J)
    causes[:, 0] = torch.randn(num_sequences, len(TRUE_PHI), generator=gen)
    for t in range(1, num_steps):
        noise = torch.randn(num_sequences, len(TRUE_PHI), generator=gen)  # (N, J)
        causes[:, t] = phi * causes[:, t - 1] + innovation * noise
    static = torch.randn(num_sequences, 1, 1, generator=gen)  # (N, 1, 1)
    a_map = torch.randn(len(TRUE_PHI), x_dim, generator=gen)  # (J, x_dim)
    a_static = torch.randn(x_dim, generator=gen)  # (x_dim,)
    c_map = torch.randn(len(TRUE_PHI), y_dim, generator=gen)  # (J, y_dim)
    c_static = torch.randn(y_dim, generator=gen)  # (y_dim,)
    x = causes @ a_map + static * a_static  # (N, T, x_dim)
    x = x + X_NOISE * torch.randn(x.shape, generator=gen)
    y = causes @ c_map + static * c_static  # (N, T, y_dim)
    y = y + 0.2 * torch.randn(y.shape, generator=gen)
    return x, y


class SequenceModel(PyroModule):
    """A user-written Pyro model: an encoder, temporal neurons under AR(1) priors, static context
    neurons, a linear head and a Gaussian likelihood with a learned scale per output.

    :param int x_dim: input width D. :param int y_dim: outputs per step.
    :param int features: encoder width F. :param int dynamic_units: temporal neurons H_t.
    :param int context_units: static neurons H_s. :param float beta: KL coefficient.
    """

    def __init__(self, x_dim, y_dim, features=32, dynamic_units=8, context_units=4, beta=1.0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(x_dim, features), nn.GELU())
        self.dynamics = TemporalNeurons(features, dynamic_units, prior="ar", beta=beta)
        self.context = Neurons(features, context_units, beta=beta)
        self.head = nn.Linear(dynamic_units + context_units, y_dim)
        self.raw_scale = nn.Parameter(torch.full((y_dim,), -1.0))  # softplus -> about 0.3

    def forward(self, x, y=None):
        """``x (B, T, D)``, ``y (B, T, y_dim)`` or ``None``; returns the observations."""
        num_steps = x.shape[-2]
        with data_plate(x.shape[0]):
            h = self.encoder(x)  # (B, T, F)
            z_t = self.dynamics(h)  # (..., B, T, H_t)
            z_s = self.context(h.mean(-2))  # (..., B, H_s)
            z_s = z_s.unsqueeze(-2).expand(z_s.shape[:-1] + (num_steps, z_s.shape[-1]))  # (..., B, T, H_s)
            loc = self.head(torch.cat([z_t, z_s], -1))  # (..., B, T, y_dim)
            scale = nn.functional.softplus(self.raw_scale)  # (y_dim,)
            # one observation per sequence in the data plate (dim -2): batch (..., B, 1), event (T, y_dim)
            fn = dist.Normal(loc.unsqueeze(-3), scale).to_event(2)
            obs = None if y is None else y.unsqueeze(-3)  # (B, 1, T, y_dim)
            return pyro.sample("obs", fn, obs=obs)


def train(net, x, y, steps, lr, log_every):
    """A plain SVI loop: the model, the guide built from it, stock optimiser and ELBO."""
    guide = vdn_pyro.NeuronGuide(net)
    svi = SVI(net, guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO())
    losses = []
    for step in range(steps):
        losses.append(svi.step(x, y) / x.shape[0])
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss per sequence {losses[-1]:10.3f}")
    return guide, losses


def main(args):
    """Train the model, print each temporal unit's learned AR coefficient, the unit report and
    the ArviZ summary and LOO; returns a dict of the results."""
    import arviz as az

    torch.set_num_threads(args.threads)  # small model: extra threads only add contention
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    x, y = make_data(args.sequences, args.steps_per_sequence, seed=args.seed)
    n_train = int(0.8 * len(x))
    (x_train, y_train), (x_test, y_test) = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    net = SequenceModel(
        x.shape[-1], y.shape[-1], args.features, args.dynamic_units, args.context_units, args.beta
    )
    guide, losses = train(net, x_train, y_train, args.train_steps, args.lr, args.log_every)

    phi = net.dynamics.prior.phi[:, 0].detach()  # (H_t,)
    print(f"\nLearned AR(1) coefficient per temporal unit (data: phi = {TRUE_PHI}):")
    print("  " + "  ".join(f"{v:+.2f}" for v in phi.tolist()))

    report = vdn_pyro.unit_report(net, x_test)
    columns = [
        c
        for c in ("site", "unit", "beta", "kl", "mi", "scale", "phi", "half_life", "status")
        if c in report.columns
    ]
    print("\nUnit report on the held-out sequences:")
    print(report[columns].to_string(index=False, float_format="{:.3f}".format))

    idata = vdn_pyro.to_inference_data(
        net, x_test, y_test, num_samples=args.num_samples, chains=2, seed=args.seed
    )
    summary = az.summary(idata, var_names=[net.context.site], coords={"obs": [0]}, kind="stats")
    print(f"\nArviZ summary of {net.context.site!r}, first held-out sequence (one row per unit):")
    print(summary.to_string())
    loo = az.loo(idata)
    # each sequence has latents of its own, so PSIS's Pareto k run high: read the estimate as a
    # comparison between models on the same data (az.compare), not as an absolute
    print("\nPSIS-LOO on the held-out sequences (one point per sequence):")
    print(loo)
    return {
        "losses": losses,
        "phi": phi,
        "report": report,
        "summary": summary,
        "loo": loo,
        "network": net,
        "guide": guide,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=320, help="sequences N (80%% train)")
    parser.add_argument("--steps-per-sequence", type=int, default=32, help="time steps T")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--dynamic-units", type=int, default=8)
    parser.add_argument("--context-units", type=int, default=4)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--train-steps", type=int, default=1000, help="SVI steps (full batch)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-samples", type=int, default=200, help="draws per chain for ArviZ")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (the smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sequences, args.steps_per_sequence, args.train_steps = 40, 8, 30
        args.features, args.dynamic_units, args.context_units = 8, 4, 2
        args.num_samples, args.log_every = 20, 0
    return args


if __name__ == "__main__":
    main(parse_args())

r"""A distributional recurrent network for token sequences, with a per-unit AR prior over time.

At every step t = 0, ..., T-1 the network reads the input token :math:`x_t` (the previous token;
:math:`x_0` is the start boundary) and emits the target :math:`y_t` (= :math:`x_{t+1}`):

.. math::

    h_t &= \mathrm{GRU}\big([e(x_t), z_{t-1}],\, h_{t-1}\big), \qquad h_{-1} = 0,\ z_{-1} = 0,\\
    p(z_{i,t} \mid z_{i,t-1}, h_t) &= \mathcal{N}\big(\phi_i z_{i,t-1} + (W h_t + c)_i,\
        s_i^2\big), \qquad \phi_i = \tanh(\mathrm{raw}_i) \in (-1, 1),\\
    p(y_t \mid h_t, z_t) &= \mathrm{Categorical}\big(\mathrm{softmax}(V [h_t, z_t] + b)\big),\\
    q(z_{i,t} \mid h_t, y_t) &= \mathcal{N}\big(\mu_i(h_t, y_t), \sigma_i(h_t, y_t)^2\big)
        \quad\text{(see :class:`~vdn_pyro.guides.RecurrentPosterior`)}, \quad\text{or, with
        ``posterior="path"``,}\\
    q(z_{i,t} \mid z_{i,t-1}, h_t, y) &= \mathcal{N}\big(a_{i,t} z_{i,t-1} + b_{i,t},\
        s_{i,t}^2\big) \quad\text{(see :class:`~vdn_pyro.guides.RecurrentPathPosterior`)}.

:math:`h_t` is the deterministic state that has read every earlier token and latent, so this is
the variational RNN (VRNN) of Chung et al. (2015) with a per-unit AR(1) part in each unit's prior.
In the notation "prior p(z_t | z_{t-1}, h_{t-1}), posterior q(z_t | h_{t-1}, x_t), emission of
x_t" the state index is shifted by one: here :math:`h_t` is the state *before* the token
:math:`y_t` is emitted. The posterior must read the token its step emits (``y_t``); reading only
the input ``x_t``, which :math:`h_t` already holds, would leave the latents nothing to carry.

Pyro structure: the network is a :class:`~vdn_pyro.models.NeuronNetwork` whose ``forward`` is the
model. The H units of a step are one :class:`~vdn_pyro.models.Neurons` layer (k = 1, site
``"<name>.z"``), called once per step inside ``pyro.markov`` with the conditional prior above (and,
in the guide, the posterior) handed in: a data plate (dim -2, size N with subsampling) and one
neuron site ``"<name>.z.<t>"`` per step (batch ``(B, H)``, event ``(1,)``, unit plate at dim -1,
the layer's per-unit ``beta`` on both sides), masked with :func:`pyro.poutine.mask` where a row
is padding. :math:`\phi_i` and :math:`s_i` are an :class:`~vdn_pyro.models.ARPrior`'s (the
layer's prior, :class:`RecurrentARPrior`), so the AR constraints and diagnostics read them. The
tokens are one observed site ``"obs"`` (batch ``(B, 1)``, event ``(T,)``, padding masked). The
guide (:class:`~vdn_pyro.guides.NeuronGuide`) runs the same pass with the layer sampling its
posterior.

``posterior="path"`` replaces the per-step posterior by a Gauss-Markov chain over the whole
sequence: its coefficients :math:`(a_t, b_t, s_t)` read the forward state :math:`h_t` and a backward
GRU state over the targets :math:`y_t, \dots, y_{L-1}` of the row, and the guide samples step t at
the same site ``"<name>.z.<t>"``, so the per-step analytic KL, masking, every ELBO and every tool
work unchanged (the sum of the per-step KLs given the drawn past is an unbiased estimate of the
path KL).

``deterministic=True`` builds the plain GRU (or LSTM) language model of the same width:
:math:`h_t = \mathrm{GRU}(e(x_t), h_{t-1})`, :math:`p(y_t \mid h_t)`, no latents and an empty guide.
``ar=False`` fixes every :math:`\phi_i = 0` (the same network without per-unit AR priors).
"""

import dataclasses
import math
import numbers
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import kl_divergence
from torch.nn.functional import log_softmax

from vdn_pyro.data.text import BOUNDARY_ID, PAD, trim_padding
from vdn_pyro.guides.recurrent import RecurrentPathPosterior, RecurrentPosterior
from vdn_pyro.models.base import NeuronNetwork
from vdn_pyro.models.neurons import Neurons
from vdn_pyro.models.priors import ARPrior
from vdn_pyro.primitives import as_beta, current_neuron_mode, data_plate
from vdn_pyro.unit_status import StatusThresholds, classify_units, mutual_information

__all__ = [
    "CELLS",
    "LATENT_MODES",
    "POSTERIORS",
    "RecurrentARPrior",
    "RecurrentVDN",
    "RecurrentVDNConfig",
    "SequenceEvaluation",
    "SequenceScores",
    "evaluate_sequences",
    "negative_elbo",
]

CELLS = ("gru", "lstm")
#: The posterior families of :class:`RecurrentVDN`: per step (:class:`~vdn_pyro.guides.RecurrentPosterior`)
#: or a Gauss-Markov chain over the path (:class:`~vdn_pyro.guides.RecurrentPathPosterior`).
POSTERIORS = ("step", "path")
#: How :meth:`RecurrentVDN.score` draws the latents: from the posterior, the posterior mean path,
#: the prior (ancestral samples along the observed tokens), the prior mean path, or zeros.
LATENT_MODES = ("posterior", "posterior_mean", "prior", "prior_mean", "zeros")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass
class RecurrentVDNConfig:
    """Everything that defines a :class:`RecurrentVDN`; every option has a default that runs.

    :ivar int vocab_size: number of token ids V (boundary included).
    :ivar int embed_dim: width of the input token embedding.
    :ivar int hidden: width of the deterministic recurrent state.
    :ivar int units: number of distributional units H per step.
    :ivar str cell: ``"gru"`` or ``"lstm"``.
    :ivar bool ar: learn a per-unit AR coefficient phi; ``False`` fixes phi = 0.
    :ivar float init_phi: initial phi of every unit, in (-1, 1).
    :ivar float prior_scale: initial innovation scale s of every unit.
    :ivar float prior_scale_min: lower bound of s.
    :ivar bool residual_posterior: posterior mean = prior mean + a learned shift (for
        ``posterior="path"``: transition = phi + a learned shift, offset = prior drive + a shift).
    :ivar str posterior: ``"step"`` (q(z_t | h_t, y_t), the default) or ``"path"`` (a Gauss-Markov
        chain over the sequence whose coefficients read the whole target sequence).
    :ivar int posterior_context: width of the path posterior's backward GRU (``"path"`` only).
    :ivar int posterior_token_dim: width of the posterior's token embedding.
    :ivar float scale_min: posterior scale lower clamp.
    :ivar float scale_max: posterior scale upper clamp.
    :ivar float init_scale: initial posterior scale.
    :ivar beta: KL coefficient, a positive number or a sequence of length H.
    :ivar bool deterministic: the plain GRU/LSTM language model of the same width (no latents).
    :ivar int boundary_id: the id that starts (in x) and ends (in y) every sequence.
    :ivar str name: prefix of the site names, ``"<name>.z.<t>"``.
    """

    vocab_size: int
    embed_dim: int = 32
    hidden: int = 128
    units: int = 32
    cell: str = "gru"
    ar: bool = True
    init_phi: float = 0.5
    prior_scale: float = 1.0
    prior_scale_min: float = 1e-2
    residual_posterior: bool = True
    posterior: str = "step"
    posterior_context: int = 32
    posterior_token_dim: int = 16
    scale_min: float = 1e-3
    scale_max: float = 5.0
    init_scale: float = 0.5
    beta: Any = 1.0
    deterministic: bool = False
    boundary_id: int = BOUNDARY_ID
    name: str = "rnn"

    def __post_init__(self):
        for field in (
            "vocab_size",
            "embed_dim",
            "hidden",
            "units",
            "posterior_token_dim",
            "posterior_context",
        ):
            value = getattr(self, field)
            if not _is_int(value):
                raise TypeError(f"Expected {field} to be an int >= 1, but got {value!r}.")
            if value < 1:
                raise ValueError(f"Expected {field} >= 1, but got {value}.")
        if self.vocab_size < 2:
            raise ValueError(f"Expected vocab_size >= 2 (boundary and one token), got {self.vocab_size}.")
        if self.cell not in CELLS:
            raise ValueError(f"Expected cell in {CELLS}, but got {self.cell!r}.")
        if not isinstance(self.posterior, str) or self.posterior not in POSTERIORS:
            raise ValueError(f"Expected posterior in {POSTERIORS}, but got {self.posterior!r}.")
        if not -1 < self.init_phi < 1:
            raise ValueError(f"Expected init_phi in (-1, 1), but got {self.init_phi}.")
        if not 0 < self.prior_scale_min < self.prior_scale:
            raise ValueError(
                "Expected 0 < prior_scale_min < prior_scale, but got "
                f"prior_scale_min={self.prior_scale_min}, prior_scale={self.prior_scale}."
            )
        if not _is_int(self.boundary_id) or not 0 <= self.boundary_id < self.vocab_size:
            raise ValueError(f"Expected boundary_id in [0, {self.vocab_size}), but got {self.boundary_id!r}.")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Expected name to be a non-empty str, but got {self.name!r}.")
        self.beta = as_beta(self.beta, self.units)


class RecurrentARPrior(ARPrior):
    r"""Per-unit prior of one step: :math:`p(z_{i,t} \mid z_{i,t-1}, h_t) =
    \mathcal{N}(\phi_i z_{i,t-1} + (W h_t + c)_i,\ s_i^2)`.

    An :class:`~vdn_pyro.models.ARPrior` of order 1 for H units (k = 1) whose constant is replaced
    by the learned input :math:`W h_t + c` from the deterministic state. :math:`\phi_i =
    \tanh(\mathrm{raw}_i)` (clamped to :math:`\pm(1 - 10^{-6})`, so :math:`|\phi_i| < 1` even at
    saturation) is the unit's own memory, with half-life :math:`\log 0.5 / \log|\phi_i|` steps when
    the input drive is constant; :math:`s_i` is the innovation scale, kept above ``scale_min``.
    :attr:`phi` (``(H, 1)``), :attr:`scale`, :attr:`half_life`, ``set_phi`` and
    ``clamp_half_life`` are the ``ARPrior``'s; called as an ``ARPrior`` it gives the stationary
    marginal without the input drive.

    :param int state_features: width F of :math:`h_t`.
    :param int units: number of units H.
    :param bool ar: learn phi; ``False`` fixes phi = 0 (a buffer).
    :param float init_phi: initial phi.
    :param float init_scale: initial s.
    :param float scale_min: lower bound of s.
    """

    def __init__(self, state_features, units, ar=True, init_phi=0.5, init_scale=1.0, scale_min=1e-2):
        if not _is_int(units) or units < 1:
            raise ValueError(f"Expected units to be an int >= 1, but got {units!r}.")
        if not -1 < init_phi < 1:
            raise ValueError(f"Expected init_phi in (-1, 1), but got {init_phi}.")
        if not 0 < scale_min < init_scale:
            raise ValueError(f"Expected 0 < scale_min < init_scale, got {scale_min} and {init_scale}.")
        super().__init__(
            units,
            1,
            1,
            phi=init_phi if ar else 0.0,
            scale=init_scale - scale_min,
            learn_phi=bool(ar),
            learn_constant=False,  # the input W h_t + c takes the constant's place
        )
        self.ar, self.scale_min = bool(ar), float(scale_min)
        self.input = nn.Linear(state_features, units)

    @property
    def scale(self):
        """Innovation scale per unit, ``(H,)``, above ``scale_min``."""
        return super().scale + self.scale_min

    def loc(self, z_prev, state):
        """Prior mean: ``z_prev`` ``(..., B, H)``, ``state`` ``(..., B, F)`` -> ``(..., B, H)``."""
        return self.step(z_prev, state)[0]

    def step(self, z_prev, state):
        """The prior's ``(loc, scale)`` at one step, each ``(..., B, H)``.

        :param torch.Tensor z_prev: ``(..., B, H)`` the units' previous latents.
        :param torch.Tensor state: ``(..., B, F)`` the deterministic state :math:`h_t`.
        """
        return _ar_step(self.phi[:, 0], self.scale, self.input, z_prev, state)


def _ar_step(phi, scale, drive, z_prev, state):
    """:meth:`RecurrentARPrior.step` with its parameters given: ``phi``, ``scale`` ``(H,)``,
    ``drive`` the input :math:`W h_t + c`."""
    loc = phi * z_prev + drive(state)  # (..., B, H)
    return loc, scale.expand(loc.shape)


def _advance(embed, cell, state, token, z_prev=None):
    """:meth:`RecurrentVDN.advance` with the submodules given: ``(..., B, S)`` -> ``(..., B, S)``."""
    inp = embed(token)  # (B, E)
    lead = state.shape[:-1]
    if z_prev is not None:
        lead = torch.broadcast_shapes(lead, z_prev.shape[:-1])
    inp = inp.expand(lead + inp.shape[-1:])  # (..., B, E)
    if z_prev is not None:
        inp = torch.cat([inp, z_prev.expand(lead + z_prev.shape[-1:])], -1)  # (..., B, E + H)
    size = state.shape[-1]
    flat_in = inp.reshape(-1, inp.shape[-1])  # (N, E [+ H])
    flat_state = state.expand(lead + (size,)).reshape(-1, size)  # (N, S)
    if isinstance(cell, nn.LSTMCell):
        h, c = cell(flat_in, tuple(flat_state.chunk(2, -1)))
        new = torch.cat([h, c], -1)  # (N, 2 * hidden)
    else:
        new = cell(flat_in, flat_state)  # (N, hidden)
    return new.reshape(lead + (size,))  # (..., B, S)


def _emit(emission, h, z=None):
    """:meth:`RecurrentVDN.logits` with the emission given: ``(..., B, hidden)`` -> ``(..., B, V)``."""
    if z is not None:
        lead = torch.broadcast_shapes(h.shape[:-1], z.shape[:-1])
        h = torch.cat([h.expand(lead + h.shape[-1:]), z.expand(lead + z.shape[-1:])], -1)  # (..., B, F+H)
    return emission(h)  # (..., B, V)


@dataclasses.dataclass
class SequenceScores:
    r"""Per-position terms of one pass of :meth:`RecurrentVDN.score` over S draws of the latents.

    :ivar torch.Tensor log_lik: ``(S, B, T)`` :math:`\log p(y_t \mid h_t, z_t)`, 0 at padding.
    :ivar torch.Tensor log_prior: ``(S, B, T)`` :math:`\sum_i \log p(z_{i,t} \mid \cdot)`
        (0 for the deterministic network and at padding).
    :ivar torch.Tensor log_q: ``(S, B, T)`` :math:`\sum_i \log q(z_{i,t} \mid \cdot)` (only for
        ``latents="posterior"``, else 0).
    :ivar torch.Tensor kl: ``(S, B, T, H)`` analytic per-unit :math:`\mathrm{KL}(q \| p)` given
        the sampled past (only for the posterior modes, else 0).
    :ivar torch.Tensor loc: ``(S, B, T, H)`` posterior means (posterior modes only, else 0).
    :ivar torch.Tensor scale: ``(S, B, T, H)`` posterior scales (posterior modes only, else 0).
    :ivar torch.Tensor mask: ``(B, T)`` real (non-padding) positions.
    """

    log_lik: torch.Tensor
    log_prior: torch.Tensor
    log_q: torch.Tensor
    kl: torch.Tensor
    loc: torch.Tensor
    scale: torch.Tensor
    mask: torch.Tensor


class RecurrentVDN(NeuronNetwork):
    r"""A distributional recurrent network for token sequences (see the module docstring).

    Data are teacher-forcing pairs ``x``, ``y`` of long ids, each ``(B, T)``, right-padded with
    :data:`~vdn_pyro.data.text.PAD` (-1) at the same positions (build them with
    :func:`~vdn_pyro.data.text.encode_texts`). Trailing all-padding columns are trimmed per batch.

    The negative ELBO it defines (``beta`` = 1) bounds the per-sequence NLL:

    .. math:: -\log p(y) \le \sum_t \mathbb{E}_q\big[-\log p(y_t \mid h_t, z_t)\big]
              + \sum_{t,i} \beta_i\, \mathbb{E}_q\,\mathrm{KL}\big(q(z_{i,t} \mid \cdot)
              \,\|\, p(z_{i,t} \mid z_{i,t-1}, h_t)\big).

    ``net.model`` is the network itself (its ``forward``), ``net.guide`` a
    :class:`~vdn_pyro.guides.NeuronGuide` of it; both take ``(x, y, num_data=None)``.

    :param vocabulary: a :class:`~vdn_pyro.data.text.Vocabulary` (used by :meth:`generate`) or
        the number of token ids V.
    :param options: any other :class:`RecurrentVDNConfig` field, or ``config=``.

    >>> net = RecurrentVDN(5, hidden=8, units=4)
    >>> x = torch.tensor([[0, 1, 2], [0, 3, -1]])
    >>> y = torch.tensor([[1, 2, 0], [3, 0, -1]])
    >>> tr = pyro.poutine.trace(net.guide).get_trace(x, y)
    >>> tr.nodes["rnn.z.1"]["value"].shape
    torch.Size([2, 4, 1])
    """

    def __init__(self, vocabulary, **options):
        super().__init__()
        if _is_int(vocabulary):
            self.vocabulary, vocab_size = None, int(vocabulary)
        elif hasattr(vocabulary, "size") and hasattr(vocabulary, "decode"):
            self.vocabulary, vocab_size = vocabulary, int(vocabulary.size)
        else:
            raise TypeError(
                f"Expected a Vocabulary or an int vocabulary size, but got {type(vocabulary).__name__}."
            )
        config = options.pop("config", None) or RecurrentVDNConfig(vocab_size, **options)
        if config.vocab_size != vocab_size:
            raise ValueError(f"config.vocab_size={config.vocab_size} but the vocabulary has {vocab_size}.")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        latent = 0 if c.deterministic else c.units
        cell = nn.GRUCell if c.cell == "gru" else nn.LSTMCell
        self.cell = cell(c.embed_dim + latent, c.hidden)
        self.state_size = c.hidden * (2 if c.cell == "lstm" else 1)
        if not c.deterministic:
            prior = RecurrentARPrior(
                c.hidden, c.units, c.ar, c.init_phi if c.ar else 0.0, c.prior_scale, c.prior_scale_min
            )
            if c.posterior == "path":
                posterior = RecurrentPathPosterior(
                    c.hidden,
                    c.vocab_size,
                    c.units,
                    c.posterior_token_dim,
                    c.posterior_context,
                    c.residual_posterior,
                    c.scale_min,
                    c.scale_max,
                    c.init_scale,
                )
            else:
                posterior = RecurrentPosterior(
                    c.hidden,
                    c.vocab_size,
                    c.units,
                    c.posterior_token_dim,
                    c.residual_posterior,
                    c.scale_min,
                    c.scale_max,
                    c.init_scale,
                )
            self.z = Neurons(
                posterior.in_features,
                c.units,
                prior=prior,
                posterior=posterior,
                beta=c.beta,
                name=f"{c.name}.z",
            )
        self.emission = nn.Linear(c.hidden + latent, c.vocab_size)

    # ------------------------------------------------------------------ info
    @property
    def units(self):
        """Number of distributional units H per step (0 when deterministic)."""
        return 0 if self.deterministic else self.config.units

    def _layer(self, what):
        if self.deterministic:
            raise AttributeError(f"The deterministic RecurrentVDN has no latent units, hence no {what}.")
        return self.z

    @property
    def prior(self):
        """The units' :class:`RecurrentARPrior` (the layer's prior; deterministic: none)."""
        return self._layer("prior").prior

    @property
    def posterior(self):
        """The units' :class:`~vdn_pyro.guides.RecurrentPosterior` (the layer's head)."""
        return self._layer("posterior").posterior

    @property
    def beta(self):
        """The layer's KL coefficient buffer ``(H,)``: update it in place to steer the units."""
        return self._layer("beta").beta

    def site(self, t):
        """Name of the latent site of step ``t``: ``"<name>.z.<t>"``."""
        return f"{self.config.name}.z.{t}"

    @property
    def num_parameters(self):
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---------------------------------------------------------------- checks
    def _check_ids(self, name, ids):
        if not torch.is_tensor(ids):
            raise TypeError(f"Expected {name} to be a torch.Tensor of token ids, got {type(ids).__name__}.")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"Expected {name} to hold integer token ids, but got {ids.dtype}; use .long().")
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"Expected {name} of shape (B, T) with B, T >= 1, but got {tuple(ids.shape)}.")
        v = self.config.vocab_size
        if int(ids.min()) < PAD or int(ids.max()) >= v:
            raise ValueError(
                f"Expected {name} ids in [0, {v}) or padding {PAD}, but got values in "
                f"[{int(ids.min())}, {int(ids.max())}]. The network was built with vocab_size={v}."
            )

    def check_inputs(self, x, y=None):
        """Raise ``TypeError``/``ValueError`` if ``x``/``y`` cannot be used.

        :param torch.Tensor x: ``(B, T)`` input ids, right-padded with -1.
        :param y: ``None`` or ``(B, T)`` target ids padded at the same positions.
        """
        self._check_ids("x", x)
        mask = x != PAD  # (B, T)
        if y is not None:
            self._check_ids("y", y)
            if y.shape != x.shape:
                raise ValueError(f"Expected y of shape {tuple(x.shape)} like x, but got {tuple(y.shape)}.")
            if not bool((mask == (y != PAD)).all()):
                raise ValueError("Expected x and y to be padded (-1) at the same positions.")
        if not bool(mask[:, 0].all()):
            raise ValueError("Expected every row to have at least one position, but a row is all padding.")
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError("Expected padding only at the end of each row (right-padding), but found a gap.")

    def _prepare(self, x, y):
        """Check, trim trailing padding and zero the padded ids: ``(x, y or None, mask)``."""
        self.check_inputs(x, y)
        has_y = y is not None
        x, y = trim_padding(x, y if has_y else x)  # (B, T_b)
        mask = y != PAD  # (B, T_b)
        # padded ids become 0: every use of a padded position is masked out or lies after the row ends
        return x.clamp_min(0), y.clamp_min(0) if has_y else None, mask

    # -------------------------------------------------------------- pieces
    def initial_state(self, batch, device=None):
        """Zero recurrent state ``(B, S)`` (S = hidden, or 2 * hidden for the LSTM)."""
        return torch.zeros(batch, self.state_size, device=device)

    def readout(self, state):
        """The part of the state the heads read: ``(..., B, S) -> (..., B, hidden)``."""
        return state[..., : self.config.hidden]

    def advance(self, state, token, z_prev=None):
        r"""One recurrent update :math:`h_t = \mathrm{cell}([e(x_t), z_{t-1}], h_{t-1})`.

        :param state: ``(..., B, S)``. :param token: ``(B,)`` input ids (no padding).
        :param z_prev: ``(..., B, H)`` previous latents, or ``None`` when deterministic.
        :returns: the new state ``(..., B, S)``.
        """
        return _advance(self.embed, self.cell, state, token, z_prev)

    def logits(self, h, z=None):
        """Emission logits: ``h`` ``(..., B, hidden)``, ``z`` ``(..., B, H)`` -> ``(..., B, V)``."""
        return _emit(self.emission, h, z)

    # ---------------------------------------------------------------- model
    def forward(self, x, y=None, *, num_data=None):
        """The model: per-unit AR priors, recurrence and categorical emission. Run as the
        :attr:`guide`, each step's units sample their posterior instead, which reads the targets.

        :param torch.Tensor x: ``(B, T)`` input ids (right-padded with -1).
        :param y: ``(B, T)`` target ids, or ``None`` to sample each next token given the
            observed prefix ``x`` (the guide needs ``y``).
        :param int num_data: number of sequences N in the full data set (scales by N/B).
        :returns: the tokens ``(..., B, T_b)`` (-1 at padding); ``None`` in the guide.
        """
        x, y, mask = self._prepare(x, y)
        mode = current_neuron_mode()
        infer = mode != "model" and not self.deterministic  # the units need their posterior
        if infer and y is None:
            raise ValueError("The guide q(z_t | h_t, y_t) reads the targets: pass y (B, T).")
        batch, steps = x.shape
        # each read of a submodule or parameter is a Pyro param statement: read once per pass
        embed, cell, emission = self.embed, self.cell, self.emission
        if not self.deterministic:
            layer, prior = self.z, self.prior
            phi, s, drive = prior.phi[:, 0], prior.scale, prior.input  # (H,), (H,), W h + c
            posterior = self.posterior if infer else None
            path = infer and self.config.posterior == "path"
            context = posterior.context(y, mask) if path else None  # (B, T, C): reads all of y
        state = self.initial_state(batch, x.device)  # (B, S)
        z = None if self.deterministic else torch.zeros(batch, self.units, device=x.device)  # (B, H)
        logits = []
        with data_plate(batch, num_data, x.device):
            for t in pyro.markov(range(steps)):
                state = _advance(embed, cell, state, x[:, t], z)  # (..., B, S)
                h = self.readout(state)  # (..., B, hidden)
                if not self.deterministic:
                    if path:  # the drive is read once: by the prior and by the residual chain
                        p_drive = drive(h)  # (..., B, H)
                        p_loc, p_scale = phi * z + p_drive, s.expand(p_drive.shape)  # (..., B, H) each
                    else:
                        p_loc, p_scale = _ar_step(phi, s, drive, z, h)  # (..., B, H) each
                    # the step's conditional prior: batch (..., B, H), event (1,)
                    fn = dist.Normal(p_loc.unsqueeze(-1), p_scale.unsqueeze(-1)).to_event(1)
                    real = mask[:, t, None]  # (B, 1)
                    q = None
                    if path:  # the Gauss-Markov chain's step: N(a_t z_{t-1} + b_t, s_t^2)
                        loc, scale = posterior.step(h, context[:, t], z, phi, p_drive)  # (..., B, H) each
                    elif infer:
                        loc, scale = posterior.step(h, y[:, t], p_loc)  # (..., B, H) each
                    if infer:
                        if not bool(real.all()):  # q = p where a row has ended: zero KL, even unmasked
                            loc, scale = torch.where(real, loc, p_loc), torch.where(real, scale, p_scale)
                        q = loc.unsqueeze(-1), scale.unsqueeze(-1)  # (..., B, H, 1) each
                    with poutine.mask(mask=real):
                        z = layer(h, step=t, prior=fn, posterior=q)  # (..., B, H)
                if mode != "guide":  # the guide has no observation: it stops at the latents
                    logits.append(_emit(emission, h, z))  # (..., B, V)
            if mode == "guide":
                return None
            logits = torch.stack(logits, -2).unsqueeze(-3)  # (..., B, 1, T, V)
            fn = dist.Categorical(logits=logits).mask(mask.unsqueeze(-2)).to_event(1)  # batch (..., B, 1)
            obs = None if y is None else y.unsqueeze(-2)  # (B, 1, T)
            out = pyro.sample("obs", fn, obs=obs)  # (..., B, 1, T)
        return torch.where(mask, out.squeeze(-2), PAD)  # (..., B, T)

    # ------------------------------------------------------------- analysis
    @torch.no_grad()
    def score(self, x, y, latents="posterior", num_samples=1):
        """Per-position log-likelihoods and latent terms along the observed tokens, in plain
        PyTorch (no Pyro bookkeeping), for evaluation.

        :param torch.Tensor x: ``(B, T)``. :param torch.Tensor y: ``(B, T)``.
        :param str latents: one of :data:`LATENT_MODES`: ``"posterior"`` (samples from q, the
            ELBO's and importance sampling's proposal), ``"posterior_mean"`` (z = loc of q along
            the mean path), ``"prior"`` (ancestral prior samples given the observed tokens),
            ``"prior_mean"`` or ``"zeros"``.
        :param int num_samples: S draws of the latents (rows are repeated S times).
        :returns: a :class:`SequenceScores`.
        """
        if latents not in LATENT_MODES:
            raise ValueError(f"Expected latents in {LATENT_MODES}, but got {latents!r}.")
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"Expected num_samples to be an int >= 1, but got {num_samples!r}.")
        x, y, mask = self._prepare(x, y)
        batch, steps = x.shape
        xs, ys = x.repeat(num_samples, 1), y.repeat(num_samples, 1)  # (S * B, T)
        state = self.initial_state(xs.shape[0], x.device)  # (S * B, S_state)
        units = self.units
        z = None if self.deterministic else torch.zeros(xs.shape[0], units, device=x.device)  # (S * B, H)
        zero = torch.zeros(xs.shape[0], device=x.device)  # (S * B,)
        path = latents.startswith("posterior") and not self.deterministic and self.config.posterior == "path"
        context = self.posterior.context(ys, mask.repeat(num_samples, 1)) if path else None  # (S * B, T, C)
        log_lik, log_prior, log_q, kls, locs, scales = [], [], [], [], [], []
        for t in range(steps):
            state = self.advance(state, xs[:, t], z)  # (S * B, S_state)
            h = self.readout(state)  # (S * B, hidden)
            lp, lq = zero, zero
            kl = q_loc = q_scale = torch.zeros(xs.shape[0], units, device=x.device)  # (S * B, H)
            if not self.deterministic:
                p_loc, p_scale = self.prior.step(z, h)  # (S * B, H)
                prior = dist.Normal(p_loc, p_scale)
                if latents.startswith("posterior"):
                    if path:  # the chain's step N(a_t z_{t-1} + b_t, s_t^2) given the drawn past
                        phi, drive = self.prior.phi[:, 0], self.prior.input(h)  # (H,), (S * B, H)
                        q_loc, q_scale = self.posterior.step(h, context[:, t], z, phi, drive)  # (S * B, H)
                    else:
                        q_loc, q_scale = self.posterior.step(h, ys[:, t], p_loc)
                    post = dist.Normal(q_loc, q_scale)
                    kl = kl_divergence(post, prior)  # (S * B, H)
                    z = post.sample() if latents == "posterior" else q_loc  # (S * B, H)
                    if latents == "posterior":
                        lq = post.log_prob(z).sum(-1)  # (S * B,)
                elif latents == "prior":
                    z = prior.sample()  # (S * B, H)
                elif latents == "prior_mean":
                    z = p_loc
                else:
                    z = torch.zeros_like(p_loc)
                lp = prior.log_prob(z).sum(-1)  # (S * B,)
            ll = log_softmax(self.logits(h, z), -1).gather(-1, ys[:, t, None]).squeeze(-1)  # (S * B,)
            log_lik.append(ll)
            log_prior.append(lp)
            log_q.append(lq)
            kls.append(kl)
            locs.append(q_loc)
            scales.append(q_scale)
        m = mask.to(state.dtype)  # (B, T)

        def stack(parts):
            out = torch.stack(parts, 1).reshape((num_samples, batch, steps) + parts[0].shape[1:])
            return out * m.reshape(m.shape + (1,) * (out.dim() - 3))  # (S, B, T[, H])

        return SequenceScores(
            stack(log_lik), stack(log_prior), stack(log_q), stack(kls), stack(locs), stack(scales), mask
        )

    @torch.no_grad()
    def sample_ids(self, num, max_len=32, temperature=1.0):
        """Sample sequences step by step from the prior and the emission.

        :param int num: number of sequences.
        :param int max_len: most positions per sequence (a sequence that has not emitted the end
            boundary by then is cut).
        :param float temperature: divides the emission logits (< 1 is more conservative).
        :returns: long tensor ``(num, max_len)``: the ids, the end boundary, then -1.
        """
        for name, value in [("num", num), ("max_len", max_len)]:
            if not _is_int(value) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        if not (isinstance(temperature, numbers.Real) and temperature > 0):
            raise ValueError(f"Expected temperature > 0, but got {temperature!r}.")
        device = self.emission.weight.device
        token = torch.full((num,), self.config.boundary_id, dtype=torch.long, device=device)  # (N,)
        state = self.initial_state(num, device)  # (N, S)
        z = None if self.deterministic else torch.zeros(num, self.units, device=device)  # (N, H)
        out = torch.full((num, max_len), PAD, dtype=torch.long, device=device)  # (N, L)
        done = torch.zeros(num, dtype=torch.bool, device=device)  # (N,)
        for t in range(max_len):
            state = self.advance(state, token, z)  # (N, S)
            h = self.readout(state)  # (N, hidden)
            if not self.deterministic:
                z = dist.Normal(*self.prior.step(z, h)).sample()  # (N, H)
            token = dist.Categorical(logits=self.logits(h, z) / temperature).sample()  # (N,)
            out[:, t] = torch.where(done, PAD, token)
            done = done | (token == self.config.boundary_id)
            if bool(done.all()):
                break
        return out

    def generate(self, num=20, max_len=32, temperature=1.0, vocabulary=None):
        """Sample ``num`` strings from the network (latents from the prior, step by step).

        :param int num: number of strings.
        :param int max_len: most characters + 1 per string.
        :param float temperature: emission temperature.
        :param vocabulary: decodes the ids (default: the network's own).
        :returns: a list of ``num`` str.
        """
        vocabulary = vocabulary or self.vocabulary
        if vocabulary is None:
            raise ValueError(
                "generate needs a vocabulary to decode ids: build the network from a Vocabulary or "
                "pass vocabulary=; sample_ids returns the raw ids."
            )
        return [vocabulary.decode(row) for row in self.sample_ids(num, max_len, temperature)]


# ------------------------------------------------------------------ evaluation
@dataclasses.dataclass
class SequenceEvaluation:
    r"""Held-out scores of a :class:`RecurrentVDN`; every NLL is in nats per predicted position
    (character or end boundary); :meth:`bits` converts.

    :ivar int num_sequences: number of sequences.
    :ivar int num_chars: number of predicted positions.
    :ivar float nll: the model's NLL: exact for the deterministic network, else the importance-
        sampled estimate :math:`-\log \frac1K\sum_k p(y, z^k)/q(z^k \mid y)` with K =
        :attr:`num_samples` (an upper bound in expectation that tightens as K grows).
    :ivar float nll_bound: the negative ELBO (every ``beta`` = 1) per position, an upper bound
        (equal to :attr:`nll` for the deterministic network).
    :ivar int num_samples: K.
    :ivar float reconstruction: :math:`\mathbb{E}_q[-\log p(y \mid z)]` per position.
    :ivar float kl: total KL per position (all units).
    :ivar dict replaced: NLL per position with the latents replaced by ``"prior"`` samples (drawn
        ancestrally along the observed tokens), ``"posterior_mean"``, ``"zeros"`` and
        ``"prior_mean"``: the expected log loss of the emission when it sees those latents.
    :ivar numpy.ndarray unit_kl: ``(H,)`` KL per unit per position (nats).
    :ivar numpy.ndarray unit_kl_time: ``(T, H)`` mean KL per unit at step t over the sequences
        that reach step t.
    :ivar numpy.ndarray time_counts: ``(T,)`` number of sequences that reach each step.
    :ivar numpy.ndarray unit_loc_sq: ``(H,)`` mean posterior loc^2 over positions.
    :ivar numpy.ndarray unit_scale: ``(H,)`` mean posterior scale over positions.
    :ivar numpy.ndarray unit_mi: ``(H,)`` mutual information (nats) between a position's context
        and the unit's latent under the aggregate posterior over positions (see
        :func:`~vdn_pyro.inference.mutual_information`).
    :ivar numpy.ndarray status: ``(H,)`` unit status from
        :func:`~vdn_pyro.inference.classify_units` (``living``, ``dead``, ...), with ``dead``
        meaning KL per position below ``kl_threshold``.
    :ivar numpy.ndarray phi: ``(H,)`` AR coefficients.
    """

    num_sequences: int
    num_chars: int
    nll: float
    nll_bound: float
    num_samples: int = 0
    reconstruction: float = math.nan
    kl: float = 0.0
    replaced: dict = dataclasses.field(default_factory=dict)
    unit_kl: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    unit_kl_time: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))
    time_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    unit_loc_sq: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    unit_scale: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    unit_mi: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    status: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=object))
    phi: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))

    @staticmethod
    def bits(value):
        """Nats to bits."""
        return value / math.log(2)

    @property
    def units(self):
        """Number of units H (0 for the deterministic network)."""
        return self.unit_kl.shape[0]

    def increase(self, mode):
        """Relative NLL increase when the latents are replaced: ``replaced[mode] / nll - 1``.

        :param str mode: a key of :attr:`replaced`.
        """
        if mode not in self.replaced:
            raise ValueError(f"Expected mode in {sorted(self.replaced)}, but got {mode!r}.")
        return self.replaced[mode] / self.nll - 1

    @property
    def latent_share(self):
        """Share of the code length sent through the latents, ``kl / nll_bound`` (bits-back: the
        ELBO spends :attr:`kl` nats per position on the latent channel)."""
        return self.kl / self.nll_bound if self.units else 0.0

    def living(self, threshold=0.01):
        """Boolean ``(H,)``: units whose KL per position exceeds ``threshold`` nats."""
        return self.unit_kl > threshold


@torch.no_grad()
def negative_elbo(network, x, y, *, num_samples=1, batch_size=512):
    """The negative ELBO (every ``beta`` = 1) per predicted position, in nats: an upper bound on
    the NLL per position (the exact NLL for the deterministic network). Cheap enough to track a
    validation set during training.

    :param RecurrentVDN network: the network.
    :param torch.Tensor x: ``(N, T)``. :param torch.Tensor y: ``(N, T)``.
    :param int num_samples: posterior draws averaged per sequence.
    :param int batch_size: sequences per pass.
    :returns: a float.
    """
    network.check_inputs(x, y)
    was_training = network.training
    network.eval()
    total = 0.0
    try:
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            scores = network.score(xb, yb, "posterior", num_samples)
            total += float((scores.kl.sum(-1) - scores.log_lik).sum()) / num_samples
    finally:
        network.train(was_training)
    return total / int((y != PAD).sum())


def evaluate_sequences(
    network, x, y, *, num_samples=64, replace_samples=8, batch_size=256, kl_threshold=0.01, seed=0
):
    """Held-out NLL, ELBO bound and latent-reliance measures of a :class:`RecurrentVDN`.

    :param RecurrentVDN network: the network.
    :param torch.Tensor x: ``(N, T)``. :param torch.Tensor y: ``(N, T)``.
    :param int num_samples: K importance samples per sequence for :attr:`SequenceEvaluation.nll`.
    :param int replace_samples: latent draws averaged for the ``"prior"`` replacement.
    :param int batch_size: sequences per pass (each pass holds ``K * batch_size`` rows).
    :param float kl_threshold: a unit with less KL per position (nats) is ``dead``.
    :param int seed: seed of the mutual-information draws.
    :returns: a :class:`SequenceEvaluation`.
    """
    network.check_inputs(x, y)
    num_chars = int((y != PAD).sum())
    was_training = network.training
    network.eval()
    try:
        if network.deterministic:
            nll = -sum(
                float(network.score(x[i : i + batch_size], y[i : i + batch_size]).log_lik.sum())
                for i in range(0, x.shape[0], batch_size)
            )
            return SequenceEvaluation(x.shape[0], num_chars, nll / num_chars, nll / num_chars)
        return _evaluate_latent(
            network, x, y, num_chars, num_samples, replace_samples, batch_size, kl_threshold, seed
        )
    finally:
        network.train(was_training)


@torch.no_grad()
def _evaluate_latent(network, x, y, num_chars, num_samples, replace_samples, batch_size, kl_threshold, seed):
    units, steps = network.units, x.shape[1]
    replacements = [m for m in LATENT_MODES if m != "posterior"]
    totals = dict.fromkeys(["is", "recon", "kl"] + replacements, 0.0)
    unit_kl_time = torch.zeros(steps, units)  # (T, H)
    counts = torch.zeros(steps)  # (T,)
    locs, scales = [], []
    for start in range(0, x.shape[0], batch_size):
        xb, yb = trim_padding(x[start : start + batch_size], y[start : start + batch_size])
        post = network.score(xb, yb, "posterior", num_samples)
        log_w = (post.log_lik + post.log_prior - post.log_q).sum(-1)  # (K, B)
        totals["is"] -= float((torch.logsumexp(log_w, 0) - math.log(num_samples)).sum())
        totals["recon"] -= float(post.log_lik.sum(-1).mean(0).sum())
        kl = post.kl.mean(0)  # (B, T, H)
        totals["kl"] += float(kl.sum())
        unit_kl_time[: xb.shape[1]] += kl.sum(0)
        counts[: xb.shape[1]] += post.mask.sum(0)
        locs.append(post.loc[0][post.mask])  # (n, H): one draw's path, real positions
        scales.append(post.scale[0][post.mask])  # (n, H)
        for mode in replacements:
            scores = network.score(xb, yb, mode, replace_samples if mode == "prior" else 1)
            totals[mode] -= float(scores.log_lik.sum(-1).mean(0).sum())
    unit_kl = unit_kl_time.sum(0) / num_chars  # (H,)
    loc, scale = torch.cat(locs), torch.cat(scales)  # (P, H) over all P real positions
    mi = mutual_information(loc, scale, generator=torch.Generator().manual_seed(seed))  # (H,)
    loc_sq, scale_mean = (loc**2).mean(0), scale.mean(0)  # (H,)
    status = classify_units(
        unit_kl.numpy(),
        mi.numpy(),
        loc_sq.numpy(),
        scale_mean.numpy(),
        network.prior.scale.detach().numpy(),
        loc_high=math.inf,  # these units have no loc^2 band: none is flagged as exploding
        scale_floor=network.config.scale_min,
        thresholds=StatusThresholds(dead_kl=kl_threshold),
    )
    return SequenceEvaluation(
        num_sequences=x.shape[0],
        num_chars=num_chars,
        nll=totals["is"] / num_chars,
        nll_bound=(totals["recon"] + totals["kl"]) / num_chars,
        num_samples=num_samples,
        reconstruction=totals["recon"] / num_chars,
        kl=totals["kl"] / num_chars,
        replaced={m: totals[m] / num_chars for m in replacements},
        unit_kl=unit_kl.numpy(),
        unit_kl_time=(unit_kl_time / counts.clamp_min(1)[:, None]).numpy(),
        time_counts=counts.numpy(),
        unit_loc_sq=loc_sq.numpy(),
        unit_scale=scale_mean.numpy(),
        unit_mi=mi.numpy(),
        status=status,
        phi=network.prior.phi[:, 0].detach().cpu().numpy(),
    )

r"""The guide side of a distributional recurrent layer: a per-unit amortized posterior per step."""

import numbers

import torch
from torch import nn

from vdn_pyro.guides.amortized import AmortizedNormal

__all__ = ["RecurrentPosterior"]


class RecurrentPosterior(AmortizedNormal):
    r"""Per-unit amortized posterior of one step of a distributional recurrent layer,

    .. math:: q(z_{i,t} \mid h_t, y_t) = \mathcal{N}\big(m_{i,t} + \mu_i([h_t, e(y_t)]),\;
              \sigma_i([h_t, e(y_t)])^2\big),

    where :math:`h_t` is the deterministic recurrent state before step t emits its token
    :math:`y_t`, :math:`e` is the posterior's own token embedding, :math:`\mu_i, \sigma_i` are
    unit i's heads (this :class:`~vdn_pyro.guides.AmortizedNormal`, with input-dependent scale,
    reading the features :math:`[h_t, e(y_t)]`), and :math:`m_{i,t}` is the prior mean of the unit
    at this step when ``residual=True`` (the posterior then only learns how far to move away from
    the prior, as in SRNN's residual parametrisation; the posterior then also depends on
    :math:`z_{i,t-1}`), else 0.

    It is the posterior head of the :class:`~vdn_pyro.models.Neurons` layer of a
    :class:`~vdn_pyro.models.RecurrentVDN` (latent dim k = 1): called as an ``AmortizedNormal`` it
    maps features ``(..., B, F + E)`` to ``(loc, scale)`` ``(..., B, H, 1)``; :meth:`step` builds
    the features from the state and the token and adds the prior mean.

    :param int state_features: width F of the state :math:`h_t`.
    :param int vocab_size: number of token ids V.
    :param int units: number of units H.
    :param int token_dim: width E of the token embedding.
    :param bool residual: add the prior mean to the posterior mean.
    :param float scale_min: lower clamp of the posterior scale.
    :param float scale_max: upper clamp of the posterior scale.
    :param float init_scale: initial posterior scale.
    """

    def __init__(
        self,
        state_features,
        vocab_size,
        units,
        token_dim=16,
        residual=True,
        scale_min=1e-3,
        scale_max=5.0,
        init_scale=0.5,
    ):
        for name, value in [
            ("state_features", state_features),
            ("vocab_size", vocab_size),
            ("token_dim", token_dim),
        ]:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        embed = nn.Embedding(vocab_size, token_dim)  # drawn before the heads, as it always was
        super().__init__(state_features + token_dim, units, 1, "input", scale_min, scale_max, init_scale)
        self.state_features, self.residual = state_features, bool(residual)
        self.embed = embed

    def features(self, state, token):
        """What the heads read: ``[h_t, e(y_t)]``.

        :param torch.Tensor state: ``(..., B, F)``.
        :param torch.Tensor token: ``(B,)`` ids of the tokens this step emits (no padding).
        :returns: ``(..., B, F + E)``.
        """
        feats = self.embed(token)  # (B, E)
        feats = feats.expand(state.shape[:-1] + feats.shape[-1:])  # (..., B, E)
        return torch.cat([state, feats], -1)  # (..., B, F + E)

    def step(self, state, token, prior_loc=None):
        """Posterior parameters of every unit at one step.

        :param torch.Tensor state: ``(..., B, F)`` with F = ``state_features``.
        :param torch.Tensor token: ``(B,)`` ids of the tokens this step emits (no padding).
        :param prior_loc: ``(..., B, H)`` prior mean (needed when ``residual=True``).
        :returns: ``(loc, scale)``, each ``(..., B, H)``.
        """
        if self.residual and prior_loc is None:
            raise ValueError("A residual posterior needs prior_loc; pass the prior mean of this step.")
        loc, scale = self(self.features(state, token))  # (..., B, H, 1) each
        loc, scale = loc.squeeze(-1), scale.squeeze(-1)  # (..., B, H)
        if self.residual:
            loc = loc + prior_loc
        return loc, scale

r"""The guide side of a distributional recurrent layer: a per-unit amortized posterior per step,
or a Gauss-Markov path posterior over the whole sequence."""

import numbers

import torch
from torch import nn

from vdn_pyro.guides.amortized import AmortizedNormal

__all__ = ["RecurrentPathPosterior", "RecurrentPosterior"]


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


class RecurrentPathPosterior(AmortizedNormal):
    r"""Gauss-Markov path posterior of a distributional recurrent layer: every unit's latents over
    the whole sequence form a first-order Gauss-Markov chain whose coefficients read the whole
    target sequence,

    .. math::

        q(z_{i,t} \mid z_{i,t-1}, h_t, y) = \mathcal{N}\big(a_{i,t} z_{i,t-1} + b_{i,t},\
            s_{i,t}^2\big), \qquad z_{i,-1} = 0,

    with :math:`(a_t, b_t, s_t) = f([h_t, g_t])`: :math:`h_t` the forward state (the tokens
    before step t and the sampled latents), :math:`g_t` a backward GRU state over the posterior's
    own embedding of the targets :math:`y_t, y_{t+1}, \dots, y_{L-1}` of the row (L its length:
    right-padding is skipped, so :math:`g_t` reads exactly the row's future, the token step t
    emits included). Given :math:`h`, the path is a :class:`~vdn_pyro.distributions.GaussMarkov`
    chain with transition :math:`a_t`, offset :math:`b_t` and scale :math:`s_t` (tridiagonal
    precision, steps correlated through :math:`a_t`), sampled step by step at the layer's per-step
    sites; the per-step Gaussian KL against the conditional prior, summed over steps, is an
    unbiased estimate of :math:`\mathrm{KL}(q(z_{1:T}) \,\|\, p(z_{1:T}))`.

    With ``residual=True`` the chain is centred on the conditional prior
    :math:`\mathcal{N}(\phi_i z_{i,t-1} + (W h_t + c)_i, \cdot)`:
    :math:`a_{i,t} = \phi_i + \tanh(\alpha_i)`, :math:`b_{i,t} = (W h_t + c)_i + \beta_i`,
    with the heads :math:`\alpha, \beta` reading :math:`[h_t, g_t]`; else :math:`a_{i,t} =
    \tanh(\alpha_i)`, :math:`b_{i,t} = \beta_i`. The transition head starts at zero (the chain
    starts with the prior's own AR coefficient, or none). The scale head is an
    :class:`~vdn_pyro.guides.AmortizedNormal`'s input-dependent scale, the offset head its loc.

    :param int state_features: width F of the forward state :math:`h_t`.
    :param int vocab_size: number of token ids V.
    :param int units: number of units H.
    :param int token_dim: width E of the posterior's token embedding.
    :param int context_dim: width C of the backward GRU state :math:`g_t`.
    :param bool residual: centre the chain on the conditional prior (see above).
    :param float scale_min: lower clamp of :math:`s_t`.
    :param float scale_max: upper clamp of :math:`s_t`.
    :param float init_scale: initial :math:`s_t`.
    """

    def __init__(
        self,
        state_features,
        vocab_size,
        units,
        token_dim=16,
        context_dim=32,
        residual=True,
        scale_min=1e-3,
        scale_max=5.0,
        init_scale=0.5,
    ):
        for name, value in [
            ("state_features", state_features),
            ("vocab_size", vocab_size),
            ("token_dim", token_dim),
            ("context_dim", context_dim),
        ]:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        super().__init__(state_features + context_dim, units, 1, "input", scale_min, scale_max, init_scale)
        self.state_features, self.context_dim, self.residual = state_features, context_dim, bool(residual)
        self.embed = nn.Embedding(vocab_size, token_dim)
        self.backward_rnn = nn.GRU(token_dim, context_dim, batch_first=True)
        self.transition = nn.Linear(state_features + context_dim, units)
        nn.init.zeros_(self.transition.weight)
        nn.init.zeros_(self.transition.bias)

    def context(self, y, mask):
        r"""The backward states :math:`g_t` of every row: :math:`g_t` has read
        :math:`y_{L-1}, \dots, y_t` (L the row's length), nothing of the padding.

        :param torch.Tensor y: ``(B, T)`` target ids (padded positions any valid id).
        :param torch.Tensor mask: ``(B, T)`` bool, real positions (right-padded rows).
        :returns: ``(B, T, C)``; rows at padded positions hold states that are never used.
        """
        lengths = mask.sum(-1, keepdim=True)  # (B, 1)
        steps = torch.arange(y.shape[-1], device=y.device)  # (T,)
        # reverse each row's real part in place, padding stays behind it: index L-1-t for t < L
        order = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (B, T), an involution
        reversed_y = y.gather(-1, order)  # (B, T)
        states, _ = self.backward_rnn(self.embed(reversed_y))  # (B, T, C)
        return states.gather(-2, order.unsqueeze(-1).expand_as(states))  # (B, T, C)

    def coefficients(self, state, context, phi=None, drive=None):
        r"""The chain's coefficients :math:`(a_t, b_t, s_t)` of every unit at one step.

        :param torch.Tensor state: ``(..., B, F)`` the forward state :math:`h_t`.
        :param torch.Tensor context: ``(B, C)`` the backward state :math:`g_t`.
        :param phi: ``(H,)`` the prior's AR coefficients (needed when ``residual=True``).
        :param drive: ``(..., B, H)`` the prior's input :math:`W h_t + c` (needed when
            ``residual=True``).
        :returns: ``(a, b, s)``, each ``(..., B, H)``.
        """
        if self.residual and (phi is None or drive is None):
            raise ValueError("A residual path posterior needs the prior's phi and drive W h_t + c.")
        context = context.expand(state.shape[:-1] + context.shape[-1:])  # (..., B, C)
        features = torch.cat([state, context], -1)  # (..., B, F + C)
        offset, scale = self(features)  # (..., B, H, 1) each
        offset, scale = offset.squeeze(-1), scale.squeeze(-1)  # (..., B, H)
        transition = torch.tanh(self.transition(features))  # (..., B, H)
        if self.residual:
            transition, offset = phi + transition, drive + offset
        return transition, offset, scale

    def step(self, state, context, z_prev, phi=None, drive=None):
        """Posterior ``(loc, scale)`` of every unit at one step given the previous latents.

        :param torch.Tensor state: ``(..., B, F)``. :param torch.Tensor context: ``(B, C)``.
        :param torch.Tensor z_prev: ``(..., B, H)`` the previous step's latents (0 at t = 0).
        :param phi: ``(H,)``. :param drive: ``(..., B, H)`` (see :meth:`coefficients`).
        :returns: ``(loc, scale)``, each ``(..., B, H)``: ``loc = a z_prev + b``.
        """
        transition, offset, scale = self.coefficients(state, context, phi, drive)
        return transition * z_prev + offset, scale  # (..., B, H) each

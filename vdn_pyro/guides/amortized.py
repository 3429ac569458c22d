r"""Amortized per-unit posteriors: the guide side of a layer of distributional neurons."""

import numbers

import torch
from torch import nn
from torch.nn.functional import softplus

from vdn_pyro.distributions import BroadcastNormal

__all__ = ["SCALE_MODES", "AmortizedNormal"]

SCALE_MODES = ("unit", "input")


class AmortizedNormal(nn.Module):
    r"""Per-unit amortized Normal posterior :math:`q(z_i \mid h) = \mathcal{N}(\mu_i(h),
    \sigma_i(h)^2)`.

    Each unit owns a row block of a linear loc head (and, with ``scale_mode="input"``, of a
    softplus scale head). Scales are clamped to ``[scale_min, scale_max]``.

    :param int in_features: width F of the features read by the heads.
    :param int units: number of units H.
    :param int latent_dim: latent dims k per unit.
    :param str scale_mode: ``"unit"`` (one learnable scale per unit and latent dim) or
        ``"input"`` (input-dependent, through a softplus).
    :param float scale_min: lower clamp of the scale.
    :param float scale_max: upper clamp of the scale.
    :param float init_scale: initial scale.
    """

    def __init__(
        self,
        in_features,
        units,
        latent_dim=1,
        scale_mode="unit",
        scale_min=1e-3,
        scale_max=10.0,
        init_scale=0.5,
    ):
        super().__init__()
        for name, value in [("in_features", in_features), ("units", units), ("latent_dim", latent_dim)]:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Expected {name} to be an int >= 1, got {type(value).__name__}.")
            if value < 1:
                raise ValueError(f"Expected {name} >= 1, but got {value}.")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"Expected scale_mode in {SCALE_MODES}, but got {scale_mode!r}.")
        if not 0 < scale_min < init_scale < scale_max:
            raise ValueError(
                "Expected 0 < scale_min < init_scale < scale_max, but got "
                f"scale_min={scale_min}, init_scale={init_scale}, scale_max={scale_max}."
            )
        self.in_features, self.units, self.latent_dim = in_features, units, latent_dim
        self.scale_mode, self.scale_min, self.scale_max = scale_mode, scale_min, scale_max
        self.loc = nn.Linear(in_features, units * latent_dim)
        raw = torch.tensor(init_scale).expm1().log()
        if scale_mode == "unit":
            self.raw_scale = nn.Parameter(raw.expand(units, latent_dim).clone())  # (H, k)
        else:
            self.scale_head = nn.Linear(in_features, units * latent_dim)
            nn.init.zeros_(self.scale_head.weight)
            nn.init.constant_(self.scale_head.bias, float(raw))

    def forward(self, features, temporal=False, *, expand=True):
        """Posterior parameters.

        :param torch.Tensor features: ``(..., B, F)`` (static) or ``(..., B, T, F)`` (temporal).
        :param bool temporal: whether the second-to-last dim of ``features`` is time.
        :param bool expand: expand a per-unit scale (``scale_mode="unit"``) to ``loc``'s shape (a
            view); ``False`` keeps it as ``(H, k)`` or, temporal, ``(H, k, 1)``, which broadcasts
            against ``loc`` (what :meth:`dist_from` and the KLs work with best).
        :returns: ``(loc, scale)``, each ``(..., B, H, k)`` or ``(..., B, H, k, T)`` (the scale
            broadcastable to that with ``expand=False``).
        """
        if features.shape[-1] != self.in_features:
            raise ValueError(
                f"Expected features with last dim {self.in_features}, got {tuple(features.shape)}."
            )
        lead = features.shape[:-1]
        shape = lead + (self.units, self.latent_dim)
        loc = self.loc(features).reshape(shape)  # (B, [T,] H, k)
        if temporal:  # time goes last
            loc = torch.movedim(loc, -3, -1)  # (..., B, H, k, T)
        if self.scale_mode == "unit":  # clamp the (H, k) values, then broadcast them (no copy)
            scale = softplus(self.raw_scale).clamp(*self._bounds(self.raw_scale))  # (H, k)
            if temporal:
                scale = scale.unsqueeze(-1)  # (H, k, 1)
            if expand:
                scale = scale.expand(loc.shape)  # (..., B, H, k[, T])
        else:
            scale = softplus(self.scale_head(features)).reshape(shape)  # (B, [T,] H, k)
            scale = scale.clamp(*self._bounds(scale))
            if temporal:
                scale = torch.movedim(scale, -3, -1)  # (..., B, H, k, T)
        return loc, scale

    def _bounds(self, like):
        """``(scale_min, scale_max)`` as 0-dim tensors of ``like``'s dtype and device, kept:
        clamping to tensors leaves no Python number in the graph (each is a host-to-tensor copy
        in the clamp's backward)."""
        key = (like.dtype, like.device, self.scale_min, self.scale_max)
        kept = self.__dict__.get("_scale_bounds")
        if kept is None or kept[0] != key:
            bounds = tuple(torch.tensor(b, dtype=like.dtype, device=like.device) for b in key[2:])
            kept = self.__dict__["_scale_bounds"] = (key, bounds)
        return kept[1]

    def dist(self, features, temporal=False):
        """The posterior as a distribution: batch ``(..., B, H)``, event ``(k,)`` or
        ``(k, T)``."""
        loc, scale = self(features, temporal, expand=False)
        return self.dist_from(loc, scale, temporal)

    @staticmethod
    def moments(loc, scale):
        """Marginal means and scales from the parameters (for a Normal, the parameters), each
        ``(..., B, H, k[, T])``."""
        return loc, scale.expand(loc.shape)

    @staticmethod
    def dist_from(loc, scale, temporal=False):
        """The posterior from its parameters: ``loc (..., B, H, k[, T])`` and a ``scale``
        broadcastable to it; batch ``(..., B, H)``."""
        return BroadcastNormal(loc, scale).to_event(2 if temporal else 1)

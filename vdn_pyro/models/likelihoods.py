r"""Observation likelihoods for the network's head.

A likelihood turns the head's raw output of shape ``(..., out * m)`` (``m = head_multiplier``)
into a distribution whose event covers the trailing ``event_dims`` dims of the output, e.g.
``(out,)`` for static targets or ``(T, out)`` for temporal ones.
"""

import numbers

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn.functional import softplus

__all__ = [
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "GaussianLikelihood",
    "Likelihood",
    "StudentTLikelihood",
    "make_likelihood",
]


def _inv_softplus(x):
    x = torch.as_tensor(x, dtype=torch.get_default_dtype())
    return x + torch.log(-torch.expm1(-x))


class Likelihood(PyroModule):
    """Base class. Subclasses set :attr:`head_multiplier` and implement :meth:`forward`.

    :param int out_features: number of outputs (classes for :class:`CategoricalLikelihood`).
    """

    head_multiplier = 1
    #: whether targets are class labels of shape ``(...)`` rather than values ``(..., out)``
    categorical = False
    #: whether an instance-normalisation offset can be added to the location
    has_location = False

    def __init__(self, out_features):
        super().__init__()
        if isinstance(out_features, bool) or not isinstance(out_features, numbers.Integral):
            raise TypeError(f"Expected out_features to be an int, got {type(out_features).__name__}")
        if out_features < 1:
            raise ValueError(f"Expected out_features >= 1, but got {out_features}.")
        self.out_features = out_features

    @property
    def head_features(self):
        """Width of the linear head feeding this likelihood."""
        return self.out_features * self.head_multiplier

    def check_target(self, y, batch_shape):
        """Raise a clear error if ``y`` cannot be scored.

        :param torch.Tensor y: targets, ``batch_shape + (out,)`` (or ``batch_shape`` for labels).
        :param torch.Size batch_shape: expected leading shape, ``(B,)`` or ``(B, T)``.
        """
        if not torch.is_tensor(y):
            raise TypeError(f"Expected y to be a torch.Tensor, but got {type(y).__name__}.")
        expected = tuple(batch_shape) + (() if self.categorical else (self.out_features,))
        if tuple(y.shape) != expected:
            raise ValueError(
                f"Expected y of shape {expected} to match x, but got {tuple(y.shape)}. "
                "Check that x and y have the same batch (and time) sizes."
            )

    def forward(self, raw, offset=None, event_dims=1):
        raise NotImplementedError


class GaussianLikelihood(Likelihood):
    r""":math:`y \sim \mathcal{N}(\mu, \sigma^2)` per output.

    :param int out_features: number of outputs.
    :param scale: ``"learned"`` (one learnable scale per output), ``"heteroscedastic"`` (scale
        from the head through a softplus) or a positive number (fixed).
    :param float scale_min: lower bound added to the scale.
    """

    has_location = True

    def __init__(self, out_features, scale="learned", scale_min=1e-3, init_scale=1.0):
        super().__init__(out_features)
        self.scale_min = float(scale_min)
        if scale == "learned":
            self.raw_scale = nn.Parameter(_inv_softplus(torch.full((out_features,), init_scale)))
        elif scale == "heteroscedastic":
            self.head_multiplier = 2
        elif isinstance(scale, numbers.Real) and not isinstance(scale, bool) and scale > 0:
            self.register_buffer("raw_scale", _inv_softplus(torch.full((out_features,), scale)))
        else:
            raise ValueError(
                "Expected likelihood scale 'learned', 'heteroscedastic' or a positive number, "
                f"but got {scale!r}."
            )
        self.scale_mode = scale if isinstance(scale, str) else "fixed"

    def _loc_scale(self, raw, offset):
        if self.head_multiplier == 2:
            loc, raw_scale = raw.chunk(2, dim=-1)  # (..., out) each
            scale = softplus(raw_scale) + self.scale_min
        else:
            loc = raw
            scale = (softplus(self.raw_scale) + self.scale_min).expand_as(loc)  # (..., out)
        if offset is not None:
            loc = loc + offset
        return loc, scale

    def forward(self, raw, offset=None, event_dims=1):
        """:param raw: head output ``(..., out * m)``. :param offset: added to the location.
        :param int event_dims: trailing dims forming the event.
        :returns: ``Normal(...).to_event(event_dims)``."""
        loc, scale = self._loc_scale(raw, offset)
        return dist.Normal(loc, scale).to_event(event_dims)


class StudentTLikelihood(GaussianLikelihood):
    r"""Student-t per output with a learned degrees of freedom :math:`\nu > 1` per output.

    :param float init_df: initial degrees of freedom.
    """

    def __init__(self, out_features, scale="learned", scale_min=1e-3, init_df=5.0):
        super().__init__(out_features, scale=scale, scale_min=scale_min)
        self.raw_df = nn.Parameter(_inv_softplus(torch.full((out_features,), init_df - 1.0)))

    def forward(self, raw, offset=None, event_dims=1):
        loc, scale = self._loc_scale(raw, offset)
        df = (softplus(self.raw_df) + 1.0).expand_as(loc)  # (..., out)
        return dist.StudentT(df, loc, scale).to_event(event_dims)


class BernoulliLikelihood(Likelihood):
    """Independent Bernoulli outputs with logits from the head; targets in {0, 1}."""

    def check_target(self, y, batch_shape):
        super().check_target(y, batch_shape)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("Expected binary targets in {0, 1} for the Bernoulli likelihood.")

    def forward(self, raw, offset=None, event_dims=1):
        return dist.Bernoulli(logits=raw).to_event(event_dims)


class CategoricalLikelihood(Likelihood):
    """A categorical label with ``out_features`` classes; targets are integer labels."""

    categorical = True

    def check_target(self, y, batch_shape):
        super().check_target(y, batch_shape)
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError(f"Expected integer class labels for y, but got dtype {y.dtype}.")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.out_features):
            raise ValueError(
                f"Expected class labels in [0, {self.out_features}), but got values in "
                f"[{int(y.min())}, {int(y.max())}]."
            )

    def forward(self, raw, offset=None, event_dims=1):
        # labels have no output dim, so the event loses one dim
        return dist.Categorical(logits=raw).to_event(event_dims - 1)


_LIKELIHOODS = {
    "gaussian": GaussianLikelihood,
    "student_t": StudentTLikelihood,
    "bernoulli": BernoulliLikelihood,
    "categorical": CategoricalLikelihood,
}


def make_likelihood(name, out_features, **options):
    """Build a likelihood from its name: one of ``gaussian``, ``student_t``, ``bernoulli``,
    ``categorical``."""
    if name not in _LIKELIHOODS:
        raise ValueError(f"Expected likelihood in {sorted(_LIKELIHOODS)}, but got {name!r}.")
    return _LIKELIHOODS[name](out_features, **options)

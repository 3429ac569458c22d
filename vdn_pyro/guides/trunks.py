r"""Trunk encoders: deterministic feature extractors shared by all units of the first layer.

A trunk maps raw input ``(..., D)`` to features ``(..., F)`` and exposes ``out_features = F``.
Trunks with instance normalisation also return, through :meth:`offset`, the value subtracted from
each input window, so the model can add it back at the head.
"""

import numbers

from torch import nn
from torch.nn import functional

__all__ = ["DLinearTrunk", "MLPTrunk", "instance_offset", "make_activation"]

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
_INSTANCE_NORMS = (None, "last", "mean")


def make_activation(name):
    """Return a fresh activation module from its name (``gelu``, ``identity``, ``relu``,
    ``silu``, ``tanh``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"Expected activation in {sorted(_ACTIVATIONS)}, but got {name!r}.")
    return _ACTIVATIONS[name]()


def instance_offset(x, mode):
    """The per-window offset used by instance normalisation.

    :param torch.Tensor x: windows ``(..., L)``.
    :param mode: ``None`` (no offset), ``"last"`` (the window's last value) or ``"mean"``.
    :returns: ``(..., 1)`` tensor, or ``None`` when ``mode`` is ``None``.
    """
    if mode is None:
        return None
    if mode == "last":
        return x[..., -1:]  # (..., 1)
    return x.mean(-1, keepdim=True)  # (..., 1)


def _check_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"Expected {name} to be an int >= {minimum}, but got {value!r}.")


def _check_norm(mode):
    if mode not in _INSTANCE_NORMS:
        raise ValueError(f"Expected instance_norm in {_INSTANCE_NORMS}, but got {mode!r}.")


class MLPTrunk(nn.Module):
    """A multilayer perceptron. With ``hidden=()`` it is the identity.

    :param int in_features: input width D.
    :param tuple hidden: hidden widths; the last is ``out_features``.
    :param str activation: activation after every hidden layer.
    :param instance_norm: ``None``, ``"last"`` or ``"mean"``: subtract a per-row offset first.
    """

    def __init__(self, in_features, hidden=(64,), activation="gelu", instance_norm=None):
        super().__init__()
        _check_int(in_features, "in_features")
        for h in hidden:
            _check_int(h, "every hidden width")
        _check_norm(instance_norm)
        self.instance_norm = instance_norm
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            width = h
        self.net = nn.Sequential(*layers)
        self.in_features, self.out_features = in_features, width

    def offset(self, x):
        """Instance-normalisation offset ``(..., 1)`` or ``None``."""
        return instance_offset(x, self.instance_norm)

    def forward(self, x):
        """:param x: ``(..., D)``. :returns: features ``(..., F)``."""
        off = self.offset(x)
        if off is not None:
            x = x - off
        return self.net(x)


class DLinearTrunk(nn.Module):
    r"""A DLinear-like window encoder: the window is split into a moving-average trend and the
    remainder, and each part is projected linearly,

    .. math:: f(x) = W_t\,\mathrm{MA}_k(x) + W_s\,(x - \mathrm{MA}_k(x)).

    :param int lookback: window length L (the input width).
    :param int out_features: feature width F.
    :param int kernel_size: moving-average length (odd; edges padded by repetition).
    :param instance_norm: ``"last"`` (default), ``"mean"`` or ``None``.
    """

    def __init__(self, lookback, out_features, kernel_size=25, instance_norm="last"):
        super().__init__()
        _check_int(lookback, "lookback")
        _check_int(out_features, "out_features")
        _check_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"Expected an odd kernel_size, but got {kernel_size}.")
        _check_norm(instance_norm)
        self.kernel_size, self.instance_norm = kernel_size, instance_norm
        self.trend = nn.Linear(lookback, out_features)
        self.season = nn.Linear(lookback, out_features)
        self.in_features, self.out_features = lookback, out_features

    def offset(self, x):
        """Instance-normalisation offset ``(..., 1)`` or ``None``."""
        return instance_offset(x, self.instance_norm)

    def moving_average(self, x):
        """Centred moving average with repeated edges: ``(..., L) -> (..., L)``."""
        pad = (self.kernel_size - 1) // 2
        shape = x.shape
        flat = x.reshape(-1, 1, shape[-1])  # (N, 1, L)
        flat = functional.pad(flat, (pad, pad), mode="replicate")  # (N, 1, L + 2 pad)
        trend = functional.avg_pool1d(flat, self.kernel_size, stride=1)  # (N, 1, L)
        return trend.reshape(shape)  # (..., L)

    def forward(self, x):
        """:param x: windows ``(..., L)``. :returns: features ``(..., F)``."""
        off = self.offset(x)
        if off is not None:
            x = x - off
        trend = self.moving_average(x)  # (..., L)
        return self.trend(trend) + self.season(x - trend)  # (..., F)

r"""Per-unit priors: the model side of a layer of distributional neurons.

Each prior is a :class:`~pyro.nn.PyroModule` whose ``forward(batch_shape, num_steps)`` returns a
distribution with batch shape ``batch_shape + (H,)`` and event shape ``(k,)`` (static latents,
``num_steps=None``) or ``(k, T)`` (temporal latents).
"""

import contextlib
import math
import numbers

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn.functional import softplus

from vdn_pyro.distributions import ARProcess, coeffs_to_pacf, pacf_to_coeffs

__all__ = ["ARPrior", "NormalPrior", "no_prior_cache"]


#: Whether priors whose parameters are constants (buffers, or parameters that need no gradient)
#: may hand out the distribution they built on an earlier call (see :class:`_Cached`).
_CACHE = [True]


@contextlib.contextmanager
def no_prior_cache():
    """Build every prior afresh inside the block (a graph capture must see the prior computed
    from the module's buffers, not a tensor kept from an earlier call)."""
    _CACHE.append(False)
    try:
        yield
    finally:
        _CACHE.pop()


class _Cached:
    """Mixin: keep the distribution a prior built last, and hand it out again while nothing it
    was built from has changed.

    A prior with fixed parameters builds the same distribution every step (an
    :class:`~vdn_pyro.distributions.ARProcess` solves its stationary start and the KL's
    constants once per instance). The cache key holds the call's arguments and the identity and
    in-place version counter of every parameter and buffer, so ``set_phi``, ``load_state_dict``,
    ``.to()`` or a replaced tensor all rebuild. Nothing is kept while a parameter requires a
    gradient (the distribution is then part of the step's graph).
    """

    def _cached(self, key, build):
        if not _CACHE[-1]:
            return build()
        state = tuple(
            t for t in list(self._parameters.values()) + list(self._buffers.values()) if t is not None
        )
        if any(t.requires_grad for t in state):
            return build()
        key = (key, self.__dict__.get("phi_range"))
        versions = tuple(t._version for t in state)
        hit = self.__dict__.get("_prior_cache")  # (key, tensors, versions, distribution)
        if (
            hit is not None
            and hit[0] == key
            and len(hit[1]) == len(state)
            and all(a is b for a, b in zip(hit[1], state))  # held, so an id cannot be reused
            and hit[2] == versions
        ):
            return hit[3]
        fn = build()
        self.__dict__["_prior_cache"] = (key, state, versions, fn)
        return fn

    def __getstate__(self):
        state = super().__getstate__()  # a copy of __dict__ (torch.nn.Module)
        state.pop("_prior_cache", None)  # pickles and deep copies rebuild it
        return state


def _check_units(units, latent_dim):
    if isinstance(units, bool) or not isinstance(units, numbers.Integral):
        raise TypeError(f"Expected units to be an int >= 1, but got {type(units).__name__}.")
    if units < 1:
        raise ValueError(f"Expected units >= 1, but got {units}.")
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, numbers.Integral):
        raise TypeError(f"Expected latent_dim to be an int >= 1, got {type(latent_dim).__name__}.")
    if latent_dim < 1:
        raise ValueError(f"Expected latent_dim >= 1, but got {latent_dim}.")


def _check_steps(num_steps):
    if num_steps is None:
        return
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"Expected num_steps to be None or an int >= 1, but got {num_steps!r}.")


def _inv_softplus(x):
    x = torch.as_tensor(x, dtype=torch.get_default_dtype())
    return x + torch.log(-torch.expm1(-x))


def _per_unit(value, units, name):
    value = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach().clone()
    if value.dim() == 0:
        value = value.expand(units).clone()  # (H,)
    if value.shape != (units,):
        raise ValueError(
            f"Expected {name} to be a number or have shape ({units},), got {tuple(value.shape)}."
        )
    return value


class NormalPrior(_Cached, PyroModule):
    r"""Independent :math:`\mathcal{N}(\mu_i, \sigma_i^2)` prior per unit, shared over latent dims
    and time steps.

    :param int units: number of units H.
    :param int latent_dim: latent dims k per unit.
    :param loc: prior mean, a number or tensor of shape ``(H,)``.
    :param scale: prior scale (> 0), a number or tensor of shape ``(H,)``.
    :param bool learnable: learn ``loc`` and ``scale`` (scale through a softplus).
    """

    def __init__(self, units, latent_dim=1, loc=0.0, scale=1.0, learnable=False):
        super().__init__()
        _check_units(units, latent_dim)
        self.units, self.latent_dim = units, latent_dim
        loc = _per_unit(loc, units, "loc")
        scale = _per_unit(scale, units, "scale")
        if not bool((scale > 0).all()):
            raise ValueError(f"Expected prior scale > 0, but got {scale.tolist()}.")
        if learnable:
            self.loc_param = nn.Parameter(loc)  # (H,)
            self.raw_scale = nn.Parameter(_inv_softplus(scale))  # (H,)
        else:
            self.register_buffer("loc_param", loc)
            self.register_buffer("raw_scale", _inv_softplus(scale))

    @property
    def loc(self):
        """Prior mean per unit, shape ``(H,)``."""
        return self.loc_param

    @property
    def scale(self):
        """Prior scale per unit, shape ``(H,)``."""
        return softplus(self.raw_scale)

    def forward(self, batch_shape=(), num_steps=None):
        """Return the prior over one layer's latents.

        :param tuple batch_shape: leading batch shape, e.g. ``(B,)``.
        :param num_steps: ``None`` for static latents, else the number of time steps T.
        :returns: distribution with batch ``batch_shape + (H,)``, event ``(k,)`` or ``(k, T)``.
        """
        _check_steps(num_steps)
        return self._cached((tuple(batch_shape), num_steps), lambda: self._build(batch_shape, num_steps))

    def _build(self, batch_shape, num_steps):
        shape = (self.units, self.latent_dim) + (() if num_steps is None else (num_steps,))
        extra = len(shape) - 1
        loc = self.loc.reshape((self.units,) + (1,) * extra).expand(shape)  # (H, k[, T])
        scale = self.scale.reshape((self.units,) + (1,) * extra).expand(shape)  # (H, k[, T])
        fn = dist.Normal(loc, scale).to_event(extra)
        return fn.expand(torch.Size(batch_shape) + (self.units,))


class ARPrior(_Cached, PyroModule):
    r"""A learnable stationary AR(p) prior per unit over the time steps of its latent.

    .. math:: z_{i,t} = c_i + \sum_{j=1}^p \phi_{i,j} z_{i,t-j} + s_i \epsilon_t,
              \quad \epsilon_t \sim \mathcal{N}(0, 1),

    with the first p steps drawn from the stationary marginal. Stationarity holds by construction:
    the coefficients are the Levinson-Durbin image of partial autocorrelations
    :math:`\kappa = \tanh(\text{raw})` (for p = 1 simply :math:`\phi = \tanh(\text{raw})`), or,
    with ``phi_range=(lo, hi)`` and p = 1, :math:`\phi = lo + (hi - lo)\,\sigma(\text{raw})`,
    which bounds each unit's memory (half-life :math:`\log 0.5 / \log|\phi|`).

    The k latent dims of a unit are independent processes sharing the unit's parameters. With
    static latents (``num_steps=None``) the prior is the stationary marginal Normal.

    :param int units: number of units H.
    :param int order: AR order p >= 1.
    :param int latent_dim: latent dims k per unit.
    :param phi: initial coefficient(s): a number (lag-1 value, higher lags 0), or a tensor of shape
        ``(H,)`` or ``(H, p)``. Must be stationary.
    :param constant: initial constant c, number or ``(H,)``.
    :param scale: initial innovation scale s; default :math:`\sqrt{1 - \phi^2}` for p = 1 (unit
        marginal variance) and 1 otherwise.
    :param bool learn_phi: learn the coefficients (else fixed).
    :param bool learn_constant: learn c.
    :param bool learn_scale: learn s.
    :param phi_range: optional ``(lo, hi)`` with ``-1 < lo < hi < 1`` bounding phi (p = 1 only).
    """

    def __init__(
        self,
        units,
        order=1,
        latent_dim=1,
        *,
        phi=0.5,
        constant=0.0,
        scale=None,
        learn_phi=True,
        learn_constant=True,
        learn_scale=True,
        phi_range=None,
    ):
        super().__init__()
        _check_units(units, latent_dim)
        if isinstance(order, bool) or not isinstance(order, numbers.Integral):
            raise TypeError(f"Expected AR order to be an int >= 1, got {type(order).__name__}.")
        if order < 1:
            raise ValueError(f"Expected AR order >= 1, but got {order}. Use NormalPrior for 0.")
        self.units, self.order, self.latent_dim = units, order, latent_dim
        coeffs = torch.as_tensor(phi, dtype=torch.get_default_dtype()).detach().clone()
        if coeffs.dim() == 0:
            coeffs = torch.cat([coeffs.expand(units, 1), torch.zeros(units, order - 1)], -1)
        elif coeffs.dim() == 1 and coeffs.shape[0] == units:
            coeffs = torch.cat([coeffs[:, None], torch.zeros(units, order - 1)], -1)  # (H, p)
        if coeffs.shape != (units, order):
            raise ValueError(
                f"Expected phi to be a number, shape ({units},) or ({units}, {order}), "
                f"but got shape {tuple(coeffs.shape)}."
            )
        if phi_range is not None:
            if order != 1:
                raise ValueError(f"phi_range bounds a single coefficient; got order={order}.")
            lo, hi = (float(v) for v in phi_range)
            if not -1.0 < lo < hi < 1.0:
                raise ValueError(f"Expected phi_range with -1 < lo < hi < 1, got {phi_range}.")
            inside = coeffs[:, 0].clamp(lo + 1e-4 * (hi - lo), hi - 1e-4 * (hi - lo))
            raw = torch.logit((inside - lo) / (hi - lo))[:, None]  # (H, 1)
            self.phi_range = (lo, hi)
        else:
            pacf = coeffs_to_pacf(coeffs)  # (H, p)
            if not bool((pacf.abs() < 1).all()):
                raise ValueError(f"Expected stationary initial AR coefficients, but got {coeffs.tolist()}.")
            raw = torch.atanh(pacf.clamp(-1 + 1e-6, 1 - 1e-6))  # (H, p)
            self.phi_range = None
        if scale is None:
            scale = (1 - coeffs[:, 0] ** 2).sqrt() if order == 1 else torch.ones(units)
        scale = _per_unit(scale, units, "scale")
        constant = _per_unit(constant, units, "constant")
        for name, value, learn in [
            ("raw_phi", raw, learn_phi),
            ("constant", constant, learn_constant),
            ("raw_scale", _inv_softplus(scale), learn_scale),
        ]:
            if learn:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @property
    def phi(self):
        """AR coefficients per unit, shape ``(H, p)``."""
        if self.phi_range is not None:
            lo, hi = self.phi_range
            return lo + (hi - lo) * torch.sigmoid(self.raw_phi)  # (H, 1)
        pacf = torch.tanh(self.raw_phi).clamp(-1 + 1e-6, 1 - 1e-6)  # saturation stays stationary
        return pacf_to_coeffs(pacf)  # (H, p)

    @property
    def scale(self):
        """Innovation scale per unit, shape ``(H,)``."""
        return softplus(self.raw_scale)

    @property
    def half_life(self):
        r"""Memory per unit in steps, shape ``(H,)``: :math:`\log 0.5 / \log \rho`, where
        :math:`\rho` is the largest root modulus of the AR polynomial (:math:`|\phi|` for p = 1)."""
        with torch.no_grad():
            phi = self.phi
            if self.order == 1:
                rho = phi[:, 0].abs()
            else:
                companion = torch.zeros(self.units, self.order, self.order, dtype=phi.dtype)
                companion[:, 0, :] = phi
                companion[:, 1:, :-1] = torch.eye(self.order - 1, dtype=phi.dtype)
                rho = torch.linalg.eigvals(companion).abs().amax(-1)  # (H,)
            return math.log(0.5) / torch.log(rho.clamp(1e-12, 1 - 1e-12))

    def process(self, batch_shape=(), num_steps=1):
        """The per-unit :class:`~vdn_pyro.distributions.ARProcess`, batch
        ``batch_shape + (H, k)``, event ``(T,)``."""
        k = self.latent_dim
        const = self.constant[:, None].expand(self.units, k)  # (H, k)
        coeffs = self.phi[:, None, :].expand(self.units, k, self.order)  # (H, k, p)
        scale = self.scale[:, None].expand(self.units, k)  # (H, k)
        fn = ARProcess(const, coeffs, scale, num_steps)
        return fn.expand(torch.Size(batch_shape) + (self.units, k))

    def forward(self, batch_shape=(), num_steps=None):
        """Return the prior over one layer's latents.

        :param tuple batch_shape: leading batch shape, e.g. ``(B,)``.
        :param num_steps: ``None`` for static latents (the stationary marginal), else T.
        :returns: distribution with batch ``batch_shape + (H,)``, event ``(k,)`` or ``(k, T)``.
        """
        _check_steps(num_steps)
        return self._cached((tuple(batch_shape), num_steps), lambda: self._build(batch_shape, num_steps))

    def _build(self, batch_shape, num_steps):
        if num_steps is None:
            proc = self.process((), 1)
            loc = proc.stationary_mean  # (H, k)
            scale = proc.autocovariance(1)[..., 0].sqrt()  # (H, k)
            fn = dist.Normal(loc, scale).to_event(1)
        else:
            fn = self.process((), num_steps).to_event(1)
        return fn.expand(torch.Size(batch_shape) + (self.units,))

    @torch.no_grad()
    def set_phi(self, phi):
        """Overwrite the AR coefficients in place, keeping the parameter object (an optimiser that
        holds ``raw_phi`` keeps working).

        With ``phi_range`` the lag-1 coefficient is clipped into the range.

        :param phi: stationary coefficients, a tensor of shape ``(H,)`` (p = 1) or ``(H, p)``.
        :raises ValueError: on a wrong shape or non-stationary coefficients.
        """
        coeffs = torch.as_tensor(phi, dtype=self.raw_phi.dtype, device=self.raw_phi.device)
        if coeffs.dim() == 1 and self.order == 1:
            coeffs = coeffs[:, None]  # (H, 1)
        if coeffs.shape != (self.units, self.order):
            raise ValueError(
                f"Expected phi of shape ({self.units}, {self.order}), but got {tuple(coeffs.shape)}."
            )
        if self.phi_range is not None:
            lo, hi = self.phi_range
            inside = coeffs[:, 0].clamp(lo + 1e-6 * (hi - lo), hi - 1e-6 * (hi - lo))  # (H,)
            raw = torch.logit((inside - lo) / (hi - lo))[:, None]  # (H, 1)
        else:
            pacf = coeffs_to_pacf(coeffs)  # (H, p)
            if not bool((pacf.abs() < 1).all()):
                raise ValueError(f"Expected stationary AR coefficients, but got {coeffs.tolist()}.")
            raw = torch.atanh(pacf.clamp(-1 + 1e-6, 1 - 1e-6))  # (H, p)
        self.raw_phi.copy_(raw)

    @torch.no_grad()
    def clamp_half_life(self, low, high):
        r"""Project each unit's memory into a band of half-lives, in place.

        A unit whose largest root modulus :math:`\rho` lies outside
        :math:`[0.5^{1/low}, 0.5^{1/high}]` has its coefficients rescaled,
        :math:`\phi_j \leftarrow c^j \phi_j` with :math:`c = \rho' / \rho`, which scales every
        root of the AR polynomial by :math:`c` (for p = 1: :math:`|\phi| \to \rho'` with its sign
        kept). The target :math:`\rho'` sits a relative 1e-4 inside the band in half-life, so
        rounding cannot leave it outside. Units inside the band are untouched.

        :param float low: lower half-life, ``> 0``.
        :param float high: upper half-life, ``> low`` and finite.
        :returns: the half-lives after the projection, shape ``(H,)``.
        """
        if not 0 < low < high < math.inf:
            raise ValueError(f"Expected 0 < low < high < inf, but got low={low}, high={high}.")
        phi = self.phi  # (H, p)
        rho = torch.exp(math.log(0.5) / self.half_life)  # (H,)
        rho_lo = 0.5 ** (1 / (low * (1 + 1e-4)))
        rho_hi = 0.5 ** (1 / (high * (1 - 1e-4)))
        target = rho.clamp(rho_lo, rho_hi)  # (H,)
        change = target != rho  # (H,)
        if bool(change.any()):
            dead = rho <= 1e-6  # all-zero coefficients: start from the lower edge of the band
            lags = torch.arange(1, self.order + 1, dtype=phi.dtype)  # (p,)
            factor = (target / rho.clamp_min(1e-6))[:, None] ** lags  # (H, p)
            new = torch.where(change[:, None], phi * factor, phi)  # (H, p)
            new[dead] = 0.0
            new[dead, 0] = target[dead]
            self.set_phi(new)
        return self.half_life

r"""The exact predictive of a roll-out: a path read from AR(1) latents, scored by a Kalman filter.

A forecast path :math:`y_{1:H}` whose steps each read one patch's latents,

.. math::

    y_h = \mu_h + w_h^\top d_{j(h)} + \sigma_h \varepsilon_h, \qquad j(h) = \lfloor h /
    \mathrm{patch} \rfloor, \qquad \varepsilon_h \sim \mathcal{N}(0, 1),

with U independent AR(1) deviations over the Q patches,

.. math::

    d_{i,1} \sim \mathcal{N}(0, v_i), \qquad d_{i,j+1} = \phi_i d_{i,j} + s_i \eta_{i,j},
    \qquad \eta_{i,j} \sim \mathcal{N}(0, 1),

is Gaussian, :math:`\mathcal{N}(\mu, \Sigma)` with :math:`\Sigma` an ``H x H`` matrix. Its density
costs :math:`O(H^3)` densely; :class:`PatchStateSpace` computes it exactly with a Kalman filter over
the Q patches at :math:`O(Q (U^3 + \mathrm{patch}^3))`, the cost of a few small matrices per patch.
This is the likelihood of :class:`~vdn_pyro.models.RolloutForecaster` with
``horizon_posterior="exact"``: its rolled latents integrated out in closed form.
"""

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vdn_pyro.distributions import GaussMarkov

__all__ = ["PatchStateSpace"]


def _check_param(name, value, dims):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(value).__name__}.")
    if value.dim() < dims:
        raise ValueError(f"Expected {name} with at least {dims} dims, but got shape {tuple(value.shape)}.")


class PatchStateSpace(dist.TorchDistribution):
    r"""Gaussian paths read, patch by patch, from U independent AR(1) latents (module docstring).

    :param torch.Tensor loc: the mean path :math:`\mu`, ``(*batch, H)``.
    :param torch.Tensor loading: each step's loadings :math:`w_h`, ``(H, U)`` (shared by the batch)
        or ``(*batch, H, U)``.
    :param int patch: steps per patch (step h reads patch ``h // patch``).
    :param torch.Tensor phi: the latents' AR coefficients, ``(U,)``.
    :param torch.Tensor innovation: their innovation scales :math:`s`, ``(U,)``.
    :param torch.Tensor start: the first patch's latent scales :math:`\sqrt{v}`, ``(*batch, U)``.
    :param torch.Tensor noise: each step's noise scale :math:`\sigma` (> 0), ``(*batch, H)``.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(self, loc, loading, patch, phi, innovation, start, noise, validate_args=None):
        for name, value, dims in [
            ("loc", loc, 1),
            ("loading", loading, 2),
            ("phi", phi, 1),
            ("innovation", innovation, 1),
            ("start", start, 1),
            ("noise", noise, 1),
        ]:
            _check_param(name, value, dims)
        horizon, units = loading.shape[-2:]
        if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
            raise ValueError(f"Expected patch to be an int >= 1, but got {patch!r}.")
        if loc.shape[-1] != horizon or noise.shape[-1] != horizon:
            raise ValueError(
                f"Expected loc and noise with H = {horizon} steps (loading's first dim), but got shapes "
                f"{tuple(loc.shape)} and {tuple(noise.shape)}."
            )
        if phi.shape != (units,) or innovation.shape != (units,) or start.shape[-1] != units:
            raise ValueError(
                f"Expected phi and innovation of shape ({units},) and start (*batch, {units}) (U = loading's "
                f"last dim), but got {tuple(phi.shape)}, {tuple(innovation.shape)} and {tuple(start.shape)}."
            )
        batch_shape = torch.broadcast_shapes(
            loc.shape[:-1], start.shape[:-1], noise.shape[:-1], loading.shape[:-2]
        )
        self.loc = loc.expand(batch_shape + (horizon,))
        self.noise = noise.expand(batch_shape + (horizon,))
        self.start = start.expand(batch_shape + (units,))
        self.loading, self.patch, self.phi, self.innovation = loading, patch, phi, innovation
        super().__init__(batch_shape, torch.Size([horizon]), validate_args=validate_args)

    @property
    def num_patches(self):
        """Q, the patches the H steps read."""
        return -(-self.event_shape[0] // self.patch)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        loading = self.loading
        if loading.dim() > 2:
            loading = loading.expand(batch_shape + loading.shape[-2:])
        return PatchStateSpace(
            self.loc.expand(batch_shape + self.event_shape),
            loading,
            self.patch,
            self.phi,
            self.innovation,
            self.start.expand(batch_shape + self.start.shape[-1:]),
            self.noise.expand(batch_shape + self.event_shape),
        )

    @property
    def mean(self):
        """The mean path, ``(*batch, H)``."""
        return self.loc

    def _rows(self, j):
        """The steps that read patch ``j``."""
        return slice(j * self.patch, min((j + 1) * self.patch, self.event_shape[0]))

    def log_prob(self, value):
        """Exact log density of paths ``value`` ``(*sample, *batch, H)`` by a Kalman filter over
        the patches: ``(*sample, *batch)``."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.loc.shape)
        resid = (value - self.loc).expand(shape)  # (..., H)
        lead = shape[:-1]
        units = self.loading.shape[-1]
        var = self.start.expand(lead + (units,)) ** 2  # (..., U)
        cov = torch.diag_embed(var)  # (..., U, U): the deviations' covariance before patch j
        mean = resid.new_zeros(lead + (units,))  # (..., U)
        noise_var = (self.noise * self.noise).expand(shape)  # (..., H)
        ar = self.phi[:, None] * self.phi[None, :]  # (U, U)
        step = torch.diag(self.innovation * self.innovation)  # (U, U)
        total = resid.new_zeros(lead)
        for j in range(self.num_patches):
            rows = self._rows(j)
            w = self.loading[..., rows, :]  # ([...,] n, U)
            gain_in = cov @ w.transpose(-1, -2)  # (..., U, n): Cov(d, y_j)
            s = w @ gain_in + torch.diag_embed(noise_var[..., rows])  # (..., n, n)
            tril = torch.linalg.cholesky(s)  # (..., n, n)
            innov = resid[..., rows] - (w @ mean.unsqueeze(-1)).squeeze(-1)  # (..., n)
            white = torch.linalg.solve_triangular(tril, innov.unsqueeze(-1), upper=False)  # (..., n, 1)
            n = w.shape[-2]
            total = total - 0.5 * white.square().sum((-1, -2)) - tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            total = total - 0.5 * n * math.log(2 * math.pi)
            if j + 1 == self.num_patches:
                break
            # update: K = Cov(d, y_j) S^-1, then predict the next patch's deviations
            gain = torch.cholesky_solve(gain_in.transpose(-1, -2), tril).transpose(-1, -2)  # (..., U, n)
            mean = mean + (gain @ innov.unsqueeze(-1)).squeeze(-1)  # (..., U)
            cov = cov - gain @ gain_in.transpose(-1, -2)  # (..., U, U)
            cov = 0.5 * (cov + cov.transpose(-1, -2))
            mean = mean * self.phi  # (..., U)
            cov = cov * ar + step  # (..., U, U)
        return total

    def rsample(self, sample_shape=()):
        """Draw paths: the AR deviations patch by patch, then the noise: ``(*sample, *batch, H)``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        units = self.loading.shape[-1]
        dev = self.start * torch.randn(shape + (units,), dtype=self.loc.dtype, device=self.loc.device)
        parts = []
        for j in range(self.num_patches):
            if j:
                eps = torch.randn_like(dev)
                dev = self.phi * dev + self.innovation * eps  # (*shape, U)
            w = self.loading[..., self._rows(j), :]  # ([*batch,] n, U)
            parts.append((w @ dev.unsqueeze(-1)).squeeze(-1))  # (*shape, n)
        moved = torch.cat(parts, -1)  # (*shape, H)
        eps = torch.randn(shape + self.event_shape, dtype=moved.dtype, device=moved.device)  # (*shape, H)
        return self.loc + moved + self.noise * eps

    def covariance_matrix_dense(self):
        r"""The dense covariance :math:`\Sigma`, ``(*batch, H, H)`` (the :math:`O(H^2 U)` reference
        the filter is checked against): each unit's deviations over the patches are a
        :class:`~vdn_pyro.distributions.GaussMarkov` chain (transition :math:`\phi_i`, scales
        :math:`\sqrt{v_i}, s_i, \dots, s_i`), read through the loadings."""
        q = self.num_patches
        scale = torch.cat(  # (*batch, U, Q): the first patch's spread, then the innovations'
            [self.start.unsqueeze(-1), self.innovation[:, None].expand(self.start.shape + (q - 1,))], -1
        )
        chain = GaussMarkov(self.phi[:, None].expand(scale.shape), torch.zeros_like(scale), scale)
        gram = chain.covariance_matrix  # (*batch, U, Q, Q)
        patch_of = torch.arange(self.event_shape[0], device=self.loc.device) // self.patch  # (H,)
        wide = gram[..., patch_of, :][..., patch_of]  # (*batch, U, H, H)
        cov = torch.einsum("...hu,...uhk,...ku->...hk", self.loading, wide, self.loading)  # (*batch, H, H)
        return cov + torch.diag_embed(self.noise * self.noise)

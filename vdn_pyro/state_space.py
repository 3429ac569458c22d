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

:class:`ScaledStateSpaceMixture` mixes K such paths that share one filter, each moved and scaled
step by step, :math:`y = \mu_k + \sigma_k \odot v` with :math:`v` one
:class:`PatchStateSpace`: the likelihood of ``horizon_posterior="exact_mixture"``, whose K
components are K draws of the look-back's last latent (a scale mixture, heavier-tailed than one
Gaussian) and whose rolled latents are integrated out given each.
"""

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from vdn_pyro.distributions import GaussMarkov

__all__ = ["PatchStateSpace", "ScaledStateSpaceMixture"]


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
        # as given: the filter's covariances only have the batch dims of these (one filter for
        # every path when start, noise and loading are shared)
        self._compact = (start, noise)
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
        start, noise = self._compact
        return PatchStateSpace(
            self.loc.expand(batch_shape + self.event_shape),
            loading,
            self.patch,
            self.phi,
            self.innovation,
            start,
            noise,
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
        the patches: ``(*sample, *batch)``. The covariances, gains and Cholesky factors carry only
        the batch dims of ``start``, ``noise`` and ``loading`` as given (``...'`` below), so
        paths that share them share one filter and only their residuals are batched."""
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(value.shape, self.loc.shape)
        resid = (value - self.loc).expand(shape)  # (..., H)
        lead = shape[:-1]
        units = self.loading.shape[-1]
        start, noise = self._compact
        cov = torch.diag_embed(start * start)  # (...', U, U): the deviations' covariance before patch j
        mean = resid.new_zeros(lead + (units,))  # (..., U)
        noise_var = noise * noise  # (...', H)
        ar = self.phi[:, None] * self.phi[None, :]  # (U, U)
        step = torch.diag(self.innovation * self.innovation)  # (U, U)
        total = resid.new_zeros(lead)
        for j in range(self.num_patches):
            rows = self._rows(j)
            w = self.loading[..., rows, :]  # ([...',] n, U)
            gain_in = cov @ w.transpose(-1, -2)  # (...', U, n): Cov(d, y_j)
            s = w @ gain_in + torch.diag_embed(noise_var[..., rows])  # (...', n, n)
            tril = torch.linalg.cholesky(s)  # (...', n, n)
            # row-vector products: one matmul over every path when w is shared
            innov = resid[..., rows] - (mean.unsqueeze(-2) @ w.transpose(-1, -2)).squeeze(-2)  # (..., n)
            n = w.shape[-2]
            if tril.dim() == 2:  # one factor for every path: one solve with many right-hand sides
                white = torch.linalg.solve_triangular(tril, innov.reshape(-1, n).T, upper=False).T  # (N, n)
            else:
                white = torch.linalg.solve_triangular(tril, innov.unsqueeze(-1), upper=False)  # (..., n, 1)
            total = total - 0.5 * white.square().reshape(lead + (-1,)).sum(-1)
            total = total - tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            total = total - 0.5 * n * math.log(2 * math.pi)
            if j + 1 == self.num_patches:
                break
            # update: K = Cov(d, y_j) S^-1, then predict the next patch's deviations
            gain = torch.cholesky_solve(gain_in.transpose(-1, -2), tril).transpose(-1, -2)  # (...', U, n)
            mean = mean + (innov.unsqueeze(-2) @ gain.transpose(-1, -2)).squeeze(-2)  # (..., U)
            cov = cov - gain @ gain_in.transpose(-1, -2)  # (...', U, U)
            cov = 0.5 * (cov + cov.transpose(-1, -2))
            mean = mean * self.phi  # (..., U)
            cov = cov * ar + step  # (...', U, U)
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


class ScaledStateSpaceMixture(dist.TorchDistribution):
    r"""Equal-weight mixture of K paths that share one state-space law up to a shift and a
    per-step scale:

    .. math:: p(y) = \frac1K \sum_{k=1}^K \mathcal{N}\big(y \mid \mu_k,\; D_k \Sigma D_k\big),
              \qquad D_k = \mathrm{diag}\,\sigma_k,

    with :math:`\Sigma` the covariance of ``base``, a :class:`PatchStateSpace` of mean zero. Each
    component's density is the base's at the whitened residual :math:`(y - \mu_k) / \sigma_k`
    less :math:`\sum_h \log \sigma_{k,h}`, so the K components and every path share one Kalman
    filter when the base's parameters are shared (its cost is then that of the residuals).

    :param torch.Tensor loc: the components' means :math:`\mu_k`, ``(K, *batch, H)``.
    :param torch.Tensor scale: their per-step scales :math:`\sigma_k` (> 0), ``(K, *batch, H)``.
    :param PatchStateSpace base: the shared law of :math:`v`, batch shape broadcastable to
        ``batch`` (``()`` for one filter).
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(self, loc, scale, base, validate_args=None):
        _check_param("loc", loc, 2)
        _check_param("scale", scale, 2)
        if not isinstance(base, PatchStateSpace):
            raise TypeError(f"Expected base to be a PatchStateSpace, but got {type(base).__name__}.")
        if loc.shape[-1] != base.event_shape[0]:
            raise ValueError(
                f"Expected loc with H = {base.event_shape[0]} steps (the base's), but got shape "
                f"{tuple(loc.shape)}."
            )
        shape = torch.broadcast_shapes(loc.shape, scale.shape)
        self.loc, self.scale, self.base = loc.expand(shape), scale.expand(shape), base
        batch_shape = torch.broadcast_shapes(shape[1:-1], base.batch_shape)
        super().__init__(batch_shape, base.event_shape, validate_args=validate_args)

    @property
    def num_draws(self):
        """K, the number of components."""
        return self.loc.shape[0]

    @property
    def mean(self):
        """The mixture's mean path, ``(*batch, H)``."""
        return (self.loc + self.scale * self.base.mean).mean(0).expand(self.batch_shape + self.event_shape)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        shape = (self.num_draws,) + batch_shape + self.event_shape  # (K, *new batch, H)
        extra = len(batch_shape) - (self.loc.dim() - 2)

        def pad(t):  # new batch dims go between the draw dim and the old batch dims
            return t.reshape(t.shape[:1] + (1,) * extra + t.shape[1:]).expand(shape)

        return ScaledStateSpaceMixture(pad(self.loc), pad(self.scale), self.base)

    def component_log_prob(self, value):
        """Each component's log density of paths ``value`` ``(*sample, *batch, H)``:
        ``(*sample, K, *batch)``."""
        dims = len(self.batch_shape)
        if value.dim() < dims + 1:  # broadcasts with the batch: pad it to its dims
            value = value.reshape((1,) * (dims + 1 - value.dim()) + value.shape)
        value = value.unsqueeze(-dims - 2)  # (*sample, 1, *batch, H)
        white = (value - self.loc) / self.scale  # (*sample, K, *batch, H)
        return self.base.log_prob(white) - self.scale.log().sum(-1)  # (*sample, K, *batch)

    def log_prob(self, value):
        """Log density of paths ``value`` ``(*sample, *batch, H)``: ``(*sample, *batch)``."""
        if self._validate_args:
            self._validate_sample(value)
        lp = self.component_log_prob(value)  # (*sample, K, *batch)
        return torch.logsumexp(lp, -len(self.batch_shape) - 1) - math.log(self.num_draws)

    def rsample(self, sample_shape=()):
        """A component per path, then its path: ``(*sample, *batch, H)`` (reparameterized given
        the components drawn)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        pick = torch.randint(self.num_draws, (1,) + shape + (1,), device=self.loc.device)
        pick = pick.expand((1,) + shape + self.event_shape)  # (1, *shape, H)
        wide = self.expand(shape)  # components (K, *sample, *batch, H)
        loc = torch.gather(wide.loc, 0, pick)[0]  # (*shape, H)
        scale = torch.gather(wide.scale, 0, pick)[0]  # (*shape, H)
        return loc + scale * self.base.expand(self.batch_shape).rsample(sample_shape)  # (*shape, H)

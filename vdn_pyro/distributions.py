r"""A stationary AR(p) process as a Pyro distribution, with an analytic KL to a diagonal Normal.

:class:`ARProcess` is the prior of a unit whose latent is a time series
:math:`z_{1:T}`. The first :math:`\min(p, T)` steps come from the stationary Gaussian marginal and
each later step is a conditional Normal given its :math:`p` predecessors, so ``log_prob`` is exact.

The KL from a mean-field posterior :math:`q(z) = \prod_t \mathcal{N}(z_t; m_t, v_t)`
(``Normal(loc, scale).to_event(1)``) to the prior is registered with
:func:`torch.distributions.register_kl`, so :class:`~pyro.infer.TraceMeanField_ELBO` needs no Monte
Carlo estimate for it. For AR(1) priors (the common case) the KL takes a short path: the prior's
constants are computed once per prior, and the terms in the posterior means are one operator
(``vdn_pyro::ar1_kl_mean_terms``) with a hand-written backward, so a graph capture keeps it whole;
the general AR(p) formula stays the reference it is tested against.

:class:`BroadcastNormal` is the diagonal posterior of a layer: a Normal whose per-unit scale is kept
compact (one value per unit, not one per batch element and time step) and whose noise is drawn in
the memory layout of its mean. :func:`normal_mixture_log_prob` is the log density of an equally
weighted mixture of K Normals (a forecaster's likelihood over its posterior draws), with a fused
backward.

:class:`GaussMarkov` is a posterior over such a path: a first-order Gauss-Markov chain whose steps
are correlated, with an analytic KL to :class:`ARProcess` that is linear in :math:`T`, and one to
another :class:`GaussMarkov` chain (e.g. an AR conditional given its start), also linear in
:math:`T`.

Helpers map unconstrained parameters to stationary coefficients (:func:`pacf_to_coeffs`) and convert
between an AR(1) coefficient and its half-life (:func:`half_life`, :func:`phi_from_half_life`).
"""

import math
import numbers

import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

__all__ = [
    "ARProcess",
    "BroadcastNormal",
    "GaussMarkov",
    "coeffs_to_pacf",
    "half_life",
    "linear_recurrence",
    "normal_mixture_log_prob",
    "pacf_to_coeffs",
    "phi_from_half_life",
]

_LOG_2PI = math.log(2 * math.pi)


def pacf_to_coeffs(pacf):
    r"""Map partial autocorrelations to the coefficients of a stationary AR(p) process.

    This is the Levinson–Durbin (Monahan, 1984) recursion. With :math:`r_k` the k-th partial
    autocorrelation, :math:`\phi^{(1)}_1 = r_1` and for :math:`k = 2, \dots, p`

    .. math::

        \phi^{(k)}_j = \phi^{(k-1)}_j - r_k \, \phi^{(k-1)}_{k-j} \quad (j < k),
        \qquad \phi^{(k)}_k = r_k .

    Every ``pacf`` in :math:`(-1, 1)^p` gives a stationary process, and every stationary process
    arises this way, so ``pacf_to_coeffs(torch.tanh(raw))`` parametrises stationary AR(p) by an
    unconstrained ``raw``. For :math:`p = 1` the map is the identity.

    >>> pacf_to_coeffs(torch.tensor([0.5, -0.2]))
    tensor([ 0.6000, -0.2000])

    :param torch.Tensor pacf: partial autocorrelations in :math:`(-1, 1)`, shape ``(..., p)``.
    :returns: AR coefficients :math:`(\phi_1, \dots, \phi_p)`, shape ``(..., p)``.
    :rtype: torch.Tensor
    """
    if pacf.dim() == 0 or pacf.shape[-1] == 0:
        raise ValueError(f"Expected pacf with shape (..., p) and p >= 1, but got shape {tuple(pacf.shape)}.")
    coeffs = pacf[..., :1]  # (..., 1)
    for k in range(1, pacf.shape[-1]):
        r = pacf[..., k : k + 1]  # (..., 1)
        coeffs = torch.cat([coeffs - r * coeffs.flip(-1), r], dim=-1)  # (..., k + 1)
    return coeffs


def coeffs_to_pacf(coeffs):
    r"""Inverse of :func:`pacf_to_coeffs`: the partial autocorrelations of a stationary AR(p).

    Runs the Levinson–Durbin recursion backwards: :math:`r_k = \phi^{(k)}_k` and

    .. math::

        \phi^{(k-1)}_j = \frac{\phi^{(k)}_j + r_k \, \phi^{(k)}_{k-j}}{1 - r_k^2} .

    The coefficients are stationary exactly when every returned value lies in :math:`(-1, 1)`;
    for non-stationary input the result has a value outside it, or is ``inf``/``nan``. Use it to
    initialise ``raw = atanh(coeffs_to_pacf(coeffs))``.

    :param torch.Tensor coeffs: AR coefficients, shape ``(..., p)``.
    :returns: partial autocorrelations, shape ``(..., p)``.
    :rtype: torch.Tensor
    """
    if coeffs.dim() == 0 or coeffs.shape[-1] == 0:
        raise ValueError(
            f"Expected coeffs with shape (..., p) and p >= 1, but got shape {tuple(coeffs.shape)}."
        )
    pacf = []
    for k in range(coeffs.shape[-1], 0, -1):
        r = coeffs[..., k - 1 : k]  # (..., 1)
        pacf.append(r)
        head = coeffs[..., : k - 1]  # (..., k - 1)
        coeffs = (head + r * head.flip(-1)) / (1 - r**2)  # (..., k - 1)
    return torch.cat(pacf[::-1], dim=-1)  # (..., p)


def half_life(phi):
    r"""Half-life of an AR(1) coefficient: the lag at which the autocorrelation drops to one half.

    .. math:: h = \frac{\log 0.5}{\log |\phi|} .

    Edge cases follow IEEE arithmetic and are part of the contract: :math:`\phi = 0` gives
    :math:`h = 0` (no memory: :math:`\log 0 = -\infty`), :math:`|\phi| = 1` gives
    :math:`h = +\infty` (a random walk never forgets), and :math:`|\phi| > 1` (non-stationary) gives
    a negative value.

    :param phi: AR(1) coefficient(s), a number or a tensor of any shape.
    :returns: the half-life in time steps, a tensor of the same shape as ``phi``.
    :rtype: torch.Tensor
    """
    if not torch.is_tensor(phi):
        phi = torch.as_tensor(phi, dtype=torch.get_default_dtype())
    log_abs = phi.abs().log()
    # log(1) is +0.0, so the plain ratio would give -inf; a unit root has infinite memory.
    return torch.where(log_abs == 0, math.inf, math.log(0.5) / log_abs)


def phi_from_half_life(h):
    r"""The positive AR(1) coefficient with half-life ``h``: :math:`\phi = 0.5^{1/h}`.

    Inverse of :func:`half_life` on :math:`\phi \in [0, 1]`: ``h = 0`` gives 0 and
    ``h = inf`` gives 1. Use it to turn a persistence band in time steps into a band on
    :math:`\phi`.

    :param h: half-life(s) in time steps, :math:`h \ge 0`; a number or a tensor of any shape.
    :returns: :math:`\phi`, a tensor of the same shape as ``h``.
    :rtype: torch.Tensor
    """
    if not torch.is_tensor(h):
        h = torch.as_tensor(h, dtype=torch.get_default_dtype())
    return 0.5 ** (1 / h)


def _yule_walker(coeffs, scale):
    r"""Stationary autocovariances :math:`\gamma_0, \dots, \gamma_p` from the Yule–Walker system.

    Solves :math:`\gamma_k - \sum_{j=1}^p \phi_j \gamma_{|k-j|} = s^2 \delta_{k0}` for
    :math:`k = 0, \dots, p` with a batched, differentiable :func:`torch.linalg.solve`.

    :param torch.Tensor coeffs: shape ``(..., p)``.
    :param torch.Tensor scale: shape ``(...,)``.
    :returns: shape ``(..., p + 1)``.
    """
    p = coeffs.shape[-1]
    if p == 1:  # closed form: gamma_0 = s^2 / (1 - phi^2), gamma_1 = phi gamma_0
        gamma0 = scale.pow(2) / (1 - coeffs[..., 0].pow(2))  # (...,)
        return torch.stack([gamma0, coeffs[..., 0] * gamma0], dim=-1)  # (..., 2)
    # select[j - 1, k, m] = 1 where m = |k - j|: phi_j adds to the gamma_m term of row k.
    lags = torch.arange(1, p + 1, device=coeffs.device)  # (p,)
    rows = torch.arange(p + 1, device=coeffs.device)  # (p + 1,)
    cols = (rows[None, :] - lags[:, None]).abs()  # (p, p + 1)
    # one-hot by comparison (one_hot() reads the values back to check them, which a traced or
    # compiled step cannot do)
    select = (cols.unsqueeze(-1) == rows).to(coeffs.dtype)  # (p, p + 1, p + 1)
    eye = torch.eye(p + 1, dtype=coeffs.dtype, device=coeffs.device)  # (p + 1, p + 1)
    system = eye - torch.einsum("...j,jkm->...km", coeffs, select)  # (..., p + 1, p + 1)
    rhs = torch.zeros(scale.shape + (p + 1,), dtype=scale.dtype, device=scale.device)
    rhs[..., 0] = scale**2  # (..., p + 1)
    return torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)  # (..., p + 1)


def _broadcast_shapes(*shapes):
    """:func:`torch.broadcast_shapes`, returning at once when all shapes are equal (the common
    case, and the general function is slow next to the small tensors of a prior)."""
    if all(s == shapes[0] for s in shapes[1:]):
        return torch.Size(shapes[0])
    return torch.broadcast_shapes(*shapes)


def _tril_solve(scale_tril, vec):
    """Solve ``L x = b`` for lower-triangular ``L``: ``(..., n, n), (..., n) -> (..., n)``."""
    return torch.linalg.solve_triangular(scale_tril, vec.unsqueeze(-1), upper=False).squeeze(-1)


def _toeplitz(first_row):
    """Symmetric Toeplitz matrices from their first rows: ``(..., n) -> (..., n, n)``."""
    n = first_row.shape[-1]
    idx = torch.arange(n, device=first_row.device)  # (n,)
    return first_row[..., (idx[:, None] - idx[None, :]).abs()]  # (..., n, n)


class ARProcess(dist.TorchDistribution):
    r"""A stationary AR(p) process over ``num_steps`` time steps, independently per batch element.

    .. math::

        z_t = c + \sum_{j=1}^p \phi_j z_{t-j} + s \, \varepsilon_t,
        \qquad \varepsilon_t \sim \mathcal{N}(0, 1),

    with the first :math:`p' = \min(p, T)` steps drawn jointly from the stationary Gaussian
    marginal: mean :math:`\mu = c / (1 - \sum_j \phi_j)` and Toeplitz covariance
    :math:`G_{ab} = \gamma_{|a-b|}`, where :math:`\gamma_k` is the stationary autocovariance. The
    whole path is then stationary, with mean :math:`\mu` and covariance
    :math:`\mathrm{Cov}(z_a, z_b) = \gamma_{|a-b|}`. With ``num_steps = 1`` it is the stationary
    marginal :math:`\mathcal{N}(\mu, \gamma_0)`.

    The coefficients must be stationary (all roots of :math:`1 - \sum_j \phi_j x^j` outside the
    unit circle); build them with :func:`pacf_to_coeffs` to guarantee it. Under validation this is
    checked.

    Batch shape is the broadcast of ``constant.shape``, ``coeffs.shape[:-1]`` and ``scale.shape``;
    event shape is ``(T,)``.

    >>> d = ARProcess(torch.zeros(3), torch.full((3, 1), 0.9), torch.ones(3), num_steps=5)
    >>> d.batch_shape, d.event_shape
    (torch.Size([3]), torch.Size([5]))

    :param torch.Tensor constant: the constant :math:`c`, shape ``(...,)``.
    :param torch.Tensor coeffs: the coefficients :math:`\phi_1, \dots, \phi_p`, shape ``(..., p)``
        with :math:`p \ge 1`.
    :param torch.Tensor scale: the innovation scale :math:`s > 0`, shape ``(...,)``.
    :param int num_steps: the number of time steps :math:`T \ge 1`.
    :param bool validate_args: as in :class:`torch.distributions.Distribution`.
    """

    arg_constraints = {
        "constant": constraints.real,
        "coeffs": constraints.independent(constraints.real, 1),
        "scale": constraints.positive,
    }
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(self, constant, coeffs, scale, num_steps, validate_args=None):
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise ValueError(
                f"Expected num_steps to be an int >= 1, but got {num_steps!r} "
                f"of type {type(num_steps).__name__}."
            )
        if num_steps < 1:
            raise ValueError(f"Expected num_steps to be an int >= 1, but got {num_steps}.")
        if not torch.is_tensor(coeffs):
            coeffs = torch.as_tensor(coeffs, dtype=torch.get_default_dtype())
        if coeffs.dim() == 0 or coeffs.shape[-1] == 0:
            raise ValueError(
                "Expected coeffs with shape (..., p) and at least one lag p >= 1, but got shape "
                f"{tuple(coeffs.shape)}. For a single AR(1) coefficient use coeffs[..., None]."
            )
        constant = torch.as_tensor(constant, dtype=coeffs.dtype, device=coeffs.device)
        scale = torch.as_tensor(scale, dtype=coeffs.dtype, device=coeffs.device)
        try:
            batch_shape = _broadcast_shapes(constant.shape, coeffs.shape[:-1], scale.shape)
        except RuntimeError as e:
            raise ValueError(
                f"Expected constant {tuple(constant.shape)}, coeffs[..., 0] "
                f"{tuple(coeffs.shape[:-1])} and scale {tuple(scale.shape)} to have broadcastable "
                "shapes."
            ) from e
        p = coeffs.shape[-1]
        self.constant = constant.expand(batch_shape)  # (...,)
        self.coeffs = coeffs.expand(batch_shape + (p,))  # (..., p)
        self.scale = scale.expand(batch_shape)  # (...,)
        self._num_steps = int(num_steps)
        super().__init__(batch_shape, torch.Size((self._num_steps,)), validate_args=validate_args)
        if self._validate_args:
            self._check_stationary()

    def _check_stationary(self):
        with torch.no_grad():
            pacf = coeffs_to_pacf(self.coeffs)  # (..., p)
            bad = ~(pacf.abs() < 1).all(-1)  # (...,)
        if bool(bad.any()):
            raise ValueError(
                "Expected stationary AR coefficients (all partial autocorrelations in (-1, 1)), "
                f"but got coeffs {self.coeffs[bad].tolist()} at batch indices "
                f"{bad.nonzero().tolist()}. Build them with pacf_to_coeffs(torch.tanh(raw))."
            )

    def expand(self, batch_shape, _instance=None):
        """Expand to a larger batch shape without copying parameters (Pyro plates call this).

        :param tuple batch_shape: the new batch shape, broadcastable from :attr:`batch_shape`.
        :returns: an :class:`ARProcess` with batch shape ``batch_shape`` and event ``(T,)``.
        """
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape and _instance is None:
            return self  # immutable: Pyro's plates re-expand every site to the shape it has
        new = self._get_checked_instance(ARProcess, _instance)
        new.constant = self.constant.expand(batch_shape)  # (...,)
        new.coeffs = self.coeffs.expand(batch_shape + (self.order,))  # (..., p)
        new.scale = self.scale.expand(batch_shape)  # (...,)
        new._num_steps = self._num_steps
        super(ARProcess, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        # The stationary start depends only on the unexpanded parameters: solve it once here and
        # hand out broadcast views, rather than once per batch element (plates expand to (B, H)).
        # The unexpanded instance is kept for the KL, which broadcasts its small tensors itself.
        new._unexpanded = getattr(self, "_unexpanded", self)
        for name in ("_gamma", "_init_scale_tril", "_init_tril_inv"):
            cached = getattr(self, name)  # (...old, *tail)
            tail = cached.shape[len(self.batch_shape) :]
            setattr(new, name, cached.expand(batch_shape + tail))  # (..., *tail)
        return new

    @property
    def order(self):
        """The AR order :math:`p` (``int``)."""
        return self.coeffs.shape[-1]

    @property
    def num_steps(self):
        """The number of time steps :math:`T` (``int``)."""
        return self._num_steps

    @property
    def stationary_mean(self):
        r"""The stationary mean :math:`c / (1 - \sum_j \phi_j)`, shape ``(...,)``."""
        return self.constant / (1 - self.coeffs.sum(-1))

    @lazy_property
    def _gamma(self):
        return _yule_walker(self.coeffs, self.scale)  # (..., p + 1)

    @lazy_property
    def _init_scale_tril(self):
        head = min(self.order, self.num_steps)
        if head == 1:  # the Cholesky factor of a 1 x 1 matrix
            return self._gamma[..., :1].sqrt().unsqueeze(-1)  # (..., 1, 1)
        return torch.linalg.cholesky(_toeplitz(self._gamma[..., :head]))  # (..., p', p')

    @lazy_property
    def _init_tril_inv(self):
        scale_tril = self._init_scale_tril  # (..., p', p')
        if scale_tril.shape[-1] == 1:
            return scale_tril.reciprocal()  # (..., 1, 1)
        eye = torch.eye(scale_tril.shape[-1], dtype=scale_tril.dtype, device=scale_tril.device)
        return torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # (..., p', p')

    @lazy_property
    def _ar1_kl_terms(self):
        r"""What the AR(1) KL (:func:`_kl_independent_ar1`) needs of the prior alone, computed
        once per prior: :math:`\mu`, :math:`1/\sqrt{\gamma_0}`, :math:`c`, :math:`\phi`,
        :math:`1/(2s^2)`, :math:`1/(2\gamma_0)`, :math:`\phi^2`, the constant
        :math:`\tfrac12 \log\gamma_0 + (T-1)\log s - T/2`, the factor of a posterior variance
        that is constant over time, :math:`\tfrac12[1/\gamma_0 + (T - 1)(1 + \phi^2)/s^2]`, each
        ``(...,)``, and :math:`-T` (a tensor, so the KL's graph holds no Python numbers)."""
        num_steps = self.num_steps
        phi, constant, scale = self.coeffs[..., 0], self.constant, self.scale  # (...,) each
        tril_inv = self._init_tril_inv[..., 0, 0]  # (...,): 1 / sqrt(gamma_0)
        inv_gamma0 = tril_inv.pow(2)  # (...,)
        inv_var = scale.pow(-2)  # (...,)
        phi_sq = phi.pow(2)  # (...,)
        const = self._init_scale_tril[..., 0, 0].log() + (num_steps - 1) * scale.log() - 0.5 * num_steps
        per_var = 0.5 * (inv_gamma0 + (num_steps - 1) * (1 + phi_sq) * inv_var)  # (...,)
        mean = constant / (1 - phi)  # (...,)
        neg_steps = torch.full((), -num_steps, dtype=scale.dtype, device=scale.device)
        return (
            mean,
            tril_inv,
            constant,
            phi,
            0.5 * inv_var,
            0.5 * inv_gamma0,
            phi_sq,
            const,
            per_var,
            neg_steps,
        )

    def autocovariance(self, num_lags):
        r"""Stationary autocovariances :math:`\gamma_0, \dots, \gamma_{L-1}`.

        :math:`\gamma_0, \dots, \gamma_p` solve the Yule–Walker system; later lags follow
        :math:`\gamma_k = \sum_j \phi_j \gamma_{k-j}`. For :math:`p = 1`,
        :math:`\gamma_k = s^2 \phi^k / (1 - \phi^2)`.

        :param int num_lags: the number of lags :math:`L \ge 1`.
        :returns: shape ``(..., L)``.
        :rtype: torch.Tensor
        """
        if isinstance(num_lags, bool) or not isinstance(num_lags, numbers.Integral) or num_lags < 1:
            raise ValueError(f"Expected num_lags to be an int >= 1, but got {num_lags!r}.")
        p = self.order
        gammas = list(self._gamma.unbind(-1))  # p + 1 tensors of shape (...,)
        for k in range(p + 1, num_lags):
            recent = torch.stack(gammas[k - p : k][::-1], dim=-1)  # (..., p): gamma_{k-1..k-p}
            gammas.append((self.coeffs * recent).sum(-1))  # (...,)
        return torch.stack(gammas[:num_lags], dim=-1)  # (..., L)

    @property
    def mean(self):
        """The mean, constant over time, shape ``(..., T)``."""
        return self.stationary_mean.unsqueeze(-1).expand(self.batch_shape + self.event_shape)

    @property
    def variance(self):
        r"""The marginal variance :math:`\gamma_0`, constant over time, shape ``(..., T)``."""
        return self._gamma[..., :1].expand(self.batch_shape + self.event_shape)

    @property
    def covariance_matrix(self):
        r"""The dense Toeplitz covariance :math:`\gamma_{|a-b|}`, shape ``(..., T, T)``.

        This is :math:`O(T^2)` memory; meant for tests and small ``T``.
        """
        return _toeplitz(self.autocovariance(self.num_steps))  # (..., T, T)

    def log_prob(self, value):
        r"""Exact log density of a path.

        .. math::

            \log p(z) = \log \mathcal{N}_{p'}(z_{1:p'}; \mu, G)
            + \sum_{t > p} \log \mathcal{N}\big(z_t; c + \textstyle\sum_j \phi_j z_{t-j}, s^2\big).

        :param torch.Tensor value: shape ``(..., T)``, broadcastable with ``batch_shape + (T,)``.
        :returns: shape ``(...,)``, the broadcast of ``value.shape[:-1]`` and :attr:`batch_shape`.
        :rtype: torch.Tensor
        """
        if self._validate_args:
            self._validate_sample(value)
        p, num_steps = self.order, self.num_steps
        head = min(p, num_steps)
        scale_tril = self._init_scale_tril  # (..., p', p')
        diff = value[..., :head] - self.stationary_mean.unsqueeze(-1)  # (..., p')
        if head == 1:  # a 1 x 1 triangular solve is a division (the batched solver is slow)
            white = diff / scale_tril[..., 0]  # (..., 1)
        else:
            white = _tril_solve(scale_tril, diff)  # (..., p')
        log_prob = (
            -0.5 * white.pow(2).sum(-1)
            - scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            - 0.5 * head * _LOG_2PI
        )  # (...,)
        if num_steps > p:
            if p == 1:  # c + phi z_{t-1} from a shifted view
                pred = torch.addcmul(self.constant.unsqueeze(-1), self.coeffs, value[..., :-1])
            else:
                windows = value.unfold(-1, p + 1, 1)  # (..., T - p, p + 1): z_{t-p}, ..., z_t
                lagged = windows[..., :p].flip(-1)  # (..., T - p, p): z_{t-1}, ..., z_{t-p}
                pred = self.constant.unsqueeze(-1) + (lagged * self.coeffs.unsqueeze(-2)).sum(-1)
            resid = (value[..., p:] - pred) / self.scale.unsqueeze(-1)  # (..., T - p)
            log_norm = (num_steps - p) * (self.scale.log() + 0.5 * _LOG_2PI)  # (...,)
            log_prob = log_prob - 0.5 * resid.pow(2).sum(-1) - log_norm  # (...,)
        return log_prob

    def rsample(self, sample_shape=()):
        """Draw reparametrised paths: stationary start, then the AR recursion.

        :param torch.Size sample_shape: leading sample dimensions.
        :returns: shape ``sample_shape + batch_shape + (T,)``.
        :rtype: torch.Tensor
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        p, num_steps = self.order, self.num_steps
        head = min(p, num_steps)
        noise = torch.randn(shape, dtype=self.coeffs.dtype, device=self.coeffs.device)  # (..., T)
        start = self.stationary_mean.unsqueeze(-1) + (
            self._init_scale_tril @ noise[..., :head].unsqueeze(-1)
        ).squeeze(-1)  # (..., p')
        path = list(start.unbind(-1))  # p' tensors of shape (...,)
        for t in range(head, num_steps):
            lagged = torch.stack(path[t - p : t][::-1], dim=-1)  # (..., p): z_{t-1}, ..., z_{t-p}
            path.append(self.constant + (self.coeffs * lagged).sum(-1) + self.scale * noise[..., t])  # (...,)
        return torch.stack(path, dim=-1)  # (..., T)

    def entropy(self):
        r"""Differential entropy :math:`\tfrac12 \log\det(2\pi e\, \Sigma)`, shape ``(...,)``."""
        head = min(self.order, self.num_steps)
        logdet = 2 * self._init_scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # (...,)
        logdet = logdet + 2 * (self.num_steps - head) * self.scale.log()  # (...,)
        return 0.5 * (self.num_steps * (1 + _LOG_2PI) + logdet)


def _compact(value, keep):
    """The smallest view of a broadcast tensor: each stride-0 dim, except the last ``keep``, is
    narrowed to size 1. Results computed from it broadcast back to the full shape."""
    lead = value.dim() - keep
    if all(value.stride(d) != 0 or value.shape[d] == 1 for d in range(lead)):
        return value
    index = tuple(
        slice(0, 1) if value.stride(d) == 0 and value.shape[d] > 1 else slice(None) for d in range(lead)
    )
    return value[index]


def _time_sum(value, start, stop):
    """``value[..., start:stop].sum(-1)`` where a last dim of size 1 stands for a value constant
    over time: ``(..., T) or (..., 1) -> (...,)``. (A window of one step, ``stop = start + 1``,
    of a constant value is that value, also for ``start > 0``, where slicing the size-1 dim
    would give an empty sum.)"""
    if value.shape[-1] == 1:
        return value[..., 0] if stop - start == 1 else value[..., 0] * (stop - start)
    return value[..., start:stop].sum(-1)


def _noise_like(loc, shape):
    """Standard Normal noise of ``shape``; when ``shape`` is ``loc``'s and ``loc`` is a permuted
    view of contiguous memory (a time-major head moved to time-last), the noise is drawn in that
    memory order and permuted the same way, so the draw and everything computed from it keep
    ``loc``'s layout (``normal_`` on a non-contiguous tensor is many times slower)."""
    if torch._C._get_tracing_state():  # torch.jit.trace has no normal_
        return torch.normal(torch.zeros(shape, dtype=loc.dtype, device=loc.device), 1.0)
    if tuple(shape) == tuple(loc.shape) and not loc.is_contiguous():
        order = sorted(range(loc.dim()), key=lambda d: -loc.stride(d))  # outer to inner in memory
        if loc.permute(order).is_contiguous():
            noise = torch.empty([loc.shape[d] for d in order], dtype=loc.dtype, device=loc.device)
            inverse = sorted(range(loc.dim()), key=order.__getitem__)
            return noise.normal_().permute(inverse)  # shaped like loc, laid out like loc
    return torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()


class BroadcastNormal(dist.Normal):
    r"""``Normal(loc, scale)`` whose ``scale`` may be a small tensor that broadcasts against
    ``loc`` (one value per unit, constant over the batch and time), kept as given.

    :class:`~torch.distributions.Normal` expands ``scale`` to ``loc``'s shape; this distribution
    keeps the given tensor as :attr:`compact_scale` as well, so that ``rsample``, ``log_prob``,
    ``entropy`` and the KL divergences to a Normal and to an :class:`ARProcess` do the scale's
    arithmetic once per unit, and its gradient is one reduction. ``rsample`` draws its noise in
    ``loc``'s memory layout (see :func:`_noise_like`), so a time-major head's draws stay
    time-major. The distribution is that of ``Normal(loc, scale)``: same support, density,
    moments and KLs.

    >>> d = BroadcastNormal(torch.zeros(4, 3, 5), torch.ones(3, 1))
    >>> d.batch_shape, d.compact_scale.shape
    (torch.Size([4, 3, 5]), torch.Size([3, 1]))

    :param torch.Tensor loc: the mean, ``(...)``.
    :param scale: the scale, a positive number or a tensor broadcastable with ``loc``.
    :param bool validate_args: as in :class:`torch.distributions.Distribution`.
    """

    def __init__(self, loc, scale, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.compact_scale = scale if torch.is_tensor(scale) else self.scale  # broadcasts to batch

    def expand(self, batch_shape, _instance=None):
        """Expand to a larger batch shape without copying (Pyro plates call this)."""
        new = self._get_checked_instance(BroadcastNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.compact_scale = self.compact_scale
        super(torch.distributions.Normal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=()):
        """Reparametrised draws ``loc + scale * eps``, shape ``sample_shape + batch_shape``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = _noise_like(self.loc, shape)  # (*sample_shape, ...)
        return self.loc + eps * self.compact_scale  # (*sample_shape, ...), laid out like loc

    def log_prob(self, value):
        """Log density, the broadcast shape of ``value`` and the batch shape."""
        if self._validate_args:
            self._validate_sample(value)
        scale = self.compact_scale
        var = scale**2  # compact
        return -((value - self.loc) ** 2) / (2 * var) - scale.log() - math.log(math.sqrt(2 * math.pi))

    def entropy(self):
        """Differential entropy, shape ``batch_shape``."""
        return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.compact_scale)).expand(self.batch_shape)


@torch.distributions.register_kl(BroadcastNormal, torch.distributions.Normal)
def _kl_broadcast_normal_normal(q, p):
    r""":math:`\mathrm{KL}(q \,\|\, p)` elementwise, as for two Normals, with the scales' part
    computed on the compact tensors: :math:`\tfrac12\big[(m_q - m_p)^2 / s_p^2 + r - 1 - \log r\big]`,
    :math:`r = s_q^2 / s_p^2`. Shape: the broadcast batch shape."""
    p_loc = _compact(p.loc, keep=0)  # a per-unit prior expanded by plates: read it once
    p_scale = _compact(p.scale, keep=0)
    var_ratio = (q.compact_scale / p_scale).pow(2)  # compact
    t1 = ((q.loc - p_loc) / p_scale).pow(2)  # (...)
    shape = _broadcast_shapes(q.batch_shape, p.batch_shape)
    return (0.5 * (t1 + (var_ratio - 1 - var_ratio.log()))).expand(shape)


@torch.distributions.register_kl(torch.distributions.Independent, ARProcess)
def _kl_independent_arprocess(q, p):
    r"""Closed-form :math:`\mathrm{KL}(q \,\|\, p)` for a diagonal Normal ``q`` over time
    (``Normal(loc, scale).to_event(1)``, event ``(T,)``) and an :class:`ARProcess` ``p``.

    AR(1) priors take :func:`_kl_independent_ar1`; every other order the exact general formula,
    :func:`_kl_independent_arprocess_exact`.

    :returns: shape: the broadcast of the two batch shapes.
    :raises NotImplementedError: unless ``q`` is a ``Normal`` with one reinterpreted batch dim.
    """
    if q.reinterpreted_batch_ndims != 1 or not isinstance(q.base_dist, torch.distributions.Normal):
        raise NotImplementedError
    if q.event_shape != p.event_shape:
        raise ValueError(
            f"Expected the posterior event shape {tuple(q.event_shape)} to equal the ARProcess "
            f"event shape {tuple(p.event_shape)} (one value per time step)."
        )
    if p.order == 1:
        return _kl_independent_ar1(q, p)
    return _kl_independent_arprocess_exact(q, p)


def _posterior_scale(normal):
    """A Normal's scale in its smallest given form (a :class:`BroadcastNormal`'s compact scale),
    with at least one dim."""
    scale = getattr(normal, "compact_scale", normal.scale)
    return scale.reshape(1) if scale.dim() == 0 else scale


def _kl_independent_arprocess_exact(q, p):
    r"""Closed-form :math:`\mathrm{KL}(q \,\|\, p)` for a diagonal Normal ``q`` over time.

    With :math:`q(z) = \prod_t \mathcal{N}(z_t; m_t, v_t)`, :math:`\mathrm{KL} =
    \mathbb{E}_q \log q - \mathbb{E}_q \log p`, where :math:`\mathbb{E}_q \log q =
    -\sum_t \tfrac12 \log(2\pi e v_t)`, the first :math:`p'` steps contribute

    .. math::

        -\tfrac12 \big[p' \log 2\pi + \log\det G + (m - \mu)^\top G^{-1} (m - \mu)
        + \mathrm{tr}(G^{-1} \mathrm{diag}\, v)\big],

    and each later step :math:`-\tfrac12 \log(2\pi s^2) - \tfrac{1}{2 s^2}\big[(m_t - c -
    \sum_j \phi_j m_{t-j})^2 + v_t + \sum_j \phi_j^2 v_{t-j}\big]`.

    :param torch.distributions.Independent q: ``Normal(loc, scale).to_event(1)``, event ``(T,)``.
    :param ARProcess p: the prior, event ``(T,)``.
    :returns: shape: the broadcast of the two batch shapes.

    This is the general path, for any order; :func:`_kl_independent_ar1` computes the same for
    :math:`p = 1` in fewer operations, and is tested against this one.
    """
    order, num_steps = p.order, p.num_steps
    head = min(order, num_steps)
    batch_shape = _broadcast_shapes(q.batch_shape, p.batch_shape)
    # Work on the smallest views: plates expand per-unit parameters to (B, H, ...) with stride 0,
    # and a per-unit posterior scale is also constant over time. Only loc is truly (..., T).
    loc = _compact(q.base_dist.loc, keep=1)  # (..., T)
    scale = _compact(_posterior_scale(q.base_dist), keep=0)  # (..., T) or (..., 1) if constant in time
    var = scale.pow(2)  # (..., T or 1)
    neg_entropy = -_time_sum(scale.log() + 0.5 * (1 + _LOG_2PI), 0, num_steps)  # (...,)

    small = getattr(p, "_unexpanded", p)  # the prior before plates expanded it: (H, k) batch
    scale_tril = small._init_scale_tril  # (..., p', p')
    tril_inv = small._init_tril_inv  # (..., p', p'), solved once per prior
    prec_diag = tril_inv.pow(2).sum(-2)  # (..., p'): diagonal of G^{-1}
    mean = small.constant / (1 - small.coeffs.sum(-1))  # (...,)
    diff = loc[..., :head] - mean.unsqueeze(-1)  # (..., p')
    white = (tril_inv * diff.unsqueeze(-2)).sum(-1)  # (..., p'): L^{-1} (m - mu)
    cross_entropy = 0.5 * (
        head * _LOG_2PI
        + 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        + white.pow(2).sum(-1)
        + (prec_diag * var[..., :head]).sum(-1)  # a constant-over-time var broadcasts
    )  # (...,)

    if num_steps > order:
        coeffs, ar_scale = small.coeffs, small.scale  # (..., p), (...,)
        # residual mean m_t - c - sum_j phi_j m_{t-j} for t = p..T-1, from shifted views
        resid = loc[..., order:] - small.constant.unsqueeze(-1)  # (..., T - p)
        for j in range(1, order + 1):
            lagged = loc[..., order - j : num_steps - j]  # (..., T - p): m_{t-j}
            resid = torch.addcmul(resid, coeffs[..., j - 1 : j], lagged, value=-1)
        var_terms = _time_sum(var, order, num_steps)  # (...,): sum_t v_t
        for j in range(1, order + 1):
            var_terms = var_terms + coeffs[..., j - 1].pow(2) * _time_sum(var, order - j, num_steps - j)
        cross_entropy = cross_entropy + (
            0.5 * (resid.pow(2).sum(-1) + var_terms) / ar_scale.pow(2)
            + (num_steps - order) * (ar_scale.log() + 0.5 * _LOG_2PI)
        )  # (...,)

    return (neg_entropy + cross_entropy).expand(batch_shape)


def _kl_independent_ar1(q, p):
    r""":func:`_kl_independent_arprocess` for an AR(1) prior, in few operations.

    With :math:`w = (m_1 - \mu)/\sqrt{\gamma_0}`, residuals :math:`r_t = m_t - c - \phi m_{t-1}`
    and posterior variances :math:`v_t`, the KL of the general formula collects into

    .. math::

        \tfrac12\Big[w^2 + \frac{1}{s^2}\sum_{t>1} r_t^2\Big]
        + \tfrac12\Big[\frac{v_1}{\gamma_0} + \frac{1}{s^2}\Big(\sum_{t>1} v_t
        + \phi^2 \sum_{t<T} v_t\Big)\Big] - \tfrac12\sum_t \log v_t
        + \tfrac12 \log\gamma_0 + (T - 1)\log s - \tfrac{T}{2}:

    a quadratic in the means (:func:`_ar1_quadratic`, one pass with a fused backward), terms in
    the posterior scales (per unit when the scale is constant over the batch and time, as an
    :class:`~vdn_pyro.guides.AmortizedNormal` with ``scale_mode="unit"`` gives it) and constants
    of the prior (computed once per prior, :attr:`ARProcess._ar1_kl_terms`).
    """
    batch_shape = _broadcast_shapes(q.batch_shape, p.batch_shape)
    loc = _compact(q.base_dist.loc, keep=1)  # (..., T)
    scale = _compact(_posterior_scale(q.base_dist), keep=0)  # (..., T) or (..., 1)
    small = getattr(p, "_unexpanded", p)  # the prior before plates expanded it: (H, k) batch
    mean, tril_inv, constant, phi, half_inv_var, half_inv_gamma0, phi_sq, const, per_var, neg_steps = (
        small._ar1_kl_terms
    )
    quad = _ar1_quadratic(loc, mean, tril_inv, constant, phi, half_inv_var)  # (...,)
    # posterior scales: per unit when constant over time, written without Python numbers (each
    # would be a host-to-tensor copy, and one more in the backward)
    if scale.shape[-1] == 1:  # one variance for all T steps: (T/2) log v = T log s
        scale = scale[..., 0]  # (...,)
        rest = const + scale * scale * per_var + scale.log() * neg_steps  # (...,)
    else:
        var = scale * scale  # (..., T)
        later = var[..., 1:].sum(-1) + phi_sq * var[..., :-1].sum(-1)  # (...,)
        rest = const - scale.log().sum(-1) + var[..., 0] * half_inv_gamma0 + later * half_inv_var  # (...,)
    return (quad + rest).expand(batch_shape)


def _ar1_terms_forward(loc, mean, tril_inv, constant, phi, half_inv_var):
    """The forward of :func:`_ar1_quadratic` and what its backward reads: ``(quad, diff, white,
    resid, resid_sq)``, with ``resid`` of shape ``(..., T - 1)`` (empty for T = 1)."""
    diff = loc[..., 0] - mean  # (...,)
    white = tril_inv * diff  # (...,)
    resid = torch.addcmul(loc[..., 1:], phi.unsqueeze(-1), loc[..., :-1], value=-1)  # (..., T - 1)
    resid = resid.sub_(constant.unsqueeze(-1))  # (..., T - 1)
    resid_sq = (resid * resid).sum(-1)  # (...,)
    quad = torch.addcmul(half_inv_var * resid_sq, white, white, value=0.5)  # (...,)
    return quad, diff, white, resid, resid_sq


def _ar1_terms_backward(ctx, grad, *_):
    r"""The gradients of :func:`_ar1_quadratic`:

    .. math:: \frac{\partial}{\partial m_t} = g_r(t) - \phi\, g_r(t + 1), \qquad
              g_r(t) = g \kappa\, r_t,\; g_r(T + 1) = 0,

    plus :math:`g w \lambda` at :math:`t = 1`, written once into a tensor laid out like
    :math:`m` (no zero-filled gradient per shifted slice, no copy for a time-major head). The
    prior's gradients are formed only when it requires them. Under ``create_graph`` the same
    formulas run differentiably, from the inputs.
    """
    if grad is None:  # the loss does not read the KL (grads are not materialised as zeros)
        return (None,) * 6
    loc, mean, tril_inv, constant, phi, half_inv_var, diff, white, resid, resid_sq = ctx.saved_tensors
    if torch.is_grad_enabled():  # a second derivative: recompute what the first one reads
        _, diff, white, resid, resid_sq = _ar1_terms_forward(loc, mean, tril_inv, constant, phi, half_inv_var)
    else:  # the residuals, as the forward formed them
        resid = torch.addcmul(loc[..., 1:], phi.unsqueeze(-1), loc[..., :-1], value=-1)  # (..., T - 1)
        resid = resid.sub_(constant.unsqueeze(-1))  # (..., T - 1)
    need = ctx.needs_input_grad
    grad_white = grad * white  # (...,)
    half = grad * half_inv_var  # (...,)
    grad_r = resid * (half + half).unsqueeze(-1)  # (..., T - 1): g kappa r_t
    grads = [None] * 6
    if need[0]:
        first = grad_white * tril_inv  # (...,)
        if loc.shape[-1] == 1:
            grads[0] = first.unsqueeze(-1)  # (..., 1)
        elif torch.is_grad_enabled():  # a second derivative: out= does not record a graph
            phi_t = phi.unsqueeze(-1)  # (..., 1)
            inner = torch.addcmul(grad_r[..., :-1], phi_t, grad_r[..., 1:], value=-1)  # (..., T - 2)
            head = torch.addcmul(first, phi, grad_r[..., 0], value=-1).unsqueeze(-1)  # (..., 1)
            grads[0] = torch.cat([head, inner, grad_r[..., -1:]], -1)  # (..., T)
        else:  # read from shifted views of grad_r (writing grad_r in place would alias)
            grad_loc = torch.empty_like(loc)  # (..., T), laid out like loc
            torch.addcmul(
                grad_r[..., :-1], phi.unsqueeze(-1), grad_r[..., 1:], value=-1, out=grad_loc[..., 1:-1]
            )
            grad_loc[..., -1] = grad_r[..., -1]
            grad_loc[..., 0] = torch.addcmul(first, phi, grad_r[..., 0], value=-1)
            grads[0] = grad_loc
    if need[1]:
        grads[1] = _sum_like(-grad_white * tril_inv, mean.shape)
    if need[2]:
        grads[2] = _sum_like(grad_white * diff, tril_inv.shape)
    if need[3]:
        grads[3] = _sum_like(-grad_r.sum(-1), constant.shape)
    if need[4]:
        grads[4] = _sum_like(-(grad_r * loc[..., :-1]).sum(-1), phi.shape)
    if need[5]:
        grads[5] = _sum_like(grad * resid_sq, half_inv_var.shape)
    return tuple(grads)


def _ar1_terms_setup(ctx, inputs, output):
    _, diff, white, resid, resid_sq = output
    # the residuals (..., T - 1) are recomputed in the backward rather than kept: two passes over
    # the means buy back a tensor as large as them for every layer, until the backward
    ctx.save_for_backward(*inputs, diff, white, None, resid_sq)
    ctx.set_materialize_grads(False)  # the outputs after the first are for the backward only


def _sum_like(value, shape):
    """``value`` summed over the dims it was broadcast along, down to ``shape``."""
    return value.sum_to_size(shape) if value.shape != shape else value


def _ar1_terms_fake(loc, mean, tril_inv, constant, phi, half_inv_var):
    batch = torch.broadcast_shapes(loc.shape[:-1], mean.shape, tril_inv.shape, constant.shape, phi.shape)
    quad = torch.broadcast_shapes(batch, half_inv_var.shape)
    new = loc.new_empty
    return (
        new(quad),
        new(torch.broadcast_shapes(loc.shape[:-1], mean.shape)),
        new(torch.broadcast_shapes(loc.shape[:-1], mean.shape, tril_inv.shape)),
        new(batch + (loc.shape[-1] - 1,)),
        new(batch),
    )


# One operator (namespace vdn_pyro), so that a graph capture (JitLocalELBO) records the KL's
# mean terms as one node and replays them with the fused backward above.
_ar1_terms = torch.library.custom_op(
    "vdn_pyro::ar1_kl_mean_terms",
    mutates_args=(),
    schema="(Tensor loc, Tensor mean, Tensor tril_inv, Tensor constant, Tensor phi, Tensor half_inv_var) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)(_ar1_terms_forward)
_ar1_terms.register_fake(_ar1_terms_fake)
_ar1_terms.register_autograd(_ar1_terms_backward, setup_context=_ar1_terms_setup)


def _ar1_quadratic(loc, mean, tril_inv, constant, phi, half_inv_var):
    r"""The part of the AR(1) KL that reads the posterior means :math:`m` over time,

    .. math:: \tfrac12 \Big[w^2 + \kappa \sum_{t>1} r_t^2\Big], \qquad
              w = (m_1 - \mu)\, \lambda,\; r_t = m_t - c - \phi m_{t-1},

    in one pass over :math:`m`, with a fused backward (see :func:`_ar1_terms_backward`).

    :param loc: posterior means :math:`m`, ``(..., T)``.
    :param mean: stationary mean :math:`\mu`; :param tril_inv: :math:`\lambda = 1/\sqrt{\gamma_0}`;
        :param constant: :math:`c`; :param phi: :math:`\phi`; :param half_inv_var:
        :math:`\kappa / 2 = 1/(2 s^2)`; each ``(...,)``, broadcastable to ``loc.shape[:-1]``.
    :returns: the broadcast batch shape.
    """
    return _ar1_terms(loc, mean, tril_inv, constant, phi, half_inv_var)[0]


def _mixture_forward(value, loc, scale, dim, inplace=True):
    r"""``logsumexp`` over ``dim`` of the Normal log-kernels :math:`-z^2/2 - \log s` and what
    the backward reads: ``(lse, z, weight, total)`` with ``weight`` the unnormalised
    ``exp(a - max)`` and ``total`` its sum over ``dim`` (kept). ``inplace=False`` (a second
    derivative) records every step for autograd."""
    z = value - loc  # (..., K, ...)
    if inplace and z.shape == torch.broadcast_shapes(z.shape, scale.shape):
        z = z.div_(scale)
    else:
        z = z / scale
    energy = torch.addcmul(scale.log(), z, z, value=0.5)  # (..., K, ...): minus the log-kernel
    least = energy.amin(dim, keepdim=True).detach()  # (..., 1, ...): any shift gives the same lse
    least = least.masked_fill(least.abs() == math.inf, 0.0)  # as torch.logsumexp: no inf - inf
    weight = torch.sub(least, energy)  # (..., K, ...): a_k - max a
    weight = weight.exp_() if inplace else weight.exp()  # (..., K, ...)
    total = weight.sum(dim, keepdim=True)  # (..., 1, ...)
    lse = (total.log() - least).squeeze(dim)  # (..., ...)
    return lse, z, weight, total


def _mixture_backward(ctx, grad, *_):
    r"""Gradients of the mixture's ``logsumexp`` with the mixture weights
    :math:`w_k = e^{a_k} / \sum_j e^{a_j}`: :math:`\partial/\partial m_k = g w_k z_k / s_k`,
    :math:`\partial/\partial s_k = g w_k (z_k^2 - 1) / s_k` and
    :math:`\partial/\partial v = -\sum_k \partial/\partial m_k`, in four passes over the K
    components (autograd's chain through subtraction, division, square, log and logsumexp takes
    about four times as many). Under ``create_graph`` the same formulas run differentiably, from
    the inputs."""
    if grad is None:
        return None, None, None, None
    value, loc, scale, z, weight, total = ctx.saved_tensors
    dim = ctx.dim
    if torch.is_grad_enabled():  # a second derivative: recompute what the first one reads
        _, z, weight, total = _mixture_forward(value, loc, scale, dim, inplace=False)
    per_scale = (weight * (grad.unsqueeze(dim) / total)) / scale  # (..., K, ...): g w / s
    grad_loc = per_scale * z  # (..., K, ...)
    grads = [None, None, None, None]
    if ctx.needs_input_grad[0]:
        grads[0] = _sum_like(-grad_loc, value.shape)
    if ctx.needs_input_grad[1]:
        grads[1] = _sum_like(grad_loc, loc.shape)
    if ctx.needs_input_grad[2]:
        grads[2] = _sum_like(torch.addcmul(-per_scale, grad_loc, z), scale.shape)  # g w (z^2 - 1) / s
    return tuple(grads)


def _mixture_setup(ctx, inputs, output):
    value, loc, scale, dim = inputs
    _, z, weight, total = output
    ctx.save_for_backward(value, loc, scale, z, weight, total)
    ctx.dim = dim
    ctx.set_materialize_grads(False)  # the outputs after the first are for the backward only


def _mixture_fake(value, loc, scale, dim):
    full = torch.broadcast_shapes(value.shape, loc.shape, scale.shape)
    kept = list(full)
    kept[dim] = 1
    reduced = full[:dim] + full[dim + 1 :] if dim != -1 else full[:-1]
    new = loc.new_empty
    return new(reduced), new(full), new(full), new(kept)


_mixture_terms = torch.library.custom_op(
    "vdn_pyro::normal_mixture_lse",
    mutates_args=(),
    schema="(Tensor value, Tensor loc, Tensor scale, int dim) -> (Tensor, Tensor, Tensor, Tensor)",
)(lambda value, loc, scale, dim: _mixture_forward(value, loc, scale, dim))
_mixture_terms.register_fake(_mixture_fake)
_mixture_terms.register_autograd(_mixture_backward, setup_context=_mixture_setup)


def normal_mixture_log_prob(value, loc, scale, dim):
    r"""Log density of an equally weighted mixture of K Normals, with a fused backward.

    .. math:: \log \frac1K \sum_k \mathcal N(v; m_k, s_k^2)
              = \operatorname{logsumexp}_k\big(-\tfrac12 z_k^2 - \log s_k\big) - \log K
              - \tfrac12 \log 2\pi, \qquad z_k = (v - m_k) / s_k .

    The components run along ``dim`` of the broadcast shape of the three arguments. The value
    is the same as ``torch.logsumexp`` of the kernels (the same operations, with its guard for
    infinite maxima); the backward forms the mixture weights once and needs about a quarter of
    the passes over the K components that autograd's chain does.

    :param torch.Tensor value: the points, broadcastable (size 1 along ``dim``).
    :param torch.Tensor loc: component means :math:`m_k`, K along ``dim``.
    :param torch.Tensor scale: component scales :math:`s_k > 0`, broadcastable to ``loc``.
    :param int dim: the component dim, negative (counted from the right of the broadcast shape).
    :returns: the broadcast shape without ``dim``.
    """
    if dim >= 0:
        raise ValueError(f"Expected a negative dim (counted from the right), but got {dim}.")
    num = torch.broadcast_shapes(value.shape, loc.shape, scale.shape)[dim]
    lse = _mixture_terms(value, loc, scale, dim)[0]
    return lse - math.log(num) - 0.5 * math.log(2 * math.pi)


#: Above this many steps, :func:`linear_recurrence` runs as a parallel scan off the CPU.
_SCAN_MIN_STEPS = 16


def linear_recurrence(weight, value):
    r"""Solve the first-order linear recurrence :math:`x_t = w_t x_{t-1} + u_t` from
    :math:`x_0 = u_0` along the last dim.

    The work runs on time-major ``movedim`` views (no copy): for inputs laid out time-major, as a
    head's output ``(B, T, ...)`` moved to time-last is, every step reads whole blocks. The result
    is a time-last view of time-major memory. Two schedules, both using only products and sums of
    the inputs (no division by cumulative products, which would underflow):

    - a sequential loop over :math:`T` (on the CPU, where it measured faster, and for short chains
      anywhere): :math:`O(T)` work;
    - a parallel Hillis–Steele scan (other devices when :math:`T >` ``_SCAN_MIN_STEPS``): each of
      :math:`\lceil \log_2 T \rceil` rounds composes the affine maps of windows twice as long,
      :math:`(w, u)_{(t-2d, t]} = (w_t w_{t-d},\; w_t u_{t-d} + u_t)`, so there are
      :math:`O(\log T)` kernel launches for :math:`O(T \log T)` work.

    ``weight[..., 0]`` never enters the result.

    >>> linear_recurrence(torch.tensor([0.0, 0.5, 0.5]), torch.tensor([1.0, 1.0, 1.0]))
    tensor([1.0000, 1.5000, 1.7500])

    :param torch.Tensor weight: :math:`w`, shape ``(..., T)`` or ``(..., 1)`` (constant over time),
        broadcastable with ``value``.
    :param torch.Tensor value: :math:`u`, shape ``(..., T)``.
    :returns: :math:`x`, the broadcast shape ``(..., T)``.
    """
    value = value.expand(_broadcast_shapes(weight.shape, value.shape))  # (..., T)
    num_steps = value.shape[-1]
    weight = weight.expand(weight.shape[:-1] + (num_steps,))  # (..., T), also from (..., 1)
    parallel = value.device.type != "cpu" and num_steps > _SCAN_MIN_STEPS
    return (_recurrence_scan if parallel else _recurrence_loop)(weight, value)


def _recurrence_loop(weight, value):
    """:func:`linear_recurrence` as a loop over time: ``(..., T), (..., T) -> (..., T)``.

    One autograd node (:class:`_LoopRecurrence`) for the whole chain: autograd's chain of T
    per-step slices would zero-fill a full ``(T, ...)`` gradient for every step in the backward
    pass, :math:`O(T^2)` memory traffic."""
    shape = _broadcast_shapes(weight.shape, value.shape)
    weight = _time_major(weight.expand(shape).movedim(-1, 0))  # (T, ...)
    value = _time_major(value.expand(shape).movedim(-1, 0))  # (T, ...)
    return _LoopRecurrence.apply(weight, value).movedim(0, -1)  # (..., T)


def _loop_into(weight, value, out):
    """``out[t] = weight[t] out[t - 1] + value[t]`` from ``out[0] = value[0]``, time-major
    ``(T, ...)``, written in place (no autograd)."""
    out[0] = value[0]
    for t in range(1, value.shape[0]):
        torch.addcmul(value[t], weight[t], out[t - 1], out=out[t])  # (...,)
    return out


def _time_major(t):
    """A time-major ``(T, ...)`` tensor whose steps are contiguous blocks: ``t`` itself when they
    are (or when ``t`` is broadcast, stride 0, and small), else a contiguous copy. The loop reads
    one step per operation, and strided steps (a time-last tensor seen time-major) cost several
    times more than the one transposing copy."""
    if t.is_contiguous() or 0 in t.stride():
        return t
    return t.contiguous()


class _LoopRecurrence(torch.autograd.Function):
    r"""The sequential recurrence on time-major tensors ``(T, ...)`` with its adjoint as the
    backward pass, :math:`O(T)` both ways:

    .. math:: g_{T-1} = \bar x_{T-1}, \quad g_t = \bar x_t + w_{t+1} g_{t+1}, \qquad
              \bar u_t = g_t, \quad \bar w_t = g_t x_{t-1}\ (t \ge 1), \quad \bar w_0 = 0.

    Under ``create_graph`` the backward runs the same formulas differentiably (the adjoint is the
    recurrence itself, reversed in time), so higher derivatives are exact too.
    """

    @staticmethod
    def forward(ctx, weight, value):
        out = _loop_into(weight, value, value.new_empty(value.shape))  # (T, ...), contiguous
        ctx.save_for_backward(weight, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, out = ctx.saved_tensors  # (T, ...) each
        grad = _time_major(grad)
        if torch.is_grad_enabled():  # create_graph: the adjoint, differentiably
            ahead = torch.cat([weight[1:], torch.zeros_like(weight[:1])])  # w_{t+1}, (T, ...)
            adjoint = _LoopRecurrence.apply(ahead.flip(0), grad.flip(0)).flip(0)  # (T, ...)
        else:
            adjoint = grad.new_empty(out.shape)  # (T, ...)
            adjoint[-1] = grad[-1]
            for t in range(out.shape[0] - 2, -1, -1):
                torch.addcmul(grad[t], weight[t + 1], adjoint[t + 1], out=adjoint[t])  # (...,)
        grad_weight = None
        if ctx.needs_input_grad[0]:
            lagged = torch.cat([torch.zeros_like(out[:1]), out[:-1]])  # x_{t-1}, (T, ...)
            grad_weight = adjoint * lagged  # (T, ...)
        return grad_weight, adjoint if ctx.needs_input_grad[1] else None


def _recurrence_scan(weight, value):
    """:func:`linear_recurrence` as a parallel scan: ``(..., T), (..., T) -> (..., T)``."""
    weight, value = weight.movedim(-1, 0), value.movedim(-1, 0)  # (T, ...) views
    num_steps, span = value.shape[0], 1
    while span < num_steps:
        # after this round x[t] holds the composition over (t - 2 span, t]; the first 2 span are done
        tail = torch.addcmul(value[span:], weight[span:], value[:-span])  # (T - d, ...)
        value = torch.cat([value[:span], tail])  # (T, ...)
        if 2 * span < num_steps:
            weight = torch.cat([weight[:span], weight[span:] * weight[:-span]])  # (T, ...)
        span *= 2
    return value.movedim(0, -1)  # (..., T)


class GaussMarkov(dist.TorchDistribution):
    r"""A first-order Gauss-Markov chain over ``T`` steps, independently per batch element.

    .. math::

        z_1 = b_1 + s_1 \varepsilon_1, \qquad
        z_t = a_t z_{t-1} + b_t + s_t \varepsilon_t \quad (t > 1),
        \qquad \varepsilon_t \sim \mathcal{N}(0, 1),

    with a transition :math:`a_t`, an offset :math:`b_t` and a scale :math:`s_t > 0` per step
    (:math:`a_1` is unused). The path is Gaussian with a tridiagonal precision. Its marginals
    follow :math:`m_t = a_t m_{t-1} + b_t`, :math:`v_t = a_t^2 v_{t-1} + s_t^2`, and its lag
    covariances are products,

    .. math:: \mathrm{Cov}(z_t, z_{t-j}) = (a_t a_{t-1} \cdots a_{t-j+1}) \, v_{t-j} .

    It is the posterior family of a path: for one AR(1) unit with a linear Gaussian emission the
    exact posterior is such a chain. The KL to an :class:`ARProcess` of order :math:`p` is closed
    form and costs :math:`O(p^2 T)` (registered with :func:`torch.distributions.register_kl`).

    Batch shape is the broadcast of the three parameters' shapes without their last dim; event
    shape is ``(T,)``. ``rsample``, ``mean`` and ``variance`` run the recurrences with
    :func:`linear_recurrence`; ``log_prob`` and ``entropy`` are :math:`O(T)` and vectorised.

    >>> d = GaussMarkov(torch.full((3, 5), 0.9), torch.zeros(3, 5), torch.ones(3, 5))
    >>> d.batch_shape, d.event_shape
    (torch.Size([3]), torch.Size([5]))
    >>> d.variance[0, :3]
    tensor([1.0000, 1.8100, 2.4661])

    :param torch.Tensor transition: :math:`a_t`, shape ``(..., T)``; ``transition[..., 0]`` is
        ignored.
    :param torch.Tensor offset: :math:`b_t`, shape ``(..., T)``.
    :param torch.Tensor scale: :math:`s_t > 0`, shape ``(..., T)``.
    :param bool validate_args: as in :class:`torch.distributions.Distribution`.
    """

    arg_constraints = {
        "transition": constraints.independent(constraints.real, 1),
        "offset": constraints.independent(constraints.real, 1),
        "scale": constraints.independent(constraints.positive, 1),
    }
    support = constraints.independent(constraints.real, 1)
    has_rsample = True

    def __init__(self, transition, offset, scale, validate_args=None):
        if not torch.is_tensor(offset):
            offset = torch.as_tensor(offset, dtype=torch.get_default_dtype())
        transition = torch.as_tensor(transition, dtype=offset.dtype, device=offset.device)
        scale = torch.as_tensor(scale, dtype=offset.dtype, device=offset.device)
        if min(transition.dim(), offset.dim(), scale.dim()) == 0:
            raise ValueError(
                "Expected transition, offset and scale with a time dim last, shape (..., T), but got "
                f"shapes {tuple(transition.shape)}, {tuple(offset.shape)} and {tuple(scale.shape)}. "
                "For a single step use a trailing dim of size 1."
            )
        try:
            shape = _broadcast_shapes(transition.shape, offset.shape, scale.shape)
        except RuntimeError as e:
            raise ValueError(
                f"Expected transition {tuple(transition.shape)}, offset {tuple(offset.shape)} and "
                f"scale {tuple(scale.shape)} to have broadcastable shapes (..., T)."
            ) from e
        self.transition = transition.expand(shape)  # (..., T)
        self.offset = offset.expand(shape)  # (..., T)
        self.scale = scale.expand(shape)  # (..., T)
        super().__init__(shape[:-1], shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """Expand to a larger batch shape without copying parameters (Pyro plates call this).

        :param tuple batch_shape: the new batch shape, broadcastable from :attr:`batch_shape`.
        :returns: a :class:`GaussMarkov` with batch shape ``batch_shape`` and event ``(T,)``.
        """
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape and _instance is None:
            return self  # immutable: Pyro's plates re-expand every site to the shape it has
        new = self._get_checked_instance(GaussMarkov, _instance)
        shape = batch_shape + self.event_shape
        new.transition = self.transition.expand(shape)  # (..., T)
        new.offset = self.offset.expand(shape)  # (..., T)
        new.scale = self.scale.expand(shape)  # (..., T)
        super(GaussMarkov, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def num_steps(self):
        """The number of time steps :math:`T` (``int``)."""
        return self.event_shape[0]

    @property
    def mean(self):
        r"""The marginal means :math:`m_t = a_t m_{t-1} + b_t`, shape ``(..., T)``."""
        return linear_recurrence(self.transition, self.offset)  # (..., T)

    @property
    def variance(self):
        r"""The marginal variances :math:`v_t = a_t^2 v_{t-1} + s_t^2`, shape ``(..., T)``."""
        return linear_recurrence(self.transition.pow(2), self.scale.pow(2))  # (..., T)

    def _lag_covariances(self, num_lags):
        r"""``[C_0, ..., C_{L-1}]`` with ``C_j[..., u] = Cov(z_{u+j}, z_u)``, shape ``(..., T - j)``:
        :math:`C_j = a_{u+j} C_{j-1}[u]`."""
        out = [self.variance]  # (..., T)
        for j in range(1, min(num_lags, self.num_steps)):
            out.append(self.transition[..., j:] * out[-1][..., :-1])  # (..., T - j)
        return out

    def lag_covariance(self, num_lags):
        r"""Lag covariances :math:`\mathrm{Cov}(z_t, z_{t-j})` for :math:`j = 0, \dots, L-1`.

        :param int num_lags: the number of lags :math:`L \ge 1`.
        :returns: shape ``(..., T, L)``; entry ``[..., t, j]`` is :math:`\mathrm{Cov}(z_t, z_{t-j})`,
            and 0 where :math:`t < j` (no such step).
        :rtype: torch.Tensor
        """
        if isinstance(num_lags, bool) or not isinstance(num_lags, numbers.Integral) or num_lags < 1:
            raise ValueError(f"Expected num_lags to be an int >= 1, but got {num_lags!r}.")
        covs = self._lag_covariances(num_lags)
        pad = torch.nn.functional.pad
        covs = [pad(cov, (j, 0)) for j, cov in enumerate(covs)]  # L' tensors (..., T)
        covs += [torch.zeros_like(covs[0])] * (num_lags - len(covs))
        return torch.stack(covs, dim=-1)  # (..., T, L)

    @property
    def covariance_matrix(self):
        r"""The dense covariance of the path, shape ``(..., T, T)``.

        This is :math:`O(T^2)` memory; meant for tests and small ``T``.
        """
        lags = self.lag_covariance(self.num_steps)  # (..., T, T): [t, j] = Cov(z_t, z_{t-j})
        idx = torch.arange(self.num_steps, device=lags.device)  # (T,)
        later = torch.maximum(idx[:, None], idx[None, :])  # (T, T)
        gap = (idx[:, None] - idx[None, :]).abs()  # (T, T)
        return lags[..., later, gap]  # (..., T, T)

    def log_prob(self, value):
        r"""Exact log density of a path, from its innovations.

        .. math::

            \log q(z) = \sum_t \log \mathcal{N}\big(z_t; a_t z_{t-1} + b_t, s_t^2\big),
            \qquad z_0 = 0 .

        :param torch.Tensor value: shape ``(..., T)``, broadcastable with ``batch_shape + (T,)``.
        :returns: shape ``(...,)``, the broadcast of ``value.shape[:-1]`` and :attr:`batch_shape`.
        :rtype: torch.Tensor
        """
        if self._validate_args:
            self._validate_sample(value)
        first = value[..., :1] - self.offset[..., :1]  # (..., 1)
        rest = value[..., 1:] - self.offset[..., 1:]  # (..., T - 1)
        rest = torch.addcmul(rest, self.transition[..., 1:], value[..., :-1], value=-1)  # (..., T - 1)
        white = torch.cat([first, rest], dim=-1) / self.scale  # (..., T)
        return -0.5 * white.pow(2).sum(-1) - self.scale.log().sum(-1) - 0.5 * self.num_steps * _LOG_2PI

    def rsample(self, sample_shape=()):
        """Draw reparametrised paths: the recurrence on standard Normal innovations, as a scan.

        :param torch.Size sample_shape: leading sample dimensions.
        :returns: shape ``sample_shape + batch_shape + (T,)``.
        :rtype: torch.Tensor
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(shape, dtype=self.offset.dtype, device=self.offset.device)  # (..., T)
        return linear_recurrence(self.transition, torch.addcmul(self.offset, self.scale, noise))  # (..., T)

    def entropy(self):
        r"""Differential entropy :math:`\sum_t \tfrac12 \log(2\pi e\, s_t^2)`, shape ``(...,)``."""
        return self.scale.log().sum(-1) + 0.5 * self.num_steps * (1 + _LOG_2PI)


@torch.distributions.register_kl(GaussMarkov, ARProcess)
def _kl_gauss_markov_arprocess(q, p):
    r"""Closed-form :math:`\mathrm{KL}(q \,\|\, p)` of a :class:`GaussMarkov` path to an AR(p).

    :math:`\mathrm{KL} = -H(q) - \mathbb{E}_q \log p(z)`. With :math:`p' = \min(p, T)`, the mean
    :math:`m` and covariance :math:`S` of :math:`z_{1:p'}` under :math:`q`, the stationary start
    contributes

    .. math::

        -\tfrac12 \big[p' \log 2\pi + \log\det G + (m - \mu)^\top G^{-1} (m - \mu)
        + \mathrm{tr}(G^{-1} S)\big],

    and each later step :math:`-\tfrac12 \log(2\pi s^2) - \tfrac{1}{2 s^2}\, \mathbb{E}_q[r_t^2]`
    with the residual :math:`r_t = z_t - c - \sum_j \phi_j z_{t-j} = w^\top (z_t, \dots, z_{t-p})
    - c`, :math:`w = (1, -\phi_1, \dots, -\phi_p)`:

    .. math::

        \mathbb{E}_q[r_t^2] = \big(\mathbb{E}_q r_t\big)^2
        + \sum_{i,l=0}^{p} w_i w_l \,\mathrm{Cov}_q(z_{t-i}, z_{t-l}),

    where every covariance is a lag covariance of :math:`q` up to lag :math:`p`. The cost is
    :math:`O(p^2 T)`.

    :param GaussMarkov q: the posterior, event ``(T,)``.
    :param ARProcess p: the prior, event ``(T,)``.
    :returns: shape: the broadcast of the two batch shapes.
    """
    if q.event_shape != p.event_shape:
        raise ValueError(
            f"Expected the posterior event shape {tuple(q.event_shape)} to equal the ARProcess "
            f"event shape {tuple(p.event_shape)} (one value per time step)."
        )
    order, num_steps = p.order, p.num_steps
    head = min(order, num_steps)
    batch_shape = _broadcast_shapes(q.batch_shape, p.batch_shape)
    loc = q.mean  # (..., T)
    covs = q._lag_covariances(order + 1)  # C_j: (..., T - j), C_j[u] = Cov(z_{u+j}, z_u)

    small = getattr(p, "_unexpanded", p)  # the prior before plates expanded it: (H, k) batch
    scale_tril = small._init_scale_tril  # (..., p', p')
    tril_inv = small._init_tril_inv  # (..., p', p'), solved once per prior
    mean = small.constant / (1 - small.coeffs.sum(-1))  # (...,)
    white = (tril_inv * (loc[..., :head] - mean.unsqueeze(-1)).unsqueeze(-2)).sum(-1)  # (..., p')
    # tr(G^{-1} S) = sum_ab (G^{-1})_ab S_ab, with S_ab = Cov(z_a, z_b) = C_{|a-b|}[min(a, b)]
    precision = tril_inv.transpose(-1, -2) @ tril_inv  # (..., p', p')
    trace = (precision.diagonal(dim1=-2, dim2=-1) * covs[0][..., :head]).sum(-1)  # (...,)
    for gap in range(1, head):
        band = precision.diagonal(offset=gap, dim1=-2, dim2=-1)  # (..., p' - gap)
        trace = trace + 2 * (band * covs[gap][..., : head - gap]).sum(-1)  # (...,)
    cross_entropy = 0.5 * (
        head * _LOG_2PI
        + 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        + white.pow(2).sum(-1)
        + trace
    )  # (...,)

    if num_steps > order:
        coeffs, ar_scale = small.coeffs, small.scale  # (..., p), (...,)
        # residual mean m_t - c - sum_j phi_j m_{t-j} for t = p..T-1, from shifted views
        resid = loc[..., order:] - small.constant.unsqueeze(-1)  # (..., T - p)
        for j in range(1, order + 1):
            lagged = loc[..., order - j : num_steps - j]  # (..., T - p): m_{t-j}
            resid = torch.addcmul(resid, coeffs[..., j - 1 : j], lagged, value=-1)
        # Var(w^T (z_t, ..., z_{t-p})) with w_0 = 1, w_j = -phi_j; Cov(z_{t-i}, z_{t-l}) for i <= l
        # is C_{l-i}[t - l], a slice [p - l, T - l) of C_{l-i}
        weights = [None] + [-coeffs[..., j - 1 : j] for j in range(1, order + 1)]  # (..., 1) each
        resid_var = covs[0][..., order:]  # (..., T - p): i = l = 0
        for i in range(order + 1):
            for l_ in range(i, order + 1):
                if i == l_ == 0:
                    continue
                cov = covs[l_ - i][..., order - l_ : num_steps - l_]  # (..., T - p)
                weight = weights[l_] if i == 0 else weights[i] * weights[l_]  # (..., 1)
                resid_var = torch.addcmul(resid_var, weight if i == l_ else 2 * weight, cov)
        cross_entropy = cross_entropy + (
            0.5 * (resid.pow(2) + resid_var).sum(-1) / ar_scale.pow(2)
            + (num_steps - order) * (ar_scale.log() + 0.5 * _LOG_2PI)
        )  # (...,)

    return (cross_entropy - q.entropy()).expand(batch_shape)


@torch.distributions.register_kl(GaussMarkov, GaussMarkov)
def _kl_gauss_markov_gauss_markov(q, p):
    r"""Closed-form :math:`\mathrm{KL}(q \,\|\, p)` of two :class:`GaussMarkov` chains over the
    same steps, with any transitions, offsets and scales.

    Both are Markov, so the KL is a sum over steps of the expected KL of the conditionals,

    .. math::

        \mathrm{KL} = \sum_t \Big[\log \frac{s'_t}{s_t} - \frac12
        + \frac{\mathbb{E}_q[r_t^2]}{2 s_t'^2}\Big], \qquad
        r_t = z_t - a'_t z_{t-1} - b'_t \;(z_0 = 0),

    with :math:`(a', b', s')` the chain of ``p``, and :math:`\mathbb{E}_q[r_t^2] =
    (m_t - a'_t m_{t-1} - b'_t)^2 + v_t + a_t'^2 v_{t-1} - 2 a'_t a_t v_{t-1}` from the
    marginal means :math:`m`, variances :math:`v` and lag-one covariances
    :math:`\mathrm{Cov}_q(z_t, z_{t-1}) = a_t v_{t-1}` of ``q``. The cost is :math:`O(T)`.

    :param GaussMarkov q: shape ``(..., T)``. :param GaussMarkov p: the same ``T``.
    :returns: shape: the broadcast of the two batch shapes.
    """
    if q.event_shape != p.event_shape:
        raise ValueError(
            f"Expected two GaussMarkov chains over the same steps, but got event shapes "
            f"{tuple(q.event_shape)} and {tuple(p.event_shape)}; build both with the same last dim T."
        )
    loc, var = q.mean, q.variance  # (..., T) each
    prev_loc = torch.nn.functional.pad(loc[..., :-1], (1, 0))  # (..., T): m_{t-1}, m_0 = 0
    prev_var = torch.nn.functional.pad(var[..., :-1], (1, 0))  # (..., T): v_{t-1}, v_0 = 0
    resid = loc - p.transition * prev_loc - p.offset  # (..., T)
    resid_var = var + (p.transition.pow(2) - 2 * p.transition * q.transition) * prev_var  # (..., T)
    ratio = (resid.pow(2) + resid_var) / p.scale.pow(2)  # (..., T)
    kl = (p.scale.log() - q.scale.log() - 0.5 + 0.5 * ratio).sum(-1)  # (...,)
    return kl.expand(_broadcast_shapes(q.batch_shape, p.batch_shape))

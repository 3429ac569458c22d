r"""A stationary AR(p) process as a Pyro distribution, with an analytic KL to a diagonal Normal.

:class:`ARProcess` is the prior of a unit whose latent is a time series
:math:`z_{1:T}`. The first :math:`\min(p, T)` steps come from the stationary Gaussian marginal and
each later step is a conditional Normal given its :math:`p` predecessors, so ``log_prob`` is exact.

The KL from a mean-field posterior :math:`q(z) = \prod_t \mathcal{N}(z_t; m_t, v_t)`
(``Normal(loc, scale).to_event(1)``) to the prior is registered with
:func:`torch.distributions.register_kl`, so :class:`~pyro.infer.TraceMeanField_ELBO` needs no Monte
Carlo estimate for it.

:class:`GaussMarkov` is a posterior over such a path: a first-order Gauss-Markov chain whose steps
are correlated, with an analytic KL to :class:`ARProcess` that is linear in :math:`T`.

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
    "GaussMarkov",
    "coeffs_to_pacf",
    "half_life",
    "linear_recurrence",
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
        raise ValueError(
            f"Expected pacf with shape (..., p) and p >= 1, but got shape {tuple(pacf.shape)}."
        )
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
        white = _tril_solve(scale_tril, diff)  # (..., p')
        log_prob = (
            -0.5 * white.pow(2).sum(-1)
            - scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            - 0.5 * head * _LOG_2PI
        )  # (...,)
        if num_steps > p:
            windows = value.unfold(-1, p + 1, 1)  # (..., T - p, p + 1): z_{t-p}, ..., z_t
            lagged = windows[..., :p].flip(-1)  # (..., T - p, p): z_{t-1}, ..., z_{t-p}
            pred = self.constant.unsqueeze(-1) + (lagged * self.coeffs.unsqueeze(-2)).sum(-1)
            resid = (windows[..., p] - pred) / self.scale.unsqueeze(-1)  # (..., T - p)
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
            path.append(
                self.constant + (self.coeffs * lagged).sum(-1) + self.scale * noise[..., t]
            )  # (...,)
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
    over time: ``(..., T) or (..., 1) -> (...,)``."""
    if value.shape[-1] == 1 and stop - start != 1:
        return value[..., 0] * (stop - start)
    return value[..., start:stop].sum(-1)


@torch.distributions.register_kl(torch.distributions.Independent, ARProcess)
def _kl_independent_arprocess(q, p):
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
    :raises NotImplementedError: unless ``q`` is a ``Normal`` with one reinterpreted batch dim.
    """
    if q.reinterpreted_batch_ndims != 1 or not isinstance(q.base_dist, torch.distributions.Normal):
        raise NotImplementedError
    if q.event_shape != p.event_shape:
        raise ValueError(
            f"Expected the posterior event shape {tuple(q.event_shape)} to equal the ARProcess "
            f"event shape {tuple(p.event_shape)} (one value per time step)."
        )
    order, num_steps = p.order, p.num_steps
    head = min(order, num_steps)
    batch_shape = _broadcast_shapes(q.batch_shape, p.batch_shape)
    # Work on the smallest views: plates expand per-unit parameters to (B, H, ...) with stride 0,
    # and a per-unit posterior scale is also constant over time. Only loc is truly (..., T).
    loc = _compact(q.base_dist.loc, keep=1)  # (..., T)
    scale = _compact(q.base_dist.scale, keep=0)  # (..., T) or (..., 1) when constant over time
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
    """:func:`linear_recurrence` as a loop over time: ``(..., T), (..., T) -> (..., T)``."""
    weight, value = weight.movedim(-1, 0), value.movedim(-1, 0)  # (T, ...) views
    out = [value[0]]  # T tensors (...,)
    for t in range(1, value.shape[0]):
        out.append(torch.addcmul(value[t], weight[t], out[-1]))  # (...,)
    return torch.stack(out).movedim(0, -1)  # (..., T)


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

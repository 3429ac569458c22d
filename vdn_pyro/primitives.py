"""The ``neurons`` primitive: one Pyro sample site for a whole layer of distributional neurons;
and the data plate every network puts it under."""

import numbers

import pyro
import torch
from pyro import poutine

__all__ = ["BETA_FLOOR", "DATA_PLATE", "NEURONS_INFER_KEY", "as_beta", "data_plate", "neurons"]

#: Smallest KL coefficient ever handed to :func:`pyro.poutine.scale`. Pyro's validation rejects a
#: scale of exactly 0, so a beta of 0 (a unit whose KL is switched off) is floored to this.
BETA_FLOOR = 1e-8

#: Key set in a neuron site's ``infer`` dict; :class:`~vdn_pyro.inference.LocalELBO` uses it to find
#: the sites whose per-unit statistics it reports.
NEURONS_INFER_KEY = "vdn_neurons"

#: Name of the plate over observations (dim -2; the units of a layer are dim -1).
DATA_PLATE = "data"


def data_plate(batch, num_data=None, device=None):
    """The plate over the ``batch`` observations of a minibatch, at dim -2.

    With ``num_data = N > batch`` the minibatch is a subsample, so every site inside is scaled by
    N / batch: the minibatch estimate of the full-data ELBO.

    :param int batch: observations in this call, B.
    :param int num_data: full data-set size N (default B).
    :param device: device of the subsample indices.
    :raises ValueError: if ``num_data < batch``.
    """
    size = batch if num_data is None else int(num_data)
    if size < batch:
        raise ValueError(
            f"Expected num_data >= batch size {batch}, but got {num_data}; pass the size of the "
            "whole training set."
        )
    subsample = None if size == batch else torch.arange(batch, device=device)
    return pyro.plate(DATA_PLATE, size, subsample=subsample, dim=-2)


def as_beta(beta, units, *, name="beta", allow_zero=False):
    """Validate a KL coefficient and return it as a tensor of shape ``(units,)``.

    :param beta: a positive number, or a tensor/sequence of shape ``(units,)``.
    :param int units: the number of units H in the layer.
    :param str name: the name used in error messages.
    :param bool allow_zero: accept zeros (they are floored at :data:`BETA_FLOOR` when used).
    :returns: a float tensor of shape ``(H,)``.
    :raises TypeError: if ``beta`` is not a number or tensor-like.
    :raises ValueError: if it has the wrong shape, is not finite, or is not positive.
    """
    if isinstance(beta, bool) or not isinstance(beta, (numbers.Real, torch.Tensor, list, tuple)):
        raise TypeError(
            f"Expected {name} to be a positive number or a tensor of shape ({units},), "
            f"but got {type(beta).__name__}."
        )
    beta = torch.as_tensor(beta, dtype=torch.get_default_dtype()).detach().clone()
    if beta.dim() == 0:
        beta = beta.expand(units).clone()  # (H,)
    if beta.shape != (units,):
        raise ValueError(
            f"Expected {name} to be a number or have shape ({units},) (one value per unit), "
            f"but got shape {tuple(beta.shape)}."
        )
    if not bool(torch.isfinite(beta).all()):
        raise ValueError(f"Expected {name} to be finite, but got {beta.tolist()}.")
    bad = (beta < 0) if allow_zero else (beta <= 0)
    if bool(bad.any()):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"Expected {name} {need} for every unit, but got {beta[bad].tolist()} at units "
            f"{bad.nonzero().flatten().tolist()}. To switch a unit's KL off, use a small "
            f"positive value such as {BETA_FLOOR}."
        )
    return beta


def neurons(name, fn, beta=None, *, dim=-1):
    r"""Sample a layer of distributional neurons as one site, with the units as a plate.

    Call it with the same ``name`` in the model (``fn`` is each unit's prior) and in the guide
    (``fn`` is each unit's amortized posterior). It opens a plate of size H over the units at
    batch dim ``dim`` and wraps the site in ``poutine.scale(beta)``, so that under
    :class:`~pyro.infer.TraceMeanField_ELBO` the layer contributes

    .. math:: \sum_i \beta_i \, \mathrm{KL}\big(q(z_i \mid x) \,\|\, p(z_i)\big)

    to the loss. Because the same call is made on both sides, model and guide scales cannot drift
    apart (``Trace_ELBO`` reads both, ``TraceMeanField_ELBO`` only the guide's).

    :param str name: the site name, by convention ``"<layer>.z"``.
    :param fn: a distribution whose rightmost batch dim is the unit dim: batch ``(..., B, H)``,
        event ``(k,)`` (static) or ``(k, T)`` (temporal).
    :param beta: KL coefficient per unit, a number or a tensor of shape ``(H,)``. Zeros are
        floored at :data:`BETA_FLOOR`. ``None`` means 1.
    :param int dim: the batch dim of the unit plate (default -1).
    :returns: the sample, shaped like ``fn.batch_shape + fn.event_shape``.
    :raises ValueError: if ``fn`` has no batch dims or ``beta`` does not fit the units.

    >>> import pyro.distributions as dist
    >>> z = neurons("layer.z", dist.Normal(torch.zeros(4, 3, 1), 1.0).to_event(1), torch.ones(3))
    >>> z.shape
    torch.Size([4, 3, 1])
    """
    if len(fn.batch_shape) < -dim:
        raise ValueError(
            f"Expected the distribution of site '{name}' to have at least {-dim} batch dims with "
            f"the units at dim {dim}, but got batch_shape {tuple(fn.batch_shape)}. Put the units "
            f"in a batch dim, e.g. Normal(loc, scale).to_event(1) with loc of shape (B, H, k)."
        )
    units = fn.batch_shape[dim]
    with pyro.plate(f"{name}.units", units, dim=dim):
        if beta is None:
            return pyro.sample(name, fn, infer={NEURONS_INFER_KEY: True})
        if (
            not torch.is_tensor(beta)
            or beta.shape != (units,)
            or (pyro.infer.is_validation_enabled() and not bool(((beta >= 0) & torch.isfinite(beta)).all()))
        ):
            beta = as_beta(beta, units, name=f"beta of site '{name}'", allow_zero=True)
        beta = beta.clamp_min(BETA_FLOOR)  # (H,)
        if dim != -1:
            beta = beta.reshape((units,) + (1,) * (-dim - 1))  # (H, 1, ..., 1)
        with poutine.scale(scale=beta):
            return pyro.sample(name, fn, infer={NEURONS_INFER_KEY: True})

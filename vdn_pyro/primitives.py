"""The ``neurons`` primitive: one Pyro sample site for a whole layer of distributional neurons;
the data plate every network puts it under; and the mode that tells a
:class:`~vdn_pyro.models.Neurons` layer which side of the model/guide pair it runs on."""

import contextlib
import numbers

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.subsample_messenger import _Subsample

__all__ = [
    "BETA_FLOOR",
    "DATA_PLATE",
    "NEURONS_INFER_KEY",
    "NEURONS_REPORT_KEY",
    "NEURONS_SAME_LAW_KEY",
    "NEURON_MODES",
    "as_beta",
    "capture_posteriors",
    "current_neuron_mode",
    "data_plate",
    "module_params",
    "neuron_mode",
    "neurons",
    "record_posterior",
]

#: Smallest KL coefficient ever handed to :func:`pyro.poutine.scale`. Pyro's validation rejects a
#: scale of exactly 0, so a beta of 0 (a unit whose KL is switched off) is floored to this.
BETA_FLOOR = 1e-8

#: Key set in a neuron site's ``infer`` dict; :class:`~vdn_pyro.inference.LocalELBO` uses it to find
#: the sites whose per-unit statistics it reports.
NEURONS_INFER_KEY = "vdn_neurons"

#: Key set to ``False`` in the ``infer`` dict of a neuron site whose units carry no information
#: budget of their own (e.g. latents rolled forward by the prior's own dynamics, KL 0 by
#: construction): :class:`~vdn_pyro.inference.LocalELBO` then neither records their statistics nor
#: applies constraint hooks to them.
NEURONS_REPORT_KEY = "vdn_report"

#: Infer-dict key of a neuron site whose guide draws from the model's own distribution
#: (``neurons(..., same_law=True)``): its ELBO term is identically zero and
#: :class:`~vdn_pyro.inference.LocalELBO` skips it.
NEURONS_SAME_LAW_KEY = "vdn_same_law"

#: Name of the plate over observations (dim -2; the units of a layer are dim -1).
DATA_PLATE = "data"

#: What a :class:`~vdn_pyro.models.Neurons` layer does when called:
#:
#: - ``"model"`` (the default, outside any :func:`neuron_mode`): sample each unit's prior;
#: - ``"guide"``: sample each unit's amortized posterior;
#: - ``"mean"``: no sample site; pass on the posterior mean (the path diagnostics read).
NEURON_MODES = ("model", "guide", "mean")

_MODE_STACK = []
_RECORDERS = []

#: The innermost mode while :class:`~vdn_pyro.inference.LocalELBO` runs model and guide as one
#: pass (:func:`_single_pass`): each layer samples its posterior and hands its prior over. Only
#: layers see it (:func:`_layer_mode`); :func:`current_neuron_mode` reports ``"model"`` and
#: counts the read, so that the ELBO can tell whether anything but a layer branched on the mode.
_SINGLE = "single"
_PRIOR_RECORDS = []
_MODE_READS = [0]


@contextlib.contextmanager
def neuron_mode(mode):
    """Run the enclosed code with every :class:`~vdn_pyro.models.Neurons` layer in ``mode``.

    The mode is a stack, restored on exit (also on error); nothing outlives the ``with`` block.
    :class:`~vdn_pyro.guides.NeuronGuide` uses ``"guide"``; the analysis tools use ``"mean"``.

    :param str mode: one of :data:`NEURON_MODES`.
    :raises ValueError: for any other mode.

    >>> with neuron_mode("guide"):
    ...     current_neuron_mode()
    'guide'
    >>> current_neuron_mode()
    'model'
    """
    if mode not in NEURON_MODES:
        raise ValueError(f"Expected a neuron mode in {NEURON_MODES}, but got {mode!r}.")
    _MODE_STACK.append(mode)
    try:
        yield mode
    finally:
        _MODE_STACK.pop()


def current_neuron_mode():
    """The innermost :func:`neuron_mode`, or ``"model"`` outside any."""
    _MODE_READS[0] += 1
    mode = _MODE_STACK[-1] if _MODE_STACK else "model"
    return "model" if mode is _SINGLE else mode


def _layer_mode():
    """The innermost mode as a :class:`~vdn_pyro.models.Neurons` layer reads it: like
    :func:`current_neuron_mode`, but the single pass shows as itself and the read is not
    counted."""
    return _MODE_STACK[-1] if _MODE_STACK else "model"


def _mode_reads():
    """How many times :func:`current_neuron_mode` has run in this process (a counter)."""
    return _MODE_READS[0]


@contextlib.contextmanager
def _single_pass():
    """Run the enclosed model as model and guide at once: every layer samples its posterior at
    its site and records the prior the model side would have sampled there.

    Yields a dict that fills in as layers run: ``site -> prior`` (batch as the layer built it,
    before the plates broadcast it).
    """
    record = {}
    _MODE_STACK.append(_SINGLE)
    _PRIOR_RECORDS.append(record)
    try:
        yield record
    finally:
        _PRIOR_RECORDS.pop()
        _MODE_STACK.pop()


def _record_prior(site, fn):
    """Hand one layer's prior to the innermost :func:`_single_pass`."""
    if _PRIOR_RECORDS:
        _PRIOR_RECORDS[-1][site] = fn


def _module_params_active():
    """Whether a :func:`module_params` handler is on Pyro's stack: parameter statements are then
    answered by the modules' own parameters, so a layer may read its submodules without them."""
    return any(type(frame) is _ModuleParams for frame in _PYRO_STACK)


class _ModuleParams(Messenger):
    def _pyro_param(self, msg):
        init = msg["args"][1] if len(msg["args"]) > 1 else msg["kwargs"].get("init_tensor")
        if isinstance(init, torch.nn.Parameter):
            msg["value"], msg["done"] = init, True


def module_params():
    """Run the enclosed code with every :class:`~pyro.nn.PyroModule` using its own parameters and
    leaving Pyro's global param store untouched.

    Under Pyro's default settings, calling a ``PyroModule`` registers its parameters in the global
    param store (that is how ``pyro.optim`` finds them). The library's own loops (``fit``, losses,
    prediction, diagnostics) optimise and read ``network.parameters()`` directly, so they run
    inside this handler: two networks in one process never meet in the store, and a user's store
    is left as it was. Parameters created by ``pyro.param`` without a tensor are unaffected.
    """
    return _ModuleParams()


@contextlib.contextmanager
def capture_posteriors():
    """Collect the posterior parameters of every neuron layer called inside the block.

    Yields a dict that fills in as layers run: ``site -> (loc, scale, layer)``, with ``loc`` and
    ``scale`` of shape ``(..., B, H, k)`` (static) or ``(..., B, H, k, T)`` (temporal). Layers
    record in the ``"guide"`` and ``"mean"`` modes and in the deterministic twin.
    """
    record = {}
    _RECORDERS.append(record)
    try:
        yield record
    finally:
        _RECORDERS.remove(record)


def record_posterior(site, loc, scale, layer):
    """Hand one layer's posterior parameters to every active :func:`capture_posteriors`."""
    for record in _RECORDERS:
        record[site] = (loc, scale, layer)


class _ObservationShapeCheck(Messenger):
    """Refuse a sample site whose batch shape is ``(B,)`` inside the data plate: the plate is at
    dim -2, so Pyro would broadcast such a site to ``(B, B)`` without an error."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def _pyro_sample(self, msg):
        if self.batch < 2 or not pyro.infer.is_validation_enabled():
            return
        if (msg.get("infer") or {}).get(NEURONS_INFER_KEY) or isinstance(msg["fn"], _Subsample):
            return
        shape = tuple(getattr(msg["fn"], "batch_shape", ()))
        if shape == (self.batch,):
            raise ValueError(
                f"Site '{msg['name']}' has batch shape ({self.batch},) inside the data plate, which is "
                f"batch dim -2 (the units of a neuron layer are dim -1), so Pyro would broadcast it to "
                f"({self.batch}, {self.batch}). Give it batch shape ({self.batch}, 1): unsqueeze(-2) "
                "its parameters and its observations (or move one dim into the event with "
                ".to_event(...) after unsqueezing)."
            )


@contextlib.contextmanager
def data_plate(batch, num_data=None, device=None):
    """The plate over the ``batch`` observations of a minibatch, at dim -2.

    With ``num_data = N > batch`` the minibatch is a subsample, so every site inside is scaled by
    N / batch: the minibatch estimate of the full-data ELBO. Inside it, a site over observations
    has batch shape ``(B, 1)`` (observations at dim -2); while Pyro's validation is on, a site with
    batch shape ``(B,)``, which Pyro would silently broadcast to ``(B, B)``, is refused.

    :param int batch: observations in this call, B.
    :param int num_data: full data-set size N (default B).
    :param device: device of the subsample indices.
    :raises ValueError: if ``num_data < batch``.

    >>> import pyro.distributions as dist
    >>> with data_plate(3):
    ...     pyro.sample("y", dist.Normal(torch.zeros(3, 1, 2), 1.0).to_event(1)).shape
    torch.Size([3, 1, 2])
    """
    size = batch if num_data is None else int(num_data)
    if size < batch:
        raise ValueError(
            f"Expected num_data >= batch size {batch}, but got {num_data}; pass the size of the "
            "whole training set."
        )
    subsample = None if size == batch else torch.arange(batch, device=device)
    with pyro.plate(DATA_PLATE, size, subsample=subsample, dim=-2) as index, _ObservationShapeCheck(batch):
        yield index


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


def _neuron_infer(report, same_law=False):
    infer = {NEURONS_INFER_KEY: True}
    if not report:
        infer[NEURONS_REPORT_KEY] = False
    if same_law:
        infer[NEURONS_SAME_LAW_KEY] = True
    return infer


def neurons(name, fn, beta=None, *, dim=-1, report=True, same_law=False):
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
    :param bool report: record the site's per-unit statistics and apply constraint hooks in
        :class:`~vdn_pyro.inference.LocalELBO` (``False`` for latents without an information budget
        of their own, see :data:`NEURONS_REPORT_KEY`).
    :param bool same_law: the guide draws this site from the model's own distribution, built by
        the same computation from the same values on both sides (e.g. latents rolled forward by
        the prior's dynamics), so its ELBO term :math:`\log p - \log q` is identically zero, in
        value and gradient: :class:`~vdn_pyro.inference.LocalELBO` skips it instead of evaluating
        two equal log densities (see :data:`NEURONS_SAME_LAW_KEY`). Pyro's own ELBOs compute the
        zero.
    :returns: the sample, shaped like ``fn.batch_shape + fn.event_shape``.
    :raises ValueError: if ``fn`` has no batch dims or ``beta`` does not fit the units.

    >>> import pyro.distributions as dist
    >>> z = neurons("layer.z", dist.Normal(torch.zeros(4, 3, 1), 1.0).to_event(1), torch.ones(3))
    >>> z.shape
    torch.Size([4, 3, 1])
    """
    if not isinstance(fn, torch.distributions.Distribution):
        raise TypeError(
            f"Expected the distribution of site '{name}' to be a torch/Pyro distribution with the "
            f"units at batch dim {dim}, e.g. pyro.distributions.Normal(loc, scale).to_event(1), "
            f"but got {type(fn).__name__} {fn!r}. For a layer that builds its prior and posterior "
            "itself, use vdn_pyro.Neurons."
        )
    if len(fn.batch_shape) < -dim:
        raise ValueError(
            f"Expected the distribution of site '{name}' to have at least {-dim} batch dims with "
            f"the units at dim {dim}, but got batch_shape {tuple(fn.batch_shape)}. Put the units "
            f"in a batch dim, e.g. Normal(loc, scale).to_event(1) with loc of shape (B, H, k)."
        )
    units = fn.batch_shape[dim]
    if beta is None:
        with pyro.plate(f"{name}.units", units, dim=dim):
            return pyro.sample(name, fn, infer=_neuron_infer(report, same_law))
    if (
        not torch.is_tensor(beta)
        or beta.shape != (units,)
        or (pyro.infer.is_validation_enabled() and not bool(((beta >= 0) & torch.isfinite(beta)).all()))
    ):
        beta = as_beta(beta, units, name=f"beta of site '{name}'", allow_zero=True)
    beta = beta.clamp_min(BETA_FLOOR)  # (H,)
    if dim != -1:
        beta = beta.reshape((units,) + (1,) * (-dim - 1))  # (H, 1, ..., 1)
    with pyro.plate(f"{name}.units", units, dim=dim), poutine.scale(scale=beta):
        return pyro.sample(name, fn, infer=_neuron_infer(report, same_law))

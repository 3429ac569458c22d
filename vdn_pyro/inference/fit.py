r"""``fit``: stochastic variational inference for a network of distributional neurons.

Minibatches are drawn without replacement each epoch (the last, smaller batch is kept) and the
model's data plate is told the full size N, so every step's loss is an unbiased estimate of the
full-data ELBO (each minibatch term is scaled by N/B).
"""

import copy
import dataclasses
import math
import numbers
import time

import numpy as np
import pyro
import torch
from pyro.optim.clipped_adam import ClippedAdam

from vdn_pyro.inference.elbo import LocalELBO

__all__ = ["FitResult", "FitState", "fit"]

_OPTIMS = {"adam": torch.optim.Adam, "clipped_adam": ClippedAdam, "adamw": torch.optim.AdamW}


@dataclasses.dataclass
class FitState:
    """What callbacks see after every step.

    :ivar network: the network being fitted.
    :ivar optimizer: the torch optimizer.
    :ivar elbo: the :class:`~vdn_pyro.inference.LocalELBO`.
    :ivar int step: number of completed steps.
    :ivar int epoch: current epoch (0-based).
    :ivar float loss: this step's loss (minus the full-data ELBO estimate, plus penalties).
    :ivar dict stats: this step's per-unit :class:`~vdn_pyro.inference.UnitStats` by site.
    :ivar history: the :class:`FitResult` being filled.
    :ivar bool stop: set to ``True`` to stop after this step.
    """

    network: object
    optimizer: object
    elbo: object
    step: int = 0
    epoch: int = 0
    loss: float = math.nan
    stats: dict = dataclasses.field(default_factory=dict)
    history: object = None
    stop: bool = False


@dataclasses.dataclass
class FitResult:
    """The outcome of :func:`fit`.

    :ivar network: the fitted network (in its final state, or the best-validation state when
        ``restore_best=True``).
    :ivar list history: one dict per logged step: ``step``, ``epoch``, ``loss`` (minus the
        full-data ELBO estimate), ``loss_per_obs`` and, on validation steps, ``val_loss`` (per
        observation).
    :ivar dict unit_kl: site -> array ``(n_logged, H)`` of per-unit unscaled KL (nats).
    :ivar dict unit_beta: site -> array ``(n_logged, H)`` of per-unit beta.
    :ivar list logged_steps: the steps at which ``unit_kl``/``unit_beta`` rows were taken.
    :ivar float best_val_loss: lowest validation loss per observation (``nan`` without
        validation data).
    :ivar int best_step: step of the best validation loss (``-1`` without validation data).
    :ivar dict best_state: ``state_dict`` of the network at the best validation loss.
    :ivar int steps: number of optimisation steps taken.
    :ivar float seconds: wall time.
    :ivar dict optimizer_state: the optimizer's final ``state_dict``.
    """

    network: object
    history: list
    unit_kl: dict
    unit_beta: dict
    logged_steps: list
    best_val_loss: float
    best_step: int
    best_state: dict
    steps: int
    seconds: float
    optimizer_state: dict

    def history_frame(self):
        """The history as a :class:`pandas.DataFrame`."""
        import pandas as pd

        return pd.DataFrame(self.history)

    @property
    def final_loss(self):
        """Loss per observation at the last logged step."""
        return self.history[-1]["loss_per_obs"] if self.history else math.nan


def _as_tensor(name, value):
    if isinstance(value, np.ndarray):
        value = torch.as_tensor(value)
    if not torch.is_tensor(value):
        raise TypeError(f"Expected {name} to be a tensor or array, but got {type(value).__name__}.")
    if value.dtype == torch.float64 and torch.get_default_dtype() == torch.float32:
        value = value.float()
    return value


def _check_positive_int(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")


def _make_optimizer(optim, params, lr):
    if isinstance(optim, str):
        if optim not in _OPTIMS:
            raise ValueError(f"Expected optim in {sorted(_OPTIMS)} or a callable, got {optim!r}.")
        return _OPTIMS[optim](params, lr=lr)
    if callable(optim):
        return optim(params)
    raise TypeError(f"Expected optim to be a name or callable(params), got {type(optim).__name__}.")


def evaluate_loss(network, x, y, elbo=None, batch_size=1024):
    """Minus the ELBO per observation on a data set, without gradients.

    :param network: a :class:`~vdn_pyro.VDN` (anything with ``model``/``guide``).
    :param x: inputs ``(N, ...)``. :param y: targets ``(N, ...)``.
    :param elbo: the estimator (default :class:`LocalELBO`).
    :param int batch_size: evaluation batch size.
    :returns: a float.
    """
    elbo = elbo or LocalELBO()
    total, n = 0.0, x.shape[0]
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            loss, _ = elbo.loss_and_stats(network.model, network.guide, xb, yb)
            total += float(loss)
    return total / n


def fit(
    network,
    x,
    y,
    *,
    steps=None,
    epochs=None,
    batch_size=128,
    lr=1e-2,
    optim="adam",
    elbo=None,
    val_data=None,
    val_every=None,
    log_every=10,
    seed=None,
    callbacks=(),
    constraints=(),
    restore_best=False,
    device=None,
):
    """Fit a network by SVI on minibatches.

    :param network: a :class:`~vdn_pyro.VDN`, or any module with ``model(x, y, num_data=N)``
        and ``guide(x, y, num_data=N)`` methods.
    :param x: inputs ``(N, ...)``.
    :param y: targets ``(N, ...)``.
    :param int steps: number of optimisation steps (exclusive with ``epochs``).
    :param int epochs: number of passes over the data.
    :param int batch_size: minibatch size B (clipped at N).
    :param float lr: learning rate.
    :param optim: ``"adam"``, ``"clipped_adam"``, ``"adamw"``, or ``callable(params) ->
        torch.optim.Optimizer``.
    :param elbo: a :class:`~vdn_pyro.inference.LocalELBO` (default: mean-field, 1 particle).
    :param val_data: optional ``(x_val, y_val)``.
    :param int val_every: validate every this many steps (default: once per epoch).
    :param int log_every: record history every this many steps (and at the last step).
    :param int seed: seeds Pyro/torch/numpy and the minibatch order.
    :param callbacks: objects with optional ``on_fit_start(state)``, ``on_step_end(state)``
        and ``on_fit_end(state)`` methods; ``state`` is a :class:`FitState`.
    :param constraints: local constraints (see :mod:`vdn_pyro.inference.constraints`). Each is
        added to the ELBO's hooks (``transform_kl``, ``penalty``) and to the callbacks
        (``on_fit_start``, ``on_step_end``, ``on_fit_end``), whichever it defines.
    :param bool restore_best: load the best-validation state into the network at the end.
    :param device: move the network and data to this device (default: where the network is).
    :returns: a :class:`FitResult`.
    """
    x, y = _as_tensor("x", x), _as_tensor("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected x and y with the same number of rows, but got {x.shape[0]} and "
            f"{y.shape[0]}."
        )
    network.check_inputs(x, y) if hasattr(network, "check_inputs") else None
    if (steps is None) == (epochs is None):
        raise ValueError(f"Give exactly one of steps or epochs; got steps={steps}, epochs={epochs}.")
    _check_positive_int("steps", steps, allow_none=True)
    _check_positive_int("epochs", epochs, allow_none=True)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("log_every", log_every)
    _check_positive_int("val_every", val_every, allow_none=True)
    if not (isinstance(lr, numbers.Real) and lr > 0):
        raise ValueError(f"Expected lr > 0, but got {lr!r}.")
    if val_data is not None:
        if not isinstance(val_data, (tuple, list)) or len(val_data) != 2:
            raise TypeError("Expected val_data to be a pair (x_val, y_val).")
        x_val, y_val = (_as_tensor(n, v) for n, v in zip(("x_val", "y_val"), val_data))
        if hasattr(network, "check_inputs"):
            network.check_inputs(x_val, y_val)
    if seed is not None:
        pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**31))

    n = x.shape[0]
    batch_size = min(batch_size, n)
    per_epoch = math.ceil(n / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    val_every = val_every or per_epoch
    elbo = elbo or LocalELBO()
    constraints = list(constraints)
    elbo.hooks = [h for h in elbo.hooks if h not in constraints] + constraints
    callbacks = constraints + list(callbacks)
    if device is not None:
        network.to(device)
    else:
        device = next(iter(network.parameters())).device
    x, y = x.to(device), y.to(device)
    if val_data is not None:
        x_val, y_val = x_val.to(device), y_val.to(device)
    optimizer = _make_optimizer(optim, [p for p in network.parameters() if p.requires_grad], lr)

    result = FitResult(network, [], {}, {}, [], math.nan, -1, {}, 0, 0.0, {})
    state = FitState(network, optimizer, elbo, history=result)
    for cb in callbacks:
        getattr(cb, "on_fit_start", lambda s: None)(state)

    start_time = time.perf_counter()
    order = torch.randperm(n, generator=generator).to(device)
    cursor = 0
    network.train()
    for step in range(1, total + 1):
        if cursor >= n:
            order, cursor = torch.randperm(n, generator=generator).to(device), 0
            state.epoch += 1
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        optimizer.zero_grad(set_to_none=True)
        loss, stats = elbo.loss_and_stats(network.model, network.guide, x[idx], y[idx], num_data=n)
        loss.backward()
        optimizer.step()
        state.step, state.loss, state.stats = step, float(loss.detach()), stats

        last = step == total
        if step % log_every == 0 or last:
            row = {"step": step, "epoch": state.epoch, "loss": state.loss, "loss_per_obs": state.loss / n}
            if val_data is not None and (step % val_every == 0 or last):
                network.eval()
                row["val_loss"] = evaluate_loss(network, x_val, y_val, elbo)
                network.train()
                if not row["val_loss"] >= result.best_val_loss:  # also true while best is nan
                    result.best_val_loss, result.best_step = row["val_loss"], step
                    result.best_state = copy.deepcopy(network.state_dict())
            result.history.append(row)
            result.logged_steps.append(step)
            for name, s in stats.items():
                result.unit_kl.setdefault(name, []).append(s.kl.cpu().numpy())
            for layer in getattr(network, "layers", []):
                result.unit_beta.setdefault(layer.site, []).append(layer.beta.cpu().numpy().copy())
        for cb in callbacks:
            getattr(cb, "on_step_end", lambda s: None)(state)
        if state.stop:
            break

    network.eval()
    result.unit_kl = {k: np.stack(v) for k, v in result.unit_kl.items()}
    result.unit_beta = {k: np.stack(v) for k, v in result.unit_beta.items()}
    result.steps, result.seconds = state.step, time.perf_counter() - start_time
    result.optimizer_state = optimizer.state_dict()
    if restore_best and result.best_state:
        network.load_state_dict(result.best_state)
    for cb in callbacks:
        getattr(cb, "on_fit_end", lambda s: None)(state)
    return result

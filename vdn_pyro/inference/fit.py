r"""``fit``: stochastic variational inference for a network of distributional neurons.

Minibatches are drawn without replacement each epoch (the last, smaller batch is kept) and the
model's data plate is told the full size N, so every step's loss is an unbiased estimate of the
full-data ELBO (each minibatch term is scaled by N/B).

Around the loop, :func:`fit` provides what a long run needs:

- a :mod:`tqdm` progress bar (loss, ELBO per observation, fraction of living units);
- CSV and JSON-lines logs of every logged row, flushed as written (``log_dir``);
- atomic checkpoints (``checkpoint_dir``) and exact resume (``resume``): a run of N steps and a run
  of N/2 steps resumed for N/2 more give bit-identical parameters on CPU;
- SIGINT/SIGTERM handling, when asked (``handle_signals=True``, as the CLI does): the current step
  finishes, a final checkpoint is written and the fit returns with ``interrupted=True``;
- a NaN/inf guard: a step whose loss or gradient is not finite is skipped with a warning, and
  :class:`NonFiniteError` is raised after ``max_bad_steps`` such steps in a row, or at the end of
  a fit none of whose steps was finite (it never reports a completed run with the parameters it
  started with). Parameters never take a non-finite update, and a checkpoint with NaN or inf is
  never written.

:func:`fit` behaves as a library function: it trains ``network.parameters()`` with a torch
optimiser, with Pyro's global param store left untouched
(:func:`~vdn_pyro.primitives.module_params`); it draws from a random state of its own, seeded by
``seed``, and restores the caller's torch, numpy and Python random states on return; and it
installs no signal handler unless asked.
"""

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from pyro.optim.clipped_adam import ClippedAdam
from tqdm import tqdm

from vdn_pyro.guides.builder import NeuronGuide
from vdn_pyro.inference.checkpoint import (
    LAST_CHECKPOINT,
    IncompatibleCheckpointError,
    config_payload,
    get_rng_state,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from vdn_pyro.inference.elbo import LocalELBO
from vdn_pyro.models.neurons import find_neurons
from vdn_pyro.primitives import module_params

__all__ = ["LOG_COLUMNS", "FitResult", "FitState", "NonFiniteError", "data_digest", "evaluate_loss", "fit"]

_OPTIMS = {"adam": torch.optim.Adam, "clipped_adam": ClippedAdam, "adamw": torch.optim.AdamW}
_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}

#: Columns of ``log.csv`` (``log.jsonl`` has the same keys plus per-unit ``kl`` and ``beta``).
LOG_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "loss_per_obs",
    "elbo_per_obs",
    "val_loss",
    "living",
    "skipped",
    "seconds",
)
LOG_CSV, LOG_JSONL = "log.csv", "log.jsonl"

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Raised by :func:`fit` after ``max_bad_steps`` steps in a row with a NaN/inf loss or
    gradient, or at the end of a fit none of whose steps was finite.

    :ivar int first: the first step of the non-finite streak.
    :ivar int last: its last step.
    :ivar str problem: what was not finite at the last one.
    :ivar checkpoint: the path (str) of the last checkpoint written, or ``None``.
    """

    def __init__(self, message, *, first=None, last=None, problem=None, checkpoint=None):
        super().__init__(message)
        self.first, self.last, self.problem, self.checkpoint = first, last, problem, checkpoint


@dataclasses.dataclass
class FitState:
    """What callbacks see after every step.

    :ivar network: the network being fitted.
    :ivar optimizer: the torch optimizer.
    :ivar elbo: the :class:`~vdn_pyro.inference.LocalELBO`.
    :ivar int step: number of completed steps (on resume, ``on_fit_start`` sees the step and
        weights of the checkpoint; the checkpoint's network, optimizer, constraint and random
        states are loaded again after ``on_fit_start``, so its side effects do not alter them).
    :ivar int epoch: current epoch (0-based).
    :ivar float loss: this step's loss (minus the full-data ELBO estimate, plus penalties).
    :ivar dict stats: this step's per-unit :class:`~vdn_pyro.inference.UnitStats` by site.
    :ivar history: the :class:`FitResult` being filled.
    :ivar bool stop: set to ``True`` to stop after this step.
    :ivar float living: the fraction of living units as a callback measured it (e.g. from a
        per-unit table, :func:`~vdn_pyro.inference.unit_report`), or ``None``. When set, the
        progress bar shows it instead of the step's own count (units whose KL on the minibatch
        exceeds ``living_kl``); a value set in ``on_fit_end`` is the bar's last word.
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
    living: float = None


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
    :ivar int steps: number of optimisation steps taken, counting those before a resume.
    :ivar float seconds: wall time, counting the time before a resume.
    :ivar dict optimizer_state: the optimizer's final ``state_dict``.
    :ivar bool interrupted: the fit stopped on SIGINT or SIGTERM (after writing a final
        checkpoint when ``checkpoint_dir`` was given).
    :ivar str stop_reason: ``"completed"``, ``"callback"`` (a callback set ``state.stop``),
        ``"SIGINT"`` or ``"SIGTERM"`` (``"running"`` in :meth:`from_checkpoint` for a checkpoint
        written during the run).
    :ivar list skipped_steps: steps skipped because their loss or gradient was not finite.
    :ivar checkpoint_path: path (str) of the last checkpoint written, or ``None``.
    :ivar int resumed_from: the step the run resumed from (0 for a fresh run).
    :ivar int seed: the seed of the run (drawn afresh when ``fit`` was given ``seed=None``; pass
        it back as ``seed`` to repeat the run).
    :ivar monitor: what a monitoring callback recorded (e.g. the
        :class:`~vdn_pyro.inference.diagnostics.UnitMonitor` table), else ``None``.
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
    interrupted: bool = False
    stop_reason: str = "completed"
    skipped_steps: list = dataclasses.field(default_factory=list)
    checkpoint_path: object = None
    resumed_from: int = 0
    monitor: object = None
    seed: object = None

    def history_frame(self):
        """The history as a :class:`pandas.DataFrame`."""
        import pandas as pd

        return pd.DataFrame(self.history)

    @property
    def final_loss(self):
        """Loss per observation at the last logged step."""
        return self.history[-1]["loss_per_obs"] if self.history else math.nan

    @classmethod
    def from_checkpoint(cls, path, network=None):
        """The result as it stood when a checkpoint was written by :func:`fit`, e.g. to export a
        finished run's history with :func:`~vdn_pyro.inference.to_inference_data`.

        :param path: a checkpoint file, or a directory holding ``last.pt``.
        :param network: the network to put in :attr:`network` (its architecture is checked
            against the checkpoint; it is not loaded, see
            :func:`~vdn_pyro.inference.checkpoint.load_network`).
        :returns: a :class:`FitResult`; :attr:`stop_reason` is ``"running"`` for a checkpoint
            written during the run (e.g. the last one before a crash).
        """
        data = load_checkpoint(path, network=network)
        result = cls(network, [], {}, {}, [], math.nan, -1, {}, data["step"], 0.0, data["optimizer"])
        _restore_history(result, data["history"])
        result.unit_kl = {k: np.stack(v) for k, v in result.unit_kl.items()}
        result.unit_beta = {k: np.stack(v) for k, v in result.unit_beta.items()}
        result.stop_reason = data["stop_reason"]
        result.interrupted = result.stop_reason in _EXIT_CODES
        result.seed = data["fit"].get("seed")
        result.checkpoint_path = str(resolve_checkpoint(path))
        return result

    @property
    def exit_code(self):
        """A process exit status for this outcome: 0, or 130 after SIGINT and 143 after SIGTERM
        (128 + the signal number, as a shell reports a process killed by it)."""
        return _EXIT_CODES.get(self.stop_reason, 0)


# ----------------------------------------------------------------------------- checks
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


def _check_seed(seed):
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"Expected seed to be None or an int in [0, 2**32), but got {seed!r}.")


def _model_and_guide(network):
    """The model and guide :func:`fit` trains for ``network``.

    :param network: a :class:`torch.nn.Module` that contains
        :class:`~vdn_pyro.models.Neurons` layers. Its ``model`` and ``guide`` are used when it
        has them (Pyro's convention, e.g. :class:`~vdn_pyro.VDN`); otherwise the module itself
        is the model and :class:`~vdn_pyro.guides.NeuronGuide` builds the guide.
    :returns: ``(model, guide)``.
    :raises TypeError: if ``network`` is not a :class:`torch.nn.Module`.
    """
    if not isinstance(network, torch.nn.Module):
        raise TypeError(
            "Expected network to be a torch.nn.Module (e.g. a PyroModule with Neurons layers), "
            f"but got {type(network).__name__}."
        )
    model = getattr(network, "model", None)
    guide = getattr(network, "guide", None)
    if model is None and guide is None:
        return network, NeuronGuide(network)
    if model is None or guide is None:
        missing = "guide" if guide is None else "model"
        raise TypeError(
            f"Expected network to have both a model and a guide, or neither, but "
            f"{type(network).__name__} has no {missing}. Define it, or drop the other to let fit "
            "use the module as the model and NeuronGuide(network) as the guide."
        )
    return model, guide


def evaluate_loss(network, x, y, elbo=None, batch_size=1024):
    """Minus the ELBO per observation on a data set, without gradients.

    Pyro's global param store is left untouched (see :func:`~vdn_pyro.primitives.module_params`).

    :param network: a module that contains :class:`~vdn_pyro.models.Neurons` layers, run as in
        :func:`fit`.
    :param x: inputs ``(N, ...)``. :param y: targets ``(N, ...)``.
    :param elbo: the estimator (default :class:`LocalELBO`). Its hooks (constraint penalties,
        free-bits floors) are training devices and are left out: the result is the plain ELBO
        with the same estimator and number of particles.
    :param int batch_size: evaluation batch size.
    :returns: a float.
    """
    if elbo is None:
        elbo = LocalELBO()
    elif getattr(elbo, "hooks", None):
        elbo = LocalELBO(
            estimator=elbo.estimator,
            num_particles=elbo.num_particles,
            vectorize_particles=elbo.vectorize_particles,
            max_plate_nesting=elbo.max_plate_nesting,
        )
    model, guide = _model_and_guide(network)
    total, n = 0.0, x.shape[0]
    with torch.no_grad(), module_params():
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            loss, _ = elbo.loss_and_stats(model, guide, xb, yb)
            total += float(loss)
    return total / n


# ----------------------------------------------------------------------------- helpers
def _living_fraction(stats, threshold):
    """Fraction of units whose unscaled KL (nats) exceeds ``threshold`` (``nan`` without sites)."""
    if not stats:
        return math.nan
    living = sum(int((s.kl > threshold).sum()) for s in stats.values())
    return living / sum(int(s.kl.numel()) for s in stats.values())


def _first_nonfinite_grad(named_params):
    """Name of the first parameter whose gradient holds NaN or inf, else ``None``."""
    grads = [(name, p.grad) for name, p in named_params if p.grad is not None]
    if not grads:
        return None
    total = torch.stack([g.detach().sum() for _, g in grads]).sum()  # one sync on the fast path
    if bool(torch.isfinite(total)):
        return None
    for name, g in grads:
        if not bool(torch.isfinite(g).all()):
            return name
    return None  # finite entries whose sum overflowed: not a bad gradient


def data_digest(*tensors):
    """The digest of the training data a checkpoint records (``checkpoint["data"]["digest"]``):
    a BLAKE2b hash of the shapes, dtypes and bytes of the tensors, as a hex string.

    :param tensors: e.g. ``x, y`` as passed to :func:`fit`.
    """
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _forked_rng(device):
    """Run validation on a fork of the random state, so it never shifts the training draws."""
    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def _private_rng(seed):
    """Run the block on a random state of its own, seeded with ``seed``.

    Pyro draws from torch's global generator, so the fit runs on a fork of it (and of every CUDA
    device in use) and of numpy's and Python's states, the ones :func:`pyro.set_rng_seed` covers;
    the caller's states are restored on exit, also on error. CUDA devices are forked and seeded
    only when CUDA is already initialised (this never initialises it).
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    with torch.random.fork_rng(devices=devices):
        try:
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed_all(seed)
            np.random.seed(seed)  # noqa: NPY002
            random.seed(seed)
            yield
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002
            random.setstate(python_state)


def _optimizer_name(optimizer):
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _clean(value):
    """A JSON/CSV-friendly float: ``None`` for NaN/inf."""
    return None if value is None or not math.isfinite(value) else value


class _RunLog:
    """CSV and JSON-lines logs in ``log_dir``, one row per logged step, flushed as written.

    A fresh run truncates both files; a resumed run keeps the rows up to the checkpoint's step
    and appends after them, so a log never holds a step twice.
    """

    def __init__(self, log_dir, resume_step=None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path, self.jsonl_path = self.dir / LOG_CSV, self.dir / LOG_JSONL
        kept_csv, kept_json = [], []
        if resume_step is not None:
            kept_csv, kept_json = self._rows_upto(resume_step)
        self._csv_file = open(self.csv_path, "w", newline="")
        self._json_file = open(self.jsonl_path, "w")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(kept_csv)
        self._json_file.writelines(kept_json)
        self._flush()

    def _rows_upto(self, step):
        rows, lines = [], []
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                for r in csv.DictReader(f):
                    whole = None not in r.values() and None not in r  # not cut short by a kill
                    if whole and (r.get("step") or "").isdigit() and int(r["step"]) <= step:
                        rows.append(r)
        if self.jsonl_path.exists():
            with open(self.jsonl_path) as f:
                for line in f:
                    try:
                        if int(json.loads(line)["step"]) <= step:
                            lines.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill
        return rows, lines

    def _flush(self):
        self._csv_file.flush()
        self._json_file.flush()

    def write(self, row):
        self._csv.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_COLUMNS})
        self._json_file.write(json.dumps(row, allow_nan=False) + "\n")
        self._flush()

    def close(self):
        self._csv_file.close()
        self._json_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _SignalCatcher:
    """Turn the first SIGINT/SIGTERM into a flag checked after each step; a second one raises
    :class:`KeyboardInterrupt` at once. Handlers are installed only in the main thread and the
    previous ones are restored on exit."""

    NAMES = ("SIGINT", "SIGTERM")

    def __init__(self, enabled):
        self.enabled, self.received, self._previous = enabled, None, {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            raise KeyboardInterrupt(f"second signal ({name}): stopping at once, without a checkpoint")
        self.received = name

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        return False


def _history_payload(result):
    return {
        "rows": [dict(row) for row in result.history],
        "logged_steps": list(result.logged_steps),
        "unit_kl": {k: torch.as_tensor(np.stack(v)) for k, v in result.unit_kl.items() if len(v)},
        "unit_beta": {k: torch.as_tensor(np.stack(v)) for k, v in result.unit_beta.items() if len(v)},
        "best_val_loss": float(result.best_val_loss),
        "best_step": int(result.best_step),
        "best_state": result.best_state,
        "seconds": float(result.seconds),
        "skipped_steps": list(result.skipped_steps),
    }


def _restore_history(result, saved):
    result.history = [dict(row) for row in saved["rows"]]
    result.logged_steps = list(saved["logged_steps"])
    result.unit_kl = {k: list(v.numpy()) for k, v in saved["unit_kl"].items()}
    result.unit_beta = {k: list(v.numpy()) for k, v in saved["unit_beta"].items()}
    result.best_val_loss, result.best_step = saved["best_val_loss"], saved["best_step"]
    result.best_state = saved["best_state"]
    result.seconds = saved["seconds"]
    result.skipped_steps = list(saved["skipped_steps"])


def _resume_path(resume, checkpoint_dir):
    """The checkpoint file to resume from, or ``None`` for a fresh run."""
    if resume is None or resume is False:
        return None
    if resume is True or resume == "auto":
        if checkpoint_dir is None:
            raise ValueError(
                f"resume={resume!r} reads {LAST_CHECKPOINT} from checkpoint_dir, but checkpoint_dir "
                "is None. Pass checkpoint_dir=..., or resume=<path to a checkpoint>."
            )
        path = Path(checkpoint_dir) / LAST_CHECKPOINT
        if resume == "auto" and not path.exists():
            return None
        if not path.exists():
            raise FileNotFoundError(
                f"resume=True but there is no checkpoint at {path}. Use resume='auto' to start "
                "afresh when none exists, or pass the path of a checkpoint."
            )
        return path
    if isinstance(resume, (str, Path)):
        return resolve_checkpoint(resume)
    raise TypeError(f"Expected resume to be a bool, 'auto' or a path, but got {type(resume).__name__}.")


# ----------------------------------------------------------------------------- fit
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
    progress=True,
    log_dir=None,
    checkpoint_dir=None,
    checkpoint_every=None,
    resume=False,
    max_bad_steps=10,
    handle_signals=False,
    living_kl=0.01,
):
    """Fit a network by SVI on minibatches.

    The optimiser trains ``network.parameters()``; the model and guide run inside
    :func:`~vdn_pyro.primitives.module_params`, so Pyro's global param store is left untouched
    and two networks never share parameters.

    :param network: any :class:`torch.nn.Module` that contains
        :class:`~vdn_pyro.models.Neurons` layers, called as ``model(x, y, num_data=N)``: its
        ``model`` and ``guide`` when it has them (e.g. :class:`~vdn_pyro.VDN`), else the module
        itself and :class:`~vdn_pyro.guides.NeuronGuide` ``(network)``.
    :param x: inputs ``(N, ...)``.
    :param y: targets ``(N, ...)``.
    :param int steps: total number of optimisation steps (exclusive with ``epochs``). On resume
        this is the total including the steps already taken, so resuming with the same
        arguments finishes the original run.
    :param int epochs: total number of passes over the data (same convention).
    :param int batch_size: minibatch size B (clipped at N).
    :param float lr: learning rate.
    :param optim: ``"adam"``, ``"clipped_adam"``, ``"adamw"``, or ``callable(params) ->
        torch.optim.Optimizer``.
    :param elbo: a :class:`~vdn_pyro.inference.LocalELBO` (default: mean-field, 1 particle).
    :param val_data: optional ``(x_val, y_val)``. Validation runs on a fork of the random
        state, so it never changes the training trajectory.
    :param int val_every: validate every this many steps (default: once per epoch).
    :param int log_every: record history every this many steps (and at the last step).
    :param int seed: seeds the fit's own random state (the draws of the model and guide and the
        minibatch order). The fit runs on a fork of torch's global generator (and numpy's and
        Python's), so the caller's random state is the same after the fit as before, and the
        global RNG is never reseeded. ``None`` draws a fresh seed, reported in
        :attr:`FitResult.seed`. A resumed run continues the checkpoint's random state.
    :param callbacks: objects with optional ``on_fit_start(state)``, ``on_step_end(state)``
        and ``on_fit_end(state)`` methods; ``state`` is a :class:`FitState`. Skipped
        (non-finite) steps do not call ``on_step_end``.
    :param constraints: local constraints (see :mod:`vdn_pyro.inference.constraints`). Each is
        added to the ELBO's hooks (``transform_kl``, ``penalty``) and to the callbacks
        (``on_fit_start``, ``on_step_end``, ``on_fit_end``), whichever it defines. Constraints
        with ``state_dict()``/``load_state_dict()`` have their state checkpointed.
    :param bool restore_best: load the best-validation state into the network at the end.
    :param device: move the network and data to this device (default: where the network is).
    :param bool progress: show a :mod:`tqdm` bar on stderr with the loss, the ELBO per
        observation, the fraction of living units and, when there are any, the number of skipped
        (non-finite) steps. It never changes the logs.
    :param log_dir: if given, write ``log.csv`` (columns :data:`LOG_COLUMNS`) and ``log.jsonl``
        (the same plus per-unit ``kl`` and ``beta`` by site) there, one row per logged step,
        flushed as written. ``living`` is the fraction of units whose KL exceeds ``living_kl``.
    :param checkpoint_dir: if given, write ``last.pt`` there every ``checkpoint_every`` steps,
        at the end, and on SIGINT/SIGTERM (atomically: see
        :func:`~vdn_pyro.inference.checkpoint.save_checkpoint`). A checkpoint holds the network,
        optimizer, constraint and random states, the minibatch order, the step and the history.
    :param int checkpoint_every: steps between checkpoints (default: once per epoch).
    :param resume: ``False`` (fresh run), ``True`` (resume from ``checkpoint_dir/last.pt``, which
        must exist), ``"auto"`` (resume if it exists) or the path of a checkpoint file or
        directory. Resuming needs the same architecture, data size and batch size; it restores
        everything above, so the continuation is exact (bit-identical on CPU).
    :param int max_bad_steps: raise :class:`NonFiniteError` after this many steps in a row with
        a non-finite loss or gradient (each is skipped with a :class:`RuntimeWarning`).
    :param bool handle_signals: catch SIGINT/SIGTERM (main thread only; off by default, as a
        library should leave a program's signal handlers alone; the ``vdn`` CLI turns it on):
        finish the step, write a final checkpoint, log a message and return with
        ``interrupted=True`` (see :attr:`FitResult.exit_code`). A second signal raises
        :class:`KeyboardInterrupt` at once. The handlers are installed whatever the inherited
        disposition (also over ``SIG_IGN``) and the previous ones are restored on return.
    :param float living_kl: KL threshold (nats) above which a unit counts as living.
    :returns: a :class:`FitResult`.
    :raises NonFiniteError: after ``max_bad_steps`` non-finite steps in a row, or at the end of
        a fit (or of a resumed part) none of whose steps was finite.
    :raises ~vdn_pyro.inference.checkpoint.CheckpointError: if the checkpoint to resume from is
        unreadable, foreign or incompatible.
    """
    model, guide = _model_and_guide(network)
    x, y = _as_tensor("x", x), _as_tensor("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected x and y with the same number of rows, but got {x.shape[0]} and {y.shape[0]}."
        )
    network.check_inputs(x, y) if hasattr(network, "check_inputs") else None
    if (steps is None) == (epochs is None):
        raise ValueError(
            "Expected exactly one of steps or epochs; got steps="
            f"{steps}, epochs={epochs}. Pass e.g. steps=1000 or epochs=10."
        )
    _check_positive_int("steps", steps, allow_none=True)
    _check_positive_int("epochs", epochs, allow_none=True)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("log_every", log_every)
    _check_positive_int("val_every", val_every, allow_none=True)
    _check_positive_int("checkpoint_every", checkpoint_every, allow_none=True)
    _check_positive_int("max_bad_steps", max_bad_steps)
    _check_seed(seed)
    if not (isinstance(lr, numbers.Real) and lr > 0):
        raise ValueError(f"Expected lr > 0, but got {lr!r}.")
    if val_data is not None:
        if not isinstance(val_data, (tuple, list)) or len(val_data) != 2:
            raise TypeError("Expected val_data to be a pair (x_val, y_val).")
        x_val, y_val = (_as_tensor(n, v) for n, v in zip(("x_val", "y_val"), val_data))
        if hasattr(network, "check_inputs"):
            network.check_inputs(x_val, y_val)
    resume_path = _resume_path(resume, checkpoint_dir)
    checkpoint = load_checkpoint(resume_path, network=network) if resume_path is not None else None
    if seed is None:  # fresh entropy from a private generator: the global one is not touched
        seed = int(torch.Generator().seed() % 2**31)
    generator = torch.Generator().manual_seed(seed)

    n = x.shape[0]
    batch_size = min(batch_size, n)
    per_epoch = math.ceil(n / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    val_every = val_every or per_epoch
    checkpoint_every = checkpoint_every or per_epoch
    digest = data_digest(x, y) if (checkpoint_dir is not None or checkpoint is not None) else None
    elbo = elbo or LocalELBO()
    constraints = list(constraints)
    callbacks = constraints + list(callbacks)
    if device is not None:
        network.to(device)
    else:
        device = next(iter(network.parameters()), torch.empty(0)).device
    x, y = x.to(device), y.to(device)
    val = None if val_data is None else (x_val.to(device), y_val.to(device))
    named_params = [(name, p) for name, p in network.named_parameters() if p.requires_grad]
    optimizer = _make_optimizer(optim, [p for _, p in named_params], lr)

    result = FitResult(network, [], {}, {}, [], math.nan, -1, {}, 0, 0.0, {}, seed=seed)
    state = FitState(network, optimizer, elbo, history=result)
    order, cursor, start = None, 0, 0
    if checkpoint is not None:
        start, order, cursor = _restore(
            checkpoint, resume_path, optimizer, constraints, result, state, n, batch_size, total, digest
        )
        order = order.to(device)
        state.step = result.resumed_from = start
        result.seed = checkpoint["fit"].get("seed", seed)
        network.load_state_dict(checkpoint["network"])  # what on_fit_start sees
    previous_seconds = result.seconds

    def write_checkpoint(final):
        payload = {
            "step": state.step,
            "epoch": state.epoch,
            "cursor": cursor,
            "order": order.cpu(),
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "optimizer_class": _optimizer_name(optimizer),
            "constraints": [
                {"type": type(c).__name__, "state": c.state_dict() if hasattr(c, "state_dict") else None}
                for c in constraints
            ],
            "rng": get_rng_state(generator),
            "history": _history_payload(result),
            "data": {"num_data": n, "batch_size": batch_size, "digest": digest},
            "fit": {"total_steps": total, "per_epoch": per_epoch, "seed": seed, "lr": float(lr)},
            "stop_reason": result.stop_reason if final else "running",
        }
        payload["config"], payload["config_repr"] = config_payload(network)
        path = save_checkpoint(Path(checkpoint_dir) / LAST_CHECKPOINT, payload, network=network)
        result.checkpoint_path = str(path)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_private_rng(seed))
        stack.enter_context(module_params())
        user_hooks = list(elbo.hooks)  # the constraints are the ELBO's hooks for this fit only
        elbo.hooks = [h for h in user_hooks if h not in constraints] + constraints
        stack.callback(setattr, elbo, "hooks", user_hooks)
        for cb in callbacks:
            getattr(cb, "on_fit_start", lambda s: None)(state)
        if checkpoint is not None:  # again after on_fit_start, whose side effects must not shift it
            network.load_state_dict(checkpoint["network"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            _restore_constraints(checkpoint, resume_path, constraints)
            set_rng_state(checkpoint["rng"], generator)
        else:
            order = torch.randperm(n, generator=generator).to(device)
        run_log = None
        if log_dir is not None:
            run_log = stack.enter_context(_RunLog(log_dir, start if checkpoint is not None else None))
        bar = stack.enter_context(
            tqdm(total=total, initial=start, disable=not progress, desc="fit", unit="step", file=sys.stderr)
        )
        catcher = stack.enter_context(_SignalCatcher(handle_signals))
        session_start, bad_in_row, problem, postfix = time.perf_counter(), 0, None, {}
        network.train()
        for step in range(start + 1, total + 1):
            if cursor >= n:
                order, cursor = torch.randperm(n, generator=generator).to(device), 0
                state.epoch += 1
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            state.step = step
            optimizer.zero_grad(set_to_none=True)
            loss, stats = elbo.loss_and_stats(model, guide, x[idx], y[idx], num_data=n)
            problem = None
            if not bool(torch.isfinite(loss.detach())):
                problem = f"the loss is {float(loss.detach())}"
            else:
                loss.backward()
                bad = _first_nonfinite_grad(named_params)
                if bad is not None:
                    problem = f"the gradient of '{bad}' holds NaN or inf"
            if problem is not None:  # skip the update; callbacks do not see the step
                optimizer.zero_grad(set_to_none=True)
                bad_in_row += 1
                result.skipped_steps.append(step)
                _on_bad_step(step, problem, bad_in_row, max_bad_steps, result)
            else:
                optimizer.step()
                bad_in_row = 0
                state.loss, state.stats = float(loss.detach()), stats
                living = _living_fraction(stats, living_kl) if (progress or run_log) else math.nan
                if step % log_every == 0 or step == total:
                    last = step == total
                    row = _log_step(network, elbo, result, state, stats, n, last, val_every, val, device)
                    if run_log is not None:
                        seconds = previous_seconds + time.perf_counter() - session_start
                        skipped = len(result.skipped_steps)
                        run_log.write(_log_row(row, stats, network, living, skipped, seconds))
                for cb in callbacks:
                    getattr(cb, "on_step_end", lambda s: None)(state)
                if progress:
                    postfix = {"loss": f"{state.loss:.4g}", "elbo/obs": f"{-state.loss / n:.4g}"}
                    _show_living(postfix, state, living, result)
                    bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if state.stop:
                result.stop_reason = "callback"
            if catcher.received is not None:
                result.stop_reason, result.interrupted = catcher.received, True
            if state.stop or result.interrupted:
                break
            if checkpoint_dir is not None and step % checkpoint_every == 0 and step != total:
                result.seconds = previous_seconds + time.perf_counter() - session_start
                write_checkpoint(final=False)
        network.eval()
        result.seconds = previous_seconds + time.perf_counter() - session_start
        if bad_in_row and bad_in_row == state.step - start and not result.interrupted:
            _no_finite_step(start + 1, state.step, problem, result)
        if checkpoint_dir is not None:
            write_checkpoint(final=True)
        result.unit_kl = {k: np.stack(v) for k, v in result.unit_kl.items()}
        result.unit_beta = {k: np.stack(v) for k, v in result.unit_beta.items()}
        result.steps = state.step
        result.optimizer_state = optimizer.state_dict()
        if restore_best and result.best_state:
            network.load_state_dict(result.best_state)
        for cb in callbacks:
            getattr(cb, "on_fit_end", lambda s: None)(state)
        if progress and state.living is not None:  # a final table measured by a callback
            _show_living(postfix, state, math.nan, result)
            bar.set_postfix(postfix, refresh=True)
        bar.close()
        if result.interrupted:
            _report_interruption(result, state.step, total, checkpoint_dir)
    return result


def _show_living(postfix, state, living, result):
    """The bar's ``living`` (a callback's measure when it gave one, else the step's KL count)
    and ``skipped`` entries."""
    living = state.living if state.living is not None else living
    if not math.isnan(living):
        postfix["living"] = f"{living:.0%}"
    if result.skipped_steps:
        postfix["skipped"] = len(result.skipped_steps)


def _report_interruption(result, step, total, checkpoint_dir):
    if checkpoint_dir is not None:
        where = f"; checkpoint written to {result.checkpoint_path}"
        how = f" Resume with fit(..., checkpoint_dir={str(checkpoint_dir)!r}, resume=True)."
    else:
        where, how = "", " Pass checkpoint_dir=... to be able to resume."
    logger.warning(
        "fit interrupted by %s after step %d of %d%s.%s", result.stop_reason, step, total, where, how
    )


def _no_finite_step(first, last, problem, result):
    """Every step of this fit (or of this resumed part) was skipped: its parameters are the ones
    it started from, so it must not report a completed run."""
    saved = f" The last checkpoint is {result.checkpoint_path}." if result.checkpoint_path else ""
    raise NonFiniteError(
        f"Expected at least one finite step, but every step of the fit ({first} to {last}) had a "
        f"non-finite loss or gradient (last: {problem}), so the network keeps the parameters it "
        f"started with.{saved} Try a smaller lr, optim='clipped_adam', a larger beta or scale_min, "
        "or check the data for extreme values.",
        first=first,
        last=last,
        problem=problem,
        checkpoint=result.checkpoint_path,
    )


def _on_bad_step(step, problem, bad_in_row, max_bad_steps, result):
    if bad_in_row >= max_bad_steps:
        first = step - bad_in_row + 1
        saved = f" The last checkpoint is {result.checkpoint_path}." if result.checkpoint_path else ""
        raise NonFiniteError(
            f"Expected a finite loss and gradient, but {bad_in_row} steps in a row ({first} to "
            f"{step}) were not finite (last: {problem}). The network keeps its last finite "
            f"parameters.{saved} Try a smaller lr, optim='clipped_adam', a larger beta or "
            "scale_min, or check the data for extreme values.",
            first=first,
            last=step,
            problem=problem,
            checkpoint=result.checkpoint_path,
        )
    warnings.warn(
        f"Step {step}: {problem}; skipped the update ({bad_in_row} in a row, stopping at {max_bad_steps}).",
        RuntimeWarning,
        stacklevel=3,
    )


def _log_step(network, elbo, result, state, stats, n, last, val_every, val_data, device):
    """Append one history row (and per-unit KL/beta) to ``result``; returns the row."""
    step = state.step
    row = {"step": step, "epoch": state.epoch, "loss": state.loss, "loss_per_obs": state.loss / n}
    if val_data is not None and (step % val_every == 0 or last):
        network.eval()
        with _forked_rng(device):
            row["val_loss"] = evaluate_loss(network, *val_data, elbo)
        network.train()
        if not row["val_loss"] >= result.best_val_loss:  # also true while best is nan
            result.best_val_loss, result.best_step = row["val_loss"], step
            result.best_state = copy.deepcopy(network.state_dict())
    result.history.append(row)
    result.logged_steps.append(step)
    for name, s in stats.items():
        result.unit_kl.setdefault(name, []).append(s.kl.cpu().numpy())
    for layer in find_neurons(network):
        result.unit_beta.setdefault(layer.site, []).append(layer.beta.cpu().numpy().copy())
    return row


def _log_row(row, stats, network, living, skipped, seconds):
    out = {
        "step": row["step"],
        "epoch": row["epoch"],
        "loss": _clean(row["loss"]),
        "loss_per_obs": _clean(row["loss_per_obs"]),
        "elbo_per_obs": _clean(-row["loss_per_obs"]),
        "val_loss": _clean(row.get("val_loss")),
        "living": _clean(living),
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "kl": {name: [_clean(v) for v in s.kl.cpu().tolist()] for name, s in stats.items()},
        "beta": {
            layer.site: [_clean(v) for v in layer.beta.cpu().tolist()] for layer in find_neurons(network)
        },
    }
    return out


def _restore(checkpoint, path, optimizer, constraints, result, state, n, batch_size, total, digest):
    """Check that a checkpoint can continue this fit and load its history (the network,
    optimizer, constraint and random states are loaded after ``on_fit_start``); returns
    ``(step, order, cursor)``. Every check comes before any callback runs, so a refused resume
    has no side effect."""
    data = checkpoint["data"]
    if data["num_data"] != n or data["batch_size"] != batch_size:
        raise IncompatibleCheckpointError(
            f"Checkpoint {path} was written for N={data['num_data']} rows in batches of "
            f"{data['batch_size']}, but this fit has N={n} and batch_size={batch_size}. An exact "
            "resume needs the same data and batch size; to start a new fit from its weights, use "
            "network.load_state_dict(load_checkpoint(path)['network']) and resume=False."
        )
    if data.get("digest") and digest and data["digest"] != digest:
        warnings.warn(
            f"Resuming from {path} on data that differ from the data it was trained on (same "
            "shape, different values); the continuation is not the original run.",
            UserWarning,
            stacklevel=3,
        )
    step = checkpoint["step"]
    if step > total:
        raise ValueError(
            f"Checkpoint {path} is at step {step}, beyond the {total} steps asked for. Steps and "
            "epochs count from the start of the run: ask for more, or resume=False."
        )
    if checkpoint["optimizer_class"] != _optimizer_name(optimizer):
        raise IncompatibleCheckpointError(
            f"Checkpoint {path} holds the state of a {checkpoint['optimizer_class']} optimizer, "
            f"but this fit uses {_optimizer_name(optimizer)}. Resume with the same optim."
        )
    _check_constraint_types(checkpoint, path, constraints)
    _restore_history(result, checkpoint["history"])
    state.epoch = checkpoint["epoch"]
    return step, checkpoint["order"], checkpoint["cursor"]


def _check_constraint_types(checkpoint, path, constraints):
    saved = [s["type"] for s in checkpoint["constraints"]]
    names = [type(c).__name__ for c in constraints]
    if saved != names:
        raise IncompatibleCheckpointError(
            f"Checkpoint {path} was written with constraints {saved}, but this fit has {names}. "
            "Resume with the same constraints, in the same order."
        )


def _restore_constraints(checkpoint, path, constraints):
    _check_constraint_types(checkpoint, path, constraints)
    saved = checkpoint["constraints"]
    for c, s in zip(constraints, saved):
        if s["state"] is not None and hasattr(c, "load_state_dict"):
            c.load_state_dict(s["state"])

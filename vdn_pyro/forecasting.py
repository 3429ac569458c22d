r"""The training recipe of every forecaster, and the harness that scores it.

One recipe trains every model -- ``vdn fit``, the examples and the benchmarks all call
:func:`train_forecaster` with a :class:`TrainConfig` -- so comparisons are like for like:

- **training** (:func:`train_forecaster`): windows (or chunks of T windows) from the training rows,
  optionally subsampled by ``train_stride``; :func:`~vdn_pyro.fit` with Adam and a learning rate
  multiplied by ``lr_decay`` every epoch (:class:`EpochDecay`); once per epoch every validation
  window is scored (:class:`ValidationSelector`, by default on the CRPS, a proper scoring rule
  that rewards both an accurate mean and a calibrated spread; ``select="loss"`` uses fit's
  validation ELBO instead, with :class:`EarlyStopping`), training stops after ``patience``
  epochs without improvement and the best-validation state is restored; point baselines get their
  predictive scale from the training residuals (before every validation, and at the end).
  Optionally a forecaster is trained in two stages (``skip_fit`` or ``skip_from``): its DLinear
  skip path is fitted alone first, in closed form (:func:`fit_least_squares`: ridge least
  squares, the penalty chosen on the validation MSE) or by the same gradient recipe, then frozen
  while the rest is fitted by the ELBO. Logs, checkpoints and exact resume are :func:`fit`'s,
  passed through; the selection state lives in the :class:`~vdn_pyro.FitResult`, so a resumed run
  selects as the uninterrupted one would;
- **input normalisation** (``norm``, :data:`NORMS`): none, the window's last value, or its mean
  and standard deviation (:func:`window_stats`); the model is fitted to normalised windows and
  targets and scored, like selected, in the original units through :class:`Normalised`;
- **scoring** (:func:`evaluate_forecaster`): every window of the split, in batches, through each
  model's ``predict(x, num_samples)``, a :class:`~vdn_pyro.models.ForecastPrediction`, or, when
  the model's predictive marginal is exactly Gaussian (``has_exact_marginal``), through
  ``predict_marginal(x)``: the :math:`S \to \infty` limit of the Monte Carlo predictive. A
  prediction with its own exact ``scores`` (the Student-t controls,
  :class:`~vdn_pyro.models.baselines.StudentTPrediction`) is scored by them.

Metrics (all averaged over every window, channel and horizon step, on the scaled values):

- ``mse``, ``mae``: of the predictive mean: the model's exact mean when its prediction carries
  one (``ForecastPrediction.point``, e.g. the roll-out forecaster's), else the mean of the
  mixture's components, which carries their Monte Carlo error;
- ``crps``: closed form for one Gaussian; for a Monte Carlo mixture, the unbiased ("fair") sample
  CRPS of its S draws (:func:`vdn_pyro.metrics.crps_samples`);
- ``nll``: minus the predictive log density; for a mixture, of the S-component Gaussian mixture
  itself (exact for that mixture; a Gaussian NLL of the moment-matched forecast would
  misstate a non-Gaussian predictive);
- ``coverage_50``, ``coverage_90``: fraction of observations inside the central interval, computed
  exactly from the predictive CDF (PIT in :math:`[(1-\ell)/2, (1+\ell)/2]`), since sample
  quantiles of S draws cover about :math:`\ell\,(S-1)/(S+1)` only;
- ``width_50``, ``width_90``: mean interval width (closed form for one Gaussian, sample quantiles
  for a mixture).

Every one-Gaussian metric comes from :func:`vdn_pyro.metrics.forecast_metrics`; mixtures use it for
MSE, MAE, CRPS and widths. With ``paths=True`` the ``num_samples`` joint sample paths of
``model.predict`` are also scored over the horizon (:data:`PATH_METRICS`, averaged over windows,
:func:`vdn_pyro.metrics.path_metrics`): the energy score, the CRPS of the horizon sum and the
coverage and width of the sum's central 50% and 90% intervals.
"""

import contextlib
import copy
import dataclasses
import math
import time

import torch

from vdn_pyro.data.windows import window_chunks
from vdn_pyro.inference.elbo import LocalELBO
from vdn_pyro.inference.fit import fit
from vdn_pyro.metrics import forecast_metrics, path_metrics
from vdn_pyro.models.baselines import DLinear, normal_equations, solve_ridge
from vdn_pyro.models.forecaster import ForecastPrediction

__all__ = [
    "METRICS",
    "NORMS",
    "OPTIMIZERS",
    "PATH_METRICS",
    "RIDGES",
    "SELECTIONS",
    "SKIP_FITS",
    "EarlyStopping",
    "EpochDecay",
    "Normalised",
    "TrainConfig",
    "ValidationSelector",
    "evaluate_forecaster",
    "fit_least_squares",
    "fit_skip",
    "normalise_windows",
    "normalised",
    "score_prediction",
    "train_forecaster",
    "training_windows",
    "window_stats",
]

#: The metrics returned by :func:`score_prediction`, in report order.
METRICS = ("mse", "mae", "crps", "nll", "coverage_50", "coverage_90", "width_50", "width_90")
#: The path scores of the horizon added by ``paths=True`` (:func:`vdn_pyro.metrics.path_metrics`).
PATH_METRICS = ("energy", "crps_sum", "coverage_50_sum", "coverage_90_sum", "width_50_sum", "width_90_sum")
#: Input normalisations of a window (:func:`window_stats`): none, the last value, the window's
#: mean and standard deviation.
NORMS = ("none", "last", "mean_scale")
#: Added to a window's variance by the ``mean_scale`` normalisation.
NORM_EPS = 1e-5
#: Validation criteria for model selection: a metric of :data:`METRICS`, a path score of
#: :data:`PATH_METRICS` (scored on joint sample paths) or fit's ELBO ``loss``.
SELECTIONS = ("crps", "mse", "nll", "energy", "crps_sum", "loss")
#: The path scores of :data:`SELECTIONS`: a model selected on one is scored on joint sample paths.
_PATH_SELECTIONS = ("energy", "crps_sum")
#: How a forecaster's skip path is fitted: with the rest (``joint``), or first and then frozen, by
#: gradient steps (``sgd``) or in closed form (``ridge``).
SKIP_FITS = ("joint", "sgd", "ridge")
#: Ridge penalties (per observation) tried by :func:`fit_least_squares`.
RIDGES = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
#: Optimisers by name (see :func:`~vdn_pyro.fit`).
OPTIMIZERS = ("adam", "clipped_adam", "adamw")


@dataclasses.dataclass
class TrainConfig:
    """The training recipe shared by every model (``vdn fit`` builds one from its ``fit`` and
    ``data`` sections: :meth:`vdn_pyro.config.RunConfig.train_config`).

    :ivar int epochs: maximum number of passes over the training items (ignored when ``steps``
        is set).
    :ivar steps: maximum number of optimisation steps, or ``None`` to use ``epochs``.
    :ivar int batch_size: training items per step.
    :ivar float lr: initial learning rate.
    :ivar float lr_decay: learning-rate factor applied at every new epoch (1: constant).
    :ivar optim: an optimiser name of :data:`OPTIMIZERS`, or ``callable(params)``.
    :ivar int patience: stop after this many validations without a better score (0: never).
    :ivar str select: validation criterion, one of :data:`SELECTIONS` (lower is better).
    :ivar int train_stride: rows between consecutive training windows (1: every window; larger
        values subsample the training windows).
    :ivar int chunk: windows per training item T (1: static windows); consecutive windows of a
        chunk are ``train_stride`` rows apart and chunks tile the windows without overlap.
    :ivar int val_stride: rows between validation windows (1: every window).
    :ivar int num_samples: predictive draws S per validation window when selecting on a metric.
    :ivar int eval_batch_size: windows per scoring batch.
    :ivar int num_particles: ELBO particles.
    :ivar str skip_fit: how a forecaster's skip path is fitted, one of :data:`SKIP_FITS`:
        ``"joint"`` with the rest; ``"sgd"``: first, alone, as a
        :class:`~vdn_pyro.models.DLinear` with this recipe, then frozen; ``"ridge"``: first, in
        closed form (:func:`fit_least_squares`), then frozen.
    :ivar tuple ridges: penalties tried by ``skip_fit="ridge"``.
    :ivar str norm: input normalisation of every window, one of :data:`NORMS`
        (:func:`window_stats`): the model is trained on normalised windows and targets, and
        selected, like the caller scores it, through :class:`Normalised` in the original units.
    :ivar bool start_at_skip: with a fitted skip path, start the forecaster at that DLinear's
        Gaussian predictive (zero head, its calibrated scale;
        :meth:`~vdn_pyro.models.Forecaster.init_skip`) and score the validation split once
        before training, so the starting state is a selection candidate.
    :ivar val_every: steps between validations, or ``None`` for once per epoch.
    :ivar log_every: steps between history rows, or ``None`` for once per epoch.
    :ivar bool restore_best: end with the best-validation state (else the last one).
    :ivar int max_bad_steps: stop after this many non-finite steps in a row.
    :ivar float living_kl: KL (nats) above which a unit counts as living in the logs.
    """

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 256
    lr: float = 5e-3
    lr_decay: float = 0.5
    optim: object = "adam"
    patience: int = 3
    select: str = "crps"
    train_stride: int = 1
    chunk: int = 1
    val_stride: int = 1
    num_samples: int = 100
    eval_batch_size: int = 512
    num_particles: int = 1
    skip_fit: str = "joint"
    ridges: tuple = RIDGES
    norm: str = "none"
    start_at_skip: bool = True
    val_every: int | None = None
    log_every: int | None = None
    restore_best: bool = True
    max_bad_steps: int = 10
    living_kl: float = 0.01

    def __post_init__(self):
        names = (
            "epochs",
            "batch_size",
            "train_stride",
            "chunk",
            "val_stride",
            "num_samples",
            "eval_batch_size",
            "num_particles",
            "max_bad_steps",
            "steps",
            "val_every",
            "log_every",
        )
        for name in names:
            value = getattr(self, name)
            if value is None and name in ("steps", "val_every", "log_every"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected {name} to be an int >= 1, but got {value!r}.")
        if not self.lr > 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(f"Expected lr > 0 and 0 < lr_decay <= 1, got {self.lr}, {self.lr_decay}.")
        if self.patience < 0:
            raise ValueError(f"Expected patience >= 0, but got {self.patience}.")
        if self.select not in SELECTIONS:
            raise ValueError(f"Expected select in {SELECTIONS}, but got {self.select!r}.")
        if self.skip_fit not in SKIP_FITS:
            raise ValueError(f"Expected skip_fit in {SKIP_FITS}, but got {self.skip_fit!r}.")
        if not (callable(self.optim) or self.optim in OPTIMIZERS):
            raise ValueError(f"Expected optim in {OPTIMIZERS} or callable(params), but got {self.optim!r}.")
        if not self.living_kl >= 0:
            raise ValueError(f"Expected living_kl >= 0, but got {self.living_kl!r}.")
        if self.norm not in NORMS:
            raise ValueError(f"Expected norm in {NORMS}, but got {self.norm!r}.")
        self.ridges = _check_ridges(self.ridges)


def _check_ridges(ridges):
    """``ridges`` as a tuple, or ``ValueError`` unless it is a non-empty sequence of numbers >= 0."""
    out = tuple(ridges) if isinstance(ridges, (list, tuple)) else ()
    if not out or not all(isinstance(r, (int, float)) and math.isfinite(r) and r >= 0 for r in out):
        raise ValueError(f"Expected ridges to be a non-empty sequence of numbers >= 0, but got {ridges!r}.")
    return out


class EpochDecay:
    """Fit callback: multiply every learning rate by ``decay`` at each new epoch.

    :param float decay: factor in (0, 1].
    """

    def __init__(self, decay):
        self.decay = float(decay)
        self.epoch = 0

    def on_fit_start(self, state):
        self.epoch = state.epoch

    def on_step_end(self, state):
        while self.epoch < state.epoch:
            self.epoch += 1
            for group in state.optimizer.param_groups:
                group["lr"] *= self.decay


class EarlyStopping:
    """Fit callback: stop after ``patience`` validations without a new best validation loss.

    On resume it rebuilds its wait count from the history, so a resumed run stops where the
    uninterrupted one would.

    :param int patience: validations to wait (0 disables stopping).
    """

    def __init__(self, patience):
        self.patience = int(patience)
        self.waited = 0
        self.stopped_step = None

    def on_fit_start(self, state):
        best, self.waited = math.inf, 0
        rows = state.history.history if state.history is not None else []
        for row in rows:
            val = row.get("val_loss")
            if val is None or not math.isfinite(val):
                continue
            if val < best:
                best, self.waited = val, 0
            else:
                self.waited += 1

    def on_step_end(self, state):
        rows = state.history.history
        if not self.patience or not rows or rows[-1]["step"] != state.step or "val_loss" not in rows[-1]:
            return
        if state.history.best_step == state.step:
            self.waited = 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            state.stop, self.stopped_step = True, state.step


class ValidationSelector:
    """Fit callback: score every validation window every ``every`` steps, keep the best state,
    stop after ``patience`` scorings without improvement, and load the best state at the end.

    Scoring runs on a fork of torch's random state, so it never changes the training draws. The
    best score, its step and its state are also written to the fit's
    :class:`~vdn_pyro.FitResult` (``best_val_loss``, ``best_step``, ``best_state``), which
    :func:`~vdn_pyro.fit` checkpoints, and each score to the history row of its step, if logged,
    as ``"val_<metric>"``; a resumed fit picks the selection up from there.

    :param model: the model being fitted (with ``predict``; see :func:`evaluate_forecaster`).
    :param torch.Tensor x_val: validation windows ``(N, L)``.
    :param torch.Tensor y_val: ``(N, H)``.
    :param str metric: a key of :data:`METRICS` or ``"energy"``/``"crps_sum"`` of
        :data:`PATH_METRICS` (lower is better; the path scores read the model's joint sample
        paths).
    :param int every: steps between scorings (one epoch in :func:`train_forecaster`).
    :param int patience: scorings to wait (0: never stop early).
    :param callable before: called before each scoring (e.g. a point baseline's calibration).
    :param int num_samples: predictive draws when the model has no exact marginal.
    :param bool score_start: also score the state before the first step (step 0), which then
        competes with the trained states.
    :param int batch_size: windows per scoring batch.
    :param bool restore: load the best state at the end.
    :ivar list history: ``(step, score)`` pairs.
    :ivar float best: the best score. :ivar int best_step: its step.
    """

    def __init__(
        self,
        model,
        x_val,
        y_val,
        metric="crps",
        every=1,
        patience=3,
        before=None,
        num_samples=100,
        score_start=False,
        batch_size=512,
        restore=True,
    ):
        allowed = METRICS + _PATH_SELECTIONS
        if metric not in allowed:
            raise ValueError(f"Expected metric in {allowed}, but got {metric!r}.")
        self.model, self.x_val, self.y_val = model, x_val, y_val
        self.metric, self.every, self.patience = metric, int(every), int(patience)
        self.before, self.num_samples, self.batch_size = before, num_samples, batch_size
        self.history, self.best, self.best_step, self.best_state = [], math.inf, -1, None
        self.waited, self.score_start, self.restore = 0, bool(score_start), bool(restore)

    @property
    def key(self):
        """The history key of the scores, ``"val_<metric>"``."""
        return f"val_{self.metric}"

    def on_fit_start(self, state):
        result = state.history
        if state.step > 0 and result is not None:  # resumed: the selection so far is in the result
            self.history = [(row["step"], row[self.key]) for row in result.history if self.key in row]
            if result.best_step >= 0 and math.isfinite(result.best_val_loss):
                self.best, self.best_step = result.best_val_loss, result.best_step
                self.best_state = result.best_state or None
                # one scoring at every multiple of `every`: those after the best one were waited
                self.waited = state.step // self.every - result.best_step // self.every
            return
        if self.score_start and state.step == 0:
            self.on_step_end(state)

    def score(self):
        """The validation score of the model's current state."""
        rng = torch.get_rng_state()
        try:
            if self.before is not None:
                self.before()
            scores = evaluate_forecaster(
                self.model,
                self.x_val,
                self.y_val,
                self.num_samples,
                batch_size=self.batch_size,
                seed=None,
                metrics=(self.metric,),
                paths=self.metric in PATH_METRICS,
            )
        finally:
            torch.set_rng_state(rng)
            self.model.train()
        return scores[self.metric]

    def on_step_end(self, state):
        if state.step % self.every:
            return
        value = self.score()
        self.history.append((state.step, value))
        result = state.history
        if result is not None and result.history and result.history[-1]["step"] == state.step:
            result.history[-1][self.key] = value
        if value < self.best:
            self.best, self.best_step, self.waited = value, state.step, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            if result is not None:
                result.best_val_loss, result.best_step = value, state.step
                result.best_state = self.best_state
            return
        self.waited += 1
        if self.patience and self.waited >= self.patience:
            state.stop = True

    def on_fit_end(self, state):
        if self.restore and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.model.eval()


def window_stats(x, norm):
    r"""The per-window statistics of an input normalisation: the forecast of a window is made for
    :math:`(x - \mathrm{loc}) / \mathrm{scale}` and mapped back by :math:`y = \mathrm{loc} +
    \mathrm{scale}\,y'`.

    - ``"none"``: ``(None, None)``;
    - ``"last"``: the window's last value, scale 1 (NLinear);
    - ``"mean_scale"``: the window's mean and standard deviation, :math:`\sqrt{\mathrm{Var}
      + 10^{-5}}` (RevIN without its affine parameters).

    :param torch.Tensor x: windows ``(..., L)``.
    :param str norm: one of :data:`NORMS`.
    :returns: ``(loc, scale)``, each ``(..., 1)`` (``scale`` ``None`` for ``"last"``).
    """
    if norm == "none":
        return None, None
    if norm == "last":
        return x[..., -1:], None  # (..., 1)
    if norm == "mean_scale":
        loc = x.mean(-1, keepdim=True)  # (..., 1)
        scale = (x.var(-1, unbiased=False, keepdim=True) + NORM_EPS).sqrt()  # (..., 1)
        return loc, scale
    raise ValueError(f"Expected norm in {NORMS}, but got {norm!r}.")


def normalise_windows(x, y=None, norm="none"):
    """Windows (and targets) in the units of an input normalisation (:func:`window_stats`).

    :param x: windows ``(..., L)``. :param y: targets ``(..., H)`` or ``None``.
    :param str norm: one of :data:`NORMS`.
    :returns: ``(x', y')`` of the same shapes (``y'`` ``None`` without ``y``); the inputs
        themselves for ``"none"``.
    """
    loc, scale = window_stats(x, norm)
    if loc is None:
        return x, y
    x = x - loc
    y = None if y is None else y - loc
    if scale is not None:
        x = x / scale
        y = None if y is None else y / scale
    return x, y


def _denormalise(pred, loc, scale):
    """``pred`` (made for normalised windows) in the original units: ``loc + scale * y'``."""
    factor = 1.0 if scale is None else scale
    if hasattr(pred, "affine"):
        return pred.affine(loc, factor)

    def mapped(t):
        return None if t is None else t * factor + loc

    return ForecastPrediction(mapped(pred.samples), mapped(pred.loc), pred.scale * factor, mapped(pred.point))


class Normalised:
    """A model that forecasts normalised windows, seen in the original units: ``predict(x)`` is
    the model's forecast of the normalised window (:func:`normalise_windows`) mapped back
    (samples, means and scales; the Jacobian of the map is in the scales, so the log
    densities are those of the original units). Everything the harness asks of a model (state,
    ``train``/``eval``, ``predict_marginal``) goes to the wrapped one.

    :param model: a model trained on normalised windows (:class:`TrainConfig` ``norm``).
    :param str norm: one of :data:`NORMS`.
    :ivar model: the wrapped model.
    """

    def __init__(self, model, norm):
        if norm not in NORMS:
            raise ValueError(f"Expected norm in {NORMS}, but got {norm!r}.")
        self.model, self.norm = model, norm

    def __repr__(self):
        return f"Normalised({self.norm!r}, {self.model!r})"

    @property
    def has_exact_marginal(self):
        """The wrapped model's: the map is affine, so an exact Gaussian stays one."""
        return getattr(self.model, "has_exact_marginal", False)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        return self.model.load_state_dict(state)

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        self.model.eval()
        return self

    def _predict(self, method, x, num_samples, batch_size):
        loc, scale = window_stats(x, self.norm)
        x_norm, _ = normalise_windows(x, None, self.norm)
        pred = getattr(self.model, method)(x_norm, num_samples, batch_size)
        return pred if loc is None else _denormalise(pred, loc, scale)

    def predict(self, x, num_samples=100, batch_size=None):
        """The wrapped model's ``predict`` of the normalised windows, in the original units.

        :param x: ``(B, [T,] L)``. :returns: a prediction with samples ``(S, B, [T,] H)``."""
        return self._predict("predict", x, num_samples, batch_size)

    def predict_marginal(self, x, num_samples=100, batch_size=None):
        """The wrapped model's ``predict_marginal``, in the original units."""
        return self._predict("predict_marginal", x, num_samples, batch_size)


def normalised(model, norm):
    """``model`` seen in the original units: :class:`Normalised`, or the model itself for
    ``"none"``."""
    return model if norm == "none" else Normalised(model, norm)


def training_windows(splits, config, split="train"):
    """Training items of one split: windows ``(N, L)``, or chunks ``(N, T, L)`` when
    ``config.chunk > 1``, with targets ``(N, [T,] H)``; channel-independent.

    :param splits: a :class:`~vdn_pyro.data.ForecastSplits`.
    :param TrainConfig config: uses ``train_stride`` and ``chunk``.
    :returns: ``(x, y)``.
    """
    values = getattr(splits, split)
    x, y = window_chunks(
        values, splits.lookback, splits.horizon, config.chunk, config.train_stride
    )  # (N, T, L), (N, T, H)
    if config.chunk == 1:
        x, y = x[:, 0], y[:, 0]  # (N, L), (N, H)
    return x, y


def fit_skip(model, splits, config=None, *, seed=0):
    """The first stage of ``config.skip_fit``: a :class:`~vdn_pyro.models.DLinear` shaped like
    ``model``'s skip path, fitted in closed form (``"ridge"``) or by this recipe (``"sgd"``).

    :param model: a :class:`~vdn_pyro.models.Forecaster` with a skip path.
    :param splits: a :class:`~vdn_pyro.data.ForecastSplits`.
    :param TrainConfig config: the recipe (``skip_fit``, ``ridges``, ``norm``: the DLinear is
        fitted to normalised windows, like the forecaster it is lent to).
    :param int seed: seeds the ``"sgd"`` fit.
    :returns: the fitted DLinear, or ``None`` under ``"joint"`` or without a skip path. The
        global random state is left as it was.
    """
    config = config or TrainConfig()
    if config.skip_fit == "joint" or getattr(model, "skip", None) is None:
        return None
    with torch.random.fork_rng(devices=[]):  # its initial weights leave the caller's stream as it was
        source = DLinear(splits.lookback, splits.horizon, model.skip.kernel_size, model.skip.instance_norm)
    if config.skip_fit == "ridge":
        fit_least_squares(source, splits, config.ridges, norm=config.norm)
    else:
        train_forecaster(source, splits, config, seed=seed)
    return source


def train_forecaster(
    model,
    splits,
    config=None,
    *,
    seed=0,
    callbacks=(),
    constraints=(),
    elbo=None,
    skip_from=None,
    progress=False,
    log_dir=None,
    checkpoint_dir=None,
    checkpoint_every=None,
    resume=False,
    handle_signals=False,
):
    """Train one model with the shared recipe (see the module docstring).

    Models without trainable parameters (:class:`~vdn_pyro.models.RepeatLast`) skip
    :func:`~vdn_pyro.fit`; models with a ``calibrate(x, y)`` method (point baselines) are then
    calibrated on the training windows. The global random state is left as it was (the fit
    draws from its own, seeded by ``seed``). With ``config.norm`` other than ``"none"`` the
    model is fitted (and calibrated) on normalised windows and targets and selected through
    :class:`Normalised` on the original validation windows; score it the same way
    (:func:`normalised`).

    :param model: a :class:`~vdn_pyro.models.Forecaster` or a point baseline.
    :param splits: a :class:`~vdn_pyro.data.ForecastSplits`.
    :param TrainConfig config: the recipe (default :class:`TrainConfig`).
    :param int seed: seeds the minibatch order and the ELBO's draws.
    :param callbacks: extra fit callbacks.
    :param constraints: local constraints passed to :func:`~vdn_pyro.fit`.
    :param elbo: the estimator (default :class:`~vdn_pyro.LocalELBO` with ``num_particles``).
    :param skip_from: a fitted :class:`~vdn_pyro.models.DLinear` to copy into a forecaster's
        skip path, frozen (:meth:`~vdn_pyro.models.Forecaster.init_skip`); with
        ``config.skip_fit`` other than ``"joint"`` and no ``skip_from``, one is fitted here first
        (:func:`fit_skip`; again on resume, where the checkpoint's weights then replace it).
    :param bool progress: show fit's progress bar.
    :param log_dir: where fit writes ``log.csv`` and ``log.jsonl`` (``None``: no logs).
    :param checkpoint_dir: where fit writes ``last.pt`` (``None``: no checkpoints).
    :param int checkpoint_every: steps between checkpoints (default: once per epoch).
    :param resume: fit's ``resume`` (``True`` continues from ``checkpoint_dir/last.pt``).
    :param bool handle_signals: let fit catch SIGINT/SIGTERM and stop with a checkpoint (for
        command-line programs).
    :returns: the :class:`~vdn_pyro.FitResult` (with ``best_val_loss``/``best_step`` holding the
        selection score and its step), or ``None`` when nothing was trained.
    """
    config = config or TrainConfig()
    if skip_from is None:
        skip_from = fit_skip(model, splits, config, seed=seed)
    if skip_from is not None:
        model.init_skip(skip_from, freeze=True, start_at_source=config.start_at_skip)
    x, y = normalise_windows(*training_windows(splits, config), config.norm)  # (N, [T,] L), (N, [T,] H)
    xs, ys = (x, y) if config.chunk == 1 else (x.flatten(0, 1), y.flatten(0, 1))  # (N', L), (N', H)
    calibrate = (lambda: model.calibrate(xs, ys)) if hasattr(model, "calibrate") else None
    result = None
    if any(p.requires_grad for p in model.parameters()):
        x_val, y_val = splits.windows("val", stride=config.val_stride)  # (W * C, L), (W * C, H)
        batch_size = min(config.batch_size, x.shape[0])
        every = config.val_every or math.ceil(x.shape[0] / batch_size)  # default: once per epoch
        if config.select == "loss":
            watchers = [EarlyStopping(config.patience)]
            val_data = normalise_windows(x_val, y_val, config.norm)
        else:
            selector = ValidationSelector(
                normalised(model, config.norm),
                x_val,
                y_val,
                config.select,
                every,
                config.patience,
                calibrate,
                config.num_samples,
                score_start=skip_from is not None and config.start_at_skip,
                batch_size=config.eval_batch_size,
                restore=config.restore_best,
            )
            watchers, val_data = [selector], None
        result = fit(
            model,
            x,
            y,
            steps=config.steps,
            epochs=None if config.steps is not None else config.epochs,
            batch_size=batch_size,
            lr=config.lr,
            optim=config.optim,
            elbo=elbo or LocalELBO(num_particles=config.num_particles),
            val_data=val_data,
            val_every=every,
            log_every=config.log_every or math.ceil(x.shape[0] / batch_size),
            seed=seed,
            callbacks=[EpochDecay(config.lr_decay), *watchers, *callbacks],
            constraints=constraints,
            restore_best=config.restore_best,
            progress=progress,
            log_dir=log_dir,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            resume=resume,
            max_bad_steps=config.max_bad_steps,
            handle_signals=handle_signals,
            living_kl=config.living_kl,
        )
    if calibrate is not None:
        calibrate()
    return result


@torch.no_grad()
def fit_least_squares(model, splits, ridges=RIDGES, stride=1, norm="none"):
    r"""Fit a :class:`~vdn_pyro.models.DLinear` in closed form, choosing the ridge penalty on the
    validation MSE (the test split is not read).

    The normal equations of the training windows (every ``stride``-th) are formed once; each
    penalty is one solve. The chosen fit is kept and :meth:`~vdn_pyro.models.DLinear.calibrate`\ d
    on the training windows. With ``norm`` the fit is the least-squares fit of the normalised
    targets on the normalised windows (:func:`normalise_windows`), and the validation MSE is that
    of its forecasts mapped back to the original units (score it through :func:`normalised`).

    :param model: the :class:`~vdn_pyro.models.DLinear` to fit (its look-back, horizon and
        instance normalisation are used as they are).
    :param splits: a :class:`~vdn_pyro.data.ForecastSplits`.
    :param ridges: penalties per observation, each >= 0.
    :param int stride: rows between training windows.
    :param str norm: input normalisation, one of :data:`NORMS`.
    :returns: dict with ``ridge`` (chosen), ``val_mse`` (its validation MSE) and ``path``
        (``[(ridge, val_mse), ...]`` for every penalty tried).
    """
    if not isinstance(model, DLinear):
        raise TypeError(f"Expected a DLinear, but got {type(model).__name__}.")
    if (model.lookback, model.horizon) != (splits.lookback, splits.horizon):
        raise ValueError(
            f"Expected a DLinear with (lookback, horizon) = {(splits.lookback, splits.horizon)}, but got "
            f"{(model.lookback, model.horizon)}."
        )
    ridges = _check_ridges(ridges)
    if norm not in NORMS:
        raise ValueError(f"Expected norm in {NORMS}, but got {norm!r}.")
    x, y = normalise_windows(*splits.windows("train", stride=stride), norm)  # (N, L), (N, H)
    x_val, y_val = splits.windows("val")
    view = normalised(model, norm)
    gram, cross, count = normal_equations(model, x, y)
    path, best = [], None
    for ridge in ridges:
        weight, bias = solve_ridge(gram, cross, count, ridge)
        model.set_linear(weight, bias)
        pairs = zip(x_val.split(8192), y_val.split(8192))
        if norm == "none":
            err = sum(((model.point(xb) - yb) ** 2).sum().item() for xb, yb in pairs)
        else:
            err = sum(((_point(view, xb) - yb) ** 2).sum().item() for xb, yb in pairs)
        val_mse = err / y_val.numel()
        path.append((float(ridge), val_mse))
        if best is None or val_mse < best[1]:
            best = (float(ridge), val_mse, weight, bias)
    model.set_linear(best[2], best[3])
    model.calibrate(x, y)
    return {"ridge": best[0], "val_mse": best[1], "path": path}


def _point(view, x):
    """The point forecast of a :class:`Normalised` point baseline, in the original units."""
    loc, scale = window_stats(x, view.norm)
    point = view.model.point(normalise_windows(x, None, view.norm)[0])  # (B, H)
    return point * (1.0 if scale is None else scale) + loc


@contextlib.contextmanager
def _seeded(seed, device):
    """Run the block on a fork of torch's random state seeded with ``seed`` (``None``: no fork)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _mixture_scores(pred, y):
    """NLL and exact central-interval coverage of a Gaussian-mixture prediction (means)."""
    nll = -pred.log_prob(y).mean().item()
    pit = pred.cdf(y)  # (B, ..., H)
    out = {"nll": nll}
    for level in (0.5, 0.9):
        lo, hi = (1 - level) / 2, (1 + level) / 2
        out[f"coverage_{round(100 * level)}"] = ((pit >= lo) & (pit <= hi)).float().mean().item()
    return out


#: The metrics of a Gaussian-mixture prediction that need its exact mixture density or CDF.
_MIXTURE_METRICS = frozenset({"nll", "coverage_50", "coverage_90"})


def score_prediction(pred, y, paths=False, exact_mixture=True):
    """All metrics of one prediction, averaged over every element of ``y``.

    A prediction with its own exact ``scores(y)`` (e.g.
    :class:`~vdn_pyro.models.baselines.StudentTPrediction`) is scored by it; a one-component
    :class:`~vdn_pyro.models.ForecastPrediction` in closed form; a mixture as in the module
    docstring.

    :param pred: a :class:`~vdn_pyro.models.ForecastPrediction` with components ``(S', ...)``.
    :param torch.Tensor y: observations, shaped like one sample.
    :param bool paths: also the path scores :data:`PATH_METRICS` of the prediction's samples,
        which must be joint sample paths over the horizon (the last dim).
    :param bool exact_mixture: score a mixture's NLL and coverage exactly (its density and CDF
        over every component); ``False`` leaves them out, for a caller that reads only the
        other metrics.
    :returns: dict with the keys :data:`METRICS` (and :data:`PATH_METRICS`); without
        ``exact_mixture``, a mixture's lacks ``nll`` and the coverages.
    """
    if hasattr(pred, "scores"):
        out = pred.scores(y)
    elif pred.num_components == 1:
        out = forecast_metrics(loc=pred.loc[0], scale=pred.scale[0], y=y)
    else:
        out = forecast_metrics(samples=pred.samples, loc=pred.mean, scale=pred.stddev.clamp_min(1e-12), y=y)
        if exact_mixture:
            out.update(_mixture_scores(pred, y))
        else:
            out = {k: v for k, v in out.items() if k not in _MIXTURE_METRICS}
    if paths:
        out.update(path_metrics(pred.samples, y))
    return out


@torch.no_grad()
def evaluate_forecaster(
    model, x, y, num_samples=100, batch_size=512, seed=0, exact=True, paths=False, metrics=None
):
    """Score a model on every window of ``(x, y)``.

    :param model: anything with ``predict(x, num_samples)`` returning a
        :class:`~vdn_pyro.models.ForecastPrediction` (or a prediction with its own ``scores``).
    :param bool exact: use the model's exact Gaussian marginal (``predict_marginal``) when it
        has one (``has_exact_marginal``) instead of the Monte Carlo mixture.
    :param bool paths: also score the horizon paths (:data:`PATH_METRICS`, means over windows)
        of ``num_samples`` joint sample paths from ``model.predict`` (drawn after the marginal
        when that is exact).
    :param torch.Tensor x: windows ``(N, L)``.
    :param torch.Tensor y: targets ``(N, H)``.
    :param int num_samples: predictive draws S.
    :param int batch_size: windows per batch.
    :param seed: seeds the predictive draws, on a fork of torch's random state that is restored
        afterwards (``None``: draw from the current state).
    :param metrics: the keys of :data:`METRICS` to return (default all); with ``paths``, keys of
        :data:`PATH_METRICS` may be among them (the path scores are returned in full either
        way). A mixture's exact density and CDF, the costly part of its scores, are evaluated
        only when ``nll`` or a coverage is among them (model selection on the CRPS or the MSE
        skips them).
    :returns: dict of :data:`METRICS` (means over all ``N * H`` elements), with ``paths`` of
        :data:`PATH_METRICS` (means over the ``N`` windows), plus ``seconds``.
    """
    keys = METRICS if metrics is None else tuple(metrics)
    allowed = METRICS + (PATH_METRICS if paths else ())
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        hint = " (path scores need paths=True)" if any(k in PATH_METRICS for k in unknown) else ""
        raise ValueError(f"Expected metrics among {allowed}, but got {unknown}{hint}.")
    keys = tuple(k for k in keys if k in METRICS)
    exact_mixture = any(k in _MIXTURE_METRICS for k in keys)
    start = time.perf_counter()
    if callable(getattr(model, "eval", None)):  # a module; any object with predict will do
        model.eval()
    totals, count = dict.fromkeys(keys, 0.0), 0
    path_totals, windows = dict.fromkeys(PATH_METRICS, 0.0), 0
    predict = model.predict
    exact = exact and getattr(model, "has_exact_marginal", False)
    if exact:
        predict = model.predict_marginal
    with _seeded(seed, x.device):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            pred = predict(xb, num_samples)
            scores = score_prediction(pred, yb, exact_mixture=exact_mixture)
            for key in keys:
                totals[key] += scores[key] * yb.numel()
            count += yb.numel()
            if paths:
                samples = model.predict(xb, num_samples).samples if exact else pred.samples  # (S, b, H)
                path = path_metrics(samples, yb)
                paths_here = yb.numel() // yb.shape[-1]
                for key in PATH_METRICS:
                    path_totals[key] += path[key] * paths_here
                windows += paths_here
    out = {key: value / count for key, value in totals.items()}
    if paths:
        out.update({key: value / windows for key, value in path_totals.items()})
    out["seconds"] = time.perf_counter() - start
    return out

"""Long-horizon forecasting: the VDN forecaster against its deterministic twin, Student-t
controls, DLinear and repeat-last-value, on ETTh1 or any long-horizon CSV.

**Data and protocol.** ``--data`` is a CSV with a date column (``--date-column``, default
``date``) and numeric columns (``--columns``: any subset, default all). ``--protocol auto``
(default) reads the protocol from the file: an ETT-format file (value columns among ``HUFL`` ..
``OT``) gets the ETT protocol, 12/4/4 months of 30 days at the file's own rate (24 rows a day
for ETTh, 96 for ETTm: the rate is read from the dates); any other file the 7:1:2 chronological
protocol of Weather, Exchange, ECL and Traffic (:func:`vdn_pyro.data.protocol.long_horizon_splits`);
``--protocol ett|long_horizon`` forces one. Nothing depends on the data set's name (except the
published reference rows, shown for ETTh1 only). Look-back L = 336 (``--lookback``), horizons
96/192/336/720; validation and test start L rows before their first target; a scaler fitted on
the training rows; channel-independent windows of every channel; metrics on the scaled values
averaged over every test window (stride 1), channel and horizon step. Models are selected by
validation only (early stopping on the validation CRPS, best state restored; the input
normalisation and the Student-t parameters are chosen on validation too); the test split is
scored once.

**Models** (:data:`MODELS`, a registry: a new model is one more :class:`ModelSpec`, see
:func:`register_model`):

- ``vdn``: the VDN forecaster, a :class:`~vdn_pyro.models.Forecaster` with 64 neurons under an
  AR(1) prior over the windows of a chunk, input-dependent posterior scales, beta = 1e-3 and
  K = 16 posterior draws mixed in the likelihood. With ``--mean skip`` and
  ``--likelihood-scale heteroscedastic`` (the defaults) the forecast mean is the frozen
  closed-form skip path and the neurons set the predictive scale. Scored by ``--num-samples`` =
  100 Monte Carlo draws per window (exact mixture NLL and coverage, sample CRPS), selected with
  ``--val-samples`` = 32.
- ``twin``: the same network with ``deterministic=True`` (z = its posterior mean: a
  deterministic heteroscedastic scale), trained the same way.
- ``twin_t`` and ``twin_mvt``, the **Student-t controls**: the trained twin's mean and scale
  reused as they are (same skip path, same training, same validation-selected state), with a
  Student-t of nu degrees of freedom and scale c sigma(x) (:class:`~vdn_pyro.models.baselines.
  StudentTControl`): ``twin_t`` draws one chi-square mixing variable per element (a t per
  step), ``twin_mvt`` one per path (a multivariate t over the horizon: every step of a path
  shares one scale draw; its per-step marginal is the univariate t with the same nu and scale).
  nu and c are fitted by maximum likelihood on the validation windows, each control on its own
  likelihood (per-step t; joint density of the multivariate t), leaving out flat windows (a
  constant channel: their near-zero residuals make the likelihood unbounded). Their marginal
  metrics are exact
  (closed-form t CRPS, t log density, t quantiles); the NLL reported for ``twin_mvt`` is that of
  its per-step marginal, as for every other model.
- ``dlinear``: DLinear trained by the same recipe (SGD); ``linear``: DLinear fitted in closed
  form (ridge least squares, penalty chosen on the validation MSE; seed-free); ``repeat``:
  repeat the last value. Their scale is the RMS training residual per step.
- ``rollout`` (when :mod:`vdn_pyro.models.rollout` is there): the
  :class:`~vdn_pyro.models.RolloutForecaster`, trained like the VDN (same skip path, recipe,
  selection), with the run configuration's shared keys (:data:`ROLLOUT_SHARED`) and its own
  structure from its :class:`~vdn_pyro.models.RolloutConfig` (:data:`ROLLOUT_DEFAULTS`, then
  ``--rollout KEY=VALUE``). Its rows also hold the units' learned half-lives (in time steps:
  quartiles and every unit's), drawn against the horizon in ``forecast_ett_half_lives.png``.
  It is scored like the VDN, but its point forecast (MSE, MAE) is its exact predictive mean
  (the decoder's mean is affine in the rolled latents), not the average of the draws.
- ``rollout_normal``: the same roll-out forecaster with a Normal prior (phi fixed at 0), the
  control that tells what the units' AR memory adds.
- ``rollout_exact``: the same roll-out forecaster trained on the exact likelihood of the
  observed path (``horizon_posterior="exact"``: the rolled latents integrated out in closed form
  by a Kalman filter over the patches, :class:`~vdn_pyro.state_space.PatchStateSpace`, instead of
  a mixture of K prior roll-outs; its likelihood scale reads the rolled latents' mean).
- ``rollout_exmix``: the same roll-out forecaster trained on a mixture, over K draws of the last
  look-back latent, of exact Gaussian paths (``horizon_posterior="exact_mixture"``: given each
  draw the horizon's innovations are integrated out by one Kalman filter shared by every window
  and draw, :class:`~vdn_pyro.state_space.ScaledStateSpaceMixture`; the likelihood scale reads
  each draw's roll-out mean, so the paths keep a scale mixture's heavy tails).
- ``rollout_cal``: the trained ``rollout`` (the same fit, not a second one) with its spread
  recalibrated on validation by two numbers, as the t controls are
  (:class:`~vdn_pyro.models.recalibration.SpreadRecalibration`): a factor on the rolled paths'
  spread around the mean, fitted to the CRPS of the horizon sum, and one on the per-step noise,
  fitted to the marginal CRPS (``path_factor`` and ``noise_factor`` in its rows).
- ``rollout_trcal``: the same two factors fitted on the training windows instead (every
  ``--train-stride``-th, at most 1024 of them, evenly spaced), so that its validation scores are
  out of sample like every trained model's and can judge it. It corrects the roll-out's own
  estimator (on a stationary series its marginal variance is about a third too large in sample)
  without following a validation period that differs from the test period.
- ``rollout_select``: no fit of its own: at each horizon and seed, the row of whichever of
  ``rollout``, ``rollout_exact``, ``rollout_exmix`` and ``rollout_trcal`` has the lowest
  validation energy score (its ``chosen`` and ``choice_scores`` columns say which, and each
  candidate's score), the choice a user makes on one data set by validation alone.
  ``rollout_cal`` is not a candidate: it is fitted on the validation windows, so its validation
  scores are in sample. Asking for
  ``rollout_select`` runs its candidates too.

With ``--skip-fit ridge`` (default) the VDN and its twin are trained in two stages: the
closed-form fit is their frozen skip path (``sgd``: the SGD DLinear of the same seed; ``joint``:
trained with the rest).

**Training recipe.** Every model is trained by the recipe of ``vdn fit``: the run configuration
of the ``ett`` preset (:data:`vdn_pyro.config.PRESETS`), turned into a
:class:`~vdn_pyro.forecasting.TrainConfig` and run by
:func:`~vdn_pyro.forecasting.train_forecaster`. Each option below sets one key of that
configuration (:data:`CONFIG_KEYS`; default the preset's) and ``--set KEY=VALUE`` sets any other,
so ``vdn fit --preset ett --set fit.seed=S --set data.horizon=H`` trains the row of seed S at
horizon H (with ``--norms none``). The recipe: Adam (lr 5e-3, x0.6 per epoch), at most 10 epochs,
items of ``--chunk`` = 4 consecutive windows, 256 windows per step, selection on the validation
CRPS with patience 3 (the roll-out models: on the validation energy score, see below). Training
windows are subsampled with ``--train-stride`` rows between them (default 2); validation and test
windows are all used (``--quick`` subsamples them).

**Input normalisation** (``--norms``, candidates among ``none``, ``last`` (the window's last
value), ``mean_scale`` (the window's mean and standard deviation, RevIN-style); default all
three), chosen on validation, never on test: ``--norm-select skip`` (default) chooses once per
horizon, by the validation MSE of the closed-form DLinear fitted under each candidate (the skip
path that sets the mean of the VDN, its twin and the controls), and every model then uses it;
``--norm-select model`` trains every model under every candidate and keeps, per model, the one
with the best validation score of ``--select`` (CRPS when that is ``loss``). A model under a
normalisation is trained on normalised windows and targets and scored in the original units
(:class:`~vdn_pyro.forecasting.Normalised`).

**Selection of the roll-out models.** The roll-out VDN and its Normal-prior control select their
epoch on the validation **energy score** of their joint sample paths (``ModelSpec.select``;
``--select`` given on the command line applies to every model). A model whose purpose is the
horizon's paths is chosen by a proper score of those paths, which also sees the marginals: the
marginal CRPS is blind to how the steps move together. On a stationary series with a known
predictive (``benchmarks/path_calibration.py``, one series, six training seeds) the CRPS
selection kept the roll-out's starting state (the DLinear's Gaussian predictive: no coherent
paths, 90% coverage of the horizon sum 0.22) for 4 of the 6 seeds, because that state's marginal
CRPS was a little better; the energy selection kept a trained state for all 6 (coverage of the
sum 0.87-0.91, the oracle's 0.88).

**Scores.** Beside the marginal MSE, MAE, CRPS, NLL and 90% coverage, every model gets path
scores of its ``--num-samples`` joint sample paths over the horizon
(:func:`vdn_pyro.metrics.path_metrics`): the energy score, the CRPS of the horizon sum and the
coverage of the sum's central 90% interval. Both the validation windows (those of the selection,
with ``--val-samples`` draws each) and the test windows are scored. The tables end with the
**paired differences** of the roll-out against the controls (:data:`PAIRS`: same horizon and
seed, mean ± standard deviation over seeds and the number of seeds won).

Pyro's argument validation is off in the workers (``--validate`` turns it on): it only checks,
the test suite runs with it on, and it costs 10-20% of a training step at long horizons.

``--jobs 2`` runs the (horizon, seed) tasks in two worker processes, one torch thread each.

    python benchmarks/forecast_ett.py --jobs 2         # 4 horizons x every model (14) x 3 seeds
    python benchmarks/forecast_ett.py --horizons 96 --seeds 0
    python benchmarks/forecast_ett.py --data ETTm1.csv --horizons 96
    python benchmarks/forecast_ett.py --quick          # a smoke run, < 1 minute, to a temporary directory

Writes ``forecast_ett_runs.csv`` (one row per horizon, model and seed), ``forecast_ett.csv`` and
``forecast_ett.md`` (mean and standard deviation over seeds, test and validation) to
``--out-dir`` (default ``benchmarks/results``; with ``--quick``, a new temporary directory).
"""

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vdn_pyro.cli import build_constraints  # noqa: E402
from vdn_pyro.config import PRESETS, load_config, merge_dicts, parse_overrides, validate_config  # noqa: E402
from vdn_pyro.data import load_csv  # noqa: E402
from vdn_pyro.data.protocol import PROTOCOLS, detect_protocol, protocol_splits, rows_per_hour  # noqa: E402
from vdn_pyro.files import atomic_path, write_text  # noqa: E402
from vdn_pyro.forecasting import (  # noqa: E402
    METRICS,
    NORMS,
    PATH_METRICS,
    SELECTIONS,
    SKIP_FITS,
    evaluate_forecaster,
    fit_least_squares,
    normalised,
    train_forecaster,
    training_windows,
)
from vdn_pyro.models import DLinear, Forecaster, RepeatLast  # noqa: E402
from vdn_pyro.models.baselines import StudentTControl  # noqa: E402
from vdn_pyro.models.recalibration import SpreadRecalibration  # noqa: E402


# ----------------------------------------------------------------------------- the models
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of the harness.

    :ivar str label: its name in the tables.
    :ivar str kind: how it is fitted: ``"recipe"`` (built by ``build`` and trained by
        :func:`~vdn_pyro.forecasting.train_forecaster`), ``"closed_form"`` (a DLinear fitted by
        :func:`~vdn_pyro.forecasting.fit_least_squares`) or ``"control"`` (a
        :class:`~vdn_pyro.models.baselines.StudentTControl` fitted on validation on top of the
        trained model ``base``) or ``"recalibrated"`` (a
        :class:`~vdn_pyro.models.recalibration.SpreadRecalibration` of ``base``, fitted on the
        windows of ``fit_split``) or ``"selected"`` (no fit of its own: at each horizon and seed,
        the row of the one among ``candidates`` with the best validation ``select`` score).
    :ivar build: ``callable(config, args) -> model`` for a :class:`~vdn_pyro.config.RunConfig`
        and the command-line options (``"recipe"``, ``"closed_form"``).
    :ivar bool lends_skip: it has a DLinear skip path and takes the one of ``--skip-fit``.
    :ivar bool constraints: it is trained with the run configuration's local constraints.
    :ivar bool seeded: ``False``: one fit per horizon, shared by every seed.
    :ivar str base: the model a control or a recalibration is fitted on.
    :ivar bool joint: a control with one mixing variable per path (multivariate t).
    :ivar str select: the validation score that selects its epoch when ``--select`` is not given
        (``None``: the preset's, the CRPS); for a ``"selected"`` model, the validation score
        that chooses among its candidates (lower is better).
    :ivar str fit_split: the split a recalibration is fitted on: ``"val"`` (every
        ``--val-stride``-th window) or ``"train"`` (every ``--train-stride``-th; its validation
        scores are then out of sample, as every recipe model's are).
    :ivar tuple candidates: the models a ``"selected"`` model chooses among; each is scored on
        validation out of sample (none fitted on the validation windows).
    """

    label: str
    kind: str
    build: Callable | None = None
    lends_skip: bool = False
    constraints: bool = False
    seeded: bool = True
    base: str | None = None
    joint: bool = False
    select: str | None = None
    fit_split: str = "val"
    candidates: tuple = ()


def _dlinear(config, args):
    return DLinear(config.data.lookback, config.data.horizon)


#: The models of the harness, by name, in report order (see :func:`register_model`).
MODELS = {
    "vdn": ModelSpec(
        "VDN forecaster",
        "recipe",
        lambda c, a: Forecaster(c.forecaster_config()),
        lends_skip=True,
        constraints=True,
    ),
    "twin": ModelSpec(
        "deterministic twin",
        "recipe",
        lambda c, a: Forecaster(c.forecaster_config(deterministic=True)),
        lends_skip=True,
    ),
    "twin_t": ModelSpec("twin, Student-t per step", "control", base="twin"),
    "twin_mvt": ModelSpec("twin, multivariate t over the horizon", "control", base="twin", joint=True),
    "dlinear": ModelSpec("DLinear (ours, SGD)", "recipe", _dlinear),
    "linear": ModelSpec("DLinear (ours, closed form)", "closed_form", _dlinear, seeded=False),
    "repeat": ModelSpec(
        "repeat-last (ours)", "recipe", lambda c, a: RepeatLast(c.data.lookback, c.data.horizon)
    ),
}
KINDS = ("recipe", "closed_form", "control", "recalibrated", "selected")
#: The validation scores a ``"selected"`` model may choose by (proper scores: lower is better).
CHOICE_SCORES = ("mse", "mae", "crps", "nll", "energy", "crps_sum")
#: The kinds fitted on top of another model of the harness (its ``base``).
ON_BASE = ("control", "recalibrated")


def register_model(name, spec):
    """Add a model to the harness (after the others in the tables); ``--models`` then accepts
    ``name``. A ``"control"`` or ``"recalibrated"`` model needs its ``base`` registered first.

    :param str name: its key in the runs table.
    :param ModelSpec spec: how it is built and fitted.
    """
    if not isinstance(spec, ModelSpec) or spec.kind not in KINDS:
        raise ValueError(f"Expected a ModelSpec of a kind in {KINDS}, but got {spec!r}.")
    if spec.kind in ON_BASE and spec.base not in MODELS:
        raise ValueError(
            f"Expected the base of {spec.kind} model {name!r} among {list(MODELS)}, but got {spec.base!r}."
        )
    if spec.fit_split not in ("val", "train"):
        raise ValueError(
            f"Expected fit_split 'val' or 'train' for model {name!r}, but got {spec.fit_split!r}."
        )
    if spec.kind == "selected":
        unknown = [c for c in spec.candidates if c not in MODELS]
        if not spec.candidates or unknown:
            raise ValueError(
                f"Expected the candidates of selected model {name!r} among {list(MODELS)} (at least one), "
                f"but got {spec.candidates!r}."
            )
        in_sample = [c for c in spec.candidates if MODELS[c].kind in ON_BASE and MODELS[c].fit_split == "val"]
        if in_sample:
            raise ValueError(
                f"Expected candidates of {name!r} scored on validation out of sample, but {in_sample} are "
                "fitted on the validation windows; choose among models fitted on the training windows."
            )
        if spec.select not in CHOICE_SCORES:
            raise ValueError(
                f"Expected the select score of {name!r} among {CHOICE_SCORES}, but got {spec.select!r}."
            )
        MODELS[name] = spec
        return
    if spec.kind not in ON_BASE and spec.build is None:
        raise ValueError(f"Expected a build function for the {spec.kind!r} model {name!r}.")
    MODELS[name] = spec


#: The keys of a :class:`~vdn_pyro.models.RolloutConfig` taken from the run configuration (the
#: forecaster's), so the roll-out forecaster shares the VDN's look-back, horizon, trunk, skip
#: path, prior family, posterior scales, beta and training draws; its own structure (patch,
#: units, features, phi per patch, posterior, mean, likelihood scale, mixture) keeps the
#: RolloutConfig defaults unless ``--rollout KEY=VALUE`` sets it.
ROLLOUT_SHARED = (
    "lookback",
    "horizon",
    "kernel_size",
    "instance_norm",
    "skip",
    "skip_norm",
    "activation",
    "prior",
    "learn_prior",
    "scale_mode",
    "scale_min",
    "scale_max",
    "init_scale",
    "likelihood_scale_min",
    "beta",
    "train_draws",
)


def rollout_config(config, options=()):
    """The :class:`~vdn_pyro.models.RolloutConfig` of a run configuration: the
    :data:`ROLLOUT_SHARED` keys of its forecaster, then ``options`` (``KEY=VALUE`` strings, JSON
    values)."""
    from vdn_pyro.models.rollout import RolloutConfig

    shared = config.forecaster_config()
    values = {key: getattr(shared, key) for key in ROLLOUT_SHARED}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or key not in {f.name for f in dataclasses.fields(RolloutConfig)}:
            names = sorted(f.name for f in dataclasses.fields(RolloutConfig))
            raise ValueError(f"Expected --rollout KEY=VALUE with KEY in {names}, but got {item!r}.")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return RolloutConfig(**values)


#: The harness's roll-out recipe, applied before ``--rollout``: the diagonal posterior (only the
#: last look-back latent reaches the forecast, and with K = 16 training draws the path posterior
#: costs about 4x more per step on a CPU for no measured gain in the ETTh1 probe) and the centred
#: mean (the closed-form skip path is the predictive mean, the units move each path around it: in
#: a one-seed ETTh1 probe at H = 336 and 720 it beat ``mean="head"`` on every validation score).
ROLLOUT_DEFAULTS = ("posterior=diagonal", "mean=centred")


def _rollout(config, args):
    from vdn_pyro.models.rollout import RolloutForecaster

    return RolloutForecaster(rollout_config(config, ROLLOUT_DEFAULTS + tuple(args.rollout)))


def _rollout_exact(config, args):
    from vdn_pyro.models.rollout import RolloutForecaster

    options = ROLLOUT_DEFAULTS + tuple(args.rollout) + ("horizon_posterior=exact",)
    return RolloutForecaster(rollout_config(config, options))


def _rollout_exmix(config, args):
    from vdn_pyro.models.rollout import RolloutForecaster

    options = ROLLOUT_DEFAULTS + tuple(args.rollout) + ("horizon_posterior=exact_mixture",)
    return RolloutForecaster(rollout_config(config, options))


def _rollout_normal(config, args):
    from vdn_pyro.models.rollout import RolloutForecaster

    options = ROLLOUT_DEFAULTS + tuple(args.rollout) + ("prior=normal",)
    return RolloutForecaster(rollout_config(config, options))


if importlib.util.find_spec("vdn_pyro.models.rollout") is not None:
    register_model(
        "rollout",
        ModelSpec("roll-out VDN", "recipe", _rollout, lends_skip=True, constraints=True, select="energy"),
    )
    register_model(
        "rollout_normal",
        ModelSpec(
            "roll-out VDN, Normal prior",
            "recipe",
            _rollout_normal,
            lends_skip=True,
            constraints=True,
            select="energy",
        ),
    )
    register_model(
        "rollout_exact",
        ModelSpec(
            "roll-out VDN, exact path likelihood",
            "recipe",
            _rollout_exact,
            lends_skip=True,
            constraints=True,
            select="energy",
        ),
    )
    register_model(
        "rollout_exmix",
        ModelSpec(
            "roll-out VDN, mixture of exact paths",
            "recipe",
            _rollout_exmix,
            lends_skip=True,
            constraints=True,
            select="energy",
        ),
    )
    register_model(
        "rollout_cal", ModelSpec("roll-out VDN, spread recalibrated", "recalibrated", base="rollout")
    )
    register_model(
        "rollout_trcal",
        ModelSpec(
            "roll-out VDN, spread recalibrated on training windows",
            "recalibrated",
            base="rollout",
            fit_split="train",
        ),
    )
    register_model(
        "rollout_select",
        ModelSpec(
            "roll-out VDN, variant chosen on validation",
            "selected",
            select="energy",
            candidates=("rollout", "rollout_exact", "rollout_exmix", "rollout_trcal"),
        ),
    )


#: Zeng et al. (AAAI 2023), Table 2, L = 336: (MSE, MAE), by data set name (the file stem).
PUBLISHED = {
    "ETTh1": {
        "DLinear (published)": {
            96: (0.375, 0.399),
            192: (0.405, 0.416),
            336: (0.439, 0.443),
            720: (0.472, 0.490),
        },
        "NLinear (published)": {
            96: (0.374, 0.394),
            192: (0.408, 0.415),
            336: (0.429, 0.427),
            720: (0.440, 0.453),
        },
    },
}
#: The table's columns: (key, header).
COLUMNS = (
    ("mse", "MSE"),
    ("mae", "MAE"),
    ("crps", "CRPS"),
    ("nll", "NLL"),
    ("coverage_90", "cov 90%"),
    ("energy", "energy"),
    ("crps_sum", "CRPS-sum"),
    ("coverage_90_sum", "cov 90% sum"),
)
SCORES = METRICS + PATH_METRICS

#: Command-line options that set a key of the run configuration (default: the ``ett`` preset's).
CONFIG_KEYS = {
    "epochs": "fit.epochs",
    "patience": "fit.patience",
    "select": "fit.select",
    "skip_fit": "fit.skip_fit",
    "lr": "fit.lr",
    "lr_decay": "fit.lr_decay",
    "val_samples": "fit.val_samples",
    "threads": "fit.threads",
    "lookback": "data.lookback",
    "train_stride": "data.train_stride",
    "chunk": "data.chunk",
    "val_stride": "data.val_stride",
    "test_stride": "data.test_stride",
    "units": "neurons.units",
    "features": "neurons.features",
    "prior": "neurons.prior.kind",
    "phi": "neurons.prior.phi",
    "beta": "neurons.beta",
    "train_draws": "neurons.train_draws",
    "init_scale": "neurons.init_scale",
    "likelihood_scale": "neurons.likelihood_scale",
    "mean": "neurons.mean",
    "activation": "neurons.activation",
    "num_samples": "evaluate.num_samples",
}


def _nested(dotted, value):
    """``{"a": {"b": value}}`` for ``"a.b"``."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _lookup(config, dotted):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def fill_defaults(args):
    """Give every configuration option left unset on the command line the ``ett`` preset's
    value (``--batch-size``: the preset's windows per step, batch size x chunk)."""
    preset = load_config(preset="ett")
    if not hasattr(args, "select_given"):  # a model's own selection applies only when not given
        sets = getattr(args, "set", None) or []
        args.select_given = args.select is not None or any(item.startswith("fit.select=") for item in sets)
    for dest, key in CONFIG_KEYS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, _lookup(preset, key))
    if args.batch_size is None:
        args.batch_size = preset.fit.batch_size * preset.data.chunk
    return args


def model_select(name, args):
    """The validation score that selects ``name``'s epoch: ``--select`` when given, else the
    model's own (:attr:`ModelSpec.select`), else the preset's."""
    given = getattr(args, "select_given", True)
    spec_select = MODELS[name].select
    return spec_select if spec_select is not None and not given else args.select


def run_config(args, horizon, seed, overrides=None):
    """The run configuration of one (horizon, seed) task: the ``ett`` preset, then the
    command-line options, then ``--set``, then ``overrides`` (dotted key -> value).

    ``--batch-size`` counts windows: the configuration's ``fit.batch_size`` counts items of
    ``--chunk`` windows.
    """
    values = {key: getattr(args, dest) for dest, key in CONFIG_KEYS.items()}
    values.update(
        {
            "data.path": args.data,
            "data.horizon": horizon,
            "fit.seed": seed,
            "fit.batch_size": max(1, args.batch_size // args.chunk),
            "evaluate.exact": not args.mc,
        }
    )
    data = PRESETS["ett"]
    for key, value in values.items():
        data = merge_dicts(data, _nested(key, value))
    data = merge_dicts(data, parse_overrides(args.set))
    for key, value in (overrides or {}).items():
        data = merge_dicts(data, _nested(key, value))
    return validate_config(data)


def build_model(name, config, args=None):
    """A fresh model by name (a ``"recipe"`` or ``"closed_form"`` entry of :data:`MODELS`) for
    the look-back and horizon of ``config`` (and the command-line options ``args``)."""
    spec = MODELS.get(name)
    if spec is None or spec.build is None:
        buildable = [n for n, s in MODELS.items() if s.build is not None]
        raise ValueError(f"Expected a model in {buildable}, but got {name!r}.")
    return spec.build(config, args)


# ----------------------------------------------------------------------------- fitting
@dataclasses.dataclass
class Fitted:
    """A model fitted under one input normalisation.

    :ivar model: the fitted model (a :class:`~vdn_pyro.models.baselines.StudentTControl` for a
        control).
    :ivar view: the model seen in the original units (:func:`~vdn_pyro.forecasting.normalised`).
    :ivar str norm: the normalisation.
    :ivar float best: its selection score in fitting (the recipe's validation score, the CRPS or
        the energy, the validation MSE of the closed form, the control's validation NLL per
        element).
    :ivar int epochs: training epochs.
    :ivar float fit_seconds: fitting time (a control's own, not its base's).
    :ivar str skip: the skip path it was given (``ridge``, ``sgd``, ``joint``; "" for none).
    :ivar dict info: extra columns (a control's ``df`` and ``scale_factor``).
    """

    model: object
    view: object
    norm: str
    best: float
    epochs: int
    fit_seconds: float
    skip: str = ""
    info: dict = dataclasses.field(default_factory=dict)


def run_one(name, splits, seed, args, norm="none", cache=None, overrides=None, skip_from=None):
    """Fit one model of :data:`MODELS` on ``splits`` under the normalisation ``norm`` with the
    recipe of its run configuration (:func:`run_config`); the test split is not read.

    :param dict cache: the task's fitted models (:func:`fitted_model`), for the skip path
        lent to the model and the base of a control.
    :param dict overrides: dotted configuration keys -> values for this model.
    :param skip_from: a fitted DLinear for the skip path (default: the one of ``--skip-fit``).
    :rtype: Fitted
    """
    spec = MODELS[name]
    cache = {} if cache is None else cache
    select = model_select(name, args)
    if select != args.select:
        overrides = {"fit.select": select, **(overrides or {})}
    config = run_config(args, splits.horizon, seed, overrides)
    pyro.set_rng_seed(seed)
    if spec.kind == "control":
        base = fitted_model(spec.base, splits, seed, args, norm, cache)
        start = time.perf_counter()
        control = StudentTControl(base.view, joint=spec.joint)
        x_val, y_val = splits.windows("val", stride=config.data.val_stride)
        info = control.fit(x_val, y_val)
        best = info.pop("nll")
        return Fitted(control, control, norm, best, 0, time.perf_counter() - start, base.skip, info)
    if spec.kind == "recalibrated":
        base = fitted_model(spec.base, splits, seed, args, norm, cache)
        start = time.perf_counter()
        wrapper = SpreadRecalibration(base.view)
        stride = config.data.train_stride if spec.fit_split == "train" else config.data.val_stride
        x_fit, y_fit = splits.windows(spec.fit_split, stride=stride)
        fit = wrapper.fit(
            x_fit, y_fit, num_samples=config.fit.val_samples, batch_size=config.evaluate.batch_size, seed=seed
        )
        info = {"path_factor": fit["path_factor"], "noise_factor": fit["noise_factor"]}
        elapsed = time.perf_counter() - start
        return Fitted(wrapper, wrapper, norm, fit["crps_sum"], 0, elapsed, base.skip, info)
    model = build_model(name, config, args)
    start = time.perf_counter()
    if spec.kind == "closed_form":
        result = fit_least_squares(model, splits, config.fit.ridges, norm=norm)
        return Fitted(model, normalised(model, norm), norm, result["val_mse"], 0, time.perf_counter() - start)
    lent = ""
    if spec.lends_skip:
        if skip_from is None:
            skip_from = lend_skip(splits, seed, args, norm, cache)
        lent = config.fit.skip_fit if skip_from is not None else "joint"
    recipe = dataclasses.replace(config.train_config(), norm=norm)
    constraints = build_constraints(config) if spec.constraints else []
    result = train_forecaster(model, splits, recipe, seed=seed, constraints=constraints, skip_from=skip_from)
    best = result.best_val_loss if result is not None else float("nan")
    items = training_windows(splits, recipe)[0].shape[0]
    per_epoch = math.ceil(items / min(recipe.batch_size, items))
    epochs = math.ceil(result.steps / per_epoch) if result is not None else 0
    view = normalised(model, norm)
    return Fitted(model, view, norm, best, epochs, time.perf_counter() - start, lent)


def fitted_model(name, splits, seed, args, norm, cache):
    """:func:`run_one`, once per (model, normalisation, seed) of a horizon (once per
    (model, normalisation) for a seed-free model), kept in ``cache``."""
    key = (name, norm, seed if MODELS[name].seeded else None)
    if key not in cache:
        cache[key] = run_one(name, splits, seed, args, norm, cache)
    return cache[key]


def lend_skip(splits, seed, args, norm, cache):
    """The DLinear lent to a model's skip path under ``--skip-fit``: the closed-form fit
    (``ridge``) or the SGD DLinear of this seed (``sgd``), under ``norm``; ``None`` under
    ``joint``."""
    if args.skip_fit == "joint":
        return None
    source = "linear" if args.skip_fit == "ridge" else "dlinear"
    return fitted_model(source, splits, seed, args, norm, cache).model


def norm_metric(args):
    """The validation metric that chooses a model's normalisation under ``--norm-select
    model``: ``--select``, or the CRPS when that is the ELBO (whose units change with the
    normalisation)."""
    return args.select if args.select in METRICS + PATH_METRICS else "crps"


def skip_norm(splits, seed, args, cache):
    """``(norm, scores)``: the candidate of ``--norms`` whose closed-form DLinear has the best
    validation MSE (the only candidate without a fit), and each candidate's validation MSE."""
    if len(args.norms) == 1:
        return args.norms[0], {}
    scores = {n: fitted_model("linear", splits, seed, args, n, cache).best for n in args.norms}
    return min(args.norms, key=scores.get), scores


def score(view, x, y, args, seed, split="test"):
    """Marginal and path scores of a fitted model on windows ``(x, y)``, in the scoring batches
    of the run configuration: ``--num-samples`` seeded draws (joint paths) per test window,
    ``--val-samples`` per validation window (the validation table, as the selection, reads the
    same number of draws; it is a third of the scoring's cost at long horizons)."""
    config = run_config(args, y.shape[-1], seed)
    evaluate = config.evaluate
    draws = evaluate.num_samples if split == "test" else config.fit.val_samples
    return evaluate_forecaster(
        view, x, y, draws, evaluate.batch_size, seed=seed, exact=evaluate.exact, paths=True
    )


def model_row(name, splits, seed, args, cache, val, test):
    """Fit ``name`` under the normalisation of ``--norm-select`` and score it on the
    validation and test windows; returns its row."""
    if args.norm_select == "skip":
        norm, scores = skip_norm(splits, seed, args, cache)
        chosen = fitted_model(name, splits, seed, args, norm, cache)
        val_scores = score(chosen.view, *val, args, seed, "val")
    else:
        metric, candidates = norm_metric(args), {}
        for norm in args.norms:
            fitted = fitted_model(name, splits, seed, args, norm, cache)
            candidates[norm] = (fitted, score(fitted.view, *val, args, seed, "val"))
        scores = {n: s[metric] for n, (_, s) in candidates.items()}
        chosen, val_scores = candidates[min(args.norms, key=scores.get)]
    return score_row(name, chosen, splits, seed, args, val_scores, test, scores)


def score_row(name, fitted, splits, seed, args, val_scores, test, norm_scores=None):
    """The row of a fitted model: horizon, model, seed, its normalisation (and the validation
    score of each candidate), the test metrics, the validation metrics (``val_`` keys), the
    best validation score in fitting, epochs, fitting and scoring seconds."""
    test_scores = score(fitted.view, *test, args, seed)
    row = {"horizon": splits.horizon, "model": name, "seed": seed, "norm": fitted.norm}
    row["norm_scores"] = " ".join(f"{n}={v:.4f}" for n, v in (norm_scores or {}).items())
    row.update({k: test_scores[k] for k in SCORES})
    row.update({f"val_{k}": val_scores[k] for k in SCORES})
    row["best_val_loss"], row["epochs"] = fitted.best, fitted.epochs
    row["fit_seconds"], row["score_seconds"] = fitted.fit_seconds, test_scores["seconds"]
    row["test_windows"], row["skip"] = test[0].shape[0], fitted.skip
    row.update(fitted.info)
    row.update(half_life_columns(fitted.model))
    return row


def half_life_columns(model):
    """The learned memory of a model whose units roll over the horizon (one with a
    ``half_life()`` in time steps, e.g. the roll-out forecaster), else nothing: the median and
    quartiles of the units' half-lives, and every unit's, space-separated (``half_lives``)."""
    if not callable(getattr(model, "half_life", None)):
        return {}
    steps = model.half_life().detach().double().cpu()  # (U,)
    q = torch.quantile(steps, torch.tensor([0.25, 0.5, 0.75], dtype=steps.dtype))
    return {
        "half_life_q25": q[0].item(),
        "half_life_median": q[1].item(),
        "half_life_q75": q[2].item(),
        "half_lives": " ".join(f"{v:.4g}" for v in steps.tolist()),
    }


# ----------------------------------------------------------------------------- data
def load_series(args):
    """The series of ``--data`` (``--date-column``, ``--columns``)."""
    return load_csv(args.data, date_column=args.date_column, target_columns=args.columns)


def protocol_of(series, args):
    """The protocol of ``--protocol`` (``auto``: from the file's columns) and a description."""
    protocol = detect_protocol(series) if args.protocol == "auto" else args.protocol
    if protocol == "ett":
        rate = rows_per_hour(series.index)
        return protocol, f"ETT protocol (12/4/4 months of 30 days, {rate} row(s) an hour)"
    return protocol, "7:1:2 chronological protocol"


def task_splits(series, args, horizon):
    """The splits of one horizon under the protocol of ``args``."""
    protocol, _ = protocol_of(series, args)
    return protocol_splits(series, args.lookback, horizon, protocol)


# ----------------------------------------------------------------------------- tables
def summarise(runs, published=None):
    """Mean and standard deviation over seeds, one row per (horizon, model), plus the published
    rows (``{label: {horizon: (mse, mae)}}``)."""
    frame = pd.DataFrame(runs)
    keys = [k for k in list(SCORES) + [f"val_{k}" for k in SCORES] + ["fit_seconds"] if k in frame]
    grouped = frame.groupby(["horizon", "model"], sort=False)
    mean = grouped[keys].mean()
    std = grouped[keys].std(ddof=1).fillna(0.0).add_suffix("_std")
    out = pd.concat([mean, std], axis=1)
    out["seeds"] = grouped.size()
    if "norm" in frame:
        out["norm"] = grouped["norm"].agg(lambda c: "/".join(dict.fromkeys(c)))
    out = out.reset_index()
    if published:
        rows = [
            {"horizon": h, "model": label, "mse": mse, "mae": mae, "seeds": 0}
            for label, table in published.items()
            for h, (mse, mae) in table.items()
            if h in set(out["horizon"])
        ]
        out = pd.concat([out, pd.DataFrame(rows)], ignore_index=True)
    names = list(dict.fromkeys(list(MODELS) + list(published or {}) + list(out["model"])))
    order = {m: i for i, m in enumerate(names)}
    out = out.sort_values(["horizon", "model"], key=lambda c: c.map(order) if c.name == "model" else c)
    return out.reset_index(drop=True)


def format_table(summary, prefix=""):
    """One Markdown table of the :data:`COLUMNS` (``prefix="val_"``: the validation scores),
    mean ± std over seeds, with the normalisation and the number of seeds."""
    head = ["H", "model"] + [title for _, title in COLUMNS] + ["norm", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        if prefix and not r["seeds"]:
            continue  # published rows have no validation scores
        cells = [str(int(r["horizon"])), MODELS[r["model"]].label if r["model"] in MODELS else r["model"]]
        for key, _ in COLUMNS:
            value = r.get(prefix + key)
            if value is None or pd.isna(value):
                cells.append("")
            elif r["seeds"] > 1:
                cells.append(f"{value:.3f} ± {r[prefix + key + '_std']:.3f}")
            else:
                cells.append(f"{value:.3f}")
        norm = r.get("norm")
        cells.append("" if norm is None or pd.isna(norm) else str(norm))
        cells.append(str(int(r["seeds"])) if r["seeds"] else "published")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_tables(summary):
    """The test table and the validation table, with titles."""
    return f"Test\n\n{format_table(summary)}\n\nValidation\n\n{format_table(summary, 'val_')}"


#: (model, against it) pairs of the paired-difference table, when both were run.
PAIRS = (
    ("rollout", "twin_t"),
    ("rollout", "twin_mvt"),
    ("rollout", "twin"),
    ("rollout", "vdn"),
    ("rollout", "rollout_normal"),
    ("rollout_cal", "twin_t"),
    ("rollout_cal", "twin_mvt"),
    ("rollout_cal", "rollout"),
    ("rollout_trcal", "twin_t"),
    ("rollout_trcal", "twin_mvt"),
    ("rollout_trcal", "rollout"),
    ("rollout_exact", "twin_t"),
    ("rollout_exact", "twin_mvt"),
    ("rollout_exact", "rollout"),
    ("rollout_exmix", "twin_t"),
    ("rollout_exmix", "twin_mvt"),
    ("rollout_exmix", "rollout"),
    ("rollout_select", "twin_t"),
    ("rollout_select", "twin_mvt"),
    ("rollout_select", "rollout"),
    ("vdn", "twin"),
)
#: The scores of the paired-difference table (lower is better for each).
PAIRED_SCORES = ("energy", "crps_sum", "crps", "nll", "mse")


def paired_differences(runs, pairs=PAIRS, keys=PAIRED_SCORES):
    """Test-score differences ``a - b`` between two models of the same run, paired by horizon and
    seed (same data, same skip path, same seed): mean, standard deviation over the seeds and
    the number of seeds won, per horizon and pair. A difference below a relative 1e-6 is a tie
    (0). A difference counts as beyond the seed spread when its mean is larger in size than twice
    its standard deviation.

    :returns: a :class:`pandas.DataFrame`, one row per (horizon, a, b) run together.
    """
    frame = pd.DataFrame(runs)
    rows = []
    for a, b in pairs:
        left = frame[frame["model"] == a].set_index(["horizon", "seed"])
        right = frame[frame["model"] == b].set_index(["horizon", "seed"])
        both = left.index.intersection(right.index)
        for horizon in sorted({h for h, _ in both}):
            idx = [i for i in both if i[0] == horizon]
            row = {"horizon": horizon, "a": a, "b": b, "seeds": len(idx)}
            for key in keys:
                base = right.loc[idx, key].to_numpy(float)
                diff = left.loc[idx, key].to_numpy(float) - base
                tie = 1e-6 * np.maximum(1.0, np.abs(base))  # rounding, e.g. the same mean path
                diff = np.where(np.abs(diff) < tie, 0.0, diff)
                row[key] = diff.mean()
                row[f"{key}_std"] = diff.std(ddof=1) if len(diff) > 1 else 0.0
                row[f"{key}_wins"] = int((diff < 0).sum())
            rows.append(row)
    return pd.DataFrame(rows)


def format_paired(paired):
    """The paired differences as a Markdown table (``mean ± std (seeds won)``; bold when beyond
    twice the seed spread)."""
    if paired.empty:
        return ""
    head = ["H", "difference"] + [title for key, title in COLUMNS if key in PAIRED_SCORES]
    keys = [key for key, _ in COLUMNS if key in PAIRED_SCORES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in paired.iterrows():
        cells = [str(int(r["horizon"])), f"{r['a']} - {r['b']}"]
        for key in keys:
            mean, std, wins = r[key], r[f"{key}_std"], int(r[f"{key}_wins"])
            text = f"{mean:+.4f} ± {std:.4f} ({wins}/{int(r['seeds'])})"
            cells.append(f"**{text}**" if r["seeds"] > 1 and mean != 0 and abs(mean) > 2 * std else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(runs, out_dir, stem="forecast_ett", note="", published=None):
    """Write the per-run CSV, the summary CSV and the Markdown tables; return the summary and
    the tables."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / f"{stem}_runs.csv") as tmp:  # an interrupted write loses no row
        pd.DataFrame(runs).to_csv(tmp, index=False)
    summary = summarise(runs, published)
    with atomic_path(out_dir / f"{stem}.csv") as tmp:
        summary.to_csv(tmp, index=False)
    tables = format_tables(summary)
    paired = format_paired(paired_differences(runs))
    if paired:
        tables += (
            "\n\nPaired differences on test (a - b, same horizon and seed; negative: a is better; mean ± "
            "std over seeds, seeds won; bold: beyond twice the seed spread)\n\n" + paired
        )
    write_text(out_dir / f"{stem}.md", f"{note}\n\n{tables}\n" if note else f"{tables}\n")
    plot_memory(runs, out_dir / f"{stem}_half_lives.png")
    return summary, tables


def plot_memory(runs, path, model="rollout"):
    """The half-lives of ``model``'s units (every seed) against the horizon
    (:func:`vdn_pyro.plots.plot_half_lives`), when its rows have them; returns the path or
    ``None``."""
    by_horizon = {}
    for row in runs:
        if row["model"] == model and isinstance(row.get("half_lives"), str):
            by_horizon.setdefault(row["horizon"], []).extend(float(v) for v in row["half_lives"].split())
    if not by_horizon:
        return None
    from vdn_pyro.plots import plot_half_lives

    title = f"{MODELS[model].label}: unit half-lives against the horizon"
    return plot_half_lives(path, by_horizon, title=title)


def format_row(row, extra=""):
    """One progress line: horizon, seed, model, normalisation and the table's metrics, then
    ``extra``."""
    metrics = " ".join(f"{k}={row[k]:.4f}" for k, _ in COLUMNS)
    norm = f"norm={row['norm']} " if "norm" in row else ""
    return f"H={row['horizon']} seed={row['seed']} {row['model']:8s} {norm}{metrics} {extra}".rstrip()


# ----------------------------------------------------------------------------- running
def apply_quick(args):
    """Shrink a run to a smoke test (< 1 minute on 2 cores)."""
    args.horizons, args.seeds = [96], [0]
    args.epochs, args.patience = 2, 0
    args.train_stride, args.val_stride, args.test_stride = 48, 24, 12
    args.units, args.features, args.num_samples, args.val_samples = 16, 16, 16, 16
    return args


def run_task(horizon, seed, args, series, cache=None):
    """Every model of ``args.models`` at one horizon and seed, in order; returns their rows.

    :param dict cache: per-horizon cache of fitted models (:func:`fitted_model`), shared across
        the seeds of a serial run (the seed-free closed-form fits); a worker process starts with
        its own.
    """
    torch.set_num_threads(args.threads)
    pyro.enable_validation(args.validate)  # this process only (a worker, or the script's own)
    splits = task_splits(series, args, horizon)
    test = splits.windows("test", stride=args.test_stride)
    val = splits.windows("val", stride=args.val_stride)
    cache = {} if cache is None else cache
    rows = []
    for name in args.models:  # a selected model comes after its candidates (expand_models)
        if MODELS[name].kind == "selected":
            row = selected_row(name, rows)
        else:
            row = model_row(name, splits, seed, args, cache, val, test)
        rows.append(row)
        print(format_row(row, f"epochs={row['epochs']} fit={row['fit_seconds']:.0f}s"), flush=True)
    return rows


def selected_row(name, rows):
    """The row of the ``"selected"`` model ``name`` at one horizon and seed: a copy of the row,
    among ``rows`` (that task's), of the candidate with the lowest validation score
    (``ModelSpec.select``), with ``chosen`` (its name) and ``choice_scores`` (every candidate's
    validation score). Nothing is fitted or scored again."""
    spec = MODELS[name]
    found = [r for r in rows if r["model"] in spec.candidates]
    if not found:
        raise ValueError(f"Expected a row of one of {spec.candidates} before {name!r}, but got none.")
    key = f"val_{spec.select}"
    chosen = min(found, key=lambda r: r[key])
    row = {**chosen, "model": name, "chosen": chosen["model"]}
    row["choice_scores"] = " ".join(f"{r['model']}={r[key]:.4f}" for r in found)
    return row


def expand_models(models):
    """``models`` with the candidates of each ``"selected"`` model added before it where missing,
    and each selected model after all of its candidates (report order otherwise kept)."""
    out = []
    for name in dict.fromkeys(models):
        if MODELS[name].kind == "selected":
            continue
        out.append(name)
    for name in dict.fromkeys(models):
        if MODELS[name].kind == "selected":
            out += [c for c in MODELS[name].candidates if c not in out] + [name]
    return out


def run_tasks(args, series, task=run_task):
    """Run every (horizon, seed) task, serially or in ``args.jobs`` worker processes (longest
    horizons first), and yield each task's rows as it finishes."""
    tasks = [(h, s) for h in args.horizons for s in args.seeds]
    if args.jobs == 1:
        caches = {}
        for horizon, seed in tasks:
            yield task(horizon, seed, args, series, caches.setdefault(horizon, {}))
        return
    tasks.sort(key=lambda t: -t[0])
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # the workers import this module by name
        sys.path.append(here)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(tasks)), mp_context=context) as pool:
        futures = [pool.submit(task, horizon, seed, args, series) for horizon, seed in tasks]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def resolve_out_dir(args, stem):
    """``--out-dir``, or ``benchmarks/results``, or, for ``--quick``, a new temporary
    directory (a smoke run never overwrites the committed results)."""
    if args.out_dir is None:
        quick = tempfile.mkdtemp(prefix=f"{stem}_quick_") if args.quick else None
        args.out_dir = quick or str(ROOT / "benchmarks" / "results")
    return args.out_dir


def describe(series, args):
    """The first line of the tables: data, protocol, look-back, strides and options."""
    _, protocol = protocol_of(series, args)
    options = {k: v for k, v in vars(args).items() if k not in ("data", "out_dir")}
    return (
        f"{series.name} ({len(series.columns)} channels, {protocol}), L={args.lookback}; train stride "
        f"{args.train_stride}, val stride {args.val_stride}, test stride {args.test_stride}"
        f"{' (every test window)' if args.test_stride == 1 else ''}; options: "
        + json.dumps(options)
        + "; every other key: the ett preset of vdn_pyro.config"
    )


def check_args(args):
    """Refuse options the run cannot use, before any work."""
    if args.jobs < 1:
        raise ValueError(f"Expected --jobs >= 1, but got {args.jobs}.")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise ValueError(f"Expected --models among {list(MODELS)}, but got {unknown}.")
    if not args.norms:
        raise ValueError(f"Expected at least one of {NORMS} in --norms.")
    args.models = expand_models(args.models)


def window_bytes(series, args, horizon):
    """Bytes of one task's window tensors (float32, one row per window and channel): the train,
    validation and test windows at their strides. A lower bound on what the task holds (the
    training chunks and the models come on top)."""
    splits = task_splits(series, args, horizon)
    total = 0
    channels = len(splits.columns)
    for split, stride in (("train", args.train_stride), ("val", args.val_stride), ("test", args.test_stride)):
        total += 4 * splits.num_windows(split, stride) * channels * (args.lookback + horizon)
    return total


def available_memory():
    """Bytes of memory available now (``MemAvailable`` of ``/proc/meminfo``), or ``None`` where
    that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(series, args):
    """Refuse a run whose window tensors alone would not fit in memory (the concurrent tasks of
    the longest horizon), before any work, rather than let the system kill it part-way."""
    available = available_memory()
    if available is None:
        return
    horizon = max(args.horizons)
    one = window_bytes(series, args, horizon)
    at_once = min(args.jobs, len(args.horizons) * len(args.seeds))
    if one * at_once > available:
        gib = 2.0**30
        raise ValueError(
            f"Expected the windows to fit in memory, but {at_once} task(s) at H={horizon} would hold "
            f"{one * at_once / gib:.1f} GiB of windows ({one / gib:.1f} GiB each) and "
            f"{available / gib:.1f} GiB is available; use fewer --columns, larger --train-stride, "
            "--val-stride or --test-stride, or fewer --jobs."
        )


def prepare(args):
    """The run's options (``--quick`` applied) and series, refusing bad options, bad data and a
    run whose windows would not fit in memory, before any work: ``(args, series)``."""
    if args.quick:
        args = apply_quick(args)
    check_args(args)
    series = load_series(args)
    check_memory(series, args)
    return args, series


def main(args, prepared=None):
    """Run the benchmark and return the summary :class:`pandas.DataFrame`.

    :param prepared: :func:`prepare` of ``args`` when already done.
    """
    args, series = prepare(args) if prepared is None else prepared
    torch.set_num_threads(args.threads)
    out_dir = resolve_out_dir(args, "forecast_ett")
    note = describe(series, args)
    ett = protocol_of(series, args)[0] == "ett"
    published = PUBLISHED.get(series.name) if ett and args.lookback == 336 else None
    order = {
        (h, s, m): i
        for i, (h, s, m) in enumerate(
            (h, s, m) for h in args.horizons for s in args.seeds for m in args.models
        )
    }
    runs = []
    start = time.perf_counter()
    for rows in run_tasks(args, series):
        runs = sorted(runs + rows, key=lambda r: order[(r["horizon"], r["seed"], r["model"])])
        write_outputs(runs, out_dir, note=note, published=published)  # after every task: nothing lost
    summary, tables = write_outputs(runs, out_dir, note=note, published=published)
    print(note)
    print(tables)
    print(f"wall time {time.perf_counter() - start:.0f} s with {args.jobs} job(s); written to {out_dir}")
    return summary


def build_parser(description):
    """The command-line options shared with ``ar_study.py``."""
    parser = argparse.ArgumentParser(description=description)
    default_data = os.environ.get(
        "VDN_ETT_PATH", str(ROOT.parent / "shared" / "data" / "ETT-small" / "ETTh1.csv")
    )
    parser.add_argument(
        "--data", default=default_data, help="a long-horizon CSV (default ETTh1.csv, or VDN_ETT_PATH)"
    )
    parser.add_argument("--date-column", default="date", help="the CSV's date column")
    parser.add_argument(
        "--columns", nargs="+", help="the channels to use (default every column but the date)"
    )
    parser.add_argument(
        "--protocol",
        default="auto",
        choices=("auto",) + PROTOCOLS,
        help="auto: ett for an ETT-format file (its own rate), else long_horizon (7:1:2)",
    )
    parser.add_argument(
        "--out-dir", help="default benchmarks/results; with --quick a new temporary directory"
    )
    parser.add_argument("--horizons", type=int, nargs="+", default=[96, 192, 336, 720])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"among {list(MODELS)}")
    parser.add_argument(
        "--validate",
        action="store_true",
        help="keep Pyro's argument validation on in training and scoring (off by default: it only "
        "checks, costs 10-20%% of a step at long horizons, and the test suite runs with it on)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: H=96, 1 seed, tiny")
    parser.add_argument(
        "--rollout",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a key of the roll-out forecaster's RolloutConfig, e.g. --rollout patch=12 (repeatable)",
    )
    parser.add_argument(
        "--norms", nargs="+", default=list(NORMS), choices=NORMS, help="input normalisations to choose from"
    )
    parser.add_argument(
        "--norm-select",
        default="skip",
        choices=("skip", "model"),
        help="choose the normalisation once on the closed-form skip path (skip) or per model (model)",
    )
    # the training recipe (shared by every model): keys of the run configuration, default the
    # ett preset's (see CONFIG_KEYS)
    parser.add_argument("--lookback", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--patience", type=int)
    parser.add_argument("--select", choices=SELECTIONS, help="validation criterion")
    parser.add_argument(
        "--skip-fit",
        choices=SKIP_FITS,
        help="vdn/twin skip path: closed-form DLinear (ridge), the SGD DLinear (sgd), or trained jointly",
    )
    parser.add_argument("--batch-size", type=int, help="windows per step (default 256)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr-decay", type=float)
    parser.add_argument("--train-stride", type=int)
    parser.add_argument("--chunk", type=int, help="windows per training item T")
    parser.add_argument("--val-stride", type=int)
    parser.add_argument("--test-stride", type=int)
    # forecaster
    parser.add_argument("--units", type=int)
    parser.add_argument("--features", type=int)
    parser.add_argument("--prior", choices=["ar", "normal"])
    parser.add_argument("--phi", type=float)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--train-draws", type=int)
    parser.add_argument("--init-scale", type=float)
    parser.add_argument("--likelihood-scale", choices=["learned", "heteroscedastic"])
    parser.add_argument("--mean", choices=["head", "skip"], help="forecast mean: skip + head, or skip alone")
    parser.add_argument("--activation", help="on the trunk features read by the neurons")
    # scoring
    parser.add_argument("--num-samples", type=int, help="predictive draws (joint paths) per window")
    parser.add_argument("--val-samples", type=int, help="predictive draws per validation window (selection)")
    parser.add_argument(
        "--mc", action="store_true", help="score the Monte Carlo mixture, not the exact marginal"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any other key of the run configuration, e.g. --set fit.ridges=[0.1] (repeatable)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes, one (horizon, seed) task each (2 on 2 cores)"
    )
    return parser


def parse_args(argv=None):
    return fill_defaults(build_parser(__doc__.splitlines()[0]).parse_args(argv))


def run_script(main, prepare, args):
    """Run a benchmark script from the command line: ``prepare(args)`` first, so that bad
    options or data end in one line on stderr and exit status 2 (no traceback, nothing
    written), then ``main(args, prepared)``."""
    try:
        prepared = prepare(args)
    except (ValueError, OSError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    return main(args, prepared)


if __name__ == "__main__":
    run_script(main, prepare, parse_args())

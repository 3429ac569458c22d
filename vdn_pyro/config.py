r"""Run configuration of the ``vdn`` command: a validated schema, presets, YAML/TOML/JSON files.

A run is described by one :class:`RunConfig` with seven sections, every option defaulted::

    data:         which series, how it is split and cut into windows
    neurons:      the forecaster: units, latent_dim, prior {kind, order, ...}, beta, scale_mode ...
    constraints:  local constraints (kl_band, free_bits, loc_band, scale_guard, persistence)
    fit:          the training recipe: steps or epochs, batch_size, lr, seed, select, skip_fit ...
    diagnostics:  bands of the per-unit table and the unit monitor during training
    evaluate:     predictive draws and baselines for the test metrics
    output:       run directory root, plots and the InferenceData export

A configuration is built in three layers, each overriding the one before: a preset by name
(:data:`PRESETS`; ``default`` when none is given), a YAML, TOML or JSON file, and ``key=value``
overrides with dotted keys (``fit.lr=1e-3``). :meth:`RunConfig.train_config` and
:meth:`RunConfig.forecaster_config` turn a configuration into the recipe of
:func:`~vdn_pyro.forecasting.train_forecaster` and the :class:`~vdn_pyro.models.Forecaster` it
trains, for ``vdn fit`` and the benchmarks alike. The schema is a set of :mod:`pydantic` models with
``extra="forbid"``, so an unknown or ill-typed key is an error; :func:`validate_config` turns
pydantic's errors into one :class:`ConfigError` whose message names the dotted path::

    neurons.prior.order: expected int >= 1, got 'two'

>>> config = load_config(preset="quick", overrides=["fit.lr=0.01"])
>>> config.fit.lr, config.neurons.prior.kind
(0.01, 'ar')
"""

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from vdn_pyro.forecasting import RIDGES, TrainConfig
from vdn_pyro.models.forecaster import ForecasterConfig

__all__ = [
    "CONFIG_SUFFIXES",
    "PRESETS",
    "ConfigError",
    "ConstraintsConfig",
    "DataConfig",
    "DiagnosticsConfig",
    "EvaluateConfig",
    "FitConfig",
    "FreeBitsConfig",
    "KLBandConfig",
    "LocBandConfig",
    "NeuronsConfig",
    "OutputConfig",
    "PersistenceConfig",
    "PriorConfig",
    "RunConfig",
    "ScaleGuardConfig",
    "dump_config",
    "load_config",
    "merge_dicts",
    "parse_overrides",
    "read_config_file",
    "validate_config",
]


def _not_bool(value):
    """Refuse ``true``/``false`` where a number is expected (pydantic would read them as 1/0)."""
    if isinstance(value, bool):
        raise ValueError(f"got {str(value).lower()} (a boolean)")
    return value


Number = Annotated[float, BeforeValidator(_not_bool)]
Integer = Annotated[int, BeforeValidator(_not_bool)]
PositiveInt = Annotated[Integer, Field(ge=1)]
NonNegativeInt = Annotated[Integer, Field(ge=0)]
PositiveFloat = Annotated[Number, Field(gt=0)]
NonNegativeFloat = Annotated[Number, Field(ge=0)]
Band = Annotated[list[NonNegativeFloat], Field(min_length=2, max_length=2)]


class ConfigError(ValueError):
    """A configuration is invalid. The message names the dotted path of the first bad key.

    :ivar str path: dotted path of the first offending key (``""`` for the whole file).
    :ivar list errors: ``(path, message)`` of every problem found.
    """

    def __init__(self, errors):
        self.errors = list(errors)
        self.path = self.errors[0][0]
        parts = [f"{path}: {message}" if path else message for path, message in self.errors]
        more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
        super().__init__("; ".join(parts[:3]) + more)

    @classmethod
    def at(cls, path, message):
        """One error at one dotted path."""
        return cls([(path, message)])


class _Section(BaseModel):
    # numbers are finite (``.inf`` and ``.nan`` are refused like any out-of-range value)
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False
    )


def _check_band(name, band):
    """Raise ``"<name>: expected low < high"`` (the prefix names the key, see :func:`_message`)."""
    if band is not None and not band[0] < band[1]:
        raise ValueError(f"{name}: expected a band [low, high] with low < high, got {list(band)}")


# ----------------------------------------------------------------------------- data
class DataConfig(_Section):
    """The series, its split and its windows.

    :ivar source: ``default`` (weekly Mauna Loa CO2, shipped with statsmodels), ``ett``
        (ETTh1; ``path`` or ``$VDN_ETT_PATH`` or ``../shared/data/ETT-small/ETTh1.csv``) or
        ``csv`` (any CSV with a date column; needs ``path``).
    :ivar path: file path for ``ett`` (optional) and ``csv`` (required). ``vdn fit`` resolves a
        relative path against the working directory and stores it absolute in the run's
        ``config.yaml``.
    :ivar date_column: date column of a ``csv`` source (``null``: none).
    :ivar columns: channels to keep (default all); forecasting is channel-independent.
    :ivar fill: missing values of a ``csv`` source: ``null`` (refuse), ``ffill``,
        ``interpolate``.
    :ivar split: ``ratio`` (fractions ``train``/``val``, the rest test), ``ett_hourly``
        (12/4/4 months) or ``protocol`` (the benchmark protocol ``protocol`` of
        :func:`~vdn_pyro.data.protocol.protocol_splits`).
    :ivar protocol: with ``split: protocol``: ``ett`` (ETT's 12/4/4 months at any sampling
        rate), ``long_horizon`` (7:1:2, the other long-horizon sets) or ``auto`` (``ett`` for a
        series with ETT columns and time stamps, else ``long_horizon``).
    :ivar lookback: look-back length L of a window.
    :ivar horizon: forecast horizon H.
    :ivar chunk: windows per training item T; with T > 1 each unit's latent over the chunk is
        one draw of its AR prior (temporal neurons).
    :ivar train_stride: rows between windows (and between the windows of a chunk) in training.
    :ivar val_stride: rows between validation windows.
    :ivar test_stride: rows between test windows.
    """

    source: Literal["default", "ett", "csv"] = "default"
    path: str | None = None
    date_column: str | None = "date"
    columns: list[str] | None = None
    fill: Literal["ffill", "interpolate"] | None = None
    split: Literal["ratio", "ett_hourly", "protocol"] = "ratio"
    protocol: Literal["auto", "ett", "long_horizon"] = "auto"
    train: Annotated[Number, Field(gt=0, lt=1)] = 0.7
    val: Annotated[Number, Field(gt=0, lt=1)] = 0.1
    lookback: PositiveInt = 104
    horizon: PositiveInt = 52
    chunk: PositiveInt = 4
    train_stride: PositiveInt = 1
    val_stride: PositiveInt = 1
    test_stride: PositiveInt = 1

    @model_validator(mode="after")
    def _check(self):
        if self.split == "ratio" and not self.train + self.val < 1:
            raise ValueError(f"val: expected train + val < 1, got {self.train} + {self.val}")
        if self.protocol != "auto" and self.split != "protocol":
            raise ValueError(
                f"protocol: expected split 'protocol' for protocol {self.protocol!r} (set "
                f"data.split=protocol), got split {self.split!r}"
            )
        if self.source == "csv" and not self.path:
            raise ValueError("path: expected the CSV file for source 'csv', got null")
        return self


# ----------------------------------------------------------------------------- neurons
class PriorConfig(_Section):
    """Each unit's prior.

    :ivar kind: ``ar`` (a stationary AR(p) process over the windows of a chunk) or ``normal``.
    :ivar order: AR order p.
    :ivar phi: initial lag-1 coefficient.
    :ivar phi_range: ``null`` or ``[lo, hi]`` bounding phi (AR(1) only).
    :ivar learn: learn the prior's parameters.
    """

    kind: Literal["ar", "normal"] = "ar"
    order: PositiveInt = 1
    phi: Annotated[Number, Field(gt=-1, lt=1)] = 0.5
    phi_range: Annotated[list[Number], Field(min_length=2, max_length=2)] | None = None
    learn: bool = True

    @model_validator(mode="after")
    def _check(self):
        _check_band("phi_range", self.phi_range)
        return self


class NeuronsConfig(_Section):
    """The forecaster: a DLinear skip path plus one layer of distributional neurons
    (:class:`~vdn_pyro.models.ForecasterConfig` documents each option).

    :ivar units: number of neurons U.
    :ivar latent_dim: latent dims k per neuron.
    :ivar features: width of the trunk read by the posteriors.
    :ivar kernel_size: moving-average length of the trunk and skip path.
    :ivar instance_norm: ``last``, ``mean`` or ``null``: instance normalisation of the trunk.
    :ivar skip: add the deterministic DLinear skip path.
    :ivar skip_norm: instance normalisation of the skip path (``null``: plain DLinear).
    :ivar activation: applied to the trunk's features before the neurons read them.
    :ivar prior: see :class:`PriorConfig`.
    :ivar scale_mode: posterior scale ``input`` (input-dependent) or ``unit``.
    :ivar mean: ``head`` (skip path plus the head on z) or ``skip`` (the skip path alone; the
        neurons set a heteroscedastic scale, so it needs ``likelihood_scale: heteroscedastic``).
    :ivar beta: KL coefficient: a number, or one per unit.
    :ivar train_draws: posterior draws K mixed in the training likelihood.
    :ivar deterministic: train the deterministic twin instead (z = posterior mean, no KL).
    """

    units: PositiveInt = 32
    latent_dim: PositiveInt = 1
    features: PositiveInt = 32
    kernel_size: PositiveInt = 25
    instance_norm: Literal["last", "mean"] | None = "last"
    skip: bool = True
    skip_norm: Literal["last", "mean"] | None = None
    activation: Literal["identity", "gelu", "relu", "silu", "tanh"] = "identity"
    prior: PriorConfig = Field(default_factory=PriorConfig)
    scale_mode: Literal["input", "unit"] = "input"
    scale_min: PositiveFloat = 1e-3
    scale_max: PositiveFloat = 10.0
    init_scale: PositiveFloat = 0.5
    likelihood_scale: Literal["learned", "heteroscedastic"] | PositiveFloat = "learned"
    likelihood_scale_min: NonNegativeFloat = 1e-3
    mean: Literal["head", "skip"] = "head"
    beta: PositiveFloat | list[PositiveFloat] = 1e-3
    train_draws: PositiveInt = 8
    deterministic: bool = False

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.beta, list) and len(self.beta) != self.units:
            raise ValueError(
                f"beta: expected a number or a list of {self.units} numbers (one per unit), got a "
                f"list of {len(self.beta)}"
            )
        if not self.scale_min < self.init_scale < self.scale_max:
            raise ValueError(
                f"init_scale: expected scale_min < init_scale < scale_max, got {self.scale_min}, "
                f"{self.init_scale}, {self.scale_max}"
            )
        return self


# ----------------------------------------------------------------------------- constraints
class KLBandConfig(_Section):
    """:class:`~vdn_pyro.inference.KLBand`: a thermostat on each unit's beta."""

    enabled: bool = True
    low: NonNegativeFloat = 0.05
    high: PositiveFloat = 0.3
    rate: PositiveFloat = 0.03
    beta_min: PositiveFloat = 1e-4
    beta_max: PositiveFloat = 100.0
    ema: Annotated[Number, Field(ge=0, lt=1)] = 0.9
    granularity: Literal["unit", "layer"] = "unit"
    damping: NonNegativeFloat = 2.0
    margin: Annotated[Number, Field(ge=0, lt=0.5)] = 0.25
    every: PositiveInt = 1

    @model_validator(mode="after")
    def _check(self):
        _check_band("high", [self.low, self.high])
        _check_band("beta_max", [self.beta_min, self.beta_max])
        return self


class FreeBitsConfig(_Section):
    """:class:`~vdn_pyro.inference.FreeBits`: a KL floor per unit."""

    enabled: bool = False
    lam: NonNegativeFloat = 0.1


class LocBandConfig(_Section):
    """:class:`~vdn_pyro.inference.LocBand`: keep each unit's loc^2 in a band."""

    enabled: bool = False
    low: NonNegativeFloat = 0.01
    high: PositiveFloat = 1.0
    weight: NonNegativeFloat = 1.0
    project: bool | Annotated[Number, Field(gt=0, le=1)] = False
    every: PositiveInt = 1

    @model_validator(mode="after")
    def _check(self):
        _check_band("high", [self.low, self.high])
        return self


class ScaleGuardConfig(_Section):
    """:class:`~vdn_pyro.inference.ScaleGuard`: keep posterior scales in ``[min, max]``."""

    enabled: bool = False
    min: PositiveFloat = 0.15
    max: PositiveFloat = 5.0

    @model_validator(mode="after")
    def _check(self):
        _check_band("max", [self.min, self.max])
        return self


class PersistenceConfig(_Section):
    """:class:`~vdn_pyro.inference.Persistence`: a band of AR half-lives (in windows)."""

    enabled: bool = False
    half_life: Band = Field(default_factory=lambda: [1.0, 52.0])

    @model_validator(mode="after")
    def _check(self):
        _check_band("half_life", self.half_life)
        if self.half_life[0] <= 0:
            raise ValueError(f"half_life: expected a band with low > 0, got {self.half_life}")
        return self


class ConstraintsConfig(_Section):
    """Local constraints, applied in this order when enabled."""

    kl_band: KLBandConfig = Field(default_factory=KLBandConfig)
    free_bits: FreeBitsConfig = Field(default_factory=FreeBitsConfig)
    loc_band: LocBandConfig = Field(default_factory=LocBandConfig)
    scale_guard: ScaleGuardConfig = Field(default_factory=ScaleGuardConfig)
    persistence: PersistenceConfig = Field(default_factory=PersistenceConfig)


# ----------------------------------------------------------------------------- fit
class FitConfig(_Section):
    """The optimisation (see :func:`~vdn_pyro.fit`).

    Together with the windows of ``data`` (``chunk``, ``train_stride``, ``val_stride``) it is the
    :class:`~vdn_pyro.forecasting.TrainConfig` of :func:`~vdn_pyro.forecasting.train_forecaster`
    (:meth:`RunConfig.train_config`), the recipe the benchmarks train with too.

    :ivar epochs: passes over the training items (ignored when ``steps`` is set).
    :ivar steps: total optimisation steps, or ``null`` to use ``epochs``.
    :ivar batch_size: training items per step.
    :ivar lr: initial learning rate.
    :ivar lr_decay: learning-rate factor at every new epoch (1: constant).
    :ivar optim: ``adam``, ``clipped_adam`` or ``adamw``.
    :ivar num_particles: ELBO particles.
    :ivar seed: seeds the initialisation, the minibatch order and the draws.
    :ivar log_every: steps between rows of the logs.
    :ivar val_every: steps between validations (``null``: once per epoch).
    :ivar checkpoint_every: steps between checkpoints (``null``: once per epoch).
    :ivar patience: stop after this many validations without a better validation score
        (0: never).
    :ivar select: the validation score: ``loss`` (minus the ELBO per window) or a metric of the
        predictive, ``crps``, ``mse`` or ``nll``, over every validation window, or a score of its
        joint sample paths, ``energy`` or ``crps_sum`` (lower is better).
    :ivar val_samples: predictive draws per validation window when ``select`` is a metric.
    :ivar skip_fit: how the skip path is fitted: with the rest (``joint``), or first and then
        frozen, in closed form (``ridge``: ridge least squares, the penalty chosen on the
        validation MSE) or as a DLinear trained by this recipe (``sgd``).
    :ivar ridges: the penalties (per observation) ``skip_fit: ridge`` chooses from.
    :ivar start_at_skip: with a fitted skip path, start from that DLinear's Gaussian predictive
        (zero head) and let the starting state compete in the selection.
    :ivar norm: input normalisation of every window (``none``, ``last``: the window's last value,
        ``mean_scale``: its mean and standard deviation; see
        :func:`~vdn_pyro.forecasting.window_stats`): the forecaster is trained on normalised
        windows and targets and evaluated in the original (standardised) units.
    :ivar restore_best: evaluate and report the best-validation weights.
    :ivar max_bad_steps: stop after this many non-finite steps in a row.
    :ivar living_kl: KL (nats) above which a unit counts as living in the logs and the bar.
    :ivar threads: torch CPU threads (``null``: torch's default). One is fastest for networks
        this small, and much faster on a busy machine, where threads wait for each other.
    :ivar pyro_validation: run with Pyro's distribution validation (several times slower).
    """

    epochs: PositiveInt = 100
    steps: PositiveInt | None = None
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-2
    lr_decay: Annotated[Number, Field(gt=0, le=1)] = 0.95
    optim: Literal["adam", "clipped_adam", "adamw"] = "adam"
    num_particles: PositiveInt = 1
    seed: NonNegativeInt = 0
    log_every: PositiveInt = 5
    val_every: PositiveInt | None = None
    checkpoint_every: PositiveInt | None = None
    patience: NonNegativeInt = 0
    select: Literal["loss", "crps", "mse", "nll", "energy", "crps_sum"] = "loss"
    val_samples: PositiveInt = 100
    skip_fit: Literal["joint", "ridge", "sgd"] = "joint"
    ridges: Annotated[list[NonNegativeFloat], Field(min_length=1)] = Field(
        default_factory=lambda: list(RIDGES)
    )
    start_at_skip: bool = True
    norm: Literal["none", "last", "mean_scale"] = "none"
    restore_best: bool = True
    max_bad_steps: PositiveInt = 10
    living_kl: NonNegativeFloat = 0.01
    threads: PositiveInt | None = 1
    pyro_validation: bool = False


# ----------------------------------------------------------------------------- reporting
class DiagnosticsConfig(_Section):
    """The per-unit table (:func:`~vdn_pyro.inference.unit_report`) and the unit monitor.

    :ivar kl_band: KL band of the table (a ``kl_band`` constraint replaces it).
    :ivar loc_band: loc^2 band (a ``loc_band`` constraint replaces it).
    :ivar scale_band: posterior-scale band (a ``scale_guard`` constraint replaces it).
    :ivar monitor_every: record the table every this many steps during the fit (0: never).
    :ivar max_points: windows the tables are computed on (the first of the split).
    :ivar split: ``val`` or ``test``: the windows of the final table.
    :ivar num_samples: draws per window of the mutual-information estimate.
    """

    kl_band: Band = Field(default_factory=lambda: [0.05, 0.3])
    loc_band: Band = Field(default_factory=lambda: [0.01, 1.0])
    scale_band: Band = Field(default_factory=lambda: [0.15, 5.0])
    monitor_every: NonNegativeInt = 25
    max_points: PositiveInt = 256
    split: Literal["val", "test"] = "test"
    num_samples: PositiveInt = 8

    @model_validator(mode="after")
    def _check(self):
        for name in ("kl_band", "loc_band", "scale_band"):
            _check_band(name, getattr(self, name))
        return self


class EvaluateConfig(_Section):
    """Test metrics (:func:`~vdn_pyro.forecasting.evaluate_forecaster`).

    :ivar num_samples: predictive draws S per window.
    :ivar exact: score the exact Gaussian marginal when the model has one (else the Monte Carlo
        mixture of S draws).
    :ivar batch_size: windows per scoring batch.
    :ivar baseline: also score the repeat-last-value baseline (nothing to train).
    :ivar paths: also score ``num_samples`` joint sample paths over the horizon (energy score,
        CRPS and interval coverage of the horizon sum, ...:
        :data:`~vdn_pyro.forecasting.PATH_METRICS`).
    """

    num_samples: PositiveInt = 100
    exact: bool = True
    batch_size: PositiveInt = 512
    baseline: bool = True
    paths: bool = True


class OutputConfig(_Section):
    """What a run writes.

    :ivar root: parent of the default run directories ``<root>/<timestamp>``.
    :ivar plots: write the PNG plots.
    :ivar dpi: resolution of the plots, 10 to 600 (the dashboard is 15 x 8 inches).
    :ivar fan_window: which test window the fan chart shows (clipped to the last).
    :ivar idata: write ``idata.nc`` (and the ArviZ summary and forest).
    :ivar idata_obs: test windows in the InferenceData (the first ones).
    :ivar idata_draws: draws per chain.
    :ivar idata_chains: chains.
    """

    root: str = "runs"
    plots: bool = True
    dpi: Annotated[Integer, Field(ge=10, le=600)] = 110
    fan_window: NonNegativeInt = 0
    idata: bool = True
    idata_obs: PositiveInt = 16
    idata_draws: PositiveInt = 100
    idata_chains: PositiveInt = 2


class RunConfig(_Section):
    """A whole run; see the module docstring."""

    data: DataConfig = Field(default_factory=DataConfig)
    neurons: NeuronsConfig = Field(default_factory=NeuronsConfig)
    constraints: ConstraintsConfig = Field(default_factory=ConstraintsConfig)
    fit: FitConfig = Field(default_factory=FitConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def forecaster_config(self, **changes):
        """The :class:`~vdn_pyro.models.ForecasterConfig` of ``neurons`` and ``data`` (look-back,
        horizon).

        :param changes: options to change, e.g. ``deterministic=True`` for the twin.
        :raises ConfigError: at ``neurons`` if the forecaster refuses the options.
        """
        n, prior = self.neurons, self.neurons.prior
        options = dict(
            lookback=self.data.lookback,
            horizon=self.data.horizon,
            units=n.units,
            latent_dim=n.latent_dim,
            features=n.features,
            kernel_size=n.kernel_size,
            instance_norm=n.instance_norm,
            skip=n.skip,
            skip_norm=n.skip_norm,
            activation=n.activation,
            prior=prior.kind,
            ar_order=prior.order,
            phi=prior.phi,
            phi_range=prior.phi_range,
            learn_prior=prior.learn,
            scale_mode=n.scale_mode,
            scale_min=n.scale_min,
            scale_max=n.scale_max,
            init_scale=n.init_scale,
            likelihood_scale=n.likelihood_scale,
            likelihood_scale_min=n.likelihood_scale_min,
            mean=n.mean,
            beta=n.beta,
            train_draws=n.train_draws,
            deterministic=n.deterministic,
        )
        options.update(changes)
        try:
            return ForecasterConfig(**options)
        except (TypeError, ValueError) as e:
            raise ConfigError.at("neurons", str(e)) from None

    def train_config(self):
        """The :class:`~vdn_pyro.forecasting.TrainConfig` of ``fit``, ``data`` (chunk and
        strides) and ``evaluate`` (scoring batch size): the recipe of
        :func:`~vdn_pyro.forecasting.train_forecaster`.

        :raises ConfigError: at ``fit`` if the recipe refuses the options.
        """
        f, d = self.fit, self.data
        try:
            return TrainConfig(
                epochs=f.epochs,
                steps=f.steps,
                batch_size=f.batch_size,
                lr=f.lr,
                lr_decay=f.lr_decay,
                optim=f.optim,
                patience=f.patience,
                select=f.select,
                train_stride=d.train_stride,
                chunk=d.chunk,
                val_stride=d.val_stride,
                num_samples=f.val_samples,
                eval_batch_size=self.evaluate.batch_size,
                num_particles=f.num_particles,
                skip_fit=f.skip_fit,
                ridges=tuple(f.ridges),
                start_at_skip=f.start_at_skip,
                norm=f.norm,
                val_every=f.val_every,
                log_every=f.log_every,
                restore_best=f.restore_best,
                max_bad_steps=f.max_bad_steps,
                living_kl=f.living_kl,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError.at("fit", str(e)) from None


#: Named starting points. ``default`` is the schema's defaults (the main job: the embedded CO2
#: series); ``ett`` is the recipe of the README's ETTh1 benchmark at H = 96 (the standard
#: 12/4/4-month protocol; ``benchmarks/forecast_ett.py`` trains its VDN forecaster with it): 64
#: units with AR(1) priors over chunks of 4 windows 2 h apart, mean = the frozen closed-form
#: (ridge) skip path, heteroscedastic scale from K = 16 posterior draws, selection on the
#: validation CRPS; ``quick`` is a tiny run for tests and smoke checks (seconds).
PRESETS = {
    "default": {},
    "ett": {
        "data": {
            "source": "ett",
            "split": "ett_hourly",
            "lookback": 336,
            "horizon": 96,
            "chunk": 4,
            "train_stride": 2,
        },
        "neurons": {
            "units": 64,
            "features": 64,
            "activation": "gelu",
            "prior": {"kind": "ar", "phi": 0.5},
            "beta": 1e-3,
            "init_scale": 0.5,
            "likelihood_scale": "heteroscedastic",
            "mean": "skip",
            "train_draws": 16,
        },
        "constraints": {"kl_band": {"enabled": False}},
        "fit": {
            "epochs": 10,
            "batch_size": 64,
            "lr": 5e-3,
            "lr_decay": 0.6,
            "patience": 3,
            "select": "crps",
            "val_samples": 32,
            "skip_fit": "ridge",
            "log_every": 20,
        },
        "diagnostics": {"monitor_every": 200},
        "evaluate": {"num_samples": 100},
    },
    "quick": {
        "data": {
            "lookback": 24,
            "horizon": 8,
            "chunk": 2,
            "train_stride": 8,
            "val_stride": 8,
            "test_stride": 8,
        },
        "neurons": {"units": 4, "features": 8, "kernel_size": 5, "train_draws": 2},
        "fit": {"steps": 6, "batch_size": 16, "log_every": 2, "checkpoint_every": 2, "threads": 1},
        "diagnostics": {"monitor_every": 3, "max_points": 32, "num_samples": 2},
        "evaluate": {"num_samples": 20},
        "output": {"dpi": 50, "idata_obs": 4, "idata_draws": 20},
    },
}


# ----------------------------------------------------------------------------- errors
def _unwrap(annotation):
    """``(type, metadata)`` of an annotation, with ``Annotated`` peeled off."""
    metadata = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata.extend(extra)
    return annotation, metadata


def _bounds(metadata):
    parts = []
    for item in metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{op} {value:g}")
        for attr, text in (("min_length", "at least {} items"), ("max_length", "at most {} items")):
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(text.format(value))
        # FieldInfo keeps its constraints in .metadata
        parts.extend(_bounds(getattr(item, "metadata", [])))
    return parts


_NAMES = {
    bool: ("true or false", "booleans"),
    int: ("int", "ints"),
    float: ("number", "numbers"),
    str: ("string", "strings"),
}


def _describe(annotation, metadata=(), plural=False):
    """A short human description of what a field accepts, e.g. ``int >= 1``."""
    annotation, extra = _unwrap(annotation)
    metadata = list(metadata) + extra
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_describe(a, plural=plural) for a in members)
        nullable = len(members) < len(typing.get_args(annotation))
        return text + (" or null" if nullable else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        sizes = {}
        for meta in metadata:
            for inner in [meta, *getattr(meta, "metadata", [])]:  # FieldInfo nests its constraints
                for attr in ("min_length", "max_length"):
                    if getattr(inner, attr, None) is not None:
                        sizes[attr] = getattr(inner, attr)
        low, high = sizes.get("min_length"), sizes.get("max_length")
        count = f"{low} " if low is not None and low == high else ""
        kind = "a non-empty list" if low and high is None else "a list"
        return f"{kind} of {count}{_describe(item, plural=True)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a section (a mapping of keys)"
    name = _NAMES.get(annotation, (getattr(annotation, "__name__", str(annotation)),) * 2)[int(plural)]
    bounds = [b for b in _bounds(metadata) if "items" not in b]
    return name + (" " + " and ".join(bounds) if bounds else "")


def _strip_none(annotation):
    """``X | None -> X`` (other unions unchanged)."""
    bare, _ = _unwrap(annotation)
    if typing.get_origin(bare) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(bare) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _field_at(model, loc):
    """Walk an error location through the schema.

    :returns: ``(path, annotation, metadata, owner)``: the dotted path of the schema key the
        location points at (pydantic's union-member tags dropped; list items as ``key[i]``),
        what that key accepts, and the section class that holds it (``None`` past a list).
    """
    path, annotation, metadata, owner = [], model, [], None
    for part in loc:
        inner, _ = _unwrap(_strip_none(annotation))
        if isinstance(inner, type) and issubclass(inner, BaseModel) and isinstance(part, str):
            owner = inner
            path.append(part)
            if part not in inner.model_fields:
                return ".".join(path), None, [], owner
            field = inner.model_fields[part]
            annotation, metadata = field.annotation, field.metadata
        elif isinstance(part, int) and typing.get_origin(inner) is list:
            path[-1] = f"{path[-1]}[{part}]"
            annotation, metadata = typing.get_args(inner)[0], []
        else:
            break  # a union member tag such as 'float' or 'list[float]'
    return ".".join(path), annotation, metadata, owner


def _message(error, model):
    path, annotation, metadata, owner = _field_at(model, error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        known = list(owner.model_fields)
        name = path.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return path, f"unknown key{hint}; expected one of {', '.join(known)}"
    if kind == "value_error":  # a section's own check: "<key>: <message>"
        text = error["msg"].removeprefix("Value error, ")
        key, sep, rest = text.partition(": ")
        section = _unwrap(_strip_none(annotation))[0]
        if sep and isinstance(section, type) and key in getattr(section, "model_fields", {}):
            return (f"{path}.{key}" if path else key), rest
        if text.startswith("got ") and annotation is not None:  # _not_bool
            return path, f"expected {_describe(annotation, metadata)}, {text}"
        return path, text
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        expected = "a section (a mapping of keys)"
    elif annotation is not None:
        expected = _describe(annotation, metadata)
    else:
        expected = error["msg"].replace("Input should be", "").strip()
    return path, f"expected {expected}, got {value!r}"


def validate_config(data, model=None):
    """Validate a nested dict against the schema.

    :param dict data: the configuration (sections as nested dicts).
    :param model: the schema class (default :class:`RunConfig`).
    :returns: a :class:`RunConfig`.
    :raises ConfigError: naming the dotted path of each invalid key.
    """
    model = model or RunConfig
    if not isinstance(data, dict):
        found = type(data).__name__
        raise ConfigError.at("", f"expected a mapping of sections at the top level, got {found}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        seen, errors = set(), []
        for error in e.errors():
            path, message = _message(error, model)
            if path not in seen:
                seen.add(path)
                errors.append((path, message))
        raise ConfigError(errors) from None


# ----------------------------------------------------------------------------- files
def _load_toml(text, path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ImportError("Reading TOML on Python 3.10 needs tomli: pip install tomli") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError.at("", f"{path} is not valid TOML: {e}") from None


def _load_yaml(text, path):
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError.at("", f"{path} is not valid YAML: {first}") from None
    return {} if data is None else data  # an empty file (or only comments)


#: Suffixes :func:`read_config_file` reads, and the format of each.
CONFIG_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}
_EXAMPLES = {
    "YAML": "'fit: {lr: 0.005}'",
    "TOML": "'[fit] lr = 0.005'",
    "JSON": """'{"fit": {"lr": 0.005}}'""",
}


def _load_json(text, path):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError.at("", f"{path} is not valid JSON: {e}") from None


def read_config_file(path):
    """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON (``.json``) file into a dict,
    unvalidated.

    :raises ConfigError: if the file is missing, unreadable, of another kind, empty (a file holds
        at least one option; with none, give no file) or not a mapping.
    """
    path = Path(path)
    kinds = ", ".join(CONFIG_SUFFIXES)
    if not path.is_file():
        raise ConfigError.at("", f"config file {path} does not exist (expected a {kinds} file)")
    kind = CONFIG_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError.at(
            "", f"config file {path}: expected a {kinds} file, got the suffix {path.suffix or '(none)'!r}"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError.at("", f"cannot read config file {path}: {e}") from None
    load = {"YAML": _load_yaml, "TOML": _load_toml, "JSON": _load_json}[kind]
    data = load(text, path)
    if not isinstance(data, dict):
        found = type(data).__name__
        raise ConfigError.at("", f"{path}: expected a mapping of sections at the top level, got {found}")
    if not data:
        raise ConfigError.at(
            "",
            f"config file {path} holds no option (expected {kind} sections such as {_EXAMPLES[kind]}; "
            "to run with the defaults, give no file)",
        )
    return data


def parse_overrides(items):
    """Turn ``["fit.lr=1e-3", "neurons.prior.kind=normal"]`` into a nested dict.

    Values are parsed as YAML scalars or flow collections (``3``, ``1e-3``, ``true``, ``null``,
    ``[0.05, 0.3]``); anything else stays a string.

    :raises ConfigError: for an item without ``=`` or with an empty key.
    """
    import yaml

    out = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError.at("", f"expected KEY=VALUE with a dotted key (e.g. fit.lr=1e-3), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as a string; numbers are what is meant
                value = float(value) if any(c.isdigit() for c in value) else value
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError.at(key, f"{part} is set both as a value and as a section")
            node = child
        node[parts[-1]] = value
    return out


def merge_dicts(base, update):
    """A deep merge: mappings merge key by key, anything else in ``update`` replaces ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path=None, preset=None, overrides=()):
    """Build a validated configuration: preset, then file, then overrides.

    :param path: a YAML, TOML or JSON file, or ``None``.
    :param str preset: a name in :data:`PRESETS` (default ``"default"``).
    :param overrides: ``KEY=VALUE`` strings with dotted keys.
    :returns: a :class:`RunConfig`.
    :raises ConfigError: for an unknown preset, a bad file or an invalid key.
    """
    name = "default" if preset is None else preset
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError.at("preset", f"unknown preset {name!r}{hint}; expected one of {', '.join(PRESETS)}")
    data = PRESETS[name]
    if path is not None:
        data = merge_dicts(data, read_config_file(path))
    data = merge_dicts(data, parse_overrides(overrides))
    return validate_config(data)


def _to_toml(data, prefix=()):
    """A minimal TOML writer for the config (``null`` values are left out: TOML has none)."""
    import json

    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    out = []
    if prefix and lines:
        out.append(f"[{'.'.join(prefix)}]")
    out.extend(lines)
    for key, value in tables:
        block = _to_toml(value, prefix + (key,))
        if block:
            out.append("")
            out.append(block)
    return "\n".join(out)


def dump_config(config, path=None):
    """Write (or return) a configuration as YAML, or TOML for a ``.toml`` path, JSON for a
    ``.json`` one.

    TOML cannot hold ``null``; such keys are left out of a TOML file (they then take their
    defaults when it is read back), so YAML is the exact record.

    :param RunConfig config: the configuration.
    :param path: the file to write, or ``None`` to return the text.
    :returns: the text.
    """
    data: dict[str, Any] = config.model_dump(mode="json")
    suffix = Path(path).suffix.lower() if path is not None else ""
    if suffix == ".toml":
        text = _to_toml(data) + "\n"
    elif suffix == ".json":
        import json

        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text

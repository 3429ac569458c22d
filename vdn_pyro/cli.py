r"""The ``vdn`` command: fit, evaluate and report a forecaster of distributional neurons.

::

    vdn fit [CONFIG] [--preset NAME] [--run-dir DIR] [--set KEY=VALUE ...] [--quiet]
    vdn fit --resume RUN_DIR [--set KEY=VALUE ...] [--quiet]
    vdn evaluate RUN_DIR [--split test|val] [--num-samples S]
    vdn report RUN_DIR [--no-plots]
    vdn config [CONFIG] [--preset NAME] [--set KEY=VALUE ...]

``vdn fit`` with no argument is the project's main job: it trains the default
:class:`~vdn_pyro.models.Forecaster` (a DLinear skip path plus 32 temporal neurons with AR(1)
priors and a KL thermostat) on the embedded weekly Mauna Loa CO2 series and writes a run
directory (``runs/<timestamp>`` unless ``--run-dir`` is given)::

    config.yaml             the resolved configuration (every option)
    run.json                status, steps, seconds, versions, command line
    checkpoints/last.pt     atomic checkpoint: network, optimiser, constraints, RNG, history
    log.csv, log.jsonl      one row per logged step (jsonl adds per-unit KL and beta)
    monitor.csv             the per-unit table every ``diagnostics.monitor_every`` steps
    units.csv, layers.csv   final per-unit diagnostics table and its per-layer summary
    metrics.json/.csv       test metrics: MSE, MAE, CRPS, NLL, coverage and width
    idata.nc                ArviZ InferenceData (netCDF) of the first test windows
    arviz_summary.csv       az.summary of the unit posteriors
    plots/dashboard.png     living-neuron dashboard
    plots/fan_chart.png     forecast fan chart of one test window
    plots/forest.png        ArviZ forest of the unit posteriors of one window

``vdn fit --resume RUN_DIR`` continues from the last checkpoint exactly (bit-identical on CPU).
SIGINT (Ctrl-C) or SIGTERM during training finishes the step, writes a final checkpoint and exits
with status 130 (143 for SIGTERM). Errors in the configuration, the run directory or the
checkpoint print one line to stderr and exit with status 2 (``vdn --debug ...`` shows the
traceback); a run that keeps producing NaN/inf exits with status 1.

The training is :func:`~vdn_pyro.forecasting.train_forecaster` with the
:class:`~vdn_pyro.forecasting.TrainConfig` of the configuration
(:meth:`~vdn_pyro.config.RunConfig.train_config`): the recipe the examples and the benchmarks
train with, so ``vdn fit --preset ett`` trains the VDN row of ``benchmarks/forecast_ett.py`` at
H = 96. The command asks for what a library leaves off: SIGINT/SIGTERM handling, and the seed
``fit.seed`` for the initial weights and for the fit's own random state.

Everything the command does is also available from Python: :func:`fit_run`, :func:`load_run`,
:func:`evaluate_run` and :func:`report_run`.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from vdn_pyro import __version__
from vdn_pyro.config import ConfigError, dump_config, load_config
from vdn_pyro.data import (
    TimeSeries,
    ett_hourly_splits,
    load_csv,
    load_default,
    load_ett,
    ratio_splits,
)
from vdn_pyro.forecasting import METRICS, evaluate_forecaster, train_forecaster, training_windows
from vdn_pyro.inference import (
    CheckpointError,
    FitResult,
    FreeBits,
    KLBand,
    LocBand,
    NonFiniteError,
    Persistence,
    ScaleGuard,
    UnitMonitor,
    layer_summary,
    load_checkpoint,
    save_inference_data,
    to_inference_data,
    unit_report,
)
from vdn_pyro.inference import arviz as vdn_arviz
from vdn_pyro.models import Forecaster, RepeatLast

__all__ = [
    "Run",
    "RunDir",
    "RunError",
    "build_constraints",
    "build_network",
    "evaluate_run",
    "fit_run",
    "load_data",
    "load_run",
    "main",
    "report_run",
]

QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
EXIT_USAGE = 2
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 130


class RunError(ValueError):
    """A run directory is missing, incomplete or already in use."""


# ----------------------------------------------------------------------------- run directory
@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run directory (see the module docstring).

    :ivar pathlib.Path root: the directory.
    """

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    info = property(lambda self: self.root / "run.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    checkpoint = property(lambda self: self.root / "checkpoints" / "last.pt")
    log_csv = property(lambda self: self.root / "log.csv")
    log_jsonl = property(lambda self: self.root / "log.jsonl")
    monitor = property(lambda self: self.root / "monitor.csv")
    units = property(lambda self: self.root / "units.csv")
    layers = property(lambda self: self.root / "layers.csv")
    metrics_json = property(lambda self: self.root / "metrics.json")
    metrics_csv = property(lambda self: self.root / "metrics.csv")
    idata = property(lambda self: self.root / "idata.nc")
    summary = property(lambda self: self.root / "arviz_summary.csv")
    plots = property(lambda self: self.root / "plots")
    dashboard = property(lambda self: self.root / "plots" / "dashboard.png")
    fan_chart = property(lambda self: self.root / "plots" / "fan_chart.png")
    forest = property(lambda self: self.root / "plots" / "forest.png")

    def check_existing(self, need_checkpoint=True):
        """Raise :class:`RunError` unless this is a run directory written by ``vdn fit``."""
        if not self.root.is_dir():
            raise RunError(f"no run directory at {self.root} (expected the directory that `vdn fit` printed)")
        if not self.config.is_file():
            raise RunError(f"{self.root} is not a vdn run directory: it has no {self.config.name}")
        if need_checkpoint and not self.checkpoint.is_file():
            raise RunError(
                f"{self.root} has no checkpoint ({self.checkpoint.relative_to(self.root)}): the fit "
                "stopped before its first one; start it again with `vdn fit`"
            )

    def read_info(self):
        """The contents of ``run.json`` (``{}`` if missing or unreadable)."""
        try:
            return json.loads(self.info.read_text())
        except (OSError, ValueError):
            return {}

    def write_info(self, **fields):
        """Update ``run.json`` with ``fields`` (written atomically)."""
        info = self.read_info()
        info.update(fields)
        tmp = self.info.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
        tmp.replace(self.info)
        return info


def _new_run_dir(root):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    suffix = 1
    while path.exists():
        path = Path(root) / f"{stamp}-{suffix}"
        suffix += 1
    return path


# ----------------------------------------------------------------------------- building blocks
def _select_columns(series, columns):
    if not columns:
        return series
    missing = [c for c in columns if c not in series.columns]
    if missing:
        raise ConfigError.at(
            "data.columns", f"expected columns of {series.name} {series.columns}, got {missing}"
        )
    index = [series.columns.index(c) for c in columns]
    return TimeSeries(series.values[:, index], list(columns), series.index, series.name)


def load_data(config):
    """The series and its train/validation/test splits.

    :param config: a :class:`~vdn_pyro.config.RunConfig`.
    :returns: ``(series, splits)``: a :class:`~vdn_pyro.data.TimeSeries` and
        :class:`~vdn_pyro.data.ForecastSplits`.
    :raises ConfigError: if the series cannot be split as configured.
    """
    data = config.data
    try:
        if data.source == "default":
            series = _select_columns(load_default(), data.columns)
        elif data.source == "ett":
            series = _select_columns(load_ett(data.path), data.columns)
        else:
            series = load_csv(
                data.path, date_column=data.date_column, target_columns=data.columns, fill=data.fill
            )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError.at("data", f"cannot load the {data.source} series: {e}") from None
    try:
        if data.split == "ett_hourly":
            splits = ett_hourly_splits(series, data.lookback, data.horizon)
        else:
            splits = ratio_splits(series, data.lookback, data.horizon, data.train, data.val)
    except ValueError as e:
        raise ConfigError.at(
            "data", f"{series.name} ({len(series)} rows) cannot be split as configured: {e}"
        ) from None
    return series, splits


def _training_items(recipe, splits):
    """Training items ``(N, T, L)``/``(N, T, H)`` (``(N, L)``/``(N, H)`` when ``chunk = 1``), as
    :func:`~vdn_pyro.forecasting.train_forecaster` cuts them."""
    try:
        return training_windows(splits, recipe)
    except ValueError as e:
        raise ConfigError.at(
            "data.chunk", f"the training split holds no chunk of {recipe.chunk} windows: {e}"
        ) from None


def _windows(config, splits, split):
    stride = {
        "train": config.data.train_stride,
        "val": config.data.val_stride,
        "test": config.data.test_stride,
    }
    return splits.windows(split, stride=stride[split])  # (W * C, L), (W * C, H)


def build_network(config):
    """The :class:`~vdn_pyro.models.Forecaster` described by ``config.neurons`` and
    ``config.data`` (lookback, horizon): :meth:`~vdn_pyro.config.RunConfig.forecaster_config`.

    :raises ConfigError: if the forecaster refuses the options.
    """
    options = config.forecaster_config()
    try:
        return Forecaster(options)
    except (TypeError, ValueError) as e:
        raise ConfigError.at("neurons", str(e)) from None


def build_constraints(config):
    """The enabled local constraints, in the order of ``config.constraints`` (none for the
    deterministic twin, which has no distributional units)."""
    if config.neurons.deterministic:
        return []
    c, out = config.constraints, []
    try:
        if c.kl_band.enabled:
            k = c.kl_band
            out.append(
                KLBand(
                    k.low,
                    k.high,
                    k.rate,
                    k.beta_min,
                    k.beta_max,
                    k.ema,
                    granularity=k.granularity,
                    damping=k.damping,
                    margin=k.margin,
                    every=k.every,
                )
            )
        if c.free_bits.enabled:
            out.append(FreeBits(c.free_bits.lam))
        if c.loc_band.enabled:
            b = c.loc_band
            out.append(LocBand(b.low, b.high, b.weight, b.project, every=b.every))
        if c.scale_guard.enabled:
            out.append(ScaleGuard(c.scale_guard.min, c.scale_guard.max))
        if c.persistence.enabled:
            out.append(Persistence(half_life=tuple(c.persistence.half_life)))
    except (TypeError, ValueError) as e:
        raise ConfigError.at("constraints", str(e)) from None
    return out


def _check_constraints(constraints, network):
    """Bind each constraint to the network now (no side effect), so that one that does not fit
    it (e.g. ``persistence`` without an AR prior) is a configuration error before training."""
    for constraint in constraints:
        try:
            constraint.bind(network)
        except (TypeError, ValueError) as e:
            raise ConfigError.at("constraints", str(e)) from None


def _site(network):
    """The sample site of the forecaster's layer of neurons (``"layers.0.z"``)."""
    return network.site_names[0]


def _diagnostic_windows(x, count):
    """At most ``count`` windows, evenly spaced over ``x``."""
    if x.shape[0] <= count:
        return x
    index = torch.linspace(0, x.shape[0] - 1, count).round().long()
    return x[index]


# ----------------------------------------------------------------------------- callbacks
class _RunMonitor:
    """A :class:`~vdn_pyro.inference.UnitMonitor` that appends each per-unit table it records to
    ``monitor.csv``. On resume it keeps the rows before the checkpoint's step (and reads them back
    for the drift), so the file reads as one run."""

    def __init__(self, x, path, every, **report_options):
        self.path = Path(path)
        self.monitor = UnitMonitor(x, every, **report_options)

    def _append(self, report):
        header = not self.path.exists() or self.path.stat().st_size == 0
        report.to_csv(self.path, mode="a", header=header, index=False)

    def _forward(self, hook, state):
        """Call the monitor's hook; save the records it adds."""
        before = len(self.monitor.reports)
        getattr(self.monitor, hook)(state)
        for _, report in self.monitor.reports[before:]:
            self._append(report)

    def on_fit_start(self, state):
        import pandas as pd

        kept = []
        if state.step > 0 and self.path.exists() and self.path.stat().st_size:
            frame = pd.read_csv(self.path)
            kept = [
                (int(s), rows.reset_index(drop=True))
                for s, rows in frame[frame.step < state.step].groupby("step")
            ]
        self.path.unlink(missing_ok=True)
        for _, report in kept:
            self._append(report)
        self._forward("on_fit_start", state)  # resets the monitor's records, then takes one
        self.monitor.reports[:0] = kept

    def on_step_end(self, state):
        self._forward("on_step_end", state)

    def on_fit_end(self, state):
        self._forward("on_fit_end", state)


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """Everything about one run, in memory.

    :ivar config: the :class:`~vdn_pyro.config.RunConfig`.
    :ivar RunDir dir: its files.
    :ivar series: the :class:`~vdn_pyro.data.TimeSeries`.
    :ivar splits: the :class:`~vdn_pyro.data.ForecastSplits`.
    :ivar network: the fitted :class:`~vdn_pyro.models.Forecaster` (best-validation weights
        when ``fit.restore_best``).
    :ivar result: the :class:`~vdn_pyro.FitResult` (history, per-unit KL and beta).
    :ivar list constraints: the constraints, with their state.
    """

    config: object
    dir: RunDir
    series: object
    splits: object
    network: object
    result: object
    constraints: list


@contextlib.contextmanager
def _torch_settings(config):
    """Threads and Pyro validation for the run, restored afterwards."""
    threads, validation = torch.get_num_threads(), pyro.infer.is_validation_enabled()
    if config.fit.threads is not None:
        torch.set_num_threads(config.fit.threads)
    pyro.enable_validation(config.fit.pyro_validation)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        pyro.enable_validation(validation)


class _QuietFitLog(logging.Filter):
    """Drop :func:`~vdn_pyro.fit`'s interruption message, which names the Python API; the
    command prints its own."""

    def filter(self, record):
        return "interrupted" not in record.getMessage()


def _versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "vdn_pyro": __version__,
    }


def fit_run(config, run_dir, *, resume=False, progress=True, echo=print, argv=None):
    """Fit the forecaster of ``config`` into ``run_dir`` and, unless interrupted, write the
    evaluation and the report.

    :param config: a :class:`~vdn_pyro.config.RunConfig`.
    :param run_dir: the run directory (created; for a fresh run it must be empty or absent).
    :param bool resume: continue from ``run_dir/checkpoints/last.pt``.
    :param bool progress: show the progress bar.
    :param echo: called with each line of the summary (``print`` by default).
    :param argv: the command line, recorded in ``run.json``.
    :returns: the :class:`Run` (``run.result.interrupted`` tells whether it stopped early).
    """
    run_dir = RunDir(run_dir)
    if resume:
        run_dir.check_existing()
    elif run_dir.root.exists() and any(run_dir.root.iterdir()):
        raise RunError(
            f"run directory {run_dir.root} is not empty; continue it with `vdn fit --resume {run_dir.root}` "
            "or choose another --run-dir"
        )
    with _torch_settings(config):
        series, splits = load_data(config)
        recipe = config.train_config()
        x, _ = _training_items(recipe, splits)  # (N, T, L)
        x_val, _ = _windows(config, splits, "val")  # (V, L)
        pyro.set_rng_seed(config.fit.seed)  # the initial weights; the fit draws from its own seed
        network = build_network(config)
        constraints = build_constraints(config)
        _check_constraints(constraints, network)
        total = _total_steps(config, x.shape[0])
        if resume:  # refuse before touching the directory
            step = load_checkpoint(run_dir.checkpoint, network=network)["step"]
            if step > total:
                raise RunError(
                    f"the run in {run_dir.root} is already at step {step}, beyond the {total} steps asked "
                    "for; ask for more with --set fit.steps=N (steps count from the start of the run)"
                )
        run_dir.root.mkdir(parents=True, exist_ok=True)
        echo(f"run directory: {run_dir.root}")
        sys.stdout.flush()
        dump_config(config, run_dir.config)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        run_dir.write_info(status="running", started=started, command=argv, versions=_versions())
        callbacks = []
        if config.diagnostics.monitor_every and not config.neurons.deterministic:
            callbacks.append(
                _RunMonitor(
                    _diagnostic_windows(x_val, config.diagnostics.max_points),
                    run_dir.monitor,
                    config.diagnostics.monitor_every,
                    **_report_options(config, constraints),
                )
            )
        fit_logger = logging.getLogger("vdn_pyro.inference.fit")
        quiet_filter = _QuietFitLog()
        fit_logger.addFilter(quiet_filter)
        try:
            result = train_forecaster(
                network,
                splits,
                recipe,
                seed=config.fit.seed,
                callbacks=callbacks,
                constraints=constraints,
                progress=progress,
                log_dir=run_dir.root,
                checkpoint_dir=run_dir.checkpoints,
                checkpoint_every=config.fit.checkpoint_every,
                resume=resume,
                handle_signals=True,
            )
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            run_dir.write_info(status=status, error=f"{type(e).__name__}: {e}")
            raise
        finally:
            fit_logger.removeFilter(quiet_filter)
        run = Run(config, run_dir, series, splits, network, result, constraints)
        status = "interrupted" if result.interrupted else "completed"
        run_dir.write_info(
            status=status,
            stop_reason=result.stop_reason,
            steps=result.steps,
            total_steps=total,
            seconds=round(result.seconds, 2),
            best_step=result.best_step,
            best_val_loss=_finite(result.best_val_loss),
            resumed_from=result.resumed_from,
        )
        if result.interrupted:
            return run
        echo(
            f"fitted {result.steps} steps in {result.seconds:.1f} s (best validation {config.fit.select} "
            f"{result.best_val_loss:.4f} at step {result.best_step})"
        )
        evaluate_run(run, echo=echo)
        report_run(run, echo=echo)
    return run


def _total_steps(config, num_items):
    if config.fit.steps is not None:
        return config.fit.steps
    return config.fit.epochs * math.ceil(num_items / min(config.fit.batch_size, num_items))


def _finite(value):
    return value if value is not None and math.isfinite(value) else None


def _report_options(config, constraints):
    d = config.diagnostics
    return {
        "kl_band": tuple(d.kl_band),
        "loc_band": tuple(d.loc_band),
        "scale_band": tuple(d.scale_band),
        "constraints": constraints,
        "num_samples": d.num_samples,
        "max_points": d.max_points,
        "seed": config.fit.seed,
    }


def load_run(run_dir, overrides=()):
    """Rebuild a run from its directory: configuration, data, network and history.

    The network gets the checkpoint's weights, or its best-validation weights when
    ``fit.restore_best`` is set; the constraints get their checkpointed state.

    :param run_dir: a directory written by ``vdn fit``.
    :param overrides: ``KEY=VALUE`` strings applied to the stored configuration.
    :returns: a :class:`Run`.
    :raises RunError: if the directory is not a run directory.
    :raises ~vdn_pyro.inference.CheckpointError: if the checkpoint is unreadable or does not
        fit the stored configuration.
    """
    run_dir = RunDir(run_dir)
    run_dir.check_existing()
    config = load_config(run_dir.config, overrides=overrides)
    series, splits = load_data(config)
    network = build_network(config)
    result = FitResult.from_checkpoint(run_dir.checkpoint, network=network)
    checkpoint = load_checkpoint(run_dir.checkpoint, network=network)
    state = result.best_state if config.fit.restore_best and result.best_state else checkpoint["network"]
    network.load_state_dict(state)
    network.eval()
    constraints = build_constraints(config)
    saved = checkpoint.get("constraints", [])
    for constraint, entry in zip(constraints, saved):
        if entry.get("state") is not None and type(constraint).__name__ == entry.get("type"):
            constraint.load_state_dict(entry["state"])
    for constraint in constraints:
        constraint.bind(network)
        if isinstance(constraint, ScaleGuard):  # its narrowed clamps are not in the state_dict
            constraint.apply()
    return Run(config, run_dir, series, splits, network, result, constraints)


# ----------------------------------------------------------------------------- evaluate
def evaluate_run(run, split="test", num_samples=None, echo=print):
    """Score the run's network (and the repeat-last baseline) on every window of a split and
    write ``metrics.json`` and ``metrics.csv``.

    :param Run run: from :func:`fit_run` or :func:`load_run`.
    :param str split: ``"test"`` or ``"val"``.
    :param int num_samples: predictive draws (default ``evaluate.num_samples``).
    :param echo: called with each line of the table.
    :returns: ``{model: {metric: value}}``.
    """
    import pandas as pd

    config = run.config
    options = config.evaluate
    num_samples = num_samples or options.num_samples
    x, y = _windows(config, run.splits, split)  # (W * C, L), (W * C, H)
    name = "twin" if config.neurons.deterministic else "vdn"
    models = {name: run.network}
    if options.baseline:
        baseline = RepeatLast(config.data.lookback, config.data.horizon)
        baseline.calibrate(*_windows(config, run.splits, "train"))
        models["repeat_last"] = baseline
    with _torch_settings(config):
        scores = {
            key: evaluate_forecaster(
                model, x, y, num_samples, options.batch_size, seed=config.fit.seed, exact=options.exact
            )
            for key, model in models.items()
        }
    frame = pd.DataFrame([{"model": key, **{m: s[m] for m in METRICS}} for key, s in scores.items()])
    frame.to_csv(run.dir.metrics_csv, index=False)
    payload = {
        "split": split,
        "windows": int(x.shape[0]),
        "num_samples": num_samples,
        "exact": options.exact,
        "units": "standardised (scaler fitted on the training rows)",
        "models": {key: {m: float(s[m]) for m in METRICS} for key, s in scores.items()},
    }
    run.dir.metrics_json.write_text(json.dumps(payload, indent=2) + "\n")
    echo(f"{split} metrics over {x.shape[0]} windows (standardised units):")
    for line in frame.to_string(index=False, float_format=lambda v: f"{v:.4f}").splitlines():
        echo("  " + line)
    return {key: {m: float(s[m]) for m in METRICS} for key, s in scores.items()}


# ----------------------------------------------------------------------------- report
def _read_monitor(path):
    import pandas as pd

    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        return None
    return pd.read_csv(path)


def _fan_chart(run, path):
    from vdn_pyro.plots import plot_fan_chart

    config, splits = run.config, run.splits
    x, y = _windows(config, splits, "test")  # (W * C, L), (W * C, H)
    index = min(config.output.fan_window, x.shape[0] - 1)
    channels = len(splits.columns)
    window, channel = divmod(index, channels)
    loc, scale = float(splits.scaler.loc[channel]), float(splits.scaler.scale[channel])
    pyro.set_rng_seed(config.fit.seed)
    pred = run.network.predict(x[index : index + 1], num_samples=max(config.evaluate.num_samples, 200))
    quantiles = {q: pred.quantile(q)[0].numpy() * scale + loc for q in QUANTILE_LEVELS}  # (H,)
    history = x[index].numpy() * scale + loc  # (L,)
    truth = y[index].numpy() * scale + loc  # (H,)
    origin_row = splits.borders["test"][0] + window * config.data.test_stride + config.data.lookback - 1
    origin = run.series.index[origin_row]
    when = origin.date() if hasattr(origin, "date") else f"row {origin}"
    kind = "deterministic twin" if config.neurons.deterministic else "VDN"
    title = (
        f"{run.series.name} [{splits.columns[channel]}]: {kind} forecast from {when} (test window {index})"
    )
    return plot_fan_chart(
        path, history, truth, quantiles, title=title, ylabel=splits.columns[channel], dpi=config.output.dpi
    )


def _dashboard(run, report, path):
    from vdn_pyro.plots import plot_dashboard

    config, result = run.config, run.result
    rows = result.history
    loss = {
        "step": np.array([r["step"] for r in rows]),
        "train": np.array([r["loss_per_obs"] for r in rows], dtype=float),
        "val": np.array([np.nan if r.get("val_loss") is None else r["val_loss"] for r in rows], dtype=float),
    }
    site = _site(run.network)
    kl = np.asarray(result.unit_kl.get(site, np.zeros((0, config.neurons.units))))
    beta = None if config.neurons.deterministic else result.unit_beta.get(site)
    steps = np.asarray(result.logged_steps)[: kl.shape[0]]
    kl_band = tuple(config.diagnostics.kl_band)
    loc_band = tuple(config.diagnostics.loc_band)
    for c in run.constraints:
        kl_band = (c.low, c.high) if type(c).__name__ == "KLBand" else kl_band
        loc_band = (c.low, c.high) if type(c).__name__ == "LocBand" else loc_band
    monitor = _read_monitor(run.dir.monitor)
    title = (
        f"{run.series.name}: {config.neurons.units} units, prior {config.neurons.prior.kind}, "
        f"step {result.steps} ({run.dir.root.name})"
    )
    return plot_dashboard(
        path,
        steps,
        kl,
        beta,
        report=report,
        monitor=monitor,
        loss=loss,
        kl_band=kl_band,
        loc_band=loc_band,
        living_kl=config.fit.living_kl,
        title=title,
        dpi=config.output.dpi,
    )


def report_run(run, plots=True, echo=print):
    """Write the per-unit diagnostics table, its per-layer summary, the InferenceData and its
    ArviZ summary, and the plots of a run.

    :param Run run: from :func:`fit_run` or :func:`load_run`.
    :param bool plots: write the PNG plots (also needs ``output.plots``).
    :param echo: called with each line of the summary.
    :returns: dict name -> path of every file written.
    """
    config, files = run.config, {}
    x_test, y_test = _windows(config, run.splits, "test")
    report = None
    with _torch_settings(config):
        if not config.neurons.deterministic:
            x_diag, _ = _windows(config, run.splits, config.diagnostics.split)
            x_diag = _diagnostic_windows(x_diag, config.diagnostics.max_points)
            report = unit_report(run.network, x_diag, **_report_options(config, run.constraints))
            report.to_csv(run.dir.units, index=False)
            layer_summary(report).to_csv(run.dir.layers, index=False)
            files.update(units=run.dir.units, layers=run.dir.layers)
            counts = report.status.value_counts()
            echo(
                "units: "
                + ", ".join(f"{counts.get(s, 0)} {s}" for s in counts.index)
                + f" (of {len(report)}; table in {run.dir.units.name})"
            )
        idata = None
        if config.output.idata:
            count = min(config.output.idata_obs, x_test.shape[0])
            idata = to_inference_data(
                run.network,
                x_test[:count],
                y_test[:count],
                num_samples=config.output.idata_draws,
                chains=config.output.idata_chains,
                history=run.result,
                seed=config.fit.seed,
            )
            run.dir.idata.unlink(missing_ok=True)
            save_inference_data(idata, run.dir.idata)
            summary = _arviz_summary(vdn_arviz, idata, _site(run.network))
            summary.to_csv(run.dir.summary)
            files.update(idata=run.dir.idata, summary=run.dir.summary)
        if plots and config.output.plots:
            run.dir.plots.mkdir(exist_ok=True)
            files["dashboard"] = _dashboard(run, report, run.dir.dashboard)
            files["fan_chart"] = _fan_chart(run, run.dir.fan_chart)
            if idata is not None and not config.neurons.deterministic:
                from vdn_pyro.plots import plot_forest

                site = _site(run.network)
                files["forest"] = plot_forest(run.dir.forest, idata, site, obs=0, dpi=config.output.dpi)
    echo(f"wrote {', '.join(str(Path(p).relative_to(run.dir.root)) for p in files.values())}")
    return files


def _arviz_summary(vdn_arviz, idata, site):
    """``az.summary`` of the unit posteriors of ``site``: one row per (window, unit), mean, sd,
    94% HDI."""
    import warnings

    az = vdn_arviz._arviz()
    options = {"var_names": [site]}
    if vdn_arviz.arviz_major_version() >= 1:  # pragma: no cover - arviz >= 1 only
        options.update(ci_kind="hdi", ci_prob=0.94)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant draws of the twin
        return az.summary(idata, **options)


# ----------------------------------------------------------------------------- command line
def _parser():
    parser = argparse.ArgumentParser(
        prog="vdn",
        description="Fit, evaluate and report networks of variational distributional neurons.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    fit_parser = commands.add_parser(
        "fit",
        help="train a forecaster and write a run directory",
        description="Train the forecaster of CONFIG (or a preset; default: the embedded CO2 series) and "
        "write a run directory with config, checkpoints, logs, diagnostics, InferenceData and plots.",
    )
    fit_parser.add_argument("config", nargs="?", metavar="CONFIG", help="a YAML or TOML configuration file")
    fit_parser.add_argument("--preset", metavar="NAME", help="start from a preset: default, ett or quick")
    fit_parser.add_argument(
        "--run-dir", metavar="DIR", help="the run directory (default <output.root>/<time>)"
    )
    fit_parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    fit_parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option, e.g. --set fit.lr=1e-3 (repeatable)",
    )
    fit_parser.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")

    eval_parser = commands.add_parser(
        "evaluate", help="test metrics of a run", description="Print and write the test metrics of a run."
    )
    eval_parser.add_argument("run_dir", metavar="RUN_DIR")
    eval_parser.add_argument("--split", choices=("test", "val"), default="test")
    eval_parser.add_argument("--num-samples", type=int, metavar="S", help="predictive draws per window")

    report_parser = commands.add_parser(
        "report",
        help="diagnostics table, ArviZ summary and plots of a run",
        description="Regenerate the per-unit table, the InferenceData, its ArviZ summary and the plots.",
    )
    report_parser.add_argument("run_dir", metavar="RUN_DIR")
    report_parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    config_parser = commands.add_parser(
        "config",
        help="print the resolved configuration",
        description="Print the resolved configuration as YAML.",
    )
    config_parser.add_argument("config", nargs="?", metavar="CONFIG")
    config_parser.add_argument("--preset", metavar="NAME")
    config_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _command_fit(args, argv):
    if args.resume is not None:
        if args.config is not None or args.preset is not None or args.run_dir is not None:
            raise RunError(
                "--resume RUN_DIR continues a run with its own config.yaml; drop CONFIG, --preset "
                "and --run-dir (change options with --set)"
            )
        run_dir = RunDir(args.resume)
        run_dir.check_existing()
        config = load_config(run_dir.config, overrides=args.overrides)
    else:
        config = load_config(args.config, preset=args.preset, overrides=args.overrides)
        run_dir = RunDir(args.run_dir or _new_run_dir(config.output.root))
    run = fit_run(config, run_dir.root, resume=args.resume is not None, progress=not args.quiet, argv=argv)
    result = run.result
    if result.interrupted:
        print(
            f"vdn: interrupted by {result.stop_reason} at step {result.steps}; final checkpoint written to "
            f"{result.checkpoint_path}. Continue with: vdn fit --resume {run_dir.root}",
            file=sys.stderr,
        )
        return result.exit_code
    print(f"run directory: {run_dir.root}")
    return 0


def _command_evaluate(args):
    run = load_run(args.run_dir)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError.at("--num-samples", f"expected int >= 1, got {args.num_samples}")
    evaluate_run(run, split=args.split, num_samples=args.num_samples)
    print(f"wrote {run.dir.metrics_json} and {run.dir.metrics_csv.name}")
    return 0


def _command_report(args):
    run = load_run(args.run_dir)
    report_run(run, plots=not args.no_plots)
    return 0


def _command_config(args):
    config = load_config(args.config, preset=args.preset, overrides=args.overrides)
    print(dump_config(config), end="")
    return 0


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None):
    """Entry point of the ``vdn`` command.

    :param list argv: arguments (default ``sys.argv[1:]``).
    :returns: the exit status: 0, 1 (non-finite training), 2 (bad configuration, run directory
        or checkpoint), or 130/143 (interrupted by SIGINT/SIGTERM).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    start = time.perf_counter()
    try:
        if args.command == "fit":
            return _command_fit(args, ["vdn", *argv])
        if args.command == "evaluate":
            return _command_evaluate(args)
        if args.command == "report":
            return _command_report(args)
        return _command_config(args)
    except (ConfigError, RunError, CheckpointError, FileNotFoundError, ImportError) as e:
        if args.debug:
            raise
        print(f"vdn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteError as e:
        if args.debug:
            raise
        print(f"vdn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_NONFINITE
    except BrokenPipeError:  # stdout piped into a reader that stopped early, e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        seconds = time.perf_counter() - start
        print(f"vdn {args.command}: interrupted after {seconds:.0f} s", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

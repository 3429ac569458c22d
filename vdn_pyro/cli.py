r"""The ``vdn`` command: fit, evaluate and report a forecaster of distributional neurons.

::

    vdn fit [CONFIG] [--preset NAME] [--run-dir DIR] [--set KEY=VALUE ...] [--quiet]
    vdn fit --resume RUN_DIR [--set KEY=VALUE ...] [--quiet]
    vdn evaluate RUN_DIR [--split test|val] [--num-samples S] [--set KEY=VALUE ...]
    vdn report RUN_DIR [--no-plots] [--set KEY=VALUE ...]
    vdn config [CONFIG] [--preset NAME] [--set KEY=VALUE ...]

``vdn fit`` with no argument is the project's main job: it trains the default
:class:`~vdn_pyro.models.Forecaster` (a DLinear skip path plus 32 temporal neurons with AR(1)
priors and a KL thermostat) on the embedded weekly Mauna Loa CO2 series and writes a run
directory (``runs/<timestamp>`` unless ``--run-dir`` is given)::

    config.yaml             the resolved configuration (every option; data.path absolute)
    run.json                status, steps, seconds, versions, command line, the configuration
                            and data digests the run was trained with
    checkpoints/last.pt     atomic checkpoint: network, optimiser, constraints, RNG, history
    log.csv, log.jsonl      one row per logged step (jsonl adds per-unit KL and beta)
    monitor.csv             the per-unit table every ``diagnostics.monitor_every`` steps
    units.csv, layers.csv   final per-unit diagnostics table and its per-layer summary (a
                            ``split`` column names the windows: ``diagnostics.split``)
    metrics_test.json/.csv  test metrics: MSE, MAE, CRPS, NLL, coverage and width, and with
                            ``evaluate.paths`` the path scores (energy, crps_sum, ...)
                            (``vdn evaluate --split val`` writes ``metrics_val.json/.csv``)
    idata.nc                ArviZ InferenceData (netCDF) of the first test windows
    arviz_summary.csv       az.summary of the unit posteriors
    plots/dashboard.png     living-neuron dashboard
    plots/fan_chart.png     forecast fan chart of one test window
    plots/forest.png        ArviZ forest of the unit posteriors of one window

What a run directory guarantees:

- a new one is created atomically with a unique name (two ``vdn fit`` started in the same second
  get two directories), and a command that writes a run directory holds a lock on it: a second
  command on the same directory is refused with one line;
- a refused command changes nothing in it (the configuration and the checkpoint are checked
  before anything is written; ``--set`` overrides of a refused ``--resume`` are not stored), and
  ``evaluate``/``report`` write their files under temporary names and move them into place only
  when all are written;
- ``evaluate`` and ``report`` check the data (digests of the training windows and of the whole
  series) and the configuration against the ones the run was trained with, and refuse others;
  their ``--set`` may change only ``data.path`` (the same data elsewhere) and the
  ``diagnostics``, ``evaluate`` and ``output`` sections.

The progress bar's ``living`` is the fraction of units whose status is ``living`` in the latest
per-unit table: the unit monitor's during the fit and, at the end, the final table written to
``units.csv`` (computed once, when the fit ends), so the bar's last word and ``units.csv`` agree.

``vdn fit --resume RUN_DIR`` continues from the last checkpoint exactly (bit-identical on CPU).
SIGINT (Ctrl-C) or SIGTERM during training finishes the step, writes a final checkpoint and exits
with status 130 (143 for SIGTERM). Every error prints one line to stderr (``vdn --debug ...``
shows the traceback instead) and exits with status 2 for what the user can fix in the command
(the configuration, the data, the run directory, the checkpoint) and 1 for a failure of the
machine (a read-only or full disk, a path that is not a directory, memory) or of the training (a
run that keeps producing NaN/inf).

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
import errno
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

from vdn_pyro import __version__
from vdn_pyro.config import ConfigError, dump_config, load_config, parse_overrides
from vdn_pyro.data import (
    TimeSeries,
    ett_hourly_splits,
    load_csv,
    load_default,
    load_ett,
    ratio_splits,
)
from vdn_pyro.data.datasets import _default_ett_path
from vdn_pyro.data.protocol import DataRangeError, protocol_splits
from vdn_pyro.files import temporary_path, write_text
from vdn_pyro.forecasting import (
    METRICS,
    PATH_METRICS,
    evaluate_forecaster,
    normalise_windows,
    normalised,
    train_forecaster,
    training_windows,
)
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
from vdn_pyro.inference.checkpoint import incompatibilities
from vdn_pyro.inference.fit import data_digest
from vdn_pyro.models import Forecaster, RepeatLast

__all__ = [
    "Run",
    "RunDir",
    "RunError",
    "build_constraints",
    "build_network",
    "estimate_memory",
    "evaluate_run",
    "fit_run",
    "load_data",
    "load_run",
    "main",
    "report_run",
    "resolve_paths",
    "series_digest",
]

QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_NONFINITE = EXIT_FAILURE
EXIT_INTERRUPTED = 130
SPLITS = ("test", "val")

#: The keys ``evaluate``/``report`` may change from the configuration a run was trained with
#: (``--set`` or an edited ``config.yaml``): where the data file lies (its contents are checked by
#: digest) and what is computed and written, not what was trained.
FREE_KEYS = ("data.path", "diagnostics.", "evaluate.", "output.", "fit.threads", "fit.pyro_validation")
#: Keys a ``--resume`` may change as well: how long it trains and what it logs from here on
#: (the rest would not continue the same run: the checkpoint holds the optimiser's learning rate,
#: the data, the architecture and the constraints).
RESUMABLE_KEYS = (
    "fit.steps",
    "fit.epochs",
    "fit.log_every",
    "fit.checkpoint_every",
    "fit.patience",
    "fit.max_bad_steps",
    "fit.living_kl",
)


class RunError(ValueError):
    """A run directory is missing, incomplete, already in use, or does not fit the command."""


# ----------------------------------------------------------------------------- files
class _Outputs:
    """Result files of one command, written under temporary names in the run directory and moved
    into place together when the command succeeds (and removed when it fails), so that a failed
    ``evaluate`` or ``report`` leaves the files of the previous one as they were."""

    def __init__(self, root):
        self.root, self.pending, self.current = Path(root), {}, None

    def path(self, final):
        """The temporary path to write ``final`` to (same suffix, so writers pick the format)."""
        final = Path(final)
        tmp = self.root / temporary_path(final).name
        self.pending[final], self.current = tmp, final
        return tmp

    def commit(self):
        for final, tmp in self.pending.items():
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
        self.pending = {}

    def discard(self):
        for tmp in self.pending.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.pending = {}

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self.commit()
            return False
        finals = {str(tmp): final for final, tmp in self.pending.items()}
        self.discard()
        if isinstance(error, OSError) and (error.filename is None or error.filename in finals):
            # name the file being written, not its temporary (writers such as netCDF name none)
            final = finals.get(error.filename, self.current)
            if final is not None:
                raise OSError(error.errno, error.strerror or str(error), str(final)) from error
        return False


class _RunLock:
    """An exclusive, non-blocking lock on a run directory for the time a command writes it
    (:func:`fcntl.flock` on the directory itself, so no file is added; the system drops it when
    the process ends, however it ends). A no-op where ``fcntl`` is missing."""

    def __init__(self, root):
        self.root, self.fd = Path(root), None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(
                    f"run directory {self.root} is in use by another vdn command (it is locked while "
                    "one writes it); wait for that one to finish, or use another run directory"
                ) from None
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
        return False


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
    idata = property(lambda self: self.root / "idata.nc")
    summary = property(lambda self: self.root / "arviz_summary.csv")
    plots = property(lambda self: self.root / "plots")
    dashboard = property(lambda self: self.root / "plots" / "dashboard.png")
    fan_chart = property(lambda self: self.root / "plots" / "fan_chart.png")
    forest = property(lambda self: self.root / "plots" / "forest.png")

    def metrics_json(self, split="test"):
        """``metrics_<split>.json``: the metrics of one split."""
        return self.root / f"metrics_{split}.json"

    def metrics_csv(self, split="test"):
        """``metrics_<split>.csv``: the metrics of one split, one row per model."""
        return self.root / f"metrics_{split}.csv"

    def lock(self):
        """A context manager holding the directory's lock (:class:`RunError` if another command
        holds it)."""
        return _RunLock(self.root)

    def check_existing(self, need_checkpoint=True):
        """Raise :class:`RunError` unless this is a run directory written by ``vdn fit``."""
        if self.root.exists() and not self.root.is_dir():
            raise RunError(
                f"{self.root} is a file, not a run directory (expected the directory that `vdn fit` printed)"
            )
        if not self.root.is_dir():
            raise RunError(f"no run directory at {self.root} (expected the directory that `vdn fit` printed)")
        if not self.config.is_file():
            raise RunError(f"{self.root} is not a vdn run directory: it has no {self.config.name}")
        if need_checkpoint and not self.checkpoint.is_file():
            raise RunError(
                f"{self.root} has no checkpoint ({self.checkpoint.relative_to(self.root)}): the fit "
                "stopped before its first one (run.json says why); start a new run with `vdn fit` "
                "(into another --run-dir, or after deleting this one)"
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
        write_text(self.info, json.dumps(info, indent=2, default=str) + "\n")
        return info


def _create_run_dir(path=None, root="runs"):
    """Create a fresh run directory atomically: ``path``, or ``<root>/<timestamp>`` (with ``-1``,
    ``-2`` ... appended when taken). :func:`os.mkdir` fails if the name exists, so two commands
    never get the same directory.

    :returns: ``(path, created)``; ``created`` is false for an existing empty ``path``.
    :raises RunError: if ``path`` is a non-empty directory.
    :raises NotADirectoryError: if ``path`` (or a parent) is a file.
    """
    if path is not None:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "--run-dir names a file, not a directory", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path)
            return path, True
        except FileExistsError:
            if not path.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, "--run-dir names a file, not a directory", str(path)
                ) from None
            _check_empty(path)
            return path, False
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in itertools.count():
        candidate = root / (stamp if suffix == 0 else f"{stamp}-{suffix}")
        try:
            os.mkdir(candidate)
            return candidate, True
        except FileExistsError:
            continue


def _check_empty(path):
    if any(Path(path).iterdir()):
        raise RunError(
            f"run directory {path} is not empty; continue it with `vdn fit --resume {path}` "
            "or choose another --run-dir"
        )


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


#: Python-API advice in the loaders' messages, and what a user of the command types instead.
_CLI_ADVICE = (
    (
        "pass date_column=<name>, or date_column=None if there is none",
        "--set data.date_column=NAME (null if there is none)",
    ),
    ("or pass date_column=None", "or --set data.date_column=null"),
    (
        "pass fill='ffill' or fill='interpolate' to fill them",
        "fill them with --set data.fill=ffill or data.fill=interpolate",
    ),
    ("fix target_columns", "fix data.columns"),
    ("drop them from target_columns", "drop them from data.columns"),
)


def _cli_advice(text):
    for api, cli in _CLI_ADVICE:
        text = text.replace(api, cli)
    return text


def _ett_path(path):
    """Where :func:`~vdn_pyro.data.load_ett` reads ETTh1 from, and why: ``(path, source)``."""
    if path:
        return Path(path), "data.path"
    if os.environ.get("VDN_ETT_PATH"):
        return Path(os.environ["VDN_ETT_PATH"]), "VDN_ETT_PATH"
    return _default_ett_path(), "the default location"


def resolve_paths(config):
    """A copy of ``config`` whose ``data.path`` is absolute: a relative path is resolved against
    the working directory, and the ``ett`` source without a path gets the file it reads
    (``$VDN_ETT_PATH`` or the default location), so a run directory works from anywhere.

    :param config: a :class:`~vdn_pyro.config.RunConfig`.
    :returns: a new :class:`~vdn_pyro.config.RunConfig`.
    """
    config = config.model_copy(deep=True)
    data = config.data
    if data.source == "ett":
        path = _ett_path(data.path)[0].expanduser().resolve()
        data.path = str(path) if data.path or path.is_file() else None  # else: named where looked for
    elif data.source == "csv" and data.path:
        data.path = str(Path(data.path).expanduser().resolve())
    return config


def load_data(config):
    """The series and its train/validation/test splits.

    :param config: a :class:`~vdn_pyro.config.RunConfig`.
    :returns: ``(series, splits)``: a :class:`~vdn_pyro.data.TimeSeries` and
        :class:`~vdn_pyro.data.ForecastSplits`.
    :raises ConfigError: if the file is missing, the series unreadable, or its values unusable
        (non-finite, or extreme once standardised), or if it cannot be split as configured.
    """
    data = config.data
    try:
        if data.source == "default":
            series = _select_columns(load_default(), data.columns)
        elif data.source == "ett":
            path, source = _ett_path(data.path)
            if not path.is_file():
                raise ConfigError.at(
                    "data.path",
                    f"no ETTh1.csv at {path.resolve()} (from {source}); give the file with "
                    "--set data.path=/path/to/ETTh1.csv (or set VDN_ETT_PATH)",
                )
            series = _select_columns(load_ett(path), data.columns)
        else:
            if not Path(data.path).is_file():
                raise ConfigError.at(
                    "data.path",
                    f"no CSV file at {Path(data.path).resolve()}; give the file with --set data.path=FILE",
                )
            series = load_csv(
                data.path, date_column=data.date_column, target_columns=data.columns, fill=data.fill
            )
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError.at("data", f"cannot load the {data.source} series: {_cli_advice(str(e))}") from None
    try:
        if data.split == "ett_hourly":
            splits = ett_hourly_splits(series, data.lookback, data.horizon)
        elif data.split == "protocol":
            splits = protocol_splits(series, data.lookback, data.horizon, data.protocol)
        else:
            splits = ratio_splits(series, data.lookback, data.horizon, data.train, data.val)
    except DataRangeError as e:
        raise ConfigError.at("data", f"{series.name} ({len(series)} rows) cannot be used: {e}") from None
    except ValueError as e:
        raise ConfigError.at(
            "data", f"{series.name} ({len(series)} rows) cannot be split as configured: {e}"
        ) from None
    return series, splits


def series_digest(series):
    """A digest of a whole series (values, channel names, time stamps), as a hex string: what
    ``run.json`` records so that ``evaluate``/``report`` can refuse other data."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([list(series.columns), list(series.values.shape)]).encode())
    h.update(np.ascontiguousarray(series.values, dtype=np.float64).tobytes())
    h.update(
        np.asarray(series.index.astype("int64") if hasattr(series.index, "asi8") else series.index).tobytes()
    )
    return h.hexdigest()


# ----------------------------------------------------------------------------- size check
def _parameter_count(config):
    """Parameters of the forecaster of ``config``, without building it at its size.

    Every layer is linear in each of ``units``, ``features`` and ``latent_dim``, so the count is
    a multilinear polynomial in them: it is fitted exactly from the 8 networks with each of the
    three at 1 or 2 (in the offsets y = x - 1, the coefficient of a set of variables is the
    alternating sum over its subsets) and evaluated at the configured sizes.
    """
    n = config.neurons
    sizes = (n.units - 1, n.features - 1, n.latent_dim - 1)
    corners = list(itertools.product((0, 1), repeat=3))
    counts = {}
    with torch.random.fork_rng(devices=[]):  # the probes' initial weights leave the stream alone
        for corner in corners:
            u, f, k = (c + 1 for c in corner)
            options = config.forecaster_config(units=u, features=f, latent_dim=k, beta=1e-3)
            counts[corner] = sum(p.numel() for p in Forecaster(options).parameters())
    total = 0
    for subset in corners:
        inner = [c for c in corners if all(a <= b for a, b in zip(c, subset))]
        coefficient = sum((-1) ** (sum(subset) - sum(c)) * counts[c] for c in inner)
        total += coefficient * math.prod(size for size, on in zip(sizes, subset) if on)
    return int(total)


def estimate_memory(config, num_items):
    """An estimate of the memory (bytes) a run of ``config`` needs at its peak, made before
    anything is built: float32 weights, gradients, Adam's two moments and the best-validation
    copy (5 copies of the parameters), plus the largest of four working sets: a training step's
    activations (kept for the backward pass), the predictive draws of one scoring batch, the draws
    of the InferenceData export and those of the per-unit diagnostics.

    :param config: a :class:`~vdn_pyro.config.RunConfig`.
    :param int num_items: training items N.
    :returns: ``{"parameters": P, "parameters_bytes": ..., "training_bytes": ...,
        "scoring_bytes": ..., "export_bytes": ..., "diagnostics_bytes": ..., "total": ...}``.
    """
    n, d, f, e, o = config.neurons, config.data, config.fit, config.evaluate, config.output
    params = _parameter_count(config)
    batch = min(f.batch_size, max(num_items, 1)) * d.chunk
    uk = n.units * n.latent_dim
    draws = n.train_draws * f.num_particles
    floats = {
        "training": 3 * batch * (3 * d.lookback + 4 * n.features + 8 * uk + draws * (4 * uk + 6 * d.horizon)),
        "scoring": e.batch_size * max(e.num_samples, f.val_samples) * (2 * uk + 3 * d.horizon),
        "export": o.idata_obs * o.idata_draws * o.idata_chains * (2 * uk + 2 * d.horizon) if o.idata else 0,
        "diagnostics": 4 * config.diagnostics.max_points * config.diagnostics.num_samples * uk,
    }
    out = {"parameters": params, "parameters_bytes": 4 * 5 * params}
    out.update({f"{name}_bytes": 4 * count for name, count in floats.items()})
    out["total"] = out["parameters_bytes"] + 4 * max(floats.values())
    return out


#: The options that size each part of :func:`estimate_memory`, named in its refusal.
_MEMORY_KEYS = {
    "parameters": ("neurons.units", "neurons.features", "neurons.latent_dim"),
    "training": ("neurons.units", "fit.batch_size", "data.chunk", "neurons.train_draws"),
    "scoring": ("neurons.units", "evaluate.batch_size", "evaluate.num_samples", "fit.val_samples"),
    "export": ("neurons.units", "output.idata_obs", "output.idata_draws", "output.idata_chains"),
    "diagnostics": ("neurons.units", "diagnostics.max_points", "diagnostics.num_samples"),
}


def _machine_memory():
    """Physical memory (bytes), or the cgroup's limit when lower; ``None`` if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit).read_text().strip()))
    return total


def _size(count):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"  # pragma: no cover


def _check_memory(config, num_items):
    """Refuse a configuration whose estimated memory (:func:`estimate_memory`) is beyond this
    machine's, before building anything, naming the options of its largest part."""
    memory = _machine_memory()
    if memory is None:
        return
    estimate = estimate_memory(config, num_items)
    if estimate["total"] <= memory:
        return
    largest = max(_MEMORY_KEYS, key=lambda name: estimate[f"{name}_bytes"])
    values = _flat(config.model_dump(mode="json"))
    keys = ", ".join(f"{key} ({values[key]})" for key in _MEMORY_KEYS[largest])
    keys = keys.rpartition(", ")[0] + " or " + keys.rpartition(", ")[2]
    raise ConfigError.at(
        "",
        f"this configuration needs about {_size(estimate['total'])} of memory, more than this "
        f"machine's {_size(memory)} ({estimate['parameters']:.3g} parameters: "
        f"{_size(estimate['parameters_bytes'])} with gradients and optimiser state; the largest part, "
        f"{largest}: {_size(estimate[f'{largest}_bytes'])}); reduce {keys}",
    )


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

    :raises ConfigError: if the forecaster refuses the options, or they give a parameter a
        non-finite initial value (e.g. a scale below float32's range).
    """
    options = config.forecaster_config()
    try:
        network = Forecaster(options)
    except (TypeError, ValueError) as e:
        raise ConfigError.at("neurons", str(e)) from None
    for name, value in network.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError.at(
                "neurons",
                f"the configuration gives the network's {name!r} a non-finite initial value (float32); "
                "check the scales (neurons.likelihood_scale, likelihood_scale_min, init_scale, scale_min, "
                "scale_max) and neurons.beta for values beyond float32",
            )
    return network


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
        """Call the monitor's hook; save the records it adds; show the living fraction of the
        latest on the progress bar (:attr:`~vdn_pyro.inference.FitState.living`)."""
        before = len(self.monitor.reports)
        getattr(self.monitor, hook)(state)
        for _, report in self.monitor.reports[before:]:
            self._append(report)
            state.living = _living(report)

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


def _living(report):
    """The fraction of a per-unit table's units whose status is ``living``."""
    return float((report["status"] == "living").mean()) if len(report) else float("nan")


class _FinalTable:
    """Fit callback that computes the final per-unit table (``units.csv``) at the end of the fit,
    with the weights the run keeps, and shows its living fraction as the progress bar's last word:
    the bar and ``units.csv`` then say the same by construction."""

    def __init__(self, x, **report_options):
        self.x, self.options, self.report = x, report_options, None

    def on_fit_end(self, state):
        if state.history is not None and state.history.interrupted:
            return
        self.report = unit_report(state.network, self.x, **self.options)
        state.living = _living(self.report)


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


# ----------------------------------------------------------------------------- what may change
def _flat(data, prefix=""):
    """A nested dict as ``{dotted.key: value}``."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _allowed(key, allowed):
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def _changes(before, after, allowed):
    """``(key, before, after)`` of every key that differs and may not."""
    before, after = _flat(before), _flat(after)
    return [
        (key, before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key) and not _allowed(key, allowed)
    ]


def _allowed_text(allowed):
    return ", ".join(a + "*" if a.endswith(".") else a for a in allowed)


def _check_overrides(overrides, allowed, what):
    """Refuse ``--set`` keys that ``what`` may not change."""
    keys = [key for key in _flat(parse_overrides(overrides)) if not _allowed(key, allowed)]
    if keys:
        raise RunError(
            f"--set {keys[0]}: {what} cannot change it (the network was trained with the run's "
            f"configuration); it can change {_allowed_text(allowed)}; start a new run with `vdn fit` "
            "to change the rest"
        )


def _check_record(run_dir, config, allowed):
    """Refuse a ``config.yaml`` edited since the fit: compare it with the configuration
    ``run.json`` recorded when training started (runs written before the record are not checked)."""
    record = run_dir.read_info().get("config")
    if not isinstance(record, dict):
        return
    changed = _changes(record, config.model_dump(mode="json"), allowed)
    if changed:
        key, before, after = changed[0]
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise RunError(
            f"{run_dir.config} was changed after the fit ({key}: trained with {before!r}, now "
            f"{after!r}{more}); restore it (run.json holds the configuration under 'config') or start "
            "a new run with `vdn fit`"
        )


def _different_network(run_dir, problems):
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    return (
        f"the checkpoint of {run_dir.root} was written for a different network than "
        f"{run_dir.config.name} describes ({shown}); restore the run's {run_dir.config.name}, or start "
        "a new run with `vdn fit`"
    )


def _check_data(run_dir, checkpoint, config, digests):
    """Refuse data other than those the run was trained on: the checkpoint's digest of the
    training windows, and ``run.json``'s digest of the whole series."""
    recorded = {
        "training windows": (checkpoint.get("data") or {}).get("digest"),
        "series": run_dir.read_info().get("data_digest"),
    }
    current = {"training windows": digests["train"], "series": digests["series"]}
    for what, before in recorded.items():
        if before and before != current[what]:
            source = config.data.path or f"the {config.data.source} series"
            raise RunError(
                f"the data of {source} are not the data {run_dir.root} was trained on (the {what} "
                f"differ: digest {current[what][:12]}, trained on {before[:12]}); point data.path at "
                "the original file with --set data.path=FILE, or start a new run with `vdn fit`"
            )


def _digests(config, series, x, y):
    """Digests of the series and of the training items as the fit sees them (``fit.norm``)."""
    return {"series": series_digest(series), "train": data_digest(*normalise_windows(x, y, config.fit.norm))}


# ----------------------------------------------------------------------------- fit
class _Commit:
    """Fit callback that writes ``config.yaml`` and ``run.json`` when training starts, after
    every check of the data, the configuration and the checkpoint (the fit runs them all before
    its callbacks): a refused command leaves the run directory as it was."""

    def __init__(self, run_dir, config, info):
        self.run_dir, self.config, self.info, self.done = run_dir, config, info, False

    def on_fit_start(self, state):
        write_text(self.run_dir.config, dump_config(self.config))
        self.run_dir.write_info(**self.info)
        self.done = True


def _nonfinite(error, run_dir):
    """The CLI's wording of a :class:`~vdn_pyro.inference.NonFiniteError`."""
    span = f"steps {error.first} to {error.last}" if error.first != error.last else f"step {error.first}"
    saved = (
        f"; the last checkpoint ({error.checkpoint}) holds the last finite parameters"
        if error.checkpoint
        else ""
    )
    return NonFiniteError(
        f"training failed in {run_dir.root}: the loss or its gradient was not finite at every one of "
        f"{span} (last: {error.problem}){saved}; try a smaller --set fit.lr=..., --set "
        "fit.optim=clipped_adam, a larger neurons.beta or neurons.scale_min, or check the data for "
        "extreme values",
        first=error.first,
        last=error.last,
        problem=error.problem,
        checkpoint=error.checkpoint,
    )


def fit_run(config, run_dir=None, *, resume=False, progress=True, echo=print, summary=True, argv=None):
    """Fit the forecaster of ``config`` into a run directory and, unless interrupted, write the
    evaluation and the report.

    Everything that can be checked is checked before the directory is touched: the data (finite,
    not extreme once standardised), the configuration, the memory it needs
    (:func:`estimate_memory`) and, on resume, the checkpoint, the data digests and the options
    ``--set`` changes (only :data:`RESUMABLE_KEYS` and :data:`FREE_KEYS`). ``config.yaml`` and
    ``run.json`` are written when training starts; the directory is locked meanwhile.

    :param config: a :class:`~vdn_pyro.config.RunConfig` (its ``data.path`` is stored absolute,
        see :func:`resolve_paths`).
    :param run_dir: the run directory: for a fresh run, absent or empty (``None``: a new
        ``<output.root>/<timestamp>``, created atomically); on resume, the run to continue.
    :param bool resume: continue from ``run_dir/checkpoints/last.pt``.
    :param bool progress: show the progress bar.
    :param echo: called with each line printed: the run directory, then the summary.
    :param bool summary: echo the summary (fit, metrics, report); the run directory is echoed
        either way.
    :param argv: the command line, recorded in ``run.json``.
    :returns: the :class:`Run` (``run.result.interrupted`` tells whether it stopped early).
    :raises RunError: if the run directory is not empty, in use, or does not fit ``config``.
    :raises ConfigError: for a configuration or data that cannot be used.
    :raises NotADirectoryError: if ``run_dir`` is a file.
    :raises ~vdn_pyro.inference.NonFiniteError: if training kept producing NaN/inf.
    """
    config = resolve_paths(config)
    say = echo if summary else (lambda *args, **kwargs: None)
    with contextlib.ExitStack() as stack:
        if resume:
            run_dir = RunDir(run_dir)
            run_dir.check_existing()
            stack.enter_context(run_dir.lock())
            stored = resolve_paths(load_config(run_dir.config))
            changed = _changes(
                stored.model_dump(mode="json"), config.model_dump(mode="json"), FREE_KEYS + RESUMABLE_KEYS
            )
            if changed:
                key, before, after = changed[0]
                raise RunError(
                    f"--set {key}={after!r} cannot change on --resume (the run was trained with {before!r}); "
                    f"--resume can change {_allowed_text(RESUMABLE_KEYS + FREE_KEYS)}; start a new run "
                    "with `vdn fit` to change the rest"
                )
            _check_record(run_dir, stored, FREE_KEYS)
        elif run_dir is not None:
            path = Path(run_dir)
            if path.exists() and not path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "--run-dir names a file, not a directory", str(path))
            if path.is_dir():
                _check_empty(path)
        stack.enter_context(_torch_settings(config))
        series, splits = load_data(config)
        recipe = config.train_config()
        x, y = _training_items(recipe, splits)  # (N, T, L), (N, T, H)
        _check_memory(config, x.shape[0])
        x_val = _normalised_windows(config, *_windows(config, splits, "val"))[0]  # (V, L)
        pyro.set_rng_seed(config.fit.seed)  # the initial weights; the fit draws from its own seed
        network = build_network(config)
        constraints = build_constraints(config)
        _check_constraints(constraints, network)
        total = _total_steps(config, x.shape[0])
        digests = _digests(config, series, x, y)
        created = False
        if resume:  # refuse before touching the directory
            checkpoint = load_checkpoint(run_dir.checkpoint)
            problems = incompatibilities(checkpoint, network)
            if problems:
                raise RunError(_different_network(run_dir, problems))
            step = checkpoint["step"]
            if step > total:
                raise RunError(
                    f"the run in {run_dir.root} is already at step {step}, beyond the {total} steps asked "
                    "for; ask for more with --set fit.steps=N (steps count from the start of the run)"
                )
            _check_data(run_dir, checkpoint, config, digests)
            info = {"status": "running", "resumed": _now(), "command": argv, "versions": _versions()}
        else:
            path, created = _create_run_dir(run_dir, config.output.root)
            run_dir = RunDir(path)
            stack.enter_context(run_dir.lock())
            if not created:
                _check_empty(run_dir.root)  # again, under the lock
            info = {"status": "running", "started": _now(), "command": argv, "versions": _versions()}
        info.update(config=config.model_dump(mode="json"), data_digest=digests["series"])
        info.update(error=None, report_error=None)  # a resumed run clears a previous failure
        echo(f"run directory: {run_dir.root}")
        sys.stdout.flush()
        commit = _Commit(run_dir, config, info)
        callbacks = [commit]
        final = None
        if not config.neurons.deterministic:
            if config.diagnostics.monitor_every:
                callbacks.append(
                    _RunMonitor(
                        _diagnostic_windows(x_val, config.diagnostics.max_points),
                        run_dir.monitor,
                        config.diagnostics.monitor_every,
                        **_report_options(config, constraints),
                    )
                )
            final = _FinalTable(_diagnostic_x(config, splits), **_report_options(config, constraints))
            callbacks.append(final)
        fit_logger = logging.getLogger("vdn_pyro.inference.fit")
        quiet_filter = _QuietFitLog()
        fit_logger.addFilter(quiet_filter)
        # skipped non-finite steps are counted in log.csv, run.json and the summary; their
        # warnings (two lines of Python source each) would bury the command's own output
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", r"Step \d+: .*skipped the update", RuntimeWarning)
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
            if not commit.done:  # refused before training: nothing was written
                if created:
                    with contextlib.suppress(OSError):
                        run_dir.root.rmdir()
                raise
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            with contextlib.suppress(OSError):  # e.g. the disk is full: the first error is the one to show
                run_dir.write_info(status=status, error=f"{type(e).__name__}: {e}")
            if isinstance(e, NonFiniteError):
                raise _nonfinite(e, run_dir) from None
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
            skipped_steps=len(result.skipped_steps),
            seconds=round(result.seconds, 2),
            best_step=result.best_step,
            best_val_loss=_finite(result.best_val_loss),
            resumed_from=result.resumed_from,
        )
        if result.interrupted:
            return run
        skipped = f"; {len(result.skipped_steps)} non-finite steps skipped" if result.skipped_steps else ""
        say(
            f"fitted {result.steps} steps in {result.seconds:.1f} s (best validation {config.fit.select} "
            f"{result.best_val_loss:.4f} at step {result.best_step}{skipped})"
        )
        try:
            evaluate_run(run, echo=say)
            report_run(run, echo=say, report=final.report if final is not None else None)
        except BaseException as e:
            with contextlib.suppress(OSError):
                run_dir.write_info(report_error=f"{type(e).__name__}: {e}")
            raise
    return run


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


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
    ``fit.restore_best`` is set; the constraints get their checkpointed state. The directory is
    read, not locked (the commands lock it around their writes).

    :param run_dir: a directory written by ``vdn fit``.
    :param overrides: ``KEY=VALUE`` strings applied to the stored configuration: only
        :data:`FREE_KEYS` (``data.path`` and the ``diagnostics``, ``evaluate`` and ``output``
        sections).
    :returns: a :class:`Run`.
    :raises RunError: if the directory is not a run directory, if an override or an edit of
        ``config.yaml`` changes what was trained, or if the data are not the ones the run was
        trained on (digests of the training windows and of the series).
    :raises ~vdn_pyro.inference.CheckpointError: if the checkpoint is unreadable.
    """
    run_dir = RunDir(run_dir)
    run_dir.check_existing()
    _check_overrides(overrides, FREE_KEYS, "evaluate and report")
    config = resolve_paths(load_config(run_dir.config, overrides=overrides))
    _check_record(run_dir, config, FREE_KEYS)
    series, splits = load_data(config)
    x, y = _training_items(config.train_config(), splits)  # (N, T, L), (N, T, H)
    network = build_network(config)
    checkpoint = load_checkpoint(run_dir.checkpoint)
    problems = incompatibilities(checkpoint, network)
    if problems:
        raise RunError(_different_network(run_dir, problems))
    _check_data(run_dir, checkpoint, config, _digests(config, series, x, y))
    result = FitResult.from_checkpoint(run_dir.checkpoint, network=network)
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
    write ``metrics_<split>.json`` and ``metrics_<split>.csv`` (both name the split inside too),
    together, when both are written.

    :param Run run: from :func:`fit_run` or :func:`load_run`.
    :param str split: ``"test"`` or ``"val"``.
    :param int num_samples: predictive draws (default ``evaluate.num_samples``).
    :param echo: called with each line of the table.
    :returns: ``{model: {metric: value}}``.
    """
    import pandas as pd

    if split not in SPLITS:
        raise ValueError(f"Expected split in {SPLITS}, but got {split!r}.")
    config = run.config
    options = config.evaluate
    num_samples = num_samples or options.num_samples
    x, y = _windows(config, run.splits, split)  # (W * C, L), (W * C, H)
    name = "twin" if config.neurons.deterministic else "vdn"
    models = {name: normalised(run.network, config.fit.norm)}
    if options.baseline:
        baseline = RepeatLast(config.data.lookback, config.data.horizon)
        baseline.calibrate(*_windows(config, run.splits, "train"))
        models["repeat_last"] = baseline
    with _torch_settings(config):
        scores = {
            key: evaluate_forecaster(
                model,
                x,
                y,
                num_samples,
                options.batch_size,
                seed=config.fit.seed,
                exact=options.exact,
                paths=options.paths,
            )
            for key, model in models.items()
        }
    names = METRICS + (PATH_METRICS if options.paths else ())
    rows = [{"split": split, "model": key, **{m: s[m] for m in names}} for key, s in scores.items()]
    frame = pd.DataFrame(rows)
    payload = {
        "split": split,
        "windows": int(x.shape[0]),
        "num_samples": num_samples,
        "exact": options.exact,
        "units": "standardised (scaler fitted on the training rows)",
        "paths": options.paths,
        "models": {key: {m: float(s[m]) for m in names} for key, s in scores.items()},
    }
    with _Outputs(run.dir.root) as outputs:
        frame.to_csv(outputs.path(run.dir.metrics_csv(split)), index=False)
        outputs.path(run.dir.metrics_json(split)).write_text(json.dumps(payload, indent=2) + "\n")
    echo(f"{split} metrics over {x.shape[0]} windows (standardised units):")
    table = frame.drop(columns="split").to_string(index=False, float_format=lambda v: f"{v:.4f}")
    for line in table.splitlines():
        echo("  " + line)
    return {key: {m: float(s[m]) for m in names} for key, s in scores.items()}


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
    pred = normalised(run.network, config.fit.norm).predict(
        x[index : index + 1], num_samples=max(config.evaluate.num_samples, 200)
    )
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


def _diagnostic_x(config, splits):
    """The windows of the final per-unit table: at most ``diagnostics.max_points`` of
    ``diagnostics.split``."""
    x, _ = _normalised_windows(config, *_windows(config, splits, config.diagnostics.split))  # (W * C, L)
    return _diagnostic_windows(x, config.diagnostics.max_points)


def _normalised_windows(config, x, y):
    """Windows ``(W, L)`` and targets ``(W, H)`` in the units the network was trained in
    (``fit.norm``, :func:`~vdn_pyro.forecasting.normalise_windows`): what its per-unit tables
    and InferenceData are computed on."""
    return normalise_windows(x, y, config.fit.norm)


def report_run(run, plots=True, echo=print, report=None):
    """Write the per-unit diagnostics table, its per-layer summary, the InferenceData and its
    ArviZ summary, and the plots of a run: under temporary names, moved into place together when
    all are written (a failure leaves the previous files as they were).

    ``units.csv`` and ``layers.csv`` have a ``split`` column (``diagnostics.split``: the windows
    they are computed on); ``idata.nc`` and ``arviz_summary.csv`` hold the first test windows
    (a ``split`` attribute of every group and a ``split`` column).

    :param Run run: from :func:`fit_run` or :func:`load_run`.
    :param bool plots: write the PNG plots (also needs ``output.plots``).
    :param echo: called with each line of the summary.
    :param report: the final per-unit table when it is already computed (:func:`fit_run` computes
        it at the end of the fit, for the progress bar); else it is computed here, the same way.
    :returns: dict name -> path of every file written.
    """
    config, files = run.config, {}
    x_test, y_test = _normalised_windows(
        config, *_windows(config, run.splits, "test")
    )  # (W * C, L), (W * C, H)
    lines = []
    with _torch_settings(config), _Outputs(run.dir.root) as outputs:

        def out(name, final):
            files[name] = final
            return outputs.path(final)

        if config.neurons.deterministic:
            report = None
        else:
            split = config.diagnostics.split
            if report is None:
                x_diag = _diagnostic_x(config, run.splits)
                report = unit_report(run.network, x_diag, **_report_options(config, run.constraints))
            report.assign(split=split).to_csv(out("units", run.dir.units), index=False)
            layer_summary(report).assign(split=split).to_csv(out("layers", run.dir.layers), index=False)
            counts = report.status.value_counts()
            lines.append(
                "units: "
                + ", ".join(f"{counts.get(s, 0)} {s}" for s in counts.index)
                + f" (of {len(report)}, on {split} windows; table in {run.dir.units.name})"
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
            for group in idata.groups():
                idata[group].attrs["split"] = "test"
            save_inference_data(idata, out("idata", run.dir.idata))
            summary = _arviz_summary(vdn_arviz, idata, _site(run.network))
            summary.assign(split="test").to_csv(out("summary", run.dir.summary))
        if plots and config.output.plots:
            files["dashboard"] = run.dir.dashboard
            _dashboard(run, report, outputs.path(run.dir.dashboard))
            files["fan_chart"] = run.dir.fan_chart
            _fan_chart(run, outputs.path(run.dir.fan_chart))
            if idata is not None and not config.neurons.deterministic:
                from vdn_pyro.plots import plot_forest

                site = _site(run.network)
                plot_forest(out("forest", run.dir.forest), idata, site, obs=0, dpi=config.output.dpi)
    for line in lines:
        echo(line)
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
    fit_parser.add_argument(
        "config", nargs="?", metavar="CONFIG", help="a YAML, TOML or JSON configuration file"
    )
    fit_parser.add_argument("--preset", metavar="NAME", help="start from a preset: default, ett or quick")
    fit_parser.add_argument(
        "--run-dir", metavar="DIR", help="the run directory, absent or empty (default <output.root>/<time>)"
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
    fit_parser.add_argument(
        "--quiet", action="store_true", help="no progress bar and no summary: print only the run directory"
    )

    eval_parser = commands.add_parser(
        "evaluate",
        help="metrics of a run on its test (or validation) split",
        description="Print and write the metrics of a run on one split (metrics_<split>.json/.csv).",
    )
    eval_parser.add_argument("run_dir", metavar="RUN_DIR")
    eval_parser.add_argument("--split", choices=SPLITS, default="test")
    eval_parser.add_argument("--num-samples", type=int, metavar="S", help="predictive draws per window")
    eval_parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change data.path (the same data elsewhere) or an evaluate/diagnostics/output option",
    )

    report_parser = commands.add_parser(
        "report",
        help="diagnostics table, ArviZ summary and plots of a run",
        description="Regenerate the per-unit table, the InferenceData, its ArviZ summary and the plots.",
    )
    report_parser.add_argument("run_dir", metavar="RUN_DIR")
    report_parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    report_parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change data.path (the same data elsewhere) or an evaluate/diagnostics/output option",
    )

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
    options = {"progress": not args.quiet, "summary": not args.quiet, "argv": argv}
    if args.resume is not None:
        if args.config is not None or args.preset is not None or args.run_dir is not None:
            raise RunError(
                "--resume RUN_DIR continues a run with its own config.yaml; drop CONFIG, --preset "
                "and --run-dir (change options with --set)"
            )
        run_dir = RunDir(args.resume)
        run_dir.check_existing()
        config = load_config(run_dir.config, overrides=args.overrides)
        run = fit_run(config, run_dir.root, resume=True, **options)
    else:
        config = load_config(args.config, preset=args.preset, overrides=args.overrides)
        run = fit_run(config, args.run_dir, **options)
    result = run.result
    if result.interrupted:
        print(
            f"vdn: interrupted by {result.stop_reason} at step {result.steps}; final checkpoint written to "
            f"{result.checkpoint_path}. Continue with: vdn fit --resume {run.dir.root}",
            file=sys.stderr,
        )
        return result.exit_code
    return 0


def _command_evaluate(args):
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError.at("--num-samples", f"expected int >= 1, got {args.num_samples}")
    run_dir = RunDir(args.run_dir)
    run_dir.check_existing()
    with run_dir.lock():
        run = load_run(run_dir.root, overrides=args.overrides)
        evaluate_run(run, split=args.split, num_samples=args.num_samples)
    print(f"wrote {run.dir.metrics_json(args.split)} and {run.dir.metrics_csv(args.split).name}")
    return 0


def _command_report(args):
    run_dir = RunDir(args.run_dir)
    run_dir.check_existing()
    with run_dir.lock():
        run = load_run(run_dir.root, overrides=args.overrides)
        report_run(run, plots=not args.no_plots)
    return 0


def _command_config(args):
    config = load_config(args.config, preset=args.preset, overrides=args.overrides)
    print(dump_config(config), end="")
    return 0


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def _free_space(path):
    """`` (N free of M on the file system)`` for the nearest existing parent of ``path``."""
    path = Path(path) if path else Path.cwd()
    for parent in (path, *path.parents):
        if parent.exists():
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(parent)
                return f" ({_size(usage.free)} free of {_size(usage.total)} on that file system)"
            break
    return ""


def _os_message(error, command):
    """One line for an operating-system failure: what failed, on which path, and what to do."""
    name = error.filename
    where = f" {name}" if name else ""
    reason = error.strerror or _one_line(error)
    elsewhere = (
        "choose another --run-dir" if command == "fit" else "copy the run directory somewhere writable"
    )
    if error.errno == errno.ENOSPC:
        return (
            f"no space left on the device while writing{where}{_free_space(name)}; free some space or "
            f"{elsewhere}, then run the command again"
        )
    if error.errno == errno.EROFS:
        return f"cannot write{where}: {reason} (the file system is mounted read-only); {elsewhere}"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot write{where}: {reason} (the directory is read-only for this user); fix its "
            f"permissions or {elsewhere}"
        )
    if error.errno == errno.ENOTDIR or isinstance(error, NotADirectoryError):
        return f"{name} is not a directory ({reason}); {elsewhere}"
    if error.errno == errno.EEXIST:
        return f"{name} already exists ({reason}); {elsewhere}"
    return f"{reason}{':' + where if where else ''}"


def main(argv=None):
    """Entry point of the ``vdn`` command.

    Every error is one line on stderr (``--debug`` re-raises it with its traceback).

    :param list argv: arguments (default ``sys.argv[1:]``).
    :returns: the exit status: 0; 2 for what the command's user can fix (the configuration, the
        data, the run directory, the checkpoint); 1 for a failure of the machine (a read-only or
        full disk, a path that is not a directory, memory) or of the training (NaN/inf); 130/143
        when interrupted by SIGINT/SIGTERM.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    start = time.perf_counter()

    def fail(status, message):
        if args.debug:
            raise
        print(f"vdn {args.command}: error: {message}", file=sys.stderr)
        return status

    try:
        if args.command == "fit":
            return _command_fit(args, ["vdn", *argv])
        if args.command == "evaluate":
            return _command_evaluate(args)
        if args.command == "report":
            return _command_report(args)
        return _command_config(args)
    except (ConfigError, RunError, CheckpointError, ImportError) as e:
        return fail(EXIT_USAGE, _one_line(e))
    except NonFiniteError as e:
        return fail(EXIT_FAILURE, _one_line(e))
    except BrokenPipeError:  # stdout piped into a reader that stopped early, e.g. `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise
        return 0
    except OSError as e:
        return fail(EXIT_FAILURE, _os_message(e, args.command))
    except MemoryError as e:
        detail = f" ({_one_line(e)})" if str(e) else ""
        return fail(EXIT_FAILURE, f"out of memory{detail}; reduce the sizes in the configuration")
    except KeyboardInterrupt:
        if args.debug:
            raise
        seconds = time.perf_counter() - start
        print(f"vdn {args.command}: interrupted after {seconds:.0f} s", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError) as e:  # input the checks above did not name
        return fail(EXIT_USAGE, f"{_one_line(e)} (`vdn --debug {args.command} ...` shows where)")
    except Exception as e:
        return fail(
            EXIT_FAILURE,
            f"{type(e).__name__}: {_one_line(e)} (an unexpected failure: `vdn --debug {args.command} ...` "
            "shows the traceback)",
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

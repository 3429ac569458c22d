r"""Atomic, self-checking checkpoints of a fit, and the random state needed to resume it exactly.

A checkpoint is one file written by :func:`torch.save` and holding only tensors and plain Python
containers (dicts, lists, tuples, strings, numbers, ``None``), so that :func:`load_checkpoint` can
read it with ``torch.load(weights_only=True)``: loading never runs code from the file.

Writes are atomic: the payload goes to a temporary file in the target directory, is flushed and
``fsync``-ed, and then :func:`os.replace` renames it over the target. A reader therefore sees either
the previous checkpoint or the new one, never a partial file, even if the writer is killed.

Any :class:`torch.nn.Module` can be checkpointed (its ``state_dict`` and a fingerprint of its
architecture). :func:`load_network` loads the weights into a network you pass, whatever its
class, and rebuilds the network itself from the stored configuration for the library's own
networks (:data:`REBUILDABLE`: ``VDN``, ``Forecaster``, ``RecurrentVDN``; only these, looked up by
their qualified name: nothing named in a file is ever imported).

A file that is empty, truncated or unreadable raises :class:`CorruptCheckpointError`; a file that
is not a vdn_pyro checkpoint raises :class:`ForeignCheckpointError`; a checkpoint of another
architecture (or a newer format) raises :class:`IncompatibleCheckpointError`. All three subclass
:class:`CheckpointError` (a :class:`RuntimeError`), and each message says what was expected, what
was found and what to do.
"""

import contextlib
import dataclasses
import numbers
import os
import pickle
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from vdn_pyro.models.forecaster import Forecaster, ForecasterConfig
from vdn_pyro.models.recurrent import RecurrentVDN, RecurrentVDNConfig
from vdn_pyro.models.vdn import VDN, VDNConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LAST_CHECKPOINT",
    "REBUILDABLE",
    "CheckpointError",
    "CorruptCheckpointError",
    "ForeignCheckpointError",
    "IncompatibleCheckpointError",
    "check_compatible",
    "config_payload",
    "get_rng_state",
    "incompatibilities",
    "load_checkpoint",
    "load_network",
    "network_fingerprint",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

#: The tag stored under ``"format"`` in every checkpoint this module writes.
CHECKPOINT_FORMAT = "vdn_pyro.checkpoint"
#: The layout version; :func:`load_checkpoint` refuses files with a larger one.
CHECKPOINT_VERSION = 1
#: File name of the latest checkpoint inside a checkpoint directory.
LAST_CHECKPOINT = "last.pt"

_ZIP_MAGIC = b"PK\x03\x04"
# config fields that are training state (restored from the state_dict), not architecture
_STATE_FIELDS = ("beta",)

#: The networks :func:`load_network` rebuilds from a checkpoint's stored config, by the qualified
#: class name the checkpoint's fingerprint holds.
REBUILDABLE = tuple(f"{cls.__module__}.{cls.__qualname__}" for cls in (VDN, Forecaster, RecurrentVDN))
# where these classes were defined before (checkpoints written then name them so)
_CLASS_ALIASES = {"vdn_pyro.network.VDN": "vdn_pyro.models.vdn.VDN"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used. Subclasses say why."""


class CorruptCheckpointError(CheckpointError):
    """The file is empty, truncated or otherwise unreadable."""


class ForeignCheckpointError(CheckpointError):
    """The file is readable but was not written by :func:`save_checkpoint`."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint is ours but does not fit: another architecture, data set or format version."""


# ----------------------------------------------------------------------------- paths
def resolve_checkpoint(path):
    """The checkpoint file for ``path``: a file itself, or :data:`LAST_CHECKPOINT` in a directory.

    :param path: a file or directory path.
    :returns: a :class:`pathlib.Path`.
    """
    path = Path(path)
    return path / LAST_CHECKPOINT if path.is_dir() else path


# ----------------------------------------------------------------------------- fingerprint
def _plain(value):
    """A comparable, ``weights_only``-safe version of a config value (tuples become lists)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if torch.is_tensor(value):
        return value.detach().cpu().tolist()
    return repr(value)


def _config_dict(network):
    config = getattr(network, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def network_fingerprint(network):
    """What must agree between a checkpoint and the network it is loaded into.

    :param network: a :class:`torch.nn.Module` (a :class:`~vdn_pyro.VDN` adds its config).
    :returns: a dict with ``class`` (qualified name), ``config`` (the config dataclass as plain
        values, without fields that are training state such as ``beta``; ``None`` without a
        config) and ``state`` (``name -> [shape, dtype]`` of every state_dict entry).
    """
    config = _config_dict(network)
    if config is not None:
        config = {k: v for k, v in config.items() if k not in _STATE_FIELDS}
    state = {name: [list(t.shape), str(t.dtype)] for name, t in network.state_dict().items()}
    return {"class": _class_name(network), "config": config, "state": state}


def _class_name(network):
    cls = type(network)
    return f"{cls.__module__}.{cls.__qualname__}"


def incompatibilities(checkpoint, network):
    """What differs between the network a checkpoint was written for and ``network``.

    :param dict checkpoint: as returned by :func:`load_checkpoint`.
    :param network: the module to load it into.
    :returns: a list of short descriptions (``"config.units: checkpoint 4, network 5"``), empty
        when the architectures agree (or the checkpoint has no fingerprint).
    """
    saved, current = checkpoint.get("fingerprint"), network_fingerprint(network)
    if saved is None:
        return []
    problems = []
    if _CLASS_ALIASES.get(saved.get("class"), saved.get("class")) != current["class"]:
        problems.append(f"class {saved.get('class')} != {current['class']}")
    old_cfg, new_cfg = saved.get("config") or {}, current["config"] or {}
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            problems.append(f"config.{key}: checkpoint {old_cfg.get(key)!r}, network {new_cfg.get(key)!r}")
    old_state, new_state = saved.get("state", {}), current["state"]
    for name in sorted(set(old_state) | set(new_state)):
        a, b = old_state.get(name), new_state.get(name)
        if a != b:
            a = "missing" if a is None else f"shape {tuple(a[0])} {a[1]}"
            b = "missing" if b is None else f"shape {tuple(b[0])} {b[1]}"
            problems.append(f"{name}: checkpoint {a}, network {b}")
    return problems


def check_compatible(checkpoint, network, path="checkpoint"):
    """Raise :class:`IncompatibleCheckpointError` unless ``checkpoint`` was written for a network
    of the same architecture as ``network`` (see :func:`incompatibilities`).

    :param dict checkpoint: as returned by :func:`load_checkpoint`.
    :param network: the module to load it into.
    :param str path: the file name, for messages.
    """
    problems = incompatibilities(checkpoint, network)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise IncompatibleCheckpointError(
            f"Checkpoint {path} was written for a different network ({shown}). Build the network "
            "with the configuration the checkpoint was written with (see its 'config' entry, or "
            "use load_network(path)), or start a new run in another directory."
        )


# ----------------------------------------------------------------------------- random state
def get_rng_state(generator=None):
    """Every random state a fit draws from, as tensors and plain values.

    Pyro samples from torch's global generator, so the torch, numpy and Python states together
    are what :func:`pyro.util.get_rng_state` covers.

    :param torch.Generator generator: an extra generator (e.g. the minibatch order) to include.
    :returns: a dict with ``torch``, ``numpy``, ``python`` (and ``cuda``, ``generator``).
    """
    # the legacy global numpy state is what pyro.set_rng_seed seeds
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state, generator=None):
    """Restore what :func:`get_rng_state` returned.

    :param dict state: the saved state.
    :param torch.Generator generator: receives ``state["generator"]`` when both are present.
    """
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(  # noqa: NPY002
        (npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# ----------------------------------------------------------------------------- writing
def _first_nonfinite(tree, prefix=""):
    """Name of the first floating tensor in a nested payload with a NaN or inf, else ``None``."""
    if torch.is_tensor(tree):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix or "<tensor>"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for key, value in items:
        found = _first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _fsync_dir(directory):
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path, payload, *, network=None, check_finite=("network", "optimizer")):
    """Write a checkpoint atomically (temporary file, ``fsync``, :func:`os.replace`).

    :param path: the target file; its directory is created if missing.
    :param dict payload: tensors and plain containers only (what ``weights_only`` loading
        accepts). The keys ``format``, ``version`` and, with ``network``, ``fingerprint`` are
        added, and ``config``/``config_repr`` (:func:`config_payload`) when the payload has no
        ``config``.
    :param network: the module the payload belongs to (any :class:`torch.nn.Module`); its
        :func:`network_fingerprint` is stored so that loading into another architecture is
        refused.
    :param tuple check_finite: payload entries that must hold only finite floats.
    :returns: the :class:`pathlib.Path` written.
    :raises CheckpointError: if a checked entry holds NaN or inf (nothing is written, and an
        existing checkpoint at ``path`` is left as it was).
    :raises OSError: if the file cannot be written (a full disk, a read-only directory), with
        ``filename`` set to ``path``; an existing checkpoint is left as it was.
    """
    path = Path(path)
    if not isinstance(payload, dict):
        raise TypeError(f"Expected payload to be a dict, but got {type(payload).__name__}.")
    for key in check_finite:
        bad = _first_nonfinite(payload.get(key), key)
        if bad is not None:
            raise CheckpointError(
                f"Refusing to write checkpoint {path}: '{bad}' holds NaN or inf. The previous "
                "checkpoint (if any) is kept; resume from it with a smaller learning rate."
            )
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    if network is not None:
        payload["fingerprint"] = network_fingerprint(network)
        if "config" not in payload:
            payload["config"], payload["config_repr"] = config_payload(network)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name it
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    _fsync_dir(path.parent)
    return path


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path, *, network=None, map_location="cpu"):
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    The file is read with ``torch.load(weights_only=True)``, so it cannot run code.

    :param path: the checkpoint file, or a directory holding :data:`LAST_CHECKPOINT`.
    :param network: if given, refuse a checkpoint written for another architecture.
    :param map_location: passed to :func:`torch.load`.
    :returns: the payload dict.
    :raises FileNotFoundError: if there is no such file.
    :raises CorruptCheckpointError: empty, truncated or unreadable file.
    :raises ForeignCheckpointError: not a vdn_pyro checkpoint.
    :raises IncompatibleCheckpointError: newer format, or another architecture than ``network``.
    """
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Expected a file written by fit(checkpoint_dir=...) or a "
            f"directory holding {LAST_CHECKPOINT}; check the path."
        )
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(
            f"Checkpoint {path} is empty (0 bytes): it was not written by save_checkpoint, whose "
            "writes are atomic. Delete it and resume from another checkpoint, or start afresh."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:  # save_checkpoint always writes torch's zip format
        raise ForeignCheckpointError(
            f"{path} is not a vdn_pyro checkpoint: expected a PyTorch zip file starting with "
            f"{_ZIP_MAGIC!r}, but it starts with {head!r}. Check the path."
        )
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ForeignCheckpointError(
            f"{path} is not a vdn_pyro checkpoint: it holds Python objects that a weights-only "
            f"load refuses ({first}). Expected a file written by fit(checkpoint_dir=...) or "
            "save_checkpoint. If it comes from elsewhere and you trust it, read it with "
            "torch.load(weights_only=False) yourself."
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... on a cut or damaged zip
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointError(
            f"Checkpoint {path} ({size} bytes) is truncated or corrupt and cannot be read "
            f"({type(e).__name__}: {first}). Delete it and resume from another checkpoint, or "
            "start afresh."
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ForeignCheckpointError(
            f"{path} is a PyTorch file but not a vdn_pyro checkpoint: expected format tag "
            f"{CHECKPOINT_FORMAT!r}, got {found!r}. A bare state_dict can be loaded with "
            "network.load_state_dict(torch.load(path, weights_only=True)) instead."
        )
    version = data.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise IncompatibleCheckpointError(
            f"Checkpoint {path} has format version {version!r}, but this vdn_pyro reads versions "
            f"up to {CHECKPOINT_VERSION}. Upgrade vdn_pyro to read it."
        )
    if network is not None:
        check_compatible(data, network, path)
    return data


def _rebuild(class_name, config):
    """A fresh network of one of the :data:`REBUILDABLE` classes from its config fields."""
    if class_name == REBUILDABLE[0]:
        built = VDNConfig(**config)
        return VDN(built.in_features, built.out_features, config=built)
    if class_name == REBUILDABLE[1]:
        return Forecaster(ForecasterConfig(**config))
    built = RecurrentVDNConfig(**config)
    return RecurrentVDN(built.vocab_size, config=built)


def load_network(path, network=None, *, map_location="cpu"):
    """Load a checkpoint's weights into a network, building the network from its stored config if
    none is given.

    :param path: a checkpoint file, or a directory holding :data:`LAST_CHECKPOINT`.
    :param network: the module to load into, of any class (its architecture is checked against
        the checkpoint's fingerprint); ``None`` to rebuild the network from the checkpoint's
        config, which works for the classes in :data:`REBUILDABLE` (``VDN``, ``Forecaster``,
        ``RecurrentVDN``).
    :returns: the network, in eval mode.
    :raises IncompatibleCheckpointError: if the network does not fit, or ``network=None`` and the
        checkpoint holds no config of a rebuildable class (e.g. a network of your own: build it
        and pass it).
    """
    data = load_checkpoint(path, network=network, map_location=map_location)
    if network is None:
        where = resolve_checkpoint(path)
        fingerprint = data.get("fingerprint") or {}
        class_name = fingerprint.get("class")
        class_name = _CLASS_ALIASES.get(class_name, class_name)
        if class_name is None and isinstance(data.get("config"), dict):
            class_name = REBUILDABLE[0]  # written without a fingerprint: the old default, a VDN
        if class_name not in REBUILDABLE:
            raise IncompatibleCheckpointError(
                f"Checkpoint {where} holds a {class_name or 'network of unknown class'}, which "
                "load_network cannot rebuild by itself (it rebuilds "
                f"{', '.join(name.rpartition('.')[2] for name in REBUILDABLE)} from their stored "
                "config). Build the network as it was built for the fit and pass it: "
                "load_network(path, network)."
            )
        config = data.get("config")
        if not isinstance(config, dict) or data.get("config_repr"):
            raise IncompatibleCheckpointError(
                f"Checkpoint {where} holds no config of its {class_name.rpartition('.')[2]} that "
                f"can be rebuilt (fields stored only as text: {data.get('config_repr') or 'none stored'}). "
                "Build the network yourself and pass it as load_network(path, network)."
            )
        try:
            network = _rebuild(class_name, config)
        except (TypeError, ValueError) as e:
            raise IncompatibleCheckpointError(
                f"Checkpoint {where}: its stored {class_name.rpartition('.')[2]} config cannot be "
                f"rebuilt by this vdn_pyro ({type(e).__name__}: {e}). Build the network yourself "
                "and pass it as load_network(path, network)."
            ) from None
        check_compatible(data, network, where)
    network.load_state_dict(data["network"])
    return network.eval()


def config_payload(network):
    """The network's config as ``weights_only``-safe values for a checkpoint.

    :returns: ``(config, config_repr)``: a dict of the config's fields (tensors kept as tensors,
        tuples as tuples) or ``None``, and a list of field names that could only be stored as a
        ``repr`` (so the config cannot be rebuilt from the checkpoint).
    """
    config = getattr(network, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None, []
    out, reprs = {}, []

    def convert(value):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if torch.is_tensor(value):
            return value.detach().cpu().clone()
        if isinstance(value, (list, tuple)):
            items = [convert(v) for v in value]
            return tuple(items) if isinstance(value, tuple) else items
        raise TypeError(type(value).__name__)

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            out[f.name] = convert(value)
        except TypeError:
            out[f.name] = repr(value)
            reprs.append(f.name)
    return out, reprs

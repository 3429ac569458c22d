"""Tests for :mod:`vdn_pyro.inference.checkpoint`: atomic writes, refusals with clear errors, RNG."""

import random

import numpy as np
import pyro
import pytest
import torch

from vdn_pyro import VDN
from vdn_pyro.inference import checkpoint as ckpt
from vdn_pyro.inference.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    IncompatibleCheckpointError,
    get_rng_state,
    load_checkpoint,
    load_network,
    save_checkpoint,
    set_rng_state,
)


def small_net(**options):
    return VDN(3, 1, **{"units": (4,), "hidden": (8,), **options})


def assert_no_chained_traceback(error):
    """The user sees our message only, not an unpickling traceback above it."""
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def write(path, net=None, **extra):
    net = net or small_net()
    return save_checkpoint(path, {"network": net.state_dict(), "step": 3, **extra}, network=net)


def test_round_trip_adds_format_version_and_fingerprint(tmp_path):
    net = small_net()
    path = write(tmp_path / "a" / "last.pt", net, note="hello", values=[1, 2.5, None, ("x", True)])
    assert path == tmp_path / "a" / "last.pt" and path.is_file()
    data = load_checkpoint(tmp_path / "a", network=net)  # a directory means its last.pt
    assert data["format"] == CHECKPOINT_FORMAT and data["version"] == CHECKPOINT_VERSION
    assert data["step"] == 3 and data["note"] == "hello" and data["values"] == [1, 2.5, None, ("x", True)]
    assert data["fingerprint"]["config"]["units"] == [4]
    assert "beta" not in data["fingerprint"]["config"]  # training state, not architecture
    for key, value in net.state_dict().items():
        assert torch.equal(data["network"][key], value), key


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = write(tmp_path / "last.pt", step_value=1)
    write(path, step_value=2)
    assert load_checkpoint(path)["step_value"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = write(tmp_path / "last.pt", marker="old")
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write(path, marker="new")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_refuses_to_write_non_finite_parameters(tmp_path):
    path = write(tmp_path / "last.pt", marker="good")
    net = small_net()
    with torch.no_grad():
        net.head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"Refusing to write .*'network.head.weight' holds NaN or inf"):
        write(path, net)
    assert load_checkpoint(path)["marker"] == "good"


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0], ids=["half", "most", "empty"])
def test_truncated_checkpoint_is_refused_clearly(tmp_path, keep):
    path = write(tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match=r"(truncated or corrupt|is empty)") as info:
        load_checkpoint(path)
    assert "Delete it and resume from another checkpoint" in str(info.value)
    assert_no_chained_traceback(info.value)


class Opaque:
    """A pickled object that a weights-only load must refuse."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"step,loss\n1,0.5\n", r"expected a PyTorch zip file"),
        ({"weight": torch.ones(2)}, r"not a vdn_pyro checkpoint: expected format tag '.*', got None"),
        ([torch.ones(2)], r"got 'list'"),
        (Opaque(), r"holds Python objects that a weights-only load refuses"),
    ],
    ids=["csv", "state-dict", "list", "pickled-object"],
)
def test_foreign_file_is_refused_clearly(tmp_path, content, match):
    path = tmp_path / "last.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ForeignCheckpointError, match=match) as info:
        load_checkpoint(path)
    assert_no_chained_traceback(info.value)


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at .*last.pt"):
        load_checkpoint(tmp_path)


def test_incompatible_architecture_is_refused_with_the_differences(tmp_path):
    path = write(tmp_path / "last.pt", small_net(units=(4,)))
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_checkpoint(path, network=small_net(units=(6,)))
    message = str(info.value)
    assert "config.units: checkpoint [4], network [6]" in message
    assert "layers.0.posterior.loc.weight: checkpoint shape (4, 8)" in message
    assert "Build the network with the configuration the checkpoint was written with" in message
    # a different beta is training state: it loads
    load_checkpoint(path, network=small_net(units=(4,), beta=0.3))


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION + 1}, path)
    with pytest.raises(IncompatibleCheckpointError, match=r"format version 2, but .* reads versions up to 1"):
        load_checkpoint(path)


def test_load_network_rebuilds_a_vdn_from_its_config(tmp_path):
    net = small_net(units=(5, 3), latent_dim=2, beta=[0.5, torch.linspace(0.1, 0.3, 3)])
    config, reprs = ckpt.config_payload(net)
    assert reprs == []
    payload = {"network": net.state_dict(), "config": config, "config_repr": reprs}
    save_checkpoint(tmp_path / "last.pt", payload, network=net)
    rebuilt = load_network(tmp_path)
    assert isinstance(rebuilt, VDN) and not rebuilt.training
    assert rebuilt.config.units == (5, 3) and rebuilt.config.latent_dim == 2
    for (name, a), b in zip(net.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(IncompatibleCheckpointError, match="config.units"):
        load_network(tmp_path, small_net())


def test_rng_state_round_trip_covers_torch_numpy_python_and_a_generator(tmp_path):
    generator = torch.Generator().manual_seed(1)
    pyro.set_rng_seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"rng": get_rng_state(generator)})

    def draws():
        return (
            torch.rand(3).tolist(),
            np.random.rand(3).tolist(),  # noqa: NPY002 - the legacy state is what is saved
            [random.random() for _ in range(3)],
            torch.randperm(10, generator=generator).tolist(),
        )

    first = draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"], generator)  # read weights-only
    assert draws() == first


def test_a_failed_write_names_the_checkpoint(tmp_path, monkeypatch):
    """A writer's OSError often names no file (torch.save writes to an open file): the error then
    names the checkpoint, so a caller can say which write failed."""
    import errno

    def full_disk(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        write(tmp_path / "last.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_incompatibilities_lists_each_difference(tmp_path):
    path = write(tmp_path / "last.pt", small_net(units=(4,)))
    saved = load_checkpoint(path)
    assert ckpt.incompatibilities(saved, small_net(units=(4,), beta=0.3)) == []
    problems = ckpt.incompatibilities(saved, small_net(units=(6,)))
    assert problems[0] == "config.units: checkpoint [4], network [6]"
    assert any(p.startswith("layers.0.posterior.loc.weight: checkpoint shape (4, 8)") for p in problems)

"""Tests for :func:`vdn_pyro.inference.fit` and its :class:`FitResult`."""

import math
import random
import re

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from pyro.optim.clipped_adam import ClippedAdam

from tests.common import assert_close
from vdn_pyro import VDN, FitResult, LocalELBO, fit
from vdn_pyro.inference import LOG_COLUMNS, FitState, evaluate_loss
from vdn_pyro.models import Neurons
from vdn_pyro.primitives import data_plate

D = 3
WEIGHT = torch.tensor([[1.5], [-2.0], [0.5]])


def regression(n, noise=0.1, seed=123):
    """y = x W + noise, with its own generator so the data do not depend on the test order."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    return x, x @ WEIGHT + noise * torch.randn(n, 1, generator=gen)


def small_net(**options):
    options = {"units": (8,), "hidden": (16,), "beta": 0.1, **options}
    return VDN(D, 1, **options)


class Recorder:
    """A callback that records what it sees and can stop the fit."""

    def __init__(self, stop_at=None):
        self.stop_at, self.started, self.ended = stop_at, 0, 0
        self.steps, self.epochs, self.losses, self.stats = [], [], [], []

    def on_fit_start(self, state):
        assert isinstance(state, FitState) and state.step == 0
        self.started += 1

    def on_step_end(self, state):
        self.steps.append(state.step)
        self.epochs.append(state.epoch)
        self.losses.append(state.loss)
        self.stats.append(state.stats)
        self.optimizer = state.optimizer
        self.history = state.history
        if state.step == self.stop_at:
            state.stop = True

    def on_fit_end(self, state):
        self.ended += 1


@pytest.mark.parametrize("optim", ["adam", "clipped_adam"])
def test_fit_reduces_the_loss_on_linear_regression(optim):
    x, y = regression(256)
    net = small_net()
    recorder = Recorder()
    result = fit(
        net, x, y, steps=200, batch_size=64, lr=3e-2, optim=optim, seed=0, log_every=1, callbacks=[recorder]
    )
    assert isinstance(result, FitResult) and result.network is net
    if optim == "clipped_adam":
        assert isinstance(recorder.optimizer, ClippedAdam)
    first = result.history[0]["loss_per_obs"]  # step 1, about 4 nats per observation
    last = float(np.mean([row["loss_per_obs"] for row in result.history[-20:]]))  # about 0.1 to 0.8
    assert math.isfinite(last)
    assert last < first - 2.0, (first, last)
    pred = net.predict(x, num_samples=50)
    mse = float(((pred.mean - y) ** 2).mean())
    assert mse < 0.02 * float(y.var()), mse  # reached: about 0.003 * var(y)
    # the logged loss is the full-data scale: about N times the per-observation loss
    assert_close(result.history[-1]["loss"], result.history[-1]["loss_per_obs"] * 256, rtol=1e-9)


def test_fit_accepts_numpy_arrays():
    x, y = regression(40)
    result = fit(small_net(), x.numpy().astype(np.float64), y.numpy(), steps=3, batch_size=20, seed=0)
    assert result.steps == 3 and math.isfinite(result.final_loss)


def test_result_fields_have_documented_shapes():
    x, y = regression(100)
    net = small_net(units=(8, 4), beta=[torch.linspace(0.1, 0.8, 8), 0.5])
    recorder = Recorder()
    result = fit(net, x, y, steps=25, batch_size=64, log_every=10, seed=0, callbacks=[recorder])

    assert result.steps == 25 and result.seconds > 0
    assert result.logged_steps == [10, 20, 25]
    assert [row["step"] for row in result.history] == [10, 20, 25]
    # two minibatches per epoch (64 + 36 rows): step s runs in epoch (s - 1) // 2
    assert [row["epoch"] for row in result.history] == [4, 9, 12]
    for row in result.history:
        assert set(row) == {"step", "epoch", "loss", "loss_per_obs"}
        assert_close(row["loss_per_obs"], row["loss"] / 100, rtol=1e-12)
    assert result.final_loss == result.history[-1]["loss_per_obs"]
    assert result.history[-1]["loss"] == recorder.losses[-1]

    assert set(result.unit_kl) == set(result.unit_beta) == {"layers.0.z", "layers.1.z"}
    for layer in net.layers:
        kl, beta = result.unit_kl[layer.site], result.unit_beta[layer.site]
        assert isinstance(kl, np.ndarray) and kl.shape == (3, layer.units)
        assert isinstance(beta, np.ndarray) and beta.shape == (3, layer.units)
        assert np.all(kl >= 0)
        assert np.allclose(beta, layer.beta.numpy()[None])
        # rows are the per-unit KL of the logged steps' own minibatches
        for row, step in zip(kl, result.logged_steps):
            assert np.allclose(row, recorder.stats[step - 1][layer.site].kl.numpy())

    assert math.isnan(result.best_val_loss) and result.best_step == -1 and result.best_state == {}
    assert result.stop_reason == "completed" and not result.interrupted and result.skipped_steps == []
    assert "state" in result.optimizer_state and "param_groups" in result.optimizer_state
    frame = result.history_frame()
    assert list(frame["step"]) == [10, 20, 25]


def test_same_seed_gives_identical_parameters():
    x, y = regression(80)

    def run(seed):
        pyro.set_rng_seed(5)  # identical initialisation
        net = small_net(units=(4, 3))
        result = fit(net, x, y, steps=12, batch_size=32, seed=seed)
        return net, result

    first, r1 = run(seed=7)
    second, r2 = run(seed=7)
    other, _ = run(seed=8)
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, o) for p, o in zip(first.parameters(), other.parameters()))
    assert [row["loss"] for row in r1.history] == [row["loss"] for row in r2.history]


def test_validation_loss_and_best_state():
    x, y = regression(120)
    x_val, y_val = regression(60, seed=321)
    net = small_net()
    result = fit(
        net,
        x,
        y,
        steps=40,
        batch_size=40,
        lr=2e-2,
        val_data=(x_val, y_val),
        val_every=5,
        log_every=5,
        seed=0,
        restore_best=True,
    )
    val = [row["val_loss"] for row in result.history]
    assert len(val) == 8 and all(math.isfinite(v) for v in val)
    assert result.best_val_loss == min(val)
    assert result.best_step == result.history[int(np.argmin(val))]["step"]
    assert val[-1] < val[0]  # validation improves with training
    # restore_best loaded the best state, which is a copy and not the live tensors
    state = net.state_dict()
    assert set(result.best_state) == set(state)
    for key, value in result.best_state.items():
        assert torch.equal(value, state[key]), key
        assert value.data_ptr() != state[key].data_ptr(), key
    # the recorded value is the per-observation loss of that state on the validation data
    pyro.set_rng_seed(0)
    again = evaluate_loss(net, x_val, y_val, LocalELBO(num_particles=200))
    assert abs(again - result.best_val_loss) < 0.3, (again, result.best_val_loss)


def test_validation_defaults_to_once_per_epoch():
    x, y = regression(60)
    x_val, y_val = regression(20, seed=9)
    result = fit(small_net(), x, y, steps=9, batch_size=20, log_every=1, val_data=(x_val, y_val), seed=0)
    assert [row["step"] for row in result.history if "val_loss" in row] == [3, 6, 9]


def test_callbacks_are_called_and_can_stop_early():
    x, y = regression(64)
    recorder = Recorder(stop_at=5)
    result = fit(small_net(), x, y, steps=50, batch_size=16, log_every=2, seed=0, callbacks=[recorder])
    assert recorder.started == 1 and recorder.ended == 1
    assert recorder.steps == [1, 2, 3, 4, 5]
    assert result.steps == 5
    assert result.stop_reason == "callback"
    assert result.logged_steps == [2, 4]
    assert recorder.history is result
    assert all(math.isfinite(loss) for loss in recorder.losses)


class IndexRecorder(PyroModule):
    """Wraps a VDN; its guide records which rows (an id column of x) each step sees."""

    def __init__(self, n):
        super().__init__()
        self.net = VDN(D, 1, units=(4,), hidden=(8,))
        self.seen, self.num_data = [], []

    def model(self, x, y, num_data=None):
        return self.net.model(x, y, num_data=num_data)

    def guide(self, x, y, num_data=None):
        self.seen.append(x[:, 0].long().tolist())
        self.num_data.append(num_data)
        return self.net.guide(x, y, num_data=num_data)


@pytest.mark.parametrize(
    "n, batch_size", [(10, 4), (12, 4), (7, 7), (5, 64)], ids=["ragged", "even", "one-batch", "clipped"]
)
def test_every_row_once_per_epoch(n, batch_size):
    epochs = 3
    x = torch.randn(n, D)
    x[:, 0] = torch.arange(n, dtype=x.dtype)  # the id column
    y = torch.randn(n, 1)
    wrapper = IndexRecorder(n)
    recorder = Recorder()
    result = fit(wrapper, x, y, epochs=epochs, batch_size=batch_size, seed=0, callbacks=[recorder])
    per_epoch = math.ceil(n / min(batch_size, n))
    assert result.steps == len(wrapper.seen) == epochs * per_epoch
    assert set(wrapper.num_data) == {n}
    assert recorder.epochs == [e for e in range(epochs) for _ in range(per_epoch)]
    orders = []
    for e in range(epochs):
        rows = [i for batch in wrapper.seen[e * per_epoch : (e + 1) * per_epoch] for i in batch]
        assert sorted(rows) == list(range(n)), rows
        orders.append(rows)
    if n >= 10:  # reshuffled every epoch
        assert orders[0] != orders[1] or orders[1] != orders[2]


def test_steps_cross_epoch_boundaries():
    x, y = regression(10)
    recorder = Recorder()
    fit(small_net(), x, y, steps=7, batch_size=4, seed=0, callbacks=[recorder])
    assert recorder.epochs == [0, 0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(steps=0), r"Expected steps to be an int >= 1, but got 0"),
        (dict(epochs=-1), r"Expected epochs to be an int >= 1, but got -1"),
        (dict(steps=2, batch_size=0), r"Expected batch_size to be an int >= 1, but got 0"),
        (dict(steps=2, lr=0.0), r"Expected lr > 0, but got 0.0"),
        (dict(steps=2, optim="sgd"), r"Expected optim in .* or a callable, got 'sgd'"),
        (dict(), r"exactly one of steps or epochs; got steps=None, epochs=None"),
    ],
    ids=["steps", "epochs", "batch-size", "lr", "optim", "neither"],
)
def test_fit_rejects_bad_options(options, match):
    x, y = regression(10)
    with pytest.raises(ValueError, match=match):
        fit(small_net(), x, y, **options)


def test_custom_optimizer_factory():
    x, y = regression(32)
    made = []

    def factory(params):
        made.append(torch.optim.SGD(params, lr=1e-3))
        return made[-1]

    net = small_net()
    before = [p.detach().clone() for p in net.parameters()]
    fit(net, x, y, steps=2, batch_size=16, optim=factory, seed=0)
    assert len(made) == 1
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


# ----------------------------------------------------------------------------- any network
class UserNet(PyroModule):
    """A user's Pyro model with two Neurons layers and no model/guide methods: fit uses the
    module as the model and NeuronGuide(module) as the guide."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU())
        self.first = Neurons(16, 6, beta=0.2)
        self.second = Neurons(6, 4, beta=torch.linspace(0.1, 0.4, 4))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x, y=None, num_data=None):
        with data_plate(x.shape[0], num_data):
            z = self.second(self.first(self.enc(x)))  # (B, 6) -> (B, 4)
            loc = self.head(z).unsqueeze(-2)  # (B, 1, 1): observations at dim -2
            obs = None if y is None else y.unsqueeze(-2)  # (B, 1, 1)
            return pyro.sample("obs", dist.Normal(loc, 0.5).to_event(1), obs=obs)


@pytest.mark.parametrize("local_params", [False, True], ids=["default-settings", "module-local-params"])
def test_fit_trains_a_user_model_without_model_or_guide(local_params, request):
    if local_params:
        request.getfixturevalue("module_local_params")
    x, y = regression(128)
    net = UserNet()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    result = fit(net, x, y, steps=60, batch_size=32, lr=2e-2, log_every=5, seed=0)
    unmoved = [name for name, p in net.named_parameters() if torch.equal(p, before[name])]
    assert unmoved == []
    assert result.history[-1]["loss_per_obs"] < result.history[0]["loss_per_obs"] - 1.0
    assert set(result.unit_kl) == set(result.unit_beta) == {"first.z", "second.z"}
    assert result.unit_kl["first.z"].shape == (12, 6) and result.unit_kl["second.z"].shape == (12, 4)
    assert np.allclose(result.unit_beta["second.z"], net.second.beta.numpy()[None])
    assert evaluate_loss(net, x, y) < result.history[0]["loss_per_obs"] - 1.0
    assert len(pyro.get_param_store()) == 0


def test_fit_refuses_what_it_cannot_train():
    x, y = regression(10)

    class HalfPair(PyroModule):
        def model(self, x, y, num_data=None):
            pass

    with pytest.raises(TypeError, match=r"both a model and a guide, or neither, but HalfPair has no guide"):
        fit(HalfPair(), x, y, steps=1)
    with pytest.raises(TypeError, match=r"Expected network to be a torch.nn.Module .* but got function"):
        fit(lambda x, y: None, x, y, steps=1)
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match=r"Expected seed to be None or an int in \[0, 2\*\*32\)"):
            fit(small_net(), x, y, steps=1, seed=bad)


def test_fit_and_evaluate_loss_leave_the_param_store_empty_and_networks_apart():
    """Under Pyro's default settings a PyroModule registers its parameters in the global store;
    fit and evaluate_loss run inside module_params, so the store stays empty and two networks of
    one architecture (hence identical parameter names) never share a tensor."""
    assert not pyro.settings.get("module_local_params")
    x, y = regression(64)
    first, second = small_net(), small_net()
    fit(first, x, y, steps=5, batch_size=16, seed=0)
    assert len(pyro.get_param_store()) == 0
    trained_first = {name: p.detach().clone() for name, p in first.named_parameters()}
    before_second = {name: p.detach().clone() for name, p in second.named_parameters()}
    fit(second, x, y, steps=5, batch_size=16, seed=1)
    evaluate_loss(second, x, y)
    assert len(pyro.get_param_store()) == 0
    for name, p in first.named_parameters():  # fitting the second left the first alone
        assert torch.equal(p, trained_first[name]), name
    assert all(not torch.equal(p, before_second[name]) for name, p in second.named_parameters())
    assert not {p.data_ptr() for p in first.parameters()} & {p.data_ptr() for p in second.parameters()}


def _global_rng_state():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002


@pytest.mark.parametrize("seed", [None, 7], ids=["no-seed", "seed"])
def test_fit_leaves_the_global_random_state_as_it_was(seed):
    """fit draws from a private random state: the caller's torch, numpy and Python states are the
    same after the fit as before (the old fit reseeded torch with torch.seed() when seed=None)."""
    x, y = regression(40)
    net = small_net()
    x_val, y_val = regression(10, seed=9)
    torch.manual_seed(123)
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    before = _global_rng_state()
    result = fit(net, x, y, steps=4, batch_size=16, val_data=(x_val, y_val), val_every=2, seed=seed)
    after = _global_rng_state()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert isinstance(result.seed, int) and (seed is None or result.seed == seed)


def test_a_run_without_seed_reports_the_seed_that_repeats_it():
    x, y = regression(48)

    def run(seed):
        pyro.set_rng_seed(3)  # identical initialisation
        net = small_net()
        return net, fit(net, x, y, steps=6, batch_size=16, seed=seed)

    first, r1 = run(None)
    other, r2 = run(None)
    again, r3 = run(r1.seed)
    assert r1.seed != r2.seed  # fresh entropy each time (a clash has probability 2**-31)
    assert r3.seed == r1.seed and r3.history == r1.history
    for p, q in zip(first.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, o) for p, o in zip(first.parameters(), other.parameters()))


def test_a_callback_can_give_the_progress_bar_its_living_fraction(capsys, tmp_path):
    """``state.living`` set by a callback (e.g. from a per-unit table) replaces the bar's own
    count; set in ``on_fit_end``, it is the bar's last word. Without one, the bar shows the
    step's own count, the logs' ``living``."""
    x, y = regression(32)

    class Table:
        def on_step_end(self, state):
            state.living = 0.25

        def on_fit_end(self, state):
            state.living = 0.375

    pyro.set_rng_seed(0)
    fit(small_net(), x, y, steps=4, batch_size=8, seed=0, callbacks=[Table()], progress=True)
    assert capsys.readouterr().err.rstrip().endswith("living=38%]")
    pyro.set_rng_seed(0)
    fit(small_net(), x, y, steps=4, batch_size=8, seed=0, progress=True, log_dir=tmp_path, log_every=1)
    shown = re.findall(r"living=(\d+)%", capsys.readouterr().err)[-1]
    last = (tmp_path / "log.csv").read_text().splitlines()[-1].split(",")
    assert int(shown) == round(100 * float(last[LOG_COLUMNS.index("living")]))

"""Tests for the long-run machinery of :func:`vdn_pyro.inference.fit`: exact resume, kills and
signals, the NaN/inf guard, the progress bar and the CSV/JSON-lines logs."""

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyro
import pytest
import torch

from tests.common import ROOT
from vdn_pyro import VDN, FitResult, LocalELBO, fit
from vdn_pyro.inference import (
    LOG_COLUMNS,
    IncompatibleCheckpointError,
    KLBand,
    LocBand,
    NonFiniteError,
    ScaleGuard,
    load_checkpoint,
)

D = 3
WEIGHT = torch.tensor([[1.5], [-2.0], [0.5]])


def regression(n, seed=123):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    return x, x @ WEIGHT + 0.1 * torch.randn(n, 1, generator=gen)


def small_net(init_seed=0, **options):
    pyro.set_rng_seed(init_seed)
    return VDN(D, 1, **{"units": (6, 4), "hidden": (8,), "beta": 0.2, **options})


class Thermostat:
    """A toy constraint with its own state: nudges each layer's beta toward a KL target."""

    def __init__(self, target=0.5, rate=0.05):
        self.target, self.rate, self.updates = target, rate, 0

    def on_fit_start(self, state):
        self.updates = 0  # a real constraint might reset here; the checkpoint must win

    def on_step_end(self, state):
        for layer in state.network.layers:
            kl = state.stats[layer.site].kl
            layer.beta.mul_(torch.exp(self.rate * torch.sign(kl - self.target)))
        self.updates += 1

    def state_dict(self):
        return {"updates": self.updates, "target": self.target}

    def load_state_dict(self, state):
        self.updates, self.target = state["updates"], state["target"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- exact resume
def constraint_set():
    """A toy constraint whose on_fit_start resets it, and library ones with state (KLBand) and
    with side effects on the network at start (ScaleGuard, LocBand projection)."""
    return [
        Thermostat(),
        KLBand(low=0.05, high=0.3, rate=0.1),
        ScaleGuard(min=0.2, max=2.0),
        LocBand(project=True),
    ]


def assert_same(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    else:
        assert a == b, path


def test_resume_is_bit_identical_to_a_straight_run(tmp_path):
    x, y = regression(50)  # batches of 16: 4 per epoch, the last of 2 rows
    val = regression(20, seed=9)
    common = dict(
        batch_size=16,
        lr=2e-2,
        val_data=val,
        val_every=3,
        log_every=2,
        seed=11,
        progress=False,
        elbo=LocalELBO(num_particles=2),
    )
    straight_net, straight_c = small_net(), constraint_set()
    straight = fit(straight_net, x, y, steps=14, constraints=straight_c, **common)

    run_dir = tmp_path / "run"
    first = fit(
        small_net(),
        x,
        y,
        steps=7,
        constraints=constraint_set(),
        checkpoint_dir=run_dir,
        log_dir=run_dir,
        **common,
    )
    assert first.checkpoint_path == str(run_dir / "last.pt") and first.steps == 7
    saved = load_checkpoint(run_dir)
    assert saved["step"] == 7 and saved["epoch"] == 1 and saved["cursor"] == 48  # mid-epoch

    resumed_net, resumed_c = small_net(init_seed=99), constraint_set()  # different initial weights
    common["seed"] = 12345  # a resumed run takes its random state from the checkpoint
    resumed = fit(
        resumed_net,
        x,
        y,
        steps=14,
        constraints=resumed_c,
        checkpoint_dir=run_dir,
        log_dir=run_dir,
        resume=True,
        **common,
    )
    assert resumed.resumed_from == 7 and resumed.steps == 14
    assert_same(resumed_net.state_dict(), straight_net.state_dict(), "network")
    assert_same(resumed.optimizer_state["state"], straight.optimizer_state["state"], "optimizer")
    for a, b in zip(resumed_c, straight_c):
        assert_same(a.state_dict(), b.state_dict(), type(a).__name__)
    assert resumed_c[0].updates == 14
    # the histories agree row for row, apart from the extra row the first run logged at its end
    assert [r for r in resumed.history if r["step"] != 7] == straight.history
    assert resumed.best_val_loss == straight.best_val_loss and resumed.best_step == straight.best_step
    keep = [i for i, step in enumerate(resumed.logged_steps) if step != 7]
    for site, kl in straight.unit_kl.items():
        assert (resumed.unit_kl[site][keep] == kl).all()
    # the logs hold every logged step once, in order
    steps = [int(r["step"]) for r in read_csv(run_dir / "log.csv")]
    assert steps == [2, 4, 6, 7, 8, 10, 12, 14]
    assert [r["step"] for r in read_jsonl(run_dir / "log.jsonl")] == steps


def test_resume_with_the_same_arguments_finishes_the_run(tmp_path):
    x, y = regression(30)
    fit(small_net(), x, y, epochs=1, batch_size=8, seed=0, progress=False, checkpoint_dir=tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 4
    done = fit(
        small_net(),
        x,
        y,
        epochs=3,
        batch_size=8,
        seed=0,
        progress=False,
        checkpoint_dir=tmp_path,
        resume="auto",
    )
    assert done.resumed_from == 4 and done.steps == 12
    again = fit(
        small_net(), x, y, epochs=3, batch_size=8, progress=False, checkpoint_dir=tmp_path, resume=True
    )
    assert again.steps == 12 and again.resumed_from == 12 and again.history == done.history


def test_resume_auto_without_checkpoint_starts_afresh(tmp_path):
    x, y = regression(20)
    result = fit(
        small_net(), x, y, steps=2, batch_size=10, progress=False, checkpoint_dir=tmp_path, resume="auto"
    )
    assert result.resumed_from == 0 and result.steps == 2 and (tmp_path / "last.pt").is_file()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(batch_size=5), IncompatibleCheckpointError, r"N=20 rows in batches of 10, .*batch_size=5"),
        (dict(n=24), IncompatibleCheckpointError, r"N=20 rows .* but this fit has N=24"),
        (dict(steps=2), ValueError, r"is at step 4, beyond the 2 steps asked for"),
        (dict(units=(5, 4)), IncompatibleCheckpointError, r"config.units: checkpoint \[6, 4\], network"),
        (dict(optim="adamw"), IncompatibleCheckpointError, r"holds the state of a torch.optim.adam.Adam "),
        (dict(constraints=[Thermostat()]), IncompatibleCheckpointError, r"written with constraints \[\]"),
    ],
    ids=["batch-size", "data-size", "steps", "architecture", "optimizer", "constraints"],
)
def test_resume_refuses_what_cannot_continue_exactly(tmp_path, change, error, match):
    x, y = regression(20)
    fit(small_net(), x, y, steps=4, batch_size=10, progress=False, checkpoint_dir=tmp_path)
    change = dict(change)
    n, units = change.pop("n", 20), change.pop("units", (6, 4))
    x, y = regression(n)
    options = {**dict(steps=8, batch_size=10, progress=False, checkpoint_dir=tmp_path, resume=True), **change}
    with pytest.raises(error, match=match):
        fit(small_net(units=units), x, y, **options)


def test_resume_true_without_checkpoint_says_what_to_do(tmp_path):
    x, y = regression(20)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*last.pt. Use resume='auto'"):
        fit(small_net(), x, y, steps=2, progress=False, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"checkpoint_dir is None"):
        fit(small_net(), x, y, steps=2, progress=False, resume=True)


# ----------------------------------------------------------------------------- NaN / inf guard
class PoisonedELBO(LocalELBO):
    """Returns a NaN loss on the given (1-based) calls."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.calls = set(bad_calls), 0

    def loss_and_stats(self, model, guide, *args, **kwargs):
        self.calls += 1
        loss, stats = super().loss_and_stats(model, guide, *args, **kwargs)
        return (loss * math.nan if self.calls in self.bad_calls else loss), stats


def all_finite(state):
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_nan_loss_steps_are_skipped_and_never_checkpointed(tmp_path):
    x, y = regression(24)
    net = small_net()
    written = []

    class Spy:  # records every checkpoint on disk after each step
        def on_step_end(self, state):
            if (tmp_path / "last.pt").exists():
                written.append(load_checkpoint(tmp_path))

    with pytest.warns(RuntimeWarning, match=r"Step [34]: the loss is nan; skipped the update"):
        result = fit(
            net,
            x,
            y,
            steps=8,
            batch_size=8,
            seed=0,
            elbo=PoisonedELBO({3, 4}),
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
            callbacks=[Spy()],
            log_every=1,
            log_dir=tmp_path,
        )
    assert result.skipped_steps == [3, 4] and result.steps == 8
    assert [r["step"] for r in result.history] == [1, 2, 5, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert all_finite(net.state_dict())
    assert written and all(all_finite(c["network"]) for c in written)
    final = load_checkpoint(tmp_path)
    assert final["step"] == 8 and final["history"]["skipped_steps"] == [3, 4]
    assert [int(r["skipped"]) for r in read_csv(tmp_path / "log.csv")] == [0, 0, 2, 2, 2, 2]


def test_persistent_nan_stops_with_a_clear_error_and_a_finite_checkpoint(tmp_path):
    x, y = regression(24)
    net = small_net()
    with pytest.warns(RuntimeWarning):
        with pytest.raises(NonFiniteError, match=r"3 steps in a row \(4 to 6\) were not finite") as info:
            fit(
                net,
                x,
                y,
                steps=20,
                batch_size=8,
                elbo=PoisonedELBO(range(4, 100)),
                max_bad_steps=3,
                progress=False,
                checkpoint_dir=tmp_path,
                checkpoint_every=1,
            )
    assert "last checkpoint is" in str(info.value) and "Try a smaller lr" in str(info.value)
    saved = load_checkpoint(tmp_path)
    assert saved["step"] == 5 and all_finite(saved["network"]) and all_finite(net.state_dict())


def test_non_finite_gradient_is_skipped():
    x, y = regression(16)
    net = small_net()
    calls = []

    def poison_third_backward(grad):
        calls.append(1)
        return grad * math.inf if len(calls) == 3 else grad

    net.head.weight.register_hook(poison_third_backward)
    seen = []

    class Spy:
        def on_step_end(self, state):
            seen.append(state.step)

    with pytest.warns(RuntimeWarning, match=r"Step 3: the gradient of 'head.weight' holds NaN or inf"):
        result = fit(net, x, y, steps=5, batch_size=8, callbacks=[Spy()], progress=False)
    assert result.skipped_steps == [3] and result.steps == 5
    assert seen == [1, 2, 4, 5]  # no callbacks on a skipped step
    assert all_finite(net.state_dict())


# ----------------------------------------------------------------------------- progress and logs
def test_progress_bar_does_not_change_the_logs(tmp_path, capsys):
    x, y = regression(40)
    val = regression(10, seed=5)
    logs = {}
    for progress in (True, False):
        log_dir = tmp_path / str(progress)
        fit(
            small_net(),
            x,
            y,
            steps=6,
            batch_size=16,
            log_every=2,
            val_data=val,
            seed=3,
            progress=progress,
            log_dir=log_dir,
        )
        err = capsys.readouterr().err
        if progress:
            assert "loss=" in err and "elbo/obs=" in err and "living=" in err and "6/6" in err
        else:
            assert err == ""
        csv_rows = read_csv(log_dir / "log.csv")
        json_rows = read_jsonl(log_dir / "log.jsonl")
        for row in csv_rows + json_rows:
            row.pop("seconds")
        logs[progress] = (csv_rows, json_rows)
    assert logs[True] == logs[False]
    csv_rows, json_rows = logs[True]
    assert list(csv_rows[0]) == [c for c in LOG_COLUMNS if c != "seconds"]
    assert [r["step"] for r in json_rows] == [2, 4, 6]
    assert json_rows[0]["val_loss"] is None and json_rows[-1]["val_loss"] is not None  # epoch of 3 steps
    assert set(json_rows[0]["kl"]) == {"layers.0.z", "layers.1.z"}
    assert len(json_rows[0]["kl"]["layers.0.z"]) == len(json_rows[0]["beta"]["layers.0.z"]) == 6
    for row in json_rows:
        assert 0 <= row["living"] <= 1
        assert row["elbo_per_obs"] == -row["loss_per_obs"]


class RaiseSignal:
    """A callback that delivers signals to this process at a given step."""

    def __init__(self, step, signals):
        self.step, self.signals = step, signals

    def on_step_end(self, state):
        if state.step == self.step:
            for sig in self.signals:
                signal.raise_signal(sig)


@pytest.fixture(params=["handler", "SIG_IGN"])
def previous_sigint(request):
    """Give SIGINT a known disposition for the test (a handler of the test's own, or SIG_IGN as a
    background job inherits it), whatever the disposition pytest was started with; restored
    after the test."""
    calls = []
    previous = {"handler": lambda signum, frame: calls.append(signum), "SIG_IGN": signal.SIG_IGN}
    inherited = signal.signal(signal.SIGINT, previous[request.param])
    yield signal.getsignal(signal.SIGINT), calls
    signal.signal(signal.SIGINT, inherited)


def test_signal_stops_after_the_step_with_a_checkpoint_and_restores_handlers(tmp_path, caplog):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    x, y = regression(40)
    result = fit(
        small_net(),
        x,
        y,
        steps=50,
        batch_size=8,
        progress=False,
        checkpoint_dir=tmp_path,
        callbacks=[RaiseSignal(3, [signal.SIGTERM])],
        handle_signals=True,
    )
    assert result.interrupted and result.stop_reason == "SIGTERM" and result.exit_code == 143
    assert result.steps == 3 and load_checkpoint(tmp_path)["step"] == 3
    assert "fit interrupted by SIGTERM after step 3 of 50; checkpoint written to" in caplog.text
    assert {sig: signal.getsignal(sig) for sig in before} == before
    resumed = FitResult.from_checkpoint(tmp_path)
    assert resumed.stop_reason == "SIGTERM" and resumed.interrupted and resumed.steps == 3


def test_second_signal_stops_at_once_without_a_checkpoint(tmp_path, previous_sigint):
    """Asked to, fit catches SIGINT over any previous disposition (also SIG_IGN) and restores
    that disposition on the way out, also when a second signal aborts it."""
    before, calls = previous_sigint
    x, y = regression(40)
    with pytest.raises(KeyboardInterrupt, match="second signal"):
        fit(
            small_net(),
            x,
            y,
            steps=50,
            batch_size=8,
            progress=False,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            callbacks=[RaiseSignal(3, [signal.SIGINT, signal.SIGINT])],
            handle_signals=True,
        )
    assert load_checkpoint(tmp_path)["step"] == 2  # the last periodic one
    assert signal.getsignal(signal.SIGINT) is before and calls == []


def test_fit_leaves_signal_handlers_alone_by_default(previous_sigint):
    """A library call: without handle_signals, the program's own disposition gets the signal."""
    before, calls = previous_sigint
    x, y = regression(40)
    seen = []

    class Spy:
        def on_fit_start(self, state):
            seen.append(signal.getsignal(signal.SIGINT))

    result = fit(
        small_net(),
        x,
        y,
        steps=6,
        batch_size=8,
        progress=False,
        callbacks=[Spy(), RaiseSignal(3, [signal.SIGINT])],
    )
    assert seen == [before] and signal.getsignal(signal.SIGINT) is before
    assert result.steps == 6 and not result.interrupted and result.stop_reason == "completed"
    assert calls == ([signal.SIGINT] if before is not signal.SIG_IGN else [])


def test_fit_in_a_worker_thread_leaves_signals_alone():
    x, y = regression(10)
    outcome, net = {}, small_net()
    before = signal.getsignal(signal.SIGINT)

    def run():
        outcome.update(r=fit(net, x, y, steps=2, progress=False, handle_signals=True))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    assert outcome["r"].steps == 2 and not outcome["r"].interrupted
    assert signal.getsignal(signal.SIGINT) is before


def test_from_checkpoint_restores_the_history_of_a_run(tmp_path):
    x, y = regression(30)
    net = small_net()
    done = fit(
        net,
        x,
        y,
        steps=6,
        batch_size=10,
        log_every=2,
        progress=False,
        checkpoint_dir=tmp_path,
        checkpoint_every=4,
        val_data=regression(10, seed=3),
    )
    loaded = FitResult.from_checkpoint(tmp_path, network=net)
    assert loaded.network is net and loaded.stop_reason == "completed" and not loaded.interrupted
    assert loaded.history == done.history and loaded.logged_steps == done.logged_steps == [2, 4, 6]
    assert loaded.steps == 6 and loaded.best_step == done.best_step and loaded.seed == done.seed
    assert isinstance(done.seed, int)  # drawn afresh, since the fit had no seed
    for site in done.unit_kl:
        assert (loaded.unit_kl[site] == done.unit_kl[site]).all()
        assert (loaded.unit_beta[site] == done.unit_beta[site]).all()


# ----------------------------------------------------------------------------- other processes
SCRIPT = """
import json, sys
import pyro, torch
from vdn_pyro import VDN, fit


def make():
    pyro.set_rng_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=gen)
    y = x.sum(-1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=gen)
    return VDN(3, 1, units=(8,), hidden=(16,), beta=0.3), x, y


if __name__ == "__main__":
    run_dir, every = sys.argv[1], int(sys.argv[2])
    net, x, y = make()
    result = fit(net, x, y, steps=10**6, batch_size=16, seed=0, progress=False, log_every=1,
                 log_dir=run_dir, checkpoint_dir=run_dir, checkpoint_every=every, handle_signals=True)
    print(json.dumps({"steps": result.steps, "reason": result.stop_reason}), flush=True)
    sys.exit(result.exit_code)
"""


def start_run(tmp_path, checkpoint_every):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(checkpoint_every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    spec = importlib.util.spec_from_file_location("train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return proc, run_dir, module.make


def wait_for_rows(proc, run_dir, rows, timeout=120):
    """Wait until the run has logged ``rows`` steps (so its signal handlers are installed)."""
    log = Path(run_dir) / "log.csv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training process exited early:\n{proc.stderr.read()}")
        if log.exists() and len(read_csv(log)) >= rows:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training process did not start in time")


def test_sigkill_mid_run_leaves_a_whole_checkpoint_to_resume_from(tmp_path):
    proc, run_dir, make = start_run(tmp_path, checkpoint_every=1)
    try:
        wait_for_rows(proc, run_dir, rows=5)
        time.sleep(0.3)  # checkpoints are written every step: the kill lands anywhere
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(run_dir)  # never partial: readable and complete
    step = saved["step"]
    assert step >= 5 and saved["history"]["logged_steps"][-1] == step and saved["stop_reason"] == "running"
    leftovers = [p.name for p in run_dir.iterdir() if p.name not in ("last.pt", "log.csv", "log.jsonl")]
    assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in leftovers), leftovers

    net, x, y = make()
    result = fit(
        net,
        x,
        y,
        steps=step + 3,
        batch_size=16,
        progress=False,
        log_every=1,
        log_dir=run_dir,
        checkpoint_dir=run_dir,
        checkpoint_every=1,
        resume=True,
    )
    assert result.resumed_from == step and result.steps == step + 3
    assert load_checkpoint(run_dir)["step"] == step + 3
    logged = [int(r["step"]) for r in read_csv(run_dir / "log.csv")]
    assert logged == list(range(1, step + 4))  # rows after the checkpoint were dropped, then rewritten


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_writes_a_final_checkpoint_and_exits_with_its_code(tmp_path, sig, code):
    proc, run_dir, make = start_run(tmp_path, checkpoint_every=10**6)  # no periodic checkpoint
    try:
        wait_for_rows(proc, run_dir, rows=3)
        assert not (run_dir / "last.pt").exists()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    report = json.loads(out.strip().splitlines()[-1])
    name = signal.Signals(sig).name
    assert report["reason"] == name
    assert f"fit interrupted by {name} after step {report['steps']}" in err
    assert "resume=True" in err and "Traceback" not in err
    saved = load_checkpoint(run_dir)
    assert saved["step"] == report["steps"] and saved["stop_reason"] == name
    net, x, y = make()
    result = fit(
        net,
        x,
        y,
        steps=report["steps"] + 1,
        batch_size=16,
        progress=False,
        checkpoint_dir=run_dir,
        resume=True,
    )
    assert result.steps == report["steps"] + 1 and not result.interrupted and result.exit_code == 0


def test_a_fit_with_no_finite_step_raises_instead_of_completing(tmp_path):
    """Fewer non-finite steps than max_bad_steps, but all of them: the parameters are the ones
    the fit started with, so it must not report a completed run."""
    x, y = regression(24)
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(RuntimeWarning):
        with pytest.raises(NonFiniteError, match=r"every step of the fit \(1 to 5\)") as info:
            fit(
                net,
                x,
                y,
                steps=5,
                batch_size=8,
                elbo=PoisonedELBO(range(1, 100)),
                max_bad_steps=10,
                progress=False,
            )
    assert (info.value.first, info.value.last) == (1, 5) and "the loss is nan" in info.value.problem
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_resumed_part_with_no_finite_step_raises(tmp_path):
    x, y = regression(24)
    net = small_net()
    fit(net, x, y, steps=3, batch_size=8, progress=False, checkpoint_dir=tmp_path)
    with pytest.warns(RuntimeWarning):
        with pytest.raises(NonFiniteError, match=r"every step of the fit \(4 to 6\)") as info:
            fit(
                small_net(),
                x,
                y,
                steps=6,
                batch_size=8,
                elbo=PoisonedELBO(range(1, 100)),
                progress=False,
                checkpoint_dir=tmp_path,
                resume=True,
            )
    assert info.value.checkpoint is None  # none written in the resumed part
    assert load_checkpoint(tmp_path)["step"] == 3  # the last good one is kept


def test_a_refused_resume_has_no_side_effect(tmp_path):
    """Every check of a resume runs before any callback: a refused one calls no on_fit_start and
    leaves the logs and the checkpoint as they were."""
    x, y = regression(24)
    fit(small_net(), x, y, steps=4, batch_size=8, progress=False, checkpoint_dir=tmp_path, log_dir=tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    calls = []

    class Spy:
        def on_fit_start(self, state):
            calls.append(state.step)

    with pytest.raises(IncompatibleCheckpointError, match="constraints"):
        fit(
            small_net(),
            x,
            y,
            steps=8,
            batch_size=8,
            progress=False,
            checkpoint_dir=tmp_path,
            log_dir=tmp_path,
            resume=True,
            constraints=[KLBand(0.05, 0.3)],
            callbacks=[Spy()],
        )
    assert calls == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == files

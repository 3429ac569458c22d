"""The ``vdn`` command, end to end with the ``quick`` preset: fit, evaluate, report, resume,
interruption, and one-line errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from vdn_pyro.cli import _RunMonitor, main
from vdn_pyro.inference import load_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_EXTRAS = ["--set", "output.plots=false", "--set", "output.idata=false"]
RUN_FILES = [
    "config.yaml",
    "run.json",
    "checkpoints/last.pt",
    "log.csv",
    "log.jsonl",
    "monitor.csv",
    "units.csv",
    "layers.csv",
    "metrics_test.json",
    "metrics_test.csv",
    "idata.nc",
    "arviz_summary.csv",
    "plots/dashboard.png",
    "plots/fan_chart.png",
    "plots/forest.png",
]
PLOTS = ["plots/dashboard.png", "plots/fan_chart.png", "plots/forest.png"]


def vdn_command():
    """The installed ``vdn`` script of this interpreter, else ``python -m vdn_pyro.cli``."""
    script = Path(sys.executable).with_name("vdn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vdn_pyro.cli"]


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path} is not a non-empty PNG"


def assert_one_line_error(stderr, *fragments):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One complete quick run, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["fit", "--preset", "quick", "--run-dir", str(run), "--quiet"]) == 0
    return run


def test_fit_writes_a_complete_run_directory(quick_run):
    for name in RUN_FILES:
        assert (quick_run / name).is_file(), f"missing {name}"
    for name in PLOTS:
        assert_png(quick_run / name)
    info = json.loads((quick_run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == info["total_steps"] == 6
    log = pd.read_csv(quick_run / "log.csv")
    assert log.step.tolist() == [2, 4, 6]
    units = pd.read_csv(quick_run / "units.csv")
    assert len(units) == 4 and {"kl", "loc_sq", "scale", "status"} <= set(units.columns)
    summary = pd.read_csv(quick_run / "arviz_summary.csv", index_col=0)
    assert len(summary) == 4 * 4  # idata_obs windows x units
    assert {"mean", "sd", "hdi_3%", "hdi_97%"} <= set(summary.columns)


def test_evaluate_prints_and_writes_metrics(quick_run, capsys):
    assert main(["evaluate", str(quick_run), "--num-samples", "10"]) == 0
    out = capsys.readouterr().out
    assert "vdn" in out and "repeat_last" in out and "crps" in out
    metrics = json.loads((quick_run / "metrics_test.json").read_text())
    assert set(metrics["models"]) == {"vdn", "repeat_last"}
    for name in ("mse", "mae", "crps", "nll", "coverage_50", "coverage_90"):
        assert name in metrics["models"]["vdn"]


def test_report_regenerates_tables_and_plots(quick_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(quick_run, run)
    for name in ["units.csv", "layers.csv", "arviz_summary.csv", "idata.nc", *PLOTS]:
        (run / name).unlink()
    assert main(["report", str(run)]) == 0
    for name in ["units.csv", "layers.csv", "arviz_summary.csv", "idata.nc"]:
        assert (run / name).stat().st_size > 0
    for name in PLOTS:
        assert_png(run / name)


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["fit", "--preset", "quick", "--run-dir", str(straight), "--quiet", *NO_EXTRAS]) == 0
    assert (
        main(
            [
                "fit",
                "--preset",
                "quick",
                "--run-dir",
                str(split),
                "--quiet",
                "--set",
                "fit.steps=4",
                *NO_EXTRAS,
            ]
        )
        == 0
    )
    assert main(["fit", "--resume", str(split), "--quiet", "--set", "fit.steps=6"]) == 0
    info = json.loads((split / "run.json").read_text())
    assert info["resumed_from"] == 4 and info["steps"] == 6 and info["status"] == "completed"
    assert pd.read_csv(split / "log.csv").step.tolist() == [2, 4, 6]  # no step logged twice
    steps = pd.read_csv(split / "monitor.csv").step.unique().tolist()  # one table per recorded step
    assert steps[0] == 0 and steps[-1] == 6 and steps == sorted(steps)
    assert set(pd.read_csv(straight / "monitor.csv").step) <= set(steps)
    a = load_checkpoint(straight / "checkpoints")["network"]
    b = load_checkpoint(split / "checkpoints")["network"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


#: The recipe of the ``ett`` preset on the quick run: closed-form skip path, CRPS selection.
METRIC_SELECTION = [
    "--set",
    "fit.select=crps",
    "--set",
    "fit.skip_fit=ridge",
    "--set",
    "fit.val_every=2",
    "--set",
    "fit.val_samples=4",
    "--set",
    "neurons.mean=skip",
    "--set",
    "neurons.likelihood_scale=heteroscedastic",
]


def test_metric_selection_resumes_exactly_and_evaluates_the_selected_state(tmp_path, capsys):
    """With the benchmark's recipe (ridge skip path, CRPS selection), a resumed run ends in the
    state of the uninterrupted one, selects the same step, and ``vdn evaluate`` of the run
    directory scores the selected state, as ``vdn fit`` did."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--quiet", *METRIC_SELECTION, *NO_EXTRAS]
    assert main(["fit", "--preset", "quick", "--run-dir", str(straight), *common]) == 0
    assert capsys.readouterr().out.splitlines() == [f"run directory: {straight}"]  # --quiet: no summary
    assert main(["fit", "--preset", "quick", "--run-dir", str(split), *common, "--set", "fit.steps=4"]) == 0
    assert main(["fit", "--resume", str(split), "--quiet", "--set", "fit.steps=6"]) == 0
    a, b = load_checkpoint(straight / "checkpoints"), load_checkpoint(split / "checkpoints")
    assert a["history"]["best_step"] == b["history"]["best_step"] >= 0
    assert a["history"]["best_val_loss"] == b["history"]["best_val_loss"]
    for name in a["network"]:
        assert torch.equal(a["network"][name], b["network"][name]), f"{name} differs after resume"
        assert torch.equal(a["history"]["best_state"][name], b["history"]["best_state"][name]), name
    scores = [row.get("val_crps") for row in b["history"]["rows"]]
    assert all(score is not None for score in scores) and min(scores) >= b["history"]["best_val_loss"]
    info = json.loads((straight / "run.json").read_text())
    assert info["best_step"] == a["history"]["best_step"]
    fitted = json.loads((straight / "metrics_test.json").read_text())["models"]
    assert main(["evaluate", str(straight)]) == 0
    assert json.loads((straight / "metrics_test.json").read_text())["models"] == fitted


def test_deterministic_twin_run(tmp_path):
    run = tmp_path / "twin"
    argv = [
        "fit",
        "--preset",
        "quick",
        "--run-dir",
        str(run),
        "--quiet",
        "--set",
        "neurons.deterministic=true",
    ]
    assert main(argv) == 0
    metrics = json.loads((run / "metrics_test.json").read_text())
    assert set(metrics["models"]) == {"twin", "repeat_last"}
    assert_png(run / "plots" / "dashboard.png")
    assert_png(run / "plots" / "fan_chart.png")
    assert not (run / "units.csv").exists()  # a twin has no distributional units to diagnose


def _corrupt_checkpoint(run):
    path = run / "checkpoints" / "last.pt"
    path.write_bytes(path.read_bytes()[:200])


def _other_architecture(run):
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("units: 4", "units: 5"))


def _other_architecture_unrecorded(run):
    """An edited config.yaml in a run whose run.json has no record of the configuration (as
    written before the record): the checkpoint's fingerprint still refuses it."""
    _other_architecture(run)
    info = json.loads((run / "run.json").read_text())
    del info["config"]
    (run / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["fit", "--preset", "quick", "--set", "neurons.prior.order=two"],
            ["neurons.prior.order: expected int >= 1, got 'two'"],
        ),
        (["fit", "--preset", "quick", "--set", "neurons.unitz=3"], ["neurons.unitz: unknown key", "'units'"]),
        (["fit", "missing.yaml"], ["config file missing.yaml does not exist"]),
        (["fit", "--preset", "quik"], ["unknown preset 'quik'"]),
        (["fit", "--preset", "quick", "--set", "data.lookback=5000"], ["data:", "cannot be split"]),
        (
            ["fit", "--preset", "quick", "--set", "neurons.mean=skip"],
            ["neurons:", "likelihood_scale='heteroscedastic'"],
        ),
        (["evaluate", "no/such/run"], ["no run directory at no/such/run"]),
        (["report", "no/such/run"], ["no run directory at no/such/run"]),
        (["fit", "--resume", "no/such/run"], ["no run directory at no/such/run"]),
    ],
    ids=[
        "ill-typed",
        "unknown-key",
        "missing-file",
        "unknown-preset",
        "unsplittable-data",
        "mean-without-scale",
        "evaluate-missing",
        "report-missing",
        "resume-missing",
    ],
)
def test_errors_are_one_line_with_status_2(tmp_path, monkeypatch, capsys, argv, fragments):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize(
    "damage, command, fragments",
    [
        (_corrupt_checkpoint, "evaluate", ["truncated or corrupt"]),
        (
            _other_architecture,
            "report",
            ["was changed after the fit", "neurons.units: trained with 4, now 5"],
        ),
        (
            _other_architecture,
            "resume",
            ["was changed after the fit", "neurons.units: trained with 4, now 5"],
        ),
        (_other_architecture_unrecorded, "report", ["different network", "config.units"]),
        (_other_architecture_unrecorded, "resume", ["different network", "config.units"]),
        (None, "refit", ["is not empty", "--resume"]),
        (None, "resume-backwards", ["already at step 6"]),
    ],
    ids=[
        "corrupt-checkpoint",
        "edited-config",
        "edited-config-resume",
        "incompatible-checkpoint",
        "incompatible-resume",
        "run-dir-in-use",
        "resume-fewer-steps",
    ],
)
def test_bad_run_directories(quick_run, tmp_path, capsys, damage, command, fragments):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    if damage is not None:
        damage(run)
    argv = {
        "evaluate": ["evaluate", str(run)],
        "report": ["report", str(run)],
        "resume": ["fit", "--resume", str(run)],
        "refit": ["fit", "--preset", "quick", "--run-dir", str(run)],
        "resume-backwards": ["fit", "--resume", str(run), "--set", "fit.steps=3"],
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "--preset", "quick", "--set", "fit.lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.02" in out and "units: 4" in out


def test_new_user_from_a_fresh_directory(tmp_path):
    """``vdn fit --preset quick`` then ``vdn report`` as subprocesses, as a new user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    fit = subprocess.run(
        [*vdn_command(), "fit", "--preset", "quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert fit.returncode == 0, fit.stderr
    lines = [line for line in fit.stdout.splitlines() if line.startswith("run directory: ")]
    run = tmp_path / lines[-1].removeprefix("run directory: ")
    assert run.parent == tmp_path / "runs"  # runs/<timestamp>
    for name in PLOTS:
        (run / name).unlink()
    report = subprocess.run(
        [*vdn_command(), "report", str(run)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert report.returncode == 0, report.stderr
    for name in RUN_FILES:
        assert (run / name).is_file(), f"missing {name}"
    for name in PLOTS:
        assert_png(run / name)
    bad = subprocess.run(
        [*vdn_command(), "evaluate", "runs/nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "no run directory at runs/nope")


def test_interrupted_fit_writes_a_final_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    """SIGINT during training (delivered at step 3 by the unit monitor's hook, in this process):
    status 130, a final checkpoint at that step, and a resume command that works."""
    on_step_end = _RunMonitor.on_step_end

    def interrupt_at_step_3(self, state):
        on_step_end(self, state)
        if state.step == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(_RunMonitor, "on_step_end", interrupt_at_step_3)
    run = tmp_path / "run"
    assert main(["fit", "--preset", "quick", "--run-dir", str(run), "--quiet", *NO_EXTRAS]) == 130
    err = capsys.readouterr().err
    assert "vdn: interrupted by SIGINT at step 3" in err and f"vdn fit --resume {run}" in err
    checkpoint = load_checkpoint(run / "checkpoints")
    assert checkpoint["step"] == 3 and checkpoint["stop_reason"] == "SIGINT"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert not (run / "metrics_test.json").exists()  # no report for an unfinished run
    monkeypatch.undo()
    assert main(["fit", "--resume", str(run), "--quiet"]) == 0
    assert load_checkpoint(run / "checkpoints")["step"] == 6
    assert (run / "metrics_test.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_to_the_process_exits_130(tmp_path):
    """Ctrl-C as a user sends it: SIGINT to a running ``vdn fit`` process."""
    run = tmp_path / "run"
    argv = [
        *vdn_command(),
        "fit",
        "--preset",
        "quick",
        "--run-dir",
        str(run),
        "--quiet",
        "--set",
        "fit.steps=1000000",
        "--set",
        "fit.checkpoint_every=100000",
    ]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            log = run / "log.csv"
            if log.exists() and len(log.read_text().splitlines()) >= 3:  # header + 2 rows: training
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and f"vdn fit --resume {run}" in err
    assert "Traceback" not in err
    checkpoint = load_checkpoint(run / "checkpoints")
    assert checkpoint["stop_reason"] == "SIGINT" and 4 <= checkpoint["step"] < 1000000
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    step = checkpoint["step"]
    assert main(["fit", "--resume", str(run), "--quiet", "--set", f"fit.steps={step + 2}", *NO_EXTRAS]) == 0
    assert load_checkpoint(run / "checkpoints")["step"] == step + 2


def test_protocol_norm_and_path_scores_reach_fit_and_evaluate(tmp_path, capsys):
    """A CSV split by ``data.protocol`` (auto: long_horizon for a non-ETT series), trained under
    ``fit.norm``: ``vdn fit`` and ``vdn evaluate`` write the path scores of the normalised
    forecaster, the same as scoring it directly; ``evaluate.paths=false`` leaves them out."""
    import numpy as np

    from vdn_pyro.cli import load_run
    from vdn_pyro.data.protocol import long_horizon_splits
    from vdn_pyro.forecasting import PATH_METRICS, evaluate_forecaster, normalised

    rows = 400
    dates = pd.date_range("2021-01-01", periods=rows, freq="D")
    values = np.sin(np.arange(rows) / 4.0) + 0.05 * np.random.default_rng(0).normal(size=rows)
    pd.DataFrame({"date": dates, "y": values}).to_csv(tmp_path / "series.csv", index=False)
    run = tmp_path / "run"
    options = ["data.source=csv", f"data.path={tmp_path / 'series.csv'}", "data.split=protocol"]
    options += ["fit.norm=last", "evaluate.num_samples=16"]
    argv = ["fit", "--preset", "quick", "--quiet", "--run-dir", str(run), *NO_EXTRAS]
    assert main([*argv, *[a for o in options for a in ("--set", o)]]) == 0
    frame = pd.read_csv(run / "metrics_test.csv")
    assert set(PATH_METRICS) <= set(frame.columns)
    assert np.isfinite(frame[list(PATH_METRICS)].to_numpy()).all()

    loaded = load_run(run)
    assert loaded.config.fit.norm == "last" and loaded.config.data.split == "protocol"
    assert loaded.splits.borders == long_horizon_splits(loaded.series, 24, 8).borders
    x, y = loaded.splits.windows("test", stride=loaded.config.data.test_stride)
    direct = evaluate_forecaster(normalised(loaded.network, "last"), x, y, 16, seed=0, paths=True)
    assert main(["evaluate", str(run)]) == 0
    scores = json.loads((run / "metrics_test.json").read_text())["models"]["vdn"]
    for name in ("crps", *PATH_METRICS):
        assert scores[name] == pytest.approx(direct[name], rel=1e-5), name

    assert main(["evaluate", str(run), "--set", "evaluate.paths=false"]) == 0
    assert not set(PATH_METRICS) & set(pd.read_csv(run / "metrics_test.csv").columns)
    assert "energy" not in json.loads((run / "metrics_test.json").read_text())["models"]["vdn"]

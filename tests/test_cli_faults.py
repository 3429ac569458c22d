"""The ``vdn`` command under faults: each case asserts the exit status, a one-line message (no
traceback) and that nothing already on disk changed (every file of the run directory, or of the
working directory, hashed before and after).

The cases follow the numbered items of issue #13 ("Runs a user can trust"): refused resumes
(2), colliding and concurrent runs (3), split-named results (4), bad data and options refused
before training (5), operating-system failures (6), relative data paths and data digests (7),
and the smaller items (11). Everything runs in-process with the ``quick`` preset and tiny data.
"""

import datetime
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import vdn_pyro.cli as cli
from vdn_pyro.cli import RunDir, main
from vdn_pyro.inference import LocalELBO

QUICK = ["--preset", "quick", "--quiet", "--set", "output.plots=false", "--set", "output.idata=false"]
#: The quick preset on a CSV of 160 rows (tiny windows, so the splits hold a few of them).
CSV_OPTIONS = [
    "--set",
    "data.source=csv",
    "--set",
    "data.lookback=16",
    "--set",
    "data.horizon=4",
    "--set",
    "data.train_stride=2",
]


def snapshot(root):
    """``{relative path: sha256}`` of every file under ``root`` (and ``None`` for each directory)."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return out


def one_line(text, *fragments, command="fit"):
    """The single line of ``text`` (stderr), which starts with ``vdn COMMAND: error:``."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    assert lines[0].startswith(f"vdn {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def run_main(capsys, argv, status, *fragments):
    """``main(argv)`` must exit with ``status`` and print one line to stderr naming ``fragments``,
    and nothing to stdout but (for a fit) the run directory."""
    capsys.readouterr()
    assert main(argv) == status
    captured = capsys.readouterr()
    line = one_line(captured.err, *fragments, command=argv[0] if argv[0] != "--debug" else argv[1])
    assert "Traceback" not in captured.out
    assert all(row.startswith("run directory: ") for row in captured.out.splitlines()), captured.out
    return line


def write_series(path, values=None, rows=160, reverse=False):
    dates = pd.date_range("2021-01-01", periods=rows, freq="D")
    if values is None:
        values = np.sin(np.arange(rows) / 4.0) + 0.05 * np.random.default_rng(0).normal(size=rows)
    frame = pd.DataFrame({"date": dates[::-1] if reverse else dates, "y": values})
    frame.to_csv(path, index=False)
    return Path(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished quick run (no plots, no InferenceData), copied by the tests that change it."""
    run = tmp_path_factory.mktemp("faults") / "run"
    assert main(["fit", *QUICK, "--run-dir", str(run)]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# ----------------------------------------------------------------------------- 2. refused resume
@pytest.mark.parametrize(
    "override, fragment",
    [
        ("neurons.units=5", "--set neurons.units=5 cannot change on --resume (the run was trained with 4)"),
        ("fit.optim=adamw", "--set fit.optim='adamw' cannot change on --resume"),
        ("fit.lr=0.5", "--set fit.lr=0.5 cannot change on --resume"),
        ("data.train_stride=4", "--set data.train_stride=4 cannot change on --resume"),
        ("constraints.free_bits.enabled=true", "--set constraints.free_bits.enabled=True cannot change"),
        ("fit.steps=3", "already at step 6, beyond the 3 steps asked for"),
    ],
    ids=["architecture", "optimiser", "learning-rate", "data", "constraints", "fewer-steps"],
)
def test_a_refused_resume_changes_nothing(run, capsys, override, fragment):
    before = snapshot(run)
    run_main(capsys, ["fit", "--resume", str(run), "--quiet", "--set", override], 2, fragment)
    assert snapshot(run) == before  # config.yaml keeps the run's options
    assert main(["evaluate", str(run), "--num-samples", "4"]) == 0  # the run still evaluates


# ----------------------------------------------------------------------------- 3. collisions, locks
def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch, capsys):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 1, 12, 0, 0)

    monkeypatch.setattr(cli.datetime, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["fit", *QUICK, "--set", "fit.steps=2"]) == 0
    printed = [row.removeprefix("run directory: ") for row in capsys.readouterr().out.splitlines()]
    assert printed == ["runs/20240501-120000", "runs/20240501-120000-1"]
    for name in printed:
        assert json.loads((tmp_path / name / "run.json").read_text())["status"] == "completed"


def test_run_directories_are_created_atomically(tmp_path):
    """``os.mkdir`` either creates the name or fails: the loop can never hand out a taken one."""
    made = [cli._create_run_dir(None, tmp_path)[0] for _ in range(5)]
    assert len(set(made)) == 5 and all(path.is_dir() for path in made)


@pytest.mark.parametrize("command", ["resume", "evaluate", "report"])
def test_a_run_directory_in_use_is_refused(run, capsys, command):
    argv = {
        "resume": ["fit", "--resume", str(run), "--quiet", "--set", "fit.steps=8"],
        "evaluate": ["evaluate", str(run)],
        "report": ["report", str(run)],
    }[command]
    before = snapshot(run)
    with RunDir(run).lock():  # another command writing it
        run_main(capsys, argv, 2, "is in use by another vdn command")
    assert snapshot(run) == before
    assert main(["fit", "--resume", str(run), "--quiet", "--set", "fit.steps=8"]) == 0  # free again


def test_a_fresh_run_into_a_directory_in_use_is_refused(tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    with RunDir(target).lock():
        run_main(capsys, ["fit", *QUICK, "--run-dir", str(target)], 2, "is in use")
    assert snapshot(tmp_path) == {"target": None}


# ----------------------------------------------------------------------------- 4. split-named results
def test_each_split_has_its_own_metrics_files(run, capsys):
    test_files = {name: (run / name).read_bytes() for name in ("metrics_test.json", "metrics_test.csv")}
    assert main(["evaluate", str(run), "--split", "val", "--num-samples", "4"]) == 0
    assert {name: (run / name).read_bytes() for name in test_files} == test_files
    val = json.loads((run / "metrics_val.json").read_text())
    assert val["split"] == "val" and set(val["models"]) == {"vdn", "repeat_last"}
    assert set(pd.read_csv(run / "metrics_val.csv").split) == {"val"}
    assert set(pd.read_csv(run / "metrics_test.csv").split) == {"test"}
    assert json.loads((run / "metrics_test.json").read_text())["split"] == "test"
    assert set(pd.read_csv(run / "units.csv").split) == {"test"}  # diagnostics.split
    assert not (run / "metrics.json").exists()


# ----------------------------------------------------------------------------- 5. bad data and options
def _extreme(tmp_path, row, value):
    values = np.sin(np.arange(160) / 4.0)
    values[row] = value
    return write_series(tmp_path / "series.csv", values)


@pytest.mark.parametrize(
    "make, fragments",
    [
        (
            lambda p: _extreme(p, 30, 1e300),
            ["data: series (160 rows) cannot be used", "standard deviation inf"],
        ),
        (
            lambda p: _extreme(p, 150, 1e30),
            ["'y' at row 150 (test split) is 1e+30", "training standard deviations"],
        ),
        (
            lambda p: write_series(p / "series.csv", reverse=True),
            ["is earlier than row 0", "sort the file by date"],
        ),
        (lambda p: (p / "series.csv").write_text("date,y\n2021-01-01,1\n2021-01-02,inf\n"), ["holds inf"]),
        (lambda p: None, ["data.path: no CSV file at", "--set data.path=FILE"]),
    ],
    ids=["overflowing-scale", "extreme-test-value", "reverse-dates", "infinite-value", "missing-file"],
)
def test_unusable_data_are_refused_before_training(tmp_path, monkeypatch, capsys, make, fragments):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    before = snapshot(tmp_path)
    run_main(capsys, ["fit", *QUICK, *CSV_OPTIONS, "--set", "data.path=series.csv"], 2, *fragments)
    assert snapshot(tmp_path) == before  # no run directory, not even runs/


@pytest.mark.parametrize(
    "file, text, argv, fragments",
    [
        (None, None, ["--set", "fit.lr=.inf"], ["fit.lr: expected number > 0, got inf"]),
        ("run.yaml", "fit:\n  lr: .inf\n", [], ["fit.lr: expected number > 0, got inf"]),
        (
            "run.yaml",
            "neurons:\n  units: true\n",
            [],
            ["neurons.units: expected int >= 1, got true (a boolean)"],
        ),
        ("run.yaml", "", [], ["holds no option", "give no file"]),
        ("run.toml", "# nothing\n", [], ["holds no option"]),
        ("run.cfg", "fit:\n  lr: 0.01\n", [], ["expected a .yaml, .yml, .toml, .json file"]),
        ("run.json", '{"fit": {"lr": 0.01,}}', [], ["is not valid JSON"]),
        (None, None, ["--set", "output.dpi=100000"], ["output.dpi: expected int >= 10 and <= 600"]),
        (
            None,
            None,
            ["--set", "neurons.units=100000000"],
            ["needs about", "more than this machine's", "neurons.units"],
        ),
        (
            None,
            None,
            ["--set", "neurons.likelihood_scale=1e-300", "--set", "neurons.likelihood_scale_min=0"],
            ["a non-finite initial value", "neurons.likelihood_scale"],
        ),
    ],
    ids=[
        "inf-lr-set",
        "inf-lr-file",
        "bool-units",
        "empty-yaml",
        "empty-toml",
        "unknown-suffix",
        "bad-json",
        "huge-dpi",
        "units-beyond-memory",
        "scale-beyond-float32",
    ],
)
def test_absurd_options_are_refused_before_training(
    tmp_path, monkeypatch, capsys, file, text, argv, fragments
):
    monkeypatch.chdir(tmp_path)
    if file is not None:
        (tmp_path / file).write_text(text)
        argv = [file, *argv]
    before = snapshot(tmp_path)
    run_main(capsys, ["fit", *argv, *QUICK], 2, *fragments)
    assert snapshot(tmp_path) == before


def test_a_json_config_is_supported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.json").write_text('{"fit": {"steps": 2, "lr": 0.02}}')
    assert main(["fit", "run.json", *QUICK, "--run-dir", "r"]) == 0
    assert "lr: 0.02" in (tmp_path / "r" / "config.yaml").read_text()


class NaNELBO(LocalELBO):
    def loss_and_stats(self, model, guide, *args, **kwargs):
        loss, stats = super().loss_and_stats(model, guide, *args, **kwargs)
        return loss * float("nan"), stats


def test_a_fit_with_no_finite_step_fails_instead_of_completing(tmp_path, monkeypatch, capsys):
    """6 steps, all non-finite, fewer than max_bad_steps (10): status 1, not 'completed'."""
    monkeypatch.setattr(cli, "train_forecaster", _with_elbo(NaNELBO()))
    monkeypatch.chdir(tmp_path)
    line = run_main(capsys, ["fit", *QUICK, "--run-dir", "r"], 1, "not finite at every one of steps 1 to 6")
    assert "--set fit.lr=" in line and "fit(" not in line  # CLI advice, not the Python API's
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["status"] == "failed" and "NonFiniteError" in info["error"]


def _with_elbo(elbo):
    train = cli.train_forecaster

    def train_forecaster(*args, **kwargs):
        return train(*args, **{**kwargs, "elbo": elbo})

    return train_forecaster


# ----------------------------------------------------------------------------- 6. the operating system
def test_run_dir_naming_a_file(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    run_main(capsys, ["fit", *QUICK, "--run-dir", str(target)], 1, f"{target} is not a directory")
    assert snapshot(tmp_path) == {"notes.txt": hashlib.sha256(b"mine\n").hexdigest()}


def test_debug_keeps_the_traceback(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    with pytest.raises(NotADirectoryError):
        main(["--debug", "fit", *QUICK, "--run-dir", str(target)])


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_training(tmp_path, monkeypatch, capsys):
    """The first checkpoint cannot be written: one line naming the file and the free space."""
    monkeypatch.setattr(torch, "save", _no_space)
    line = run_main(
        capsys, ["fit", *QUICK, "--run-dir", str(tmp_path / "r")], 1, "no space left on the device"
    )
    assert "checkpoints/last.pt" in line and "free of" in line
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_a_full_disk_during_evaluate_keeps_the_old_results(run, monkeypatch, capsys):
    before = snapshot(run)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _no_space)
    line = run_main(capsys, ["evaluate", str(run)], 1, "no space left on the device while writing")
    assert "metrics_test.csv" in line
    assert snapshot(run) == before  # no partial file, no temporary left over


def test_a_read_only_run_directory(run, monkeypatch, capsys):
    """Simulated (the tests may run as root, whom permissions do not stop): every write of the
    command fails as on a read-only file system."""
    before = snapshot(run)

    def read_only(self, final):
        raise OSError(errno.EROFS, "Read-only file system", str(final))

    monkeypatch.setattr(cli._Outputs, "path", read_only)
    run_main(capsys, ["report", str(run)], 1, "cannot write", "Read-only file system")
    monkeypatch.setattr(cli, "write_text", lambda path, text: read_only(None, path))
    run_main(capsys, ["fit", "--resume", str(run), "--quiet", "--set", "fit.steps=8"], 1, "config.yaml")
    assert snapshot(run) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_a_really_read_only_run_directory(run, capsys):
    before = snapshot(run)
    os.chmod(run, 0o555)
    try:
        run_main(capsys, ["evaluate", str(run)], 1, "Permission denied")
    finally:
        os.chmod(run, 0o755)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- 7. paths and digests
def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_series(tmp_path / "a" / "series.csv")
    monkeypatch.chdir(tmp_path / "a")
    assert main(["fit", *QUICK, *CSV_OPTIONS, "--set", "data.path=series.csv", "--run-dir", "r"]) == 0
    stored = (tmp_path / "a" / "r" / "config.yaml").read_text()
    assert f"path: {tmp_path / 'a' / 'series.csv'}" in stored
    monkeypatch.chdir(tmp_path / "b")
    assert main(["evaluate", "../a/r", "--num-samples", "4"]) == 0
    assert main(["report", "../a/r", "--no-plots"]) == 0


@pytest.fixture
def csv_run(tmp_path):
    data = write_series(tmp_path / "series.csv")
    run = tmp_path / "r"
    assert main(["fit", *QUICK, *CSV_OPTIONS, "--set", f"data.path={data}", "--run-dir", str(run)]) == 0
    return run, data


@pytest.mark.parametrize(
    "row, what", [(5, "the training windows differ"), (150, "the series differ")], ids=["train", "test"]
)
def test_evaluate_and_report_refuse_other_data(csv_run, capsys, row, what):
    run, data = csv_run
    values = pd.read_csv(data)
    values.loc[row, "y"] += 0.5
    values.to_csv(data, index=False)
    before = snapshot(run)
    for command in ("evaluate", "report"):
        line = run_main(capsys, [command, str(run)], 2, "are not the data", what)
        assert "--set data.path=FILE" in line
    assert snapshot(run) == before


def test_the_same_data_elsewhere_is_accepted_with_set_data_path(csv_run, tmp_path, capsys):
    run, data = csv_run
    moved = tmp_path / "elsewhere.csv"
    data.rename(moved)
    run_main(capsys, ["evaluate", str(run)], 2, "data.path: no CSV file at", "--set data.path=FILE")
    assert main(["evaluate", str(run), "--set", f"data.path={moved}"]) == 0


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (
            ["evaluate", "RUN", "--set", "data.lookback=12"],
            ["--set data.lookback: evaluate and report cannot change it"],
        ),
        (["report", "RUN", "--set", "fit.restore_best=false"], ["--set fit.restore_best"]),
    ],
    ids=["evaluate", "report"],
)
def test_evaluate_and_report_refuse_other_configurations(run, capsys, argv, fragments):
    argv = [str(run) if a == "RUN" else a for a in argv]
    before = snapshot(run)
    run_main(capsys, argv, 2, *fragments)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("lookback: 24", "lookback: 12"))
    edited = snapshot(run)
    run_main(
        capsys, [argv[0], str(run)], 2, "was changed after the fit", "data.lookback: trained with 24, now 12"
    )
    assert snapshot(run) == edited
    assert {k: v for k, v in before.items() if k != "config.yaml"} == {
        k: v for k, v in edited.items() if k != "config.yaml"
    }


# ----------------------------------------------------------------------------- 11. smaller items
def test_the_run_directory_is_printed_once_and_quiet_prints_nothing_else(tmp_path, capsys):
    loud, quiet = tmp_path / "loud", tmp_path / "quiet"
    assert (
        main(
            [
                "fit",
                *QUICK[:2],
                "--set",
                "output.plots=false",
                "--set",
                "output.idata=false",
                "--run-dir",
                str(loud),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("run directory") == 1 and out.startswith(f"run directory: {loud}\n")
    assert "test metrics over" in out and "fitted 6 steps" in out
    assert main(["fit", *QUICK, "--run-dir", str(quiet)]) == 0
    assert capsys.readouterr().out == f"run directory: {quiet}\n"


def test_missing_ett_data_get_command_line_advice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VDN_ETT_PATH", raising=False)
    line = run_main(capsys, ["fit", "--preset", "ett", "--quiet"], 2, "--set data.path=/path/to/ETTh1.csv")
    assert "load_ett(" not in line and "VDN_ETT_PATH" in line


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("quick", []),
        ("default", ["neurons.latent_dim=3", "neurons.units=7", "neurons.features=5"]),
        ("default", ["neurons.scale_mode=unit", "neurons.prior.order=3", "neurons.prior.kind=normal"]),
        ("ett", []),
    ],
)
def test_the_memory_estimate_counts_the_parameters_exactly(preset, overrides):
    from vdn_pyro.config import load_config
    from vdn_pyro.models import Forecaster

    config = load_config(preset=preset, overrides=overrides)
    built = sum(p.numel() for p in Forecaster(config.forecaster_config()).parameters())
    estimate = cli.estimate_memory(config, 1000)
    assert estimate["parameters"] == built
    assert estimate["total"] < 2**30  # the presets fit any machine


def test_the_memory_refusal_names_the_options_of_its_largest_part(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", *QUICK[:2], "--set", "output.idata_draws=100000000"]
    run_main(capsys, argv, 2, "the largest part, export", "output.idata_draws (100000000)")
    assert snapshot(tmp_path) == {}


# ----------------------------------------------------------------------------- 1. one "living"
def test_the_progress_bar_ends_on_the_living_fraction_of_units_csv(tmp_path, capsys):
    """The bar's last ``living`` is read from the final per-unit table, the one written to
    units.csv (and ``vdn report`` recomputes that table exactly)."""
    import re

    run = tmp_path / "r"
    argv = ["fit", "--preset", "quick", "--set", "output.plots=false", "--set", "output.idata=false"]
    assert main([*argv, "--set", "diagnostics.split=val", "--run-dir", str(run)]) == 0
    shown = re.findall(r"living=(\d+)%", capsys.readouterr().err)
    units = pd.read_csv(run / "units.csv")
    assert shown and int(shown[-1]) == round(100 * (units.status == "living").mean())
    table = (run / "units.csv").read_bytes()
    assert main(["report", str(run), "--no-plots"]) == 0
    assert (run / "units.csv").read_bytes() == table

"""Smoke tests of the ETTh1 forecasting benchmark and the AR study (``--quick``), and of the one
recipe behind them and ``vdn fit --preset ett``."""

import json
import sys

import pandas as pd
import pytest
import torch

from tests.common import ETT_PATH, ROOT, load_script, requires_ett
from vdn_pyro.cli import main as vdn
from vdn_pyro.config import load_config
from vdn_pyro.forecasting import METRICS

pytestmark = requires_ett()


def load(name):
    """Import a benchmark script as a module (``ar_study`` imports ``forecast_ett`` beside it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return load_script(ROOT / "benchmarks" / f"{name}.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_benchmark_writes_one_table(tmp_path, capsys):
    bench = load("forecast_ett")
    summary = bench.main(bench.parse_args(["--quick", "--data", str(ETT_PATH), "--out-dir", str(tmp_path)]))
    models = list(summary["model"])
    expected = ["vdn", "twin", "dlinear", "linear", "repeat", "DLinear (published)", "NLinear (published)"]
    assert models == expected
    ours = summary[summary["seeds"] > 0]
    for key in ("mse", "mae", "crps", "nll", "coverage_90"):
        assert ours[key].notna().all() and (ours[key] > 0).all()
    assert (ours["coverage_90"] <= 1).all()
    published = summary[summary["model"] == "DLinear (published)"].iloc[0]
    assert (published["mse"], published["mae"]) == (0.375, 0.399)
    runs = pd.read_csv(tmp_path / "forecast_ett_runs.csv")
    assert len(runs) == 5 and set(runs["horizon"]) == {96}
    assert list(runs["skip"].fillna("")) == ["ridge", "ridge", "", "", ""]  # vdn, twin on the closed form
    assert (tmp_path / "forecast_ett.csv").exists()
    table = (tmp_path / "forecast_ett.md").read_text()
    assert "| 96 | VDN forecaster |" in table and "NLinear (published)" in table
    out = capsys.readouterr().out
    assert out.count("| H | model | MSE | MAE | CRPS | NLL | cov 90% | seeds |") == 1


@pytest.mark.parametrize("skip_fit", ["sgd", "ridge"])
def test_the_fitted_dlinear_is_lent_and_reported_once(tmp_path, skip_fit):
    bench = load("forecast_ett")
    argv = [
        "--quick",
        "--data",
        str(ETT_PATH),
        "--out-dir",
        str(tmp_path),
        "--skip-fit",
        skip_fit,
        "--models",
        "vdn",
        "dlinear",
        "linear",
    ]
    args = bench.apply_quick(bench.parse_args(argv))
    args.quick, args.seeds = False, [0, 1]
    calls = []
    run_one = bench.run_one
    bench.run_one = lambda name, *a, **k: calls.append(name) or run_one(name, *a, **k)
    bench.main(args)
    runs = pd.read_csv(tmp_path / "forecast_ett_runs.csv")
    assert list(runs["model"]) == ["vdn", "dlinear", "linear"] * 2
    assert list(runs["seed"]) == [0, 0, 0, 1, 1, 1]
    assert list(runs["skip"].fillna("")) == [skip_fit, "", ""] * 2
    # the closed form is fitted once per horizon, the SGD DLinear once per seed
    assert sorted(calls) == sorted(["vdn", "dlinear", "linear", "vdn", "dlinear"])
    linear = runs[runs["model"] == "linear"]
    assert linear["mse"].nunique() == 1


def test_parallel_jobs_give_the_serial_rows(tmp_path):
    bench = load("forecast_ett")
    argv = ["--quick", "--data", str(ETT_PATH), "--models", "twin", "linear", "repeat"]
    serial = bench.apply_quick(bench.parse_args(argv + ["--out-dir", str(tmp_path / "a")]))
    serial.quick, serial.seeds = False, [0, 1]
    parallel = bench.apply_quick(bench.parse_args(argv + ["--out-dir", str(tmp_path / "b"), "--jobs", "2"]))
    parallel.quick, parallel.seeds = False, [0, 1]
    bench.main(serial)
    bench.main(parallel)
    a = pd.read_csv(tmp_path / "a" / "forecast_ett_runs.csv")
    b = pd.read_csv(tmp_path / "b" / "forecast_ett_runs.csv")
    assert list(a["model"]) == list(b["model"]) == ["twin", "linear", "repeat"] * 2
    keys = ["mse", "crps", "nll", "coverage_90"]
    assert (a[keys] - b[keys]).abs().max().max() < 1e-6  # same seeds, same numbers, any process
    with pytest.raises(ValueError, match="jobs"):
        bench.main(bench.parse_args(argv + ["--jobs", "0"]))


def test_quick_ar_study_writes_the_half_life_histogram(tmp_path):
    study = load("ar_study")
    args = study.parse_args(
        ["--quick", "--data", str(ETT_PATH), "--out-dir", str(tmp_path), "--variants", "normal", "ar-band"]
    )
    summary = study.main(args)
    assert list(summary["model"]) == ["normal", "ar-band"]
    runs = pd.read_csv(tmp_path / "ar_study_runs.csv")
    band = runs[runs["model"] == "ar-band"].iloc[0]
    lo, hi = (b * args.train_stride for b in args.band)
    assert lo - 1e-3 <= band["half_life_median_h"] <= hi + 1e-3
    png = tmp_path / "ar_half_lives.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_missing_data_file_is_a_clear_error(tmp_path):
    bench = load("forecast_ett")
    with pytest.raises(FileNotFoundError, match="ETTh1.csv"):
        missing = str(tmp_path / "ETTh1.csv")
        bench.main(bench.parse_args(["--quick", "--data", missing, "--out-dir", str(tmp_path)]))


def test_the_benchmark_defaults_are_the_ett_preset():
    bench = load("forecast_ett")
    config = bench.run_config(bench.parse_args(["--data", str(ETT_PATH)]), 96, 0)
    assert config == load_config(preset="ett", overrides=[f"data.path={ETT_PATH}"])


def _cli_overrides(bench, args):
    """``--set`` items giving ``vdn fit --preset ett`` the benchmark's options of ``args``."""
    values = {key: getattr(args, dest) for dest, key in bench.CONFIG_KEYS.items()}
    values["fit.batch_size"] = args.batch_size // args.chunk
    return [item for key, value in values.items() for item in ("--set", f"{key}={json.dumps(value)}")]


def test_vdn_fit_preset_ett_trains_the_benchmark_row(tmp_path):
    """One recipe: ``vdn fit --preset ett`` with the benchmark's ``--quick`` options scores exactly
    the benchmark's VDN row (ridge skip path, CRPS selection, monitor on), and ``vdn evaluate``
    of the run directory scores it again."""
    bench = load("forecast_ett")
    args = bench.parse_args(
        ["--quick", "--data", str(ETT_PATH), "--out-dir", str(tmp_path), "--models", "vdn"]
    )
    bench.main(args)
    row = pd.read_csv(tmp_path / "forecast_ett_runs.csv").iloc[0]
    run = tmp_path / "run"
    argv = ["fit", "--preset", "ett", "--run-dir", str(run), "--quiet", "--set", f"data.path={ETT_PATH}"]
    argv += [*_cli_overrides(bench, args), "--set", "diagnostics.monitor_every=3"]
    argv += ["--set", "output.plots=false", "--set", "output.idata=false"]
    assert vdn(argv) == 0
    fitted = json.loads((run / "metrics.json").read_text())["models"]["vdn"]
    assert {k: fitted[k] for k in METRICS} == pytest.approx({k: row[k] for k in METRICS}, rel=1e-6, abs=1e-9)
    assert json.loads((run / "run.json").read_text())["best_val_loss"] == pytest.approx(row["best_val_loss"])
    assert vdn(["evaluate", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["models"]["vdn"] == fitted


@pytest.mark.slow
def test_vdn_fit_preset_ett_reproduces_the_readme_row(tmp_path):
    """``vdn fit --preset ett`` then ``vdn evaluate``: the README's H = 96 VDN row (the 3-seed
    mean of ``benchmarks/results/forecast_ett.csv``) within two seed standard deviations
    (a few minutes on one core)."""
    table = pd.read_csv(ROOT / "benchmarks" / "results" / "forecast_ett.csv")
    reference = table[(table["horizon"] == 96) & (table["model"] == "vdn")].iloc[0]
    run = tmp_path / "run"
    argv = ["fit", "--preset", "ett", "--run-dir", str(run), "--quiet", "--set", f"data.path={ETT_PATH}"]
    assert vdn([*argv, "--set", "output.plots=false", "--set", "output.idata=false"]) == 0
    assert vdn(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["models"]["vdn"]
    for key in ("mse", "crps", "nll"):
        spread = max(2 * reference[f"{key}_std"], 1e-3)
        assert abs(metrics[key] - reference[key]) <= spread, (key, metrics[key], reference[key])

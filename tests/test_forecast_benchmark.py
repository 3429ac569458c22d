"""Smoke tests of the forecasting benchmark and the AR study (``--quick``, and tiny runs on
synthetic long-horizon files), and of the one recipe behind them and ``vdn fit --preset ett``."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.common import ETT_PATH, ROOT, load_script, requires_ett
from vdn_pyro.cli import main as vdn
from vdn_pyro.config import load_config
from vdn_pyro.forecasting import METRICS, PATH_METRICS
from vdn_pyro.models import RolloutConfig


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


@requires_ett()
def test_quick_benchmark_writes_one_table(tmp_path, capsys):
    bench = load("forecast_ett")
    summary = bench.main(bench.parse_args(["--quick", "--data", str(ETT_PATH), "--out-dir", str(tmp_path)]))
    models = list(summary["model"])
    names = ["vdn", "twin", "twin_t", "twin_mvt", "dlinear", "linear", "repeat"]
    assert list(bench.MODELS)[: len(names)] == names  # and any model registered after them
    assert models == [*bench.MODELS, "DLinear (published)", "NLinear (published)"]
    ours = summary[summary["seeds"] > 0]
    for key in [*METRICS, *PATH_METRICS] + [f"val_{k}" for k in METRICS + PATH_METRICS]:
        assert ours[key].notna().all() and (ours[key] > 0).all(), key
    assert (ours[["coverage_90", "coverage_90_sum", "val_coverage_90_sum"]] <= 1).all().all()
    published = summary[summary["model"] == "DLinear (published)"].iloc[0]
    assert (published["mse"], published["mae"]) == (0.375, 0.399)
    runs = pd.read_csv(tmp_path / "forecast_ett_runs.csv").set_index("model")
    assert list(runs.index) == list(bench.MODELS) and set(runs["horizon"]) == {96}
    # vdn, twin and its controls on the closed-form skip path; one normalisation, chosen on it
    skips = runs["skip"].fillna("")
    assert list(skips[names]) == ["ridge"] * 4 + [""] * 3
    assert runs["norm"].nunique() == 1 and set(runs["norm_scores"].str.split().str.len()) == {3}
    # the controls keep the twin's mean, with a fitted t: nu > 1 and a positive scale factor
    for control in ("twin_t", "twin_mvt"):
        assert runs.loc[control, "mse"] == pytest.approx(runs.loc["twin", "mse"], rel=1e-6)
        assert runs.loc[control, "df"] > 1 and runs.loc[control, "scale_factor"] > 0
    # the recalibrated roll-out: the roll-out's own fit (same mean), two fitted spread factors
    assert runs.loc["rollout_cal", "mse"] == pytest.approx(runs.loc["rollout", "mse"], rel=1e-6)
    assert runs.loc["rollout_cal", "path_factor"] > 0 and runs.loc["rollout_cal", "noise_factor"] > 0
    assert runs.loc["rollout_cal", "skip"] == runs.loc["rollout", "skip"] == "ridge"
    assert (tmp_path / "forecast_ett.csv").exists()
    # the roll-out's learned memory: quartiles and every unit's half-life, in steps, and the plot
    trained_rollouts = ["rollout", "rollout_normal", "rollout_exact", "rollout_exmix"]
    for name in trained_rollouts:
        row = runs.loc[name]
        values = np.array([float(v) for v in row["half_lives"].split()])
        assert len(values) == RolloutConfig().units
        assert row["half_life_q25"] <= row["half_life_median"] <= row["half_life_q75"]
        assert row["half_life_median"] == pytest.approx(np.median(values), rel=1e-3)
    # phi = 0 (up to its clamp): memory below one step, against days for the AR units
    assert runs.loc["rollout", "half_life_median"] > 1 and runs.loc["rollout_normal", "half_life_q75"] < 1
    assert runs[["half_lives"]].drop(trained_rollouts + ["rollout_select"]).isna().all().all()
    # the validation choice among the roll-out variants: the candidate with the lowest validation
    # energy, its row copied (every score, its half-lives), nothing fitted again
    candidates = ["rollout", "rollout_exact", "rollout_exmix", "rollout_trcal"]
    chosen = runs.loc[candidates, "val_energy"].idxmin()
    select = runs.loc["rollout_select"]
    assert select["chosen"] == chosen
    assert [part.split("=")[0] for part in select["choice_scores"].split()] == candidates
    for key in [*METRICS, *PATH_METRICS, "val_energy", "half_lives"]:
        assert select[key] == runs.loc[chosen, key], key
    assert runs["chosen"].drop("rollout_select").isna().all()
    assert (tmp_path / "forecast_ett_half_lives.png").exists()
    table = (tmp_path / "forecast_ett.md").read_text()
    assert "| 96 | VDN forecaster |" in table and "NLinear (published)" in table
    assert "| 96 | twin, multivariate t over the horizon |" in table
    out = capsys.readouterr().out
    head = "| H | model | MSE | MAE | CRPS | NLL | cov 90% | energy | CRPS-sum | cov 90% sum | norm | seeds |"
    assert out.count(head) == 2 and out.count("\nValidation\n") == 1  # test and validation, once


@requires_ett()
def test_quick_writes_to_a_temporary_directory(capsys):
    bench = load("forecast_ett")
    committed = ROOT / "benchmarks" / "results" / "forecast_ett.md"
    before = committed.read_bytes() if committed.exists() else None
    args = bench.parse_args(["--quick", "--data", str(ETT_PATH), "--models", "linear", "repeat"])
    bench.main(args)
    out_dir = Path(args.out_dir)
    assert out_dir.is_relative_to(tempfile.gettempdir()) and (out_dir / "forecast_ett.md").exists()
    assert (committed.read_bytes() if committed.exists() else None) == before
    assert f"written to {out_dir}" in capsys.readouterr().out


@requires_ett()
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
        "--norms",
        "none",
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


@requires_ett()
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
    keys = ["mse", "crps", "nll", "coverage_90", "energy", "crps_sum", "val_crps"]
    assert (a[keys] - b[keys]).abs().max().max() < 1e-6  # same seeds, same numbers, any process
    with pytest.raises(ValueError, match="jobs"):
        bench.main(bench.parse_args(argv + ["--jobs", "0"]))


@requires_ett()
def test_quick_ar_study_writes_the_half_life_histogram(tmp_path):
    study = load("ar_study")
    args = study.parse_args(
        ["--quick", "--data", str(ETT_PATH), "--out-dir", str(tmp_path), "--variants", "normal", "ar-band"]
    )
    summary = study.main(args)
    assert list(summary["model"]) == ["normal", "ar-band"]
    runs = pd.read_csv(tmp_path / "ar_study_runs.csv")
    assert runs[["energy", "crps_sum", "val_crps"]].notna().all().all() and runs["norm"].nunique() == 1
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


@pytest.mark.parametrize(
    "script, argv, match",
    [
        ("forecast_ett", ["--data", "{tmp}/none.csv"], "Expected a CSV file at"),
        ("forecast_ett", ["--data", "{tmp}/dated.csv"], "Expected a date column 'date'"),
        ("forecast_ett", ["--data", "{tmp}/dated.csv", "--date-column", "Date", "--columns", "x"], "column"),
        ("forecast_ett", ["--models", "nope"], "Expected --models among"),
        ("ar_study", ["--data", "{tmp}/none.csv"], "Expected a CSV file at"),
        ("plot_paths", ["--data", "{tmp}/none.csv"], "Expected a CSV file at"),
    ],
    ids=["missing-file", "date-column", "unknown-column", "unknown-model", "ar-study", "plot-paths"],
)
def test_bad_options_and_data_are_one_line_and_change_nothing(tmp_path, script, argv, match):
    """Run as scripts, the harness and the scripts built on it refuse bad options and data before
    any work: one line on stderr, exit status 2, no traceback, and no output directory."""
    pd.DataFrame({"Date": pd.date_range("2020", periods=50, freq="h"), "a": np.arange(50.0)}).to_csv(
        tmp_path / "dated.csv", index=False
    )
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--quick", "--out-dir", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}.py: error: ") and match in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not out.exists()


@requires_ett()
def test_the_benchmark_defaults_are_the_ett_preset():
    bench = load("forecast_ett")
    config = bench.run_config(bench.parse_args(["--data", str(ETT_PATH)]), 96, 0)
    assert config == load_config(preset="ett", overrides=[f"data.path={ETT_PATH}"])


def _cli_overrides(bench, args):
    """``--set`` items giving ``vdn fit --preset ett`` the benchmark's options of ``args``."""
    values = {key: getattr(args, dest) for dest, key in bench.CONFIG_KEYS.items()}
    values["fit.batch_size"] = args.batch_size // args.chunk
    return [item for key, value in values.items() for item in ("--set", f"{key}={json.dumps(value)}")]


@requires_ett()
def test_vdn_fit_preset_ett_trains_the_benchmark_row(tmp_path):
    """One recipe: ``vdn fit --preset ett`` with the benchmark's ``--quick`` options scores exactly
    the benchmark's VDN row (ridge skip path, CRPS selection, monitor on), and ``vdn evaluate``
    of the run directory scores it again."""
    bench = load("forecast_ett")
    args = bench.parse_args(
        ["--quick", "--data", str(ETT_PATH), "--out-dir", str(tmp_path), "--models", "vdn", "--norms", "none"]
    )
    bench.main(args)
    row = pd.read_csv(tmp_path / "forecast_ett_runs.csv").iloc[0]
    run = tmp_path / "run"
    argv = ["fit", "--preset", "ett", "--run-dir", str(run), "--quiet", "--set", f"data.path={ETT_PATH}"]
    argv += [*_cli_overrides(bench, args), "--set", "diagnostics.monitor_every=3"]
    argv += ["--set", "output.plots=false", "--set", "output.idata=false"]
    assert vdn(argv) == 0
    fitted = json.loads((run / "metrics_test.json").read_text())["models"]["vdn"]
    assert {k: fitted[k] for k in METRICS} == pytest.approx({k: row[k] for k in METRICS}, rel=1e-6, abs=1e-9)
    assert json.loads((run / "run.json").read_text())["best_val_loss"] == pytest.approx(row["best_val_loss"])
    assert vdn(["evaluate", str(run)]) == 0
    assert json.loads((run / "metrics_test.json").read_text())["models"]["vdn"] == fitted


@requires_ett()
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
    metrics = json.loads((run / "metrics_test.json").read_text())["models"]["vdn"]
    for key in ("mse", "crps", "nll"):
        spread = max(2 * reference[f"{key}_std"], 1e-3)
        assert abs(metrics[key] - reference[key]) <= spread, (key, metrics[key], reference[key])


# ----------------------------------------------------------------------------- any long-horizon CSV
def synthetic_csv(path, num_rows, columns, freq, seed=0):
    """A long-horizon CSV: a date column and seasonal random walks."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_rows)[:, None]
    values = np.sin(2 * np.pi * t / 24 + np.arange(len(columns))) + 0.05 * rng.normal(
        size=(num_rows, 1)
    ).cumsum(0)
    frame = pd.DataFrame(values + 0.1 * rng.normal(size=values.shape), columns=columns)
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=num_rows, freq=freq).astype(str))
    frame.to_csv(path, index=False)
    return path


TINY = [
    "--lookback", "48", "--horizons", "12", "--seeds", "0", "--epochs", "1", "--chunk", "2",
    "--train-stride", "8", "--val-stride", "4", "--test-stride", "4", "--units", "4", "--features", "8",
    "--num-samples", "8", "--val-samples", "8", "--set", "neurons.train_draws=2",
]  # fmt: skip


@pytest.mark.parametrize("select", ["skip", "model"])
def test_any_long_horizon_csv_with_the_norm_chosen_on_validation(tmp_path, capsys, select):
    bench = load("forecast_ett")
    path = synthetic_csv(tmp_path / "weather.csv", 1500, ["p", "T", "rh"], "10min")
    args = bench.parse_args(
        ["--data", str(path), "--out-dir", str(tmp_path / "out"), "--norm-select", select, *TINY]
    )
    summary = bench.main(args)
    assert list(summary["model"]) == list(bench.MODELS)  # no published rows for another data set
    out = capsys.readouterr().out
    assert "weather (3 channels, 7:1:2 chronological protocol)" in out
    runs = pd.read_csv(tmp_path / "out" / "forecast_ett_runs.csv").set_index("model")
    assert runs["test_windows"].iloc[0] == (int(0.2 * 1500) - 12) // 4 * 3 + 3  # every 4th test window
    scores = runs["norm_scores"].str.split().apply(lambda items: dict(i.split("=") for i in items))
    assert all(set(s) == {"none", "last", "mean_scale"} for s in scores)
    # the chosen normalisation has the best validation score of the candidates
    for name, row in runs.iterrows():
        values = {k: float(v) for k, v in scores[name].items()}
        assert values[row["norm"]] == min(values.values()), name
    if select == "skip":  # one choice, by the closed form's validation MSE, for every model
        assert runs["norm"].nunique() == 1
        assert float(scores["linear"][runs["norm"].iloc[0]]) == pytest.approx(
            runs.loc["linear", "best_val_loss"], rel=1e-3
        )
        twin = pytest.approx(runs.loc["twin", "mse"], rel=1e-6)
        assert runs.loc["twin_t", "mse"] == twin and runs.loc["twin_mvt", "mse"] == twin
    else:  # each model's own validation CRPS
        for name, row in runs.iterrows():
            assert float(scores[name][row["norm"]]) == pytest.approx(row["val_crps"], rel=1e-3)


def test_a_run_whose_windows_do_not_fit_in_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    bench = load("forecast_ett")
    path = synthetic_csv(tmp_path / "weather.csv", 1500, ["p", "T", "rh"], "10min")
    args = bench.parse_args(["--data", str(path), "--out-dir", str(tmp_path / "out"), *TINY, "--jobs", "2"])
    args.horizons = [12, 24]
    series = bench.load_series(args)
    # the estimate is the bytes of the task's window tensors
    for horizon in args.horizons:
        splits = bench.task_splits(series, args, horizon)
        strides = {"train": args.train_stride, "val": args.val_stride, "test": args.test_stride}
        held = sum(t.nbytes for split, stride in strides.items() for t in splits.windows(split, stride))
        assert bench.window_bytes(series, args, horizon) == held
    need = 2 * bench.window_bytes(series, args, 24)  # two tasks of the longest horizon at once
    monkeypatch.setattr(bench, "available_memory", lambda: need - 1)
    with pytest.raises(ValueError, match=r"2 task\(s\) at H=24 would hold .* GiB of windows"):
        bench.main(args)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(bench, "available_memory", lambda: need)
    assert bench.prepare(args)[1] is not None
    monkeypatch.setattr(bench, "available_memory", lambda: None)  # unknown: no check
    assert bench.prepare(args)[1] is not None


def test_plot_paths_draws_one_test_window_of_each_model(tmp_path, capsys):
    """plot_paths fits the harness's models (here selected on the validation energy score), draws
    joint sample paths of the middle test window from each, and writes the figure."""
    script = load("plot_paths")
    path = synthetic_csv(tmp_path / "weather.csv", 1500, ["p", "T"], "10min")
    plot = tmp_path / "paths.png"
    argv = ["--data", str(path), *TINY, "--models", "twin_mvt", "rollout", "--select", "energy"]
    args = script.parse_args(argv + ["--plot", str(plot), "--plot-samples", "50", "--context", "24"])
    out, samples, truth = script.main(args)
    assert out == plot and plot.stat().st_size > 0
    bench = load("forecast_ett")
    labels = [bench.MODELS[m].label for m in ("twin_mvt", "rollout")]
    assert list(samples) == labels and all(s.shape == (50, 12) for s in samples.values())
    assert truth.shape == (12,) and f"written to {plot}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--window in"):
        script.main(script.parse_args(argv + ["--plot", str(plot), "--window", "100000"]))


@requires_ett()
def test_an_ettm_file_gets_the_ett_protocol_at_four_rows_an_hour(tmp_path, capsys):
    bench = load("forecast_ett")
    path = synthetic_csv(tmp_path / "ETTm1.csv", 57700, ["HULL", "OT"], "15min")
    argv = ["--data", str(path), "--out-dir", str(tmp_path), "--models", "linear", "repeat", *TINY]
    argv += ["--test-stride", "96", "--val-stride", "96", "--columns", "OT"]
    bench.main(bench.parse_args(argv))
    assert (
        "ETTm1 (1 channels, ETT protocol (12/4/4 months of 30 days, 4 row(s) an hour))"
        in capsys.readouterr().out
    )
    runs = pd.read_csv(tmp_path / "forecast_ett_runs.csv")
    assert (runs["test_windows"] == (4 * 30 * 24 * 4 - 12) // 96 + 1).all()  # the 4 test months


def test_paired_differences_by_horizon_and_seed():
    """a - b per (horizon, seed), then mean, std and seeds won; ties below 1e-6 are 0; only
    pairs run together appear."""
    bench = load("forecast_ett")
    runs = []
    for seed, (a, b) in enumerate([(1.0, 1.5), (2.0, 2.25), (3.0, 2.75)]):
        base = {"horizon": 96, "seed": seed, "crps_sum": 0.0, "crps": 0.0, "nll": 0.0, "mse": 0.5}
        runs.append({**base, "model": "rollout", "energy": a})
        runs.append({**base, "model": "twin_t", "energy": b, "mse": 0.5 + 1e-9})
    runs.append(
        {
            "horizon": 192,
            "seed": 0,
            "model": "rollout",
            "energy": 1.0,
            "crps_sum": 0.0,
            "crps": 0.0,
            "nll": 0.0,
            "mse": 0.5,
        }
    )
    paired = bench.paired_differences(runs)
    assert list(zip(paired["a"], paired["b"], paired["horizon"])) == [("rollout", "twin_t", 96)]
    row = paired.iloc[0]
    diffs = np.array([-0.5, -0.25, 0.25])
    assert row["energy"] == pytest.approx(diffs.mean()) and row["energy_std"] == pytest.approx(
        diffs.std(ddof=1)
    )
    assert row["energy_wins"] == 2 and row["seeds"] == 3
    assert row["mse"] == 0 and row["mse_wins"] == 0  # a 1e-9 difference is a tie
    table = bench.format_paired(paired)
    assert "| 96 | rollout - twin_t |" in table and "**" not in table  # within twice the spread


def test_an_interrupted_write_of_the_tables_loses_no_finished_row(tmp_path, monkeypatch):
    """The tables are rewritten after every task; an interruption mid-write (here a
    KeyboardInterrupt after half the CSV is written) leaves the previous files whole and no
    temporary behind."""
    bench = load("forecast_ett")

    def runs(seeds):
        rows = []
        for seed in seeds:
            for model in ("rollout", "twin_t"):
                rows.append(
                    {"horizon": 96, "seed": seed, "model": model, **{k: 1.0 + seed for k, _ in bench.COLUMNS}}
                )
        return rows

    bench.write_outputs(runs([0]), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"forecast_ett_runs.csv", "forecast_ett.csv", "forecast_ett.md"}

    def interrupted(frame, path, **kwargs):
        Path(path).write_text(frame.to_string()[:20])
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.write_outputs(runs([0, 1]), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    bench.write_outputs(runs([0, 1]), tmp_path)
    assert len(pd.read_csv(tmp_path / "forecast_ett_runs.csv")) == 4


def test_roll_out_models_select_on_the_energy_score_unless_told():
    """The roll-out models' own selection (the validation energy score) applies when neither
    --select nor --set fit.select is given; either one applies to every model."""
    module = load("forecast_ett")
    args = module.parse_args(["--models", "twin", "rollout", "rollout_normal"])
    assert args.select == "crps" and args.select_given is False
    assert [module.model_select(m, args) for m in args.models] == ["crps", "energy", "energy"]
    for argv in (["--select", "crps"], ["--set", "fit.select=nll"]):
        told = module.parse_args(argv)
        assert told.select_given is True
        assert (
            module.model_select("rollout", told)
            == told.select
            == (argv[1] if argv[0] == "--select" else "crps")
        )
    # and the recipe the roll-out is trained by reads it
    config = module.run_config(args, 96, 0, {"fit.select": module.model_select("rollout", args)})
    assert config.train_config().select == "energy"


def test_synthetic_csvs_are_reproducible_and_read_by_the_harness_in_their_formats(tmp_path):
    """``synthetic_csv.py`` writes the same two files from the same seed; the harness reads the
    15-minute one by the ETT protocol and the other by the 7:1:2 protocol."""
    module = load("synthetic_csv")
    first = module.main(["--out-dir", str(tmp_path / "a")])
    second = module.main(["--out-dir", str(tmp_path / "b"), "--seed", "7"])
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    ettm, weather = (pd.read_csv(p) for p in first)
    assert list(ettm.columns) == ["date", "HUFL", "HULL", "MUFL", "OT"] and len(ettm) == 69680
    assert list(weather.columns) == ["date", "p", "T", "rh", "rain"] and len(weather) == 30000
    assert pd.to_datetime(ettm["date"]).diff().iloc[1] == pd.Timedelta(minutes=15)
    assert weather["rain"].min() >= 0 and (weather["rain"] > 1).mean() > 0.01  # bursts on a dry floor
    bench = load("forecast_ett")
    for path, protocol in zip(first, ("ett", "long_horizon")):
        args = bench.parse_args(["--data", str(path)])
        assert bench.protocol_of(bench.load_series(args), args)[0] == protocol


def test_each_recalibration_is_fitted_on_its_own_split(tmp_path, monkeypatch):
    """``rollout_cal`` fits its two factors on the validation windows and ``rollout_trcal`` on the
    training windows (every ``--train-stride``-th), both on the same trained roll-out; a spec
    with another split is refused."""
    bench = load("forecast_ett")
    path = synthetic_csv(tmp_path / "weather.csv", 1500, ["p", "T"], "10min")
    args = bench.parse_args(["--data", str(path), "--out-dir", str(tmp_path / "out"), *TINY])
    series = bench.load_series(args)
    splits = bench.task_splits(series, args, 12)
    seen = {}
    fit = bench.SpreadRecalibration.fit

    def spy(self, x, y, **kw):
        seen[id(self)] = (x, y)
        return fit(self, x, y, **kw)

    monkeypatch.setattr(bench.SpreadRecalibration, "fit", spy)
    cache = {}
    fitted = {
        name: bench.fitted_model(name, splits, 0, args, "none", cache)
        for name in ("rollout_cal", "rollout_trcal")
    }
    for name, split, stride in (
        ("rollout_cal", "val", args.val_stride),
        ("rollout_trcal", "train", args.train_stride),
    ):
        x, y = seen[id(fitted[name].model)]
        want_x, want_y = splits.windows(split, stride=stride)
        assert torch.equal(x, want_x) and torch.equal(y, want_y), name
        assert fitted[name].model.base is cache[("rollout", "none", 0)].view  # one trained roll-out
    with pytest.raises(ValueError, match="fit_split 'val' or 'train'"):
        bench.register_model("bad", bench.ModelSpec("bad", "recalibrated", base="rollout", fit_split="test"))
    assert "bad" not in bench.MODELS


def test_a_selected_model_copies_its_validation_best_candidate_and_brings_its_candidates():
    bench = load("forecast_ett")
    rows = [
        {"model": "twin", "val_energy": 1.0, "energy": 9.0},
        {"model": "rollout", "val_energy": 5.0, "energy": 3.0, "half_lives": "1 2"},
        {"model": "rollout_exact", "val_energy": 4.5, "energy": 3.5, "half_lives": "3 4"},
    ]
    row = bench.selected_row("rollout_select", rows)
    assert row["model"] == "rollout_select" and row["chosen"] == "rollout_exact"
    assert (row["energy"], row["half_lives"]) == (3.5, "3 4")  # the chosen row's test scores
    assert row["choice_scores"] == "rollout=5.0000 rollout_exact=4.5000"  # the twin is no candidate
    assert rows[2]["model"] == "rollout_exact"  # a copy: the candidate's own row is unchanged
    with pytest.raises(ValueError, match="before 'rollout_select'"):
        bench.selected_row("rollout_select", rows[:1])
    # asking for the selection runs its candidates first, in report order otherwise
    assert bench.expand_models(["rollout_select", "twin", "rollout"]) == [
        "twin",
        "rollout",
        "rollout_exact",
        "rollout_exmix",
        "rollout_trcal",
        "rollout_select",
    ]
    args = bench.parse_args(["--models", "rollout_select", "linear"])
    bench.check_args(args)
    want = ["linear", "rollout", "rollout_exact", "rollout_exmix", "rollout_trcal", "rollout_select"]
    assert args.models == want
    # a choice must read out-of-sample validation scores, by a proper score
    bad = (
        ({"candidates": ()}, "at least one"),
        ({"candidates": ("nope",)}, "at least one"),
        ({"candidates": ("rollout_cal",)}, "fitted on the validation windows"),
        ({"candidates": ("rollout",), "select": "coverage_90"}, "select score"),
    )
    for options, match in bad:
        spec = bench.ModelSpec("bad", "selected", **{"select": "energy", **options})
        with pytest.raises(ValueError, match=match):
            bench.register_model("bad", spec)
    assert "bad" not in bench.MODELS

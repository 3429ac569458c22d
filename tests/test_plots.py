"""The PNG plots: dashboard, fan chart and forest."""

import numpy as np
import pandas as pd
import pytest
import torch

from vdn_pyro import VDN
from vdn_pyro.inference import STATUSES, to_inference_data
from vdn_pyro.plots import plot_dashboard, plot_fan_chart, plot_forest, plot_half_lives, plot_sample_paths

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is nearly empty ({len(data)} bytes)"


def _history(steps=12, units=5, seed=0):
    rng = np.random.default_rng(seed)
    logged = np.arange(1, steps + 1) * 5  # (S,)
    kl = np.exp(rng.normal(-2.0, 1.0, size=(steps, units)))  # (S, U)
    beta = np.exp(np.cumsum(rng.normal(0, 0.1, size=(steps, units)), 0)) * 1e-2  # (S, U)
    return logged, kl, beta


def _report(units=5, step=None, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "unit": np.arange(units),
            "kl": rng.uniform(0.0, 0.5, units),
            "loc_sq": rng.uniform(1e-3, 2.0, units),
            "status": [STATUSES[i % len(STATUSES)] for i in range(units)],
        }
    )
    if step is not None:
        frame.insert(0, "step", step)
    return frame


@pytest.mark.parametrize("with_tables", [True, False], ids=["report-and-monitor", "history-only"])
def test_dashboard_writes_a_png(tmp_path, with_tables):
    steps, kl, beta = _history()
    loss = {
        "step": steps,
        "train": np.linspace(3, 1, len(steps)),
        "val": np.where(steps % 10 == 0, 1.5, np.nan),
    }
    options = {}
    if with_tables:
        monitor = pd.concat([_report(step=s, seed=int(s)) for s in (0, 20, 40, 60)], ignore_index=True)
        options = {"report": _report(), "monitor": monitor, "loss": loss}
    path = plot_dashboard(tmp_path / "sub" / "dashboard.png", steps, kl, beta, **options)
    assert path == tmp_path / "sub" / "dashboard.png"
    assert_png(path)


def test_dashboard_checks_shapes(tmp_path):
    steps, kl, _ = _history()
    with pytest.raises(ValueError, match="Expected kl of shape"):
        plot_dashboard(tmp_path / "d.png", steps[:-1], kl)


def test_fan_chart_writes_a_png(tmp_path):
    horizon = 10
    levels = {0.05: -2.0, 0.25: -0.7, 0.5: 0.0, 0.75: 0.7, 0.95: 2.0}
    quantiles = {q: np.linspace(1, 2, horizon) + z for q, z in levels.items()}
    path = plot_fan_chart(
        tmp_path / "fan.png",
        np.sin(np.arange(30) / 3),
        np.linspace(1, 2, horizon),
        quantiles,
        title="test",
        ylabel="ppm",
    )
    assert_png(path)


def test_forest_writes_a_png(tmp_path):
    torch.manual_seed(0)
    net = VDN(3, 1, units=(4,), hidden=(8,))
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    idata = to_inference_data(net, x, y, num_samples=20, chains=2, seed=0)
    path = plot_forest(tmp_path / "forest.png", idata, "layers.0.z", obs=1, dpi=60)
    assert_png(path, min_bytes=1000)


def test_dashboard_of_a_few_units_has_whole_unit_ticks(tmp_path, monkeypatch):
    """With 4 units (the quick preset) matplotlib's default ticks would be 0, 0.5, 1, ...: unit
    indices and unit counts get whole-number ticks."""
    import vdn_pyro.plots as plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: figures.append(fig) or save(fig, path, dpi))
    steps, kl, beta = _history(units=4)
    monitor = pd.concat([_report(4, step=s, seed=int(s)) for s in (0, 20, 40)], ignore_index=True)
    plot_dashboard(
        tmp_path / "d.png", steps, kl, beta[:1].repeat(len(steps), 0), report=_report(4), monitor=monitor
    )
    (ax_loss, ax_heat, ax_status), (ax_loc, ax_kl, ax_beta) = np.asarray(figures[0].axes[:6]).reshape(2, 3)
    unit_axes = [ax_heat.yaxis, ax_status.yaxis, ax_loc.xaxis, ax_kl.xaxis, ax_beta.xaxis]
    for axis in unit_axes:
        ticks = axis.get_majorticklocs()
        assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks)), ticks


def test_a_dpi_beyond_memory_is_refused_before_drawing(tmp_path):
    steps, kl, beta = _history()
    with pytest.raises(
        ValueError, match=r"dpi=100000 gives 1500000 x 800000 pixels; use a dpi of at most \d+"
    ):
        plot_dashboard(tmp_path / "d.png", steps, kl, beta, dpi=100000)
    assert not (tmp_path / "d.png").exists()
    with pytest.raises(ValueError, match="dpi=20000"):
        plot_fan_chart(tmp_path / "f.png", np.zeros(5), np.zeros(3), {0.5: np.zeros(3)}, dpi=20000)


def test_half_lives_plot_writes_a_png(tmp_path):
    half_lives = {96: [10.0, 150.0, float("inf"), 0.0], 720: np.array([5.0, 900.0, 2000.0])}
    out = plot_half_lives(tmp_path / "memory.png", half_lives)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "half_lives, match", [({}, "at least one horizon"), ({0: [1.0]}, "positive horizons")]
)
def test_half_lives_plot_refuses_bad_input(tmp_path, half_lives, match):
    with pytest.raises(ValueError, match=match):
        plot_half_lives(tmp_path / "memory.png", half_lives)
    assert not (tmp_path / "memory.png").exists()


def test_sample_paths_plot(tmp_path):
    rng = np.random.default_rng(0)
    truth = np.cumsum(rng.normal(size=12))
    coherent = rng.normal(size=(200, 1)) + 0.1 * rng.normal(size=(200, 12))  # paths move together
    independent = rng.normal(size=(200, 12))
    out = plot_sample_paths(
        tmp_path / "paths.png",
        rng.normal(size=30),
        truth,
        {"coherent": coherent, "independent": independent},
        context=20,
    )
    assert out.exists() and out.stat().st_size > 0
    with pytest.raises(ValueError, match="at least one forecast"):
        plot_sample_paths(tmp_path / "p.png", np.zeros(3), truth, {})
    with pytest.raises(ValueError, match=r"of 'bad' of shape \(S >= 2, H=12\)"):
        plot_sample_paths(tmp_path / "p.png", np.zeros(3), truth, {"bad": np.zeros((5, 11))})
    assert not (tmp_path / "p.png").exists()

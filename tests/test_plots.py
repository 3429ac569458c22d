"""The PNG plots: dashboard, fan chart and forest."""

import numpy as np
import pandas as pd
import pytest
import torch

from vdn_pyro import VDN
from vdn_pyro.inference import STATUSES, to_inference_data
from vdn_pyro.plots import plot_dashboard, plot_fan_chart, plot_forest

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

"""Runs ``examples/forecast.py`` with tiny settings."""

import numpy as np
import torch

from tests.common import ROOT, load_script


def test_forecast_example_writes_a_fan_chart(tmp_path, capsys):
    example = load_script(ROOT / "examples" / "forecast.py", "forecast_example")
    threads = torch.get_num_threads()
    out = tmp_path / "fan.png"
    try:
        result = example.main(
            example.parse_args(
                [
                    "--out",
                    str(out),
                    "--epochs",
                    "1",
                    "--units",
                    "4",
                    "--lookback",
                    "52",
                    "--horizon",
                    "13",
                    "--num-samples",
                    "50",
                    "--threads",
                    "1",
                ]
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert out.exists() and out.read_bytes()[:4] == b"\x89PNG"
    q = result["quantiles"]
    assert all(q[level].shape == (13,) for level in (0.05, 0.25, 0.5, 0.75, 0.95))
    assert np.all(q[0.05] <= q[0.25]) and np.all(q[0.25] <= q[0.5]) and np.all(q[0.75] <= q[0.95])
    assert result["history"].shape == (52,) and np.isfinite(result["truth"]).all()
    text = capsys.readouterr().out
    assert "vdn" in text and "twin" in text and "wrote" in text

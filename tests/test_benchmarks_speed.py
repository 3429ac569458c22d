"""Smoke tests of the speed benchmarks (``benchmarks/step_speed.py``, ``benchmarks/scaling.py``)
in their tiny modes: they run, check that the four steps compute the same loss, and write their
tables, CSV and PNG. The speed targets themselves are judged on the full runs, not here."""

import math
import sys

import pyro
import pytest
import torch

from tests.common import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import scaling  # noqa: E402
import step_speed  # noqa: E402


def test_hand_written_step_rejects_other_architectures():
    net, x, y = step_speed.build(step_speed.TINY)
    net.config.ar_order = 2
    with pytest.raises(ValueError, match="AR\\(1\\)"):
        step_speed.hand_loss(net, x, y, 32)


def test_step_speed_tiny(tmp_path):
    results = step_speed.main(
        step_speed.parse_args(["--tiny", "--reps", "2", "--validation", "off", "--out-dir", str(tmp_path)])
    )
    check = results["check"]  # the hand-written step computes the same loss and gradient
    assert check["ok"] and check["loss_abs_f64"] <= 1e-6 and check["grad_rel_f64"] <= 1e-6, check
    timing = results["timing"]["off"]
    assert set(timing["cpu_ms"]) == set(step_speed.VARIANTS)
    assert all(t > 0 for t in timing["cpu_ms"].values())
    ratios = {r["ratio"] for r in results["ratios"]["off"]}
    assert ratios == {"eager/hand", "jit/hand", "eager/twin", "user/hand"}
    assert set(results["memory_bytes"]) == set(step_speed.VARIANTS)
    assert results["syncs"]["off"]["jit"]["host_reads"] <= results["syncs"]["off"]["eager"]["host_reads"]
    assert (tmp_path / "step_speed.md").read_text().count("| (a) eager") == 1


def test_user_model_holds_the_networks_parameters():
    """Variant (e) is the same network written as a user's PyroModule: same parameter values,
    one counterpart per VDN parameter, and under stock TraceMeanField_ELBO the same loss as the
    hand-written step from the same seed."""
    config = step_speed.TINY
    net, x, y = step_speed.build(config)
    user, params = step_speed.user_from_vdn(net, config)
    assert len(params) == len(list(net.parameters())) == len(list(user.parameters()))
    for p, q in zip(net.parameters(), params):
        assert p is not q and torch.equal(p, q)
    assert [layer.site for layer in user.neurons] == ["neurons.0.z", "neurons.1.z"]
    pyro.set_rng_seed(5)
    stock = pyro.infer.TraceMeanField_ELBO().differentiable_loss(
        user, step_speed.NeuronGuide(user), x, y, config.num_data
    )
    pyro.set_rng_seed(5)
    hand = step_speed.hand_loss(net, x, y, config.num_data)
    assert abs(stock.item() - hand.item()) <= 1e-5 * max(1.0, abs(hand.item()))


def test_scaling_tiny(tmp_path):
    results = scaling.main(scaling.parse_args(["--tiny", "--reps", "1", "--out-dir", str(tmp_path)]))
    assert {r["sweep"] for r in results["rows"]} == {"units", "time_steps", "batch"}
    assert len(results["slopes"]) == 9
    csv = (tmp_path / "scaling.csv").read_text().splitlines()
    assert csv[0] == "sweep,value,wall_ms,cpu_ms,peak_mib" and len(csv) == 10
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_loglog_slope():
    xs = [1, 2, 4, 8]
    assert math.isclose(scaling.loglog_slope(xs, [3 * x for x in xs]), 1.0)
    assert math.isclose(scaling.loglog_slope(xs, [x**2 for x in xs]), 2.0)
    assert math.isnan(scaling.loglog_slope([1], [1.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_speed_tiny_cuda(tmp_path):
    results = step_speed.main(
        step_speed.parse_args(
            ["--tiny", "--reps", "2", "--validation", "off", "--device", "cuda", "--out-dir", str(tmp_path)]
        )
    )
    assert results["check"]["ok"]

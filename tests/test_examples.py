"""Every example runs with tiny settings.

The quick start is run here; the longer studies have their own smoke tests
(``test_examples_living.py``, ``test_examples_forecast.py``, ``test_examples_generate.py``), and
:func:`test_every_example_is_smoke_tested` makes sure no example is left without one.
"""

import math

from tests.common import ROOT, load_script

EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


def load_example(name):
    """Import ``examples/<name>.py`` as a module."""
    return load_script(ROOT / "examples" / f"{name}.py", f"example_{name}")


def test_quickstart_tiny(capsys):
    module = load_example("quickstart")
    args = module.parse_args(["--steps", "30", "--units", "4", "--hidden", "8", "--num-samples", "20"])
    results = module.main(args)
    out = capsys.readouterr().out
    assert "Per-unit statistics" in out and "layers.0.z" in out
    assert set(results) == {"VDN", "deterministic twin"}
    for metrics in results.values():
        assert set(metrics) == {"mse", "mae", "crps", "nll", "coverage_90"}
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics["coverage_90"] <= 1.0


def test_custom_model_tiny(capsys):
    """A user's PyroModule with temporal (AR prior) and static neurons, trained by stock SVI, then
    the unit report, ArviZ summary and PSIS-LOO."""
    module = load_example("custom_model")
    args = module.parse_args(["--tiny"])
    results = module.main(args)
    out = capsys.readouterr().out
    assert "Learned AR(1) coefficient per temporal unit" in out and "PSIS-LOO" in out
    losses = results["losses"]
    assert len(losses) == args.train_steps and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # it trains
    phi = results["phi"]
    assert phi.shape == (args.dynamic_units,) and bool((phi.abs() < 1).all())
    assert bool(((phi - 0.5).abs() > 1e-3).any())  # the AR prior learned (it starts at phi = 0.5)
    report = results["report"]
    expected = [("dynamics.z", u) for u in range(args.dynamic_units)]
    expected += [("context.z", u) for u in range(args.context_units)]
    assert list(zip(report["site"], report["unit"])) == expected
    assert len(results["summary"]) == args.context_units  # one row per unit of the first sequence
    assert math.isfinite(float(results["loo"]["elpd_loo"]))


def test_every_example_is_smoke_tested():
    """Each file in examples/ is loaded by some test module."""
    sources = "".join(p.read_text() for p in (ROOT / "tests").glob("test_examples*.py"))
    missing = [name for name in EXAMPLES if f'"{name}"' not in sources and f"{name}.py" not in sources]
    assert not missing, f"examples without a smoke test: {missing}"

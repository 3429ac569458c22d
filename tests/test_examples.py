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


def test_every_example_is_smoke_tested():
    """Each file in examples/ is loaded by some test module."""
    sources = "".join(p.read_text() for p in (ROOT / "tests").glob("test_examples*.py"))
    missing = [name for name in EXAMPLES if f'"{name}"' not in sources and f"{name}.py" not in sources]
    assert not missing, f"examples without a smoke test: {missing}"

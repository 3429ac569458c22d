"""Runs examples/generate_names.py with tiny settings."""

import pytest
import torch

from tests.common import ROOT, load_script

TINY = (
    "--limit 120 --steps 12 --batch-size 16 --val-every 5 --embed 4 --hidden 8 --units 4 "
    "--num-samples 4 --replace-samples 2 --samples 5 --steps-shown 3"
)


def load_example():
    return load_script(ROOT / "examples" / "generate_names.py")


@pytest.mark.parametrize("extra", ["", "--kl-band 0 0 --anneal-steps 5", "--cell lstm --free-bits 0.01"],
                         ids=["thermostat", "annealing", "lstm-free-bits"])  # fmt: skip
def test_generate_names_runs_tiny(capsys, extra):
    threads = torch.get_num_threads()
    example = load_example()
    try:
        out = example.main(example.parse_args((TINY + " " + extra).split()))
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    for heading in (
        "Held-out NLL per character",
        "Latent reliance",
        "Per-unit diagnostics",
        "names sampled",
        "Targets:",
    ):
        assert heading in text
    table = out["nll_table"]
    assert set(table["model"]) == {"vdn", "vdn-no-ar", "gru"}
    assert set(table["estimate"]) == {"exact", "IS, K=4", "ELBO bound"}
    assert (table["nats/char"] > 0).all() and (table["bits/char"] > table["nats/char"]).all()
    assert len(out["samples"]) == 5 and all(isinstance(s, str) for s in out["samples"])
    assert all(set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in out["samples"])
    vdn = out["evaluations"]["vdn"]
    assert vdn.unit_kl.shape == (4,) and set(vdn.replaced) >= {"prior", "posterior_mean", "zeros"}
    assert len(out["targets"]) == 4

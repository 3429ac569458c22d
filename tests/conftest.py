import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_state():
    """Clear Pyro state, fix the seed and enable validation before each test."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)

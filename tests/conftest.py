import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The networks in the suite are tiny: one intra-op thread is faster, far faster on a busy
    machine, and makes timings less sensitive to other load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

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


def _check_module_local_params(when):
    """Fail if Pyro's ``module_local_params`` is on (after switching it back off), so that no test
    or import leaks the setting into the tests after it."""
    if pyro.settings.get("module_local_params"):
        pyro.settings.set(module_local_params=False)
        pytest.fail(
            f"pyro.settings module_local_params was True {when}. Nothing may leave it on: use the "
            "module_local_params fixture, which switches it off again."
        )


@pytest.fixture(autouse=True)
def _fresh_state():
    """Clear Pyro's param store, fix the seed and enable validation before each test; after it,
    check that Pyro's settings are back to their defaults."""
    _check_module_local_params("before the test (an import or an earlier fixture set it)")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
    _check_module_local_params("after the test")


@pytest.fixture
def module_local_params():
    """Run the test under ``pyro.settings.set(module_local_params=True)``, switched off after it.
    Build the modules inside the test: PyroModules read the setting when they are created."""
    pyro.settings.set(module_local_params=True)
    yield
    pyro.settings.set(module_local_params=False)

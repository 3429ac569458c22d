"""vdn_pyro: networks of variational distributional neurons in Pyro.

Importing the package turns on Pyro's ``module_local_params`` setting, so that the parameters of a
:class:`~pyro.nn.PyroModule` live in the module and never in the global param store: two networks
in one process never share parameters.
"""

import pyro

pyro.settings.set(module_local_params=True)

from vdn_pyro.distributions import ARProcess  # noqa: E402
from vdn_pyro.guides import AmortizedNormal, DLinearTrunk, MLPTrunk  # noqa: E402
from vdn_pyro.inference import FitResult, LocalELBO, UnitStats, fit  # noqa: E402
from vdn_pyro.models import ARPrior, NormalPrior  # noqa: E402
from vdn_pyro.network import VDN, Prediction, VDNConfig  # noqa: E402
from vdn_pyro.primitives import BETA_FLOOR, neurons  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ARPrior",
    "ARProcess",
    "AmortizedNormal",
    "BETA_FLOOR",
    "DLinearTrunk",
    "FitResult",
    "LocalELBO",
    "MLPTrunk",
    "NormalPrior",
    "Prediction",
    "UnitStats",
    "VDN",
    "VDNConfig",
    "fit",
    "neurons",
]

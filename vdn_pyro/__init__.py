"""vdn_pyro: networks of variational distributional neurons in Pyro.

Importing the package turns on Pyro's ``module_local_params`` setting, so that the parameters of a
:class:`~pyro.nn.PyroModule` live in the module and never in the global param store: two networks
in one process never share parameters.
"""

import pyro

pyro.settings.set(module_local_params=True)

from vdn_pyro.distributions import ARProcess  # noqa: E402
from vdn_pyro.guides import AmortizedNormal, DLinearTrunk, MLPTrunk  # noqa: E402
from vdn_pyro.inference import (  # noqa: E402
    FitResult,
    FreeBits,
    JitLocalELBO,
    KLBand,
    LocalELBO,
    LocBand,
    Persistence,
    ScaleGuard,
    UnitMonitor,
    UnitStats,
    fit,
    layer_summary,
    to_inference_data,
    unit_report,
)
from vdn_pyro.models import (  # noqa: E402
    ARPrior,
    Forecaster,
    ForecasterConfig,
    NormalPrior,
    RecurrentVDN,
    RecurrentVDNConfig,
)
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
    "Forecaster",
    "ForecasterConfig",
    "FreeBits",
    "JitLocalELBO",
    "KLBand",
    "LocBand",
    "LocalELBO",
    "MLPTrunk",
    "NormalPrior",
    "Persistence",
    "Prediction",
    "RecurrentVDN",
    "RecurrentVDNConfig",
    "ScaleGuard",
    "UnitMonitor",
    "UnitStats",
    "VDN",
    "VDNConfig",
    "fit",
    "layer_summary",
    "neurons",
    "to_inference_data",
    "unit_report",
]

"""vdn_pyro: networks of variational distributional neurons in Pyro.

The building block is :class:`Neurons`, a layer of distributional neurons used inside any Pyro
model; :class:`NeuronGuide` builds the guide from the model. Importing the package changes no
global Pyro or torch setting.
"""

from vdn_pyro.distributions import ARProcess
from vdn_pyro.guides import AmortizedNormal, DLinearTrunk, MLPTrunk, NeuronGuide
from vdn_pyro.inference import (
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
from vdn_pyro.models import (
    VDN,
    ARPrior,
    Forecaster,
    ForecasterConfig,
    Neurons,
    NormalPrior,
    Prediction,
    RecurrentVDN,
    RecurrentVDNConfig,
    TemporalNeurons,
    VDNConfig,
    find_neurons,
    posteriors,
)
from vdn_pyro.primitives import BETA_FLOOR, data_plate, neuron_mode, neurons

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
    "NeuronGuide",
    "Neurons",
    "NormalPrior",
    "Persistence",
    "Prediction",
    "RecurrentVDN",
    "RecurrentVDNConfig",
    "ScaleGuard",
    "TemporalNeurons",
    "UnitMonitor",
    "UnitStats",
    "VDN",
    "VDNConfig",
    "data_plate",
    "find_neurons",
    "fit",
    "layer_summary",
    "neuron_mode",
    "neurons",
    "posteriors",
    "to_inference_data",
    "unit_report",
]

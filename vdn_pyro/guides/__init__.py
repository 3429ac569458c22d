"""Guide side: trunk encoders, amortized per-unit posteriors and the guide builder."""

from vdn_pyro.guides.amortized import SCALE_MODES, AmortizedNormal
from vdn_pyro.guides.builder import NeuronGuide, run_as_guide
from vdn_pyro.guides.path import PathPosterior
from vdn_pyro.guides.recurrent import RecurrentPathPosterior, RecurrentPosterior
from vdn_pyro.guides.trunks import DLinearTrunk, MLPTrunk, instance_offset, make_activation

__all__ = [
    "SCALE_MODES",
    "AmortizedNormal",
    "DLinearTrunk",
    "MLPTrunk",
    "NeuronGuide",
    "PathPosterior",
    "RecurrentPathPosterior",
    "RecurrentPosterior",
    "instance_offset",
    "make_activation",
    "run_as_guide",
]

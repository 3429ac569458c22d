"""Guide side: trunk encoders and amortized per-unit posteriors."""

from vdn_pyro.guides.amortized import SCALE_MODES, AmortizedNormal
from vdn_pyro.guides.recurrent import RecurrentPosterior
from vdn_pyro.guides.trunks import DLinearTrunk, MLPTrunk, instance_offset, make_activation

__all__ = [
    "SCALE_MODES",
    "AmortizedNormal",
    "DLinearTrunk",
    "MLPTrunk",
    "RecurrentPosterior",
    "instance_offset",
    "make_activation",
]

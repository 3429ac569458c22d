"""Inference: the local ELBO and fitting."""

from vdn_pyro.inference.elbo import ESTIMATORS, LocalELBO, UnitStats
from vdn_pyro.inference.fit import FitResult, FitState, evaluate_loss, fit

__all__ = [
    "ESTIMATORS",
    "FitResult",
    "FitState",
    "LocalELBO",
    "UnitStats",
    "evaluate_loss",
    "fit",
]

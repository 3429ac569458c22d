"""Model side: per-unit priors, likelihoods, the forecaster and its baselines."""

from vdn_pyro.models.baselines import DLinear, PointForecaster, RepeatLast
from vdn_pyro.models.forecaster import ForecastPrediction, Forecaster, ForecasterConfig
from vdn_pyro.models.likelihoods import (
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
    StudentTLikelihood,
    make_likelihood,
)
from vdn_pyro.models.priors import ARPrior, NormalPrior

__all__ = [
    "ARPrior",
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "DLinear",
    "ForecastPrediction",
    "Forecaster",
    "ForecasterConfig",
    "GaussianLikelihood",
    "Likelihood",
    "NormalPrior",
    "PointForecaster",
    "RepeatLast",
    "StudentTLikelihood",
    "make_likelihood",
]

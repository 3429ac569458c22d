"""Model side: per-unit priors, likelihoods, the forecaster and its baselines."""

from vdn_pyro.models.baselines import DLinear, PointForecaster, RepeatLast, normal_equations, solve_ridge
from vdn_pyro.models.forecaster import Forecaster, ForecasterConfig, ForecastPrediction
from vdn_pyro.models.likelihoods import (
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
    StudentTLikelihood,
    make_likelihood,
)
from vdn_pyro.models.priors import ARPrior, NormalPrior
from vdn_pyro.models.recurrent import (
    RecurrentARPrior,
    RecurrentVDN,
    RecurrentVDNConfig,
    SequenceEvaluation,
    evaluate_sequences,
    negative_elbo,
)

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
    "RecurrentARPrior",
    "RecurrentVDN",
    "RecurrentVDNConfig",
    "RepeatLast",
    "SequenceEvaluation",
    "StudentTLikelihood",
    "evaluate_sequences",
    "make_likelihood",
    "negative_elbo",
    "normal_equations",
    "solve_ridge",
]

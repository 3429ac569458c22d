"""Model side: per-unit priors, likelihoods, the ``Neurons`` layer, and the networks built from it
(``VDN``, ``Forecaster``, ``RecurrentVDN``) with the forecaster's baselines."""

from vdn_pyro.models.base import NeuronNetwork, posteriors
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
from vdn_pyro.models.neurons import POOLINGS, Neurons, TemporalNeurons, find_neurons, neuron_sites
from vdn_pyro.models.priors import ARPrior, NormalPrior
from vdn_pyro.models.recalibration import SpreadRecalibration
from vdn_pyro.models.recurrent import (
    RecurrentARPrior,
    RecurrentVDN,
    RecurrentVDNConfig,
    SequenceEvaluation,
    evaluate_sequences,
    negative_elbo,
)
from vdn_pyro.models.rollout import DrawAverage, PathMixture, RolloutConfig, RolloutForecaster
from vdn_pyro.models.vdn import VDN, Prediction, VDNConfig

__all__ = [
    "POOLINGS",
    "ARPrior",
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "DLinear",
    "ForecastPrediction",
    "Forecaster",
    "ForecasterConfig",
    "GaussianLikelihood",
    "Likelihood",
    "NeuronNetwork",
    "Neurons",
    "NormalPrior",
    "DrawAverage",
    "PathMixture",
    "PointForecaster",
    "Prediction",
    "RecurrentARPrior",
    "RecurrentVDN",
    "RecurrentVDNConfig",
    "RepeatLast",
    "RolloutConfig",
    "RolloutForecaster",
    "SpreadRecalibration",
    "SequenceEvaluation",
    "StudentTLikelihood",
    "TemporalNeurons",
    "VDN",
    "VDNConfig",
    "evaluate_sequences",
    "find_neurons",
    "make_likelihood",
    "negative_elbo",
    "neuron_sites",
    "normal_equations",
    "posteriors",
    "solve_ridge",
]

"""Model side: per-unit priors and likelihoods."""

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
    "GaussianLikelihood",
    "Likelihood",
    "NormalPrior",
    "StudentTLikelihood",
    "make_likelihood",
]

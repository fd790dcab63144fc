"""Differential privacy pieces: exact integer noise samplers and privacy
accounting over Google's ``dp_accounting``."""

from fedzip.privacy.samplers import (
    bernoulli_exp,
    discrete_gaussian,
    discrete_gaussian_array,
    discrete_laplace,
    discrete_laplace_array,
    skellam_array,
)

__all__ = [
    "bernoulli_exp", "discrete_gaussian", "discrete_gaussian_array", "discrete_laplace",
    "discrete_laplace_array", "skellam_array",
]

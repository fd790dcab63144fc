"""Privacy and trust: exact integer noise samplers (:mod:`fedzip.privacy.samplers`),
privacy accounting over Google's ``dp_accounting`` (:mod:`fedzip.privacy.accounting`,
imported on first use: ``dp_accounting`` pulls in scipy, which the samplers do
not need), and secure aggregation (:mod:`fedzip.privacy.secagg`, SecAgg and
SecAgg+ over the ``cryptography`` package)."""

from typing import Any

from fedzip.privacy.ddp import (
    DDPParameters,
    DistributedDiscreteGaussian,
    DistributedSkellam,
    ddp_codec,
    ddp_epsilon,
    ddp_parameters,
    distributed_dp,
)
from fedzip.privacy.samplers import (
    bernoulli_exp,
    discrete_gaussian,
    discrete_gaussian_array,
    discrete_laplace,
    discrete_laplace_array,
    skellam_array,
)

_ACCOUNTING = ("dp_event", "effective_noise_multiplier", "epsilon", "noise_for_epsilon")
# secure aggregation's names load fedzip.privacy.secagg, and the cryptography package, on first use
_SECAGG = ("SecAggClient", "SecAggConfig", "SecureSum", "mask_update", "secure_mean")


def __getattr__(name: str) -> Any:
    if name in _ACCOUNTING:
        from fedzip.privacy import accounting

        return getattr(accounting, name)
    if name in _SECAGG:
        from fedzip.privacy import secagg

        return getattr(secagg, name)
    raise AttributeError(f"module 'fedzip.privacy' has no attribute {name!r}")


__all__ = [
    "bernoulli_exp", "discrete_gaussian", "discrete_gaussian_array", "discrete_laplace",
    "discrete_laplace_array", "dp_event", "effective_noise_multiplier", "epsilon",
    "noise_for_epsilon", "skellam_array", "SecAggClient", "SecAggConfig", "SecureSum", "mask_update",
    "secure_mean", "DDPParameters", "DistributedDiscreteGaussian", "DistributedSkellam", "ddp_codec",
    "ddp_epsilon", "ddp_parameters", "distributed_dp",
]

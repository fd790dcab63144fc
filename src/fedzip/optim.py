"""Adaptive server optimizers: FedAdagrad, FedAdam and FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive
Federated Optimization" (ICLR 2021), Algorithm 2. The server treats the mean
client delta Δ_t as a pseudo-gradient and keeps per-coordinate state:

    m_t = β1 m_{t−1} + (1 − β1) Δ_t
    v_t = v_{t−1} + Δ_t²                                   FedAdagrad
    v_t = β2 v_{t−1} + (1 − β2) Δ_t²                       FedAdam
    v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)     FedYogi
    x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

with ``v_{−1} ≥ τ²`` and no bias correction. fedzip hands the server
optimizer ``grad = −Δ_t`` (see :class:`fedzip.WeightedFedAvg`), so the classes
here are written in ordinary gradient form, ``g = grad``:

    m ← β1 m + (1 − β1) g;   v ← (rule above with g for Δ);   p ← p − lr · m / (sqrt(v) + eps)

which is the same update (m flips sign with g, v only sees g²). ``eps`` is the
paper's adaptivity τ, ``lr`` its server rate η.

Why not ``torch.optim.Adam``: it bias-corrects both moments (m / (1 − β1^t),
v / (1 − β2^t)) and starts v at 0, so its steps differ from Algorithm 2 from
the first round on (its first step is ±lr·|g|/(|g| + eps) per coordinate,
Algorithm 2's is (1 − β1)·lr·g / (sqrt(τ² + (1 − β2) g²) + τ)). Both choices
are parameters here (``initial_accumulator``, ``bias_correction``) with the
paper's values as defaults; ``FedAdam(..., initial_accumulator=0,
bias_correction=True)`` steps exactly like ``torch.optim.Adam``.
``torch.optim.Adagrad(lr, eps=τ, initial_accumulator_value=τ²)`` does match
FedAdagrad without momentum (β1 = 0), but has no β1, so FedAdagrad is here too.

The classes are plain :class:`torch.optim.Optimizer` subclasses (param
groups, ``state_dict``/``load_state_dict``) and work outside fedzip; the
``fed_*`` factories return ``params -> Optimizer`` callables for
``weighted_fedavg(server_optimizer=...)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedzip.errors import ConfigError

OptimizerFn = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]

#: The paper's adaptivity τ: 10^-3 was the recommended, task-robust value.
DEFAULT_TAU = 1e-3
#: The paper's (β1, β2) for FedAdam and FedYogi.
DEFAULT_BETAS = (0.9, 0.99)


def _check_number(name: str, value: Any, *, low: float, low_open: bool = False,
                  high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value >= high):
        upper = f" and < {high}" if high is not None else ""
        raise ConfigError(f"{name} must be {'>' if low_open else '>='} {low}{upper}, got {value!r}")
    return float(value)


class _AdaptiveServerOptimizer(torch.optim.Optimizer):
    """Algorithm 2's shared part: momentum, the preconditioned step, optional
    bias correction. Subclasses say how ``v`` moves (:meth:`_update_v`)."""

    def _beta1(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _update_v(self, v: torch.Tensor, g2: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _bias_corrections(self, group: dict[str, Any], step: int) -> tuple[float, float]:
        return 1.0, 1.0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1 = self._beta1(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise ConfigError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    # v_{-1}: the paper requires v_{-1} >= τ² so that the very first
                    # step is bounded by lr·(1-β1)·|g|/τ even when v would be ~0
                    v0 = group["initial_accumulator"]
                    v0 = group["eps"] ** 2 if v0 is None else v0  # None: τ² of this group's τ
                    state["v"] = torch.full_like(p, v0, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                self._update_v(v, g * g, group)
                bc1, bc2 = self._bias_corrections(group, state["step"])
                denom = (v.sqrt() / math.sqrt(bc2)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / bc1)
        return loss


class _MomentsOptimizer(_AdaptiveServerOptimizer):
    """FedAdam and FedYogi: two betas, optional Adam-style bias correction."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = DEFAULT_BETAS,
        eps: float = DEFAULT_TAU,
        initial_accumulator: float | None = None,
        bias_correction: bool = False,
    ) -> None:
        name = type(self).__name__
        lr = _check_number(f"{name} lr", lr, low=0.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ConfigError(f"{name} betas must be a pair (beta1, beta2), got {betas!r}")
        b1 = _check_number(f"{name} beta1", betas[0], low=0.0, high=1.0)
        b2 = _check_number(f"{name} beta2", betas[1], low=0.0, high=1.0)
        eps = _check_number(f"{name} eps (the adaptivity tau)", eps, low=0.0, low_open=True)
        v0 = None if initial_accumulator is None else _check_number(
            f"{name} initial_accumulator", initial_accumulator, low=0.0)
        if not isinstance(bias_correction, bool):
            raise ConfigError(f"{name} bias_correction must be True or False, got {bias_correction!r}")
        defaults = dict(lr=lr, betas=(b1, b2), eps=eps, initial_accumulator=v0,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)

    def _bias_corrections(self, group: dict[str, Any], step: int) -> tuple[float, float]:
        if not group["bias_correction"]:
            return 1.0, 1.0
        b1, b2 = group["betas"]
        return 1.0 - b1**step, 1.0 - b2**step


class FedAdam(_MomentsOptimizer):
    """FedAdam's server update (Reddi et al., ICLR 2021, Algorithm 2).

    ``v ← β2 v + (1 − β2) g²``; ``p ← p − lr · m / (sqrt(v) + eps)``.

    Args:
        lr: the server learning rate η.
        betas: (β1, β2), the paper's (0.9, 0.99) by default.
        eps: the adaptivity τ (default 1e-3, the paper's recommended value).
        initial_accumulator: v_{−1}; ``None`` (default) means τ², the smallest
            value Algorithm 2 allows (``v_{−1} ≥ τ²``).
        bias_correction: Algorithm 2 has none (default False). True divides m
            by (1 − β1^t) and v by (1 − β2^t) as Adam does; with
            ``initial_accumulator=0`` that is exactly ``torch.optim.Adam``.
    """

    def _update_v(self, v: torch.Tensor, g2: torch.Tensor, group: dict[str, Any]) -> None:
        b2 = group["betas"][1]
        v.mul_(b2).add_(g2, alpha=1.0 - b2)


class Yogi(_MomentsOptimizer):
    """FedYogi's server update (Reddi et al., ICLR 2021, Algorithm 2; Yogi is
    Zaheer, Reddi, Sachan, Kale, Kumar, "Adaptive Methods for Nonconvex
    Optimization", NeurIPS 2018).

    ``v ← v − (1 − β2) g² sign(v − g²)``: v moves additively towards g², so
    one large pseudo-gradient cannot blow the denominator up the way Adam's
    multiplicative average does. ``v`` stays >= 0 when it starts >= 0.

    Args: as :class:`FedAdam` (``eps`` is τ, ``initial_accumulator`` defaults
    to τ², no bias correction unless asked).
    """

    def _update_v(self, v: torch.Tensor, g2: torch.Tensor, group: dict[str, Any]) -> None:
        b2 = group["betas"][1]
        v.addcmul_(g2, torch.sign(v - g2), value=-(1.0 - b2))


class FedAdagrad(_AdaptiveServerOptimizer):
    """FedAdagrad's server update (Reddi et al., ICLR 2021, Algorithm 2).

    ``v ← v + g²``; ``p ← p − lr · m / (sqrt(v) + eps)``, m with momentum β1.

    Args:
        lr: the server learning rate η.
        eps: the adaptivity τ (default 1e-3).
        initial_accumulator: v_{−1}; ``None`` (default) means τ².
        beta1: momentum; 0 (default) is Adagrad as such. Algorithm 2 writes
            the same momentum line for all three methods, so β1 > 0 is allowed.

    With ``beta1=0`` this steps exactly like ``torch.optim.Adagrad(lr,
    eps=τ, initial_accumulator_value=τ²)``. There is no bias correction:
    Adagrad's sum needs none.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        eps: float = DEFAULT_TAU,
        initial_accumulator: float | None = None,
        beta1: float = 0.0,
    ) -> None:
        lr = _check_number("FedAdagrad lr", lr, low=0.0)
        eps = _check_number("FedAdagrad eps (the adaptivity tau)", eps, low=0.0, low_open=True)
        v0 = None if initial_accumulator is None else _check_number(
            "FedAdagrad initial_accumulator", initial_accumulator, low=0.0)
        b1 = _check_number("FedAdagrad beta1", beta1, low=0.0, high=1.0)
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator=v0, beta1=b1))

    def _beta1(self, group: dict[str, Any]) -> float:
        return group["beta1"]

    def _update_v(self, v: torch.Tensor, g2: torch.Tensor, group: dict[str, Any]) -> None:
        v.add_(g2)


# --------------------------------------------------------------------------
# Factories for weighted_fedavg(server_optimizer=...)
# --------------------------------------------------------------------------


def _checked(fn: OptimizerFn) -> OptimizerFn:
    # build once on a probe so a bad hyperparameter fails here, not in round 1
    fn([torch.zeros(1, requires_grad=True)])
    return fn


def fed_adam(lr: float, betas: tuple[float, float] = DEFAULT_BETAS, tau: float = DEFAULT_TAU,
             initial_accumulator: float | None = None, bias_correction: bool = False) -> OptimizerFn:
    """``params -> FedAdam``: the paper's FedAdam (τ² start, no bias correction)."""
    return _checked(functools.partial(FedAdam, lr=lr, betas=betas, eps=tau,
                                      initial_accumulator=initial_accumulator,
                                      bias_correction=bias_correction))


def fed_yogi(lr: float, betas: tuple[float, float] = DEFAULT_BETAS, tau: float = DEFAULT_TAU,
             initial_accumulator: float | None = None, bias_correction: bool = False) -> OptimizerFn:
    """``params -> Yogi``: the paper's FedYogi (τ² start, no bias correction)."""
    return _checked(functools.partial(Yogi, lr=lr, betas=betas, eps=tau,
                                      initial_accumulator=initial_accumulator,
                                      bias_correction=bias_correction))


def fed_adagrad(lr: float, tau: float = DEFAULT_TAU, initial_accumulator: float | None = None,
                beta1: float = 0.0) -> OptimizerFn:
    """``params -> FedAdagrad``: the paper's FedAdagrad (τ² start)."""
    return _checked(functools.partial(FedAdagrad, lr=lr, eps=tau,
                                      initial_accumulator=initial_accumulator, beta1=beta1))


__all__ = ["FedAdagrad", "FedAdam", "Yogi", "fed_adagrad", "fed_adam", "fed_yogi"]

"""``Params``: a model's tensors as a flat ``dict[str, Tensor]`` (state_dict-like),
with the few operations federated averaging needs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

Params = dict[str, torch.Tensor]


def clone(p: Params) -> Params:
    return {k: v.detach().clone() for k, v in p.items()}


def zeros_like(p: Params, dtype: torch.dtype | None = None) -> Params:
    return {k: torch.zeros_like(v, dtype=dtype) for k, v in p.items()}


def sub(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(p: Params, factor: float) -> Params:
    return {k: v * factor for k, v in p.items()}


def numel(p: Params) -> int:
    return sum(v.numel() for v in p.values())


def global_norm(p: Params, order: float = 2.0) -> float:
    """The norm of all tensors concatenated: order 1, 2 or ``math.inf``.
    NaN or Inf anywhere gives a non-finite result."""
    if not p:
        return 0.0
    if math.isinf(order):
        return max(float(v.detach().abs().max()) if v.numel() else 0.0 for v in p.values())
    parts = torch.stack([torch.linalg.vector_norm(v.detach().float(), order) for v in p.values()])
    return float(torch.linalg.vector_norm(parts, order))


def all_finite(p: Params) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in p.values())


def shapes(p: Params) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in p.items()}


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors, arrays and byte strings in a nested structure
    of dicts, lists and tuples (what a per-client state costs in memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    return int(getattr(obj, "nbytes", 0))

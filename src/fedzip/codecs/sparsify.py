"""Sparsification: send ``k`` of the ``d`` coordinates.

* :class:`TopK`: the ``k`` largest in magnitude (biased; pair it with
  :class:`~fedzip.codecs.feedback.ErrorFeedback`). The sorted indices are
  sent as Golomb-Rice coded gaps, close to the ``log2 C(d, k)`` bits a set
  of ``k`` indices needs (about ``log2(d/k) + 1.5`` bits each).
  Aji & Heafield, "Sparse Communication for Distributed Gradient Descent",
  EMNLP 2017; Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory",
  NeurIPS 2018.
* :class:`RandK`: ``k`` coordinates chosen at random from a seed that
  travels in the bytes (no indices sent), scaled by ``d/k`` so that the
  estimate is unbiased. Konečný et al., "Federated Learning: Strategies for
  Improving Communication Efficiency", 2016; Stich et al. 2018.

Both code the kept values with an inner codec (float32 by default), so
``RandK(0.1, inner=RandomRotation(...))`` is EDEN's fractional-bit mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedzip.bitpack import rice_decode, rice_encode, rice_parameter, rice_size
from fedzip.codecs.base import (
    Codec,
    Float32,
    Reader,
    draw_seed,
    finite_output,
    flat_input,
    numel_of,
)
from fedzip.codecs.symbols import Transform
from fedzip.errors import ConfigError, PayloadError


def _count(d: int, fraction: float | None, k: int | None) -> int:
    if d == 0:
        return 0
    if k is not None:  # k wins over fraction
        return min(k, d)
    return min(d, max(1, round(fraction * d)))  # type: ignore[operator]


def _check_k(cls: str, fraction: float | None, k: int | None) -> None:
    if fraction is None and k is None:
        raise ConfigError(f"{cls}: give fraction or k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ConfigError(f"{cls}.k must be a positive integer, got {k!r}")
    if fraction is not None and not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise ConfigError(f"{cls}.fraction must be in (0, 1], got {fraction!r}")


def random_indices(seed: int, d: int, k: int) -> np.ndarray:
    """``k`` distinct sorted indices of ``range(d)`` from ``seed``."""
    if k >= d:
        return np.arange(d, dtype=np.int64)
    idx = np.random.default_rng(seed).choice(d, size=k, replace=False, shuffle=False)
    idx.sort()
    return idx.astype(np.int64)


class RandK(Transform):
    """``k`` random coordinates (``fraction * d``, at least 1), times ``d/k``.

    Args:
        fraction: the share of coordinates kept (default 10%).
        k: the number kept (takes precedence over ``fraction``).
        inner: the codec for the ``k`` scaled values (default float32).

    Bytes: seed (u32) | inner's bytes for the ``k`` values. Unbiased when
    ``inner`` is.
    """

    def __init__(self, fraction: float | None = 0.1, k: int | None = None, inner: Codec | None = None) -> None:
        _check_k("RandK", fraction, k)
        super().__init__(inner if inner is not None else Float32())
        self.fraction = fraction
        self.k = k
        self.tag = f"randk+{self.inner.tag}"

    def forward(self, v: torch.Tensor, shape: tuple[int, ...], rng: torch.Generator) -> tuple[bytes, torch.Tensor, Any]:
        d = v.numel()
        k = _count(d, self.fraction, self.k)
        seed = draw_seed(rng)
        idx = random_indices(seed, d, k)
        kept = v[torch.from_numpy(idx)] * (d / k) if k else v[:0]
        return seed.to_bytes(4, "little"), kept, seed

    def read_header(self, reader: Reader, shape: tuple[int, ...]) -> Any:
        return reader.u32("rand-k seed")

    def inner_shape(self, shape: tuple[int, ...], ctx: Any) -> tuple[int, ...]:
        return (_count(numel_of(shape), self.fraction, self.k),)

    def backward(self, y: torch.Tensor, ctx: Any, shape: tuple[int, ...]) -> torch.Tensor:
        d = numel_of(shape)
        out = torch.zeros(d, dtype=torch.float32)
        k = _count(d, self.fraction, self.k)
        if k:
            out[torch.from_numpy(random_indices(ctx, d, k))] = y.reshape(-1).to(torch.float32)
        return out


class TopK(Codec):
    """The ``k`` largest-magnitude coordinates (``fraction * d``, at least 1).

    Args:
        fraction: the share of coordinates kept (default 1%).
        k: the number kept (takes precedence over ``fraction``).
        values: the codec for the kept values (default float32).

    Bytes: Rice parameter (u8) | Rice-coded index gaps | values' bytes.
    Biased: use it inside :class:`~fedzip.codecs.feedback.ErrorFeedback`.
    """

    tag = "topk"
    unbiased = False

    def __init__(self, fraction: float | None = 0.01, k: int | None = None, values: Codec | None = None) -> None:
        _check_k("TopK", fraction, k)
        self.fraction = fraction
        self.k = k
        self.values = values if values is not None else Float32()
        if values is not None:
            self.tag = f"topk+{self.values.tag}"

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        v = flat_input(x)
        d = v.numel()
        k = _count(d, self.fraction, self.k)
        if k == d:
            idx = torch.arange(d)
        else:
            idx = torch.topk(v.abs(), k, sorted=False).indices.sort().values
        ind = idx.numpy()
        gaps = np.diff(ind, prepend=-1) - 1
        r = rice_parameter(gaps)
        r = min((c for c in (r, r + 1, max(0, r - 1))), key=lambda c: rice_size(gaps, c))
        return bytes([r]) + rice_encode(gaps, r) + self.values.encode(v[idx], rng)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        d = numel_of(shape)
        k = _count(d, self.fraction, self.k)
        reader = Reader(data, "top-k")
        r = reader.u8("Rice parameter")
        gaps, used = rice_decode(reader.view[reader.pos :], k, r, max(d - 1, 0))
        reader.take(used, "index gaps")
        idx = np.cumsum(gaps + 1) - 1
        if k and int(idx[-1]) >= d:
            raise PayloadError(f"top-k: index {int(idx[-1])} out of range for {d} values")
        vals = self.values.decode(reader.rest(), (k,))
        out = torch.zeros(d, dtype=torch.float32)
        if k:
            out[torch.from_numpy(idx)] = vals.reshape(-1)
        return finite_output(out, shape, "top-k")

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        d = numel_of(shape)
        return 1 + 2 * d // 8 + 64 + self.values.max_encoded_size((d,))

"""Kashin's representation: coefficients of ``x`` in a redundant tight frame,
none larger than a small constant times ``||x|| / sqrt(D)``, so that a
uniform quantizer over their range loses little whatever ``x`` looks like.

Lyubarskii & Vershynin, "Uncertainty principles and vector quantization",
IEEE Trans. Inf. Theory 2010 (Section III.A); Caldas, Konečný, McMahan,
Talwalkar, "Expanding the Reach of Federated Learning by Reducing Client
Resource Requirements", 2018 (Kashin's representation before quantization
of the downlink; TFF's ``KashinHadamardEncodingStage``).

The frame, per block: ``D`` (a power of two) coefficients for ``n ~ D /
redundancy`` values, ``U^T v = H P S v / sqrt(D)`` with ``S`` random signs,
``P`` placing the ``n`` values at random positions among ``D`` (both from a
seed that travels in the bytes) and ``H`` the Walsh-Hadamard transform. Its
columns are columns of an orthogonal matrix, so ``U U^T = I`` (a tight
frame): ``U (U^T v) = v``. (TFF puts the values at the first ``n``
positions; at ``n = D / 2`` those columns of a Sylvester Hadamard matrix are
``[H; H]``, every coefficient comes twice and nothing is gained over a
rotation. Random positions avoid that.)

The paper's iteration, with ``r = x``, ``a = 0``, ``M = ||x|| / sqrt(delta
D)``, ``iterations`` times: ``c = clip(U^T r, -M, M)``, ``a += c``, ``r -= U
c``, ``M *= eta``; then ``a += U^T r``, which makes ``U a = x`` exact. The
clipped rounds add at most ``K ||x|| / sqrt(D)`` to any coefficient, ``K =
(1 - eta^k) / ((1 - eta) sqrt(delta))`` (the paper's ``1 / ((1 - eta)
sqrt(delta))`` as ``k`` grows); the last term is at most ``||r||``, and zero
once a round's coefficients all fit under ``M`` (the loop stops there).
``delta`` is relative to ``D`` as in the paper (TFF divides by the input
length: its ``delta = 1`` is ``1 / redundancy`` here).

Blocks as in :mod:`~fedzip.codecs.rotation`: up to ``block_size`` coefficients
one frame of ``D = next_pow2(redundancy * d)``; beyond, frames of
``block_size`` coefficients with the values spread evenly over them, each
with its own norm and levels. The inner codec codes the ``(blocks, D)``
coefficients (``rows * D``, about ``redundancy * d`` values: bits per
coordinate are ``redundancy`` times its own).

Against a rotation + the same min/max uniform quantizer at equal measured
bits per coordinate (``benchmarks/nmse.py --kashin``, d = 2^16, Gaussian,
Student-t and one-spike vectors): with ``iterations=30, eta=0.8, delta=8``
0.12-0.18x the NMSE at 1 bit (half the coefficients at 1 bit) and
0.55-0.85x at 2, but 1.8-2.6x at 4 and 22-31x at 8 bits; TFF's settings
lose from 2 bits on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedzip.codecs.base import Codec, Reader, draw_seed, norm64, numel_of
from fedzip.codecs.rotation import DEFAULT_BLOCK, fwht, next_pow2, signs
from fedzip.codecs.symbols import Transform
from fedzip.codecs.uniform import UniformQuantization
from fedzip.errors import ConfigError

_SEED = 4  # bytes

# Default frame: 2^17 coefficients, which at redundancy 2 hold the 2^16 values
# of one rotation block (:data:`~fedzip.codecs.rotation.DEFAULT_BLOCK`).
DEFAULT_FRAME = 2 * DEFAULT_BLOCK


def bound_factor(iterations: int, eta: float, delta: float) -> float:
    """``K``: the clipped rounds keep every coefficient within ``K ||x|| / sqrt(D)``."""
    return (1.0 - eta**iterations) / ((1.0 - eta) * math.sqrt(delta))


class _Frame:
    """``U^T`` (analysis, ``(rows, n) -> (rows, D)``) and ``U`` (synthesis, back) from a seed."""

    def __init__(self, seed: int, rows: int, n: int, dim: int) -> None:
        self.rows, self.n, self.dim = rows, n, dim
        # 1/sqrt(D) folded into the signs: values are scaled before the transform (no overflow)
        self.signs = signs(seed, rows * n, 1.0 / math.sqrt(dim)).view(rows, n)
        pos = np.random.default_rng([seed, 1]).permutation(dim)[:n]
        self.pos = torch.from_numpy(np.sort(pos))

    def analysis(self, v: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(self.rows, self.dim)
        z.index_copy_(1, self.pos, v * self.signs)
        return fwht(z)

    def synthesis(self, a: torch.Tensor) -> torch.Tensor:
        return fwht(a.contiguous()).index_select(1, self.pos).mul_(self.signs)


def kashin_coefficients(
    v: torch.Tensor, frame: _Frame, iterations: int, eta: float, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kashin's representation of the rows of ``v`` ``(rows, n)``: the
    coefficients ``(rows, D)`` and the residual before the exact last term."""
    level = (norm64(v, dim=1) / math.sqrt(delta * frame.dim)).to(torch.float32).unsqueeze(1)
    a = torch.zeros(frame.rows, frame.dim)
    r = v
    for _ in range(iterations):
        c = frame.analysis(r)
        if bool((c.abs() <= level).all()):
            return a.add_(c), torch.zeros_like(r)  # U c = r: nothing left
        c = torch.clamp(c, -level, level)
        a.add_(c)
        r = r - frame.synthesis(c)
        level = level * eta
    return a.add_(frame.analysis(r)), r


class Kashin(Transform):
    """Kashin's representation around ``inner`` (see module doc).

    Args:
        inner: the codec for the coefficients; a uniform quantizer over their
            range (:class:`~fedzip.codecs.uniform.UniformQuantization`) is
            what they are made for.
        iterations: clipped rounds (TFF: 3).
        eta: the level's shrinkage per round, in (0, 1) (TFF: 0.9).
        delta: the first level is ``||x|| / sqrt(delta D)`` (> 0).
        redundancy: coefficients per value, at least (frames are powers of
            two); in (1, 16].
        block_size: a power of two: the most coefficients in one frame
            (default 2^17); None for one frame of the whole tensor.

    Bytes: seed (u32) | inner's bytes for the ``rows x D`` coefficients
    (:meth:`frame_shape`); with ``UniformQuantization(b)``: ``4 + 8 +
    ceil(rows * D * b / 8)``. Unbiased when ``inner`` is (decoding is linear).
    """

    def __init__(
        self,
        inner: Codec,
        iterations: int = 3,
        eta: float = 0.9,
        delta: float = 1.0,
        redundancy: float = 2.0,
        block_size: int | None = DEFAULT_FRAME,
    ) -> None:
        super().__init__(inner)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or not 1 <= iterations <= 1000:
            raise ConfigError(f"Kashin.iterations must be an integer in 1..1000, got {iterations!r}")
        if not (isinstance(eta, int | float) and 0.0 < eta < 1.0):
            raise ConfigError(f"Kashin.eta must be in (0, 1), got {eta!r}")
        if not (isinstance(delta, int | float) and math.isfinite(delta) and delta > 0):
            raise ConfigError(f"Kashin.delta must be a finite positive number, got {delta!r}")
        if not (isinstance(redundancy, int | float) and 1.0 < redundancy <= 16.0):
            raise ConfigError(f"Kashin.redundancy must be in (1, 16], got {redundancy!r}")
        if block_size is not None:
            if not isinstance(block_size, int) or block_size < 2 or block_size & (block_size - 1):
                raise ConfigError(f"Kashin.block_size must be a power of two >= 2 or None, got {block_size!r}")
            if int(block_size / redundancy) < 1:
                raise ConfigError(f"Kashin.block_size {block_size} holds no value at redundancy {redundancy}")
        self.iterations = iterations
        self.eta = float(eta)
        self.delta = float(delta)
        self.redundancy = float(redundancy)
        self.block_size = block_size
        blocks = "" if block_size is None else f"b{block_size.bit_length() - 1}"
        self.tag = f"kashin{self.redundancy:g}{blocks}+{inner.tag}"

    @property
    def bound(self) -> float:
        """``K`` of :func:`bound_factor` for this codec's settings."""
        return bound_factor(self.iterations, self.eta, self.delta)

    def frame_shape(self, d: int) -> tuple[int, int, int]:
        """``(rows, n, D)`` for ``d`` values: ``rows`` frames of ``D``
        coefficients, ``n`` values each (the last zero-padded)."""
        need = max(1, math.ceil(self.redundancy * d))
        if self.block_size is None or need <= self.block_size:
            return 1, d, next_pow2(need)
        rows = -(-d // int(self.block_size / self.redundancy))
        return rows, -(-d // rows), self.block_size

    def coefficients(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``(rows, D)`` coefficients of ``x`` in the frame of ``seed``, the
        ``(rows, n)`` values they represent (``x`` zero-padded) and the residual
        left after the clipped rounds (what the last, unclipped term adds)."""
        v = x.detach().to("cpu", torch.float32).reshape(-1)
        rows, n, dim = self.frame_shape(v.numel())
        if v.numel() < rows * n:
            v = torch.cat([v, v.new_zeros(rows * n - v.numel())])
        v = v.view(rows, n)
        a, r = kashin_coefficients(v, _Frame(seed, rows, n, dim), self.iterations, self.eta, self.delta)
        return a, v, r

    def forward(self, v: torch.Tensor, shape: tuple[int, ...], rng: torch.Generator) -> tuple[bytes, torch.Tensor, Any]:
        seed = draw_seed(rng)
        a, _, _ = self.coefficients(v, seed)
        return seed.to_bytes(_SEED, "little"), (a.reshape(-1) if a.shape[0] == 1 else a), seed

    def read_header(self, reader: Reader, shape: tuple[int, ...]) -> Any:
        return reader.u32("frame seed")

    def inner_shape(self, shape: tuple[int, ...], ctx: Any) -> tuple[int, ...]:
        rows, _, dim = self.frame_shape(numel_of(shape))
        return (dim,) if rows == 1 else (rows, dim)

    def backward(self, y: torch.Tensor, ctx: Any, shape: tuple[int, ...]) -> torch.Tensor:
        d = numel_of(shape)
        rows, n, dim = self.frame_shape(d)
        frame = _Frame(ctx, rows, n, dim)
        return frame.synthesis(y.to(torch.float32).reshape(rows, dim)).reshape(-1)[:d]

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        rows, _, dim = self.frame_shape(numel_of(shape))
        return _SEED + self.inner.max_encoded_size((rows * dim,))


def kashin_uniform(
    bits: int = 4,
    iterations: int = 3,
    eta: float = 0.9,
    delta: float = 1.0,
    redundancy: float = 2.0,
    block_size: int | None = DEFAULT_FRAME,
) -> Kashin:
    """Kashin's representation, then ``bits``-bit stochastic uniform
    quantization over the coefficients' min/max (Caldas et al. 2018; TFF's
    research encoder). Unbiased; ``redundancy * bits`` bits per coordinate."""
    return Kashin(UniformQuantization(bits), iterations, eta, delta, redundancy, block_size)

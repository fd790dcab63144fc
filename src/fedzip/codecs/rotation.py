"""Randomized Hadamard rotation: ``R x = H D x / sqrt(n)``, with ``D`` random
signs from a seed that travels in the bytes (4 bytes, never the matrix).

After the rotation every coordinate is close to N(0, ||x||^2 / n) whatever
``x`` was, which is what lets a quantizer designed for the Gaussian work on
any input and spreads an outlier's energy over all coordinates (Suresh et
al., "Distributed Mean Estimation with Limited Communication", ICML 2017;
Ailon & Chazelle 2009 for the fast Johnson-Lindenstrauss transform).

The Walsh-Hadamard transform runs in O(n log n) with vectorized torch ops: a
16x16 Hadamard matrix product for the four lowest index bits, then one
butterfly pass (an add and a subtract on strided halves) per higher bit.
Inputs are scaled by ``1/sqrt(n)`` *before* the transform, so values stay
below ``sqrt(n) * max|x|``: 1e30 does not overflow.

Lengths that are not a power of two are zero-padded: to a multiple of
``block_size`` with each block rotated on its own (default 2^16: a tensor of
at most 2^16 values is one rotation padded to the next power of two, a
larger one is cut into blocks; the inner codec then sees a
``(blocks, block_size)`` tensor and scales each row separately), or, with
``block_size=None``, to the next power of two in one rotation (the papers'
choice, up to twice the coordinates).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from fedzip.codecs.base import Codec, Reader, draw_seed, numel_of
from fedzip.codecs.symbols import Transform
from fedzip.errors import ConfigError

_SEED = 4  # bytes

# Default rotation block: 2^16 coordinates. For any length it pads no more
# than one rotation of the whole tensor would (next_pow2(d) is a multiple of
# it above 2^16), and much less for most: the seed CNN's 1,605,632-weight
# layer pads by 0% in blocks against 31% to 2^21. Each block costs one more
# scale (32 bits per 65,536 coordinates, 0.0005 bits each) and is still long
# enough for its coordinates to be near-Gaussian.
DEFAULT_BLOCK = 1 << 16


@functools.lru_cache(maxsize=8)
def _hadamard(k: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each row of ``x`` (rows, n),
    ``n`` a power of two (Sylvester order; ``H`` is symmetric, ``H H = n I``)."""
    rows, n = x.shape
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    k = min(n, 16)
    y = (x.reshape(-1, k) @ _hadamard(k)).reshape(rows, n)
    if k == n:
        return y
    buf = torch.empty_like(y)
    h = k
    while h < n:
        a = y.view(rows, -1, 2, h)
        o = buf.view(rows, -1, 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=o[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=o[:, :, 1])
        y, buf = buf, y
        h *= 2
    return y


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def layout(d: int, block_size: int | None) -> tuple[int, int]:
    """``(rows, block)``: how ``d`` values are padded and cut for rotation."""
    b = next_pow2(d)
    if block_size is not None and b > block_size:
        b = block_size
    return max(1, -(-d // b)), b


def signs(seed: int, n: int, scale: float) -> torch.Tensor:
    """``n`` random signs times ``scale`` (float32), regenerated from ``seed``."""
    raw = np.random.default_rng(seed).bytes((n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=n, bitorder="little")
    # 1 - 2*bit, times scale, without a float64 detour
    out = torch.from_numpy(bits).to(torch.float32)
    return out.mul_(-2.0 * scale).add_(scale)


def rotate(v: torch.Tensor, seed: int, rows: int, block: int) -> torch.Tensor:
    """``R v`` for a flat ``v``: a (rows, block) tensor."""
    n = rows * block
    s = signs(seed, n, 1.0 / math.sqrt(block))
    if v.numel() < n:
        s[v.numel() :] = 0.0
        s[: v.numel()].mul_(v)
        x = s
    else:
        x = s.mul_(v)
    return fwht(x.view(rows, block))


def unrotate(y: torch.Tensor, seed: int, d: int) -> torch.Tensor:
    """``R^T y``, the first ``d`` values (flat)."""
    rows, block = y.shape
    s = signs(seed, rows * block, 1.0 / math.sqrt(block))
    out = fwht(y.to(torch.float32).contiguous()).reshape(-1).mul_(s)
    return out[:d]


class RandomRotation(Transform):
    """Randomized Hadamard rotation around ``inner`` (see module doc).

    Args:
        inner: the codec for the rotated values (a quantizer designed for
            Gaussian coordinates: :class:`~fedzip.codecs.lloydmax.GaussianLloydMax`,
            :class:`~fedzip.codecs.ecsq.GaussianECSQ`, or any codec).
        block_size: a power of two (default :data:`DEFAULT_BLOCK`, 2^16): pad
            to a multiple of it and rotate each block on its own; None: one
            rotation of the whole tensor padded to the next power of two.

    Bytes: seed (u32) | inner's bytes for the rotated tensor. Unbiased when
    ``inner`` is (the rotation is orthogonal), or when ``inner`` is unbiased
    over a random rotation (EDEN's scale).
    """

    rotates = True

    def __init__(self, inner: Codec, block_size: int | None = DEFAULT_BLOCK) -> None:
        super().__init__(inner)
        if block_size is not None:
            if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
                raise ConfigError(f"RandomRotation.block_size must be a power of two or None, got {block_size!r}")
        self.block_size = block_size
        prefix = "rot" if block_size is None else f"rot{block_size.bit_length() - 1}"
        self.tag = f"{prefix}+{inner.tag}"

    def forward(self, v: torch.Tensor, shape: tuple[int, ...], rng: torch.Generator) -> tuple[bytes, torch.Tensor, Any]:
        seed = draw_seed(rng)
        rows, block = layout(v.numel(), self.block_size)
        y = rotate(v, seed, rows, block)
        return seed.to_bytes(_SEED, "little"), (y.reshape(-1) if rows == 1 else y), seed

    def read_header(self, reader: Reader, shape: tuple[int, ...]) -> Any:
        return reader.u32("rotation seed")

    def inner_shape(self, shape: tuple[int, ...], ctx: Any) -> tuple[int, ...]:
        rows, block = layout(numel_of(shape), self.block_size)
        return (block,) if rows == 1 else (rows, block)

    def backward(self, y: torch.Tensor, ctx: Any, shape: tuple[int, ...]) -> torch.Tensor:
        rows, block = layout(numel_of(shape), self.block_size)
        return unrotate(y.reshape(rows, block), ctx, numel_of(shape))

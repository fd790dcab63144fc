"""PowerSGD: a rank-``r`` approximation of each weight update by one step of
subspace (power) iteration, warm-started from the previous round.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization", NeurIPS 2019. A tensor is viewed
as a matrix ``M`` (``shape[0]`` rows; a conv kernel's input channels and
spatial dims become columns). With ``Q`` from the client's previous round
(random on the first): ``P = orth(M Q)``, ``Q = M^T P``; the client sends
``P`` (n x r) and ``Q`` (m x r) as float32 and keeps ``Q`` as its state for
the next round; the server rebuilds ``P Q^T``.

Tensors where the factors would not be smaller than the tensor (vectors,
small matrices) go as plain float32: the choice depends only on the shape
and the rank, so no flag is sent. Biased: the paper pairs it with error
feedback (``ErrorFeedback(PowerSGD(r))``, :func:`~fedzip.codecs.presets.powersgd_ef`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedzip.codecs.base import Codec, Reader, finite_output, flat_input, numel_of
from fedzip.errors import ConfigError, PayloadError


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return (1, numel_of(shape))
    n = int(shape[0])
    return (n, numel_of(shape) // n if n else 0)


class PowerSGD(Codec):
    """Rank-``rank`` factors of each matrix or conv kernel (see module doc).

    Args:
        rank: the rank ``r`` (the paper: 1, 2 or 4).

    Bytes: ``P`` (n x r f32) | ``Q`` (m x r f32), or the float32 tensor when
    ``r (n + m) >= n m``. Per-client state: ``{"q": Q}``.
    """

    tag = "psgd"
    unbiased = False

    def __init__(self, rank: int = 2) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"PowerSGD.rank must be a positive integer, got {rank!r}")
        self.rank = rank

    def factored(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """``(n, m, r)`` when ``shape`` is sent as factors, None for float32."""
        if len(shape) < 2:
            return None
        n, m = matrix_shape(shape)
        r = min(self.rank, n, m)
        if r == 0 or r * (n + m) >= n * m:
            return None
        return n, m, r

    def init_client_state(self, shape: tuple[int, ...]) -> Any:
        return {} if self.factored(shape) is not None else None

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        return self.encode_stateful(x, rng, {})[0]

    def encode_stateful(self, x: torch.Tensor, rng: torch.Generator, state: Any) -> tuple[bytes, Any]:
        shape = tuple(x.shape)
        v = flat_input(x)
        f = self.factored(shape)
        if f is None:
            return v.numpy().astype("<f4", copy=False).tobytes(), state
        n, m, r = f
        mat = v.view(n, m)
        q = state.get("q") if isinstance(state, dict) else None
        if not isinstance(q, torch.Tensor) or tuple(q.shape) != (m, r) or not bool(torch.isfinite(q).all()):
            q = torch.randn(m, r, generator=rng)
        # P = orth(M Q) is invariant to Q's column scale: normalize so nothing overflows
        q = q / torch.linalg.vector_norm(q, dim=0, keepdim=True).clamp_min(1e-30)
        scale = float(mat.abs().max()) if mat.numel() else 0.0
        m_n = mat / scale if scale > 0 else mat
        p, _ = torch.linalg.qr(m_n @ q)
        q_new = m_n.T @ p
        q_send = q_new * scale
        body = p.numpy().astype("<f4").tobytes() + q_send.numpy().astype("<f4").tobytes()
        return body, {"q": q_new.clone()}

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        f = self.factored(shape)
        if f is None:
            n = numel_of(shape)
            if len(data) != 4 * n:
                raise PayloadError(f"PowerSGD (float32 fallback): expected {4 * n} bytes, got {len(data)}")
            arr = np.frombuffer(data, "<f4").astype(np.float32)
            return finite_output(torch.from_numpy(arr), shape, "PowerSGD")
        n, m, r = f
        reader = Reader(data, "PowerSGD")
        p = torch.from_numpy(reader.f32_array(n * r, "P")).view(n, r)
        q = torch.from_numpy(reader.f32_array(m * r, "Q")).view(m, r)
        reader.done()
        if p.abs().max() > 1.0001:
            raise PayloadError("PowerSGD: P is not orthonormal (an entry exceeds 1)")
        return finite_output(p @ q.T, shape, "PowerSGD")

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        return 4 * numel_of(shape)

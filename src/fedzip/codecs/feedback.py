"""Error feedback: what compression dropped this round is added back to the
next round's update, so that a biased codec's errors do not accumulate.

Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its
Application to Data-Parallel Distributed Training of Speech DNNs",
Interspeech 2014; Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes
SignSGD and other Gradient Compression Schemes", ICML 2019 (EF:
``p = x + e``, send ``C(p)``, keep ``e = p - C(p)``).

The residual ``e`` is per-client state (``encode_stateful``), kept by the
aggregator; the bytes are the inner codec's, so the server decodes them
without any state.

``e`` sits on the coordinates of the tensor the client sends. Where those
change every round (federated dropout's kept units, a random mask), the
update space keeps ``e`` on the model's coordinates and moves it in and out
with :func:`map_residuals` (see :meth:`fedzip.algorithms.space.UpdateSpace.gather`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedzip.codecs.base import Codec, flat_input
from fedzip.codecs.lossless import Zstd
from fedzip.errors import ConfigError


class ErrorFeedback(Codec):
    """``inner`` with error feedback (any codec; meant for biased ones).

    Per-client state: ``{"residual": Tensor | None, "inner": inner's state}``.
    Without state (``encode``) it is ``inner`` alone.
    """

    unbiased = False

    def __init__(self, inner: Codec) -> None:
        if not isinstance(inner, Codec):
            raise ConfigError(f"ErrorFeedback wraps a Codec, got {type(inner).__name__}")
        self.inner = inner
        self.tag = f"ef+{inner.tag}"

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        return self.inner.encode(x, rng)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        return self.inner.decode(data, shape)

    def init_client_state(self, shape: tuple[int, ...]) -> Any:
        return {"residual": None, "inner": self.inner.init_client_state(shape)}

    def encode_stateful(self, x: torch.Tensor, rng: torch.Generator, state: Any) -> tuple[bytes, Any]:
        shape = tuple(x.shape)
        v = flat_input(x).reshape(shape)
        residual = state.get("residual") if isinstance(state, dict) else None
        inner_state = state.get("inner") if isinstance(state, dict) else None
        if isinstance(residual, torch.Tensor) and tuple(residual.shape) == shape:
            v = v + residual
        if inner_state is None:
            body = self.inner.encode(v, rng)
        else:
            body, inner_state = self.inner.encode_stateful(v, rng, inner_state)
        sent = self.inner.decode(body, shape)
        return body, {"residual": v - sent, "inner": inner_state}

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        return self.inner.max_encoded_size(shape)


#: ``fn(residual, old residual)``: a residual's new value (see :func:`map_residuals`)
ResidualFn = Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor | None]


def map_residuals(codec: Codec, state: Any, fn: ResidualFn, old: Any = None) -> Any:
    """``state`` (``codec``'s per-client state for one tensor) with each
    error-feedback residual ``r`` replaced by ``fn(r, r_old)``, ``r_old`` the
    same residual in ``old`` (an earlier state of ``codec``; None where it
    holds none). Only the residuals are on the tensor's coordinates; the rest
    of the state (an inner codec's warm start) is kept as it is.

    The residuals found are those :func:`unmapped_feedback` does not name:
    error feedback outermost, possibly nested or under :class:`Zstd`."""
    if isinstance(codec, ErrorFeedback):
        if not isinstance(state, dict):
            return state
        prev = old if isinstance(old, dict) else {}
        return {**state, "residual": fn(state.get("residual"), prev.get("residual")),
                "inner": map_residuals(codec.inner, state.get("inner"), fn, prev.get("inner"))}
    if isinstance(codec, Zstd):  # lossless: its state is its inner codec's, on the same coordinates
        return map_residuals(codec.inner, state, fn, old)
    return state


def unmapped_feedback(codec: Codec) -> Codec | None:
    """The codec inside which ``codec`` hides error feedback that
    :func:`map_residuals` cannot reach (None: there is none). Under a
    transform (a rotation, a random subset) a residual would be on the
    transform's coordinates, not the tensor's: nothing can carry it over."""
    while isinstance(codec, (ErrorFeedback, Zstd)):
        codec = codec.inner
    outer, inner = codec, getattr(codec, "inner", None)
    while inner is not None:
        if isinstance(inner, ErrorFeedback):
            return outer
        inner = getattr(inner, "inner", None)
    return None

"""Adaptive bit width across rounds: each client picks its bit width from
what its earlier rounds showed, and writes it into the bytes (one byte), so
the server decodes without any state.

Two policies:

* ``target``: keep the measured relative error ``||x_hat - x||^2 / ||x||^2``
  under ``target``: one step up the ladder when a round exceeds it, one step
  down when the error expected one step lower (this round's, times ``4^gap``:
  each bit divides the MSE by about 4) would still be under it. With an
  input-independent codec (EDEN) it settles on the smallest width meeting
  the target; with min/max quantization it follows outliers.
* ``schedule``: a fixed width per round (the last one repeats), e.g. many
  bits early in training and fewer later.

In the spirit of Jhunjhunwala, Gadhikar, Joshi, Eldar, "Adaptive Quantization
of Model Updates for Communication-Efficient Federated Learning", ICASSP
2021 (AdaQuantFL), and Faghri et al., "Adaptive Gradient Quantization for
Data-Parallel SGD", NeurIPS 2020.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedzip.codecs.base import Codec, Reader, check_finite
from fedzip.errors import ConfigError, PayloadError


def _eden(bits: int) -> Codec:
    from fedzip.codecs.eden import EDEN

    return EDEN(bits)


class AdaptiveBits(Codec):
    """A stateful client codec choosing ``family(bits)`` each round (see module doc).

    Args:
        family: ``bits -> Codec`` (default :class:`~fedzip.codecs.eden.EDEN`;
            :class:`~fedzip.codecs.uniform.UniformQuantization` works too).
        ladder: the allowed widths, ascending (each 1..255).
        target: the relative error to stay under (or give ``schedule``).
        schedule: widths per round, from the ladder; the last repeats.
        start: the width of the first round (and of stateless ``encode``);
            default the middle of the ladder.

    Bytes: width (u8) | ``family(width)``'s bytes. State: ``{"bits", "round"}``.
    """

    tag = "ada"

    def __init__(
        self,
        family: Callable[[int], Codec] | None = None,
        ladder: Sequence[int] = (1, 2, 3, 4, 6, 8),
        target: float | None = 0.05,
        schedule: Sequence[int] | None = None,
        start: int | None = None,
    ) -> None:
        ladder = tuple(int(b) for b in ladder)
        if not ladder or list(ladder) != sorted(set(ladder)) or not all(1 <= b <= 255 for b in ladder):
            raise ConfigError(f"AdaptiveBits.ladder must be distinct ascending widths in 1..255, got {ladder!r}")
        if schedule is not None:
            schedule = tuple(int(b) for b in schedule)
            if not schedule or any(b not in ladder for b in schedule):
                raise ConfigError(f"AdaptiveBits.schedule must hold widths from the ladder {ladder}, got {schedule!r}")
            target = None
        elif target is None or not (isinstance(target, int | float) and 0 < target < math.inf):
            raise ConfigError(f"AdaptiveBits.target must be a positive number (or give a schedule), got {target!r}")
        start = ladder[len(ladder) // 2] if start is None else int(start)
        if start not in ladder:
            raise ConfigError(f"AdaptiveBits.start {start} is not in the ladder {ladder}")
        self.family = family if family is not None else _eden
        self.ladder = ladder
        self.target = None if target is None else float(target)
        self.schedule = schedule
        self.start = start
        self._codecs: dict[int, Codec] = {}
        self.unbiased = all(self.codec(b).unbiased for b in ladder)  # type: ignore[misc]

    def codec(self, bits: int) -> Codec:
        if bits not in self._codecs:
            self._codecs[bits] = self.family(bits)
        return self._codecs[bits]

    def _bits_for(self, state: dict) -> int:
        if self.schedule is not None:
            return self.schedule[min(int(state.get("round", 0)), len(self.schedule) - 1)]
        b = state.get("bits", self.start)
        return b if b in self.ladder else self.start

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        return self._encode_with(self.start if self.schedule is None else self.schedule[0], x, rng)

    def _encode_with(self, bits: int, x: torch.Tensor, rng: torch.Generator) -> bytes:
        return bytes([bits]) + self.codec(bits).encode(x, rng)

    def init_client_state(self, shape: tuple[int, ...]) -> Any:
        return {"bits": self.start, "round": 0, "nmse": None}

    def encode_stateful(self, x: torch.Tensor, rng: torch.Generator, state: Any) -> tuple[bytes, Any]:
        check_finite(x)
        state = state if isinstance(state, dict) else self.init_client_state(tuple(x.shape))
        bits = self._bits_for(state)
        body = self._encode_with(bits, x, rng)
        new = {"bits": bits, "round": int(state.get("round", 0)) + 1, "nmse": None}
        if self.target is not None:
            xc = x.detach().to("cpu", torch.float64)
            err = self.codec(bits).decode(body[1:], tuple(x.shape)).double() - xc
            denom = float(xc.square().sum())
            nmse = float(err.square().sum()) / denom if denom > 0 else 0.0
            new["nmse"] = nmse
            i = self.ladder.index(bits)
            if nmse > self.target and i + 1 < len(self.ladder):
                new["bits"] = self.ladder[i + 1]
            elif i > 0 and nmse * 4.0 ** (bits - self.ladder[i - 1]) < self.target:
                new["bits"] = self.ladder[i - 1]
        return body, new

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        r = Reader(data, "adaptive")
        bits = r.u8("bit width")
        if bits not in self.ladder:
            raise PayloadError(f"adaptive: bit width {bits} is not in the ladder {self.ladder}")
        return self.codec(bits).decode(r.rest(), shape)

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        return 1 + max(self.codec(b).max_encoded_size(shape) for b in self.ladder)

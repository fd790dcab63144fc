"""Federated data: a population of clients, each with its own examples.

The shape follows TFF's ``ClientData``: a list of client ids and a way to get
one client's examples. Implementations read lazily, so sampling ten clients
from a file of thousands reads ten clients.

Pixel convention: every image reader in :mod:`fedzip.data` hands the model
float32 images of shape ``[n, 28, 28]`` with **1.0 = background, 0.0 = ink**,
the convention of TFF's federated EMNIST, so the seed tutorial's model and
preprocessing apply unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fedzip.errors import DataError


@dataclass(frozen=True)
class ClientExamples:
    """One client's examples: ``x`` ``[n, ...]`` and ``y`` ``[n, ...]``, any
    dtypes the task takes (float32 images and int64 labels ``[n]`` for the
    image task; int64 character ids ``[n, 80]`` and targets ``[n, 80]`` for
    Shakespeare). The first axis counts examples."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"client examples: x has {self.x.shape[0]} rows but y has {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@runtime_checkable
class FederatedData(Protocol):
    """A population of clients. ``client`` raises :class:`DataError` on an unknown id."""

    @property
    def client_ids(self) -> Sequence[str]: ...

    def client(self, client_id: str) -> ClientExamples: ...


@dataclass(frozen=True)
class Preprocess:
    """How a client turns its examples into batches, as in the seed tutorial:
    ``dataset.repeat(epochs).shuffle(shuffle_buffer).batch(batch_size)``.

    The shuffle is tf.data's buffer shuffle (fill a buffer, emit a random slot,
    refill it with the next element), so a buffer smaller than the data gives
    the same partially-local order TFF gives.

    ``max_batches`` caps the batches a client trains on per round (TFF's
    ``ClientSpec.max_elements``, taken after batching): a client with
    thousands of examples then costs no more than ``max_batches`` steps.
    """

    batch_size: int = 20
    epochs: int = 1
    shuffle_buffer: int = 418
    max_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "shuffle_buffer", "max_batches"):
            value = getattr(self, name)
            if value is None and name == "max_batches":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Preprocess.{name} must be a positive integer, got {value!r}")

    def order(self, n: int, generator: np.random.Generator) -> np.ndarray:
        """The example indices of all epochs in the order they are trained on."""
        stream = np.tile(np.arange(n), self.epochs)
        if self.shuffle_buffer >= len(stream):
            return generator.permutation(stream)
        return _buffer_shuffle(stream, self.shuffle_buffer, generator)

    def batches(
        self, examples: ClientExamples, generator: np.random.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches; the last one may be smaller (TF's ``batch``)."""
        order = torch.from_numpy(self.order(len(examples), generator))
        if self.max_batches is not None:
            order = order[: self.max_batches * self.batch_size]
        # one gather per client, then contiguous slices: the same batches as
        # indexing each batch, with one copy instead of one per batch
        xs, ys = examples.x[order], examples.y[order]
        for start in range(0, len(order), self.batch_size):
            yield xs[start : start + self.batch_size], ys[start : start + self.batch_size]


def _buffer_shuffle(stream: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(stream)
    buffer = list(stream[:buffer_size])
    nxt = buffer_size
    for i in range(len(stream)):
        j = int(rng.integers(len(buffer)))
        out[i] = buffer[j]
        if nxt < len(stream):
            buffer[j] = stream[nxt]
            nxt += 1
        else:
            buffer[j] = buffer[-1]
            buffer.pop()
    return out

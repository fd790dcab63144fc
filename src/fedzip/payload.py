"""Model tensors ↔ wire records, through a codec policy, checked against the model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedzip.codecs import CodecPolicy
from fedzip.codecs.base import is_finite
from fedzip.errors import PayloadError
from fedzip.tree import Params
from fedzip.wire import Message, TensorRecord


def encode_params(params: Params, policy: CodecPolicy, rng: torch.Generator) -> list[TensorRecord]:
    """Encode every tensor with the codec the policy picks for it."""
    records = []
    for name, value in params.items():
        codec = policy.for_tensor(name, value.numel())
        records.append(TensorRecord(name, codec.tag, tuple(value.shape), codec.encode(value, rng)))
    return records


def decode_params(
    msg: Message, template: Mapping[str, tuple[int, ...]], policy: CodecPolicy
) -> Params:
    """Decode a message's tensors after checking names, shapes and codec tags
    against the model; a decoded tensor must be finite and of the right shape."""
    names = [t.name for t in msg.tensors]
    if sorted(names) != sorted(template):
        missing = sorted(set(template) - set(names))[:5]
        extra = sorted(set(names) - set(template))[:5]
        raise PayloadError(f"tensors do not match the model: missing {missing}, unexpected {extra}")
    out: Params = {}
    for t in msg.tensors:
        shape = tuple(template[t.name])
        if t.shape != shape:
            raise PayloadError(f"tensor {t.name!r}: shape {t.shape}, the model has {shape}")
        codec = policy.for_tensor(t.name, t.numel)
        if t.codec != codec.tag:
            raise PayloadError(f"tensor {t.name!r}: codec {t.codec!r}, expected {codec.tag!r}")
        value = codec.decode(t.body, shape)
        if tuple(value.shape) != shape or not is_finite(value):
            raise PayloadError(f"tensor {t.name!r}: decoded to a wrong shape or non-finite values")
        out[t.name] = value
    return out

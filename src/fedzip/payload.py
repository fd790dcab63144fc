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
    msg: Message, template: Mapping[str, tuple[int, ...]], policy: CodecPolicy, views: bool = False,
) -> Params:
    """Decode a message's tensors after checking names, shapes and codec tags
    against the model; a decoded tensor must be finite, floating point and of
    the right shape. Anything wrong, including a codec that raises on hostile
    bytes, is a :class:`PayloadError` naming the tensor. With ``views`` the
    tensors may be read-only views of the message's bytes
    (:meth:`~fedzip.codecs.base.Codec.decode_view`): read them, don't keep them."""
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
        try:
            value = codec.decode_view(t.body, shape) if views else codec.decode(t.body, shape)
        except PayloadError:
            raise
        except MemoryError:
            raise PayloadError(f"tensor {t.name!r}: codec {codec.tag!r} ran out of memory decoding "
                               f"{len(t.body)} bytes for shape {shape}") from None
        except Exception as e:  # a codec that trips on hostile bytes: still the sender's fault
            raise PayloadError(f"tensor {t.name!r}: codec {codec.tag!r} cannot decode its body: "
                               f"{type(e).__name__}: {e}") from e
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PayloadError(f"tensor {t.name!r}: codec {codec.tag!r} decoded to {got}, expected {shape}")
        if not value.is_floating_point() or not is_finite(value):
            raise PayloadError(f"tensor {t.name!r}: decoded to non-finite or non-float values")
        out[t.name] = value
    return out

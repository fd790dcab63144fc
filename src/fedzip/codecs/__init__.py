"""Codecs: tensors to wire bytes and back. See :mod:`fedzip.codecs.base` for the contract."""

from fedzip.codecs.base import Codec, Float32
from fedzip.codecs.policy import CodecPolicy, above_threshold, as_policy
from fedzip.codecs.uniform import UniformQuantization

__all__ = ["Codec", "CodecPolicy", "Float32", "UniformQuantization", "above_threshold", "as_policy"]

"""Per-tensor codec choice: which codec encodes which tensor of the model.

TFF's threshold rule is the default: tensors with more than ``threshold``
elements are compressed, smaller ones (biases, small layers) go as float32,
because their share of the bits is small and their error costs accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedzip.codecs.base import Codec, Float32
from fedzip.errors import ConfigError


@dataclass(frozen=True)
class CodecPolicy:
    """Pick a codec per tensor.

    Args:
        codec: the codec for tensors with more than ``threshold`` elements.
        threshold: element count at or below which ``small`` is used.
        small: the codec for small tensors (default float32).
        overrides: exact tensor names mapped to a codec, taking precedence.
    """

    codec: Codec = field(default_factory=Float32)
    threshold: int = 0
    small: Codec = field(default_factory=Float32)
    overrides: Mapping[str, Codec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.codec, Codec) or not isinstance(self.small, Codec):
            raise ConfigError("CodecPolicy.codec and .small must be Codec instances")
        if not isinstance(self.threshold, int) or self.threshold < 0:
            raise ConfigError(f"CodecPolicy.threshold must be a non-negative integer, got {self.threshold!r}")

    def for_tensor(self, name: str, numel: int) -> Codec:
        if name in self.overrides:
            return self.overrides[name]
        return self.codec if numel > self.threshold else self.small

    def summable(self) -> bool:
        """True when every codec can add encodings before decoding (secure sums)."""
        from fedzip.codecs.summable import SummableCodec

        return all(isinstance(c, SummableCodec) for c in self.codecs())

    def codecs(self) -> list[Codec]:
        """Every codec this policy can choose (for state init and validation)."""
        return [self.codec, self.small, *self.overrides.values()]


def above_threshold(codec: Codec, threshold: int = 20_000, small: Codec | None = None) -> CodecPolicy:
    """``codec`` for tensors with more than ``threshold`` elements, float32 for the rest."""
    return CodecPolicy(codec=codec, threshold=threshold, small=small or Float32())


def as_policy(codec: Codec | CodecPolicy | None) -> CodecPolicy:
    """Accept a codec (applied to every tensor), a policy, or None (float32)."""
    if codec is None:
        return CodecPolicy()
    if isinstance(codec, CodecPolicy):
        return codec
    if isinstance(codec, Codec):
        return CodecPolicy(codec=codec, threshold=0, small=codec)
    raise ConfigError(f"expected a Codec or CodecPolicy, got {type(codec).__name__}")

"""Generic lossless compression of another codec's bytes with Zstandard: the
baseline an entropy coder that knows the symbols (:class:`EntropyCoded`)
should beat.

Reference: Y. Collet, M. Kucherawy, "Zstandard Compression and the
'application/zstd' Media Type", RFC 8878, 2021.
"""

from __future__ import annotations

import torch
import zstandard

from fedzip.codecs.base import Codec
from fedzip.errors import ConfigError, PayloadError


class Zstd(Codec):
    """``inner``'s bytes, compressed with Zstandard at ``level`` (1..22).

    The decoder reads the frame's declared size first and refuses anything
    above ``inner.max_encoded_size(shape)``, a frame without a declared size,
    a size mismatch and trailing bytes.
    """

    def __init__(self, inner: Codec, level: int = 3) -> None:
        if not isinstance(inner, Codec):
            raise ConfigError(f"Zstd wraps a Codec, got {type(inner).__name__}")
        if not isinstance(level, int) or not 1 <= level <= 22:
            raise ConfigError(f"Zstd.level must be an integer in 1..22, got {level!r}")
        self.inner = inner
        self.level = level
        self.tag = f"zstd+{inner.tag}"

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return bool(self.inner.unbiased)

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> bytes:
        raw = self.inner.encode(x, rng)
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(raw)

    def decode(self, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        data = bytes(data)
        bound = self.inner.max_encoded_size(shape)
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as e:
            raise PayloadError(f"zstd: {e}") from None
        if size < 0 or size > bound:
            raise PayloadError(f"zstd: frame declares {size} bytes, at most {bound} expected for shape {shape}")
        try:
            window = max(1 << 17, 1 << max(bound - 1, 1).bit_length())
            d = zstandard.ZstdDecompressor(max_window_size=window).decompressobj()
            raw = d.decompress(data)
            complete = d.eof
            unused = d.unused_data
        except zstandard.ZstdError as e:
            raise PayloadError(f"zstd: {e}") from None
        if not complete:
            raise PayloadError("zstd: truncated frame")
        if unused:
            raise PayloadError(f"zstd: {len(unused)} unexpected trailing bytes after the frame")
        if len(raw) != size:
            raise PayloadError(f"zstd: frame declared {size} bytes and held {len(raw)}")
        return self.inner.decode(raw, shape)

    def max_encoded_size(self, shape: tuple[int, ...]) -> int:
        b = self.inner.max_encoded_size(shape)
        return b + b // 128 + 512

    def init_client_state(self, shape: tuple[int, ...]):
        return self.inner.init_client_state(shape)

    def encode_stateful(self, x: torch.Tensor, rng: torch.Generator, state):
        raw, state = self.inner.encode_stateful(x, rng, state)
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(raw), state

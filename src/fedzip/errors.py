"""Exceptions. Each names what was wrong: a field, a file, a client."""

from __future__ import annotations


class FedzipError(Exception):
    """Base class of every error fedzip raises on purpose."""


class ConfigError(FedzipError, ValueError):
    """An unknown option, a wrong type or an out-of-range value."""


class DataError(FedzipError, ValueError):
    """A missing or malformed data file, an unknown client, a shape the model cannot take."""


class PayloadError(FedzipError, ValueError):
    """Bytes on the wire that do not decode: truncated, oversized, wrong version or shape."""


class NonFiniteUpdateError(FedzipError, ArithmeticError):
    """A client update (or a tensor given to a codec) holds NaN or Inf."""


class ClientFailure(FedzipError):
    """A client's work raised; carries the client id and the reason."""

    def __init__(self, client_id: str, reason: str) -> None:
        super().__init__(f"client {client_id!r} failed: {reason}")
        self.client_id = client_id
        self.reason = reason


class RoundFailedError(FedzipError, RuntimeError):
    """A round could not complete; the previous server state is unchanged."""
